"""Helpers for the export and generation tests: tiny FluidLMs with weights large enough that
their logits are well separated (no near-ties for greedy decoding), and a checkpoint folder in
DeepSpeed's ZeRO-0 single-process layout (client_state.json + mp_rank_00_model_states.pt) that
`fluidlm eval`'s reader loads, written without a training run."""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 256


def tiny_model_config(attention: str = "da", direction: str = "causal", **overrides) -> dict:
    config = {"vocab_size": VOCAB, "d_model": 32, "n_layers": 2, "n_heads": 2, "head_dim": 16, "chunk_size": 16,
              "max_seq_len": 64, "dropout": 0.0, "attention": attention, "direction": direction,
              "pde": {"enabled": True, "scales": [1, 4], "steps": 2}}
    config.update(overrides)
    return config


def tiny_model(attention: str = "da", direction: str = "causal", seed: int = 0, **overrides):
    """A FluidLM (eval mode) with every weight perturbed, so no parameter sits at its special
    init value (identity conv tap, zero bias), the logits spread over several units and greedy
    decoding does not just repeat a token."""
    from fluidlm.model import FluidLM, ModelConfig

    torch.manual_seed(seed)
    model = FluidLM(ModelConfig.model_validate(tiny_model_config(attention, direction, **overrides)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if name == "embed.weight" else 0.1))
        # a random-signed final norm: else the tied head mostly echoes the last token (h ≈ its embedding)
        model.norm.weight.copy_(torch.randn_like(model.norm.weight))
    return model.eval()


def write_checkpoint(model, run_dir: Path, step: int = 3, data_dir: str | None = None) -> Path:
    """run_dir/checkpoints/step_N as a single-process ZeRO-0 fp32 DeepSpeed checkpoint would hold it."""
    ckpt = Path(run_dir) / "checkpoints" / f"step_{step:08d}"
    (ckpt / "client").mkdir(parents=True, exist_ok=True)
    torch.save({"module": {f"model.{k}": v.clone() for k, v in model.state_dict().items()}},
               ckpt / "mp_rank_00_model_states.pt")
    torch.save({"rng": torch.zeros(1)}, ckpt / "client" / "rank_00000.pt")
    config = {"model": model.config.model_dump(mode="json"),
              "data": {"dir": data_dir or str(Path(run_dir) / "no-data"), "seq_len": 64},
              "train": {"run_dir": str(run_dir)}}
    meta = {"format_version": 1, "step": step, "world_size": 1, "zero_stage": 0, "tp": 1, "pp": 1, "bf16": False,
            "mlflow_run_id": None, "config": config}
    (ckpt / "client_state.json").write_text(json.dumps(meta))
    (ckpt.parent / "latest").write_text(ckpt.name)
    return ckpt


# Never in the clean environment: what the export must load without.
NOT_IN_CLEAN_ENV = {"sentencepiece", "protobuf", "tiktoken", "fluidlm"}


def train_test_tokenizer(path: Path, vocab_size: int = 400) -> Path:
    """A real sentencepiece model (FluidLM's settings) trained on this repo's Python files (0.1 s)."""
    from fluidlm.data.tokenizer import train_tokenizer

    root = Path(__file__).resolve().parents[1]
    train_tokenizer([p.read_text() for p in sorted((root / "fluidlm").rglob("*.py"))], vocab_size, Path(path))
    return Path(path)


def clean_python(folder: Path, packages=("transformers", "torch")) -> Path:
    """A venv whose site-packages holds only `packages` and their dependency closure, linked from
    this environment (no download, under a second): sentencepiece, protobuf, tiktoken and fluidlm
    are not importable there. Returns its python."""
    import importlib.metadata as md
    import re
    import venv

    from packaging.requirements import Requirement

    venv.create(folder, with_pip=False, symlinks=True)
    site = next(Path(folder).glob("lib/python*/site-packages"))
    todo, seen = list(packages), set()
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        assert name not in NOT_IN_CLEAN_ENV, f"{name} is in the closure of {packages}"
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional dependency that is not installed here
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
        root = Path(dist.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            target = site / top
            if not target.exists() and (root / top).exists() and top != "__pycache__":
                target.symlink_to(root / top)
    return Path(folder) / "bin" / "python"
