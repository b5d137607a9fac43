"""Reliability (issue 16): a changed model on resume, a full disk during a save, half-deleted and
re-saved checkpoints, a stale `latest`, non-finite gradients, the CP halo's batched p2p, and the
convert command's error; issue 27: checksums (a flipped byte in each checkpoint file, the fallback
of --resume auto) and a checkpoint whose records disagree about its step.

The training jobs run in ONE subprocess (this file run as a script: `python tests/test_reliability.py
jobs.json results.json`) on the tiny model of tests/train_helpers.py, so DeepSpeed is imported once.
Faults are injected in that process: a writer that raises ENOSPC, a real full tmpfs (mounted by the
runner when it may, as root), a kill (KeyboardInterrupt) inside a rotation's delete or between the
renames of a re-save, an inf gradient, a SIGTERM."""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train_helpers import losses, make_dataset, tiny_config, write_config

ROOT = Path(__file__).resolve().parents[1]


# --- the jobs ------------------------------------------------------------------------------------

def _jobs(data: Path, runs: Path) -> list[dict]:
    def cfg(run, **sections):
        base = {"checkpoint": {"every": 2, "keep": 3}}
        for key, value in sections.items():
            base.setdefault(key, {}).update(value)
        return tiny_config(data, runs / run, **base)

    z0 = {"zero_stage": 0}
    return [
        {"name": "base", "config": cfg("base")},
        # 3: a full disk. The writer raises ENOSPC at step 4 (after writing part of a file) ...
        {"name": "enospc_a", "config": cfg("enospc"), "enospc_at": 4},
        {"name": "enospc_b", "config": cfg("enospc"), "resume": "auto"},
        # ... and in the save a SIGTERM asked for (sent during step 3: the loop stops after step 4).
        {"name": "sigterm_enospc", "config": cfg("sigterm_enospc"), "sigterm_at": 3, "enospc_at": 4},
        # A real tmpfs: half a checkpoint (the first save fails), 1.5 checkpoints (the second is refused).
        {"name": "tmpfs_half", "config": cfg("tmpfs_half"), "tmpfs": 0.5, "size_of": "base/checkpoints/step_00000008"},
        {"name": "tmpfs_1_5", "config": cfg("tmpfs_1_5"), "tmpfs": 1.5, "size_of": "base/checkpoints/step_00000008"},
        # 4: a kill while rotation deletes step_2 (keep 2, at the step-6 save); the next start cleans up,
        # including an incomplete step_1 planted as earlier versions left them.
        {"name": "rotate_a", "config": cfg("rotate", checkpoint={"keep": 2}), "kill_rmtree": "step_00000002"},
        {"name": "rotate_b", "config": cfg("rotate", checkpoint={"keep": 2}), "resume": "auto",
         "plant_incomplete": ["step_00000006", "step_00000001"]},
        # 5: a run saved step_4; resumed from step_2 it re-saves step_4 and is killed between the renames.
        {"name": "resave_a", "config": cfg("resave", train={"stop_at": 4})},
        {"name": "resave_b", "config": cfg("resave"), "resume": str(runs / "resave/checkpoints/step_00000002"),
         "kill_rename_to": "step_00000004"},
        {"name": "resave_c", "config": cfg("resave"), "resume": "auto"},
        # 6: an inf gradient at step 6 (loss finite): ZeRO-0 fp32 (DeepSpeed would apply it) and ZeRO-1.
        {"name": "z0_base", "config": cfg("z0_base", parallel=z0, checkpoint={"every": 4})},
        {"name": "z0_inf", "config": cfg("z0_inf", parallel=z0, checkpoint={"every": 4}), "inf_grad_at": 6},
        {"name": "z0_inf_resume", "config": cfg("z0_inf", parallel=z0, checkpoint={"every": 4}), "resume": "auto"},
        {"name": "z1_inf", "config": cfg("z1_inf", checkpoint={"every": 4}), "inf_grad_at": 6},
        # Issue 27: a copy of `base` with a flipped byte in its newest checkpoint's weights: --resume auto
        # falls back to the newest checkpoint that verifies (step 6) and continues exactly.
        {"name": "flip_resume", "config": cfg("flip", train={"steps": 10}), "resume": "auto", "copy_from": "base",
         "flip": "step_00000008/mp_rank_00_model_states.pt"},
        # 2: a changed model on resume (allowed changes next to it: steps, LR, logging)
        {"name": "shape", "config": cfg("base", model={"d_model": 48, "n_heads": 3}, train={"steps": 10},
                                        optim={"lr": 1e-3}, logging={"every": 2}), "resume": "auto"},
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reliability")
    data = make_dataset(tmp / "data")
    r = tmp / "runs"
    jobs_path, out = tmp / "jobs.json", tmp / "results.json"
    jobs_path.write_text(json.dumps(_jobs(data, r)))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, str(jobs_path), str(out)], cwd=tmp,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "fluidlm from " + str(ROOT / "fluidlm") in proc.stdout  # the runner ran this checkout's code
    return {"runs": r, "data": data, "results": json.loads(out.read_text()), "stdout": proc.stdout,
            "seconds": time.perf_counter() - start}


