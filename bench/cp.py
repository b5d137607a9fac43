"""CPU/gloo benchmark of context-parallel Differential Attention (fluidlm.parallel.context).

For CP = 1, 2, 4 (one process per CP rank, gloo, --threads torch threads each) and each total sequence
length N: the time of one DA forward+backward over the whole sequence (median of --repeats after one
warm-up; the slowest rank's time) and the bytes each rank receives through the CP collectives per step
(the all-gather of the (A, U, U') summaries forward, the all-reduce of their gradient backward). For
scale, the last column is what a rank would receive if it all-gathered the other shards' K and V
instead (softmax-style context parallelism): it grows with N, the summaries do not.

    python bench/cp.py                                   # N = 4k, 16k, 64k total; B=1 H=2 d=dv=16
    python bench/cp.py --lengths 4096,65536 --causal --md bench/results/cp_cpu.md --json bench/results/cp_cpu.json

On a machine with fewer cores than CP ranks the ranks share cores, so CP>1 times there show the
overhead and contention, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _worker(rank, world, init_file, args, queue):
    import torch
    import torch.distributed as dist

    from fluidlm.parallel import context as cp

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    rows = []
    for n in args.lengths:
        n_loc = n // world
        gen = torch.Generator().manual_seed(rank)
        b, h, d, dv = 1, args.heads, args.head_dim, args.head_dim
        q, k = (torch.randn(b, h, n_loc, d, generator=gen).requires_grad_() for _ in range(2))
        v = torch.randn(b, h, n_loc, dv, generator=gen).requires_grad_()
        g = (-0.01 * torch.rand(b, h, n_loc, generator=gen)).requires_grad_()
        times = []
        for i in range(args.repeats + 1):
            for t in (q, k, v, g):
                t.grad = None
            cp.comm_stats.reset()
            dist.barrier()
            t0 = time.perf_counter()
            o = cp.cp_differential_attention(q, k, v, g, causal=args.causal, chunk_size=args.chunk)
            o.sum().backward()
            elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if i:
                times.append(elapsed.item())
        kv_bytes = (world - 1) * n_loc * b * h * (d + dv) * 4
        rows.append({"cp": world, "n": n, "n_local": n_loc, "time_s": statistics.median(times),
                     "gathered_bytes": cp.comm_stats.gathered_bytes, "reduced_bytes": cp.comm_stats.reduced_bytes,
                     "bytes_per_step": cp.comm_stats.gathered_bytes + cp.comm_stats.reduced_bytes,
                     "kv_allgather_bytes": kv_bytes})
        if rank == 0:
            print(f"  measured CP={world} N={n}: {rows[-1]}", file=sys.stderr, flush=True)
    dist.destroy_process_group()
    if rank == 0:
        queue.put(rows)


def run_world(world, args):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_worker, args=(r, world, init, args, queue)) for r in range(world)]
        for p in procs:
            p.start()
        rows = queue.get(timeout=args.timeout)
        for p in procs:
            p.join()
    return rows


def fmt_bytes(x):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if x < 1024 or unit == "GiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="4096,16384,65536", help="comma-separated total N (multiples of 4)")
    p.add_argument("--cp", default="1,2,4", help="comma-separated CP sizes")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--causal", action="store_true", help="causal only (default: bidirectional, both combines)")
    p.add_argument("--timeout", type=int, default=1200)
    p.add_argument("--json")
    p.add_argument("--md")
    p.add_argument("--machine-note", default="", help="free text about the machine, written into the outputs")
    args = p.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",")]
    sizes = [int(x) for x in args.cp.split(",")]

    rows = [r for world in sizes for r in run_world(world, args)]
    base = {r["n"]: r["time_s"] for r in rows if r["cp"] == 1}
    mode = "causal" if args.causal else "bidirectional"
    title = (f"CP Differential Attention, forward+backward ({mode}), B=1 H={args.heads} d=dv={args.head_dim}, "
             f"chunk {args.chunk}, fp32, gloo, {args.threads} thread(s) per rank, {os.cpu_count()} CPUs visible, "
             f"torch {__import__('torch').__version__}")
    header = ("| CP | N total | N per rank | time ms | vs CP=1 | bytes/rank/step (summaries) | "
              "K,V all-gather would be |")
    lines = [title, "", header, "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['time_s'] / base[r['n']]:.2f}" if r["n"] in base else "-"
        lines.append(f"| {r['cp']} | {r['n']} | {r['n_local']} | {1000 * r['time_s']:.1f} | {ratio} | "
                     f"{fmt_bytes(r['bytes_per_step'])} | {fmt_bytes(r['kv_allgather_bytes'])} |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.md:
        note = f"\n\nMachine: {args.machine_note}\n" if args.machine_note else "\n"
        Path(args.md).write_text(
            f"# Context-parallel DA on CPU/gloo\n\nCommand: `{shlex.join(['python', *sys.argv])}` "
            f"({time.strftime('%Y-%m-%d')}, {platform.platform()})\n\n{table}{note}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"title": title, "args": vars(args), "command": shlex.join(sys.argv),
                                               "date": time.strftime("%Y-%m-%d"), "machine": platform.platform(),
                                               "machine_note": args.machine_note, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
