# Over 400 lines: the order, the per-rank shard plan, resumable state and the worker split are one contract.
"""A deterministic, resumable loader over one or more shard manifests, for data-parallel training,
in which each rank (and each DataLoader worker) opens only its own shards.

The order is a function of (seed, sources, weights, lanes, window, micro-batch) alone, never of
the number of ranks or workers:

- **Lanes.** Each source's shards are dealt, in a permuted order per epoch (seeded by (seed,
  epoch)), to K = min(lanes, shards) lanes. Global micro-batch g (counted across ranks: rank r's
  k-th batch is g = k·dp_size + r) takes its samples from lane g mod K. A rank therefore reads the
  lanes r, r + dp, r + 2·dp, … only: when dp_size divides K the shard sets of the ranks are
  disjoint and each rank reads 1/dp of the data. The global batch is the same for every dp_size
  (DP=2 equals DP=1 with 2 accumulated micro-batches), so universal checkpoints can change it.
- **Windows.** A lane's shards are read `window` at a time; the samples of a window are permuted
  together (seeded by (seed, epoch, lane, window)). A window is read by one process: with
  num_workers > 0 the DataLoader workers load whole windows (I/O and decoding) and the training
  process only slices batches out of them, in the same order as with num_workers = 0.
- **Epochs.** Every lane yields the same number of samples per epoch, P = the largest multiple of
  the micro-batch that the lane with the fewest shards holds (samples past P in a longer lane are
  skipped this epoch; the deal changes every epoch). An epoch is K·P / micro_batch global
  micro-batches; iteration is endless, every rank gets batch k (no rank waits on another).
- **Sources.** With several sources, each sample slot of global micro-batch g draws its source
  with probability ∝ weight (seeded by (seed, g // 1024)); each source is its own endless
  stream of lanes and epochs. Same tokenizer (sha256), seq_len and EOS required.

`state_dict()` is the count of batches handed out: a resumed loader recomputes everything from it
and yields exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

import torch

from fluidlm.data import DataError
from fluidlm.data.shards import load_manifest, read_shard_samples, shard_url

CHOICE_BLOCK = 1024  # global micro-batches per block of source draws
MIN_USE = 0.9  # the lane count is lowered until an epoch uses at least this share of the samples


class Source:
    """One manifest split into lanes and windows."""

    def __init__(self, manifest: dict, name: str, weight: float, lanes: int, window: int, batch: int, seed: int,
                 index: int):
        self.manifest, self.name, self.weight, self.index = manifest, name, float(weight), index
        self.counts = np.array([s["samples"] for s in manifest["shards"]], dtype=np.int64)
        self.window, self.batch, self.seed = window, batch, seed
        # K: the largest divisor of `lanes` whose epoch uses ≥ MIN_USE (90%) of the samples (lanes get equal
        # sample counts, so a lane with one shard fewer than another caps them all).
        total = int(self.counts.sum())
        for k in sorted((d for d in range(1, lanes + 1) if lanes % d == 0), reverse=True):
            self.lanes, self.per_lane_epoch = k, self._per_lane(k, batch)
            if k * self.per_lane_epoch >= MIN_USE * total:
                break
        self._deals: dict[int, list] = {}

    def _per_lane(self, k: int, batch: int) -> int:
        if k > len(self.counts):
            return 0
        fewest = len(self.counts) // k  # the fewest shards a lane gets
        return int(np.sort(self.counts)[:fewest].sum()) // batch * batch  # ... and the smallest ones

    def lane_shards(self, epoch: int, lane: int) -> list[int]:
        if epoch not in self._deals:
            if len(self._deals) > 4:
                self._deals.pop(min(self._deals))
            perm = np.random.default_rng([self.seed, epoch, self.index, 11]).permutation(len(self.counts))
            self._deals[epoch] = [perm[lane_::self.lanes].tolist() for lane_ in range(self.lanes)]
        return self._deals[epoch][lane]

    def windows(self, epoch: int, lane: int) -> list[tuple[list[int], int]]:
        """[(shard indices, first lane sample)] of the windows holding this lane's first P samples."""
        shards, out, offset = self.lane_shards(epoch, lane), [], 0
        for first in range(0, len(shards), self.window):
            if offset >= self.per_lane_epoch:
                break
            group = shards[first:first + self.window]
            out.append((group, offset))
            offset += int(self.counts[group].sum())
        return out

    def locate(self, j: int) -> tuple[int, int]:
        """Lane sample j (endless) → (epoch, offset in that epoch)."""
        return divmod(j, self.per_lane_epoch)


