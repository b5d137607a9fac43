"""Changing the parallel layout between runs: `fluidlm checkpoint convert`.

    fluidlm checkpoint convert runs/a/checkpoints/step_00000200 --out runs/a/universal
    torchrun --nproc-per-node=2 -m fluidlm.train --config … parallel.tp=1 parallel.pp=1 \\
        --resume runs/a/universal/step_00000200

A training checkpoint is cut by its layout: each (TP rank, PP stage) holds its slices of the
weights, and ZeRO splits the fp32 master weights and the AdamW moments of each into flat
per-DP-rank partitions. `convert` glues them back (offline, no process group): for every
parameter of the dense model it writes the full fp32 master weight and both AdamW moments, in
DeepSpeed's universal per-parameter layout (`zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt`, each
`{"param": tensor}`), plus `universal.json` (step, tokens, AdamW step, LR-schedule position, the
resolved config). Names are the dense model's (`blocks.0.attn.qkv.weight`), so they mean the
same thing at every layout; DeepSpeed's own ds_to_universal / load_universal assume
Megatron-DeepSpeed's parameter naming and do not fit a model whose pipeline and flat forms name
parameters differently.

Resuming from it at any layout cuts each tensor for the new TP rank (a sliced parameter is
recognised by its shape: the model declares its splits through megatron's `partition_dim`, see
fluidlm/parallel/tensor.py) and writes it into the new ZeRO partitions through DeepSpeed's
tensor-fragment API (`safe_set_full_fp32_param`, `safe_set_full_optimizer_state`). The data
position carries over as a count of global samples. What cannot carry over: RNG streams (they
restart from the seed and the step; dropout masks differ from the uninterrupted run) and the
data order after the first epoch when the new layout cuts epochs differently.
Needs ZeRO stage 1 or 2 on both sides (stage 0 keeps no flat partitions; stage 3 is not handled).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from fluidlm.train.checkpoint import CheckpointError, optim_file, problems, read_meta, resolve_resume

UNIVERSAL_JSON = "universal.json"
CONVERT_ARGUMENT = "`fluidlm checkpoint convert` CHECKPOINT"  # how errors name the checkpoint to convert
STATES = ("fp32", "exp_avg", "exp_avg_sq")


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


# --- offline: a checkpoint → full tensors ------------------------------------------------------

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


def convert(src: Path, out: Path) -> Path:
    """Write the universal checkpoint of training checkpoint `src` into `out/<step tag>`; returns it."""
    meta, full, adam_step = gather_checkpoint(src)
    final = Path(out) / src.name
    tmp = Path(out) / f".tmp-{src.name}"
    if final.exists():
        raise CheckpointError(f"{final} exists; remove it or choose another --out")
    tmp.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm

    for name, states in tqdm(sorted(full.items()), desc="writing", unit="param", file=sys.stderr):
        folder = tmp / "zero" / name
        folder.mkdir(parents=True, exist_ok=True)
        for state in STATES:
            torch.save({"param": states[state].contiguous()}, folder / f"{state}.pt")
    source = {k: meta.get(k, 1) for k in ("world_size", "tp", "pp", "cp")}
    micro, accum = meta["config"]["train"]["micro_batch_size"], meta["config"]["train"]["grad_accum"]
    dp = source["world_size"] // (source["tp"] * source["pp"] * source["cp"])
    info = {"format": "fluidlm-universal", "format_version": 1, "step": meta["step"], "tokens": meta["tokens"],
            "adam_step": adam_step, "global_samples": meta["step"] * accum * micro * dp,
            "mlflow_run_id": meta.get("mlflow_run_id"), "source": {**source, "path": str(src)},
            "config": meta["config"], "parameters": sorted(full)}
    (tmp / UNIVERSAL_JSON).write_text(json.dumps(info, indent=2))
    tmp.rename(final)
    return final


def is_universal(path: Path) -> bool:
    return (Path(path) / UNIVERSAL_JSON).is_file()


def read_info(path: Path) -> dict:
    return json.loads((Path(path) / UNIVERSAL_JSON).read_text())


# --- at resume: full tensors → this rank's engine ------------------------------------------------

def load_into_engine(engine, path: Path, model_config: dict, pipeline: bool) -> dict:
    """Collective (DeepSpeed's fragment setters communicate). Sets every local parameter's fp32
    master weight and AdamW moments from universal checkpoint `path`, the AdamW step and the LR
    schedule position. Returns universal.json."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    info = read_info(path)
    model = engine.module
    zero = engine.optimizer
    adam = getattr(zero, "optimizer", None)
    if adam is None or not hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        raise CheckpointError("resuming a universal checkpoint needs a ZeRO optimizer (parallel.zero_stage 1 or 2)")
    # AdamW creates its state at the first step; create it now so there is something to fill.
    for group in adam.param_groups:
        for p in group["params"]:
            if not adam.state[p]:
                adam.state[p] = {"step": torch.tensor(float(info["adam_step"])), "exp_avg": torch.zeros_like(p),
                                 "exp_avg_sq": torch.zeros_like(p)}
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()  # points every parameter's fragment at that state
    tp_rank, tp_size = _tp_coordinates()
    for name, param in model.named_parameters():
        dense = dense_name(name, model_config, pipeline)
        folder = Path(path) / "zero" / dense
        if not folder.is_dir():
            raise CheckpointError(f"{path} has no parameter {dense} (the model config differs from the checkpoint's)")
        for state in STATES:
            tensor = torch.load(folder / f"{state}.pt", map_location="cpu", weights_only=True)["param"]
            dim = split_dim(param.shape, tensor.shape)
            if dim is not None:
                tensor = tensor.chunk(tp_size, dim=dim)[tp_rank]
            tensor = tensor.to(param.device)
            if state == "fp32":
                safe_set_full_fp32_param(param, tensor)  # ZeRO's fp32 master partition
                with torch.no_grad():
                    param.copy_(tensor.to(param.dtype))  # the module's (working-precision) weight
            else:
                safe_set_full_optimizer_state(param, tensor, state)
    for group in adam.param_groups:
        for p in group["params"]:
            step = adam.state[p]["step"]
            adam.state[p]["step"] = torch.full_like(step, info["adam_step"]) if torch.is_tensor(step) else info["adam_step"]
    scheduler = engine.lr_scheduler
    scheduler.last_epoch = info["step"] - 1
    scheduler.step()  # sets every group's lr for step `info["step"]`
    engine.global_steps = info["step"]
    return info


def _tp_coordinates() -> tuple[int, int]:
    try:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    except ImportError:
        pass
    return 0, 1


# --- the command -------------------------------------------------------------------------------
# The parser is fluidlm/train/checkpoint_cli.py (no torch import for --help); it calls run().


def run(args) -> int:
    try:
        src = _resolve(args.checkpoint)
        final = convert(src, Path(args.out))
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    info = read_info(final)
    print(f"wrote {final}: {len(info['parameters'])} parameters at step {info['step']} "
          f"(from world {info['source']['world_size']}, tp {info['source']['tp']}, pp {info['source']['pp']}); "
          f"resume any layout with --resume {final}")
    return 0


def _resolve(path: str) -> Path:
    found = resolve_resume(path, Path(path), argument=CONVERT_ARGUMENT)
    if found is None or is_universal(found):
        raise CheckpointError(f"{CONVERT_ARGUMENT} {path}: no training checkpoint to convert there")
    return found
