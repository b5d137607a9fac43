"""Process group, model and DeepSpeed engine.

    dist_info = init_distributed(config)      # torchrun env, or a world of one
    engine = build_engine(config, model, dist_info)

The DeepSpeed config is built from the FluidLM config (`deepspeed_config`): ZeRO stage, AdamW
(torch's on CPU), fp32 on CPU / bf16 on CUDA, gradient clipping and accumulation. The LR schedule
(linear warm-up, cosine decay) is a LambdaLR, so every parameter group keeps its own multiplier
(DA's ρ trains at `optim.rho_lr_mult` × lr).
"""

from __future__ import annotations

import logging
import math
import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fluidlm.parallel.pipeline import cu_seqlens_from_starts
from fluidlm.parallel.topology import Layout
from fluidlm.train.config import Config


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    created_group: bool  # we created the process group (so we destroy it at exit)
    layout: Layout       # world = PP × DP × CP × TP
    topology: object = None  # DeepSpeed's PipeModelDataParallelTopology when TP, PP or CP > 1

    @property
    def dp_rank(self) -> int:
        return self.layout.coordinates(self.rank)["dp"]

    @property
    def model_parallel(self) -> bool:
        return self.layout.tp * self.layout.pp * self.layout.cp > 1

    @property
    def cp_rank(self) -> int:
        return self.layout.coordinates(self.rank)["cp"]

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(config: Config) -> DistInfo:
    """Join the torchrun world (RANK/WORLD_SIZE/... in the environment) or make a world of one.
    gloo on CPU, NCCL on CUDA unless parallel.backend says otherwise."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    backend = config.parallel.backend if config.parallel.backend != "auto" else ("nccl" if cuda else "gloo")
    if "RANK" not in os.environ:  # plain `fluidlm train`: a world of one
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        threads = config.train.threads or max(1, (os.cpu_count() or 1) // local_world)
        torch.set_num_threads(threads)
    _quiet_deepspeed()
    import deepspeed

    if device.type == "cpu":
        _skip_deepspeed_shm_op()
    created = not dist.is_initialized()
    if created:
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, rank=rank, world_size=world)
    layout = Layout.from_world(world, config.parallel.tp, config.parallel.pp, config.parallel.cp)
    topology = None
    if layout.tp * layout.pp * layout.cp > 1:
        from fluidlm.parallel.topology import init_model_parallel

        topology = init_model_parallel(layout)
    return DistInfo(rank, world, local_rank, local_world, device, backend, created, layout, topology)


def _skip_deepspeed_shm_op() -> None:
    """On CPU, DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce op at start-up
    (~40 s on 2 cores, and it needs a C++ compiler). It only serves DeepSpeed's inference
    all-reduce; training uses torch.distributed (gloo) collectives. Skip the build."""
    try:
        import importlib

        # (not `import deepspeed.comm.torch as ...`: that attribute path resolves to torch itself)
        ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
        if hasattr(ds_torch_comm, "build_shm_op"):
            ds_torch_comm.build_shm_op = lambda: None
    except Exception:  # pragma: no cover - an optimisation only
        pass


def _quiet_deepspeed() -> None:
    # DeepSpeed logs every config key at INFO on every rank; keep warnings only. Its ZeRO code
    # calls torch.distributed functions torch 2.13 deprecates, every step: not our business.
    import warnings

    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
                            category=FutureWarning)
    os.environ.setdefault("DEEPSPEED_LOG_LEVEL", "warning")
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except Exception:  # pragma: no cover - logging is cosmetic
        pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def build_model(config: Config, dist_info: DistInfo) -> tuple[nn.Module, int]:
    """This rank's module (what DeepSpeed wraps) and the whole model's parameter count: the dense
    model built from the seed, parallelised for the layout (fluidlm/parallel/parallelize.py)."""
    from fluidlm.model import FluidLM
    from fluidlm.parallel.parallelize import parallelize

    seed_everything(config.train.seed)
    model = FluidLM(config.model)
    return parallelize(model, dist_info.layout, config.train, dist_info.topology), model.num_parameters()


# --- parameters, optimizer, schedule ----------------------------------------------------------

NO_DECAY_SUFFIXES = ("rho", "bias", "pde.theta", "norm.weight")


def param_groups(model: nn.Module, config: Config) -> list[dict]:
    """Three AdamW groups: decayed weights; no-decay (biases, norm weights, PDE θ, flow bias);
    DA's ρ (no decay, lr × rho_lr_mult). Each group's `lr` is its peak; the schedule scales it."""
    o = config.optim
    decay, no_decay, rho = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("rho"):
            rho.append(p)
        elif name.endswith(NO_DECAY_SUFFIXES) or p.ndim < 2:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": o.weight_decay, "lr": o.lr},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "lr": o.lr},
        {"name": "rho", "params": rho, "weight_decay": 0.0, "lr": o.lr * o.rho_lr_mult},
    ]
    return [g for g in groups if g["params"]]


def lr_factor(step: int, config: Config) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warm-up over
    optim.warmup_steps, then cosine from 1 down to optim.min_lr_ratio at train.steps."""
    o, total = config.optim, config.train.steps
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def use_bf16(config: Config) -> bool:
    if config.train.precision == "auto":
        return torch.cuda.is_available()
    return config.train.precision == "bf16"


