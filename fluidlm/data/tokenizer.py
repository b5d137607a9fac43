"""The sentencepiece tokenizer: BPE with byte fallback and no normalisation, so every input
(tabs, newlines, trailing spaces, any Unicode) round-trips exactly: decode(encode(x)) == x."""

from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path

from fluidlm.data import DataError

UNK, BOS, EOS = 0, 1, 2
MAX_TRAINING_LINES = 300_000


def train_tokenizer(documents, vocab_size: int, out: Path, seed: int = 0) -> dict:
    import sentencepiece as spm

    lines = [line for doc in documents for line in doc.split("\n") if line]
    if not lines:
        raise DataError("the corpus is empty: no non-empty line to train the tokenizer on; check --input")
    random.Random(seed).shuffle(lines)
    lines = lines[:MAX_TRAINING_LINES]
    distinct_chars = len(set("".join(lines[:50_000])))
    if vocab_size < 256 + 4 + 1:
        raise DataError(f"--vocab-size {vocab_size} is too small: byte fallback alone needs 260 ids; use at least 300")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
            user_defined_symbols=["\n"], max_sentence_length=1 << 16, unk_id=UNK, bos_id=BOS, eos_id=EOS,
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
    return {"path": str(out), "vocab_size": vocab_size, "training_lines": len(lines), "sha256": file_sha256(out)}


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
