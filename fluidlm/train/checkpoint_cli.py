"""`fluidlm checkpoint convert CHECKPOINT --out DIR`: the parser only.

The command's work is in fluidlm/train/universal.py, which needs torch; this module registers the
parser without importing it, so `fluidlm --help` and `fluidlm checkpoint --help` stay fast. The
description is universal.py's docstring, read from its source (not by importing it).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util


def _description() -> str | None:
    spec = importlib.util.find_spec("fluidlm.train.universal")
    if spec is None or not spec.origin:
        return None
    try:
        with open(spec.origin, encoding="utf-8") as f:
            return ast.get_docstring(ast.parse(f.read()))
    except (OSError, SyntaxError):
        return None


def run(args: argparse.Namespace) -> int:
    from fluidlm.train.universal import run as convert_command

    return convert_command(args)


def register(subparsers) -> None:
    p = subparsers.add_parser("checkpoint", help="checkpoint tools: convert a checkpoint to resume at another layout",
                              description=_description(), formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="checkpoint_command", metavar="ACTION", required=True)
    c = sub.add_parser("convert", help="glue a TP/PP/ZeRO checkpoint into a layout-free universal checkpoint")
    c.add_argument("checkpoint", help="a step_* folder, a checkpoints/ folder or a run folder (its newest checkpoint)")
    c.add_argument("--out", required=True, help="folder to write <step tag>/ into (e.g. runs/x/universal)")
    c.set_defaults(func=run)
