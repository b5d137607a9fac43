"""MQAR recall grid (issue 29), Zoology-style at CPU scale: accuracy vs d_model per sequence length.

Each run trains with the project's own `python -m fluidlm.train` (bench/compare.py's helper) on data
from `fluidlm data synthetic mqar`, with `train.eval_tasks: [mqar]`; its accuracy is the final
`val/mqar_acc`: greedy accuracy on the held-out validation split (disjoint from train) of the same
(sequence length, pairs). Per (model, d_model, cell) the best learning rate (by mean accuracy over
seeds) is reported; tokens and wall time of every run are in the JSON.

    python bench/recall.py                       # the default CPU grid (see --help)
    python bench/recall.py --d-models 64 --cells 64:4 --lrs 3e-3 --steps 20   # a smoke run
    python bench/recall.py --scale               # Zoology's sizes on a GPU: vocab 8192, 100k examples, 4000 steps
    python bench/recall.py --resume ...          # continue an interrupted grid (finished runs are reused)

Writes <out>.md, <out>.json, <out>.png (default bench/results/recall.*).
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import CONFIG, RESULTS, machine, train_metrics, train_run  # noqa: E402

MODELS = {
    "da": ["model.attention=da"],
    "da-conv-gate": ["model.attention=da", "model.qkv_conv=4", "model.output_gate=sigmoid"],
    "softmax": ["model.attention=softmax"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--d-models", default="64,128,256")
    p.add_argument("--cells", default="64:4,128:8,256:16", help="SEQ_LEN:PAIRS,…")
    p.add_argument("--lrs", default="1e-3,3e-3,1e-2")
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--vocab-size", type=int, default=512, help="default 512 on CPU (Zoology: 8192, --scale)")
    p.add_argument("--train-examples", type=int, default=20000)
    p.add_argument("--scale", action="store_true", help="vocab 8192, 100k examples, 4000 steps, d_model up to 512")
    p.add_argument("--runs-dir", default="runs/recall")
    p.add_argument("--out", default=str(RESULTS / "recall"))
    p.add_argument("--resume", action="store_true", help="reuse runs already trained to --steps (their measured "
                                                          "wall time is kept in <runs-dir>/<run>.wall)")
    p.add_argument("--label", default="", help="a line for the report (e.g. REDUCED: what was cut)")
    args = p.parse_args(argv)
    if args.scale:
        args.vocab_size, args.train_examples, args.steps = 8192, 100_000, 4000
        args.d_models = "64,128,256,512"
    args.models = args.models.split(",")
    args.d_models = [int(d) for d in args.d_models.split(",")]
    args.cells = [tuple(int(x) for x in c.split(":")) for c in args.cells.split(",")]
    args.lrs = [float(x) for x in args.lrs.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    return args


def make_data(args, runs: Path, seq_len: int, pairs: int) -> Path:
    out = runs / "data" / f"{seq_len}x{pairs}-v{args.vocab_size}-n{args.train_examples}"
    if not (out / "val" / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "fluidlm", "data", "synthetic", "mqar", "--out", str(out),
                        "--seq-len", str(seq_len), "--num-pairs", str(pairs), "--test", f"{seq_len}:{pairs}",
                        "--train-examples", str(args.train_examples), "--val-examples", "256",
                        "--test-examples", "256", "--vocab-size", str(args.vocab_size)], check=True,
                       stdout=subprocess.DEVNULL)
    return out


def run_one(args, runs, data, model, d_model, seq_len, pairs, lr, seed) -> dict:
    name = f"{model}-d{d_model}-{seq_len}x{pairs}-lr{lr:g}-s{seed}"
    run_dir = runs / name
    overrides = [f"data.dir={data}", f"data.seq_len={seq_len}", f"model.vocab_size={args.vocab_size}",
                 f"model.d_model={d_model}", "model.n_layers=2", f"model.n_heads={max(1, d_model // 64)}",
                 "model.head_dim=64", "model.max_seq_len=4096", f"train.steps={args.steps}",
                 f"train.micro_batch_size={args.batch}", f"train.seed={seed}", f"optim.lr={lr}",
                 f"optim.warmup_steps={max(1, args.steps // 10)}", f"train.eval_every={args.steps}",
                 f"train.eval_tokens={256 * seq_len}", "train.eval_tasks=[mqar]", "checkpoint.every=0",
                 "checkpoint.keep=1", "logging.progress=false", "logging.mlflow=false", *MODELS[model]]
    wall_file = runs / f"{name}.wall"
    done = (run_dir / "metrics.jsonl").is_file() and train_metrics(run_dir)[-1].get("step") == args.steps
    if args.resume and done and wall_file.is_file():
        wall = float(wall_file.read_text())  # measured when it was trained
    else:
        wall = train_run(run_dir, overrides, runs / f"{name}.log")
        wall_file.write_text(f"{wall:.1f}")
    last = train_metrics(run_dir)[-1]
    return {"model": model, "d_model": d_model, "seq_len": seq_len, "num_pairs": pairs, "lr": lr, "seed": seed,
            "accuracy": last["val/mqar_acc"], "val_loss": last["val/loss"], "tokens": last["tokens"],
            "wall_s": wall, "run": str(run_dir)}


def best_cells(results: list[dict]) -> list[dict]:
    """Per (model, d_model, cell): the LR with the best mean accuracy over seeds."""
    groups: dict[tuple, dict[float, list]] = {}
    for r in results:
        groups.setdefault((r["model"], r["d_model"], r["seq_len"], r["num_pairs"]), {}).setdefault(r["lr"], []).append(r)
    out = []
    for (model, d, seq_len, pairs), by_lr in sorted(groups.items()):
        mean = {lr: sum(x["accuracy"] for x in rs) / len(rs) for lr, rs in by_lr.items()}
        lr = max(mean, key=mean.get)
        out.append({"model": model, "d_model": d, "seq_len": seq_len, "num_pairs": pairs, "best_lr": lr,
                    "accuracy": mean[lr], "seeds": len(by_lr[lr]), "by_lr": {str(k): v for k, v in mean.items()}})
    return out


def write_report(args, results, meta):
    best = best_cells(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "best": best, "runs": results}, indent=2))
    lines = ["# MQAR recall grid (bench/recall.py)", "", *([f"**{args.label}**", ""] if args.label else []),
             f"- machine: {meta['machine']}; date {meta['date']}; shared with other engineers' jobs (nice 10)",
             f"- command: `{meta['command']}`",
             f"- 2 layers, head_dim 64, vocab {args.vocab_size}, {args.train_examples} training examples, {args.steps} "
             f"steps × batch {args.batch}; accuracy = final val/mqar_acc on 256 held-out samples; best of LRs "
             f"{', '.join(f'{x:g}' for x in args.lrs)}; seeds {', '.join(map(str, args.seeds))}",
             f"- total wall time {meta['total_wall_s']:.0f} s", "",
             "| model | d_model | seq_len | pairs | accuracy | best lr | acc per lr |", "|---|---|---|---|---|---|---|"]
    for b in best:
        per = ", ".join(f"{float(k):g}: {v:.3f}" for k, v in b["by_lr"].items())
        lines.append(f"| {b['model']} | {b['d_model']} | {b['seq_len']} | {b['num_pairs']} | {b['accuracy']:.3f} | "
                     f"{b['best_lr']:g} | {per} |")
    lines += ["", "Runs (tokens, wall time):", "", "| run | accuracy | tokens | wall s |", "|---|---|---|---|"]
    lines += [f"| {Path(r['run']).name} | {r['accuracy']:.3f} | {r['tokens']:,} | {r['wall_s']:.0f} |" for r in results]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = sorted({(b["seq_len"], b["num_pairs"]) for b in best})
    fig, axes = plt.subplots(1, len(cells), figsize=(4.2 * len(cells), 3.6), squeeze=False)
    for ax, (seq_len, pairs) in zip(axes[0], cells):
        for model in args.models:
            pts = sorted((b["d_model"], b["accuracy"]) for b in best
                         if b["model"] == model and (b["seq_len"], b["num_pairs"]) == (seq_len, pairs))
            if pts:
                ax.plot(*zip(*pts), "o-", label=model)
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1)
        ax.set_xlabel("d_model")
        ax.set_ylabel("MQAR accuracy")
        ax.set_title(f"seq {seq_len}, {pairs} pairs")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=110)


def main(argv=None):
    args = parse_args(argv)
    runs = Path(args.runs_dir)
    t0 = time.perf_counter()
    results = []
    for seq_len, pairs in args.cells:
        data = make_data(args, runs, seq_len, pairs)
        for d_model in args.d_models:
            for model in args.models:
                for lr in args.lrs:
                    for seed in args.seeds:
                        results.append(run_one(args, runs, data, model, d_model, seq_len, pairs, lr, seed))
                        r = results[-1]
                        print(f"{Path(r['run']).name}: acc {r['accuracy']:.3f} ({r['wall_s']:.0f} s)", flush=True)
    meta = {"machine": machine(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
            "command": "python bench/recall.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "total_wall_s": time.perf_counter() - t0, "config": str(CONFIG)}
    write_report(args, results, meta)
    print(Path(args.out + ".md").read_text())


if __name__ == "__main__":
    main()