def _window_permutation(source: Source, epoch: int, lane: int, w: int, n: int) -> np.ndarray:
    return np.random.default_rng([source.seed, epoch, source.index, lane, w, 13]).permutation(n)


def load_window(sources: list[Source], wid: tuple, vocab_limit: int | None) -> dict:
    """Window wid = (source, epoch, lane, w): its samples in window order, as arrays, plus what was read."""
    s, epoch, lane, w = wid
    src = sources[s]
    group, _ = src.windows(epoch, lane)[w]
    tokens, starts, docs, masks, opened, nbytes = [], [], [], [], [], 0
    m = src.manifest
    limit = m.get("vocab_size") if vocab_limit is None else min(vocab_limit, m.get("vocab_size") or vocab_limit)
    for shard in group:
        entry = m["shards"][shard]
        url = shard_url(m, entry)
        got = read_shard_samples(url, entry, seq_len=m["seq_len"], vocab_limit=limit)
        tokens += got["tokens"]
        starts += got["starts"]
        docs += got["docs"] if got["docs"] is not None else [np.zeros(0, np.int32)] * len(got["tokens"])
        masks += got["loss_mask"] if got["loss_mask"] is not None else [None] * len(got["tokens"])
        opened.append(url)
        nbytes += got["bytes"]
    order = _window_permutation(src, epoch, lane, w, len(tokens))
    stacked = np.stack(tokens)[order]
    mask = np.zeros(stacked.shape, dtype=bool)
    for row, i in enumerate(order):
        mask[row, starts[i].astype(np.int64)] = True
    loss_mask = np.stack([np.ones(len(t), bool) if m is None else m for t, m in zip(tokens, masks)])[order]
    return {"id": wid, "tokens": stacked, "doc_starts": mask, "loss_mask": loss_mask, "docs": [docs[i] for i in order],
            "opened": opened, "bytes": nbytes}


