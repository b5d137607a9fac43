"""Reading checkpoints: finding one, checking it is complete, and reading it into a dense fp32 state
dict plus its resolved training config, whatever layout wrote it. Training (resume checks),
`fluidlm checkpoint convert` and `fluidlm eval` share it; training's save and load of the DeepSpeed
engine is fluidlm/train/checkpoint.py, the universal format's writing and loading into an engine
fluidlm/train/universal.py.

    path = resolve_resume("runs/demo", Path("runs/demo/checkpoints"))   # newest complete checkpoint
    info = checkpoint_info(path)                                        # config, step, MLflow run id
    meta, state, how = read_checkpoint_state(path)                      # {dense name: fp32 tensor}

Two kinds of checkpoint folder: a training checkpoint (`step_*`, DeepSpeed's files plus
`client_state.json`, which marks it complete; layout in fluidlm/train/checkpoint.py) and a
universal one (`universal.json` plus `zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt`, made by `fluidlm
checkpoint convert`). A training checkpoint's weights are cut by its layout: each (TP rank, PP
stage) holds its slices, ZeRO splits the fp32 master weights and AdamW moments into per-DP-rank
partitions; `gather_checkpoint` glues them back under the dense model's parameter names.
Errors are CheckpointError, with the message naming the fix.

Security: DeepSpeed's own files are pickles (`torch.load(weights_only=False)`): load only
checkpoints you trust.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from fluidlm.train.checksums import verify

TAG_RE = re.compile(r"^step_(\d{8,})$")
CLIENT_JSON = "client_state.json"
UNIVERSAL_JSON = "universal.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not fit this run."""


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
    done = complete_checkpoints(ckpt_dir)
    if pointer.is_file():
        target = ckpt_dir / pointer.read_text().strip()
        issues = problems(target)
        if not issues:
            return target
        if not done:
            raise CheckpointError(f"{pointer} names {target.name}, which is not a complete checkpoint ({'; '.join(issues)}), "
                                  f"and {ckpt_dir} holds no complete checkpoint; pass --resume PATH with a checkpoint "
                                  "from elsewhere, or choose another train.run_dir to start fresh")
        _log(f"WARNING: {pointer} names {target.name}, which is not a complete checkpoint ({'; '.join(issues)}); "
             f"using the newest complete one, {done[-1].name}")
    return done[-1] if done else None


def newest_verified(ckpt_dir: Path) -> Path | None:
    """The checkpoint `latest` finds (see there) if it verifies (fluidlm/train/checksums.py), else the
    newest complete one that does, with a warning naming what failed; None if there is none at all.
    CheckpointError when checkpoints exist but none verifies."""
    first = latest(ckpt_dir)
    if first is None:
        return None
    refused = []
    for path in [first] + [p for p in reversed(complete_checkpoints(ckpt_dir)) if p != first]:
        issues, _ = verify(path)
        if not issues:
            if refused:
                _log(f"WARNING: falling back to {path.name}, the newest checkpoint that verifies")
            return path
        refused.append(f"{path.name}: {'; '.join(issues)}")
        _log(f"WARNING: {path} fails verification ({'; '.join(issues)}); trying the next newest complete checkpoint")
    raise CheckpointError(f"no checkpoint in {ckpt_dir} verifies ({' | '.join(refused)}); they are corrupt or were "
                          "changed after they were saved: pass --resume PATH with a good copy, or choose another "
                          "train.run_dir to start fresh")


def verified(path: Path, what: str) -> Path:
    """`path` if it verifies, else CheckpointError naming `what` (e.g. "--resume X") and the file."""
    issues, _ = verify(path)
    if issues:
        raise CheckpointError(f"{what}: {path} fails verification ({'; '.join(issues)}); it is corrupt or was "
                              "changed after it was saved: use another checkpoint (`fluidlm checkpoint verify` "
                              "checks them all)")
    return path


def resolve_resume(resume: str | None, ckpt_dir: Path, argument: str = "--resume") -> Path | None:
    """--resume auto → newest complete checkpoint of this run that verifies (None: start fresh);
    --resume PATH → that checkpoint (a step_* folder, a checkpoints/ folder or a run folder), which
    must verify. Raises CheckpointError, whose message names `argument` (the option or argument that
    gave `resume`)."""
    if resume is None:
        return None
    if resume == "auto":
        return newest_verified(ckpt_dir)
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"{argument} {resume}: no such checkpoint")
    if (path / "universal.json").is_file():  # made by `fluidlm checkpoint convert` (fluidlm/train/universal.py)
        return verified(path, f"{argument} {resume}")
    if (path / CLIENT_JSON).exists() or TAG_RE.match(path.name) or path.name.startswith(".tmp-"):
        issues = problems(path)
        if issues:
            raise CheckpointError(f"{argument} {resume}: not a complete checkpoint ({'; '.join(issues)})")
        return verified(path, f"{argument} {resume}")
    for folder in (path, path / "checkpoints"):
        if (folder / "latest").is_file() or complete_checkpoints(folder):
            found = newest_verified(folder)
            if found is not None:
                return found
    raise CheckpointError(f"{argument} {resume}: no checkpoint there (expected a step_* folder, a checkpoints/ folder "
                          "or a run folder holding one)")


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / CLIENT_JSON).read_text())


