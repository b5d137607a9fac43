"""`fluidlm train --config FILE [--resume auto|PATH] [section.key=value ...]`

One process: `fluidlm train --config configs/tiny-cpu.yaml`.
Many: `torchrun --nproc-per-node=N -m fluidlm.train --config ...` (same arguments).

Everything that can be checked before a process group exists is checked first (config schema,
data folder, validation split, run folder writable and not in use by another training, checkpoint
to resume and its checksums): a bad config fails in about a second with exit code 2 and a message
naming the field, without a traceback. Rank 0 holds the run folder's lock (fluidlm/train/runlock.py)
until it exits; under torchrun every worker dies with its agent (die_with_parent).
"""

from __future__ import annotations

import argparse
import os
import sys

EXIT_CONFIG = 2
EXIT_SAVE = 4  # a checkpoint could not be written (full disk, I/O error)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML run config (see configs/)")
    p.add_argument("--resume", metavar="auto|PATH", default=None,
                   help="auto: continue from this run's newest complete checkpoint (start fresh if there is none); "
                        "PATH: a checkpoint folder (step_*), a checkpoints/ folder or a run folder. "
                        "Load only checkpoints you trust: DeepSpeed's files are pickles")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="dotted overrides, values parsed as YAML (train.steps=200 model.n_layers=4); "
                        "with `fluidlm train` put them after the options")


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train (or resume) a model from a YAML config; torchrun for many processes",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def prepare(args: argparse.Namespace):
    """Validate everything that needs no process group. Returns (config, checkpoint or None)."""
    from fluidlm.train.checkpoint_read import CheckpointError, complete_checkpoints, resolve_resume
    from fluidlm.train import runlock
    from fluidlm.train.checks import check_layout, check_resume, check_validation, check_writable
    from fluidlm.train.config import load_config, preflight

    config = load_config(args.config, args.overrides)
    if args.print_config:
        return config, None
    preflight(config)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_layout(config, world)
    check_validation(config, world)
    check_writable(config.run_dir, f"train.run_dir={config.train.run_dir!r}")
    if os.environ.get("RANK", "0") == "0":  # one writer per run folder: held until this process ends
        runlock.acquire(config.run_dir)
    resume_from = resolve_resume(args.resume, config.checkpoint_dir)  # checks the checkpoint is complete
    if args.resume is None and complete_checkpoints(config.checkpoint_dir):
        raise CheckpointError(f"train.run_dir={config.train.run_dir!r} already holds checkpoints; pass --resume auto "
                              "to continue that run, or choose another train.run_dir")
    if resume_from is not None:
        check_resume(resume_from, config, world)
    elif args.resume == "auto" and os.environ.get("RANK", "0") == "0":
        print(f"--resume auto: no checkpoint in {config.checkpoint_dir} yet; starting from step 0", flush=True)
    return config, resume_from


def run(args: argparse.Namespace) -> int:
    from fluidlm.data import DataError
    from fluidlm.train.checkpoint_read import CheckpointError
    from fluidlm.train.config import ConfigError, dump_yaml
    from fluidlm.train.distributed import die_with_parent
    from fluidlm.train.runlock import RunLockError

    rank = int(os.environ.get("RANK", "0"))
    die_with_parent()
    try:
        config, resume_from = prepare(args)
    except (ConfigError, CheckpointError, DataError, RunLockError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    if args.print_config:
        print(dump_yaml(config), end="")
        return 0

    from fluidlm.train.checkpoint import CheckpointSaveError
    from fluidlm.train.loop import shutdown, train

    try:
        code = train(config, resume_from)
    except CheckpointSaveError as exc:  # every rank raised it together (checkpoint.save agrees first)
        print(f"error (rank {rank}): {exc}", file=sys.stderr, flush=True)
        shutdown()
        # Leave right after the barrier, all ranks at once: an interpreter teardown of a second or more
        # let torchrun see one rank exit 4 and SIGTERM the others before they could report 4 themselves.
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_SAVE)
        return EXIT_SAVE
    except (DataError, CheckpointError) as exc:  # found after start-up (e.g. a corrupt shard or checkpoint file)
        print(f"error (rank {rank}): {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    # Only a normal return reaches the barrier: after an exception the other ranks may be inside
    # another collective, and torchrun ends them when this process exits non-zero.
    shutdown()
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fluidlm.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_intermixed_args(argv))  # overrides may come before or after the options
