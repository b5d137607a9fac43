"""Data throughput on this machine: shard writing (tokenize + pack + write) and loading (tokens/s),
with the loader's rate compared to a tiny-model CPU training step.

    python bench/data.py                      # default corpus, vocab 4096, seq-len 512
    python bench/data.py --batches 200 --micro-batch 8
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="a `fluidlm data prepare` folder to reuse (default: build one in a temp dir)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=300)
    p.add_argument("--step-seconds", type=float, default=None,
                   help="training step time to compare with (default: measure one tiny-model step)")
    args = p.parse_args()

    from fluidlm.data.cli import prepare
    from fluidlm.data.corpus import iter_documents
    from fluidlm.data.loader import ShardLoader
    from fluidlm.data.shards import write_shards

    root = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix="fluidlm-bench-"))
    prepare(root, args.vocab_size, args.seq_len)
    t0 = time.perf_counter()
    m = write_shards(iter_documents([str(root / "corpus" / "train.jsonl")]), root / "tokenizer.model", args.seq_len,
                     root / "bench-shards", progress=False)
    write_s = time.perf_counter() - t0
    rows = [("shard writing (tokenize 2 procs + pack + tar)", m["total_tokens"], write_s)]

    for workers in (0, 2):
        loader = ShardLoader(root / "bench-shards", micro_batch_size=args.micro_batch, num_workers=workers)
        it = iter(loader)
        next(it)  # start-up (workers, first shard) is not throughput
        t0 = time.perf_counter()
        for _ in range(args.batches):
            next(it)
        rows.append((f"loading, num_workers={workers}", args.batches * args.micro_batch * (args.seq_len + 1),
                     time.perf_counter() - t0))

    step_s = args.step_seconds
    if step_s is None:
        import torch

        from fluidlm.model import FluidLM, ModelConfig
        model = FluidLM(ModelConfig(vocab_size=args.vocab_size, d_model=128, n_layers=2, n_heads=4, head_dim=32))
        opt = torch.optim.AdamW(model.parameters())
        tokens = torch.randint(0, args.vocab_size, (args.micro_batch, args.seq_len + 1))
        for i in range(3):
            t0 = time.perf_counter()
            model.loss(tokens[:, :-1], tokens[:, 1:]).backward()
            opt.step()
            opt.zero_grad()
            step_s = time.perf_counter() - t0
    step_tokens = args.micro_batch * args.seq_len
    print(f"\ndata throughput, vocab {args.vocab_size}, seq-len {args.seq_len}, micro-batch {args.micro_batch}")
    print("| stage | tokens | seconds | tokens/s | × training step rate |")
    print("|---|---|---|---|---|")
    for name, tokens, seconds in rows:
        rate = tokens / seconds
        print(f"| {name} | {tokens:,} | {seconds:.2f} | {rate:,.0f} | {rate / (step_tokens / step_s):.0f}× |")
    print(f"\ntraining step compared with: d_model 128, 2 layers, {args.micro_batch}×{args.seq_len} tokens, "
          f"{step_s:.3f} s/step = {step_tokens / step_s:,.0f} tokens/s (fp32, CPU)")


if __name__ == "__main__":
    main()
