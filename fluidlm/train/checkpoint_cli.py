"""`fluidlm checkpoint convert CHECKPOINT --out DIR` (the parser only) and `fluidlm checkpoint verify PATH`.

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


def verify_command(args: argparse.Namespace) -> int:
    """Every checkpoint at PATH (a step_* or universal folder, a checkpoints/ folder, a run folder):
    sizes and checksums of every file, and the step agreeing everywhere. Exit 2 if any fails."""
    import sys
    from pathlib import Path

    from fluidlm.train.checkpoint_read import TAG_RE, problems
    from fluidlm.train.checksums import verify

    path = Path(args.path)
    if (path / "client_state.json").exists() or (path / "universal.json").exists() or TAG_RE.match(path.name):
        folders = [path]
    else:
        parent = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        folders = sorted((p for p in parent.glob("step_*") if TAG_RE.match(p.name)), reverse=True) \
            if parent.is_dir() else []
    if not folders:
        print(f"error: {path}: no checkpoint there (expected a step_* folder, a checkpoints/ folder or a run folder)",
              file=sys.stderr)
        return 2
    failed = 0
    for folder in folders:
        if not (folder / "universal.json").exists():
            incomplete = problems(folder)
            if incomplete:
                print(f"incomplete {folder} (never read by resume or eval): {'; '.join(incomplete)}")
                failed += folder == path  # named directly: that is a failure
                continue
        issues, summary = verify(folder)
        failed += bool(issues)
        print(f"FAILED {folder}: {'; '.join(issues)}" if issues else f"ok {folder}: {summary}",
              file=sys.stderr if issues else sys.stdout)
    return 2 if failed else 0


def register(subparsers) -> None:
    p = subparsers.add_parser("checkpoint", help="checkpoint tools: convert a checkpoint to resume at another layout",
                              description=_description(), formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="checkpoint_command", metavar="ACTION", required=True)
    c = sub.add_parser("convert", help="glue a TP/PP/ZeRO checkpoint into a layout-free universal checkpoint")
    c.add_argument("checkpoint", help="a step_* folder, a checkpoints/ folder or a run folder (its newest checkpoint)")
    c.add_argument("--out", required=True, help="folder to write <step tag>/ into (e.g. runs/x/universal)")
    c.set_defaults(func=run)
    v = sub.add_parser("verify", help="check every file of a checkpoint against its checksums (and its step)")
    v.add_argument("path", help="a step_* or universal folder, a checkpoints/ folder or a run folder (all of them)")
    v.set_defaults(func=verify_command)