def flip_bytes(path: Path, offset: int | None = None, count: int = 64) -> None:
    """Invert `count` bytes in the middle of a file (or at `offset`): same size, different content."""
    data = bytearray(Path(path).read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at:at + count] = bytes(b ^ 0xFF for b in data[at:at + count])
    Path(path).write_bytes(bytes(data))


def _incomplete(ck: Path) -> list[str]:
    from fluidlm.train.checkpoint_read import TAG_RE, problems

    return sorted(p.name for p in ck.iterdir() if (TAG_RE.match(p.name) and problems(p))
                  or p.name.startswith((".tmp-", ".old-", ".trash-")))


# --- 2: a changed model --------------------------------------------------------------------------

@pytest.mark.slow  # the shared runner: 20-40 s of training jobs on 2 cores
def test_resume_with_a_changed_model_names_every_field_and_what_may_change(runs):
    res = runs["results"]["shape"]
    assert res["code"] == 2, res
    err = res["stderr"]
    assert "model.d_model: 32 in the checkpoint, 48 now" in err and "model.n_heads: 2 in the checkpoint, 3 now" in err
    assert "size mismatch" not in err and "Traceback" not in err
    changed = err.split("holds a different model than this config:")[1].split(". These fields")[0]
    assert "train.steps" not in changed and "optim.lr" not in changed and "logging" not in changed
    assert "may change train.steps" in err and "optim.*" in err


@pytest.mark.slow  # the shared runner: 20-40 s of training jobs on 2 cores
def test_changed_model_exits_2_from_the_command_line_before_any_process_group(runs, tmp_path):
    config = tiny_config(runs["data"], runs["runs"] / "base", checkpoint={"every": 2})
    path = write_config(tmp_path / "c.yaml", config)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fluidlm.train", "--config", str(path), "--resume", "auto",
                           "model.d_model=64", "model.pde.scales=[1,4]", "model.dropout=0.0", "train.steps=12"],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "model.d_model: 32 in the checkpoint, 64 now" in proc.stderr
    assert "model.pde.scales: [1, 4, 16] in the checkpoint, [1, 4] now" in proc.stderr
    assert "model.dropout" not in proc.stderr.split("may change")[0]  # allowed: not reported as a difference
    assert "Traceback" not in proc.stderr and "deepspeed" not in proc.stderr.lower()
    assert time.perf_counter() - start < 60


def test_model_changes_policy():
    from fluidlm.train.checks import model_changes

    base = tiny_config("d", "r")["model"]
    full = {**base, "ffn_hidden": None}
    assert model_changes(full, {**full, "dropout": 0.0, "da_backend": "chunked", "chunk_size": 8,
                                "max_seq_len": 4096}) == {}
    from fluidlm.model.config import ModelConfig

    ffn = ModelConfig.model_validate(full).ffn_size
    assert model_changes(full, {**full, "ffn_hidden": ffn}) == {}  # the same resolved FFN size
    assert model_changes(full, {**full, "vocab_size": 512, "pde": {"enabled": False}}) == {
        "model.pde.enabled": (None, False), "model.vocab_size": (256, 512)}


# --- 3: a full disk ------------------------------------------------------------------------------

