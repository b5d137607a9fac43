"""The export's tokenizer for transformers alone: tokenizer.json + tokenizer_config.json from the
sentencepiece model the checkpoint was trained with (fluidlm/data/tokenizer.py: BPE, byte fallback,
identity normalisation, no dummy prefix, "\\n" a user-defined piece, <mask> a control piece).

    DIR/tokenizer.json          a `tokenizers` BPE model: the sentencepiece vocabulary, merges ranked as
                                sentencepiece merges (the score of the merged piece, highest first),
                                byte fallback, " " → "▁" and back; no BOS/EOS added (as sp.encode)
    DIR/tokenizer_config.json   PreTrainedTokenizerFast (transformers 4.x and 5.x, no sentencepiece,
                                no protobuf), model_max_length = max_seq_len, bos/eos/unk/pad/mask

Special pieces are never matched in text (split_special_tokens), as in sentencepiece, where a
control piece is only placed by id. Pad is <unk> (the model's pad_token_id; padded positions are masked).
"""

from __future__ import annotations

import json
from pathlib import Path

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
SPACE = "\u2581"  # sentencepiece's whitespace symbol


def bpe_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every split (left, right) of a normal piece into two pieces, ranked the way sentencepiece's
    BPE applies them: the merged piece's score, highest first (ties: the split's piece ids)."""
    merges = []
    for piece, score in scores.items():
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                merges.append((-score, vocab[piece], vocab[left], vocab[right], left, right))
    return [(left, right) for *_, left, right in sorted(merges)]


def write_hf_tokenizer(sp_model: str | Path, out: str | Path, *, model_max_length: int) -> list[str]:
    """Write tokenizer.json and tokenizer_config.json for the sentencepiece model `sp_model` into
    `out`; returns the file names. Needs sentencepiece and tokenizers (fluidlm[export])."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    from fluidlm.data.tokenizer import MASK_PIECE

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    size = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(size)}
    user_defined = _user_defined(sp)
    # sentencepiece merges only into normal pieces (not control, unknown, byte or user-defined ones)
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(size)
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i) or i in user_defined)
              and len(sp.id_to_piece(i)) > 1}
    unk = sp.id_to_piece(sp.unk_id())
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=bpe_merges(vocab, scores), unk_token=unk, fuse_unk=True,
                                     byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", SPACE)
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    special = {"bos_token": sp.id_to_piece(sp.bos_id()), "eos_token": sp.id_to_piece(sp.eos_id()), "unk_token": unk,
               "pad_token": unk}
    if vocab.get(MASK_PIECE) is not None and sp.is_control(vocab[MASK_PIECE]):
        special["mask_token"] = MASK_PIECE
    controls = [sp.id_to_piece(i) for i in range(size) if sp.is_control(i) or sp.is_unknown(i)]
    tokenizer.add_tokens([AddedToken(sp.id_to_piece(i), special=False, normalized=False) for i in sorted(user_defined)])
    tokenizer.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in controls])
    out = Path(out)
    tokenizer.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "split_special_tokens": True, "padding_side": "left", **special}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False))
    return [*HF_TOKENIZER_FILES, "special_tokens_map.json"]


def _user_defined(sp) -> set[int]:
    """Ids of the user-defined pieces: sentencepiece's Python API cannot tell them apart, but its
    vocabulary lays out the meta pieces (unknown, control, user-defined) first, then the bytes, then
    the normal pieces; so they are the meta-block ids that are neither control nor unknown."""
    size = sp.get_piece_size()
    end = next((i for i in range(size) if sp.is_byte(i)), None)
    if end is None:  # no byte fallback: the meta block ends at the first piece with a merge score
        end = next((i for i in range(size) if sp.get_score(i) != 0.0), size)
    return {i for i in range(end) if not (sp.is_control(i) or sp.is_unknown(i))}
