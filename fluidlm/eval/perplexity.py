# Over 400 lines: the definitions below are the contract of every reported number and stay with the scorer.
"""Long-context perplexity (docs/design.md §7): the same held-out documents scored at several context
lengths, windowing stated, loss by token position, streaming for DA, data parallel.

    from fluidlm.eval.inputs import load_documents, load_model, resolve_checkpoint
    from fluidlm.train.checkpoint_read import checkpoint_info

    info = checkpoint_info(resolve_checkpoint("runs/demo"))
    model = load_model(info, torch.device("cpu"))
    docs, data_info = load_documents(["data/default/val/manifest.json"], info)
    result = evaluate(model, docs, EvalSpec(context_lengths=[256, 1024], mode="disjoint"))

Definitions (what every number in the output means):

- A document is its token ids followed by EOS (how `fluidlm data` packs them). Its inputs are
  tokens[:-1] and its targets tokens[1:]: a document of L tokens has L-1 scored targets; the
  first token is never predicted (there is nothing before it).
- Context length C: the most input tokens a prediction can see, its own input included.
  `disjoint`: the inputs are cut into consecutive windows of C tokens, each run from an empty
  state; every target is scored exactly once. `sliding` (stride S < C): windows of C tokens start
  every S tokens; each window scores only the targets no earlier window scored (after the first
  window: its last S), so every scored target sees at least C-S tokens. Both modes score every
  target of every document exactly once, at every context length: the tokens behind each
  perplexity are the same for all lengths.
- A document with fewer than C inputs is "short" at length C: it is scored as one window of its
  own length (never padded) and counted in `short_documents`.
- Position p of a scored target: its 1-based index inside its window (= the tokens of context it
  saw). Loss by position is bucketed log2: [1,1], [2,3], [4,7], ..., each bucket's mean NLL.
- `--stream` (causal DA only): each window is fed through `FluidLM.forward_stream` in pieces of
  `stream_chunk` tokens, the recurrent state carried from piece to piece and reset at every window
  start. Same numbers as one full-window forward (float tolerance), memory constant in C: context
  lengths beyond the model's `max_seq_len` are allowed only this way.
- Perplexity = exp(Σ NLL / Σ scored targets) over all documents (natural log).
- Bidirectional checkpoints (train.objective=masked_lm): masked-token perplexity. Each document
  gets a fixed set of masked positions, every non-special token with probability --mask-rate
  (default: the training's train.mlm.rate), from a generator seeded by (--mask-seed, document
  index): the same positions at every context length and world size. A document of L tokens has L
  inputs (no shift); disjoint windows of C tokens, each run from an empty state and seeing both
  sides *within the window*; every masked position of a window is replaced by the mask token (no
  random/kept tokens at evaluation) and scored by the original token's NLL. Position p = the
  1-based index inside the window. `--stream` and `--mode sliding` are next-token notions and are
  refused (a bidirectional window needs all its tokens at once).

Under torchrun every rank scores its own documents (assigned greedily by length, so ranks get
similar work); the NLL sums are all-reduced in float64 (gloo on CPU, NCCL on CUDA).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from fluidlm.eval import EvalError


# --- windows -------------------------------------------------------------------------------------

@dataclass
class EvalSpec:
    context_lengths: list[int]
    mode: str = "disjoint"               # "disjoint" | "sliding"
    stride: int | None = None            # sliding: None = half of each context length
    stream: bool = False
    stream_chunk: int = 2048
    batch_tokens: int = 16384
    dtype: str = "fp32"                  # "fp32" | "bf16" (autocast)
    cp: int = 1                          # context parallelism: each packed row split across this many ranks
    tp: int = 1                          # tensor parallelism: the model's heads/FFN/vocabulary split across ranks
    masking: object = None               # masked_lm checkpoints: the MaskingSpec (mask id, special ids, rate)
    mask_seed: int = 0                   # masked_lm: seed of the fixed evaluation masks

    @property
    def objective(self) -> str:
        return "causal_lm" if self.masking is None else "masked_lm"

    def stride_for(self, c: int) -> int | None:
        if self.mode != "sliding":
            return None
        return self.stride if self.stride is not None else max(1, c // 2)


def windows_for(n_inputs: int, c: int, mode: str, stride: int | None) -> list[tuple[int, int, int]]:
    """(start, length, score_from) of each window over a document's n_inputs inputs: inputs
    [start, start+length) are fed, targets of inputs [start+score_from, start+length) scored."""
    if mode == "disjoint" or n_inputs <= c:
        return [(s, min(c, n_inputs - s), 0) for s in range(0, n_inputs, c)]
    out, prev_end, start = [], 0, 0
    while True:
        end = min(start + c, n_inputs)
        out.append((start, end - start, prev_end - start))
        prev_end = end
        if end == n_inputs:
            return out
        start += stride


def apply_objective(spec: EvalSpec, config: dict, mask_rate: float | None = None) -> EvalSpec:
    """Set spec.masking from a checkpoint's resolved training config: masked_lm checkpoints are
    scored on masked tokens (`mask_rate`: None = the training rate). EvalError for a checkpoint
    whose weights mean nothing (a bidirectional model trained on the next token)."""
    import dataclasses

    from fluidlm.model.objective import MaskingSpec, ObjectiveError, check_checkpoint_objective

    try:
        objective = check_checkpoint_objective(config, "eval")
        spec.masking = None
        if objective == "masked_lm":
            masking = MaskingSpec.from_config(config["train"])
            if mask_rate is not None:
                if not 0 < mask_rate <= 1:
                    raise EvalError(f"--mask-rate must be in (0, 1], got {mask_rate}")
                masking = dataclasses.replace(masking, rate=mask_rate)
            spec.masking = masking
    except ObjectiveError as exc:
        raise EvalError(str(exc)) from None
    return spec


def check_context_lengths(spec: EvalSpec, model_config: dict) -> None:
    """Raise EvalError when a context length or mode cannot run on this model."""
    max_len, attention = int(model_config["max_seq_len"]), model_config["attention"]
    if model_config.get("direction", "causal") != "causal" and spec.masking is None:
        raise EvalError("next-token perplexity needs a causal model; this checkpoint is bidirectional (a masked_lm "
                        "checkpoint is scored on masked tokens: see apply_objective)")
    if spec.masking is not None:
        if spec.stream:
            raise EvalError("--stream does not apply to a masked-LM (bidirectional) checkpoint: streaming feeds a window "
                            "piece by piece, left to right, and a bidirectional model needs every token of the window at "
                            "once (each token reads the ones after it); drop --stream and keep the lengths within "
                            f"model.max_seq_len={max_len}")
        if spec.mode != "disjoint":
            raise EvalError("--mode sliding is a next-token windowing (each window scores only its newest tokens); "
                            "masked-LM checkpoints are scored with --mode disjoint")
    if not spec.context_lengths or any(c < 1 for c in spec.context_lengths):
        raise EvalError(f"--context-lengths must be positive integers, got {spec.context_lengths}")
    if spec.mode not in ("disjoint", "sliding"):
        raise EvalError(f"--mode must be disjoint or sliding, got {spec.mode!r}")
    if spec.stride is not None and spec.mode != "sliding":
        raise EvalError("--stride only applies to --mode sliding")
    if spec.mode == "sliding":
        for c in spec.context_lengths:
            s = spec.stride_for(c)
            if not 1 <= s < c and c > 1:
                raise EvalError(f"--stride {s} must be at least 1 and below every context length (got length {c}); "
                                "a stride of the full length is --mode disjoint")
    if spec.stream and attention != "da":
        raise EvalError(f"--stream needs a causal DA model; this checkpoint has attention={attention!r} "
                        "(its context is bounded by model.max_seq_len)")
    if not spec.stream:
        too_long = [c for c in spec.context_lengths if c > max_len]
        if too_long:
            fix = ("add --stream (DA streams any length in constant memory)" if attention == "da" else
                   "retrain with a larger model.max_seq_len (softmax + RoPE is bounded by it)")
            raise EvalError(f"context length(s) {too_long} exceed what this model supports without streaming "
                            f"(model.max_seq_len={max_len}, attention={attention}); {fix}")


# --- scoring -------------------------------------------------------------------------------------

def n_buckets(c: int) -> int:
    return max(c, 1).bit_length()  # bucket k holds positions [2^k, 2^(k+1) - 1]


def _nll(model, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Per-token NLL (float64) of hidden (M, d) against targets (M,), logits in chunks."""
    out = []
    for s in range(0, hidden.shape[0], chunk):
        logits = model.parallel.lm_logits(hidden[s:s + chunk], model.embed.weight)
        out.append(model.parallel.token_nll(logits, targets[s:s + chunk]).double())  # vocab-parallel under TP
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float64)


