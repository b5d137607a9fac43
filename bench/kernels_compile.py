"""Compile every Triton DA launch for real GPU targets on a CPU machine, and check that it would run.

The real host code of both Triton backends (`fluidlm.kernels.triton_v2`, backend "triton", and
`triton_da`, "triton_v1") runs on CPU tensors for every shape, dtype and option the GPU tests and the
shipped configs use (SCENARIOS below); each kernel launch is intercepted and, instead of running,
specialised exactly as Triton's JIT would for the target (same binder: argument types, divisibility,
constexprs, options) and compiled with `triton.compile` for sm_90 (H100/H200) and sm_80 (A100) —
sm_100 with `--arch 100` (the wheel's ptxas-blackwell). No GPU and no driver are needed.

Per distinct compiled kernel it records registers, shared memory, stack and spills (ptxas -v), whether
its dots reach tensor cores (`warp_group_dot`, i.e. wgmma, on sm_90; `mma` on sm_80), compile time,
and the resident programs per SM those resources allow. It fails (exit 1) on:
  * a compile error,
  * shared memory over the arch's per-block limit,
  * spills in a bf16/fp16 kernel with head dims ≤ 128 (d = 256 is reported, not failed),
  * a kernel with dots that is not on tensor cores (any dtype: fp32 runs 3xTF32),
  * fewer than 2 resident programs per SM for a bf16/fp16 kernel at head dims ≤ 128 (sm_90),
  * a grid over CUDA's limits (dim 0 < 2³¹, dims 1 and 2 ≤ 65,535).
It writes the table to <out>.md and <out>.json (`bench/da_gpu.py --plan` reads the occupancy there).

    python bench/kernels_compile.py                              # sm_90 + sm_80, every scenario
    python bench/kernels_compile.py --arch 90 --only bf16-d64    # a subset (scenario names contain it)
    python bench/kernels_compile.py --list                       # the scenarios

Results are cached per kernel (key: Triton version, arch, kernel source, specialisation) in
~/.cache/fluidlm/kernels_compile, so a rerun after a one-kernel change recompiles only that kernel.
Must run in a process where TRITON_INTERPRET is unset (it is removed from the environment here).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import hashlib
import io
import json
import multiprocessing
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Per-arch limits (CUDA C Programming Guide, compute capabilities table)
LIMITS = {
    80: dict(name="A100", smem_block=166912, smem_sm=167936, regs_sm=65536, max_blocks=32, max_warps=64),
    90: dict(name="H100/H200", smem_block=232448, smem_sm=233472, regs_sm=65536, max_blocks=32, max_warps=64),
    100: dict(name="B200", smem_block=232448, smem_sm=233472, regs_sm=65536, max_blocks=32, max_warps=64),
}
GRID_LIMITS = (2**31 - 1, 65535, 65535)

# (name, backend, B, H, N, d, dv, dtype, causal, cu_seqlens, initial_state, final_state, backward)
# Where the shapes come from: tests/test_triton_kernels.py (-m gpu), bench/da_gpu.py defaults and the
# shipped configs (configs/da-*.yaml: head dim 64, bf16 on CUDA; tiny-cpu: head dim 32).
SCENARIOS = [
    ("bf16-d64-causal", "triton", 1, 2, 4096, 64, 64, "bf16", True, None, False, False, True),
    ("bf16-d64-bidir", "triton", 1, 2, 4096, 64, 64, "bf16", False, None, False, False, True),
    ("bf16-d64-cp-shard", "triton", 2, 3, 5000, 64, 64, "bf16", True, [0, 1, 2000, 5000, 5001, 9000, 10000], True, True, True),
    ("bf16-d64-125m-row", "triton", 1, 12, 8192, 64, 64, "bf16", True, [0, 3000, 8192], False, False, True),
    ("fp16-d64-causal", "triton", 1, 2, 4096, 64, 64, "fp16", True, None, False, False, True),
    ("fp32-d64-causal", "triton", 1, 2, 1000, 64, 64, "fp32", True, None, False, False, True),
    ("fp32-d64-bidir", "triton", 1, 2, 1000, 64, 64, "fp32", False, None, False, False, True),
    ("fp32-d64-state", "triton", 2, 3, 5000, 64, 64, "fp32", True, [0, 1, 2000, 5000, 5001, 9000, 10000], True, True, True),
    ("bf16-d32-causal", "triton", 1, 6, 4096, 32, 32, "bf16", True, None, False, False, True),
    ("fp32-d16-docs", "triton", 1, 3, 3000, 16, 16, "fp32", True, [0, 1, 700, 701, 2999, 3000], False, False, True),
    ("bf16-d16-bidir-docs", "triton", 1, 3, 3000, 16, 16, "bf16", False, [0, 1000, 3000], False, False, True),
    ("fp32-d32x48-docs", "triton", 1, 3, 3000, 32, 48, "fp32", True, [0, 1, 700, 701, 2999, 3000], False, False, True),
    ("bf16-d32x48-bidir-docs", "triton", 1, 3, 3000, 32, 48, "bf16", False, [0, 1000, 3000], False, False, True),
    ("fp32-d128-docs", "triton", 1, 3, 3000, 128, 128, "fp32", True, [0, 1, 700, 701, 2999, 3000], False, False, True),
    ("bf16-d128-causal", "triton", 1, 4, 4096, 128, 128, "bf16", True, None, False, False, True),
    ("bf16-d128-bidir-docs", "triton", 1, 3, 3000, 128, 128, "bf16", False, [0, 1000, 3000], False, False, True),
    ("bf16-d128-int32-offsets", "triton", 1, 129, 131072, 128, 128, "bf16", True, None, False, False, False),
    ("fp32-d256-docs", "triton", 1, 3, 3000, 256, 256, "fp32", True, [0, 1, 700, 701, 2999, 3000], False, False, True),
    ("bf16-d256-bidir-docs", "triton", 1, 3, 3000, 256, 256, "bf16", False, [0, 1000, 3000], False, False, True),
    ("v1-bf16-d128-causal", "triton_v1", 1, 4, 4096, 128, 128, "bf16", True, None, False, False, True),
    ("v1-bf16-d128-bidir", "triton_v1", 1, 4, 4096, 128, 128, "bf16", False, None, False, False, True),
    ("v1-bf16-d64-docs-wide-grid", "triton_v1", 1, 2, 300, 64, 64, "bf16", True, [0, 100, 300], False, False, True),
]
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="90,80", help="comma-separated compute capabilities: 80, 90, 100")
    p.add_argument("--only", default="", help="comma-separated substrings: keep the scenarios whose name has one")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "kernels_compile"),
                   help="output prefix: <out>.md and <out>.json ('' writes nothing)")
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/fluidlm/kernels_compile"),
                   help="per-kernel result cache ('' disables it)")
    p.add_argument("--baseline", default=os.path.join(ROOT, "bench", "results", "kernels_compile.json"),
                   help="a previous table: spills and residency no worse than it records for the same kernel are "
                        "'known' (listed, not failing); compile errors, shared memory, tensor cores and grids always "
                        "fail ('' makes every finding fail)")
    p.add_argument("--list", action="store_true", help="print the scenarios and exit")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# Capture: the real host code, each launch specialised for the target instead of run


def _kernels(module):
    import triton

    return {name: fn for name, fn in vars(module).items()
            if isinstance(fn, triton.runtime.jit.JITFunction) and name.endswith("_kernel")}


@contextlib.contextmanager
def capture_launches(arch: int, records: list):
    """While active, every launch of a triton_v2 / triton_da kernel appends (module, kernel, grid,
    signature, constexprs, attrs, options) to `records` and returns without running."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from fluidlm.kernels import triton_da, triton_v2

    backend = make_backend(GPUTarget("cuda", arch, 32))
    patched = []
    for module in (triton_v2, triton_da):
        patched.append((module, "_check_device", module._check_device))
        module._check_device = lambda t: None
        for name, kern in _kernels(module).items():
            binder = create_function_from_signature(kern.signature, kern.params, backend)

            def run(*args, grid, warmup, _k=kern, _b=binder, _m=module.__name__, _n=name, **kwargs):
                bound, spec, options = _b(*args, **kwargs)
                options, signature, constexprs, attrs = _k._pack_args(backend, kwargs, bound, spec, options)
                grid = tuple(int(x) for x in (grid(bound) if callable(grid) else grid))
                named = {_k.params[path[0]].name: val for path, val in constexprs.items()}
                records.append(dict(module=_m, kernel=_n, grid=grid + (1,) * (3 - len(grid)), signature=signature,
                                    constexprs=constexprs, named=named, attrs=attrs, options=options.__dict__))

            patched.append((kern, "run", None))
            kern.run = run
    try:
        yield
    finally:
        for obj, attr, old in reversed(patched):
            if old is None:
                del obj.__dict__[attr]
            else:
                setattr(obj, attr, old)


