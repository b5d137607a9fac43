"""`fluidlm export`: write a checkpoint as a Hugging Face-style folder (safetensors weights, config.json,
tokenizer, self-contained modeling code).

    fluidlm export --checkpoint runs/demo --out exports/demo [--dtype bf16]

    # then, where only transformers is installed:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("exports/demo", trust_remote_code=True)
    # or, with fluidlm: FluidLM.from_pretrained("exports/demo")

--checkpoint: a step_* folder, a checkpoints/ folder, a run folder (its newest complete checkpoint) or
a universal checkpoint; every layout and ZeRO stage `fluidlm eval` reads. The tokenizer the model was
trained with is found through the training data's manifest (as eval does) and copied; when it is not
found, export says so (pass --tokenizer). --out must be new or empty (or hold an export, with --force);
the checkpoint is verified and read pinned. Exit code 2 on bad input, with a message and no traceback;
Ctrl-C exits 130 and leaves no model.safetensors (no folder that looks like a complete export).
"""

from __future__ import annotations

import argparse
import sys

EXIT_BAD_INPUT = 2


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a checkpoint as a Hugging Face-style folder (safetensors + config + code)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="step_* folder, checkpoints/ folder, run folder or universal "
                                                        "checkpoint. DeepSpeed's files are pickles: load only checkpoints you trust")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="dtype of the stored weights")
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model to copy (default: the training data's)")
    p.add_argument("--force", action="store_true", help="overwrite an existing export in --out, or write into a "
                                                         "non-empty folder that holds no export")
    p.set_defaults(func=run)


def run(args) -> int:
    from fluidlm.eval import EvalError
    from fluidlm.train.checkpoint_read import CheckpointError
    from fluidlm.export import WEIGHTS, ExportError, export_checkpoint

    try:
        result = export_checkpoint(args.checkpoint, args.out, dtype=args.dtype, tokenizer=args.tokenizer, force=args.force)
    except (ExportError, EvalError, CheckpointError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"\ninterrupted (Ctrl-C): export stopped; {args.out} holds no complete export (no {WEIGHTS})",
              file=sys.stderr, flush=True)
        return 130
    for note in result.notes:
        print(f"WARNING: {note}", file=sys.stderr)
    print(f"exported {result.parameters:,} parameters ({result.source}, {args.dtype}) to {result.out}: "
          f"{', '.join(result.files)}" + (f"; tokenizer from {result.tokenizer}" if result.tokenizer else ""))
    return 0
