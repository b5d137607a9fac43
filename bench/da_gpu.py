"""GPU benchmark: the Triton DA backends (v2 `triton`, segment-parallel; v1 `triton_v1`) vs the chunked
torch path, softmax SDPA (causal) and flash-linear-attention's chunk_simple_gla (when importable),
forward and forward+backward.

Sweeps (default B=2, H=16, d=dv=128, bf16, causal):
  * length sweep:        N = 1k … 64k at fixed B
  * fixed-token sweep:   B·N = 65536 tokens, (B, N) = (64, 1k) … (1, 64k)
  * bh12 sweep (`--sweep bh12` or `all`): the 125M model's shape, B=1, H=12, d=64, N = 8k … 64k
    (training rows are flattened to B = 1), whatever --heads/--head-dim say

`--plan` needs no GPU: it prints, per v2 kernel and shape, the grid (programs vs the 132 SMs of an
H100), the programs one SM can hold by the compiled registers and shared memory (read from
bench/results/kernels_compile.json, written by bench/kernels_compile.py), the bytes each kernel reads
and writes and the ideal bytes — computed from the launch plan (`fluidlm.kernels.triton_v2.plan`) and
the sm_90 compiles, not measured.

Per point: median time (triton.testing.do_bench), model TFLOP/s and GB/s (formulas below, stated
in the output), and peak CUDA memory above the inputs. Each failing point (OOM, missing package)
is recorded as an error, never invented. Writes <out>.md and <out>.json with the device, torch,
triton and fla versions, the date and the exact command.

    python bench/da_gpu.py                                  # both sweeps -> bench/results/da_gpu.{md,json}
    python bench/da_gpu.py --lengths 1024,4096 --sweep length --out /tmp/da_gpu_quick
    python bench/da_gpu.py --plan                           # no GPU needed: grids and bytes, computed

FLOP model (per batch·head; C = chunk size, the causal linear attention as the kernels compute it):
  DA forward  = 2·N·(C·d + C·dv + 2·d·dv)        (intra-chunk QKᵀ and AV, inter-chunk QS and state)
  DA fwd+bwd  = 3 × forward
  SDPA causal forward = 2·N²·d (QKᵀ and PV, half masked), fwd+bwd = 3.5 × forward (FlashAttention's count)
Byte model (ideal traffic, each tensor read or written once): forward reads q, k, v, g and writes o;
fwd+bwd additionally reads q, k, v, g, o, do and writes dq, dk, dv, dg.

Exits with status 2 and a message when CUDA is not available.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys

IMPLS = ["triton", "triton_v1", "chunked", "sdpa", "fla_chunk_simple_gla"]
BH12 = dict(batch=1, heads=12, head_dim=64, lengths=[8192, 16384, 32768, 65536])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", choices=["length", "tokens", "both", "bh12", "all"], default="both",
                   help="both = length + tokens; all = length + tokens + bh12")
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768,65536", help="N for the length sweep")
    p.add_argument("--batch", type=int, default=2, help="B for the length sweep")
    p.add_argument("--tokens", type=int, default=65536, help="B·N for the fixed-token sweep")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {IMPLS}")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench measurement time, ms")
    p.add_argument("--out", default="bench/results/da_gpu", help="output prefix: writes <out>.md and <out>.json")
    p.add_argument("--plan", action="store_true",
                   help="print the v2 launch plan (grids vs SMs, bytes read/written, ideal bytes); no GPU needed")
    p.add_argument("--bidirectional", action="store_true", help="benchmark / plan causal=False (DA impls only)")
    return p.parse_args(argv)


def make_runner(impl, b, h, n, d, dtype, chunk, backward, causal=True):
    """Returns (fn, inputs-with-grad) for one point, or raises (ImportError, OOM, ...)."""
    import torch
    import torch.nn.functional as F

    from fluidlm.kernels import differential_attention

    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    if impl == "fla_chunk_simple_gla":
        from fla.ops.simple_gla import chunk_simple_gla  # ImportError -> recorded as the point's error

        # fla's layout: (B, T, H, K), log-decay (B, T, H)
        q, k, v = (torch.randn(b, n, h, d, device=dev, dtype=dtype, generator=gen) for _ in range(3))
        g = -0.1 * torch.rand(b, n, h, device=dev, generator=gen)
        ins = [q, k, v, g]

        def forward():
            return chunk_simple_gla(q, k, v, g)[0]
    else:
        q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=dtype, generator=gen) for _ in range(3))
        g = -0.1 * torch.rand(b, h, n, device=dev, generator=gen)
        ins = [q, k, v, g]
        if impl == "sdpa":
            ins = [q, k, v]

            def forward():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:

            def forward():
                return differential_attention(q, k, v, g, backend=impl, chunk_size=chunk, causal=causal)

    if not backward:
        def fn():
            with torch.no_grad():
                forward()
        return fn, ins

    for t in ins:
        t.requires_grad_(True)
    do = None

    def fn():
        nonlocal do
        o = forward()
        if do is None:
            do = torch.randn_like(o)
        o.backward(do)

    return fn, ins


def measure(impl, b, h, n, d, dtype, chunk, backward, args):
    import torch
    import triton

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    try:
        base = torch.cuda.memory_allocated()
        fn, ins = make_runner(impl, b, h, n, d, dtype, chunk, backward, causal=not args.bidirectional)
        inputs_bytes = torch.cuda.memory_allocated() - base
        fn()  # compile / warm up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - start
        ms = triton.testing.do_bench(
            fn, warmup=args.warmup, rep=args.rep, grad_to_none=ins if backward else None, return_mode="median"
        )
    except ImportError as err:
        return {"error": f"not importable ({err})"}
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of memory"}
    except Exception as err:  # record, do not abort the sweep
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"}
    finally:
        fn = ins = None
        torch.cuda.empty_cache()
    elt = torch.finfo(dtype).bits // 8
    flops, nbytes = cost_model(impl, b, h, n, d, elt, chunk, backward)
    return {
        "ms": ms,
        "tflops": flops / (ms * 1e-3) / 1e12,
        "gbps": nbytes / (ms * 1e-3) / 1e9,
        "peak_mib": peak / 2**20,
        "inputs_mib": inputs_bytes / 2**20,
        "tokens_per_s": b * n / (ms * 1e-3),
    }


def cost_model(impl, b, h, n, d, elt, chunk, backward):
    dv = d
    bh = b * h
    if impl == "sdpa":
        fwd = 2.0 * n * n * d * bh
        flops = fwd * (3.5 if backward else 1.0)
        per_tok = elt * (3 * d + dv)  # q, k, v, o
        per_tok_bwd = elt * (2 * (3 * d) + 2 * dv + 3 * d)  # q,k,v,o,do read; dq,dk,dv written
    else:
        fwd = 2.0 * n * (chunk * d + chunk * dv + 2 * d * dv) * bh
        flops = fwd * (3.0 if backward else 1.0)
        per_tok = elt * (2 * d + 2 * dv) + 4  # q, k, v, o + fp32 g
        per_tok_bwd = elt * (2 * (2 * d + dv) + 2 * dv + (2 * d + dv)) + 12
    nbytes = bh * n * (per_tok_bwd if backward else per_tok)
    return flops, nbytes


def points(args):
    """(sweep, B, N, H, d) of every point."""
    pts = []
    if args.sweep in ("length", "both", "all"):
        pts += [("length", args.batch, int(x), args.heads, args.head_dim) for x in args.lengths.split(",")]
    if args.sweep in ("tokens", "both", "all"):
        n = 1024
        while n <= args.tokens:
            pts.append(("tokens", args.tokens // n, n, args.heads, args.head_dim))
            n *= 2
    if args.sweep in ("bh12", "all"):
        pts += [("bh12", BH12["batch"], n, BH12["heads"], BH12["head_dim"]) for n in BH12["lengths"]]
    return pts


def kernel_bytes(p, b, h, n, d, dv, elt, causal=True):
    """Bytes each v2 launch reads and writes (every program's loads counted; fp32 states, summaries,
    1/(den+ε) and per-token scalars), from the plan `p` of fluidlm.kernels.triton_v2.plan."""
    t = b * n * h  # token-heads
    j, docs = p["segments"], p["n_docs"]
    nks, nvs = -(-d // p["blocks"]["BKS"]), -(-dv // p["blocks"]["BVS"])
    nk, nv = p["n_k"], p["n_v"]
    state = h * (d * dv + d) * 4  # one S and z, fp32
    dirs = 1 if causal else 2
    out = {}
    out["fwd.summary"] = (t * (d * elt * nvs + dv * elt * nks + 4 * nks * nvs), j * (state + 4 * h))
    out["fwd.combine"] = (j * (state + 4 * h) + docs * state, j * state + docs * state)
    # output pass: full q, k per V block, v block, g; writes o (+ 1/(den+ε)); bidirectional: fp32 (num, den) round trip
    extra = 0 if causal else t * (dv + 1) * 4
    out["fwd.output"] = (t * ((2 * d * elt + 4) * nv + dv * elt) + j * state + extra, t * (dv * elt + 4) + extra)
    out["bwd.prep (torch)"] = (t * 2 * dv * elt + 4 * t, 4 * t)  # dden = -(do·o)/(den+ε)
    out["bwd.summary"] = (t * (d * elt * nvs + dv * elt * nks + 12 * nks * nvs), j * (state + 4 * h))
    out["bwd.combine"] = (j * (state + 4 * h) + docs * state, j * state + docs * state)
    # dq, dk: K block of q and k, full v and do, g, 1/(den+ε), dden; dv: full q, k per V block, do block
    acc = 0 if causal else t * d * 4  # bidirectional: fp32 partial written by one pass, read by the other
    out["bwd.dq"] = (t * ((2 * dv * elt + 12) * nk + 2 * d * elt) + j * state + acc, t * (d * elt + 4 * nk) + acc)
    out["bwd.dk"] = (t * ((2 * dv * elt + 12) * nk + 2 * d * elt) + j * state + acc, t * (d * elt + 8 * nk) + acc)
    accv = 0 if causal else t * dv * 4
    out["bwd.dv"] = (t * ((2 * d * elt + 8) * nv + dv * elt) + j * state + accv, t * dv * elt + accv)
    out["bwd.dg (torch)"] = (t * 4 * (2 * nk + 2 + nk), t * 4)
    if not causal:  # the summaries, combines and passes run once per direction
        for name in ("fwd.summary", "fwd.combine", "bwd.summary", "bwd.combine"):
            r, w = out[name]
            out[name] = (r * dirs, w * dirs)
    ideal_fwd = t * ((2 * d + dv) * elt + 4 + dv * elt)
    ideal_bwd = t * ((2 * d + 2 * dv) * elt + 4 + dv * elt + (2 * d + dv) * elt + 4)
    return out, ideal_fwd, ideal_bwd


COMPILED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kernels_compile.json")
KERNEL_OF = {"fwd.summary": "_summary_kernel", "fwd.combine": "_combine_kernel", "fwd.output": "_fwd_kernel",
             "bwd.summary": "_summary_kernel", "bwd.combine": "_combine_kernel", "bwd.dq": "_dq_kernel",
             "bwd.dk": "_dk_kernel", "bwd.dv": "_dv_kernel"}


def compiled_residency(dtype: str, d: int, dv: int, path: str = COMPILED) -> dict:
    """Resident programs per SM of each v2 kernel on sm_90 from bench/kernels_compile.py's table (the
    least over the kernel's compiled variants at this dtype and head dims); {} where it has no row."""
    try:
        with open(path) as f:
            rows = json.load(f)["rows"]
    except (OSError, ValueError, KeyError):
        return {}
    out = {}
    for r in rows:
        if r["arch"] == 90 and r["dtype"] == dtype and (r["d"], r["dv"]) == (d, dv) and r["kernel"].startswith("triton_v2."):
            name = r["kernel"].split(".", 1)[1]
            out[name] = min(out.get(name, 99), r["resident"])
    return out


