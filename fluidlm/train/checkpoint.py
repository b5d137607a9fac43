"""Training checkpoints (DESIGN.md §5): DeepSpeed's engine state plus FluidLM's client state,
written atomically, the newest K kept.

Layout of `<run_dir>/checkpoints/`:

    latest                           text file naming the newest complete checkpoint (written last)
    step_00000200/
      mp_rank_00_model_states.pt     DeepSpeed: module weights, LR scheduler, step counters
                                     (ZeRO-3: zero_pp_rank_R_mp_rank_00_model_states.pt per rank)
      zero_pp_rank_R_mp_rank_00_optim_states.pt   DeepSpeed: ZeRO optimizer shard of DP rank R
                                     (bf16 runs: bf16_zero_pp_rank_R_…, even at ZeRO stage 0)
      client/rank_00000.pt           this rank's RNG states (python, numpy, torch, CUDA) and loader
                                     position: plain tensors/ints, loadable with weights_only=True
      client_state.json              step, tokens seen, MLflow run id, world size, resolved config;
                                     written by rank 0 after every rank finished: marks completeness
    .tmp-step_00000300/              a save in progress (or killed): never read, removed on next save

A save writes everything into `.tmp-<tag>/`, waits for every rank, renames the folder to `<tag>`
and only then replaces `latest` (os.replace): a save killed at any point leaves `latest` on the
previous complete checkpoint. This needs a file system shared by all ranks (the usual setup).

Security: DeepSpeed's own files are pickles (`torch.load(weights_only=False)` inside DeepSpeed):
load only checkpoints you trust. FluidLM's own client state is JSON and weights_only tensors.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

TAG_RE = re.compile(r"^step_(\d{8,})$")
CLIENT_JSON = "client_state.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not fit this run."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def before_publish(tmp: Path, final: Path) -> None:
    """Hook between "every file written" and "renamed + latest updated". Tests replace it to
    simulate a save killed half-way."""


# --- RNG states ------------------------------------------------------------------------------

def rng_state() -> dict:
    """Every RNG this process uses, as tensors/ints (safe to load with weights_only=True)."""
    version, mt, gauss = random.getstate()
    key, np_mt, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"key": key, "state": torch.from_numpy(np_mt.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["key"], n["state"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- finding checkpoints ---------------------------------------------------------------------

def problems(path: Path) -> list[str]:
    """What is missing or unreadable in checkpoint folder `path` ([] = complete)."""
    path = Path(path)
    if not path.is_dir():
        return [f"{path} is not a folder"]
    try:
        meta = json.loads((path / CLIENT_JSON).read_text())
        world = int(meta["world_size"])
    except FileNotFoundError:
        return [f"{CLIENT_JSON} is missing (the save did not finish)"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{CLIENT_JSON} is unreadable ({exc})"]
    stage, tp, pp = meta.get("zero_stage", 0), meta.get("tp", 1), meta.get("pp", 1)
    dp, mp = world // (tp * pp), tp * pp
    # DeepSpeed's names: one model-states file per model-parallel rank (TP × PP; ZeRO-3: per DP rank
    # too), one optimizer shard per (DP rank, model-parallel rank); pipeline weights sit in layer_* files.
    if stage == 3:
        expected = [f"zero_pp_rank_{d}_mp_rank_{m:02d}_model_states.pt" for d in range(dp) for m in range(mp)]
    else:
        expected = [f"mp_rank_{m:02d}_model_states.pt" for m in range(mp)]
    if stage > 0 or meta.get("bf16"):  # bf16 always trains through a partitioned (BF16_Optimizer/ZeRO) optimizer
        expected += [optim_file(meta, d, m) for d in range(dp) for m in range(mp)]
    expected += [f"client/rank_{r:05d}.pt" for r in range(world)]
    missing = [name for name in expected if not (path / name).is_file()]
    return [f"missing {m}" for m in missing]


def optim_file(meta: dict, dp_rank: int, mp_rank: int) -> str:
    """DeepSpeed's name for the optimizer partition of (data rank, model-parallel rank); bf16 runs
    get a `bf16_` prefix."""
    return f"{'bf16_' if meta.get('bf16') else ''}zero_pp_rank_{dp_rank}_mp_rank_{mp_rank:02d}_optim_states.pt"


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not Path(ckpt_dir).is_dir():
        return []
    found = [p for p in Path(ckpt_dir).iterdir() if TAG_RE.match(p.name) and p.is_dir()]
    return sorted((p for p in found if not problems(p)), key=lambda p: int(TAG_RE.match(p.name).group(1)))


def latest(ckpt_dir: Path) -> Path | None:
    """The checkpoint `latest` names; when there is no pointer, the newest complete one; None if none."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / "latest"
    if pointer.is_file():
        target = ckpt_dir / pointer.read_text().strip()
        issues = problems(target)
        if issues:
            raise CheckpointError(f"{pointer} names {target.name}, which is not a complete checkpoint ({'; '.join(issues)}); "
                                  f"pass --resume PATH with an older checkpoint from {ckpt_dir}")
        return target
    done = complete_checkpoints(ckpt_dir)
    return done[-1] if done else None


