"""The evaluation report's table (printed) and plot (PNG beside the JSON): `format_table(report)`,
`plot(report, path)`. `report` is the JSON `fluidlm eval` writes (fluidlm/eval/cli.py)."""

from __future__ import annotations

from pathlib import Path


def format_table(report: dict) -> str:
    train_len = report.get("train_seq_len")
    lines = [f"{'context':>8} {'perplexity':>11} {'loss':>8} {'tokens':>11} {'docs':>6} {'short':>6} {'windows':>8}  note",
             "-" * 72]
    for r in report["results"]:
        note = "beyond training length" if train_len and r["context_length"] > train_len else ""
        lines.append(f"{r['context_length']:>8} {r['perplexity']:>11.3f} {r['loss']:>8.4f} {r['tokens']:>11,} "
                     f"{r['documents']:>6} {r['short_documents']:>6} {r['windows']:>8}  {note}")
    mode = report["mode"] + (f" (stride {report['stride'] or 'C/2'})" if report["mode"] == "sliding" else "")
    lines.append(f"mode: {mode}; stream: {report['stream']}; training length {train_len}; model max_seq_len "
                 f"{report['model']['max_seq_len']}")
    m = report.get("masking")
    if m:
        lines.append(f"objective: masked_lm — masked-token perplexity: {m['rate']:.0%} of the non-special tokens of each "
                     f"document (seed {m['seed']}, the same positions at every length) replaced by the mask token "
                     f"(id {m['mask_id']}) and scored; each window sees both sides within itself")
    return "\n".join(lines)


MIN_BUCKET_SHARE = 0.01  # a position bucket with fewer tokens than this share of its length's tokens (or
MIN_BUCKET_TOKENS = 100  # than this many) is drawn apart: a handful of tokens makes a misleading spike


def position_points(result: dict) -> tuple[list, list]:
    """(well-populated, sparse) points (bucket centre, mean loss) of one context length's loss by
    position; sparse buckets are drawn as open markers, not joined to the curve."""
    total = sum(bk["tokens"] for bk in result["loss_by_position"])
    floor = max(MIN_BUCKET_TOKENS, MIN_BUCKET_SHARE * total)
    full, sparse = [], []
    for bk in result["loss_by_position"]:
        if bk["tokens"]:
            (full if bk["tokens"] >= floor else sparse).append(((bk["start"] * bk["end"]) ** 0.5, bk["loss"]))
    return full, sparse


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    res = report["results"]
    a.plot([r["context_length"] for r in res], [r["perplexity"] for r in res], "o-")
    a.set_xscale("log", base=2)
    a.set_xlabel("context length (tokens)")
    a.set_ylabel("masked-token perplexity" if report.get("masking") else "perplexity")
    a.set_title(f"perplexity vs context ({report['mode']}{', stream' if report['stream'] else ''})")
    if report.get("train_seq_len"):
        a.axvline(report["train_seq_len"], color="gray", ls="--", lw=1, label="training length")
        a.legend()
    any_sparse = False
    for r in res:
        full, sparse = position_points(r)
        line = b.plot(*zip(*full), "o-", ms=3, label=f"ctx {r['context_length']}")[0] if full else None
        if sparse:
            any_sparse = True
            b.plot(*zip(*sparse), "o", ms=5, mfc="none", color=line.get_color() if line else None)
    if any_sparse:
        b.annotate(f"open markers: buckets with < {MIN_BUCKET_SHARE:.0%} of the tokens (or < {MIN_BUCKET_TOKENS})",
                   (0.01, 0.01), xycoords="axes fraction", fontsize=7, color="gray")
    b.set_xscale("log", base=2)
    b.set_xlabel("token position in window (log2 buckets)")
    b.set_ylabel("mean loss (nats)")
    b.set_title("loss by position")
    b.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
