"""Synthetic recall tasks as loss-masked shards (format 3, fluidlm/data/shards.py): Zoology's
multi-query associative recall (MQAR) and passkey retrieval documents.

MQAR (Arora et al. 2023, arXiv 2312.04927; the generator of zoology/data/associative_recall.py):
a sample of seq_len + 1 tokens starts with `num_pairs` key-value pairs (k1 v1 k2 v2 …; keys drawn
without replacement from ids 1 … vocab/2 - 1, values from vocab/2 … vocab - 1, so the halves are
disjoint and keys are unique in a sample); after them every key is queried once, at position
2·num_pairs + 2·gap with gaps drawn without replacement from 0 … (seq_len - 2·num_pairs)/2 - 1
with probability ∝ power_a·gap^(power_a - 1) (power_a = 0.01: mostly short gaps, a long tail), in
the order they are drawn (sequential weighted sampling, as numpy's choice; here by Gumbel top-k).
The token after a query is its value and is the only scored target (the loss mask); every other
position is random filler from the whole vocabulary. Zoology feeds random filler as the input after
a query and keeps the value as a label only; here inputs and targets come from one token row, so the
value is also the next input. A causal model cannot see it before predicting it, and every key is
queried once, so that repeat answers no later query.

Splits are seeded apart ((seed, split, seq_len, num_pairs)), and a validation or test sample equal
to a training sample is dropped (counted in the manifest): train and test never share a sequence.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from fluidlm.data import DataError

POWER_A = 0.01
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def _rng(seed: int, split: str, seq_len: int, num_pairs: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_IDS[split], seq_len, num_pairs, 0x3A11])


def _distinct(rng: np.random.Generator, n: int, population: int, k: int) -> np.ndarray:
    """(n, k) ints from 0 … population - 1, distinct within a row, uniformly random sets in random order."""
    out = np.empty((n, k), dtype=np.int64)
    for first in range(0, n, 1024):  # rows in blocks: the random matrix is block × population
        u = rng.random((min(1024, n - first), population))
        picked = np.argpartition(u, k - 1, axis=1)[:, :k]
        out[first:first + len(u)] = rng.permuted(picked, axis=1)
    return out


def check_mqar(seq_len: int, num_pairs: int, vocab_size: int) -> None:
    """Zoology's constraints, as DataError naming the option."""
    if num_pairs < 1 or seq_len % 2 or 4 * num_pairs > seq_len:
        raise DataError(f"MQAR needs an even sequence length of at least 4 × the pairs (got seq_len {seq_len}, "
                        f"num_pairs {num_pairs}): half of what follows the pairs holds the queries")
    if vocab_size // 2 - 1 < num_pairs or vocab_size - vocab_size // 2 < num_pairs:
        raise DataError(f"--vocab-size {vocab_size} is too small for {num_pairs} distinct keys and values per sample")


