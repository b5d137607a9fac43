"""`fluidlm info`: the installed stack, which optional pieces are missing (and what that turns
off), and which DA backends run here, with the reason when one does not."""

from __future__ import annotations

import argparse
import json
import os

# (import name, distribution name, required?, what needs it). Required: FluidLM does not import
# without it. Optional: only the named feature stops working; everything else runs.
PACKAGES = [
    ("torch", "torch", True, "everything"),
    ("numpy", "numpy", True, "data, training"),
    ("pydantic", "pydantic", True, "config validation"),
    ("yaml", "PyYAML", True, "configs"),
    ("sentencepiece", "sentencepiece", True, "the tokenizer"),
    ("tqdm", "tqdm", True, "progress bars (training, data, eval)"),
    ("deepspeed", "deepspeed", False, "fluidlm train / launch (the training engine) and reading ZeRO-3 checkpoints"),
    ("megatron.core", "megatron-core", False, "tensor parallelism (parallel.tp > 1, fluidlm eval --tp)"),
    ("webdataset", "webdataset", False, "writing shards (fluidlm data shards / prepare); reading needs only tarfile"),
    ("triton", "triton", False, "the fused GPU DA kernels (backend='triton')"),
    ("mlflow", "mlflow", False, "MLflow logging; without it training and eval warn once and keep metrics.jsonl / JSON"),
    ("fla", "fla-core", False, "the fla chunk_simple_gla peer in bench/da_gpu.py"),
    ("matplotlib", "matplotlib", False, "PNG plots of fluidlm eval and the benches (skipped with a warning)"),
    ("safetensors", "safetensors", False, "fluidlm export and FluidLM.from_pretrained (pip install 'fluidlm[export]')"),
    ("transformers", "transformers", False, "loading an export with AutoModelForCausalLM (not needed by fluidlm itself)"),
]
TRITON_FLOOR = (3, 4)  # triton.knobs (used by fluidlm/kernels/triton_da.py) exists from Triton 3.4


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def package_status(module: str, dist: str, load: bool = False) -> dict:
    """{"version": str | None, "status": "ok" | "missing" | "broken: <error>"}, never raising. The
    version comes from the installed metadata; only `load=True` imports the module (a broken
    install shows then), so `fluidlm info` stays quick and quiet."""
    import importlib
    import importlib.metadata
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a blocked entry in sys.modules
        found = False
    if not found:
        return {"version": None, "status": "missing"}
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = None
    if load:
        try:
            mod = importlib.import_module(module)
        except Exception as exc:  # report, never crash: this command is for diagnosing installs
            return {"version": version, "status": f"broken: import fails ({type(exc).__name__}: {str(exc)[:200]})"}
        version = str(getattr(mod, "__version__", None) or version)
    return {"version": version or "unknown version", "status": "ok"}


def triton_status(packages: dict, cuda: bool) -> str:
    """Why backend='triton' does or does not run here, in one line."""
    triton = packages["triton"]
    if triton["status"] == "missing":
        return "unavailable: triton is not installed (pip install 'triton>=3.4,<3.8'); DA uses chunked"
    if triton["status"] != "ok":
        return f"unavailable: triton is {triton['status']}; DA uses chunked"
    if _version_tuple(triton["version"]) < TRITON_FLOOR:
        return (f"unavailable: triton {triton['version']} is too old; the kernels use triton.knobs (Triton >= "
                f"{'.'.join(map(str, TRITON_FLOOR))}); DA uses chunked")
    try:
        import fluidlm.kernels.triton_da  # noqa: F401  (decorates the kernels; needs no GPU)
    except Exception as exc:
        return f"unavailable: fluidlm/kernels/triton_da.py does not import ({type(exc).__name__}: {str(exc)[:200]})"
    if not cuda:
        return ("interpreter only: no CUDA device, so the Triton kernels run only under TRITON_INTERPRET=1 "
                "(as the CPU tests do); backend='auto' uses chunked here")
    return "available (compiled on first use); backend='auto' uses it for CUDA tensors"


def collect() -> dict:
    import platform

    from fluidlm import __version__

    packages = {}
    for module, dist, required, needed_for in PACKAGES:
        packages[module] = {**package_status(module, dist, load=module in ("torch", "triton")), "required": required,
                           "for": needed_for}
    info = {
        "fluidlm": __version__,
        "fluidlm_path": os.path.dirname(os.path.abspath(__file__)),
        "python": platform.python_version(),
        "packages": packages,
        "missing_required": [m for m, p in packages.items() if p["required"] and p["status"] != "ok"],
        "missing_optional": [m for m, p in packages.items() if not p["required"] and p["status"] != "ok"],
    }
    if packages["torch"]["status"] != "ok":
        info.update(cuda=False, device=None, da_backends={}, da_auto=None)
        return info

    import torch

    from fluidlm.kernels import available_backends

    cuda = torch.cuda.is_available()
    info["cuda"] = cuda
    info["torch_cuda_build"] = torch.version.cuda
    info["device"] = torch.cuda.get_device_name(0) if cuda else None
    triton = triton_status(packages, cuda)
    backends = {name: triton if name.startswith("triton") else "available" for name in available_backends()}
    backends["triton"] = triton
    info["da_backends"] = backends
    info["da_auto"] = "triton" if backends["triton"].startswith("available") else "chunked"
    return info


def format_text(info: dict) -> str:
    lines = [f"fluidlm      {info['fluidlm']} ({info['fluidlm_path']})", f"python       {info['python']}"]
    if info.get("cuda") is not None:
        device = info.get("device") or "no CUDA device"
        build = info.get("torch_cuda_build")
        lines.append(f"device       {device}" + (f" (torch CUDA build {build})" if build else " (CPU build of torch)"))
    lines += ["", "packages:"]
    width = max(len(m) for m in info["packages"])
    for module, p in info["packages"].items():
        kind = "required" if p["required"] else "optional"
        if p["status"] == "ok":
            lines.append(f"  {module:<{width}}  {p['version']}")
        else:
            lines.append(f"  {module:<{width}}  {p['status'].upper() if p['status'] == 'missing' else p['status']} "
                         f"({kind}; needed for {p['for']})")
    if info["missing_required"]:
        lines.append(f"missing required: {', '.join(info['missing_required'])} — FluidLM cannot run without them")
    lines.append("missing optional: " + (", ".join(info["missing_optional"]) or "none"))
    if info.get("da_backends"):
        lines += ["", "DA backends:"]
        width = max(len(b) for b in info["da_backends"])
        for name, status in info["da_backends"].items():
            lines.append(f"  {name:<{width}}  {status}")
        lines.append(f"  backend='auto' on this machine: {info['da_auto']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 1 if info["missing_required"] else 0


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="show the installed stack, missing optional pieces and the DA backends here")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=run)
