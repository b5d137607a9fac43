"""Data benchmarks on this machine, for the default corpus (or a prepared folder):

1. throughput: shard writing (tokenize + pack + shuffle + write) and loading (tokens/s), compared
   with a tiny-model CPU training step;
2. mixing: distinct source documents per global batch (from each sample's docs.npy) — corpus-order
   shards read one shard at a time (the loader before issue 18), the shuffled shards with lanes and
   windows (now), and uniform random sampling of the same number of samples;
3. bytes read per data-parallel rank in one epoch, for DP = 1, 2, 4, 8, with lanes (now) and with
   one lane (every rank reads every shard, as before);
4. with --train-steps N: the tiny model trained N steps on each order; the correlation ratio η² of
   the detrended per-step loss with the step's dominant source document, and a PNG of both curves.

    python bench/data.py                                   # 1-3, default corpus, vocab 4096, seq-len 256
    python bench/data.py --train-steps 200 --plot bench/results/data_loss.png --json bench/results/data.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def throughput(root: Path, args) -> list:
    from fluidlm.data.corpus import iter_documents
    from fluidlm.data.loader import ShardLoader
    from fluidlm.data.shards import write_shards

    t0 = time.perf_counter()
    m = write_shards(iter_documents([str(root / "corpus" / "train.jsonl")]), root / "tokenizer.model", args.seq_len,
                     root / "bench-shards", progress=False, shuffle_seed=0)
    rows = [("shard writing (tokenize 2 procs + pack + shuffle + tar)", m["total_tokens"], time.perf_counter() - t0)]
    for workers in (0, 2):
        loader = ShardLoader(root / "bench-shards", micro_batch_size=args.micro_batch, num_workers=workers)
        it = iter(loader)
        next(it)  # start-up (workers, first window) is not throughput
        t0 = time.perf_counter()
        for _ in range(args.batches):
            next(it)
        rows.append((f"loading, num_workers={workers}", args.batches * args.micro_batch * (args.seq_len + 1),
                     time.perf_counter() - t0))
    return rows


def corpus_order_split(root: Path, seq_len: int) -> Path:
    """root/corpus-order/train: the training split in corpus order (what the writer made before)."""
    from fluidlm.data.corpus import iter_documents
    from fluidlm.data.shards import write_shards

    out = root / "corpus-order"
    m = out / "train" / "manifest.json"
    if not m.exists() or json.loads(m.read_text()).get("seq_len") != seq_len:
        write_shards(iter_documents([str(root / "corpus" / "train.jsonl")]), root / "tokenizer.model", seq_len,
                     out / "train", progress=False, shuffle_seed=None)
    return out


ORDERS = {  # name: (data folder under root, loader settings)
    "before: corpus-order shards, one shard at a time": ("corpus-order", {"lanes": 1, "window": 1}),
    "now: shuffled shards, 8 lanes, windows of 2": (".", {"lanes": 8, "window": 2}),
}


def mixing(root: Path, args) -> dict:
    from fluidlm.data.loader import ShardLoader
    from fluidlm.data.shards import load_manifest, read_shard_samples, shard_url

    per_global = args.micro_batch * args.global_micro_batches
    out = {}
    for name, (folder, kw) in ORDERS.items():
        ld = ShardLoader(root / folder / "train", micro_batch_size=args.micro_batch, seed=0, **kw)
        docs = ld.batch_documents(range(args.mix_batches * args.global_micro_batches))
        distinct = [len({d for rows in docs[i:i + args.global_micro_batches] for sample in rows for _, d in sample})
                    for i in range(0, len(docs), args.global_micro_batches)]
        out[name] = float(np.mean(distinct))
    # uniform random sampling of `per_global` samples from the whole split
    m = load_manifest(root / "train")
    sample_docs = []
    for entry in m["shards"]:
        sample_docs += [set(d.tolist()) for d in read_shard_samples(shard_url(m, entry), entry)["docs"]]
    rng = np.random.default_rng(0)
    draws = [len(set().union(*(sample_docs[i] for i in rng.choice(len(sample_docs), per_global, replace=False))))
             for _ in range(2000)]
    out["uniform random sampling"] = float(np.mean(draws))
    out["_samples_per_global_batch"] = per_global
    out["_documents"] = int(m["documents"])
    return out


def rank_bytes(root: Path, args) -> dict:
    import warnings

    from fluidlm.data.loader import ShardLoader

    warnings.filterwarnings("ignore", message="data: .* lanes for")  # one lane on purpose: the "before" case
    total = sum(e["bytes"] for e in json.loads((root / "train" / "manifest.json").read_text())["shards"])
    out = {"total_shard_bytes": total}
    for lanes in (8, 1):
        for dp in (1, 2, 4, 8):
            if lanes == 1 and dp > 1:
                ranks = [0]  # every rank reads every shard: rank 0 stands for all
            else:
                ranks = range(dp)
            got = []
            for r in ranks:
                ld = ShardLoader(root / "train", dp_rank=r, dp_size=dp, micro_batch_size=args.micro_batch, lanes=lanes)
                it = iter(ld)
                for _ in range(ld.batches_per_epoch):
                    next(it)
                got.append(ld.stats["bytes_read"])
            out[f"lanes={lanes} dp={dp}"] = int(max(got))
    return out


def train_runs(root: Path, args, work: Path) -> dict:
    """Train the tiny model on each order (in parallel, one thread each); per-step loss and the
    step's dominant source document."""
    from fluidlm.data.loader import ShardLoader

    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs, runs = {}, {}
    for i, (name, (folder, kw)) in enumerate(ORDERS.items()):
        run = work / f"run{i}"
        overrides = [f"data.dir={root / folder}", f"train.steps={args.train_steps}", f"train.run_dir={run}",
                     f"train.micro_batch_size={args.micro_batch}", f"train.grad_accum={args.global_micro_batches}",
                     "train.threads=1", "logging.mlflow=false", "logging.progress=false", "checkpoint.every=0",
                     f"optim.warmup_steps={min(50, args.train_steps // 4)}",
                     f"data.lanes={kw['lanes']}", f"data.window={kw['window']}"]
        procs[name] = subprocess.Popen([sys.executable, "-m", "fluidlm.train", "--config",
                                        str(ROOT / "configs" / "tiny-cpu.yaml"), *overrides],
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        runs[name] = run
    losses = {}
    for name, proc in procs.items():
        log, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"training on {name!r} failed:\n{log[-3000:]}")
        rows = [json.loads(line) for line in (runs[name] / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in rows]
    return analyse(root, args, losses)


def analyse(root: Path, args, losses: dict) -> dict:
    """Per run: how much of the detrended per-step loss the step's source explains."""
    from fluidlm.data.loader import ShardLoader
    from fluidlm.data.shards import load_manifest

    m = load_manifest(root / "train")
    sizes = Counter()
    out = {}
    for name, loss in losses.items():
        loss = np.asarray(loss)
        folder, kw = ORDERS[name]
        ld = ShardLoader(root / folder / "train", micro_batch_size=args.micro_batch, seed=0, **kw)
        docs = ld.batch_documents(range(len(loss) * args.global_micro_batches))
        steps = [[sample[0][1] for rows_ in docs[s * args.global_micro_batches:(s + 1) * args.global_micro_batches]
                  for sample in rows_] for s in range(len(loss))]
        dominant = [Counter(st).most_common(1)[0][0] for st in steps]
        out[name] = {"loss": loss.tolist(), "dominant": dominant, "steps_docs": steps}
    # the largest documents (by samples in the split) as regressors, the same for every run
    top = [d for d, _ in Counter(d for r in out.values() for st in r["steps_docs"] for d in st).most_common(8)]
    for r in out.values():
        share = np.array([[st.count(d) / len(st) for d in top] for st in r.pop("steps_docs")])
        r.update(source_stats(np.asarray(r["loss"]), r["dominant"], share))
    out["_top_documents"] = top
    out["_documents"] = int(m["documents"])
    return out


def source_stats(loss: np.ndarray, groups: list, share: np.ndarray, skip: int = 20, smooth: int = 25) -> dict:
    """How much the step's source explains the detrended loss (loss − centred moving average, past
    `skip` warm-up steps): R² of a least-squares fit on the step's shares of the 8 largest
    documents (and the same with the steps' shares permuted: what chance gives), the correlation
    ratio η² on the dominant document, and the lag-1 autocorrelation of the detrended loss."""
    pad = smooth // 2
    trend = np.convolve(np.pad(loss, pad, mode="edge"), np.ones(smooth) / smooth, mode="valid")
    resid, g, x = (loss - trend)[skip:], np.asarray(groups)[skip:], share[skip:]

    def r2(features):
        a = np.hstack([features, np.ones((len(features), 1))])
        coef, *_ = np.linalg.lstsq(a, resid, rcond=None)
        return float(1 - ((resid - a @ coef) ** 2).sum() / ((resid - resid.mean()) ** 2).sum())

    def eta(labels):
        total = ((resid - resid.mean()) ** 2).sum()
        between = sum((labels == u).sum() * (resid[labels == u].mean() - resid.mean()) ** 2 for u in np.unique(labels))
        return float(between / total)

    rng = np.random.default_rng(0)
    return {"r2": r2(x), "r2_chance": float(np.mean([r2(x[rng.permutation(len(x))]) for _ in range(50)])),
            "eta2": eta(g), "eta2_chance": float(np.mean([eta(rng.permutation(g)) for _ in range(50)])),
            "autocorr": float(np.corrcoef(resid[:-1], resid[1:])[0, 1]),
            "dominant_runs": float(len(g) / (1 + np.count_nonzero(g[1:] != g[:-1])))}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    result = {k: v for k, v in result.items() if not k.startswith("_")}
    for name, r in result.items():
        ax.plot(range(1, len(r["loss"]) + 1), r["loss"], lw=1,
                label=f"{name} (lag-1 autocorrelation of the detrended loss {r['autocorr']:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("tiny DA model, default corpus: loss per step by data order")
    ax.set_ylim(top=min(8.5, max(max(r["loss"][10:]) for r in result.values()) + 0.2))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="a `fluidlm data prepare` folder to reuse (default: build one in a temp dir)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--global-micro-batches", type=int, default=2, help="micro-batches per global batch (dp × grad_accum)")
    p.add_argument("--batches", type=int, default=300, help="batches timed for the loading rate")
    p.add_argument("--mix-batches", type=int, default=300, help="global batches counted for the mixing figure")
    p.add_argument("--train-steps", type=int, default=0, help="also train the tiny model this many steps on each order")
    p.add_argument("--plot", default=None, help="PNG of the loss curves (with --train-steps)")
    p.add_argument("--json", default=None, help="write every number here")
    p.add_argument("--train-from-json", default=None, help="reuse the training losses of an earlier --json output")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-bytes", action="store_true", help="skip the bytes-per-rank epochs (minutes)")
    args = p.parse_args()

    from fluidlm.data.cli import prepare

    root = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix="fluidlm-bench-"))
    prepare(root, args.vocab_size, args.seq_len)
    corpus_order_split(root, args.seq_len)
    result = {"machine": f"{os.cpu_count()} CPU cores", "vocab_size": args.vocab_size, "seq_len": args.seq_len,
              "micro_batch": args.micro_batch}

    step_s = None
    if not args.skip_throughput:
        rows = throughput(root, args)
        import torch

        from fluidlm.model import FluidLM, ModelConfig
        model = FluidLM(ModelConfig(vocab_size=args.vocab_size, d_model=128, n_layers=2, n_heads=4, head_dim=32))
        opt = torch.optim.AdamW(model.parameters())
        tokens = torch.randint(0, args.vocab_size, (args.micro_batch, args.seq_len + 1))
        for _ in range(3):
            t0 = time.perf_counter()
            model.loss(tokens[:, :-1], tokens[:, 1:]).backward()
            opt.step()
            opt.zero_grad()
            step_s = time.perf_counter() - t0
        step_rate = args.micro_batch * args.seq_len / step_s
        print(f"\ndata throughput, vocab {args.vocab_size}, seq-len {args.seq_len}, micro-batch {args.micro_batch}")
        print("| stage | tokens | seconds | tokens/s | × training step rate |\n|---|---|---|---|---|")
        for name, n, seconds in rows:
            print(f"| {name} | {n:,} | {seconds:.2f} | {n / seconds:,.0f} | {n / seconds / step_rate:.0f}× |")
        print(f"\ntraining step compared with: d_model 128, 2 layers, {args.micro_batch}×{args.seq_len} tokens, "
              f"{step_s:.3f} s/step = {step_rate:,.0f} tokens/s (fp32, CPU)")
        result["throughput"] = [{"stage": n, "tokens": t, "seconds": s} for n, t, s in rows]
        result["step_seconds"] = step_s

    mix = mixing(root, args)
    result["mixing"] = mix
    print(f"\ndistinct source documents per global batch of {mix['_samples_per_global_batch']} samples "
          f"({args.mix_batches} global batches; the split has {mix['_documents']} documents)")
    print("| order | documents per global batch |\n|---|---|")
    for name, v in mix.items():
        if not name.startswith("_"):
            print(f"| {name} | {v:.2f} |")

    rb = None if args.skip_bytes else rank_bytes(root, args)
    if rb is not None:
        result["rank_bytes"] = rb
        print(f"\nbytes read per rank in one epoch (max over ranks; all shards: {rb['total_shard_bytes'] / 2**20:.1f} MiB)")
        print("| DP | lanes (now) | one lane: every rank reads every shard (before) | ratio |\n|---|---|---|---|")
        for dp in (1, 2, 4, 8):
            a, b = rb[f"lanes=8 dp={dp}"], rb[f"lanes=1 dp={dp}"]
            print(f"| {dp} | {a / 2**20:.1f} MiB | {b / 2**20:.1f} MiB | {b / a:.2f}× |")

    runs = None
    if args.train_from_json:
        previous = json.loads(Path(args.train_from_json).read_text())["training"]
        runs = analyse(root, args, {k: v["loss"] for k, v in previous.items() if not k.startswith("_")})
    elif args.train_steps:
        with tempfile.TemporaryDirectory(prefix="fluidlm-bench-train-") as work:
            runs = train_runs(root, args, Path(work))
    if runs is not None:
        result["training"] = runs
        steps = len(next(v for k, v in runs.items() if not k.startswith("_"))["loss"])
        print(f"\ntiny model, {steps} steps of {mix['_samples_per_global_batch']} samples: the detrended per-step loss "
              "against the step's source (R²: least squares on the step's shares of the 8 largest documents; η²: on "
              "its dominant document; chance: the same with the steps' sources permuted)")
        print("| order | loss, mean of last 20 | R² | R² by chance | η² | η² by chance | lag-1 autocorrelation | "
              "steps in a row with one dominant document |")
        print("|---|---|---|---|---|---|---|---|")
        for name, r in runs.items():
            if not name.startswith("_"):
                print(f"| {name} | {np.mean(r['loss'][-20:]):.3f} | {r['r2']:.3f} | {r['r2_chance']:.3f} | "
                      f"{r['eta2']:.3f} | {r['eta2_chance']:.3f} | {r['autocorr']:.2f} | {r['dominant_runs']:.1f} |")
        if args.plot:
            plot(runs, Path(args.plot))
            print(f"plot: {args.plot}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
