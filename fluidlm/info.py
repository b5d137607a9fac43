"""`fluidlm info`: versions of the stack and which DA backends run here."""

from __future__ import annotations

import argparse
import json


def collect() -> dict:
    import platform

    import torch

    from fluidlm import __version__
    from fluidlm.kernels import available_backends

    info = {
        "fluidlm": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "da_backends": available_backends(),
    }
    for name in ("triton", "deepspeed", "megatron.core", "sentencepiece", "webdataset", "mlflow"):
        try:
            module = __import__(name, fromlist=["__version__"])
            info[name] = getattr(module, "__version__", "installed")
        except Exception as exc:  # report, never crash: this command is for diagnosing installs
            info[name] = f"unavailable ({type(exc).__name__}: {exc})"
    return info


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="show versions and the DA backends available here")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=run)
