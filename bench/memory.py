"""Peak memory and time of one full training step (forward, backward, AdamW step) vs context length.

Every point runs in a fresh subprocess: a warm-up step at a short length allocates the weights,
gradients and optimizer state; the point then records the resident memory before its step and
the process's peak RSS after it (CPU), or torch.cuda.max_memory_allocated (GPU). Their
difference is the step's *activation* memory. On the CPU each point runs with glibc's
MALLOC_MMAP_THRESHOLD_=65536, so freed tensors go back to the OS and RSS tracks live tensors
(with glibc's default, dynamic threshold the heap keeps freed blocks and RSS under-reports growth;
measured: activation ratio 16k/64k 0.40 by default vs 0.25 with the fixed threshold). That makes
every allocation an mmap, so CPU step times here are slower than in training. Prints a table and the fitted log-log slope of
activation memory and time vs context length; writes JSON and a PNG plot to bench/results/.

    python bench/memory.py                                  # tiny model, 4k … 128k, DA ckpt off/on + softmax
    python bench/memory.py --lengths 4096,16384 --softmax-max 8192
    python bench/memory.py --point --seq-len 65536 --checkpointing   # one point, JSON on stdout
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# The tiny model of configs/long-64k-cpu.yaml: small enough for 64k tokens on 2 CPU cores.
TINY_MODEL = dict(vocab_size=4096, d_model=128, n_layers=2, n_heads=4, head_dim=32, max_seq_len=131072)


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def run_point(args) -> dict:
    """One training step at args.seq_len in this process; returns the measurements."""
    import resource

    import torch

    from fluidlm.model import FluidLM, ModelConfig

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    config = ModelConfig(**{**TINY_MODEL, **json.loads(args.model)}, attention=args.attention)
    model = FluidLM(config).to(args.device)
    model.activation_checkpointing = args.checkpointing
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    dtype = torch.bfloat16 if cuda else torch.float32

    def step(n):
        tokens = torch.randint(0, config.vocab_size, (1, n + 1), device=args.device)
        with torch.autocast(args.device, dtype=dtype, enabled=cuda):
            loss = model.loss(tokens[:, :-1], tokens[:, 1:], chunk_tokens=args.loss_chunk)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    step(256)  # weights, grads and AdamW state now exist
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = current_rss_mib()
    t0 = time.perf_counter()
    loss = step(args.seq_len)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seq_len": args.seq_len, "attention": args.attention, "checkpointing": args.checkpointing,
            "time_s": seconds, "tokens_per_s": args.seq_len / seconds, "peak_mib": peak,
            "activation_mib": peak - before, "loss": loss, "params": model.num_parameters()}


def measure(args, seq_len, attention, checkpointing) -> dict:
    cmd = [sys.executable, __file__, "--point", "--seq-len", str(seq_len), "--attention", attention,
           "--device", args.device, "--threads", str(args.threads), "--model", args.model,
           "--loss-chunk", str(args.loss_chunk)] + (["--checkpointing"] if checkpointing else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=point_env())
    except subprocess.TimeoutExpired:
        return {"seq_len": seq_len, "error": f"timeout > {args.timeout}s"}
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or [f"exit {out.returncode} (killed: out of memory?)"])[-1]
        return {"seq_len": seq_len, "error": tail[:80]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def point_env() -> dict:
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def slope(points, key):
    pts = [(math.log(p["seq_len"]), math.log(p[key])) for p in points if key in p and p[key] > 0]
    if len(pts) < 2:
        return float("nan")
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="4096,8192,16384,32768,65536,131072")
    p.add_argument("--softmax-max", type=int, default=16384, help="longest context for the softmax baseline")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default="{}", help="JSON overrides of the tiny model config")
    p.add_argument("--loss-chunk", type=int, default=8192, help="tokens per cross-entropy chunk")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per point")
    p.add_argument("--out", default=str(RESULTS / "memory"), help="prefix of the .json/.md/.png outputs")
    p.add_argument("--point", action="store_true", help="(internal) run one point, print JSON")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--attention", default="da", choices=["da", "softmax"])
    p.add_argument("--checkpointing", action="store_true")
    args = p.parse_args()
    if args.point:
        print(json.dumps(run_point(args)))
        return

    lengths = [int(x) for x in args.lengths.split(",")]
    series = {"da": (("da", False), ("da", True)), "softmax": (("softmax", False), ("softmax", True))}
    rows = {}
    for key in [s for group in series.values() for s in group]:
        attention, ckpt = key
        rows[key] = []
        for n in lengths:
            if attention == "softmax" and n > args.softmax_max:
                continue
            r = measure(args, n, attention, ckpt)
            rows[key].append(r)
            print(f"  {attention:>7} ckpt={ckpt!s:5} N={n:>6}: {r}", file=sys.stderr, flush=True)

    import torch
    title = (f"One training step, {args.device}, model {json.dumps({**TINY_MODEL, **json.loads(args.model)})}, "
             f"torch {torch.__version__}, {platform.machine()}, {time.strftime('%Y-%m-%d')}")
    lines = [title, "", "| attention | act. ckpt | N | step s | tokens/s | peak MiB | activation MiB |",
             "|---|---|---|---|---|---|---|"]
    for (attention, ckpt), pts in rows.items():
        for r in pts:
            if "error" in r:
                lines.append(f"| {attention} | {ckpt} | {r['seq_len']} | {r['error']} | | | |")
            else:
                lines.append(f"| {attention} | {ckpt} | {r['seq_len']} | {r['time_s']:.2f} | {r['tokens_per_s']:.0f} "
                             f"| {r['peak_mib']:.0f} | {r['activation_mib']:.0f} |")
    lines += ["", "log-log slope vs N (1 = linear, 2 = quadratic):", "", "| attention | act. ckpt | memory | time |", "|---|---|---|---|"]
    for (attention, ckpt), pts in rows.items():
        lines.append(f"| {attention} | {ckpt} | {slope(pts, 'activation_mib'):.2f} | {slope(pts, 'time_s'):.2f} |")
    lines += ["", f"command: {' '.join(sys.argv)}"]
    text = "\n".join(lines)
    print(text)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        {"title": title, "command": " ".join(sys.argv), "points": [r for pts in rows.values() for r in pts]}, indent=2))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (attention, ckpt), pts in rows.items():
        ok = [r for r in pts if "error" not in r]
        if ok:
            label = f"{attention}{' + act. ckpt' if ckpt else ''}"
            axes[0].loglog([r["seq_len"] for r in ok], [r["activation_mib"] for r in ok], "o-", label=label)
            axes[1].loglog([r["seq_len"] for r in ok], [r["time_s"] for r in ok], "o-", label=label)
    axes[0].set(xlabel="context length (tokens)", ylabel="activation memory (MiB)", title="memory of one training step")
    axes[1].set(xlabel="context length (tokens)", ylabel="seconds", title="time of one training step")
    for ax in axes:
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