@pytest.mark.slow  # the shared runner: 20-40 s of training jobs on 2 cores
def test_enospc_during_a_save_removes_the_partial_folder_keeps_latest_and_says_why(runs):
    res = runs["results"]["enospc_a"]
    assert res["code"] == 4, res
    err = res["stderr"]
    assert ".tmp-step_00000004" in err and "no space left on device" in err
    assert "needs about" in err and "is free on" in err and "latest` still names step_00000002" in err
    assert res["latest"] == "step_00000002"
    assert [e for e in res["entries"] if "step_" in e] == ["step_00000002"]  # no .tmp-step_00000004 left
    # ...and the run continues from step 2 exactly as the uninterrupted one.
    assert runs["results"]["enospc_b"]["code"] == 0
    assert losses(runs["runs"] / "enospc") == losses(runs["runs"] / "base")


@pytest.mark.slow  # the shared runner: 20-40 s of training jobs on 2 cores
def test_enospc_in_a_sigterm_save_says_the_same(runs):
    res = runs["results"]["sigterm_enospc"]
    assert res["code"] == 4, res
    err = res["stderr"]
    assert "SIGTERM asked for after step 4" in err and ".tmp-step_00000004" in err and "needs about" in err
    assert "checkpoint saved" not in err  # no claim of a save that did not happen
    assert res["latest"] == "step_00000002" and ".tmp-step_00000004" not in res["entries"]


def _tmpfs(runs, name):
    res = runs["results"][name]
    if "skipped" in res:
        pytest.skip(f"tmpfs variant: {res['skipped']}")
    return res


@pytest.mark.slow  # the shared runner: 20-40 s of training jobs on 2 cores
def test_full_tmpfs_first_save_fails_cleanly(runs):
    res = _tmpfs(runs, "tmpfs_half")
    assert res["code"] == 4, res
    assert ".tmp-step_00000002" in res["stderr"] and "written before the failure" in res["stderr"]
    assert "the disk is full" in res["stderr"] and "is free on" in res["stderr"]
    assert res["latest"] is None and [e for e in res["entries"] if not e.endswith(".py")] == []  # (DeepSpeed's zero_to_*.py)


@pytest.mark.slow  # the shared runner: 20-40 s of training jobs on 2 cores
def test_tmpfs_without_room_for_another_checkpoint_refuses_before_writing(runs):
    res = _tmpfs(runs, "tmpfs_1_5")
    assert res["code"] == 4, res
    assert "not enough disk space to save step_00000004" in res["stderr"] and "nothing was written" in res["stderr"]
    assert res["latest"] == "step_00000002"
    assert [e for e in res["entries"] if not e.endswith(".py")] == ["latest", "step_00000002"]


