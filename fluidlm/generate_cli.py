"""`fluidlm generate`: sample text from a checkpoint or an exported folder, printed as it is produced.

    fluidlm generate --checkpoint runs/demo --prompt "Once upon a time" --max-new-tokens 200 \\
        --temperature 0.8 --top-k 50 --top-p 0.95 --seed 0
    fluidlm generate --checkpoint exports/demo --prompt-file prompt.txt --temperature 0   # greedy

--checkpoint: a step_* folder, a checkpoints/ folder, a run folder, a universal checkpoint, or a folder
written by `fluidlm export`. The tokenizer is the training data's (as `fluidlm eval` finds it), the
export's tokenizer.model, or --tokenizer. --prompt-ids takes token ids instead of text and prints ids.

Causal models decode through FluidLM.forward_stream: the prompt in --prompt-chunk pieces, then one
token at a time. DA carries its recurrent state (constant memory and time per token; prompts longer
than model.max_seq_len work); the softmax baseline a KV cache (grows with the context). Masked-LM
(bidirectional) checkpoints cannot generate: exit 2. On the CPU without --threads, the prompt runs on
torch's default threads and decoding on 1 thread or that many, whichever the first tokens measure
faster (token-by-token decoding of a small model is latency-bound: several OpenMP threads on a busy
machine wait on each other, 71.5 vs 2.2 tokens/s measured). Exit 2 on any bad input, with a message and no traceback. The
generated text goes to stdout; a summary (tokens, tokens/s) to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

EXIT_BAD_INPUT = 2


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text from a checkpoint or an exported folder (streamed)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint (step_*, checkpoints/, run folder, universal) or "
                                                        "a `fluidlm export` folder")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-file", help="file holding the prompt text (UTF-8)")
    prompt.add_argument("--prompt-ids", help="comma-separated token ids (no tokenizer needed; prints ids)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the most likely tokens up to "
                                                            "this probability (1 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-stop", dest="stop", action="store_false", help="do not stop at the end-of-document token")
    p.add_argument("--prompt-chunk", type=int, default=1024, help="DA: prompt tokens per forward_stream call")
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model (default: the training data's / the export's)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for decoding (default: measured at start-up, "
                                                              "1 or torch's default, whichever decodes faster)")
    p.set_defaults(func=run)


class DecodeThreads:
    """Picks the CPU thread count for decoding from the first new tokens: MEASURED tokens at 1 thread,
    MEASURED at torch's default, then the faster for the rest. `step()` is called after each token."""

    MEASURED = 3

    def __init__(self, torch):
        self.torch, self.default = torch, torch.get_num_threads()
        self.trials = [1, self.default] if self.default > 1 else []
        self.times = {}  # threads -> seconds per token
        self.count, self.last = 0, None
        self.chosen = None if self.trials else self.default

    def step(self) -> None:
        now = time.perf_counter()
        self.count += 1
        if self.chosen is not None:
            return
        # token 1 ends the prompt; each trial then times MEASURED tokens
        trial, within = divmod(self.count - 1, self.MEASURED)
        if self.count > 1 and within == 0:
            self.times[self.trials[trial - 1]] = (now - self.last) / self.MEASURED
        if trial < len(self.trials):
            if within == 0:
                self.torch.set_num_threads(self.trials[trial])
                self.last = now
        else:
            self.chosen = min(self.times, key=self.times.get)
            self.torch.set_num_threads(self.chosen)

    def describe(self) -> str:
        if not self.times:
            return f"{self.torch.get_num_threads()} thread(s)"
        tried = ", ".join(f"{n}: {1000 * t:.1f} ms/token" for n, t in self.times.items())
        return f"{self.chosen or self.torch.get_num_threads()} thread(s) for decoding (measured {tried})"


class TextStream:
    """Prints the decoded text of the ids so far as it grows, holding back an incomplete UTF-8
    character (byte-fallback pieces decode to U+FFFD until their last byte arrives)."""

    def __init__(self, tokenizer, out=None):
        self.tok, self.out, self.ids, self.printed = tokenizer, out or sys.stdout, [], 0

    def add(self, token: int) -> None:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)

    def close(self) -> None:
        text = self.tok.decode(self.ids)
        self.out.write(text[self.printed:] + "\n")
        self.out.flush()


