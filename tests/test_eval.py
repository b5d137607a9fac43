"""`fluidlm eval`: perplexity equals a hand computation, streaming equals full context, DP=2
equals DP=1, bad input exits 2 with a message, MLflow links the eval run to the training run.

One tiny DA model (d_model 32, 2 layers, vocab 256, max_seq_len 256) is trained for 4 steps on
the synthetic shards of tests/train_helpers.py (one subprocess, MLflow on, sqlite), once per
session; every evaluation below reads its checkpoint."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train_helpers import make_dataset, tiny_config

ROOT = Path(__file__).resolve().parents[1]
MAX_SEQ_LEN = 256


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    data = make_dataset(tmp / "data", samples=96)  # val: 12 samples of 65 tokens
    run = tmp / "runs" / "da"
    config = tiny_config(data, run, model={"max_seq_len": MAX_SEQ_LEN, "dropout": 0.0}, train={"steps": 4},
                         logging={"mlflow": True})
    jobs = tmp / "jobs.json"
    jobs.write_text(json.dumps([{"name": "da", "config": config}]))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "train_runner.py"), str(jobs), str(tmp / "res.json")],
                          cwd=tmp, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"tmp": tmp, "data": data, "run": run, "ckpt": run / "checkpoints" / "step_00000004",
            "val": data / "val" / "manifest.json"}


def run_eval(argv: list[str], capsys=None, mlflow: bool = False):
    from fluidlm.eval.cli import main

    code = main(["--no-progress", *argv] if mlflow else ["--no-progress", "--no-plot", "--no-mlflow", *argv])
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


def evaluate_to(trained, name, extra, capsys=None):
    out = trained["tmp"] / "out" / f"{name}.json"
    code, err = run_eval(["--checkpoint", str(trained["run"]), "--data", str(trained["val"]), "--out", str(out), *extra],
                         capsys)
    assert code == 0, err
    return json.loads(out.read_text())


# --- an independent reference -------------------------------------------------------------------

def val_documents(manifest_path: Path) -> list[np.ndarray]:
    """Whole documents of the val split, read straight from the tars (no fluidlm code)."""
    manifest = json.loads(manifest_path.read_text())
    stream, starts = [], []
    for shard in manifest["shards"]:
        with tarfile.open(manifest_path.parent / shard["file"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for key in sorted({n.split(".")[0] for n in members}):
            toks = np.load(io.BytesIO(members[f"{key}.tokens.npy"])).astype(np.int64)
            starts += (np.load(io.BytesIO(members[f"{key}.starts.npy"])) + len(stream)).tolist()
            stream += toks.tolist()
    bounds = starts + [len(stream)]
    docs = [np.asarray(stream[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return [d for d in docs if d[-1] == 2]  # the last one runs into the cut tail unless it ends in EOS


def reference(trained, c: int, stride: int | None = None):
    """(mean NLL, tokens, {position: [nll]}) computed directly with torch, window by window."""
    from fluidlm.model import FluidLM
    from fluidlm.model.config import ModelConfig

    meta = json.loads((trained["ckpt"] / "client_state.json").read_text())
    module = torch.load(trained["ckpt"] / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    model = FluidLM(ModelConfig.model_validate(meta["config"]["model"]))
    model.load_state_dict({k.removeprefix("model."): v for k, v in module.items()})
    model.eval()
    nlls, by_pos = [], {}
    with torch.no_grad():
        for doc in val_documents(trained["val"]):
            x, y = doc[:-1], doc[1:]
            n = len(x)
            if stride is None or n <= c:
                spans = [(s, min(s + c, n), s) for s in range(0, n, c)]
            else:  # sliding: window [s, s+c), score only what no earlier window scored
                spans, prev, s = [], 0, 0
                while True:
                    e = min(s + c, n)
                    spans.append((s, e, prev))
                    prev = e
                    if e == n:
                        break
                    s += stride
            for s, e, first in spans:
                logits = model(torch.from_numpy(x[s:e])[None])[0]
                nll = F.cross_entropy(logits, torch.from_numpy(y[s:e]), reduction="none")[first - s:]
                nlls.append(nll.double())
                for p, v in zip(range(first - s + 1, e - s + 1), nll.tolist()):
                    by_pos.setdefault(p, []).append(v)
    allnll = torch.cat(nlls)
    return float(allnll.mean()), len(allnll), by_pos


# --- tests ------------------------------------------------------------------------------------------

def test_perplexity_matches_hand_computation(trained):
    report = evaluate_to(trained, "disjoint", ["--context-lengths", "8,32,128"])
    sliding = evaluate_to(trained, "sliding", ["--context-lengths", "32", "--mode", "sliding", "--stride", "8"])
    assert report["mode"] == "disjoint" and sliding["mode"] == "sliding" and sliding["stride"] == 8
    docs = val_documents(trained["val"])
    assert report["data"]["documents"] == len(docs) >= 3
    for r in report["results"] + sliding["results"]:
        stride = 8 if r["stride"] else None
        loss, tokens, by_pos = reference(trained, r["context_length"], stride)
        assert r["tokens"] == tokens == sum(len(d) - 1 for d in docs)  # every target once, at every length
        assert r["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-6)
        assert r["perplexity"] == pytest.approx(np.exp(loss), rel=1e-5)
        assert r["short_documents"] == sum(1 for d in docs if len(d) - 1 < r["context_length"])
        for b in r["loss_by_position"]:
            vals = [v for p in range(b["start"], b["end"] + 1) for v in by_pos.get(p, [])]
            assert b["tokens"] == len(vals)
            if vals:
                assert b["loss"] == pytest.approx(np.mean(vals), rel=1e-5, abs=1e-6)
    # the training length is 64: 128 is past it, and says so
    assert [r["beyond_training_length"] for r in report["results"]] == [False, False, True]


def test_stream_equals_full_context(trained):
    full = evaluate_to(trained, "full", ["--context-lengths", "16,128"])
    stream = evaluate_to(trained, "stream", ["--context-lengths", "16,128", "--stream", "--stream-chunk", "5"])
    assert stream["stream"] is True and full["stream"] is False
    for a, b in zip(full["results"], stream["results"]):
        assert a["tokens"] == b["tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        for x, y in zip(a["loss_by_position"], b["loss_by_position"]):
            assert x["tokens"] == y["tokens"]
            if x["tokens"]:
                assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
    # past model.max_seq_len only by streaming
    long = evaluate_to(trained, "long", ["--context-lengths", str(2 * MAX_SEQ_LEN), "--stream", "--stream-chunk", "64"])
    assert long["results"][0]["beyond_training_length"] and long["results"][0]["tokens"] == full["results"][0]["tokens"]


def test_data_parallel_equals_single_process(trained):
    args = ["--context-lengths", "8,64", "--mode", "sliding", "--stride", "4"]
    single = evaluate_to(trained, "dp1", args)
    out = trained["tmp"] / "out" / "dp2.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "fluidlm.eval", "--checkpoint", str(trained["ckpt"]), "--data", str(trained["val"]),
                           "--out", str(out), "--no-mlflow", "--no-plot", "--threads", "1", *args],
                          cwd=trained["tmp"], env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    double = json.loads(out.read_text())
    assert double["world_size"] == 2
    for a, b in zip(single["results"], double["results"]):
        assert (a["tokens"], a["documents"], a["short_documents"], a["windows"]) == \
               (b["tokens"], b["documents"], b["short_documents"], b["windows"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert [x["tokens"] for x in a["loss_by_position"]] == [x["tokens"] for x in b["loss_by_position"]]


@pytest.mark.parametrize("layout", [["--cp", "2"], ["--tp", "2"], ["--tp", "2", "--stream", "--stream-chunk", "16"]])
def test_context_and_tensor_parallel_equal_single_process(trained, layout):
    """--cp 2: every packed row of windows split across 2 ranks (DA state passed between them);
    --tp 2: the model split by heads/FFN/vocabulary (vocab-parallel cross-entropy), packed and streamed."""
    args = ["--context-lengths", "8,64,128", "--mode", "disjoint"] + (["--stream", "--stream-chunk", "16"]
                                                                       if "--stream" in layout else [])
    single = evaluate_to(trained, "single-" + "-".join(layout), args)
    out = trained["tmp"] / "out" / ("split-" + "-".join(layout) + ".json")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "fluidlm.eval", "--checkpoint", str(trained["ckpt"]), "--data", str(trained["val"]),
                           "--out", str(out), "--no-mlflow", "--no-plot", "--threads", "1", *layout[:2], *args],
                          cwd=trained["tmp"], env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    split = json.loads(out.read_text())
    assert split[layout[0].lstrip("-")] == 2
    for a, b in zip(single["results"], split["results"]):
        assert (a["tokens"], a["documents"], a["short_documents"], a["windows"]) == \
               (b["tokens"], b["documents"], b["short_documents"], b["windows"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


def test_bad_input_exits_2_with_a_message(trained, capsys):
    base = ["--data", str(trained["val"]), "--out", str(trained["tmp"] / "out" / "bad.json")]
    code, err = run_eval(["--checkpoint", str(trained["tmp"] / "nope"), "--context-lengths", "16", *base], capsys)
    assert code == 2 and "no such" in err
    # a checkpoint folder that is not complete
    broken = trained["tmp"] / "broken" / "step_00000004"
    shutil.copytree(trained["ckpt"], broken)
    (broken / "client_state.json").unlink()
    code, err = run_eval(["--checkpoint", str(broken), "--context-lengths", "16", *base], capsys)
    assert code == 2 and "not a complete checkpoint" in err
    # above model.max_seq_len without --stream
    code, err = run_eval(["--checkpoint", str(trained["ckpt"]), "--context-lengths", f"16,{4 * MAX_SEQ_LEN}", *base], capsys)
    assert code == 2 and "max_seq_len=256" in err and "--stream" in err
    # shards made with another tokenizer
    other = trained["tmp"] / "other_val"
    shutil.copytree(trained["val"].parent, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer_sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    code, err = run_eval(["--checkpoint", str(trained["ckpt"]), "--context-lengths", "16", "--data", str(other),
                          "--out", str(trained["tmp"] / "out" / "bad.json")], capsys)
    assert code == 2 and "tokenizer mismatch" in err
    # raw text needs the training tokenizer, which synthetic data does not have
    text = trained["tmp"] / "doc.txt"
    text.write_text("hello")
    code, err = run_eval(["--checkpoint", str(trained["ckpt"]), "--context-lengths", "16", "--data", str(text),
                          "--out", str(trained["tmp"] / "out" / "bad.json")], capsys)
    assert code == 2 and "--tokenizer" in err
    code, err = run_eval(["--checkpoint", str(trained["ckpt"]), "--context-lengths", "16", "--mode", "sliding",
                          "--stride", "16", *base], capsys)
    assert code == 2 and "stride" in err
    assert not (trained["tmp"] / "out" / "bad.json").exists()


def test_unwritable_out_and_ctrl_c_exit_cleanly(trained, capsys, monkeypatch):
    """Issue 27: --out where no file can be written → exit 2 before the checkpoint is read; Ctrl-C
    while scoring → exit 130 with one line and no results file (nor a temporary one)."""
    import fluidlm.eval.inputs
    import fluidlm.eval.perplexity

    (trained["tmp"] / "a-file").write_text("x")
    with monkeypatch.context() as m:
        m.setattr(fluidlm.eval.inputs, "read_pinned", lambda *a: pytest.fail("read before --out was checked"))
        code, err = run_eval(["--checkpoint", str(trained["ckpt"]), "--context-lengths", "16", "--data",
                              str(trained["val"]), "--out", str(trained["tmp"] / "a-file" / "r.json")], capsys)
    assert code == 2 and "--out" in err and "is not writable" in err, err

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fluidlm.eval.perplexity, "evaluate", interrupted)
    out = trained["tmp"] / "interrupted" / "r.json"
    code, err = run_eval(["--checkpoint", str(trained["ckpt"]), "--context-lengths", "16", "--data",
                          str(trained["val"]), "--out", str(out)], capsys)
    assert code == 130 and err.strip().count("\n") == 0 and "interrupted (Ctrl-C)" in err, err
    assert not out.exists() and not (out.parent.exists() and list(out.parent.iterdir()))


def test_mlflow_eval_run_is_linked_to_the_training_run(trained, capsys):
    from mlflow.tracking import MlflowClient

    out = trained["tmp"] / "out" / "mlflow.json"
    code, err = run_eval(["--checkpoint", str(trained["run"]), "--data", str(trained["val"]),
                          "--context-lengths", "16,64", "--out", str(out)], capsys, mlflow=True)
    assert code == 0, err
    report = json.loads(out.read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{trained['run'].parent / 'mlflow.db'}")
    run = client.get_run(report["mlflow_eval_run_id"])
    assert run.data.tags["mlflow.parentRunId"] == run.data.tags["fluidlm.train_run_id"] == report["train_run_id"]
    assert run.data.metrics["eval/perplexity_ctx64"] == pytest.approx(report["results"][1]["perplexity"])
    assert out.with_suffix(".png").stat().st_size > 1000
    # a dead tracking server: a warning, not a failure
    code, err = run_eval(["--checkpoint", str(trained["run"]), "--data", str(trained["val"]),
                          "--context-lengths", "16", "--out", str(out), "--no-plot", "--tracking-uri", "http://127.0.0.1:9"],
                         capsys, mlflow=True)
    assert code == 0 and "WARNING: MLflow" in err
    assert json.loads(out.read_text())["mlflow_eval_run_id"] is None


def test_plot_draws_sparse_position_buckets_apart():
    """A last bucket of a handful of tokens would draw a spike: it is kept off the curve."""
    from fluidlm.eval.report import position_points

    result = {"loss_by_position": [{"start": 1, "end": 1, "tokens": 1000, "loss": 5.0},
                                   {"start": 2, "end": 3, "tokens": 2000, "loss": 4.0},
                                   {"start": 4, "end": 4, "tokens": 12, "loss": 7.5},
                                   {"start": 5, "end": 8, "tokens": 0, "loss": 0.0}]}
    full, sparse = position_points(result)
    assert [p[1] for p in full] == [5.0, 4.0]
    assert sparse == [(4.0, 7.5)]
