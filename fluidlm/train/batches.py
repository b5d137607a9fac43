"""Loader batches → model inputs: (B, L) rows with their documents, the training objective (masking), context-parallel
shards, DeepSpeed's pipeline format; and the FLOPs per token behind MFU."""

from __future__ import annotations

import torch

from fluidlm.parallel.pipeline import cu_seqlens_from_starts
from fluidlm.train.config import Config


def split_batch(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loader batch {"tokens": (B, L+1), "doc_starts": (B, L+1)[, "loss_mask": (B, L+1)]} →
    (inputs, targets, resets), each (B, L): the attention state resets at every row start and every
    document start, so no document (and no row) sees another. A loss mask turns the targets it does
    not select into IGNORE (-100), which every loss path (TP, PP, CP, DP) already leaves out of its
    sum and its count."""
    from fluidlm.model.objective import IGNORE

    tokens, starts = batch["tokens"], batch["doc_starts"]
    resets = starts[:, :-1].clone()
    resets[:, 0] = True
    targets = tokens[:, 1:]
    if "loss_mask" in batch:
        targets = torch.where(batch["loss_mask"][:, 1:], targets, torch.full_like(targets, IGNORE))
    return tokens[:, :-1], targets, resets


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