def print_plan(args) -> int:
    try:
        from fluidlm.kernels import triton_v2
    except Exception as err:  # triton missing: the plan needs its helpers (next_power_of_2, cdiv)
        print(f"da_gpu.py --plan: fluidlm.kernels.triton_v2 is not importable ({err})", file=sys.stderr)
        return 2
    elt = {"bf16": 2, "fp16": 2, "fp32": 4}[args.dtype]
    causal = not args.bidirectional
    sms = triton_v2.H100_SMS
    print(f"# DA v2 launch plan — computed, not measured (no GPU was used); H100: {sms} SMs; "
          f"{args.dtype}, {'causal' if causal else 'bidirectional'}, chunk {args.chunk_size}\n")
    seen = set()
    for _, b, n, h, d in points(args):
        if (b, n, h, d) in seen:
            continue
        seen.add((b, n, h, d))
        p = triton_v2.plan(b, h, n, d, d, chunk_size=args.chunk_size, causal=causal)
        by, ideal_f, ideal_b = kernel_bytes(p, b, h, n, d, d, elt, causal)
        print(f"## B={b} H={h} N={n} d=dv={d}: segments P={p['segments']} of {p['segment_len']} tokens "
              f"({p['segment_chunks']} chunks of {p['blocks']['BT']}), summaries {p['segments'] * h * (d * d + d) * 4 / 2**20:.1f} MiB per direction")
        resident = compiled_residency(args.dtype, d, d)
        print("| kernel | grid | programs | programs/SM | resident/SM (compiled) | read MiB | written MiB |")
        print("|---|---|---|---|---|---|---|")
        tot = {"fwd": [0, 0], "bwd": [0, 0]}
        for name, (g0, g1, g2, launches) in p["launches"].items():
            progs = g0 * g1 * g2
            r, w = by[name]
            tot[name[:3]][0] += r
            tot[name[:3]][1] += w
            res = resident.get(KERNEL_OF[name], "–")
            print(f"| {name} ×{launches} | ({g0}, {g1}, {g2}) | {progs} | {progs / sms:.1f} | {res} | {r / 2**20:.1f} | {w / 2**20:.1f} |")
        for name in ("bwd.prep (torch)", "bwd.dg (torch)"):
            r, w = by[name]
            tot["bwd"][0] += r
            tot["bwd"][1] += w
            print(f"| {name} | – | – | – | – | {r / 2**20:.1f} | {w / 2**20:.1f} |")
        v1 = -(-d // 64) * b * h
        print(f"| v1 (triton_v1), every kernel | ({b * h}, {-(-d // 64)}) | {v1} | {v1 / sms:.2f} | – | – | – |")
        for key, ideal in (("fwd", ideal_f), ("bwd", ideal_b)):
            r, w = tot[key]
            print(f"\n{key}: {(r + w) / 2**20:.1f} MiB moved vs {ideal / 2**20:.1f} MiB ideal "
                  f"(each input read once, each output written once): {(r + w) / ideal:.2f}×", end="")
        print("\n")
    return 0


def to_markdown(meta, rows, impls):
    lines = [
        f"# DA GPU benchmark — {meta['device']}",
        "",
        f"date {meta['date']}; torch {meta['torch']}; triton {meta['triton']}; fla {meta['fla']}; "
        f"H={meta['heads']} d=dv={meta['head_dim']} {meta['dtype']} causal, chunk {meta['chunk_size']}",
        "",
        f"command: `{meta['command']}`",
        "",
        "Model FLOP/s and ideal-traffic GB/s as defined in bench/da_gpu.py's docstring. "
        "peak = CUDA memory above the inputs during one call.",
        "",
    ]
    for sweep in ("length", "tokens", "bh12"):
        for mode in ("forward", "forward+backward"):
            sel = [r for r in rows if r["sweep"] == sweep and r["mode"] == mode]
            if not sel:
                continue
            title = {"length": f"B={meta['batch']}, N sweep", "tokens": f"fixed B·N = {meta['tokens']}",
                     "bh12": "B=1, H=12, d=64 (the 125M model's shape)"}[sweep]
            lines += [f"## {mode}, {title}", ""]
            lines.append("| B | N | " + " | ".join(f"{i} ms | {i} TFLOP/s | {i} GB/s | {i} peak MiB" for i in impls) + " |")
            lines.append("|---|---|" + "---|" * (4 * len(impls)))
            keys = sorted({(r["b"], r["n"]) for r in sel}, key=lambda x: x[1])
            for b, n in keys:
                cells = []
                for impl in impls:
                    r = next((x for x in sel if x["b"] == b and x["n"] == n and x["impl"] == impl), None)
                    if r is None or "ms" not in r:
                        cells += [r["error"] if r else "-", "-", "-", "-"]
                    else:
                        cells += [f"{r['ms']:.3f}", f"{r['tflops']:.1f}", f"{r['gbps']:.0f}", f"{r['peak_mib']:.0f}"]
                lines.append(f"| {b} | {n} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.plan:
        return print_plan(args)
    try:
        import torch
    except ImportError:
        print("da_gpu.py: torch is not importable", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("da_gpu.py: CUDA is not available; this benchmark only runs on a GPU "
              "(use bench/da_cpu.py on a CPU).", file=sys.stderr)
        return 2
    try:
        import triton
    except ImportError:
        print("da_gpu.py: triton is not importable; the triton backend cannot be benchmarked.", file=sys.stderr)
        return 2
    try:
        import fla

        fla_version = getattr(fla, "__version__", "unknown")
    except Exception:
        fla_version = "not installed"

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    unknown = set(impls) - set(IMPLS)
    if unknown:
        print(f"da_gpu.py: unknown --impls {sorted(unknown)}; choose from {IMPLS}", file=sys.stderr)
        return 2
    meta = {
        "device": torch.cuda.get_device_name(0),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "fla": fla_version,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([os.path.basename(sys.executable)] + sys.argv),
        "heads": args.heads,
        "head_dim": args.head_dim,
        "dtype": args.dtype,
        "chunk_size": args.chunk_size,
        "batch": args.batch,
        "tokens": args.tokens,
        "flop_model": "DA fwd 2N(Cd+Cdv+2d·dv)·BH, fwd+bwd 3x; SDPA causal fwd 2N²d·BH, fwd+bwd 3.5x",
    }
    rows = []
    for sweep, b, n, heads, head_dim in points(args):
        for backward in (False, True):
            mode = "forward+backward" if backward else "forward"
            for impl in impls:
                if args.bidirectional and impl in ("sdpa", "fla_chunk_simple_gla"):
                    r = {"error": "causal only"}
                else:
                    r = measure(impl, b, heads, n, head_dim, dtype, args.chunk_size, backward, args)
                row = {"sweep": sweep, "mode": mode, "impl": impl, "b": b, "n": n, "h": heads, "d": head_dim, **r}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    md = to_markdown(meta, rows, impls)
    with open(args.out + ".md", "w") as f:
        f.write(md + "\n")
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "args": vars(args), "results": rows}, f, indent=2)
    print(md)
    print(f"\nwrote {args.out}.md and {args.out}.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
