"""AdamW parameter groups and the LR schedule.

The LR schedule (linear warm-up, cosine decay) is a LambdaLR, so every parameter group keeps its
own multiplier (DA's ρ trains at `optim.rho_lr_mult` × lr).
"""

from __future__ import annotations

import math

from torch import nn

from fluidlm.train.config import Config


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