@pytest.mark.slow  # one torchrun of 2 processes: ~15-30 s on 2 cores
def test_enospc_on_one_rank_of_two_stops_every_rank_cleanly(tmp_path):
    """DP=2, ZeRO 1: only rank 1's optimizer-shard write fails. DeepSpeed's collectives inside the save
    still match (the failure is recorded, not raised, until every rank has agreed), so both ranks exit 4
    together instead of hanging, the partial folder goes and `latest` stays."""
    data = make_dataset(tmp_path / "data", samples=32)
    path = write_config(tmp_path / "dp.yaml", tiny_config(data, tmp_path / "run", train={"steps": 4},
                                                          checkpoint={"every": 2}))
    proc = _torchrun(tmp_path, path, "--enospc-at", "4", "--enospc-rank", "1", timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and out.count("saving checkpoint step_00000004 failed") == 2, out[-4000:]
    assert "error (rank 1): " in out and "zero_pp_rank_1_mp_rank_00_optim_states.pt: no space left" in out
    assert "another rank's write failed" in out  # rank 0 wrote its files and says why it stops too
    assert out.count("exitcode  : 4") == 2, out[-3000:]  # torchrun's summary: both workers exited 4
    ck = tmp_path / "run" / "checkpoints"
    assert (ck / "latest").read_text() == "step_00000002"
    assert sorted(p.name for p in ck.iterdir() if "step_" in p.name) == ["step_00000002"]


# --- 4 and 5: half-deleted and re-saved checkpoints, a stale `latest` -----------------------------

@pytest.mark.slow  # the shared runner: 20-40 s of training jobs on 2 cores
def test_kill_during_rotation_leaves_no_incomplete_folder_after_the_next_start(runs):
    res = runs["results"]
    assert res["rotate_a"]["code"] is None and "simulated kill" in res["rotate_a"]["error"]
    assert res["rotate_b"]["code"] == 0, res["rotate_b"]
    ck = runs["runs"] / "rotate" / "checkpoints"
    assert _incomplete(ck) == []
    assert sorted(p.name for p in ck.iterdir() if not p.name.endswith(".py")) == ["latest", "step_00000006", "step_00000008"]
    assert "removed incomplete step_00000001" in res["rotate_b"]["stderr"]  # logged
    assert losses(runs["runs"] / "rotate") == losses(runs["runs"] / "base")


@pytest.mark.slow  # the shared runner: 20-40 s of training jobs on 2 cores
def test_interrupted_resave_keeps_a_complete_checkpoint_and_auto_resume_falls_back(runs):
    res = runs["results"]
    assert res["resave_b"]["code"] is None and "simulated kill" in res["resave_b"]["error"]
    assert res["resave_b"]["latest"] == "step_00000004" and "step_00000004" not in res["resave_b"]["entries"]
    assert ".old-step_00000004" in res["resave_b"]["entries"]  # the old one was renamed aside, not deleted
    assert res["resave_c"]["code"] == 0, res["resave_c"]
    assert "not a complete checkpoint" in res["resave_c"]["stderr"] and "using the newest complete" in res["resave_c"]["stderr"]
    assert _incomplete(runs["runs"] / "resave" / "checkpoints") == []
    assert losses(runs["runs"] / "resave") == losses(runs["runs"] / "base")


def test_stale_latest_falls_back_or_explains(tmp_path):
    from fluidlm.train.checkpoint_read import CheckpointError, resolve_resume

    def fake(step):  # complete as far as `problems` looks (world 1, ZeRO 0, fp32)
        folder = tmp_path / f"step_{step:08d}"
        (folder / "client").mkdir(parents=True)
        (folder / "mp_rank_00_model_states.pt").write_bytes(b"x")
        (folder / "client" / "rank_00000.pt").write_bytes(b"x")
        (folder / "client_state.json").write_text(json.dumps({"world_size": 1, "zero_stage": 0, "step": step}))
        return folder

    fake(2), fake(4)
    (tmp_path / "latest").write_text("step_00000006")
    assert resolve_resume("auto", tmp_path) == tmp_path / "step_00000004"
    shutil.rmtree(tmp_path / "step_00000002"), shutil.rmtree(tmp_path / "step_00000004")
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        resolve_resume("auto", tmp_path)


# --- 6: non-finite gradients ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["z0_inf", "z1_inf"])
@pytest.mark.slow  # the shared runner: 20-40 s of training jobs on 2 cores
def test_inf_gradient_is_not_applied_nor_saved(runs, name):
    res = runs["results"][name]
    assert res["code"] == 3, res
    assert "gradient norm is not finite" in res["stderr"] and "step 6" in res["stderr"], res["stderr"][-2000:]
    assert res["latest"] == "step_00000005"  # the last good step, not the poisoned one
    assert [e for e in res["entries"] if e.startswith("step_")] == ["step_00000004", "step_00000005"]


@pytest.mark.slow  # the shared runner: 20-40 s of training jobs on 2 cores
def test_resume_after_an_inf_gradient_continues_as_if_it_never_happened(runs):
    assert runs["results"]["z0_inf_resume"]["code"] == 0
    assert losses(runs["runs"] / "z0_inf") == losses(runs["runs"] / "z0_base")


@pytest.mark.slow  # one torchrun of 2 processes: ~20-40 s on 2 cores
def test_pipeline_inf_gradient_is_skipped_and_the_last_good_step_saved(tmp_path):
    """PP=2 at ZeRO 0 (fp32): DeepSpeed's pipeline engine runs forward, backward and step inside
    train_batch; the guarded optimizer step skips the poisoned step, so the weights are still those of
    the last good step, which is saved. (Before: applied, the next loss NaN, nothing saved.)"""
    import torch

    data = make_dataset(tmp_path / "data", samples=32)
    cfg = tiny_config(data, tmp_path / "run", model={"dropout": 0.0}, parallel={"pp": 2, "zero_stage": 0},
                      train={"steps": 8, "grad_accum": 2}, checkpoint={"every": 4})
    path = write_config(tmp_path / "pp.yaml", cfg)
    proc = _torchrun(tmp_path, path, "--inf-at", "6")
    assert "gradient norm is not finite (NaN/inf) at step 6" in proc.stderr, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.returncode != 0  # torchrun reports the workers' exit code 3 as a failure
    ck = tmp_path / "run" / "checkpoints"
    assert (ck / "latest").read_text() == "step_00000005"
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("step_")) == ["step_00000004", "step_00000005"]
    for f in (ck / "step_00000005").glob("layer_*"):  # the saved pipeline weights are the finite ones
        state = torch.load(f, map_location="cpu", weights_only=False)
        assert all(torch.isfinite(t).all() for t in state.values() if torch.is_tensor(t)), f.name


