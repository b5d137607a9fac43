"""The sentencepiece tokenizer: BPE with byte fallback and no normalisation, so every input
(tabs, newlines, trailing spaces, any Unicode) round-trips exactly: decode(encode(x)) == x.

It carries a mask token for the masked-LM objective, `<mask>` (MASK_PIECE), added to the
vocabulary when the tokenizer is trained. It is a sentencepiece *control* symbol, not a
user-defined one: user-defined symbols are also matched in the text, so a corpus that contains the
string "<mask>" (documentation, HTML) would put mask tokens into the data; a control symbol is
never produced by encoding text, only placed by id (and decodes to nothing). Tokenizers made before
it existed have no mask token: `special_ids` says so and how to rebuild."""

from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path

from fluidlm.data import DataError

UNK, BOS, EOS = 0, 1, 2
MASK_PIECE = "<mask>"  # = fluidlm.model.objective.MASK_PIECE
MAX_TRAINING_LINES = 300_000


def train_tokenizer(documents, vocab_size: int, out: Path, seed: int = 0) -> dict:
    import sentencepiece as spm

    lines = [line for doc in documents for line in doc.split("\n") if line]
    if not lines:
        raise DataError("the corpus is empty: no non-empty line to train the tokenizer on; check --input")
    random.Random(seed).shuffle(lines)
    lines = lines[:MAX_TRAINING_LINES]
    distinct_chars = len(set("".join(lines[:50_000])))
    if vocab_size < 256 + 5 + 1:  # 256 bytes + UNK, BOS, EOS, "\n", <mask>
        raise DataError(f"--vocab-size {vocab_size} is too small: byte fallback and the special pieces alone need 261 ids; "
                        "use at least 300")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
            user_defined_symbols=["\n"], control_symbols=[MASK_PIECE], max_sentence_length=1 << 16, unk_id=UNK, bos_id=BOS, eos_id=EOS,
            pad_id=-1, num_threads=2, minloglevel=2, hard_vocab_limit=True,
        )
    except RuntimeError as exc:
        if "smaller than required" in str(exc):
            raise DataError(
                f"--vocab-size {vocab_size} is too small for this corpus's {distinct_chars}+ distinct characters "
                f"plus byte fallback: use a larger --vocab-size ({exc})"
            ) from None
        if "Vocabulary size" in str(exc) or "vocab_size" in str(exc):
            raise DataError(
                f"--vocab-size {vocab_size} is larger than this corpus supports ({len(lines)} lines, "
                f"{distinct_chars} distinct characters): use a smaller --vocab-size or more text ({exc})"
            ) from None
        raise
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    return {"path": str(out), "vocab_size": vocab_size, "training_lines": len(lines), "sha256": file_sha256(out),
            "mask_id": mask_id(load_tokenizer(out))}


def load_tokenizer(path: Path):
    import sentencepiece as spm

    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer {str(path)!r} not found; train one with `fluidlm data tokenizer`")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as exc:
        raise DataError(f"tokenizer {str(path)!r} is not a sentencepiece model ({exc})") from None


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def mask_id(tokenizer) -> int | None:
    """Id of the tokenizer's mask token (MASK_PIECE), None when it has none (made before FluidLM added it)."""
    i = tokenizer.piece_to_id(MASK_PIECE)
    return i if tokenizer.id_to_piece(i) == MASK_PIECE else None


def special_ids(path: Path) -> dict:
    """{"mask_id", "special_ids" (control + unknown ids: never masked nor drawn as random
    replacements), "vocab_size"} of a tokenizer file. DataError when it has no mask token."""
    tok = load_tokenizer(path)
    mid = mask_id(tok)
    if mid is None:
        raise DataError(f"the tokenizer {str(path)!r} has no mask token {MASK_PIECE!r} (it was made before FluidLM added "
                        "one); rebuild it and the shards: `fluidlm data prepare --out DIR` retrains a tokenizer without "
                        "one, or `fluidlm data tokenizer` then `fluidlm data shards`")
    size = tok.get_piece_size()
    special = [i for i in range(size) if tok.is_control(i) or tok.is_unknown(i)]
    return {"mask_id": mid, "special_ids": special, "vocab_size": size}
