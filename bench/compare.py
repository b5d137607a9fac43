"""DA vs its softmax baseline: same data, steps and seed; perplexity at the training length and
4× and 16× past it, on the same held-out documents.

`--direction bidirectional`: both models bidirectional (DA's bidirectional form vs SDPA without the
causal mask, RoPE), trained with the masked-LM objective (BERT's 15 %, 80/10/10) and scored by
masked-token perplexity (fixed seeded masks, the same positions at every length; no streaming: a
bidirectional window is run whole). Results go to bench/results/compare_mlm.* (the causal
results files stay), runs to runs/compare_mlm.

    fluidlm data prepare --out data/default --vocab-size 4096 --seq-len 256   # once
    python bench/compare.py                       # both models, train.steps of configs/tiny-cpu.yaml
    python bench/compare.py --steps 150           # shorter (≈ 15 min on a 2-core CPU, see README)
    python bench/compare.py --skip-train          # re-evaluate the runs already in --runs-dir

Both runs use configs/tiny-cpu.yaml; the baseline overrides model.attention=softmax. Both set
model.max_seq_len = 16 × the training length, so softmax + RoPE may be evaluated at 16× (without
streaming) and DA's longest initial half-life is the same in both. DA is evaluated with --stream
(window by window through the recurrent state; equal to the full-window score, tests/test_eval.py),
softmax with full windows. Windowing: disjoint. Evaluation documents: the val split's documents of
at least 16 × the training length (so every length fills its window), split into pieces of
--eval-doc-tokens (the default corpus's val split holds few, very long documents), at most
--eval-tokens in all.

Writes bench/results/compare.{json,md,png} (compare_mlm.* with --direction bidirectional).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CONFIG = ROOT / "configs" / "tiny-cpu.yaml"


def sh(cmd: list[str], log: Path) -> float:
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        sys.exit(f"command failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - t0


# Helpers shared with bench/ablate.py: one training run, one evaluation, the loss at the end.

def train_run(run_dir: Path, overrides: list[str], log: Path, nproc: int = 1, config: Path = CONFIG) -> float:
    """Train `config` (default configs/tiny-cpu.yaml) with `overrides` into a fresh `run_dir` (the project's
    own `python -m fluidlm.train`; torchrun when nproc > 1); returns the wall time in seconds."""
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
                if nproc > 1 else [sys.executable])
    return sh([*launcher, "-m", "fluidlm.train", "--config", str(config), f"train.run_dir={run_dir}", *overrides], log)


def eval_run(run_dir: Path, data: str, lengths: list[int], out: Path, log: Path, *, max_doc_tokens: int,
             max_tokens: int, stream: bool, mlflow: bool = True) -> float:
    """`python -m fluidlm.eval` of the run's checkpoint at `lengths` (disjoint windows) on the val split's
    documents of at least max(lengths) + 1 tokens cut into pieces of `max_doc_tokens`, at most `max_tokens`;
    `stream`: through forward_stream (causal DA); `mlflow`: log it (fluidlm.eval's default). Writes the report
    to `out`; returns the wall time."""
    longest = max(lengths)
    cmd = [sys.executable, "-m", "fluidlm.eval", "--checkpoint", str(run_dir), "--data",
           f"{data}/val/manifest.json", "--context-lengths", ",".join(map(str, lengths)), "--mode", "disjoint",
           "--min-doc-tokens", str(longest + 1), "--max-doc-tokens", str(max_doc_tokens), "--max-tokens",
           str(max_tokens), "--out", str(out), "--no-progress"]
    if stream:
        cmd += ["--stream", "--stream-chunk", str(min(2048, longest))]
    if not mlflow:
        cmd.append("--no-mlflow")
    return sh(cmd, log)


def train_metrics(run_dir: Path) -> list[dict]:
    """The rows of the run's metrics.jsonl (one per logged step)."""
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {__import__('torch').__version__}"


def main() -> None:
    import yaml

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="training steps of each model (default: the config's)")
    p.add_argument("--warmup", type=int, default=None, help="optim.warmup_steps (default: min(config's, steps/10))")
    p.add_argument("--data", default="data/default", help="folder from `fluidlm data prepare`")
    p.add_argument("--direction", choices=["causal", "bidirectional"], default="causal",
                   help="causal: next-token perplexity (DA streamed); bidirectional: masked-LM training and masked-token "
                        "perplexity, results in compare_mlm.*")
    p.add_argument("--runs-dir", default=None, help="default runs/compare (runs/compare_mlm bidirectional)")
    p.add_argument("--nproc", type=int, default=1, help="training processes (torchrun when > 1)")
    p.add_argument("--multipliers", default="1,4,16", help="evaluation lengths as multiples of the training length")
    p.add_argument("--eval-tokens", type=int, default=98304, help="at most this many evaluation tokens")
    p.add_argument("--eval-doc-tokens", type=int, default=None, help="split documents into pieces of this many tokens "
                                                                          "(default 2 × longest length)")
    p.add_argument("--skip-train", action="store_true", help="evaluate the existing runs in --runs-dir")
    p.add_argument("--out", default=None, help="output path without suffix (default bench/results/compare, "
                                               "compare_mlm bidirectional)")
    p.add_argument("overrides", nargs="*", help="extra config overrides for both runs (section.key=value)")
    args = p.parse_args()
    mlm = args.direction == "bidirectional"
    args.runs_dir = args.runs_dir or ("runs/compare_mlm" if mlm else "runs/compare")
    args.out = args.out or str(RESULTS / ("compare_mlm" if mlm else "compare"))
    if mlm:  # masked-LM training needs the tokenizer's mask token (fluidlm data prepare adds it)
        sys.path.insert(0, str(ROOT))
        from fluidlm.data.tokenizer import load_tokenizer, mask_id

        tok = ROOT / args.data / "tokenizer.model"
        if not tok.is_file() or mask_id(load_tokenizer(tok)) is None:
            sys.exit(f"{tok} is missing or has no mask token; run `fluidlm data prepare --out {args.data} --vocab-size "
                     "4096 --seq-len 256` (it retrains a tokenizer made before the mask token existed)")

    cfg = yaml.safe_load(CONFIG.read_text())
    seq_len = int(cfg["data"]["seq_len"])
    steps = args.steps or int(cfg["train"]["steps"])
    warmup = args.warmup if args.warmup is not None else min(int(cfg["optim"]["warmup_steps"]), max(1, steps // 10))
    mults = [int(m) for m in args.multipliers.split(",")]
    lengths = [m * seq_len for m in mults]
    longest = max(lengths)
    doc_cap = args.eval_doc_tokens or 2 * longest
    runs = ROOT / args.runs_dir
    runs.mkdir(parents=True, exist_ok=True)
    log = runs / "compare.log"
    common = [f"data.dir={args.data}", f"train.steps={steps}", f"optim.warmup_steps={warmup}",
              f"model.max_seq_len={longest}", "checkpoint.every=0", "checkpoint.keep=1", "logging.progress=false",
              *(["model.direction=bidirectional", "train.objective=masked_lm"] if mlm else []), *args.overrides]
    models = {"da": ["model.attention=da"], "softmax": ["model.attention=softmax"]}
    timings: dict[str, dict] = {}
    for name, extra in models.items():
        run_dir = runs / name
        timings[name] = {}
        if not args.skip_train:
            timings[name]["train_s"] = train_run(run_dir, [*common, *extra], log, args.nproc)
        timings[name]["eval_s"] = eval_run(run_dir, args.data, lengths, runs / f"eval_{name}.json", log,
                                           max_doc_tokens=doc_cap, max_tokens=args.eval_tokens,
                                           stream=name == "da" and not mlm)
    reports = {name: json.loads((runs / f"eval_{name}.json").read_text()) for name in models}
    final_loss = {}
    for name in models:
        tail = train_metrics(runs / name)[-20:]
        final_loss[name] = sum(r["loss"] for r in tail) / len(tail)

    summary = {
        "config": str(CONFIG.relative_to(ROOT)), "direction": args.direction,
        "objective": "masked_lm" if mlm else "causal_lm", "steps": steps, "warmup_steps": warmup, "seq_len": seq_len,
        "max_seq_len": longest, "nproc": args.nproc, "overrides": common, "context_lengths": lengths,
        "machine": machine(),
        "timings_s": timings, "train_loss_last20": final_loss,
        "eval_data": {k: reports["da"]["data"][k] for k in ("source", "documents", "tokens", "split_documents")},
        "reports": reports,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))

    da, sm = reports["da"]["results"], reports["softmax"]["results"]
    what = "masked-token perplexity" if mlm else "perplexity"
    masking = reports["da"].get("masking") or {}
    lines = [f"# DA vs softmax{' (bidirectional, masked LM)' if mlm else ''}: {what} past the training length "
             f"({seq_len} tokens)", "",
             f"`python bench/compare.py {' '.join(sys.argv[1:])}` — {CONFIG.relative_to(ROOT)}, {steps} steps each "
             f"(warm-up {warmup}), same data, seed and batch; model.max_seq_len={longest}; {summary['machine']}.",
             f"Training time: DA {timings['da'].get('train_s', float('nan')):.0f} s, softmax "
             f"{timings['softmax'].get('train_s', float('nan')):.0f} s; mean training loss of the last 20 steps"
             f"{' (masked tokens)' if mlm else ''}: DA {final_loss['da']:.3f}, softmax {final_loss['softmax']:.3f}.",
             f"Evaluation: {summary['eval_data']['documents']} pieces of {doc_cap} tokens from the val split's documents, "
             f"{summary['eval_data']['tokens']:,} tokens; disjoint windows; " +
             (f"{masking.get('rate', 0):.0%} of each piece's tokens masked (seed {masking.get('seed')}, the same positions "
              "at every length), each window run whole (bidirectional)." if mlm else
              "DA streamed (--stream), softmax full windows."),
             "", f"| context | × train | DA {'masked ' if mlm else ''}ppl | softmax {'masked ' if mlm else ''}ppl | DA loss | "
                 f"softmax loss | {'masked ' if mlm else ''}tokens |",
             "|---|---|---|---|---|---|---|"]
    for a, b, m in zip(da, sm, mults):
        lines.append(f"| {a['context_length']} | {m} | {a['perplexity']:.2f} | {b['perplexity']:.2f} | {a['loss']:.4f} | "
                     f"{b['loss']:.4f} | {a['tokens']:,} |")
    lines += ["", f"Loss by position at context {longest} (mean NLL per log2 bucket of the position in the window):", "",
              "| positions | DA loss | softmax loss |", "|---|---|---|"]
    for x, y in zip(da[-1]["loss_by_position"], sm[-1]["loss_by_position"]):
        if x["tokens"]:
            lines.append(f"| {x['start']}–{x['end']} | {x['loss']:.3f} | {y['loss']:.3f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, res in (("DA" if mlm else "DA (stream)", da), ("softmax", sm)):
        a.plot([r["context_length"] for r in res], [r["perplexity"] for r in res], "o-", label=name)
    a.axvline(seq_len, color="gray", ls="--", lw=1, label="training length")
    a.set_xscale("log", base=2)
    a.set_xlabel("context length (tokens)")
    a.set_ylabel(what)
    a.set_title(f"{steps} steps, trained at {seq_len} tokens")
    a.legend()
    for name, res in (("DA", da), ("softmax", sm)):
        for r, style in zip(res, ("-", "--", ":")):
            pts = [((k["start"] * k["end"]) ** 0.5, k["loss"]) for k in r["loss_by_position"] if k["tokens"]]
            b.plot(*zip(*pts), style, color="C0" if name == "DA" else "C1", label=f"{name} ctx {r['context_length']}")
    b.set_xscale("log", base=2)
    b.set_xlabel("token position in window")
    b.set_ylabel("mean loss (nats)")
    b.set_title("loss by position")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print("\n".join(lines))
    print(f"wrote {out.with_suffix('.md')}, .json, .png")


if __name__ == "__main__":
    main()
