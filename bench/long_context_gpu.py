"""Training throughput at long contexts on one GPU: the ~350M DA model, bf16, activation checkpointing.

Two measurements, side by side in one run (issue: prove 64k+ contexts):
  1. the configured context (default 65,536 tokens): peak memory, tokens/s, MFU of a full training
     step (forward, backward, AdamW);
  2. the same tokens per step (default 65,536) at 2k, 8k, 32k and 64k contexts (batch = tokens / N):
     tokens/s at each, and the spread (DA's target: within 10 % of each other).

Plain PyTorch (model, torch AdamW, bf16 autocast with fp32 weights, torch checkpointing per block):
no DeepSpeed, megatron-core or MLflow imports, so it runs on a bare GPU image. Writes
bench/results/long_context_<device>.md/.json with the device, versions, date and the command.

    python bench/long_context_gpu.py                                   # the 350M config, CUDA
    python bench/long_context_gpu.py --device cpu --model '{"d_model":64,"n_layers":2,"n_heads":2,"head_dim":32,"vocab_size":512}' \\
        --seq-lens 256,512 --tokens 1024 --steps 2 --out /tmp/lc      # a smoke run of the script itself
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fluidlm.model import FluidLM  # noqa: E402
from fluidlm.model.config import ModelConfig  # noqa: E402

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, SXM


def model_config(args) -> ModelConfig:
    import yaml

    base = yaml.safe_load((ROOT / args.config).read_text())["model"]
    base.update(json.loads(args.model))
    base["max_seq_len"] = max(base.get("max_seq_len", 0), max(args.seq_lens))
    return ModelConfig.model_validate(base)


def flops_per_token(cfg: ModelConfig, params: int) -> float:
    # The training loop's MFU formula (fluidlm/train/batches.py flops_per_token), chunked DA.
    return 6.0 * params + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * (cfg.chunk_size + cfg.head_dim)


def run_point(cfg: ModelConfig, seq_len: int, tokens: int, steps: int, device, bf16: bool, loss_chunk: int) -> dict:
    torch.manual_seed(0)
    model = FluidLM(cfg).to(device)
    model.activation_checkpointing = True
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    batch = max(1, tokens // seq_len)
    data = torch.randint(3, cfg.vocab_size, (batch, seq_len + 1), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def step():
        with autocast:
            loss = model.loss(data[:, :-1], data[:, 1:], chunk_tokens=loss_chunk)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    step()  # warm-up: kernels compiled, optimizer state allocated
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    params = model.num_parameters()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"seq_len": seq_len, "batch": batch, "tokens_per_step": batch * seq_len, "step_s": step_s,
            "tokens_per_s": batch * seq_len / step_s, "peak_gib": peak, "loss": float(loss),
            "flops_per_token": flops_per_token(cfg, params), "parameters": params}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/da-350m-64k.yaml", help="YAML whose model: section is used")
    p.add_argument("--model", default="{}", help="JSON overrides of the model config")
    p.add_argument("--context", type=int, default=65536, help="the context of measurement 1")
    p.add_argument("--batch-at-context", type=int, default=1, help="sequences per step in measurement 1")
    p.add_argument("--seq-lens", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 8192, 32768, 65536])
    p.add_argument("--tokens", type=int, default=65536, help="tokens per step of measurement 2")
    p.add_argument("--steps", type=int, default=5, help="timed steps per point (median reported)")
    p.add_argument("--loss-chunk", type=int, default=8192)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for MFU (default: by GPU name)")
    p.add_argument("--out", default=None, help="output prefix (default bench/results/long_context_<device>)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; this benchmark measures a GPU (use --device cpu only to smoke-test the script)",
              file=sys.stderr)
        return 2
    device = torch.device(args.device)
    args.seq_lens = sorted(set(args.seq_lens) | {args.context})
    cfg = model_config(args)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    bf16 = device.type == "cuda"

    at_context = run_point(cfg, args.context, args.context * args.batch_at_context, args.steps, device, bf16,
                           args.loss_chunk)
    sweep = []
    for n in sorted(args.seq_lens):
        if n <= args.tokens:
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the previous point's model and optimizer are gone with its frame
            sweep.append(run_point(cfg, n, args.tokens, args.steps, device, bf16, args.loss_chunk))
    for row in [at_context, *sweep]:
        row["mfu"] = row["flops_per_token"] * row["tokens_per_s"] / (peak * 1e12) if peak else None
    rates = [r["tokens_per_s"] for r in sweep]
    spread = (max(rates) - min(rates)) / max(rates) if rates else None

    meta = {"device": name, "torch": torch.__version__, "triton": _version("triton"), "python": platform.python_version(),
            "date": datetime.date.today().isoformat(), "command": "python " + " ".join(sys.argv),
            "precision": "bf16 autocast, fp32 weights" if bf16 else "fp32", "activation_checkpointing": True,
            "da_backend": cfg.da_backend, "model": cfg.model_dump(mode="json"), "peak_tflops": peak}
    lines = [f"# Long-context training throughput: {name}", "",
             f"`{meta['command']}` — torch {meta['torch']}, triton {meta['triton']}, {meta['date']}, "
             f"{meta['precision']}, activation checkpointing, {at_context['parameters'] / 1e6:.1f}M parameters", "",
             f"At {args.context:,} tokens: peak {at_context['peak_gib']:.1f} GiB, {at_context['tokens_per_s']:,.0f} tokens/s, "
             f"MFU {_pct(at_context['mfu'])}", "",
             f"Same tokens per step ({args.tokens:,}) at every context:", "",
             "| context | batch | step s | tokens/s | MFU | peak GiB |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['seq_len']:,} | {r['batch']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {_pct(r['mfu'])} | "
              f"{r['peak_gib']:.1f} |" for r in sweep]
    lines += ["", f"Spread of tokens/s across contexts: {_pct(spread)} (target ≤ 10 %)"]
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"long_context_{'cuda' if bf16 else 'cpu'}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "at_context": at_context, "sweep": sweep,
                                                    "spread": spread}, indent=2))
    print("\n".join(lines))
    print(f"wrote {out.with_suffix('.md')} and .json")
    return 0


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