class Plan:
    """Which samples batch k of rank r holds: [(source, lane sample index j)] per slot, and the
    windows they live in. Pure function of the settings; the running source counts are cached by
    block so sequential access is cheap and random access (a resume) costs one pass over blocks."""

    def __init__(self, sources: list[Source], dp_rank: int, dp_size: int, batch: int, seed: int):
        self.sources, self.rank, self.dp, self.batch, self.seed = sources, dp_rank, dp_size, batch, seed
        w = np.array([s.weight for s in sources], dtype=np.float64)
        self.p = w / w.sum()
        self._block_starts: list[list[np.ndarray]] = []  # per block: per source, lane consumed counts at block start
        self._block_cache: dict[int, tuple] = {}

    def _choices(self, block: int) -> np.ndarray:
        if len(self.sources) == 1:
            return np.zeros((CHOICE_BLOCK, self.batch), dtype=np.int64)
        rng = np.random.default_rng([self.seed, block, 17])
        return rng.choice(len(self.sources), size=(CHOICE_BLOCK, self.batch), p=self.p)

    def _block(self, block: int):
        """(choices, per-source per-row exclusive lane prefix counts, per-source lane counts at the block's start)."""
        if block in self._block_cache:
            return self._block_cache[block]
        while len(self._block_starts) <= block:
            b = len(self._block_starts)
            if b == 0:
                self._block_starts.append([np.zeros(s.lanes, dtype=np.int64) for s in self.sources])
                continue
            choices, prefix, start = self._block(b - 1)
            end = []
            for si, src in enumerate(self.sources):
                counts = (choices == si).sum(axis=1)
                rows_lane = (np.arange(CHOICE_BLOCK) + (b - 1) * CHOICE_BLOCK) % src.lanes
                end.append(start[si] + np.bincount(rows_lane, weights=counts, minlength=src.lanes).astype(np.int64))
            self._block_starts.append(end)
        choices = self._choices(block)
        prefix = []
        for si, src in enumerate(self.sources):
            counts = (choices == si).sum(axis=1)
            lanes = (np.arange(CHOICE_BLOCK) + block * CHOICE_BLOCK) % src.lanes
            before = np.zeros(CHOICE_BLOCK, dtype=np.int64)
            for lane in range(src.lanes):
                rows = np.nonzero(lanes == lane)[0]
                c = np.cumsum(counts[rows])
                before[rows] = c - counts[rows]
            prefix.append(before)
        entry = (choices, prefix, self._block_starts[block])
        if len(self._block_cache) > 4:
            self._block_cache.pop(min(self._block_cache))
        self._block_cache[block] = entry
        return entry

    def global_index(self, k: int) -> int:
        return k * self.dp + self.rank

    def refs(self, k: int) -> list[tuple[int, int, int, int]]:
        """Batch k's slots: [(source, lane, epoch, offset in the lane's epoch)]."""
        g = self.global_index(k)
        block, row = divmod(g, CHOICE_BLOCK)
        choices, prefix, start = self._block(block)
        out, taken = [], {}
        for si in choices[row]:
            si = int(si)
            src = self.sources[si]
            lane = g % src.lanes
            j = int(start[si][lane] + prefix[si][row]) + taken.get(si, 0)
            taken[si] = taken.get(si, 0) + 1
            epoch, offset = src.locate(j)
            out.append((si, lane, epoch, offset))
        return out

    def window_of(self, si: int, lane: int, epoch: int, offset: int) -> tuple[tuple, int]:
        """((source, epoch, lane, w), index in the window) of one slot."""
        wins = self.sources[si].windows(epoch, lane)
        lo, hi = 0, len(wins) - 1
        while lo < hi:  # last window whose first sample is ≤ offset
            mid = (lo + hi + 1) // 2
            if wins[mid][1] <= offset:
                lo = mid
            else:
                hi = mid - 1
        return (si, epoch, lane, lo), offset - wins[lo][1]

    def source_samples(self, global_micro_batches: int) -> np.ndarray:
        """Samples drawn from each source by the first `global_micro_batches` micro-batches (all ranks)."""
        block, row = divmod(global_micro_batches, CHOICE_BLOCK)
        total = np.zeros(len(self.sources), dtype=np.int64)
        self._block(block)
        for si, src in enumerate(self.sources):
            total[si] = int(self._block_starts[block][si].sum())
        if row:
            choices = self._choices(block)[:row]
            total += np.bincount(choices.ravel(), minlength=len(self.sources))
        return total


class WindowSource(torch.utils.data.Dataset):
    """Map-style over window ids, for DataLoader workers: item (source, epoch, lane, w) = that window."""

    def __init__(self, sources: list[Source], vocab_limit: int | None):
        self.sources, self.vocab_limit = sources, vocab_limit

    def __len__(self):
        return 1 << 62

    def __getitem__(self, wid):
        return load_window(self.sources, tuple(wid), self.vocab_limit)


def _window_ids(plan: Plan, first: int):
    """The windows batches first, first+1, … need, in the order they are first needed."""
    seen: dict[tuple, None] = {}
    k = first
    while True:
        for ref in plan.refs(k):
            wid, _ = plan.window_of(*ref)
            if wid not in seen:
                seen[wid] = None
                if len(seen) > 4096:
                    seen.pop(next(iter(seen)))
                yield wid
        k += 1