def _load(args):
    """(model, tokenizer path or None, eos id)."""
    import torch

    from fluidlm.eval import EvalError
    from fluidlm.eval.inputs import load_model, resolve_checkpoint, training_tokenizer
    from fluidlm.train.checkpoint_read import checkpoint_info
    from fluidlm.export import TOKENIZER, from_pretrained, is_export

    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        raise EvalError("--device cuda but no CUDA device is visible")
    device = torch.device("cuda" if use_cuda else "cpu")
    path = Path(args.checkpoint)
    if is_export(path):
        from fluidlm.export import read_config
        from fluidlm.generate import check_generative
        from fluidlm.model.config import ModelConfig

        check_generative(ModelConfig.model_validate(read_config(path)))
        model = from_pretrained(path, device=device)
        tok = path / TOKENIZER if (path / TOKENIZER).is_file() else None
        where = f"{path / TOKENIZER} is missing"
    else:
        info = checkpoint_info(resolve_checkpoint(path))
        from fluidlm.generate import check_generative
        from fluidlm.model.config import ModelConfig

        check_generative(ModelConfig.model_validate(info.config["model"]))  # before reading the weights
        model = load_model(info, device)
        _, tok, where = training_tokenizer(info)
    if args.tokenizer is not None:
        tok = Path(args.tokenizer)
        if not tok.is_file():
            raise EvalError(f"--tokenizer {args.tokenizer}: no such file")
    return model.eval(), tok, where


def run(args) -> int:
    import torch

    from fluidlm.data import DataError
    from fluidlm.eval import EvalError
    from fluidlm.export import ExportError
    from fluidlm.train.checkpoint_read import CheckpointError
    from fluidlm.generate import GenerateError, generate

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.max_new_tokens < 0 or args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0 \
                or args.prompt_chunk < 1:
            raise GenerateError("need --max-new-tokens ≥ 0, --temperature ≥ 0, 0 < --top-p ≤ 1, --top-k ≥ 0, "
                                "--prompt-chunk ≥ 1")
        if args.prompt_file is not None and not Path(args.prompt_file).is_file():
            raise GenerateError(f"--prompt-file {args.prompt_file}: no such file")
        model, tok_path, where = _load(args)
        tokenizer = None
        if args.prompt_ids is not None:
            try:
                prompt = [int(t) for t in args.prompt_ids.replace(" ", "").split(",") if t]
            except ValueError:
                raise GenerateError(f"--prompt-ids {args.prompt_ids!r}: expected comma-separated integers") from None
        else:
            if tok_path is None:
                raise GenerateError(f"no tokenizer for this checkpoint ({where}); pass --tokenizer PATH (the sentencepiece "
                                    "model it was trained with), or give token ids with --prompt-ids")
            from fluidlm.data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(tok_path)
            text = args.prompt if args.prompt is not None else Path(args.prompt_file).read_text(encoding="utf-8")
            prompt = tokenizer.encode(text)
            if not prompt:
                prompt = [2]  # an empty prompt: start as after an end of document
        tokens = generate(model, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k or None, top_p=args.top_p, seed=args.seed, eos_id=2 if args.stop else None,
                          prompt_chunk=args.prompt_chunk)
        stream = TextStream(tokenizer) if tokenizer is not None else None
        on_cpu = next(model.parameters()).device.type == "cpu"
        threads = DecodeThreads(torch) if on_cpu and not args.threads else None
        start, first, count = time.perf_counter(), None, 0
        for token in tokens:
            if first is None:
                first = time.perf_counter()
            count += 1
            if threads is not None:
                threads.step()
            if stream is not None:
                stream.add(token)
            else:
                print(token, end=" ", flush=True)
        if threads is not None:
            torch.set_num_threads(threads.default)  # as before (run() may be called in-process)
        if stream is not None:
            stream.close()
        elif count:
            print(flush=True)
    except (GenerateError, EvalError, ExportError, DataError, CheckpointError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    end = time.perf_counter()
    rate = f", {(count - 1) / (end - first):.1f} tokens/s after the first" if count > 1 else ""
    print(f"[generate] {len(prompt)} prompt tokens, {count} new tokens in {end - start:.2f} s{rate} "
          f"({model.config.attention}, {'recurrent state' if model.config.attention == 'da' else 'KV cache'}; "
          f"{threads.describe() if threads is not None else f'{torch.get_num_threads()} thread(s)'})", file=sys.stderr)
    return 0