# --- 10: convert names its argument ----------------------------------------------------------------

def test_convert_of_an_incomplete_checkpoint_names_the_convert_argument(tmp_path, capsys):
    from fluidlm.train.universal import run

    broken = tmp_path / "step_00000004"
    broken.mkdir()
    code = run(argparse.Namespace(checkpoint=str(broken), out=str(tmp_path / "u")))
    err = capsys.readouterr().err
    assert code == 2
    assert "`fluidlm checkpoint convert` CHECKPOINT" in err and "not a complete checkpoint" in err
    assert "--resume" not in err


# --- 8: CP halo exchange through batch_isend_irecv -----------------------------------------------

def _halo_worker(rank, world, init_file, queue):
    import torch
    import torch.distributed as dist

    from fluidlm.parallel.context import exchange_halo

    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        batched = []
        original = dist.batch_isend_irecv

        def spy(ops):
            batched.append(len(ops))
            return original(ops)

        dist.batch_isend_irecv = spy
        n = 5
        x = (torch.arange(n, dtype=torch.float64) + 10 * rank).reshape(1, n, 1).requires_grad_()
        window = exchange_halo(x, 2, 1)  # 2 tokens from the left neighbour, 1 from the right
        window.backward(torch.ones_like(window))
        queue.put((rank, {"window": window.detach().flatten().tolist(), "grad": x.grad.flatten().tolist(),
                          "batched": batched}))
        dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        queue.put((rank, {"error": repr(exc)}))


def test_cp_halo_uses_one_batched_p2p_per_exchange(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    world = 3
    procs = [ctx.Process(target=_halo_worker, args=(r, world, str(tmp_path / "rdzv"), queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        got = dict(queue.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert not [g["error"] for g in got.values() if "error" in g], got
    assert got[0]["window"] == [0, 1, 2, 3, 4, 10]
    assert got[1]["window"] == [3, 4, 10, 11, 12, 13, 14, 20]
    assert got[2]["window"] == [13, 14, 20, 21, 22, 23, 24]
    # Gradients come back to their owners: a token read by a neighbour counts twice.
    assert got[0]["grad"] == [1, 1, 1, 2, 2] and got[1]["grad"] == [2, 1, 1, 2, 2] and got[2]["grad"] == [2, 1, 1, 1, 1]
    # forward and backward: one batch each, with every send and receive of the rank (end ranks: one peer)
    assert got[0]["batched"] == [2, 2] and got[1]["batched"] == [4, 4] and got[2]["batched"] == [2, 2]


# --- issue 27: checksums and a checkpoint that disagrees with itself --------------------------------

@pytest.mark.slow  # the shared runner: 20-40 s of training jobs on 2 cores
def test_every_checkpoint_has_a_manifest_of_its_files(runs):
    ck = runs["runs"] / "base" / "checkpoints" / "step_00000008"
    listed = json.loads((ck / "checksums.json").read_text())["files"]
    on_disk = sorted(str(p.relative_to(ck)) for p in ck.rglob("*") if p.is_file())
    assert sorted(listed) == [n for n in on_disk if n not in ("checksums.json", "client_state.json")]
    assert all(len(e["sha256"]) == 64 and e["bytes"] == (ck / n).stat().st_size for n, e in listed.items())


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                  "client/rank_00000.pt"])
@pytest.mark.slow  # the shared runner: 20-40 s of training jobs on 2 cores
def test_a_flipped_byte_in_any_checkpoint_file_is_refused_naming_the_file(runs, tmp_path, capsys, name):
    from fluidlm.train.checkpoint_cli import verify_command
    from fluidlm.train.checkpoint_read import CheckpointError, resolve_resume

    run = tmp_path / "run"
    shutil.copytree(runs["runs"] / "base", run)
    ck = run / "checkpoints"
    flip_bytes(ck / "step_00000008" / name)
    with pytest.raises(CheckpointError, match=f"fails verification .{name}: its sha256 differs"):
        resolve_resume(str(ck / "step_00000008"), ck)
    capsys.readouterr()
    assert resolve_resume("auto", ck) == ck / "step_00000006"  # --resume auto: the newest that verifies
    err = capsys.readouterr().err
    assert f"step_00000008 fails verification ({name}" in err and "falling back to step_00000006" in err
    assert verify_command(argparse.Namespace(path=str(run))) == 2
    out = capsys.readouterr()
    assert f"FAILED {ck / 'step_00000008'}: {name}" in out.err and f"ok {ck / 'step_00000006'}" in out.out


@pytest.mark.slow  # the shared runner: 20-40 s of training jobs on 2 cores
def test_resume_auto_falls_back_past_a_corrupt_checkpoint_and_continues_exactly(runs):
    res = runs["results"]["flip_resume"]
    assert res["code"] == 0, res
    assert "falling back to step_00000006" in res["stderr"]
    flipped, base = losses(runs["runs"] / "flip"), losses(runs["runs"] / "base")
    assert list(flipped) == list(range(1, 11)) and all(flipped[s] == base[s] for s in base)


@pytest.mark.slow  # the shared runner: 20-40 s of training jobs on 2 cores
def test_a_mislabelled_client_state_is_refused_as_inconsistent(runs, tmp_path, capsys):
    from fluidlm.train.checkpoint_read import CheckpointError, resolve_resume

    run = tmp_path / "run"
    shutil.copytree(runs["runs"] / "base", run)
    ck = run / "checkpoints"
    meta_file = ck / "step_00000008" / "client_state.json"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "step": 2}))
    with pytest.raises(CheckpointError, match="client_state.json says step 2 but the folder is step_00000008"):
        resolve_resume(str(ck / "step_00000008"), ck)
    assert resolve_resume("auto", ck) == ck / "step_00000006"
    # the loader/RNG state of another step under a consistent label
    shutil.copy(ck / "step_00000004" / "client" / "rank_00000.pt", ck / "step_00000006" / "client" / "rank_00000.pt")
    with pytest.raises(CheckpointError, match=r"rank_00000.pt \(the loader and RNG state\) is of step 4, "
                                              "client_state.json says step 6"):
        resolve_resume(str(ck / "step_00000006"), ck)


