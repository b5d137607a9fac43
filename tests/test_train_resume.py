"""Single-process training: exact resume, atomic checkpoints, NaN stop, MLflow.

All jobs run in ONE subprocess (tests/train_runner.py) on a tiny model (d_model 32, 2 layers,
vocab 256) and synthetic data, so DeepSpeed is imported once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train_helpers import losses, make_dataset, read_metrics, tiny_config

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    data = make_dataset(tmp / "data")
    r = tmp / "runs"

    def cfg(run, **sections):
        base = {"data": {"num_workers": 2}}  # exact resume must hold with loader workers and dropout on
        for key, value in sections.items():
            base.setdefault(key, {}).update(value)
        return tiny_config(data, r / run, **base)

    jobs = [
        {"name": "straight", "config": cfg("straight")},
        {"name": "staged_a", "config": cfg("staged", train={"stop_at": 4}, logging={"mlflow": True})},
        {"name": "staged_b", "config": cfg("staged", logging={"mlflow": True}), "resume": "auto"},
        {"name": "killed_a", "config": cfg("killed", checkpoint={"every": 2}), "fail_publish_at": 4},
        {"name": "killed_b", "config": cfg("killed", checkpoint={"every": 2}), "resume": "auto"},
        {"name": "nan", "config": cfg("nan", checkpoint={"every": 4}, train={"debug_nan_at_step": 6})},
        {"name": "nan_resume", "config": cfg("nan", checkpoint={"every": 4}), "resume": "auto"},
        {"name": "z3_straight", "config": cfg("z3_straight", parallel={"zero_stage": 3})},
        {"name": "z3_a", "config": cfg("z3", parallel={"zero_stage": 3}, train={"stop_at": 3})},
        {"name": "z3_b", "config": cfg("z3", parallel={"zero_stage": 3}), "resume": "auto"},
        # bf16 (the GPU precision; DeepSpeed's BF16_Optimizer names its files bf16_zero_pp_rank_*)
        {"name": "bf16_straight", "config": cfg("bf16_straight", train={"precision": "bf16"})},
        {"name": "bf16_a", "config": cfg("bf16", train={"precision": "bf16", "stop_at": 3})},
        {"name": "bf16_b", "config": cfg("bf16", train={"precision": "bf16"}), "resume": "auto"},
        # validation during training: must not change the training curve, resumes exactly
        {"name": "val_straight", "config": cfg("val_straight", train={"eval_every": 3, "eval_tokens": 256})},
        {"name": "val_a", "config": cfg("val", train={"eval_every": 3, "eval_tokens": 256, "stop_at": 4})},
        {"name": "val_b", "config": cfg("val", train={"eval_every": 3, "eval_tokens": 256}), "resume": "auto"},
        {"name": "mlflow_down", "config": cfg("mlflow_down", logging={"mlflow": True, "tracking_uri": "http://127.0.0.1:9"})},
    ]
    jobs_path, out = tmp / "jobs.json", tmp / "results.json"
    jobs_path.write_text(json.dumps(jobs))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "train_runner.py"), str(jobs_path), str(out)],
                          cwd=tmp, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads(out.read_text())
    return {"tmp": tmp, "runs": r, "data": data, "results": results, "stdout": proc.stdout}


def test_straight_run_trains(runs):
    res = runs["results"]["straight"]
    assert res["code"] == 0, res
    metrics = read_metrics(runs["runs"] / "straight")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    for key in ("loss", "perplexity", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_mib"):
        assert key in metrics[0]
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert (runs["runs"] / "straight" / "config.yaml").is_file()
    assert (runs["runs"] / "straight" / "checkpoints" / "latest").read_text() == "step_00000008"


def test_stop_and_resume_reproduces_the_straight_run_bitwise(runs):
    """train.stop_at=4 then --resume auto == 8 straight steps, with dropout and 2 loader workers."""
    res = runs["results"]
    assert res["staged_a"]["code"] == 0 and res["staged_b"]["code"] == 0, res
    straight, staged = losses(runs["runs"] / "straight"), losses(runs["runs"] / "staged")
    assert list(staged) == list(range(1, STEPS + 1))
    assert staged == straight  # bitwise: exact float equality


def test_zero3_checkpoints_resume_exactly(runs):
    """ZeRO-3 shards the weights (a different checkpoint layout): stop at 3, resume to 8."""
    res = runs["results"]
    assert res["z3_a"]["code"] == 0 and res["z3_b"]["code"] == 0, res["z3_b"]
    assert "zero_pp_rank_0_mp_rank_00_model_states.pt" in os.listdir(runs["runs"] / "z3" / "checkpoints" / "step_00000008")
    assert losses(runs["runs"] / "z3") == losses(runs["runs"] / "z3_straight")


def test_bf16_checkpoints_resume_exactly_and_convert(runs, tmp_path):
    res = runs["results"]
    assert res["bf16_a"]["code"] == 0 and res["bf16_b"]["code"] == 0, res["bf16_b"]
    final = runs["runs"] / "bf16" / "checkpoints" / "step_00000008"
    assert "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt" in os.listdir(final)
    assert losses(runs["runs"] / "bf16") == losses(runs["runs"] / "bf16_straight")
    from fluidlm.train.checkpoint_read import read_info
    from fluidlm.train.universal import convert

    info = read_info(convert(final, tmp_path / "universal"))
    assert info["step"] == 8 and "embed.weight" in info["parameters"]


def test_killed_save_leaves_latest_on_the_previous_checkpoint(runs):
    res = runs["results"]["killed_a"]
    assert res["code"] is None and "simulated kill" in res["error"]
    snap = runs["results"]["killed_a"]
    assert snap["latest"] == "step_00000002"
    assert ".tmp-step_00000004" in snap["entries"]  # the half-written save is there...
    assert "step_00000004" not in snap["entries"]
    # ...and resume ignores it, continues from step 2 and reproduces the straight run.
    assert runs["results"]["killed_b"]["code"] == 0
    assert f"resuming from {runs['runs'] / 'killed' / 'checkpoints' / 'step_00000002'}" in runs["stdout"]
    assert losses(runs["runs"] / "killed") == losses(runs["runs"] / "straight")
    ck = runs["runs"] / "killed" / "checkpoints"
    names = sorted(p.name for p in ck.iterdir() if p.name.startswith(("step_", ".tmp")))
    assert names == ["step_00000004", "step_00000006", "step_00000008"]  # keep=3, stale temp folder removed


def test_nan_loss_stops_with_a_checkpoint_of_the_last_good_step(runs):
    res = runs["results"]["nan"]
    assert res["code"] == 3
    assert "not finite" in res["stderr"] and "step 6" in res["stderr"] and "step_00000005" in res["stderr"]
    assert res["latest"] == "step_00000005"
    assert [e for e in res["entries"] if e.startswith("step_")] == ["step_00000004", "step_00000005"]
    # The saved step-5 state is exactly the straight run's: resuming from it continues identically.
    assert runs["results"]["nan_resume"]["code"] == 0
    assert losses(runs["runs"] / "nan") == losses(runs["runs"] / "straight")


def test_mlflow_sqlite_store_holds_params_metrics_and_the_resumed_run(runs):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{runs['runs'] / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fluidlm")
    found = client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 'staged'")
    assert len(found) == 1  # the resumed run continued the same MLflow run
    run = found[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["model.d_model"] == "32" and run.data.params["train.steps"] == str(STEPS)
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted({m.step for m in history}) == list(range(1, STEPS + 1))
    assert {"perplexity", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_mib"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts and "config_resume_step4.yaml" in artifacts


def test_unreachable_mlflow_server_warns_once_and_training_finishes(runs):
    res = runs["results"]["mlflow_down"]
    assert res["code"] == 0
    assert res["stderr"].count("WARNING: MLflow") == 1, res["stderr"]
    assert res["seconds"] < 30
    assert len(read_metrics(runs["runs"] / "mlflow_down")) == STEPS


def test_missing_or_corrupt_checkpoint_gives_a_clear_error(runs, tmp_path):
    import shutil

    from fluidlm.train.checkpoint_read import CheckpointError, resolve_resume

    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_resume(str(tmp_path / "nope"), tmp_path)
    broken = tmp_path / "step_00000008"
    shutil.copytree(runs["runs"] / "straight" / "checkpoints" / "step_00000008", broken)
    (broken / "client_state.json").unlink()
    with pytest.raises(CheckpointError, match="client_state.json is missing"):
        resolve_resume(str(broken), tmp_path)
    (tmp_path / "latest").write_text("step_00000008")
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resolve_resume("auto", tmp_path)
    assert resolve_resume("auto", tmp_path / "empty") is None  # nothing yet: start fresh


def test_validation_during_training_leaves_the_curve_alone_resumes_exactly_and_equals_a_direct_computation(runs):
    import numpy as np
    import torch
    import torch.nn.functional as F

    from fluidlm.data.shards import read_shard
    from fluidlm.eval.inputs import load_model
    from fluidlm.train.checkpoint_read import checkpoint_info

    for name in ("val_straight", "val_a", "val_b"):
        assert runs["results"][name]["code"] == 0, runs["results"][name]
    straight, with_val = read_metrics(runs["runs"] / "straight"), read_metrics(runs["runs"] / "val_straight")
    assert [m["loss"] for m in with_val] == [m["loss"] for m in straight]  # bitwise: dropout, workers, masks untouched
    val_steps = [m["step"] for m in with_val if "val/loss" in m]
    assert val_steps == [3, 6, STEPS]
    resumed = read_metrics(runs["runs"] / "val")
    assert [(m["step"], m["loss"], m.get("val/loss")) for m in resumed] == \
        [(m["step"], m["loss"], m.get("val/loss")) for m in with_val]
    # val/loss at the last step = mean next-token CE of the final weights over the first 4 samples of val/
    # (eval_tokens 256 / seq_len 64), computed here with the dense model and torch's cross-entropy.
    model = load_model(checkpoint_info(runs["runs"] / "val_straight" / "checkpoints" / f"step_{STEPS:08d}"),
                       torch.device("cpu"))
    val_dir = runs["data"] / "val"
    manifest = json.loads((val_dir / "manifest.json").read_text())
    tokens, starts = read_shard(val_dir, manifest["shards"][0])
    nll, count = 0.0, 0
    with torch.no_grad():
        for tok, st in zip(tokens[:4], starts[:4]):
            tok = torch.from_numpy(tok.astype(np.int64))[None]
            doc_starts = sorted({0, *[int(x) for x in st if 0 < x < tok.shape[1] - 1]})
            cu = torch.tensor(doc_starts + [tok.shape[1] - 1])
            logits = model(tok[:, :-1], cu)
            nll += F.cross_entropy(logits[0].double(), tok[0, 1:], reduction="sum").item()
            count += tok.shape[1] - 1
    assert with_val[-1]["val/tokens"] == count == 4 * 64
    assert abs(with_val[-1]["val/loss"] - nll / count) <= 1e-5 * nll / count
