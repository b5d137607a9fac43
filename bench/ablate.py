"""Ablation of the DA-layer variants (issue 20) at equal compute, DA and softmax side by side.

Every variant trains with the project's own training code (`python -m fluidlm.train`, through
bench/compare.py's helpers) on the same config, data, steps, tokens and seed set: seed s gives the
same data order (train.seed seeds the model init and the data order) to every variant. Each run is
scored by `python -m fluidlm.eval` at 1×, 4× and 16× the training length on the same held-out
documents (disjoint windows; causal DA streamed through its state, softmax full windows), and each
variant is reported as the mean ± std over seeds (and min–max) of its validation perplexity, with
its parameter count and training throughput (median tokens/s over steps after the first 5).

    fluidlm data prepare --out data/default --vocab-size 4096 --seq-len 256   # once
    python bench/ablate.py                                  # the default grid (~1 h on a 2-core CPU)
    python bench/ablate.py --variants baseline,gate,softmax --seeds 0,1 --steps 100
    python bench/ablate.py --quick --data DIR ...           # a smoke test: tiny model, 3 steps, 2 variants
    python bench/ablate.py --scale --nproc 8                # configs/da-125m.yaml on GPUs (data/default-2k)
    python bench/ablate.py --list                           # the variants and their overrides

Default grid: configs/tiny-cpu.yaml, 150 steps (warm-up 15), seeds 0,1,2, the variants baseline, gate,
conv4, rmsnorm, gate-conv-norm, no-pde, half-life-256, softmax; model.max_seq_len = 16 × the training
length in every run (so softmax + RoPE may be evaluated at 16× and DA's default longest half-life is
the same everywhere). Eval: pieces of 2 × the longest length from the val split's documents of at
least 16 × the training length, at most --eval-tokens tokens in all (the same pieces for every run).

Writes <out>.md, <out>.json, <out>.png (default bench/results/ablate.*); runs go to --runs-dir
(default runs/ablate/<variant>/seed<s>, with eval.json beside each run). --resume reuses every run
already trained to --steps and its eval.json when it was made with the same evaluation settings (an
interrupted grid continues; a finished grid is re-scored with other --eval-tokens without retraining).

Deciding: seed s of every variant shares its data order and init seed with seed s of `baseline`, so
the table also gives the paired change per seed (variant / baseline − 1 of the same seed: mean ± std
over seeds, and in how many seeds the variant is better). A variant is called better (worse) when it is
better (worse) in every seed and the paired mean exceeds the paired std; otherwise "within spread".

Extra positional arguments are config overrides for every run (section.key=value), e.g.
`train.micro_batch_size=4`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import CONFIG, RESULTS, ROOT, eval_run, machine, train_metrics, train_run  # noqa: E402

# name → (config overrides, what it tests). Overrides are applied after the grid's common ones.
VARIANTS: dict[str, tuple[list[str], str]] = {
    "baseline": (["model.attention=da"], "DA as in docs/design.md §3"),
    "gate": (["model.output_gate=sigmoid"], "output gate o ⊙ sigmoid(W_g x)"),
    "gate-silu": (["model.output_gate=silu"], "output gate o ⊙ silu(W_g x)"),
    "conv4": (["model.qkv_conv=4"], "causal depthwise conv (width 4) on q, k, v"),
    "conv2": (["model.qkv_conv=2"], "causal depthwise conv (width 2) on q, k, v"),
    "rmsnorm": (["model.output_norm=rmsnorm"], "RMSNorm per head on the DA output"),
    "gate-conv-norm": (["model.output_gate=sigmoid", "model.qkv_conv=4", "model.output_norm=rmsnorm"],
                       "gate + conv4 + rmsnorm"),
    "gate-conv": (["model.output_gate=sigmoid", "model.qkv_conv=4"], "gate + conv4"),
    "gate-no-pde": (["model.output_gate=sigmoid", "model.pde.enabled=false"], "gate, without the PDE layer"),
    "no-pde": (["model.pde.enabled=false"], "DA without the PDE diffusion layer"),
    "half-life-256": (["model.half_life_max=256"], "initial half-lives 1 … 256 tokens instead of 1 … max_seq_len"),
    "softmax": (["model.attention=softmax"], "the SDPA + RoPE baseline"),
}
DEFAULT_VARIANTS = "baseline,gate,conv4,rmsnorm,gate-conv-norm,no-pde,half-life-256,softmax"
QUICK_MODEL = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.head_dim=16", "model.chunk_size=16",
               "train.micro_batch_size=2"]
SCALE_CONFIG = ROOT / "configs" / "da-125m.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=None, help=f"comma-separated variant names (default {DEFAULT_VARIANTS}; "
                                                    "see --list)")
    p.add_argument("--seeds", default=None, help="comma-separated train.seed values (default 0,1,2; --quick: 0)")
    p.add_argument("--steps", type=int, default=None, help="training steps of every run (default 150; --quick 3; "
                                                           "--scale 2000)")
    p.add_argument("--warmup", type=int, default=None, help="optim.warmup_steps (default steps/10)")
    p.add_argument("--data", default=None, help="folder from `fluidlm data prepare` (default: the config's data.dir)")
    p.add_argument("--multipliers", default="1,4,16", help="evaluation lengths as multiples of the training length")
    p.add_argument("--eval-tokens", type=int, default=None, help="at most this many evaluation tokens per run "
                                                                  "(default 65536; --quick 256; --scale 1048576)")
    p.add_argument("--nproc", type=int, default=1, help="training processes per run (torchrun when > 1)")
    p.add_argument("--quick", action="store_true", help="smoke test: a 1-layer d_model-32 model, 3 steps, seed 0, "
                                                        "variants gate-conv-norm,softmax (CI; pass --data)")
    p.add_argument("--scale", action="store_true", help=f"the grid on {SCALE_CONFIG.relative_to(ROOT)} (GPUs; its "
                                                        "data.dir, 2000 steps, 1M eval tokens)")
    p.add_argument("--mlflow", action="store_true", help="log every run to MLflow (off by default: it costs time)")
    p.add_argument("--resume", action="store_true", help="reuse every run already trained to --steps, and its "
                   "evaluation when that was made with the same settings (otherwise the checkpoint is re-scored)")
    p.add_argument("--runs-dir", default="runs/ablate", help="where the runs go")
    p.add_argument("--out", default=str(RESULTS / "ablate"), help="output path without suffix")
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    p.add_argument("overrides", nargs="*", help="extra config overrides for every run (section.key=value)")
    args = p.parse_args(argv)
    if args.quick and args.scale:
        p.error("--quick and --scale exclude each other")
    args.config = SCALE_CONFIG if args.scale else CONFIG
    args.variants = (args.variants or ("gate-conv-norm,softmax" if args.quick else DEFAULT_VARIANTS)).split(",")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    args.seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    args.steps = args.steps or (3 if args.quick else 2000 if args.scale else 150)
    args.warmup = args.warmup if args.warmup is not None else max(1, args.steps // 10)
    args.eval_tokens = args.eval_tokens or (256 if args.quick else 1048576 if args.scale else 65536)
    args.multipliers = [int(m) for m in args.multipliers.split(",")]
    return args


def run_config(args, variant: str, seed: int, run_dir: Path, longest: int):
    """The validated training config of one run (fluidlm.train.config) and its overrides."""
    from fluidlm.train.config import load_config

    common = [f"train.steps={args.steps}", f"optim.warmup_steps={args.warmup}", f"model.max_seq_len={longest}",
              "checkpoint.every=0", "checkpoint.keep=1", "logging.progress=false",
              f"logging.mlflow={'true' if args.mlflow else 'false'}", f"train.seed={seed}",
              *([f"data.dir={args.data}"] if args.data else []), *(QUICK_MODEL if args.quick else []), *args.overrides]
    overrides = [*common, *VARIANTS[variant][0]]
    return load_config(args.config, [*overrides, f"train.run_dir={run_dir}"]), overrides


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values), "values": values}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.list:
        for name, (over, what) in VARIANTS.items():
            print(f"{name:16s} {' '.join(over):70s} {what}")
        return
    sys.path.insert(0, str(ROOT))
    from fluidlm.model import FluidLM, ModelConfig
    from fluidlm.train.config import load_config

    seq_len = load_config(args.config, args.overrides).data.seq_len
    lengths = [m * seq_len for m in args.multipliers]
    longest = max(lengths)
    runs = ROOT / args.runs_dir
    runs.mkdir(parents=True, exist_ok=True)
    log = runs / "ablate.log"
    # Validate every run's config before training any (a typo fails in a second, not after an hour).
    plan = {(v, s): run_config(args, v, s, runs / v / f"seed{s}", longest) for v in args.variants for s in args.seeds}
    data_dir = args.data or next(iter(plan.values()))[0].data.dir
    t_start = time.perf_counter()
    per_run = {}
    for (variant, seed), (cfg, overrides) in plan.items():
        run_dir = runs / variant / f"seed{seed}"
        report_path, settings_path = run_dir / "eval.json", run_dir / "eval_settings.json"
        stream = cfg.model.attention == "da" and cfg.model.causal
        settings = {"lengths": lengths, "max_tokens": args.eval_tokens, "max_doc_tokens": 2 * longest,
                    "stream": stream, "data": str(data_dir)}
        trained = ((run_dir / "checkpoints" / f"step_{args.steps:08d}").is_dir()
                   and (run_dir / "metrics.jsonl").is_file())
        timings_path = run_dir / "ablate_timings.json"  # kept beside the run so --resume reports the whole grid
        timing = json.loads(timings_path.read_text()) if args.resume and timings_path.is_file() else {}
        if not (args.resume and trained):
            timing["train_s"] = train_run(run_dir, overrides, log, args.nproc, args.config)
        # --resume re-scores a trained run whose report was made with other evaluation settings.
        if not (args.resume and report_path.is_file() and settings_path.is_file()
                and json.loads(settings_path.read_text()) == settings):
            timing["eval_s"] = eval_run(run_dir, data_dir, lengths, report_path, log, max_doc_tokens=2 * longest,
                                        max_tokens=args.eval_tokens, stream=stream, mlflow=args.mlflow)
            settings_path.write_text(json.dumps(settings))
        timings_path.write_text(json.dumps(timing))
        report = json.loads(report_path.read_text())
        rows = train_metrics(run_dir)
        speeds = [r["tokens_per_s"] for r in rows[5:] or rows]
        per_run[(variant, seed)] = {
            "variant": variant, "seed": seed, "timings_s": timing, "overrides": overrides,
            "perplexity": {str(r["context_length"]): r["perplexity"] for r in report["results"]},
            "train_loss_last20": statistics.fmean(r["loss"] for r in rows[-20:]),
            "tokens_per_s": statistics.median(speeds),
            "parameters": FluidLM(ModelConfig(**cfg.model.model_dump())).num_parameters(),
            "eval_data": {k: report["data"].get(k) for k in ("documents", "tokens")},
        }
    wall = time.perf_counter() - t_start

    summary = {}
    for variant in args.variants:
        mine = [per_run[(variant, s)] for s in args.seeds]
        summary[variant] = {
            "overrides": VARIANTS[variant][0], "what": VARIANTS[variant][1], "parameters": mine[0]["parameters"],
            "tokens_per_s": spread([r["tokens_per_s"] for r in mine]),
            "train_loss_last20": spread([r["train_loss_last20"] for r in mine]),
            "perplexity": {str(n): spread([r["perplexity"][str(n)] for r in mine]) for n in lengths},
        }
        if "baseline" in args.variants and variant != "baseline":
            summary[variant]["paired_vs_baseline"] = paired(per_run, variant, args.seeds, lengths)
            summary[variant]["paired_train_loss"] = paired_train_loss(per_run, variant, args.seeds)
    first = next(iter(per_run.values()))
    meta = {
        "command": "python bench/ablate.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": str(Path(args.config).relative_to(ROOT)), "steps": args.steps, "warmup_steps": args.warmup,
        "seeds": args.seeds, "seq_len": seq_len, "context_lengths": lengths, "max_seq_len": longest,
        "tokens_per_run": args.steps * first_tokens_per_step(plan), "machine": machine(), "nproc": args.nproc,
        "eval": {"windows": "disjoint", "da": "streamed (causal)", "softmax": "full windows",
                 "pieces_tokens": 2 * longest, **first["eval_data"]},
        "wall_s": wall, "extra_overrides": args.overrides,
        "train_s_total": sum(r["timings_s"].get("train_s", 0.0) for r in per_run.values()),
        "eval_s_total": sum(r["timings_s"].get("eval_s", 0.0) for r in per_run.values()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "variants": summary, "runs": [per_run[k] for k in per_run]}, indent=2))
    lines = table(meta, summary, lengths, args.multipliers)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(out.with_suffix(".png"), meta, summary, lengths)
    print("\n".join(lines))
    print(f"wrote {out.with_suffix('.md')}, .json, .png")


def paired(per_run, variant: str, seeds: list[int], lengths: list[int]) -> dict:
    """Per length: the per-seed relative change of perplexity against `baseline` of the same seed (same data
    order and init seed), its spread, in how many seeds the variant is better, and the verdict."""
    out = {}
    for n in lengths:
        d = [per_run[(variant, s)]["perplexity"][str(n)] / per_run[("baseline", s)]["perplexity"][str(n)] - 1
             for s in seeds]
        out[str(n)] = paired_stats(d)
    return out


def paired_train_loss(per_run, variant: str, seeds: list[int]) -> dict:
    """The per-seed difference (nats) of the last-20-step training loss against `baseline` of the same seed:
    the same batches, each seen once, so it is a held-out estimate on the training distribution."""
    d = [per_run[(variant, s)]["train_loss_last20"] - per_run[("baseline", s)]["train_loss_last20"] for s in seeds]
    return paired_stats(d)


def paired_stats(changes: list[float]) -> dict:
    """The spread of per-seed changes (negative = better), in how many seeds the variant is better, the verdict."""
    return {**spread(changes), "better_in": sum(x < 0 for x in changes), "verdict": verdict(changes)}


def verdict(changes: list[float]) -> str:
    """'better' ('worse') when every seed is better (worse) and the mean change exceeds its std over seeds."""
    if len(changes) < 2:
        return "within spread"
    mean, std = statistics.fmean(changes), statistics.stdev(changes)
    if all(x < 0 for x in changes) and -mean > std:
        return "better"
    if all(x > 0 for x in changes) and mean > std:
        return "worse"
    return "within spread"


def first_tokens_per_step(plan) -> int:
    cfg = next(iter(plan.values()))[0]
    t = cfg.train
    return t.micro_batch_size * t.grad_accum * cfg.data.seq_len


def table(meta, summary, lengths, mults) -> list[str]:
    seeds = meta["seeds"]
    base = summary.get("baseline")
    lines = [f"# Ablation of the DA-layer variants: validation perplexity at {', '.join(f'{m}×' for m in mults)} "
             f"the training length ({meta['seq_len']} tokens)", "",
             f"`{meta['command']}` — {meta['config']}, {meta['steps']} steps (warm-up {meta['warmup_steps']}), "
             f"{meta['tokens_per_run']:,} training tokens per run, seeds {', '.join(map(str, seeds))} (each seed: the "
             f"same init seed and data order for every variant), model.max_seq_len={meta['max_seq_len']}; "
             f"{meta['machine']}; training {meta['train_s_total'] / 60:.1f} min + evaluation "
             f"{meta['eval_s_total'] / 60:.1f} min summed over the runs "
             f"(this invocation: {meta['wall_s'] / 60:.1f} min).",
             f"Evaluation: {meta['eval']['documents']} pieces of {meta['eval']['pieces_tokens']} tokens of the val split, "
             f"{meta['eval']['tokens']:,} tokens, disjoint windows; DA streamed, softmax full windows. "
             f"Perplexity: mean ± std over {len(seeds)} seed(s) (min–max)"
             + ("; paired Δ = per-seed change against `baseline` of the same seed (same data order and init), "
                "mean ± std over seeds, [seeds in which the variant is better]; train loss = mean of the last 20 "
                "steps' losses, on batches each seen once (the same batches for every variant of a seed)."
                if base else "."), ""]
    head = "| variant | parameters | tokens/s | " + " | ".join(f"ppl @ {n} ({m}×)" for n, m in zip(lengths, mults))
    head += " | " + " | ".join(f"paired Δ {m}×" for m in mults) if base else ""
    head += " | train loss (last 20)" + (" | paired Δ train loss" if base else "")
    lines += [head + " |", "|" + "---|" * (4 + len(lengths) + (len(lengths) + 1 if base else 0))]
    for name, s in summary.items():
        cells = [f"`{name}`", f"{s['parameters']:,}", f"{s['tokens_per_s']['mean']:,.0f}"]
        for n in lengths:
            p = s["perplexity"][str(n)]
            cells.append(f"{p['mean']:.2f} ± {p['std']:.2f} ({p['min']:.2f}–{p['max']:.2f})")
        if base:
            for n in lengths:
                d = s.get("paired_vs_baseline", {}).get(str(n))
                cells.append("—" if d is None else f"{100 * d['mean']:+.1f} ± {100 * d['std']:.1f} % "
                                                   f"[{d['better_in']}/{d['n']}]")
        cells.append(f"{s['train_loss_last20']['mean']:.3f} ± {s['train_loss_last20']['std']:.3f}")
        if base:
            d = s.get("paired_train_loss")
            cells.append("—" if d is None else f"{d['mean']:+.3f} ± {d['std']:.3f} [{d['better_in']}/{d['n']}]")
        lines.append("| " + " | ".join(cells) + " |")
    if base:
        lines += ["", "Verdict against `baseline` (better/worse: in every seed, and the paired mean exceeds its std): "
                  + "; ".join(f"`{name}` " + ", ".join(f"{m}× {s['paired_vs_baseline'][str(n)]['verdict']}"
                                                         for n, m in zip(lengths, mults))
                              + f", train loss {s['paired_train_loss']['verdict']}"
                              for name, s in summary.items() if "paired_vs_baseline" in s) + "."]
    lines += ["", "Variants: " + "; ".join(f"`{n}` = {s['what']} ({' '.join(s['overrides'])})"
                                          for n, s in summary.items()) + "."]
    return lines


def plot(path: Path, meta, summary, lengths) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, s) in enumerate(summary.items()):
        means = [s["perplexity"][str(n)]["mean"] for n in lengths]
        lo = [m - s["perplexity"][str(n)]["min"] for m, n in zip(means, lengths)]
        hi = [s["perplexity"][str(n)]["max"] - m for m, n in zip(means, lengths)]
        style = "s--" if name == "softmax" else "o-"
        a.errorbar([n * (1 + 0.02 * (i - len(summary) / 2)) for n in lengths], means, yerr=[lo, hi], fmt=style,
                   capsize=3, label=name)
    a.set_xscale("log", base=2)
    a.set_xlabel("context length (tokens)")
    a.set_ylabel("validation perplexity (mean, min–max over seeds)")
    a.set_title(f"{meta['steps']} steps × {len(meta['seeds'])} seeds, trained at {meta['seq_len']}")
    a.legend(fontsize=7)
    names = list(summary)
    width = 0.8 / len(lengths)
    for j, n in enumerate(lengths):
        b.bar([i + j * width for i in range(len(names))], [summary[v]["perplexity"][str(n)]["mean"] for v in names],
              width, yerr=[summary[v]["perplexity"][str(n)]["std"] for v in names], capsize=2, label=f"{n} tokens")
    b.set_xticks([i + width * (len(lengths) - 1) / 2 for i in range(len(names))], names, rotation=30, ha="right",
                 fontsize=8)
    low = min(summary[v]["perplexity"][str(n)]["min"] for v in names for n in lengths)
    b.set_ylim(bottom=low * 0.95)
    b.set_ylabel("perplexity (mean ± std)")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
