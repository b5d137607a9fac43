"""Validation during training (`train.eval_every`): loss and perplexity on a fixed slice of the
validation split, through the same parallel module as training.

The slice is the first ⌈eval_tokens / seq_len⌉ samples of `data.val_split` in manifest order,
rounded to whole micro-batches for every data-parallel rank (at least one each), so every validation
of a run scores the same tokens and the curve is comparable. Data-parallel rank r scores the
micro-batches r, r + dp, …. Masked-LM masks come from a generator of their own (fixed per
micro-batch), so they are the same every time. Nothing here touches the training RNG, the loader
or the gradients: the training loss curve and exact resume do not change when it is on.

The mean: every rank contributes (its module's mean loss × the micro-batch's scored tokens, those
tokens); TP ranks repeat their replica's value and the CP ranks' values average to it (LossModule's
scaling), so the world's ratio is the replica-weighted mean over all scored tokens. With pipeline
stages DeepSpeed's `eval_batch` returns the mean over `grad_accum` micro-batches, weighted here by
their tokens: exact when every micro-batch scores as many tokens (next-token LM).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from fluidlm.data import DataError
from fluidlm.data.shards import load_manifest, read_shard_samples, shard_url
from fluidlm.train.batches import Objective, batch_to_inputs, pipeline_batches, split_batch

VALIDATION_STEP = -1  # the "step" of the masking generator: no training step uses it


def validation_batches(manifest_path: Path, eval_tokens: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                       group: int = 1, vocab_limit: int | None = None) -> list[dict]:
    """This data-parallel rank's micro-batches of the validation slice, each {"tokens", "doc_starts"}
    (B, L+1) as the training loader gives them; `group` micro-batches go together (pipeline)."""
    manifest = load_manifest(manifest_path)
    seq_len = int(manifest["seq_len"])
    per_round = micro_batch_size * dp_size * group
    rounds = max(1, math.ceil(math.ceil(eval_tokens / seq_len) / per_round))
    need = rounds * per_round
    tokens, starts, loss_masks = [], [], []
    for entry in manifest["shards"]:
        got = read_shard_samples(shard_url(manifest, entry), entry, seq_len, vocab_limit)
        tokens += got["tokens"]
        starts += got["starts"]
        loss_masks += got["loss_mask"] or [np.ones(seq_len + 1, bool)] * len(got["tokens"])
        if len(tokens) >= need:
            break
    if len(tokens) < per_round:
        raise DataError(f"{manifest_path}: {len(tokens)} validation samples, fewer than one micro-batch per "
                         f"data-parallel rank ({per_round}); use a larger validation split or set train.eval_every=0")
    have = len(tokens) // per_round * per_round
    batches = []
    for i, first in enumerate(range(0, min(need, have), micro_batch_size)):
        if (i // group) % dp_size != dp_rank:
            continue
        rows = np.stack(tokens[first:first + micro_batch_size]).astype(np.int64)
        mask = np.zeros(rows.shape, dtype=bool)  # starts.npy lists a sample's document starts: as the loader's mask
        for r, positions in enumerate(starts[first:first + micro_batch_size]):
            mask[r, positions.astype(np.int64)] = True
        batch = {"tokens": torch.from_numpy(rows), "doc_starts": torch.from_numpy(mask)}
        if manifest.get("loss_mask"):  # only the masked targets are scored (and counted)
            batch["loss_mask"] = torch.from_numpy(np.stack(loss_masks[first:first + micro_batch_size]))
        batches.append(batch)
    return batches


def greedy_hits(model, inputs: torch.Tensor, targets: torch.Tensor, cu_seqlens=None) -> tuple[int, int]:
    """(right, scored) of a dense FluidLM on one batch: the scored targets (≠ -100) and how many of
    them its greedy (argmax) prediction gets right. Only the scored rows go through the LM head."""
    scored = targets != -100
    logits = model.parallel.lm_logits(model.hidden_states(inputs, cu_seqlens)[scored], model.embed.weight)
    return int((logits.argmax(-1) == targets[scored]).sum()), int(scored.sum())


@torch.no_grad()
def validate(engine, batches: list[dict], dist_info, objective: Objective, grad_accum: int,
             tasks: list[str] = ()) -> dict:
    """{"val/loss", "val/perplexity", "val/tokens"} over the slice (all ranks call it), and for each
    of `tasks` (train.eval_tasks; tp = pp = cp = 1) "val/<task>_acc": the greedy accuracy on the
    slice's scored targets (every rank scores its batches, the counts are summed)."""
    layout = dist_info.layout
    was_training = engine.module.training
    engine.eval()
    try:
        total = torch.zeros(4, dtype=torch.float64)
        if layout.pp > 1:
            for start in range(0, len(batches), grad_accum):
                group = batches[start:start + grad_accum]
                scored = sum(int((objective(*split_batch(b)[:2], VALIDATION_STEP, start + j)[1] != -100).sum())
                             for j, b in enumerate(group))
                loss = engine.eval_batch(pipeline_batches(iter(group), dist_info.device, len(group), objective,
                                                          VALIDATION_STEP))
                total[:2] += torch.tensor([float(loss) * scored, scored], dtype=torch.float64)
        else:
            for micro, batch in enumerate(batches):
                _, full_targets = objective(*split_batch(batch)[:2], VALIDATION_STEP, micro)
                scored = int((full_targets != -100).sum())
                inputs, targets, cu_seqlens = batch_to_inputs(batch, dist_info.device, layout.cp, dist_info.cp_rank,
                                                              objective, VALIDATION_STEP, micro)
                loss = engine(inputs, targets, cu_seqlens)
                total[:2] += torch.tensor([float(loss) * scored, scored], dtype=torch.float64)
                if tasks:
                    total[2:] += torch.tensor(greedy_hits(engine.module.model, inputs, targets, cu_seqlens),
                                              dtype=torch.float64)
        total = total.to(dist_info.device)
        dist.all_reduce(total)
        loss_sum, count, right, answered = total.tolist()
    finally:
        engine.train(was_training)
    loss = loss_sum / max(count, 1.0)
    return {"val/loss": loss, "val/perplexity": math.exp(min(loss, 50.0)),
            "val/tokens": int(count) // (layout.tp * layout.cp * layout.pp),
            **{f"val/{task}_acc": right / max(answered, 1.0) for task in tasks}}