class Accumulator:
    """Σ NLL and counts, overall and per log2 position bucket, for one context length."""

    def __init__(self, c: int, device):
        self.nb = n_buckets(c)
        self.nll = torch.zeros(self.nb, dtype=torch.float64, device=device)
        self.count = torch.zeros(self.nb, dtype=torch.float64, device=device)

    def add(self, nll: torch.Tensor, positions: torch.Tensor) -> None:
        bucket = torch.floor(torch.log2(positions.double())).long().clamp(max=self.nb - 1)
        self.nll += torch.bincount(bucket, weights=nll, minlength=self.nb)
        self.count += torch.bincount(bucket, minlength=self.nb).double()


CP_MIN_SHARD = 32  # ≥ the PDE halo (max(scales)·steps, 16 by default) and the flow conv's 3 tokens


def _score_packed(model, docs, windows, device, acc: Accumulator, autocast, cp=None, mlm=None) -> int:
    """Non-streaming: windows packed into one sequence (cu_seqlens: each window is its own
    document for the model). `cp` = (group, size, rank): score this rank's shard of the row.
    `mlm` = (per-document bool masks, mask id): masked-LM scoring (inputs = the window with its
    masked positions replaced by the mask id, targets = the window itself, scored at the masked
    positions). Returns tokens scored (by this rank)."""
    toks, tgts, cu, keep, pos = [], [], [0], [], []
    for d, start, length, score_from in windows:
        doc = docs[d]
        if mlm is not None:
            selected = mlm[0][d][start:start + length]
            toks.append(np.where(selected, mlm[1], doc[start:start + length]))
            tgts.append(doc[start:start + length])
            keep.append(selected.copy())
        else:
            toks.append(doc[start:start + length])
            tgts.append(doc[start + 1:start + length + 1])
            mask = np.zeros(length, dtype=bool)
            mask[score_from:] = True
            keep.append(mask)
        cu.append(cu[-1] + length)
        pos.append(np.arange(1, length + 1))
    if cp is not None:  # context parallelism: pad the row (an unscored document) to cp equal shards
        group, cp_size, cp_rank = cp
        total = max(cu[-1], cp_size * CP_MIN_SHARD)
        total = -(-total // cp_size) * cp_size
        if total > cu[-1]:
            pad = total - cu[-1]
            toks.append(np.zeros(pad, dtype=toks[0].dtype))
            tgts.append(np.zeros(pad, dtype=tgts[0].dtype))
            keep.append(np.zeros(pad, dtype=bool))
            pos.append(np.ones(pad, dtype=np.int64))
            cu.append(total)
    tokens = torch.from_numpy(np.concatenate(toks)).to(device)[None]
    targets = torch.from_numpy(np.concatenate(tgts)).to(device)
    keep_t = torch.from_numpy(np.concatenate(keep)).to(device)
    positions = torch.from_numpy(np.concatenate(pos)).to(device)
    cu_seqlens = torch.tensor(cu, dtype=torch.int64, device=device) if len(cu) > 2 else None
    if cp is not None:  # this rank's contiguous shard; the layers see the global cu_seqlens
        n = tokens.shape[1] // cp_size
        sl = slice(cp_rank * n, (cp_rank + 1) * n)
        tokens, targets, keep_t, positions = tokens[:, sl], targets[sl], keep_t[sl], positions[sl]
        cu_seqlens = cu_seqlens if cu_seqlens is not None else torch.tensor([0, total], device=device)
    with autocast():
        hidden = model.hidden_states(tokens, cu_seqlens)[0]
        nll = _nll(model, hidden[keep_t], targets[keep_t])
    acc.add(nll, positions[keep_t])
    return int(keep_t.sum())


def _score_stream(model, docs, windows, device, acc: Accumulator, chunk: int, autocast) -> int:
    """Streaming: windows of equal length as a batch, fed `chunk` tokens at a time through
    forward_stream with the state carried (constant memory in the window length)."""
    length = windows[0][2]
    inputs = torch.from_numpy(np.stack([docs[d][s:s + length] for d, s, _, _ in windows])).to(device)
    targets = torch.from_numpy(np.stack([docs[d][s + 1:s + length + 1] for d, s, _, _ in windows])).to(device)
    score_from = torch.tensor([f for _, _, _, f in windows], device=device)
    state, scored = None, 0
    for a in range(0, length, chunk):
        b = min(a + chunk, length)
        with autocast():
            logits, state = model.forward_stream(inputs[:, a:b], state)
        offsets = torch.arange(a, b, device=device)
        keep = offsets[None, :] >= score_from[:, None]  # (B, n)
        if keep.any():
            nll = model.parallel.token_nll(logits[keep], targets[:, a:b][keep]).double()
            acc.add(nll, (offsets[None, :] + 1).expand_as(keep)[keep])
            scored += int(keep.sum())
        del logits
    return scored


def evaluate(model, docs: list[np.ndarray], spec: EvalSpec, *, rank: int = 0, world: int = 1, device=None,
             progress: bool = True) -> list[dict]:
    """Score `docs` at every context length; under a process group (world > 1) each rank scores
    its share and the sums are all-reduced. Returns one result dict per context length."""
    device = device or next(model.parameters()).device
    progress = progress and rank == 0
    cp = None
    if spec.cp > 1:  # ranks (r // cp) share documents; each scores a shard of every packed row
        if spec.stream:
            raise EvalError("--cp and --stream do not combine: streaming already scores any length on one rank")
        if world % spec.cp:
            raise EvalError(f"--cp {spec.cp} does not divide the world size {world}")
        import torch.distributed as dist

        from fluidlm.parallel.parallelize import context_parallel

        groups = [dist.new_group(list(range(g, g + spec.cp))) for g in range(0, world, spec.cp)]
        cp = (groups[rank // spec.cp], spec.cp, rank % spec.cp)
        context_parallel(model, cp[0])
        rank, world = rank // spec.cp, world // spec.cp
    tp_rank = 0
    if spec.tp > 1:  # the TP group scores the same windows; rank `tp_rank == 0` reports them
        from megatron.core import parallel_state as ps

        tp_rank = ps.get_tensor_model_parallel_rank()
        rank, world = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    mine = assign_documents([len(d) for d in docs], world)[rank]
    mlm, shift = None, 1  # causal: a document of L tokens has L-1 inputs; masked LM: L
    if spec.masking is not None:
        from fluidlm.model.objective import evaluation_mask

        mlm = ({d: evaluation_mask(docs[d], spec.masking, spec.mask_seed, d) for d in mine}, spec.masking.mask_id)
        shift = 0
    if device.type == "cuda" and spec.dtype == "bf16":
        def autocast():
            return torch.autocast("cuda", dtype=torch.bfloat16)
    elif spec.dtype == "bf16":
        def autocast():
            return torch.autocast("cpu", dtype=torch.bfloat16)
    else:
        import contextlib

        autocast = contextlib.nullcontext
    plans = {}
    total = 0
    for c in spec.context_lengths:
        plan = [(d, s, n, f) for d in mine for (s, n, f) in windows_for(len(docs[d]) - shift, c, spec.mode,
                                                                           spec.stride_for(c))]
        plans[c] = plan
        total += sum(int(mlm[0][d][s:s + n].sum()) if mlm else n - f for d, s, n, f in plan)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="eval", unit="tok", unit_scale=True, dynamic_ncols=True, file=sys.stderr)
    results = []
    with torch.no_grad():
        for c in spec.context_lengths:
            t0 = time.perf_counter()
            acc = Accumulator(c, device)
            plan = plans[c]
            if bar is not None:
                bar.set_description(f"eval ctx {c}")
            if spec.stream:
                chunk = max(1, min(spec.stream_chunk, c))
                by_len: dict[int, list] = {}
                for w in plan:
                    by_len.setdefault(w[2], []).append(w)
                per_batch = max(1, spec.batch_tokens // chunk)
                for length, ws in sorted(by_len.items()):
                    for i in range(0, len(ws), per_batch):
                        n = _score_stream(model, docs, ws[i:i + per_batch], device, acc, chunk, autocast)
                        if bar is not None:
                            bar.update(n)
            else:
                cap = max(spec.batch_tokens, c)
                batch, used = [], 0
                for w in plan + [None]:
                    if batch and (w is None or used + w[2] > cap):
                        n = _score_packed(model, docs, batch, device, acc, autocast, cp, mlm)
                        if bar is not None:
                            bar.update(n)
                        batch, used = [], 0
                    if w is not None:
                        batch.append(w)
                        used += w[2]
            short = sum(1 for d in mine if len(docs[d]) - shift < c)
            # (under CP the sums add up shards; the document counts are counted once per CP group)
            owner = (cp is None or cp[2] == 0) and tp_rank == 0
            counts = torch.tensor([short, len(mine), len(plan)] if owner else [0, 0, 0], dtype=torch.float64,
                                  device=device)
            packed = torch.cat([acc.nll, acc.count, counts])
            if tp_rank:  # TP ranks hold the same sums: count them once
                packed[:2 * acc.nb] = 0
            if world > 1 or cp is not None or spec.tp > 1:
                import torch.distributed as dist

                dist.all_reduce(packed)
            nb = acc.nb
            nll, count, (short, ndocs, nwin) = packed[:nb].cpu(), packed[nb:2 * nb].cpu(), packed[2 * nb:].tolist()
            tokens = int(count.sum())
            loss = float(nll.sum() / max(tokens, 1))
            buckets = []
            for k in range(nb):
                lo, hi = 2 ** k, min(2 ** (k + 1) - 1, c)
                n_k = int(count[k])
                buckets.append({"start": lo, "end": hi, "tokens": n_k,
                                "loss": float(nll[k] / n_k) if n_k else None})
            results.append({
                "context_length": c,
                "perplexity": math.exp(min(loss, 700.0)),
                "loss": loss,
                "tokens": tokens,
                "documents": int(ndocs),
                "short_documents": int(short),
                "windows": int(nwin),
                "stride": spec.stride_for(c),
                "seconds": time.perf_counter() - t0,
                "loss_by_position": buckets,
            })
    if bar is not None:
        bar.close()
    return results


def assign_documents(lengths: list[int], world: int) -> list[list[int]]:
    """Documents per rank: longest first to the least-loaded rank (ties: lowest rank), each rank's
    list in document order. Deterministic, so every rank computes the same assignment."""
    if world == 1:
        return [list(range(len(lengths)))]
    load = [0] * world
    out: list[list[int]] = [[] for _ in range(world)]
    for d in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(world), key=lambda k: (load[k], k))
        out[r].append(d)
        load[r] += lengths[d]
    return [sorted(x) for x in out]