def _log(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # prepare() runs on every rank; one copy is enough
        print(message, file=sys.stderr, flush=True)


def is_universal(path: Path) -> bool:
    return (Path(path) / UNIVERSAL_JSON).is_file()


def read_info(path: Path) -> dict:
    return json.loads((Path(path) / UNIVERSAL_JSON).read_text())


# --- checkpoint info and dense weights ---------------------------------------------------------

@dataclass
class CheckpointInfo:
    path: Path
    config: dict                # the resolved training config
    step: int
    mlflow_run_id: str | None
    run_dir: Path | None        # the run folder this checkpoint lives in (None for universal ones elsewhere)
    source: str                 # how the weights were read


def _strip(state: dict) -> dict:
    return {k.removeprefix("model."): v for k, v in state.items()}


def read_checkpoint_state(path: Path) -> tuple[dict, dict, str]:
    """(meta, dense fp32 state dict, how it was read) of a checkpoint folder. Handles plain
    DeepSpeed checkpoints at ZeRO 0-2 (any TP/PP layout at ZeRO 1-2, through the fp32 master
    partitions), ZeRO-3 (DeepSpeed's zero_to_fp32) and universal checkpoints. CheckpointError when
    it cannot be read."""
    path = Path(path)
    if is_universal(path):
        info = read_info(path)
        state = {}
        for name in info["parameters"]:
            try:
                state[name] = torch.load(path / "zero" / name / "fp32.pt", map_location="cpu", weights_only=True)["param"]
            except Exception as exc:
                raise CheckpointError(f"{path}/zero/{name}/fp32.pt is unreadable ({exc})") from None
        meta = {"step": info["step"], "mlflow_run_id": info.get("mlflow_run_id"), "config": info["config"]}
        return meta, state, "universal checkpoint (fp32)"
    meta = read_meta(path)
    stage, tp, pp = meta.get("zero_stage", 0), meta.get("tp", 1), meta.get("pp", 1)
    if stage == 3:
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
        except Exception as exc:
            raise CheckpointError(f"{path} is a ZeRO-3 checkpoint and DeepSpeed's zero_to_fp32 could not read it "
                                  f"({type(exc).__name__}: {exc}); run DeepSpeed's zero_to_fp32.py on it, or train "
                                  "with parallel.zero_stage ≤ 2") from None
        return meta, _strip(state), "ZeRO-3 partitions via deepspeed zero_to_fp32"
    if tp * pp == 1:
        file = path / "mp_rank_00_model_states.pt"
        try:  # DeepSpeed's files are pickles: load only checkpoints you trust
            module = torch.load(file, map_location="cpu", weights_only=False)["module"]
        except Exception as exc:
            raise CheckpointError(f"{file} is unreadable ({type(exc).__name__}: {exc})") from None
        module = _strip(module)
        if all(v.dtype == torch.float32 for v in module.values() if v.is_floating_point()) or stage == 0:
            return meta, {k: v.float() if v.is_floating_point() else v for k, v in module.items()}, \
                "DeepSpeed module weights"
    if stage in (1, 2) or meta.get("bf16"):  # bf16 module weights, or a TP/PP layout: glue the fp32 master partitions
        meta, full, _ = gather_checkpoint(path)
        return meta, {name: states["fp32"] for name, states in full.items()}, \
            f"fp32 ZeRO-{stage} master partitions (tp {tp}, pp {pp})"
    raise CheckpointError(f"{path} was saved with tp {tp}, pp {pp} and ZeRO stage 0: its slices cannot be glued here; "
                          "train with parallel.zero_stage=1 (the default) to evaluate model-parallel checkpoints")


def read_checkpoint_meta(path: Path) -> tuple[dict, str | None]:
    """(resolved training config, MLflow run id) without touching the weights."""
    meta = read_info(path) if is_universal(path) else read_meta(path)
    return meta, meta.get("mlflow_run_id")


def checkpoint_info(path: Path) -> CheckpointInfo:
    meta, run_id = read_checkpoint_meta(path)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    return CheckpointInfo(path=path, config=meta["config"], step=int(meta["step"]), mlflow_run_id=run_id,
                          run_dir=run_dir, source="")


# --- names: engine parameter ↔ dense model parameter -----------------------------------------

def dense_name(engine_name: str, model_config: dict, pipeline: bool) -> str:
    """`model.blocks.0.attn.rho` (flat) or `2.attn.rho` / `tied_modules.embed.embed.weight` (pipeline)
    → `blocks.0.attn.rho` / `embed.weight`."""
    if not pipeline:
        return engine_name.removeprefix("model.")
    if engine_name.startswith("tied_modules.embed."):
        return engine_name.removeprefix("tied_modules.embed.")
    index, rest = engine_name.split(".", 1)
    if rest.startswith("pde.") or rest == "norm.weight":
        return rest
    first_block = 1 + bool(model_config.get("pde", {}).get("enabled", True))
    return f"blocks.{int(index) - first_block}.{rest}"


# --- a training checkpoint's partitions → full tensors ----------------------------------------

def _load(path: Path) -> dict:
    # DeepSpeed's files are pickles: load only checkpoints you trust (README, checkpoints).
    return torch.load(path, map_location="cpu", weights_only=False)


def gather_checkpoint(path: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]], int]:
    """(meta, {dense name: {"fp32"|"exp_avg"|"exp_avg_sq": full tensor}}, AdamW step) of a training checkpoint."""
    issues = problems(path)
    if issues:
        raise CheckpointError(f"{path} is not a complete checkpoint: {'; '.join(issues)}")
    meta = read_meta(path)
    stage, tp, pp = meta.get("zero_stage", 0), meta.get("tp", 1), meta.get("pp", 1)
    if stage not in (1, 2) and not (stage == 0 and meta.get("bf16")):
        raise CheckpointError(f"{path} was saved with parallel.zero_stage={stage}; conversion reads ZeRO stage 1 or 2 "
                              "(or bf16) optimizer partitions (train with parallel.zero_stage=1, the default)")
    world = meta["world_size"]
    dp = world // (tp * pp)  # DeepSpeed's data ranks: DP × CP
    model_config = meta["config"]["model"]
    pipeline = pp > 1
    # pieces[name][state][tp_rank] = list of (dp_rank, fragment) in partition order
    pieces: dict[str, dict[str, dict[int, list]]] = {}
    shapes: dict[str, dict[int, torch.Size]] = {}
    adam_step = None
    owner: dict[str, int] = {}  # the tied embedding sits on the first and the last stage: read it once
    for mp in range(tp * pp):
        tp_rank, stage = mp % tp, mp // tp  # DeepSpeed's model-parallel rank: stage-major, TP fastest
        model_states = _load(path / f"mp_rank_{mp:02d}_model_states.pt")
        for group in model_states["param_shapes"]:
            for name, shape in group.items():
                dense = dense_name(name, model_config, pipeline)
                owner.setdefault(dense, stage)
                shapes.setdefault(dense, {})[tp_rank] = torch.Size(shape)
        for d in range(dp):
            optim = _load(path / optim_file(meta, d, mp))["optimizer_state_dict"]
            flat_fp32 = optim["single_partition_of_fp32_groups"]
            base_state = optim["base_optimizer_state"]["state"]
            for g, mapping in enumerate(optim["param_slice_mappings"]):
                flats = {"fp32": flat_fp32[g], "exp_avg": base_state[g]["exp_avg"],
                         "exp_avg_sq": base_state[g]["exp_avg_sq"]}
                adam_step = int(base_state[g]["step"]) if adam_step is None else adam_step
                for name, frag in mapping.items():
                    dense = dense_name(name, model_config, pipeline)
                    if owner[dense] != stage:
                        continue
                    for state, flat in flats.items():
                        part = flat.narrow(0, frag.start, frag.numel).clone()
                        pieces.setdefault(dense, {}).setdefault(state, {}).setdefault(tp_rank, []).append((d, part))
    full_shapes = dense_shapes(model_config)
    missing = set(full_shapes) - set(pieces)
    if missing:
        raise CheckpointError(f"{path}: no optimizer partition holds {sorted(missing)[:3]}…; is it a FluidLM checkpoint?")
    full: dict[str, dict[str, torch.Tensor]] = {}
    for name, states in pieces.items():
        full[name] = {}
        for state, by_tp in states.items():
            slices = []
            for tp_rank in sorted(by_tp):
                flat = torch.cat([part for _, part in sorted(by_tp[tp_rank], key=lambda x: x[0])])
                slices.append(flat.view(shapes[name][tp_rank]))
            full[name][state] = _glue(name, slices, full_shapes[name])
    return meta, full, adam_step or 0