def run_scenario(scn) -> None:
    """One forward (+ backward) of the scenario through the backend's real host code."""
    import torch

    from fluidlm.kernels import DAState, triton_da, triton_v2

    name, backend, b, h, n, d, dv, dtype, causal, cu, init, final, backward = scn
    dt = getattr(torch, DTYPES[dtype])
    # values do not matter (nothing runs): empty tensors cost no memory at the 131k × 129-head shape
    q, k = (torch.empty(b, h, n, d, dtype=dt, requires_grad=backward) for _ in range(2))
    v = torch.empty(b, h, n, dv, dtype=dt, requires_grad=backward)
    g = torch.full((b, h, n), -0.1, requires_grad=backward)
    cu_seqlens = None if cu is None else torch.tensor(cu)
    kw = dict(causal=causal, feature_map="sigmoid", eps=1e-6, cu_seqlens=cu_seqlens)
    if backend == "triton_v1":
        out = triton_da.triton_differential_attention(q, k, v, g, **kw)
        loss = out.float().sum()
    else:
        r = b if cu is None else len(cu) - 1
        state = DAState(torch.zeros(r, h, d, dv), torch.zeros(r, h, d)) if init else None
        out, fin = triton_v2.triton_differential_attention(q, k, v, g, initial_state=state, output_final_state=final, **kw)
        loss = out.float().sum() + (fin.S.sum() + fin.z.sum() if final else 0)
    if backward:
        loss.backward()


