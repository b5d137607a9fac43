"""Issue 29: per-token loss masks in the data path, MQAR and passkey retrieval.

The generator's invariants (keys unique per sample, each query's value earlier, masks exactly on the
scored positions, disjoint splits); loss-masked shards through the loader and the validation slice
(old shards read as before); the masked loss equals a direct computation (its layout independence
is checked by tests/test_train_model_parallel.py, whose data carries loss masks); an oracle scores
1.0 and a constant predictor chance; the passkey scorer on handcrafted models; `--task` refusals;
train.eval_tasks logs val/mqar_acc."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from export_helpers import tiny_model, write_checkpoint
from train_helpers import make_dataset, read_metrics, tiny_config, write_config

ROOT = Path(__file__).resolve().parents[1]


# --- MQAR generator ----------------------------------------------------------------------------------

def test_mqar_samples_keep_zoology_invariants():
    from fluidlm.data.synthetic import mqar_samples

    seq_len, pairs, vocab = 128, 8, 512
    tokens, mask = mqar_samples(400, seq_len, pairs, vocab, seed=3)
    assert tokens.shape == mask.shape == (400, seq_len + 1)
    half, context = vocab // 2, 2 * pairs
    gaps = []
    for row, m in zip(tokens, mask):
        keys, values = row[0:context:2], row[1:context:2]
        assert len(set(keys)) == pairs and len(set(values)) == pairs          # unique per sample
        assert keys.min() >= 1 and keys.max() < half and values.min() >= half  # disjoint halves
        pair = dict(zip(keys.tolist(), values.tolist()))
        scored = np.nonzero(m)[0]
        assert len(scored) == pairs and scored.min() > context                 # one answer per key, after the pairs
        assert sorted(row[scored - 1].tolist()) == sorted(keys.tolist())       # each key queried once
        for p in scored:                                                       # the answer is the value given earlier
            assert row[p] == pair[row[p - 1]] and (p - 1 - context) % 2 == 0
        gaps += ((scored - 1 - context) // 2).tolist()
    gaps = np.asarray(gaps)
    space = (seq_len - context) // 2
    assert gaps.max() < space
    assert (gaps < space // 4).mean() > 0.3 and (gaps >= space // 2).mean() > 0.1  # power law: short gaps favoured, a tail
    again, _ = mqar_samples(400, seq_len, pairs, vocab, seed=3)
    assert np.array_equal(again, tokens)  # seeded


def test_mqar_splits_are_disjoint_masked_shards_and_read_back(tmp_path, capsys):
    from fluidlm.data.cli import cmd_synthetic_mqar
    from fluidlm.data.loader import ShardLoader
    from fluidlm.train.validation import validation_batches
    import argparse

    args = argparse.Namespace(out=str(tmp_path / "mqar"), seq_len=64, num_pairs=4, test="64:4,128:8",
                              train_examples=1000, val_examples=200, test_examples=200, vocab_size=32,
                              power_a=0.01, seed=0)
    assert cmd_synthetic_mqar(args) == 0
    root = tmp_path / "mqar"
    manifests = {d.name: json.loads((d / "manifest.json").read_text()) for d in root.iterdir()}
    assert sorted(manifests) == ["test-128x8", "test-64x4", "train", "val"]
    assert all(m["format_version"] == 3 and m["loss_mask"] and m["task"]["name"] == "mqar" for m in manifests.values())

    def rows(split):
        from fluidlm.eval.tasks import read_task_split

        _, tokens, mask = read_task_split(root / split / "manifest.json", "mqar", 64)
        return tokens, mask

    train, _ = rows("train")
    seen = {hashlib.blake2b(r.tobytes()).digest() for r in train}
    for split in ("val", "test-64x4"):  # a tiny vocabulary makes repeats possible: they are dropped
        tokens, mask = rows(split)
        assert not any(hashlib.blake2b(r.tobytes()).digest() in seen for r in tokens)
        assert len(tokens) + manifests[split]["task"]["dropped_as_in_train"] == 200
        assert (mask.sum(1) == 4).all()

    loader = ShardLoader(root / "train" / "manifest.json", micro_batch_size=4, seed=0, lanes=1)
    batch = next(iter(loader))
    assert batch["loss_mask"].dtype == torch.bool and (batch["loss_mask"].sum(1) == 4).all()
    val = validation_batches(root / "val" / "manifest.json", 64 * 8, 4, 0, 1)
    assert all((b["loss_mask"].sum(1) == 4).all() for b in val)
    # old (format 1) shards: no loss mask, every target scored, as before
    old = make_dataset(tmp_path / "old", samples=32)
    assert "loss_mask" not in next(iter(ShardLoader(old / "train" / "manifest.json", micro_batch_size=2, lanes=1)))
    # perplexity would count the filler: refused, naming the task command
    from fluidlm.data import DataError
    from fluidlm.data.documents import load_documents

    with pytest.raises(DataError, match="fluidlm eval --task mqar"):
        load_documents([str(root / "val")], vocab_size=64, train_tokenizer=(None, None, ""))


def test_masked_loss_is_the_cross_entropy_of_the_unmasked_targets():
    from fluidlm.model import FluidLM
    from fluidlm.model.config import ModelConfig
    from fluidlm.train.batches import split_batch

    torch.manual_seed(0)
    model = FluidLM(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, head_dim=16, chunk_size=8,
                                max_seq_len=64)).double()
    tokens = torch.randint(3, 64, (2, 33))
    loss_mask = torch.rand(2, 33) < 0.3
    starts = torch.zeros(2, 33, dtype=torch.bool)
    starts[1, 20] = True
    inputs, targets, _ = split_batch({"tokens": tokens, "doc_starts": starts, "loss_mask": loss_mask})
    cu = torch.tensor([0, 32, 52, 64])
    sel = loss_mask[:, 1:].flatten()
    want = F.cross_entropy(model(inputs.reshape(1, -1), cu)[0][sel], tokens[:, 1:].flatten()[sel])
    assert model.loss(inputs.reshape(1, -1), targets.reshape(1, -1), cu, chunk_tokens=8).item() == \
        pytest.approx(want.item(), rel=1e-6)  # the chunked loss sums in fp32
    assert torch.equal(split_batch({"tokens": tokens, "doc_starts": starts})[1], tokens[:, 1:])  # no mask: all scored


# --- scoring ------------------------------------------------------------------------------------------

def oracle_predict(context: int):
    """Copies the right answer: at a query (a key seen among the first `context` tokens, at an even
    position) predict the token that followed it there; elsewhere token 0."""
    def predict(inputs):
        out = torch.zeros_like(inputs)
        for b, row in enumerate(inputs.tolist()):
            pairs = {row[i]: row[i + 1] for i in range(0, context, 2)}
            for t in range(context, len(row)):
                out[b, t] = pairs.get(row[t], 0)
        return out
    return predict


def test_an_oracle_scores_one_and_a_constant_predictor_chance():
    from fluidlm.data.synthetic import mqar_samples
    from fluidlm.eval.tasks import recall_accuracy

    vocab, pairs = 64, 4
    tokens, mask = mqar_samples(2000, 64, pairs, vocab, seed=1)
    assert recall_accuracy(oracle_predict(2 * pairs), tokens, mask, batch=64)["accuracy"] == 1.0
    constant = recall_accuracy(lambda x: torch.full_like(x, vocab // 2 + 5), tokens, mask, batch=500)
    assert constant["scored"] == 2000 * pairs
    assert constant["accuracy"] == pytest.approx(1 / (vocab // 2), abs=0.01)  # chance: one value of 32


class CharTokenizer:
    """encode: one id per character (3 + code point mod 200): enough for the passkey prompt."""

    def encode(self, text):
        return [3 + ord(c) % 200 for c in text]


class InductionModel:
    """A handcrafted causal 'model' with forward_stream: at each position it predicts the token that
    followed the last earlier occurrence of the current 12 tokens (the induction-head rule; with one
    id per character, "pass key is " occurs only in the needle and at the end of the question); its
    state is (the tokens so far, 12-gram → the token after it)."""

    vocab, k = 256, 12

    def forward_stream(self, tokens, state=None):
        history, follower = ([], {}) if state is None else state
        out = torch.zeros(1, tokens.shape[1], self.vocab)
        for j, t in enumerate(tokens[0].tolist()):
            history.append(t)
            if len(history) > self.k:
                follower[tuple(history[-self.k - 1:-1])] = t
            nxt = follower.get(tuple(history[-self.k:]))
            if nxt is not None and len(history) >= self.k:
                out[0, j, nxt] = 10.0
        return out, (history, follower)


class ConstantModel:
    def forward_stream(self, tokens, state=None):
        return torch.zeros(tokens.shape[0], tokens.shape[1], 256), state


def test_passkey_scorer_on_handcrafted_models(tmp_path):
    from fluidlm.data.synthetic import PasskeyText
    from fluidlm.eval.tasks import format_passkey, plot_passkey, score_passkey

    text = PasskeyText(CharTokenizer())
    got = score_passkey(InductionModel(), text, [400, 800], [0.0, 0.5, 1.0], trials=2, seed=0, chunk=128)
    assert len(got) == 6 and all(r["exact_match"] == 1.0 and r["mean_rank"] == 1.0 for r in got)
    flat = score_passkey(ConstantModel(), text, [400], [0.5], trials=2, seed=0, chunk=128)[0]
    assert flat["exact_match"] == 0.0 and flat["mean_rank"] == 50.5  # indifferent: the middle of 100
    assert "0.50" in format_passkey(got) or "1.00" in format_passkey(got)
    assert plot_passkey(got, tmp_path / "h.png", "test").stat().st_size > 1000


# --- the commands --------------------------------------------------------------------------------------

def _eval(argv):
    from fluidlm.eval.cli import main

    return main(["--no-progress", "--no-plot", "--no-mlflow", *argv])


def test_task_refusals_exit_2_with_the_reason(tmp_path, capsys):
    from fluidlm.data.synthetic import write_mqar

    write_mqar(tmp_path / "mqar", (64, 4), [(64, 4), (128, 8)], 50, 10, 10, vocab_size=256)
    bidir = write_checkpoint(tiny_model(direction="bidirectional"), tmp_path / "bidir")
    assert _eval(["--task", "passkey", "--checkpoint", str(bidir), "--context-lengths", "1k"]) == 2
    assert "bidirectional" in capsys.readouterr().err
    soft = write_checkpoint(tiny_model("softmax"), tmp_path / "soft")  # max_seq_len 64
    assert _eval(["--task", "mqar", "--checkpoint", str(soft), "--data", str(tmp_path / "mqar")]) == 2
    assert "[128] exceed what this model supports without streaming" in capsys.readouterr().err
    da = write_checkpoint(tiny_model("da"), tmp_path / "da")
    assert _eval(["--task", "mqar", "--checkpoint", str(da), "--data", str(tmp_path / "mqar")]) == 2
    assert "add --stream" in capsys.readouterr().err
    out = tmp_path / "da.json"
    assert _eval(["--task", "mqar", "--checkpoint", str(da), "--data", str(tmp_path / "mqar"), "--stream",
                  "--stream-chunk", "48", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [(r["seq_len"], r["num_pairs"], r["scored"]) for r in report["results"]] == [(64, 4, 40), (128, 8, 80)]
    # streamed = one forward (a model within its max_seq_len)
    from fluidlm.eval.tasks import greedy_predictions

    x = torch.randint(0, 256, (2, 64))
    model = tiny_model("da")
    assert torch.equal(greedy_predictions(model, True, 24)(x), greedy_predictions(model)(x))


def test_eval_tasks_config_and_val_mqar_acc_in_metrics(tmp_path):
    from fluidlm.data.synthetic import write_mqar
    from fluidlm.train.config import ConfigError, build_config, preflight

    data = tmp_path / "mqar"
    write_mqar(data, (64, 4), [], 256, 16, 0, vocab_size=256)
    cfg = tiny_config(data, tmp_path / "run", train={"eval_every": 2, "eval_tasks": ["mqar"], "steps": 4,
                                                     "eval_tokens": 512})
    with pytest.raises(ConfigError, match="train.eval_tasks.*set train.eval_every"):
        build_config(copy.deepcopy({**cfg, "train": {**cfg["train"], "eval_every": 0}}))
    with pytest.raises(ConfigError, match="train.eval_tasks needs parallel.tp = pp = cp = 1"):
        build_config(copy.deepcopy({**cfg, "parallel": {"tp": 2}}))
    text = make_dataset(tmp_path / "text", samples=32)
    with pytest.raises(ConfigError, match="holds text; make it with `fluidlm data synthetic mqar"):
        preflight(build_config(copy.deepcopy({**cfg, "data": {**cfg["data"], "dir": str(text)}})))
    path = write_config(tmp_path / "mqar.yaml", cfg)
    proc = subprocess.run([sys.executable, "-m", "fluidlm.train", "--config", str(path)], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = [m for m in read_metrics(tmp_path / "run") if "val/mqar_acc" in m]
    assert [m["step"] for m in logged] == [2, 4]
    assert all(0.0 <= m["val/mqar_acc"] <= 1.0 and m["val/tokens"] == 8 * 4 for m in logged)  # 8 samples × 4 answers
