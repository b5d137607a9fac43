"""Training checkpoints (docs/design.md §5): DeepSpeed's engine state plus FluidLM's client state,
written atomically, the newest K kept.

Layout of `<run_dir>/checkpoints/`:

    latest                           text file naming the newest complete checkpoint (written last)
    step_00000200/
      mp_rank_00_model_states.pt     DeepSpeed: module weights, LR scheduler, step counters
                                     (ZeRO-3: zero_pp_rank_R_mp_rank_00_model_states.pt per rank)
      zero_pp_rank_R_mp_rank_00_optim_states.pt   DeepSpeed: ZeRO optimizer shard of DP rank R
                                     (bf16 runs: bf16_zero_pp_rank_R_…, even at ZeRO stage 0)
      client/rank_00000.pt           this rank's step, RNG states (python, numpy, torch, CUDA) and loader
                                     position: plain tensors/ints, loadable with weights_only=True
      checksums.json                 size and sha256 of every file above (fluidlm/train/checksums.py);
                                     each rank hashes its share, rank 0 writes it before client_state.json
      client_state.json              step, tokens seen, MLflow run id, world size, resolved config;
                                     written by rank 0 after every rank finished: marks completeness
    .tmp-step_00000300/              a save in progress (or killed): never read, removed on next save
    .old-step_00000200/              a complete checkpoint being replaced by a re-save of its tag
    .trash-step_00000100/            a checkpoint being deleted (rotation); removed at the next start

A save writes everything into `.tmp-<tag>/`, waits for every rank, renames the folder to `<tag>`
and only then replaces `latest` (os.replace): a save killed at any point leaves `latest` on the
previous complete checkpoint. This needs a file system shared by all ranks (the usual setup).

Re-saving an existing tag (after `--resume PATH` from an older checkpoint) renames the old folder
aside (`.old-<tag>`), renames the new one in, moves `latest`, then deletes the old one: a complete
`<tag>` or `.old-<tag>` exists at every instant. Deletion (rotation, clean-up) renames a folder to
`.trash-<name>` first, so a kill during it never leaves a half-deleted `step_*`. At start-up
(`clean_up`) rank 0 removes `.trash-*`, incomplete `step_*` folders older than `latest` (left by
earlier versions) and `.old-*` whose tag is complete again (an `.old-*` whose tag is missing is
renamed back). If `latest` names a missing or incomplete folder, `--resume auto` falls back to the
newest complete checkpoint with a warning.

A save first checks that the disk holds the previous checkpoint's size again; a failed write on
any rank (ENOSPC, an I/O error) removes the partial `.tmp-<tag>/`, leaves `latest` as it was and
raises CheckpointSaveError naming the folder, the space needed and the space free.

Security: DeepSpeed's own files are pickles (`torch.load(weights_only=False)` inside DeepSpeed):
load only checkpoints you trust. FluidLM's own client state is JSON and weights_only tensors.

Finding checkpoints (complete or not, the newest, what --resume names) and reading them without an
engine (metadata, dense weights) is fluidlm/train/checkpoint_read.py, shared with `fluidlm eval` and
`fluidlm checkpoint convert`.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from fluidlm.train.checksums import digests, payload_files, write_manifest
from fluidlm.train.checkpoint_read import (CLIENT_JSON, TAG_RE, CheckpointError, _log, complete_checkpoints, problems,
                                           read_meta)

FORMAT_VERSION = 1
FULL_BYTES = 16 * 2**20  # less free than this after a failed write: call the disk full


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written (a full disk, an I/O error): the partial folder was removed
    and `latest` still names the previous complete checkpoint."""


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


# --- saving and loading ----------------------------------------------------------------------

