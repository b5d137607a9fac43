"""The `fluidlm` command.

Each subcommand lives beside the code it drives, in a module with
`register(subparsers)` that adds its parser and sets `func`. Those modules import
heavy libraries (torch, deepspeed, mlflow) inside their functions, so `fluidlm --help`
stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (subcommand, module that registers it). Order is the order shown in --help.
SUBCOMMANDS = [
    ("info", "fluidlm.info"),
    ("data", "fluidlm.data.cli"),
    ("train", "fluidlm.train.cli"),
    ("eval", "fluidlm.eval.cli"),
    ("checkpoint", "fluidlm.train.checkpoint_cli"),
    ("export", "fluidlm.export.cli"),
    ("generate", "fluidlm.generate_cli"),
    ("launch", "fluidlm.launch.cli"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fluidlm",
        description=(
            "FluidLM: train, resume and evaluate long-context Fluid Transformers "
            "(Differential Attention + PDE diffusion) on one CPU or many GPUs."
        ),
        epilog="Run `fluidlm COMMAND --help` for the options of each command.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for _, module in SUBCOMMANDS:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