def _as_sources(manifest_path) -> list[tuple[str, object, float]]:
    """manifest_path: a manifest (or its folder), or [(name, manifest, weight)] / [{dir|manifest, weight, name}]."""
    if isinstance(manifest_path, (str, Path)):
        return [(Path(manifest_path).parent.name if Path(manifest_path).name == "manifest.json"
                 else Path(manifest_path).name, manifest_path, 1.0)]
    out = []
    for i, item in enumerate(manifest_path):
        if isinstance(item, dict):
            path = item.get("manifest") or item.get("dir")
            out.append((item.get("name") or f"source{i}", path, float(item.get("weight", 1.0))))
        else:
            name, path, weight = item
            out.append((name, path, float(weight)))
    return out


class ShardLoader:
    """for batch in ShardLoader(manifest, dp_rank, dp_size, micro_batch_size, seed): ...

    Yields {"tokens": LongTensor (B, L+1), "doc_starts": BoolTensor (B, L+1)} forever, plus
    "loss_mask": BoolTensor (B, L+1) (True = a scored target) when a source's shards carry loss masks
    (format 3; a source without them scores every target).
    `manifest_path` is one manifest (or its folder) or a list of sources [(name, manifest, weight)]."""

    def __init__(self, manifest_path, dp_rank: int = 0, dp_size: int = 1, micro_batch_size: int = 1, seed: int = 0,
                 num_workers: int = 0, tokenizer_path=None, lanes: int = 8, window: int = 2,
                 vocab_size: int | None = None):
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank {dp_rank} is outside 0..{dp_size - 1}")
        if lanes < 1 or window < 1:
            raise DataError(f"lanes={lanes} and window={window} must be at least 1")
        specs = _as_sources(manifest_path)
        if not specs:
            raise DataError("no data source given")
        manifests = [load_manifest(path, tokenizer_path) for _, path, _ in specs]
        first = manifests[0]
        for (name, _, weight), m in zip(specs, manifests):
            if weight <= 0:
                raise DataError(f"data source {name!r}: weight {weight} must be > 0")
            for key in ("tokenizer_sha256", "seq_len", "eos_id"):
                if m.get(key) != first.get(key):
                    raise DataError(f"data source {name!r} ({m['root']}) has {key}={m.get(key)!r}, source "
                                    f"{specs[0][0]!r} ({first['root']}) has {first.get(key)!r}: every source must be "
                                    "made with the same tokenizer and seq_len; rebuild it with the same tokenizer")
        self.manifest = first
        self.loss_masks = any(m.get("loss_mask") for m in manifests)
        self.sources = [Source(m, name, weight, lanes, window, micro_batch_size, seed, i)
                        for i, ((name, _, weight), m) in enumerate(zip(specs, manifests))]
        for src in self.sources:
            total = int(src.counts.sum())
            if total // (dp_size * micro_batch_size) == 0:
                raise DataError(
                    f"the data in {src.manifest['root']!r} has {total} samples: fewer samples than dp_size × "
                    f"micro_batch_size = {dp_size} × {micro_batch_size}; use fewer ranks, a smaller micro batch or more data"
                )
            if src.per_lane_epoch == 0:
                raise DataError(
                    f"the data in {src.manifest['root']!r} has {len(src.counts)} shards in {src.lanes} lanes and the "
                    f"smallest lane holds fewer than micro_batch_size = {micro_batch_size} samples; use a smaller "
                    f"micro batch, fewer lanes (data.lanes) or rebuild with more samples per shard")
        shared = [f"{s.name}: {s.lanes} lanes" for s in self.sources if s.lanes % dp_size]
        if shared and dp_rank == 0:
            warnings.warn(f"data: {', '.join(shared)} for {dp_size} data-parallel ranks: the ranks share shards (each "
                          f"reads more than 1/{dp_size} of them); set data.lanes to a multiple of {dp_size} (and have "
                          f"at least that many shards per source) for disjoint shards", stacklevel=2)
        self.plan = Plan(self.sources, dp_rank, dp_size, micro_batch_size, seed)
        self.vocab_size = vocab_size
        self.num_workers = num_workers
        self.position = 0  # batches handed out so far (across epochs)
        self.identity = {"seed": seed, "dp_rank": dp_rank, "dp_size": dp_size, "micro_batch_size": micro_batch_size}
        self.stats = {"bytes_read": 0, "shards_opened": []}  # what this loader (and its workers) read
        self._live: dict[tuple, dict] = {}  # per-instance window cache

    @property
    def batches_per_epoch(self) -> int:
        """Batches per rank in one epoch of the first source (of the only one, usually)."""
        src = self.sources[0]
        return src.lanes * src.per_lane_epoch // src.batch // self.identity["dp_size"]

    @property
    def epoch(self) -> int:
        src = self.sources[0]
        return self.plan.global_index(self.position) // (src.lanes * src.per_lane_epoch // src.batch)

    def _windows(self, first: int):
        ids = _window_ids(self.plan, first)
        if self.num_workers == 0:
            return (load_window(self.sources, wid, self.vocab_size) for wid in ids)
        return iter(torch.utils.data.DataLoader(
            WindowSource(self.sources, self.vocab_size), batch_size=None, sampler=ids, num_workers=self.num_workers,
            multiprocessing_context="fork", prefetch_factor=2, persistent_workers=False,
            collate_fn=lambda x: x,
            # A DataLoader otherwise draws its workers' base seed from the global torch RNG,
            # which would shift the training dropout stream of a resumed run by one draw.
            generator=torch.Generator().manual_seed(self.identity["seed"]),
            worker_init_fn=_own_process_group,
        ))

    def __iter__(self):
        windows = self._windows(self.position)
        live = self._live
        live.clear()
        latest: dict[tuple, tuple] = {}  # (source, lane) → newest live window id
        while True:
            tokens, starts, masks = [], [], []
            for ref in self.plan.refs(self.position):
                wid, i = self.plan.window_of(*ref)
                while wid not in live:
                    win = next(windows)
                    self.stats["bytes_read"] += win["bytes"]
                    self.stats["shards_opened"] += win["opened"]
                    lane_key = (win["id"][0], win["id"][2])
                    if lane_key in latest:  # a lane's samples are used in order: its older window is done
                        live.pop(latest[lane_key], None)
                    latest[lane_key] = win["id"]
                    live[win["id"]] = win
                win = live[wid]
                tokens.append(win["tokens"][i])
                starts.append(win["doc_starts"][i])
                masks.append(win["loss_mask"][i])
            batch = {"tokens": torch.from_numpy(np.stack(tokens).astype(np.int64)),
                     "doc_starts": torch.from_numpy(np.stack(starts))}
            if self.loss_masks:
                batch["loss_mask"] = torch.from_numpy(np.stack(masks))
            self.position += 1
            yield batch

    def batch_documents(self, batches) -> list[list[list[tuple[str, int]]]]:
        """For each of this rank's batches k in `batches` (an iterable of ints): the (source name,
        document id) pieces of each of its samples, from the shards' docs.npy (empty for format-1
        shards). For measurements; reads the windows itself, in its own small cache."""
        out, cache = [], {}
        for k in batches:
            rows = []
            for ref in self.plan.refs(k):
                wid, i = self.plan.window_of(*ref)
                if wid not in cache:
                    if len(cache) >= 16:
                        cache.pop(next(iter(cache)))
                    cache[wid] = load_window(self.sources, wid, None)
                rows.append([(self.sources[wid[0]].name, int(d)) for d in cache[wid]["docs"][i]])
            out.append(rows)
        return out

    def source_tokens(self, position: int | None = None) -> dict[str, int]:
        """Tokens drawn from each source by all ranks' first `position` batches (default: so far)."""
        position = self.position if position is None else position
        samples = self.plan.source_samples(position * self.identity["dp_size"])
        tokens_per_sample = int(self.manifest["seq_len"]) + 1
        return {src.name: int(n) * tokens_per_sample for src, n in zip(self.sources, samples)}

    def mixture_metrics(self) -> dict[str, float]:
        """For the logs: tokens per source so far (all ranks), when there is more than one source."""
        if len(self.sources) == 1:
            return {}
        return {f"source_tokens/{name}": float(n) for name, n in self.source_tokens().items()}

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