def save(engine, ckpt_dir: Path, step: int, meta: dict, rank_state: dict, keep: int) -> Path:
    """Collective: every rank calls it. `meta` (JSON) is written by rank 0; `rank_state`
    (tensors/ints) by each rank. Returns the final checkpoint folder. Raises CheckpointSaveError
    (on every rank) when the disk lacks the previous checkpoint's size or any rank's write fails."""
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
    # Room for another checkpoint of the previous one's size? (All ranks agree: max needed, min free.)
    previous = newest_complete(ckpt_dir)
    needed = folder_size(previous) if previous is not None else 0
    free = shutil.disk_usage(ckpt_dir).free
    needed, neg_free = _agree([float(needed), float(-free)])
    free = int(-neg_free)
    if needed > free:
        raise CheckpointSaveError(
            f"not enough disk space to save {tag} into {ckpt_dir}: a checkpoint needs about {_human(needed)} (the "
            f"size of {previous.name if previous is not None else 'the previous one'}), {_human(free)} is free; "
            f"nothing was written and `latest` still names {_latest_name(ckpt_dir)}. Free space (or lower "
            "checkpoint.keep, or move train.run_dir), then continue with --resume auto")

    errors: list[str] = []  # this rank's write failures: recorded, so DeepSpeed's collectives stay matched
    writer = engine.checkpoint_engine
    write = writer.save

    def guarded_write(state_dict, path):
        if errors:
            return  # the disk is failing: write nothing more, the folder is removed below
        try:
            write(state_dict, path)
        except Exception as exc:  # noqa: BLE001 - ENOSPC, EIO, torch's "unexpected pos" RuntimeError
            errors.append(f"{path}: {_describe(exc)}")

    writer.save = guarded_write
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tmp.name, client_state={"fluidlm_step": step}, save_latest=False)
    except Exception as exc:  # noqa: BLE001 - e.g. a folder DeepSpeed could not create
        errors.append(f"{tmp}: {_describe(exc)}")
    finally:
        del writer.save  # back to the class's method
    if not errors:
        try:
            (tmp / "client").mkdir(parents=True, exist_ok=True)
            torch.save({**rank_state, "step": step}, tmp / "client" / f"rank_{rank:05d}.pt")
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{tmp / 'client'}: {_describe(exc)}")
    # Did every rank write its files? Then each hashes its share of them, and rank 0 writes the
    # manifest (checksums.json) and, last, client_state.json, which marks the folder complete.
    if not _agree([float(bool(errors))])[0]:
        names = [payload_files(tmp) if rank == 0 else None]
        dist.broadcast_object_list(names, src=0)
        share = {}
        try:
            share = digests(tmp, names[0][rank::world])
        except Exception as exc:  # noqa: BLE001 - a file that vanished or cannot be read
            errors.append(f"{tmp}: hashing failed: {_describe(exc)}")
        shares = [None] * world
        dist.all_gather_object(shares, share)
        if rank == 0 and not errors:
            try:
                write_manifest(tmp, {name: entry for part in shares for name, entry in part.items()})
                meta = {**meta, "format_version": FORMAT_VERSION, "step": step, "world_size": world,
                        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
                _write_atomic(tmp / CLIENT_JSON, json.dumps(meta, indent=2))  # marks the folder complete
            except Exception as exc:  # noqa: BLE001
                errors.append(f"{tmp / CLIENT_JSON}: {_describe(exc)}")
    if _agree([float(bool(errors))])[0]:
        partial = folder_size(tmp) if tmp.exists() else 0
        full = shutil.disk_usage(ckpt_dir).free < FULL_BYTES  # torch's writer says "unexpected pos", not ENOSPC
        dist.barrier()  # every rank has looked before the folder goes
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        free = shutil.disk_usage(ckpt_dir).free
        cause = errors[0] if errors else "another rank's write failed (see its error)"
        if full and "no space left" not in cause:
            cause += f" (the disk is full: under {_human(FULL_BYTES)} was free when the write failed)"
        need = (f"about {_human(needed)} (the size of {previous.name})" if previous is not None
                else f"more than the {_human(partial)} written before the failure")
        raise CheckpointSaveError(
            f"saving checkpoint {tag} failed: {cause}. The partial folder {tmp} was removed; `latest` still names "
            f"{_latest_name(ckpt_dir)}. A checkpoint needs {need}; {_human(free)} is free on {ckpt_dir} now. Free "
            "space (or lower checkpoint.keep, or move train.run_dir), then continue with --resume auto")

    if rank == 0:
        before_publish(tmp, final)
        if final.exists():  # re-saving a tag: the old folder goes aside, never away, until the new one is in
            aside = ckpt_dir / f".old-{tag}"
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(final, aside)
            os.rename(tmp, final)
            _write_atomic(ckpt_dir / "latest", tag)
            _remove(aside)
        else:
            os.rename(tmp, final)
            _write_atomic(ckpt_dir / "latest", tag)  # the pointer moves last
        for old in complete_checkpoints(ckpt_dir)[:-keep]:
            if old.name != tag:
                _remove(old)
        clean_up(ckpt_dir)
    dist.barrier()
    return final


def clean_up(ckpt_dir: Path, spare: Path | None = None) -> list[str]:
    """Rank 0, at start-up and after each rotation: remove what killed saves and deletions left behind
    (logged): `.trash-*`, incomplete `step_*` folders older than the newest complete checkpoint, and
    `.old-<tag>` folders whose `<tag>` is complete (an `.old-<tag>` whose tag is missing is renamed
    back: it is the complete checkpoint a re-save was replacing). `spare`: a folder never touched
    (the checkpoint this run resumes from). Returns what was done."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    spare = Path(spare).resolve() if spare is not None else None
    done = []
    for old in sorted(ckpt_dir.glob(".old-step_*")):
        if old.resolve() == spare:
            continue
        tag = ckpt_dir / old.name.removeprefix(".old-")
        if not tag.exists() and not problems(old):
            os.rename(old, tag)
            done.append(f"restored {tag.name} from {old.name} (a re-save of it was interrupted)")
        else:
            _remove(old)
            done.append(f"removed {old.name}")
    newest = newest_complete(ckpt_dir)
    newest_step = int(TAG_RE.match(newest.name).group(1)) if newest is not None else -1
    for path in sorted(ckpt_dir.iterdir()):
        if path.resolve() == spare:
            continue
        match = TAG_RE.match(path.name)
        if match and path.is_dir() and int(match.group(1)) < newest_step:
            issues = problems(path)
            if issues:
                _remove(path)
                done.append(f"removed incomplete {path.name} ({'; '.join(issues[:2])})")
        elif path.name.startswith(".trash-"):
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path.name} (an interrupted deletion)")
    for line in done:
        _log(f"checkpoints: {line} in {ckpt_dir}")
    return done


def newest_complete(ckpt_dir: Path) -> Path | None:
    """What `latest` names when that is complete, else the newest complete checkpoint (never raises)."""
    pointer = Path(ckpt_dir) / "latest"
    if pointer.is_file():
        target = Path(ckpt_dir) / pointer.read_text().strip()
        if TAG_RE.match(target.name) and not problems(target):
            return target
    done = complete_checkpoints(ckpt_dir)
    return done[-1] if done else None


def folder_size(path: Path) -> int:
    """Bytes of the files under `path`."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _remove(path: Path) -> None:
    """Delete a checkpoint folder so that a kill half-way leaves no half-deleted `step_*`: rename to
    `.trash-<name>` (atomic), then delete."""
    path = Path(path)
    trash = path.with_name(f".trash-{path.name.lstrip('.')}")
    try:
        os.rename(path, trash)
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True)