def dense_shapes(model_config: dict) -> dict[str, torch.Size]:
    """Parameter shapes of the dense model (built on the meta device: no memory, no init)."""
    from fluidlm.model import FluidLM
    from fluidlm.model.config import ModelConfig

    with torch.device("meta"):
        model = FluidLM(ModelConfig.model_validate(model_config))
    return {name: p.shape for name, p in model.named_parameters()}


def split_dim(local: torch.Size, full: torch.Size) -> int | None:
    """The dimension a TP slice was cut along (None: the parameter is replicated)."""
    differing = [d for d, (a, b) in enumerate(zip(local, full)) if a != b]
    if len(local) != len(full) or len(differing) > 1:
        raise CheckpointError(f"a parameter of shape {tuple(local)} is not a slice of {tuple(full)}")
    return differing[0] if differing else None


def _glue(name: str, slices: list[torch.Tensor], full_shape: torch.Size) -> torch.Tensor:
    """TP slices (rank order) → the full tensor."""
    dim = split_dim(slices[0].shape, full_shape)
    if dim is not None:
        return torch.cat(slices, dim=dim)
    for rank, other in enumerate(slices[1:], start=1):
        if not torch.equal(slices[0], other):  # replicated parameters must never drift apart
            raise CheckpointError(f"{name} is replicated across TP ranks but rank {rank} differs from rank 0")
    return slices[0]