def deepspeed_config(config: Config, dist_info: DistInfo) -> dict:
    t, o = config.train, config.optim
    torch_adam = o.torch_adam or dist_info.device.type == "cpu"  # FusedAdam is CUDA-only
    ds = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        # DeepSpeed counts its data ranks (DP × CP: CP ranks share each sample) in the batch size.
        "train_batch_size": t.micro_batch_size * t.grad_accum * dist_info.layout.dp * dist_info.layout.cp,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": {"stage": config.parallel.zero_stage},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps, "weight_decay": o.weight_decay,
                       "torch_adam": torch_adam},
        },
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if use_bf16(config):
        ds["bf16"] = {"enabled": True}
        ds["data_types"] = {"grad_accum_dtype": "fp32"}  # fp32 master weights and grad accumulation
    return ds


def build_engine(config: Config, module: nn.Module, dist_info: DistInfo):
    """deepspeed.initialize with our param groups and schedule; returns the engine (a
    PipelineEngine when `module` is a PipelineModule)."""
    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR

    pipeline = dist_info.layout.pp > 1
    engine, _, _, _ = deepspeed.initialize(
        model=module.to(dist_info.device),
        model_parameters=param_groups(module, config),
        config=deepspeed_config(config, dist_info),
        lr_scheduler=lambda optimizer: LambdaLR(optimizer, lambda step: lr_factor(step, config)),
        dist_init_required=False,
        # The pipeline engine brings its own grid (from the topology); with TP alone, megatron-core's groups.
        mpu=_mpu() if dist_info.model_parallel and not pipeline else None,
    )
    return engine


def _mpu():
    from fluidlm.parallel.topology import MegatronMPU

    return MegatronMPU()


def split_batch(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loader batch {"tokens": (B, L+1), "doc_starts": (B, L+1)} → (inputs, targets, resets), each
    (B, L): the attention state resets at every row start and every document start, so no document
    (and no row) sees another."""
    tokens, starts = batch["tokens"], batch["doc_starts"]
    resets = starts[:, :-1].clone()
    resets[:, 0] = True
    return tokens[:, :-1], tokens[:, 1:], resets


class Objective:
    """Turns a micro-batch into the model's (inputs, targets) for train.objective:
    causal_lm: as they are (targets = the next tokens); masked_lm: BERT's masking of the inputs
    (fluidlm/model/objective.py), targets = the original tokens at the selected positions, -100
    elsewhere. The masks come from a generator seeded by (train.seed, step, dp_rank, micro-batch):
    a resumed run draws exactly the uninterrupted run's masks, and the TP / CP / PP ranks of one
    data-parallel replica draw the same masks for the same row (each masks the whole row, then
    keeps its shard). The row keeps its document resets, so nothing crosses a document."""

    def __init__(self, config: Config, dp_rank: int = 0):
        from fluidlm.model.objective import MaskingSpec

        self.name = config.train.objective
        self.seed, self.dp_rank = config.train.seed, dp_rank
        self.spec = MaskingSpec.from_config(config.to_dict()["train"]) if self.name == "masked_lm" else None

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor, step: int, micro: int):
        if self.spec is None:
            return inputs, targets
        from fluidlm.model.objective import mask_tokens, masking_generator

        return mask_tokens(inputs, self.spec, masking_generator(self.seed, step, self.dp_rank, micro))


def batch_to_inputs(batch: dict, device: torch.device, cp: int = 1, cp_rank: int = 0, objective: Objective | None = None,
                    step: int = 0, micro: int = 0):
    """(inputs (B, L), targets (B, L), cu_seqlens) of a loader batch (see `split_batch`), shaped by
    `objective` (None = next token) for micro-batch `micro` of step `step`; cu_seqlens packs the rows'
    documents along the flattened B·L tokens (computed on the host: no device sync).
    Under context parallelism (cp > 1) the micro-batch becomes one row (1, B·L) and inputs and targets
    are this rank's contiguous 1/cp of it; cu_seqlens stays global."""
    inputs, targets, resets = split_batch(batch)
    if objective is not None:
        inputs, targets = objective(inputs, targets, step, micro)
    cu_seqlens = cu_seqlens_from_starts(resets)
    if cp > 1:
        from fluidlm.parallel.context import shard_sequence

        inputs, targets = (shard_sequence(x.reshape(1, -1), cp_rank, cp) for x in (inputs, targets))
    return (inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True), cu_seqlens.to(device))


def pipeline_batches(batches, device, micro_batches: int, objective: Objective | None = None, step: int = 0):
    """`micro_batches` loader batches as DeepSpeed's pipeline engine wants them:
    ((inputs, resets), targets), each (B, L) as `split_batch` gives them and shaped by `objective`;
    the resets travel between the stages as a fixed-shape tensor (fluidlm/parallel/pipeline.py). The
    first and the last stage each read the batches and draw the same masks."""
    for micro in range(micro_batches):
        inputs, targets, resets = split_batch(next(batches))
        if objective is not None:
            inputs, targets = objective(inputs, targets, step, micro)
        yield (inputs.to(device), resets.to(device)), targets.to(device)


def flops_per_token(config: Config, num_params: int) -> float:
    """Training FLOPs per token (forward + backward, no recompute):

        6·P                                  dense matmuls (P = all parameters, the tied head included)
      + 12·L·H·d_head·T_attn                 attention
        T_attn = seq_len                     softmax (PaLM's convention: the full T×T scores)
        T_attn = chunk_size + d_head         DA, chunked: C intra-chunk pairs + the d×d state read/update

    MFU = flops_per_token × tokens/s ÷ (train.peak_tflops × 10¹² × devices)."""
    m = config.model
    t_attn = config.data.seq_len if m.attention == "softmax" else m.chunk_size + m.head_dim
    return 6.0 * num_params + 12.0 * m.n_layers * m.n_heads * m.head_dim * t_attn
