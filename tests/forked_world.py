"""A gloo world of forked processes for tests that compare a distributed computation with one process.

`run_forked(target, world)` forks `world` processes, initialises gloo in each (file rendezvous), runs
`target(rank, world)` → dict, and returns {rank: dict}. A traceback in any rank fails the caller with
that traceback; a rank that never reports fails it after `timeout` seconds (no hang)."""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist


def _child(target, rank, world, init_file, queue):
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=90))
        results = target(rank, world)
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - reported to the parent
        results = {"error": traceback.format_exc()}
    queue.put((rank, results))


def run_forked(target, world: int, timeout: float = 240) -> dict[int, dict]:
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_child, args=(target, r, world, init_file, queue)) for r in range(world)]
        for p in procs:
            p.start()
        try:
            per_rank = dict(queue.get(timeout=timeout) for _ in procs)
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    errors = [r["error"] for r in per_rank.values() if "error" in r]
    assert not errors, errors[0]
    return per_rank
