"""CPU benchmark: chunked Differential Attention vs its naive O(N²) form vs softmax SDPA (causal).

Each (implementation, N) point runs in a fresh subprocess so its peak RSS is its own; time is the
median of --repeats forward passes after one warm-up. Prints a table, side by side in one run,
and the fitted log-log slope of time vs N per implementation (1 = linear, 2 = quadratic).

    python bench/da_cpu.py                       # N = 1k … 32k, B=1, H=4, d=64
    python bench/da_cpu.py --backward            # forward + backward
    python bench/da_cpu.py --json bench/results/da_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time

WORKER = r"""
import json, resource, statistics, sys, time
import torch
import torch.nn.functional as F
from fluidlm.kernels import differential_attention

impl, n, b, h, d, repeats, backward, threads = sys.argv[1:9]
n, b, h, d, repeats, threads = map(int, (n, b, h, d, repeats, threads))
backward = backward == "1"
torch.set_num_threads(threads)
torch.manual_seed(0)
base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
q, k, v = (torch.randn(b, h, n, d, requires_grad=backward) for _ in range(3))
g = (-0.1 * torch.rand(b, h, n)).requires_grad_(backward)

def step():
    if impl == "softmax_sdpa":
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        o = differential_attention(q, k, v, g, backend=impl)
    if backward:
        o.sum().backward()
    return o

times = []
for i in range(repeats + 1):
    t0 = time.perf_counter()
    step()
    if i:
        times.append(time.perf_counter() - t0)
peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
print(json.dumps({"time_s": statistics.median(times), "peak_mib": peak}))
"""

IMPLS = ["chunked", "naive", "softmax_sdpa"]


def run_point(impl, n, args):
    cmd = [sys.executable, "-c", WORKER, impl, str(n), str(args.batch), str(args.heads), str(args.head_dim),
           str(args.repeats), "1" if args.backward else "0", str(args.threads)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout > {args.timeout}s"}
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["killed"])[-1]
        return {"error": f"failed ({last[:60]})"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def loglog_slope(points):
    xs = [math.log(n) for n, r in points if "time_s" in r]
    ys = [math.log(r["time_s"]) for n, r in points if "time_s" in r]
    if len(xs) < 2:
        return float("nan")
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768", help="comma-separated N")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads per point")
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument("--naive-max", type=int, default=8192, help="largest N for the O(N²) naive form (memory)")
    p.add_argument("--timeout", type=int, default=600, help="seconds per point")
    p.add_argument("--json", help="also write results here")
    args = p.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]

    results = {impl: [] for impl in IMPLS}
    for n in lengths:
        for impl in IMPLS:
            if impl == "naive" and n > args.naive_max:
                r = {"error": f"skipped (N > --naive-max {args.naive_max})"}
            else:
                r = run_point(impl, n, args)
            results[impl].append((n, r))
            print(f"  measured {impl:>12} N={n:>6}: {r}", file=sys.stderr, flush=True)

    mode = "forward+backward" if args.backward else "forward"
    print(f"\nDA CPU benchmark ({mode}), B={args.batch} H={args.heads} d={args.head_dim}, "
          f"{args.threads} threads, {platform.processor() or platform.machine()}, torch {__import__('torch').__version__}")
    header = "| N | " + " | ".join(f"{i} ms | {i} MiB" for i in IMPLS) + " | chunked / sdpa time |"
    print(header)
    print("|" + "---|" * (2 * len(IMPLS) + 2))
    for row in range(len(lengths)):
        cells = []
        for impl in IMPLS:
            r = results[impl][row][1]
            cells += [f"{1000 * r['time_s']:.1f}", f"{r['peak_mib']:.0f}"] if "time_s" in r else [r["error"], "-"]
        c, s = results["chunked"][row][1], results["softmax_sdpa"][row][1]
        ratio = f"{c['time_s'] / s['time_s']:.2f}" if "time_s" in c and "time_s" in s else "-"
        print(f"| {lengths[row]} | " + " | ".join(cells) + f" | {ratio} |")
    print("\nlog-log slope of time vs N (1 = linear, 2 = quadratic):")
    slopes = {impl: loglog_slope(results[impl]) for impl in IMPLS}
    for impl, s in slopes.items():
        print(f"  {impl:>12}: {s:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mode": mode, "args": vars(args), "command": " ".join(sys.argv),
                       "date": time.strftime("%Y-%m-%d"), "machine": platform.platform(),
                       "results": {i: [{"n": n, **r} for n, r in rs] for i, rs in results.items()},
                       "slopes": slopes}, f, indent=2)


if __name__ == "__main__":
    main()