# ------------------------------------------------------------------------------------------------
# Compile (in worker processes) and measure


def _key(rec, arch) -> str:
    import triton

    from fluidlm.kernels import triton_da, triton_v2

    module = {"fluidlm.kernels.triton_v2": triton_v2, "fluidlm.kernels.triton_da": triton_da}[rec["module"]]
    src = _kernels(module)[rec["kernel"]].cache_key  # hash of the kernel's source and its callees
    spec = json.dumps([rec["signature"], sorted(map(str, rec["constexprs"].items())),
                       sorted(map(str, rec["attrs"].items())), sorted(map(str, rec["options"].items()))])
    return hashlib.sha256(f"{triton.__version__}|{arch}|{rec['module']}.{rec['kernel']}|{src}|{spec}".encode()).hexdigest()[:24]


def compile_one(job):
    """Compile one specialised kernel for `arch`; returns its measured resources (or its error)."""
    rec, arch = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fluidlm.kernels import triton_da, triton_v2

    module = {"fluidlm.kernels.triton_v2": triton_v2, "fluidlm.kernels.triton_da": triton_da}[rec["module"]]
    fn = _kernels(module)[rec["kernel"]]
    triton.knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as cache, contextlib.redirect_stdout(log):
            triton.knobs.cache.dir = cache  # a fresh Triton cache: ptxas runs, so its -v log is seen
            ck = triton.compile(ASTSource(fn, rec["signature"], rec["constexprs"], rec["attrs"]),
                                target=GPUTarget("cuda", arch, 32), options=rec["options"])
    except Exception as err:  # noqa: BLE001  (recorded: a compile error is a finding)
        return dict(error=f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}",
                    compile_s=time.perf_counter() - t0)
    secs = time.perf_counter() - t0
    text = log.getvalue()
    spill_st = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", text))
    spill_ld = sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", text))
    stack = max([int(x) for x in re.findall(r"(\d+) bytes stack frame", text)] or [0])
    regs = max([int(x) for x in re.findall(r"Used (\d+) registers", text)] or [0])
    ttgir = ck.asm["ttgir"]
    return dict(regs=regs, shared=int(ck.metadata.shared), stack=stack, spill_stores=spill_st, spill_loads=spill_ld,
                wgmma="warp_group_dot" in ttgir, mma="#mma" in ttgir, dots="dot" in ttgir.replace("dot_op", ""),
                compile_s=secs)


