"""This rank's model and the DeepSpeed engine around it.

    module, num_params = build_model(config, dist_info)   # parallelised for the layout
    engine = build_engine(config, module, dist_info)

The DeepSpeed config is built from the FluidLM config (`deepspeed_config`): ZeRO stage, AdamW
(torch's on CPU), fp32 on CPU / bf16 on CUDA, gradient clipping and accumulation. The parameter
groups and the LR schedule are fluidlm/train/optim.py's.
"""

from __future__ import annotations

import torch
from torch import nn

from fluidlm.train.config import Config
from fluidlm.train.distributed import DistInfo, seed_everything
from fluidlm.train.optim import lr_factor, param_groups


def build_model(config: Config, dist_info: DistInfo) -> tuple[nn.Module, int]:
    """This rank's module (what DeepSpeed wraps) and the whole model's parameter count: the dense
    model built from the seed, parallelised for the layout (fluidlm/parallel/parallelize.py)."""
    from fluidlm.model import FluidLM
    from fluidlm.parallel.parallelize import parallelize

    seed_everything(config.train.seed)
    model = FluidLM(config.model)
    return parallelize(model, dist_info.layout, config.train, dist_info.topology), model.num_parameters()


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
