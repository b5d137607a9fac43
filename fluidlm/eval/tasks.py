"""`fluidlm eval --task mqar | passkey`: does the model use its context? (docs/design.md §7)

- **mqar** (fluidlm/data/synthetic.py): on each test set (a `test-<L>x<P>` folder of `fluidlm data
  synthetic mqar`, or any split of it), the share of the scored targets (the values after the
  queries; nothing else) whose greedy (argmax) prediction is the value, per (sequence length, pairs).
  Each sample is one window from an empty state; DA with --stream feeds it in --stream-chunk pieces.
- **passkey** (Mohtashami & Jaggi 2023): for every context length C and needle depth d, prompts of
  C tokens (filler, "The pass key is N. Remember it. N is the pass key." at depth d, "What is the
  pass key? The pass key is"), --passkey-trials keys each. Two scores: exact match of the greedy
  continuation with the key's digit tokens, and the rank (1 = best) of the true key's log-likelihood
  among 100 keys (itself + 99 random others of as many digits), which ranks a weak model's preference
  long before it can write the key (ties count half: a model indifferent to the key ranks it 50.5). The prompt is streamed through `forward_stream` (DA: constant
  memory at any length; softmax: its KV cache, up to model.max_seq_len).

Both take a model through `predict`/`forward_stream`, so a test can hand in a handcrafted one.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch

from fluidlm.eval import EvalError

RANK_CANDIDATES = 100


# --- MQAR ---------------------------------------------------------------------------------------------

def greedy_predictions(model, stream: bool = False, chunk: int = 2048, head_chunk: int = 4096):
    """inputs (B, L) → argmax predictions (B, L) of a FluidLM, in one forward or streamed in
    `chunk`-token pieces (the state carried); the LM head runs over `head_chunk` positions at a time."""
    def head(hidden):
        flat = hidden.flatten(0, 1)
        out = [model.parallel.lm_logits(flat[s:s + head_chunk], model.embed.weight).argmax(-1)
               for s in range(0, flat.shape[0], head_chunk)]
        return torch.cat(out).view(hidden.shape[:2])

    @torch.no_grad()
    def predict(inputs):
        if not stream:
            return head(model.hidden_states(inputs))
        state, out = None, []
        for a in range(0, inputs.shape[1], chunk):
            logits, state = model.forward_stream(inputs[:, a:a + chunk], state)
            out.append(logits.argmax(-1))
        return torch.cat(out, dim=1)
    return predict


def recall_accuracy(predict, tokens: np.ndarray, loss_mask: np.ndarray, batch: int = 8) -> dict:
    """{"accuracy", "right", "scored"} of `predict` on samples (n, L + 1) with their loss masks:
    inputs tokens[:, :-1], targets tokens[:, 1:] scored where loss_mask[:, 1:]."""
    right = scored = 0
    for first in range(0, len(tokens), batch):
        rows = torch.from_numpy(np.asarray(tokens[first:first + batch], dtype=np.int64))
        keep = torch.from_numpy(np.asarray(loss_mask[first:first + batch, 1:], dtype=bool))
        hits = predict(rows[:, :-1]) == rows[:, 1:]
        right += int(hits[keep].sum())
        scored += int(keep.sum())
    return {"accuracy": right / max(scored, 1), "right": right, "scored": scored}


def mqar_splits(inputs: list[str]) -> list[Path]:
    """The manifests to score: each input is a split folder / manifest.json, or an MQAR data folder
    (all its test-* splits)."""
    out = []
    for item in inputs:
        p = Path(item)
        if p.name == "manifest.json":
            out.append(p)
        elif (p / "manifest.json").is_file():
            out.append(p / "manifest.json")
        elif p.is_dir() and sorted(p.glob("test-*/manifest.json")):
            out += sorted(p.glob("test-*/manifest.json"), key=lambda m: (len(m.parent.name), m.parent.name))
        else:
            raise EvalError(f"--data {item}: no manifest.json and no test-*/ splits there; make them with "
                            "`fluidlm data synthetic mqar --out FOLDER`")
    return out


def read_task_split(manifest_path: Path, task: str, vocab_size: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """(manifest, tokens, loss_mask) of a loss-masked split of `task`; EvalError otherwise."""
    from fluidlm.data import DataError
    from fluidlm.data.shards import load_manifest, read_shard_samples, shard_url

    try:
        manifest = load_manifest(manifest_path)
        info = manifest.get("task") or {}
        if info.get("name") != task or not manifest.get("loss_mask"):
            raise EvalError(f"{manifest_path} is not a {task} split (its task: {info.get('name')!r}); make one with "
                            f"`fluidlm data synthetic {task}`")
        tokens, masks = [], []
        for entry in manifest["shards"]:
            got = read_shard_samples(shard_url(manifest, entry), entry, manifest["seq_len"], vocab_size)
            tokens += got["tokens"]
            masks += got["loss_mask"]
    except DataError as exc:
        raise EvalError(str(exc)) from None
    return manifest, np.stack(tokens), np.stack(masks)


def score_mqar(model, splits: list[tuple[dict, np.ndarray, np.ndarray]], stream: bool, chunk: int,
               batch_tokens: int, progress: bool = False) -> list[dict]:
    predict = greedy_predictions(model, stream, chunk)
    results = []
    for manifest, tokens, mask in splits:
        t0 = time.perf_counter()
        task = manifest["task"]
        got = recall_accuracy(predict, tokens, mask, batch=max(1, batch_tokens // tokens.shape[1]))
        results.append({"split": Path(manifest["root"]).name, "seq_len": task["seq_len"], "num_pairs": task["num_pairs"],
                        "examples": len(tokens), **got, "seconds": time.perf_counter() - t0})
        if progress:
            print(f"  {results[-1]['split']}: accuracy {got['accuracy']:.4f} ({got['right']}/{got['scored']})",
                  flush=True)
    return results


def format_mqar(results: list[dict], train_len: int | None) -> str:
    lines = [f"{'seq_len':>8} {'pairs':>6} {'accuracy':>9} {'scored':>8} {'examples':>9}  note", "-" * 56]
    for r in results:
        note = "beyond training length" if train_len and r["seq_len"] > train_len else ""
        lines.append(f"{r['seq_len']:>8} {r['num_pairs']:>6} {r['accuracy']:>9.4f} {r['scored']:>8} "
                     f"{r['examples']:>9}  {note}")
    return "\n".join(lines)


# --- passkey --------------------------------------------------------------------------------------------

def _stream(model, ids: list[int], state, chunk: int):
    """Feed ids through forward_stream; (logits of the last position (V,), state)."""
    x = torch.tensor([ids], dtype=torch.int64)
    logits = None
    for a in range(0, x.shape[1], chunk):
        logits, state = model.forward_stream(x[:, a:a + chunk], state)
    return logits[0, -1].float(), state


@torch.no_grad()
def passkey_trial(model, text, key: int, length: int, depth: float, rng: np.random.Generator, chunk: int) -> dict:
    """One prompt of `length` tokens (answer included) with the key at `depth`: greedy exact match
    and the true key's rank by log-likelihood among RANK_CANDIDATES keys."""
    from fluidlm.data.synthetic import KEY_DIGITS

    answer = text.key_ids(key)
    prompt = text.prompt(key, length - len(answer), depth)
    last, state = _stream(model, prompt, None, chunk)
    greedy, st, logits = [], copy.deepcopy(state), last
    for _ in answer:
        greedy.append(int(logits.argmax()))
        logits, st = _stream(model, greedy[-1:], st, chunk)
    others = set()
    while len(others) < RANK_CANDIDATES - 1:
        k = int(rng.integers(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS))
        if k != key:
            others.add(k)
    scores = []
    for k in [key, *sorted(others)]:
        ids = text.key_ids(k)
        logp = torch.log_softmax(last, -1)[ids[0]].item()
        if len(ids) > 1:
            logits, _ = model.forward_stream(torch.tensor([ids[:-1]]), copy.deepcopy(state))
            logp += torch.log_softmax(logits[0].float(), -1).gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
        scores.append(logp)
    # ties count half (the expected rank under a random tie-break): a model indifferent to the key ranks it ~50.5
    rank = 1 + sum(s > scores[0] for s in scores[1:]) + 0.5 * sum(s == scores[0] for s in scores[1:])
    return {"exact": greedy == answer, "rank": rank, "prompt_tokens": len(prompt)}