def resolve_resume(resume: str | None, ckpt_dir: Path, argument: str = "--resume") -> Path | None:
    """--resume auto → newest complete checkpoint of this run (None: start fresh); --resume PATH →
    that checkpoint (a step_* folder, a checkpoints/ folder or a run folder). Raises CheckpointError,
    whose message names `argument` (the option or argument that gave `resume`)."""
    if resume is None:
        return None
    if resume == "auto":
        return latest(ckpt_dir)
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"{argument} {resume}: no such checkpoint")
    if (path / "universal.json").is_file():  # made by `fluidlm checkpoint convert` (fluidlm/train/universal.py)
        return path
    if (path / CLIENT_JSON).exists() or TAG_RE.match(path.name) or path.name.startswith(".tmp-"):
        issues = problems(path)
        if issues:
            raise CheckpointError(f"{argument} {resume}: not a complete checkpoint ({'; '.join(issues)})")
        return path
    for folder in (path, path / "checkpoints"):
        if (folder / "latest").is_file() or complete_checkpoints(folder):
            found = latest(folder)
            if found is not None:
                return found
    raise CheckpointError(f"{argument} {resume}: no checkpoint there (expected a step_* folder, a checkpoints/ folder "
                          "or a run folder holding one)")


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / CLIENT_JSON).read_text())


# --- saving and loading ----------------------------------------------------------------------

def save(engine, ckpt_dir: Path, step: int, meta: dict, rank_state: dict, keep: int) -> Path:
    """Collective: every rank calls it. `meta` (JSON) is written by rank 0; `rank_state`
    (tensors/ints) by each rank. Returns the final checkpoint folder."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    tmp, final = ckpt_dir / f".tmp-{tag}", ckpt_dir / tag
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob(".tmp-*"):  # earlier saves that were killed half-way
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tmp.name, client_state={"fluidlm_step": step}, save_latest=False)
    (tmp / "client").mkdir(parents=True, exist_ok=True)
    torch.save(rank_state, tmp / "client" / f"rank_{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        meta = {**meta, "format_version": FORMAT_VERSION, "step": step, "world_size": world,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _write_atomic(tmp / CLIENT_JSON, json.dumps(meta, indent=2))
        before_publish(tmp, final)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _write_atomic(ckpt_dir / "latest", tag)  # the pointer moves last
        for old in complete_checkpoints(ckpt_dir)[:-keep]:
            if old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load(engine, path: Path) -> tuple[dict, dict]:
    """Collective. Restores the engine from `path`; returns (meta, this rank's state)."""
    import torch.distributed as dist

    path = Path(path)
    rank = dist.get_rank()
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load the checkpoint {path}")
    try:
        rank_state = torch.load(path / "client" / f"rank_{rank:05d}.pt", map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}/client/rank_{rank:05d}.pt is unreadable ({exc})") from None
    return read_meta(path), rank_state


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