def test_run_lock_names_its_holder_is_freed_by_kill_9_and_falls_back_without_flock(tmp_path, monkeypatch, capsys):
    import socket

    from fluidlm.train import runlock

    host, run = socket.gethostname(), tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from fluidlm.train.runlock import acquire; "
                               "acquire(sys.argv[1]); print('held', flush=True); time.sleep(120)", str(run)],
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(runlock.RunLockError, match=f"in use by another training .host {host}, pid {holder.pid}, "
                                                        "started 20"):
            runlock.acquire(run)
        assert f"pid {holder.pid}" in runlock.holder(run)
    finally:
        holder.kill()
        holder.wait()
    runlock.acquire(run)  # a kill -9 leaves no stale lock
    assert runlock.holder(run) is None  # (ours)

    def no_flock(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(runlock.fcntl, "flock", no_flock)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    nfs = tmp_path / "nfs"
    nfs.mkdir()
    (nfs / runlock.PID_FILE).write_text(json.dumps({"host": host, "pid": dead.pid, "started": "then"}))
    runlock.acquire(nfs)
    err = capsys.readouterr().err
    assert "does not support flock" in err and f"removing the stale lock {nfs / runlock.PID_FILE}" in err
    assert json.loads((nfs / runlock.PID_FILE).read_text())["pid"] == os.getpid()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / runlock.PID_FILE).write_text(json.dumps({"host": "node7", "pid": 1, "started": "then"}))
    with pytest.raises(runlock.RunLockError, match=r"host node7, pid 1, started then.*if that run is gone.*delete the file"):
        runlock.acquire(elsewhere)