def score_passkey(model, text, lengths: list[int], depths: list[float], trials: int, seed: int, chunk: int,
                  progress: bool = False) -> list[dict]:
    from fluidlm.data.synthetic import random_key

    results = []
    for length in lengths:
        for depth in depths:
            t0 = time.perf_counter()
            rng = np.random.default_rng([seed, length, int(round(depth * 1000))])
            runs = [passkey_trial(model, text, random_key(rng), length, depth, rng, chunk) for _ in range(trials)]
            results.append({"context_length": length, "depth": depth, "trials": trials,
                            "exact_match": sum(r["exact"] for r in runs) / trials,
                            "mean_rank": sum(r["rank"] for r in runs) / trials,
                            "top1_by_likelihood": sum(r["rank"] == 1 for r in runs) / trials,  # strictly best
                            "ranks": [r["rank"] for r in runs], "seconds": time.perf_counter() - t0})
            if progress:
                r = results[-1]
                print(f"  length {length} depth {depth}: exact {r['exact_match']:.2f}, mean rank {r['mean_rank']:.1f}"
                      f" of {RANK_CANDIDATES}", flush=True)
    return results


def format_passkey(results: list[dict], key: str = "exact_match") -> str:
    lengths = sorted({r["context_length"] for r in results})
    depths = sorted({r["depth"] for r in results})
    cell = {(r["context_length"], r["depth"]): r for r in results}
    head = f"{'depth':>6} " + " ".join(f"{c:>9}" for c in lengths)
    lines = [f"{key} (rows: needle depth, columns: context length)", head, "-" * len(head)]
    for d in depths:
        lines.append(f"{d:>6.2f} " + " ".join(f"{cell[(c, d)][key]:>9.2f}" for c in lengths))
    return "\n".join(lines)


def plot_passkey(results: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["context_length"] for r in results})
    depths = sorted({r["depth"] for r in results})
    cell = {(r["context_length"], r["depth"]): r for r in results}
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key, label, vmax in ((axes[0], "exact_match", "greedy exact match", 1.0),
                                 (axes[1], "mean_rank", f"mean rank of the key among {RANK_CANDIDATES}", RANK_CANDIDATES)):
        grid = np.array([[cell[(c, d)][key] for c in lengths] for d in depths])
        im = ax.imshow(grid, vmin=1 if key == "mean_rank" else 0, vmax=vmax, aspect="auto",
                       cmap="RdYlGn_r" if key == "mean_rank" else "RdYlGn")
        ax.set_xticks(range(len(lengths)), [f"{c // 1024}k" if c >= 1024 else str(c) for c in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
        ax.set_xlabel("context length")
        ax.set_ylabel("needle depth")
        ax.set_title(label)
        for i in range(len(depths)):
            for j in range(len(lengths)):
                ax.text(j, i, f"{grid[i, j]:.2g}", ha="center", va="center", fontsize=8)
        fig.colorbar(im, ax=ax)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
