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

from fluidlm.train.checksums import write_checksums
from fluidlm.train.checkpoint_read import (UNIVERSAL_JSON, CheckpointError, dense_name, gather_checkpoint, is_universal,
                                           read_info, resolve_resume, split_dim)

CONVERT_ARGUMENT = "`fluidlm checkpoint convert` CHECKPOINT"  # how errors name the checkpoint to convert
STATES = ("fp32", "exp_avg", "exp_avg_sq")


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
    write_checksums(tmp)  # before universal.json, which marks the folder complete
    (tmp / UNIVERSAL_JSON).write_text(json.dumps(info, indent=2))
    tmp.rename(final)
    return final


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