def test_train_failure_paths_are_messages_not_tracebacks(tmp_path):
    """Issue 27 item 5: an unwritable train.run_dir and a micro-batch larger than the validation split
    exit 2 with a message naming the field, before any process group (no DeepSpeed, no traceback)."""
    data = make_dataset(tmp_path / "data", samples=64)  # val: 8 samples
    (tmp_path / "a-file").write_text("x")
    cases = {
        "/a-file/run' is not writable": tiny_config(data, tmp_path / "a-file" / "run"),
        "holds 8 validation samples, fewer than one micro-batch per data-parallel rank (train.micro_batch_size 16":
            tiny_config(data, tmp_path / "v", train={"eval_every": 2, "micro_batch_size": 16}),
    }
    for expected, config in cases.items():
        path = write_config(tmp_path / "c.yaml", config)
        proc = subprocess.run([sys.executable, "-m", "fluidlm", "train", "--config", str(path)], cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and expected in proc.stderr, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr and "deepspeed" not in proc.stderr.lower()


# --- the runner (a subprocess) ---------------------------------------------------------------------

def _runner(jobs_path: Path, out_path: Path) -> None:
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    import fluidlm
    from fluidlm.data import DataError
    from fluidlm.train import checkpoint as ckpt
    from fluidlm.train import loop
    from fluidlm.train.checkpoint_read import CheckpointError
    from fluidlm.train.cli import prepare
    from fluidlm.train.config import ConfigError

    import yaml

    print(f"fluidlm from {Path(fluidlm.__file__).parent}", flush=True)
    save_error = getattr(ckpt, "CheckpointSaveError", ())  # (so this runner also runs the code before issue 16)
    originals = {"write": TorchCheckpointEngine.save, "rmtree": shutil.rmtree, "rename": os.rename,
                 "build_engine": loop.build_engine}
    runs_dir = None
    results = {}
    for job in json.loads(jobs_path.read_text()):
        run_dir = Path(job["config"]["train"]["run_dir"])
        runs_dir = run_dir.parent
        ck = run_dir / "checkpoints"
        mounted = False
        if "tmpfs" in job:
            size = sum(f.stat().st_size for f in (runs_dir / job["size_of"]).rglob("*") if f.is_file())
            ck.mkdir(parents=True, exist_ok=True)
            kib = int(size * job["tmpfs"]) // 1024 + 64  # + DeepSpeed's zero_to_*.py scripts beside the checkpoints
            mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(ck)],
                                   capture_output=True, text=True)
            if mount.returncode:
                results[job["name"]] = {"skipped": f"mount -t tmpfs failed ({mount.stderr.strip() or mount.returncode})"}
                continue
            mounted = True
        if "copy_from" in job:
            shutil.copytree(runs_dir / job["copy_from"], run_dir)
            flip_bytes(ck / job["flip"])
        for src, dst in zip(job.get("plant_incomplete", [])[::2], job.get("plant_incomplete", [])[1::2]):
            shutil.copytree(ck / src, ck / dst)
            (ck / dst / ckpt.CLIENT_JSON).unlink()

        def failing_write(self, state_dict, path, at=job.get("enospc_at")):
            if at is not None and ckpt.tag_for(at) in str(path):
                with open(path, "wb") as f:
                    f.write(b"\0" * 4096)  # part of the file got out before the disk filled
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return originals["write"](self, state_dict, path)

        def killing_rmtree(path, *args, target=job.get("kill_rmtree"), **kwargs):
            if target is not None and str(path).endswith(target):
                for name in (ckpt.CLIENT_JSON, "mp_rank_00_model_states.pt"):  # the delete got this far
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(path, name))
                raise KeyboardInterrupt(f"simulated kill while deleting {path}")
            return originals["rmtree"](path, *args, **kwargs)

        def killing_rename(src, dst, *args, target=job.get("kill_rename_to"), **kwargs):
            if target is not None and Path(dst).name == target and Path(src).name.startswith(".tmp-"):
                raise KeyboardInterrupt(f"simulated kill before renaming {src} to {dst}")
            return originals["rename"](src, dst, *args, **kwargs)

        def build_engine(config, model, dist_info, inf_at=job.get("inf_grad_at"), term_at=job.get("sigterm_at")):
            engine = originals["build_engine"](config, model, dist_info)
            calls = [0]
            backward = engine.backward

            def counted_backward(loss, *args, **kwargs):
                calls[0] += 1
                if calls[0] == term_at:
                    os.kill(os.getpid(), signal.SIGTERM)
                return backward(loss, *args, **kwargs)

            def poison(grad):
                if calls[0] != inf_at:
                    return None
                grad = grad.clone()
                grad.view(-1)[0] = float("inf")
                return grad

            engine.backward = counted_backward
            if inf_at is not None:
                next(p for p in engine.module.parameters() if p.requires_grad).register_hook(poison)
            return engine

        TorchCheckpointEngine.save = failing_write
        shutil.rmtree = killing_rmtree
        os.rename = killing_rename
        loop.build_engine = build_engine
        config_path = jobs_path.parent / f"{job['name']}.yaml"
        config_path.write_text(yaml.safe_dump(job["config"]))
        args = argparse.Namespace(config=str(config_path), overrides=[], resume=job.get("resume"), print_config=False)
        err = io.StringIO()
        start = time.perf_counter()
        code, error = None, None
        with contextlib.redirect_stderr(err):
            try:  # what fluidlm/train/cli.py run() does, without ending the process group between jobs
                try:
                    config, resume_from = prepare(args)
                except (ConfigError, CheckpointError, DataError) as exc:
                    print(f"error: {exc}", file=sys.stderr)
                    code = 2
                else:
                    try:
                        code = loop.train(config, resume_from)
                    except save_error as exc:
                        print(f"error (rank 0): {exc}", file=sys.stderr)
                        code = 4
                    except (DataError, CheckpointError) as exc:
                        print(f"error (rank 0): {exc}", file=sys.stderr)
                        code = 2
            except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - recorded for the test
                error = f"{type(exc).__name__}: {exc}"
            finally:
                TorchCheckpointEngine.save = originals["write"]
                shutil.rmtree, os.rename, loop.build_engine = originals["rmtree"], originals["rename"], originals["build_engine"]
        results[job["name"]] = {
            "code": code, "error": error, "stderr": err.getvalue(), "seconds": time.perf_counter() - start,
            "latest": (ck / "latest").read_text().strip() if (ck / "latest").exists() else None,
            "entries": sorted(p.name for p in ck.iterdir()) if ck.is_dir() else [],
        }
        if mounted:
            subprocess.run(["umount", str(ck)], check=False)
        torch.set_num_threads(1)
        print(f"[runner] {job['name']}: code={code} error={error} {results[job['name']]['seconds']:.1f}s", flush=True)
    out_path.write_text(json.dumps(results, indent=2))
    loop.shutdown()


