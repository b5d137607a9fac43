"""A deterministic, resumable loader over a shard manifest, for data-parallel training.

Epoch e's order is a function of (seed, e) alone: the shards in a permuted order, the samples of
each shard permuted (shards are read whole). The epoch is cut to a multiple of dp_size × micro
batch (the remainder is dropped), so every rank gets the same number of batches and none waits
on another. Global batch i of the epoch is stream[(i·dp + rank)·B : (i·dp + rank + 1)·B] for
each rank: ranks are disjoint and together cover the epoch. Iteration is endless (epoch after
epoch); `state_dict()` is the count of batches handed out, so a resumed loader yields exactly
the batches the uninterrupted one would have. With num_workers > 0 a torch DataLoader computes
batches in worker processes, in the same order.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np

import torch

from fluidlm.data import DataError
from fluidlm.data.shards import load_manifest, read_shard


class BatchSource(torch.utils.data.Dataset):
    """Map-style: item k = the k-th batch this rank yields (k counts across epochs)."""

    def __init__(self, manifest: dict, dp_rank: int, dp_size: int, micro_batch_size: int, seed: int):
        self.manifest, self.dp_rank, self.dp_size, self.batch, self.seed = manifest, dp_rank, dp_size, micro_batch_size, seed
        self.counts = np.array([s["samples"] for s in manifest["shards"]])
        total = int(self.counts.sum())
        self.batches_per_epoch = total // (dp_size * micro_batch_size)
        if self.batches_per_epoch == 0:
            raise DataError(
                f"the data in {manifest['root']!r} has {total} samples: fewer samples than dp_size × micro_batch_size = "
                f"{dp_size} × {micro_batch_size}; use fewer ranks, a smaller micro batch or more data"
            )

    def __len__(self):
        return 1 << 62  # endless: epochs follow each other

    @lru_cache(maxsize=2)
    def epoch_order(self, epoch: int) -> np.ndarray:
        """(shard, index in shard) of every sample, in epoch order."""
        rng = np.random.default_rng([self.seed, epoch])
        order = []
        for shard in rng.permutation(len(self.counts)):
            inner = np.random.default_rng([self.seed, epoch, int(shard)]).permutation(self.counts[shard])
            order.append(np.stack([np.full_like(inner, shard), inner], axis=1))
        return np.concatenate(order)

    @lru_cache(maxsize=4)
    def shard(self, index: int):
        return read_shard(Path(self.manifest["root"]), self.manifest["shards"][index])

    def __getitem__(self, k: int) -> dict:
        epoch, i = divmod(k, self.batches_per_epoch)
        start = (i * self.dp_size + self.dp_rank) * self.batch
        tokens, starts = [], []
        for shard, j in self.epoch_order(epoch)[start : start + self.batch]:
            shard_tokens, shard_starts = self.shard(int(shard))
            tokens.append(torch.from_numpy(shard_tokens[j].astype(np.int64)))
            mask = torch.zeros(len(shard_tokens[j]), dtype=torch.bool)
            mask[torch.from_numpy(shard_starts[j].astype(np.int64))] = True
            starts.append(mask)
        return {"tokens": torch.stack(tokens), "doc_starts": torch.stack(starts)}


class ShardLoader:
    """for batch in ShardLoader(manifest, dp_rank, dp_size, micro_batch_size, seed): ...

    Yields {"tokens": LongTensor (B, L+1), "doc_starts": BoolTensor (B, L+1)} forever."""

    def __init__(self, manifest_path, dp_rank: int = 0, dp_size: int = 1, micro_batch_size: int = 1, seed: int = 0,
                 num_workers: int = 0, tokenizer_path=None):
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank {dp_rank} is outside 0..{dp_size - 1}")
        self.manifest = load_manifest(manifest_path, tokenizer_path)
        self.source = BatchSource(self.manifest, dp_rank, dp_size, micro_batch_size, seed)
        self.num_workers = num_workers
        self.position = 0  # batches handed out so far (across epochs)
        self.identity = {"seed": seed, "dp_rank": dp_rank, "dp_size": dp_size, "micro_batch_size": micro_batch_size}

    @property
    def batches_per_epoch(self) -> int:
        return self.source.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self.position // self.batches_per_epoch

    def __iter__(self):
        first = self.position
        if self.num_workers == 0:
            batches = (self.source[k] for k in range(first, 1 << 62))
        else:
            batches = iter(torch.utils.data.DataLoader(
                self.source, batch_size=None, sampler=range(first, 1 << 62), num_workers=self.num_workers,
                multiprocessing_context="fork", prefetch_factor=2, persistent_workers=False,
                # A DataLoader otherwise draws its workers' base seed from the global torch RNG,
                # which would shift the training dropout stream of a resumed run by one draw.
                generator=torch.Generator().manual_seed(self.identity["seed"]),
                worker_init_fn=_own_process_group,
            ))
        for batch in batches:
            self.position += 1
            yield batch

    def state_dict(self) -> dict:
        return {"position": self.position, **self.identity}

    def load_state_dict(self, state: dict) -> None:
        mismatched = {k: (state.get(k), v) for k, v in self.identity.items() if state.get(k) != v}
        if mismatched:
            # dp_size changes re-deal the samples: resuming a different layout is not exact, say so.
            raise DataError(f"loader state was saved with different settings {mismatched} (saved, now)")
        self.position = int(state["position"])


def _own_process_group(worker_id: int) -> None:
    """torchrun (and a terminal's Ctrl-C) signal the whole process group, and a DataLoader worker
    dies on a SIGTERM that does not come from its parent, which would abort the training step
    instead of letting the training process finish it and save. Workers still exit with it."""
    os.setpgrp()