def mqar_samples(n: int, seq_len: int, num_pairs: int, vocab_size: int = 8192, seed: int = 0, split: str = "train",
                 power_a: float = POWER_A) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, loss_mask), each (n, seq_len + 1): MQAR samples as the module docstring defines them."""
    check_mqar(seq_len, num_pairs, vocab_size)
    rng = _rng(seed, split, seq_len, num_pairs)
    half, context = vocab_size // 2, 2 * num_pairs
    keys = _distinct(rng, n, half - 1, num_pairs) + 1
    values = _distinct(rng, n, vocab_size - half, num_pairs) + half
    space = (seq_len - context) // 2
    log_p = np.log(power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1))
    gaps = np.empty((n, num_pairs), dtype=np.int64)
    for first in range(0, n, 1024):  # Gumbel top-k = weighted sampling without replacement, in draw order
        scores = log_p - np.log(-np.log(rng.random((min(1024, n - first), space))))
        gaps[first:first + len(scores)] = np.argsort(-scores, axis=1)[:, :num_pairs]
    tokens = rng.integers(0, vocab_size, size=(n, seq_len + 1), dtype=np.int64)  # the filler
    tokens[:, 0:context:2], tokens[:, 1:context:2] = keys, values
    query = context + 2 * gaps
    rows = np.arange(n)[:, None]
    tokens[rows, query], tokens[rows, query + 1] = keys, values
    loss_mask = np.zeros(tokens.shape, dtype=bool)
    loss_mask[rows, query + 1] = True
    return tokens, loss_mask


def _row_hashes(tokens: np.ndarray) -> set[bytes]:
    return {hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in tokens}


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """"256:16,512:32" → [(256, 16), (512, 32)] (sequence length : pairs)."""
    out = []
    for item in text.replace(" ", "").split(","):
        if item:
            length, sep, pairs = item.partition(":")
            if not sep or not length.isdigit() or not pairs.isdigit():
                raise DataError(f"{item!r} is not SEQ_LEN:NUM_PAIRS (e.g. 512:32)")
            out.append((int(length), int(pairs)))
    return out


def test_split_name(seq_len: int, num_pairs: int) -> str:
    return f"test-{seq_len}x{num_pairs}"


def write_mqar(out: Path, train_shape=(256, 16), test_shapes=((256, 16), (512, 32), (1024, 64), (4096, 256)),
               train_examples: int = 100_000, val_examples: int = 1000, test_examples: int = 1000,
               vocab_size: int = 8192, seed: int = 0, power_a: float = POWER_A, samples_per_shard: int = 1024) -> dict:
    """out/train, out/val (the training shape) and out/test-<L>x<P> per test shape: loss-masked
    shards with a "task" record. Returns {split: manifest}."""
    from fluidlm.data.shards import write_sample_shards

    out = Path(out)
    for shape in [train_shape, *test_shapes]:
        check_mqar(*shape, vocab_size)
    plan = [("train", "train", train_shape, train_examples), ("val", "val", train_shape, val_examples)]
    plan += [(test_split_name(*shape), "test", shape, test_examples) for shape in test_shapes]
    manifests, train_rows = {}, None
    for folder, split, (seq_len, pairs), n in plan:
        tokens, mask = mqar_samples(n, seq_len, pairs, vocab_size, seed, split, power_a)
        dropped = 0
        if split == "train":
            train_rows = _row_hashes(tokens)
        elif (seq_len, pairs) == tuple(train_shape):  # only samples of the training length can repeat one
            keep = np.array([hashlib.blake2b(r.tobytes(), digest_size=16).digest() not in train_rows for r in tokens])
            dropped = int((~keep).sum())
            tokens, mask = tokens[keep], mask[keep]
        task = {"name": "mqar", "split": split, "seq_len": seq_len, "num_pairs": pairs, "vocab_size": vocab_size,
                "power_a": power_a, "seed": seed, "examples": len(tokens), "dropped_as_in_train": dropped}
        manifests[folder] = write_sample_shards(tokens, mask, out / folder, vocab_size, task, samples_per_shard,
                                                tokenizer="synthetic:mqar")
    return manifests


# --- passkey ------------------------------------------------------------------------------------------

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is "
KEY_DIGITS = 5


class PasskeyText:
    """Token pieces of the passkey prompt (Mohtashami & Jaggi 2023), encoded once with `tokenizer`
    (a sentencepiece processor): the key's digits are encoded on their own, so the needle and the
    answer hold the same ids."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.filler = tokenizer.encode(FILLER * 8)
        head, _, tail = NEEDLE.partition("{key}")
        middle, _, end = tail.partition("{key}")
        self.needle_parts = [tokenizer.encode(head), tokenizer.encode(middle), tokenizer.encode(end)]
        self.question = tokenizer.encode(QUESTION)

    def key_ids(self, key: int) -> list[int]:
        return self.tok.encode(str(key))

    def prompt(self, key: int, length: int, depth: float) -> list[int]:
        """Filler, the needle at `depth` (0 = the start, 1 = just before the question), the question:
        `length` tokens in all (the answer follows it)."""
        k = self.key_ids(key)
        needle = self.needle_parts[0] + k + self.needle_parts[1] + k + self.needle_parts[2]
        room = length - len(needle) - len(self.question)
        if room < 0:
            raise DataError(f"a passkey prompt needs at least {len(needle) + len(self.question)} tokens, got {length}")
        reps = -(-room // len(self.filler))
        filler = (self.filler * max(reps, 1))[:room]
        at = int(round(depth * room))
        return filler[:at] + needle + filler[at:] + self.question


def random_key(rng: np.random.Generator) -> int:
    return int(rng.integers(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS))


def passkey_samples(text: PasskeyText, n: int, seq_len: int, seed: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, loss_mask), each (n, seq_len + 1): prompts of seq_len + 1 - (answer) tokens with the
    needle at a uniform depth, then the key's digits, the only scored targets."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], seq_len, 0x9A55])
    tokens = np.zeros((n, seq_len + 1), dtype=np.int64)
    mask = np.zeros(tokens.shape, dtype=bool)
    for i in range(n):
        key = random_key(rng)
        answer = text.key_ids(key)
        prompt = text.prompt(key, seq_len + 1 - len(answer), float(rng.random()))
        tokens[i] = prompt + answer
        mask[i, len(prompt):] = True
    return tokens, mask


def write_passkey(out: Path, tokenizer_path: Path, seq_len: int = 1024, train_examples: int = 2000,
                  val_examples: int = 64, seed: int = 0) -> dict:
    """out/train and out/val of passkey documents (fine-tuning a checkpoint to retrieve), made with
    the training tokenizer (its path and sha256 go in the manifests)."""
    from fluidlm.data.shards import write_sample_shards
    from fluidlm.data.tokenizer import file_sha256, load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    text = PasskeyText(tok)
    manifests = {}
    for split, n in (("train", train_examples), ("val", val_examples)):
        tokens, mask = passkey_samples(text, n, seq_len, seed, split)
        task = {"name": "passkey", "split": split, "seq_len": seq_len, "seed": seed, "examples": n,
                "key_digits": KEY_DIGITS}
        manifests[split] = write_sample_shards(tokens, mask, Path(out) / split, tok.get_piece_size(), task,
                                               tokenizer=str(Path(tokenizer_path).resolve()),
                                               tokenizer_sha256=file_sha256(tokenizer_path))
    return manifests