def resident_programs(res, warps, arch) -> int:
    """Programs per SM the compiled registers and shared memory allow (warp-granular register
    allocation in units of 256 registers; 1 KiB of shared memory reserved per block)."""
    lim = LIMITS[arch]
    regs_warp = -(-max(res["regs"], 1) * 32 // 256) * 256
    by_regs = lim["regs_sm"] // (regs_warp * warps)
    by_smem = lim["smem_sm"] // (res["shared"] + 1024)
    return min(by_regs, by_smem, lim["max_blocks"], lim["max_warps"] // warps)


# ------------------------------------------------------------------------------------------------
# The run


def collect(scenarios, arch):
    """Run every scenario under capture; returns the distinct launches with the scenarios using them."""
    import torch

    from fluidlm.kernels import triton_v2

    distinct = {}
    for scn in scenarios:
        records = []
        with capture_launches(arch, records), torch.no_grad() if not scn[-1] else contextlib.nullcontext():
            run_scenario(scn)
        for rec in records:
            key = _key(rec, arch)
            entry = distinct.setdefault(key, dict(rec=rec, scenarios=[], grids=[]))
            if scn[0] not in entry["scenarios"]:
                entry["scenarios"].append(scn[0])
            entry["grids"].append(rec["grid"])
            # a kernel can serve several head dims (same tiles): it is checked at the smallest, the strictest
            if "dims" not in entry or max(scn[5:7]) < max(entry["dims"][:2]):
                entry["dims"] = scn[5:8]
    del triton_v2
    return distinct


def check(entry, arch) -> list[str]:
    res, rec = entry["res"], entry["rec"]
    d, dv, dtype = entry["dims"]
    lim = LIMITS[arch]
    bad = []
    if "error" in res:
        return [f"compile error: {res['error']}"]
    if res["shared"] > lim["smem_block"]:
        bad.append(f"shared {res['shared']} B > {lim['smem_block']} B")
    half = dtype in ("bf16", "fp16")
    if half and max(d, dv) <= 128 and res["spill_stores"] > 0:
        bad.append(f"{res['spill_stores']} B of spill stores")
    # a warpgroup's dot needs 64 rows: with a head dim < 64 the state dots (rows = d) run as mma.sync,
    # still on tensor cores; from 64 up every sm_90 kernel with dots must reach wgmma
    wants_wgmma = arch >= 90 and min(d, dv) >= 64
    if res["dots"] and not (res["wgmma"] if wants_wgmma else res["mma"] or res["wgmma"]):
        bad.append("dots not on tensor cores" + (" (no wgmma)" if wants_wgmma else " (no mma)"))
    if half and max(d, dv) <= 128 and arch == 90 and entry["resident"] < 2:
        bad.append(f"{entry['resident']} resident program(s)/SM < 2")
    for grid in entry["grids"]:
        if any(x > lim_ for x, lim_ in zip(grid, GRID_LIMITS)):
            bad.append(f"grid {grid} over CUDA's limits {GRID_LIMITS}")
            break
    return bad


SOFT = ("spill stores", "resident program")  # findings a kernel runs with (slower), unlike the hard ones


def row_key(r) -> str:
    return f"sm_{r['arch']} {r['kernel']} {r['dtype']} d={r['d']} dv={r['dv']} [{r['flags']}]"


def load_baseline(path) -> dict:
    """Per kernel key the worst the table recorded (a key can have several compiled variants, e.g. the
    scenarios differ in an argument's divisibility): the most spill bytes, the fewest resident programs."""
    try:
        with open(path) as f:
            rows = json.load(f)["rows"]
    except (OSError, ValueError, KeyError):
        return {}
    worst = {}
    for r in rows:
        if "error" in r:
            continue
        w = worst.setdefault(row_key(r), dict(spill_stores=0, resident=99))
        w["spill_stores"] = max(w["spill_stores"], r.get("spill_stores", 0))
        w["resident"] = min(w["resident"], r["resident"])
    return worst


def split_known(row, problems, baseline) -> tuple[list, list]:
    """(failing, known): a soft finding is known when the baseline row of the same kernel had it at least
    as badly (as many spill bytes or more, as few resident programs or fewer)."""
    base = baseline.get(row_key(row))
    failing, known = [], []
    for p in problems:
        ok = base is not None and any(w in p for w in SOFT) and (
            (row.get("spill_stores", 0) <= base.get("spill_stores", 0)) if "spill" in p else
            (row["resident"] >= base["resident"]))
        (known if ok else failing).append(p)
    return failing, known


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        for s in SCENARIOS:
            print(s[0], s[1:])
        return 0
    try:
        import triton
        import torch
    except ImportError as err:
        print(f"kernels_compile.py: needs torch and triton ({err})", file=sys.stderr)
        return 2
    if triton.knobs.runtime.interpret:
        print("kernels_compile.py: TRITON_INTERPRET was set when triton was imported; run it in a fresh process",
              file=sys.stderr)
        return 2
    archs = [int(a) for a in args.arch.split(",") if a]
    wanted = [s for s in args.only.split(",") if s]
    scenarios = [s for s in SCENARIOS if not wanted or any(w in s[0] for w in wanted)]
    if not scenarios:
        print(f"kernels_compile.py: no scenario matches --only {args.only!r} (see --list)", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    rows, failures, known_all = [], [], []
    baseline = load_baseline(args.baseline) if args.baseline else {}
    for arch in archs:
        if arch not in LIMITS:
            print(f"kernels_compile.py: unknown arch {arch}; choose from {sorted(LIMITS)}", file=sys.stderr)
            return 2
        distinct = collect(scenarios, arch)
        todo, cached = [], {}
        for key, entry in distinct.items():
            path = os.path.join(args.cache, key + ".json") if args.cache else None
            if path and os.path.exists(path):
                with open(path) as f:
                    cached[key] = json.load(f)
            else:
                todo.append(key)
        print(f"sm_{arch}: {len(distinct)} distinct kernels from {len(scenarios)} scenarios; "
              f"{len(cached)} cached, compiling {len(todo)} with {args.jobs} jobs", flush=True)
        ctx = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(max(1, args.jobs), mp_context=ctx) as pool:
            results = dict(zip(todo, pool.map(compile_one, [(distinct[k]["rec"], arch) for k in todo])))
        for key, res in results.items():
            if args.cache and "error" not in res:
                os.makedirs(args.cache, exist_ok=True)
                with open(os.path.join(args.cache, key + ".json"), "w") as f:
                    json.dump(res, f)
        results.update(cached)
        for key, entry in distinct.items():
            rec = entry["rec"]
            entry["res"] = res = results[key]
            warps = rec["options"]["num_warps"]
            entry["resident"] = resident_programs(res, warps, arch) if "error" not in res else 0
            problems = check(entry, arch)
            c = rec["named"]
            flags = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in c.items()
                             if k not in ("BT", "BK", "BV", "FM", "PREC", "UPCAST", "EMU") and v not in (False, 0))
            dtype = entry["dims"][2]
            row = dict(arch=arch, kernel=f"{rec['module'].rsplit('.', 1)[1]}.{rec['kernel']}", dtype=dtype,
                       d=entry["dims"][0], dv=entry["dims"][1],
                       tiles=f"BT={c.get('BT')} BK={c.get('BK')} BV={c.get('BV')}", flags=flags,
                       prec=c.get("PREC", ""), warps=warps, stages=rec["options"]["num_stages"],
                       max_grid=[max(g[i] for g in entry["grids"]) for i in range(3)],
                       resident=entry["resident"], scenarios=entry["scenarios"], problems=problems, **res)
            failing, known = split_known(row, problems, baseline)
            row.update(problems=failing, known=known)
            rows.append(row)
            if failing:
                failures.append(f"{row_key(row)}: " + "; ".join(failing))
            if known:
                known_all.append(f"{row_key(row)}: " + "; ".join(known))
    elapsed = time.perf_counter() - t_start
    rows.sort(key=lambda r: (-r["arch"], r["kernel"], r["dtype"], r["d"], r["dv"], r["flags"]))
    meta = dict(date=datetime.date.today().isoformat(), triton=triton.__version__, torch=torch.__version__,
                python=platform.python_version(), machine=f"{platform.machine()}, {os.cpu_count()} CPUs (no GPU)",
                command="python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT)] + list(argv or sys.argv[1:])),
                archs=archs, scenarios=[s[0] for s in scenarios], seconds=round(elapsed, 1),
                compile_s_total=round(sum(r.get("compile_s", 0) for r in rows), 1))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(dict(meta=meta, rows=rows, failures=failures, known=known_all), f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(to_markdown(meta, rows, failures, known_all))
    for r in rows:
        mark = "FAIL " if r["problems"] else "known " if r["known"] else ""
        print(f"{mark}sm_{r['arch']} {r['kernel']:<32} {r['dtype']} d={r['d']:<3} dv={r['dv']:<3} {r['flags']:<28} "
              f"regs={r.get('regs', '-')} smem={r.get('shared', '-')} spill={r.get('spill_stores', '-')} "
              f"res/SM={r['resident']} {r.get('compile_s', 0):.1f}s")
    print(f"\n{len(rows)} kernels, {len(failures)} failing, {len(known_all)} with known findings; {elapsed:.0f} s wall, "
          f"{meta['compile_s_total']:.0f} s of compiles")
    for line in failures:
        print("FAIL", line)
    return 1 if failures else 0


def to_markdown(meta, rows, failures, known) -> str:
    out = [
        "# DA Triton kernels compiled for GPU targets on a CPU machine",
        "",
        f"Compiled, not run: {meta['date']}, Triton {meta['triton']}, torch {meta['torch']}, Python {meta['python']}, "
        f"{meta['machine']}. Command: `{meta['command']}` ({meta['seconds']} s wall, {meta['compile_s_total']} s of compiles).",
        "Resources come from ptxas (-v) and the compiled metadata; 'resident/SM' is what those registers and that "
        "shared memory allow per SM (not an occupancy measurement). Nothing here ran on a GPU.",
        "",
        f"**{len(failures)} failing checks.**" if failures else "**No failing check** (every kernel compiles, shared "
        "memory within the arch's limit, every dot on tensor cores — wgmma on sm_90 from head dim 64 —, grids within "
        "CUDA's limits; spills and residency no worse than the baseline).",
        "",
    ]
    for line in failures:
        out.append(f"- FAIL {line}")
    if known:
        out += ["", f"**{len(known)} kernels run with known findings** (spills, or fewer than 2 resident programs/SM; "
                "recorded in the baseline table, not failing; a kernel that gets worse fails):", ""]
        out += [f"- {line}" for line in known]
    out += ["", "| arch | kernel | dtype | d×dv | flags | tiles | warps | stages | regs | shared B | stack B | spills B | "
            "tensor cores | resident/SM | compile s | failing | known |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tc = "wgmma" if r.get("wgmma") else "mma" if r.get("mma") else ("–" if not r.get("dots") else "**FMA**")
        out.append(f"| sm_{r['arch']} | {r['kernel']} | {r['dtype']} | {r['d']}×{r['dv']} | {r['flags']} | {r['tiles']} | "
                   f"{r['warps']} | {r['stages']} | {r.get('regs', '–')} | {r.get('shared', '–')} | {r.get('stack', '–')} | "
                   f"{r.get('spill_stores', '–')} | {tc} | {r['resident']} | {r.get('compile_s', 0):.1f} | "
                   f"{'; '.join(r['problems'])} | {'; '.join(r['known'])} |")
    out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