def _agree(values: list[float]) -> list[float]:
    """Element-wise max of `values` over every rank (one small all-reduce)."""
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"no space left on device ({exc})"
    return f"{type(exc).__name__}: {exc}"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _latest_name(ckpt_dir: Path) -> str:
    pointer = Path(ckpt_dir) / "latest"
    return pointer.read_text().strip() if pointer.is_file() else "nothing (no checkpoint yet)"


def load(engine, path: Path) -> tuple[dict, dict]:
    """Collective. Restores the engine from `path`; returns (meta, this rank's state)."""
    import torch.distributed as dist

    path = Path(path)
    rank = dist.get_rank()
    load_path, client_state = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                     load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load the checkpoint {path}")
    try:
        rank_state = torch.load(path / "client" / f"rank_{rank:05d}.pt", map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}/client/rank_{rank:05d}.pt is unreadable ({exc})") from None
    meta = read_meta(path)
    # The step as DeepSpeed's files and this rank's state recorded it must be the one client_state.json says.
    recorded = {"DeepSpeed's model states (fluidlm_step)": (client_state or {}).get("fluidlm_step"),
                f"client/rank_{rank:05d}.pt": rank_state.get("step")}
    for where, step in recorded.items():
        if step is not None and int(step) != int(meta["step"]):
            raise CheckpointError(f"{path} is inconsistent: {where} is of step {step}, {CLIENT_JSON} says step "
                                  f"{meta['step']}; resume from another checkpoint (--resume PATH)")
    return meta, rank_state


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