def _torchrun_main(config_path: str, inf_at: int | None, enospc_at: int | None, enospc_rank: int) -> int:
    """Under torchrun: `fluidlm train --config CONFIG`, with an inf put into one gradient of rank 0's
    first parameter at optimizer step `inf_at` (one backward or one pipeline train_batch per step),
    and/or the checkpoint writer of rank `enospc_rank` alone raising ENOSPC in the save of step
    `enospc_at` (the other ranks' writes succeed)."""
    import torch.distributed as dist
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from fluidlm.train import checkpoint as ckpt
    from fluidlm.train import cli, loop

    build, write = loop.build_engine, TorchCheckpointEngine.save

    def failing_write(self, state_dict, path):
        if enospc_at is not None and ckpt.tag_for(enospc_at) in str(path) and dist.get_rank() == enospc_rank:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return write(self, state_dict, path)

    def build_engine(config, model, dist_info):
        engine = build(config, model, dist_info)
        calls = [0]
        method = "train_batch" if config.parallel.pp > 1 else "backward"
        step = getattr(engine, method)

        def counted(*args, **kwargs):
            calls[0] += 1
            return step(*args, **kwargs)

        def poison(grad):
            if calls[0] != inf_at or dist_info.rank != 0:
                return None
            grad = grad.clone()
            grad.view(-1)[0] = float("inf")
            return grad

        setattr(engine, method, counted)
        next(p for p in engine.module.parameters() if p.requires_grad).register_hook(poison)
        return engine

    loop.build_engine = build_engine
    TorchCheckpointEngine.save = failing_write
    return cli.main(["--config", config_path])


def _torchrun(tmp_path, config_path, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           __file__, "torchrun", str(config_path), *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"})


if __name__ == "__main__":
    if sys.argv[1] == "torchrun":
        opts = argparse.ArgumentParser()
        opts.add_argument("config")
        opts.add_argument("--inf-at", type=int)
        opts.add_argument("--enospc-at", type=int)
        opts.add_argument("--enospc-rank", type=int, default=0)
        o = opts.parse_args(sys.argv[2:])
        sys.exit(_torchrun_main(o.config, o.inf_at, o.enospc_at, o.enospc_rank))
    _runner(Path(sys.argv[1]), Path(sys.argv[2]))
