"""What an evaluation reads: the checkpoint (found, read into the dense FluidLM, optionally cut for
TP) and the documents to score (checked against the tokenizer the model was trained with, found
from the checkpoint's training config). Errors are EvalError. Checkpoint formats are
fluidlm/train/checkpoint_read.py's; rebuilding documents from shards is fluidlm/data/documents.py's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from fluidlm.eval import EvalError
from fluidlm.train.checkpoint_read import CheckpointInfo


# --- checkpoints ---------------------------------------------------------------------------------

def resolve_checkpoint(path: str | Path) -> Path:
    """A step_* folder, a checkpoints/ folder, a run folder (newest complete checkpoint) or a
    universal checkpoint (`fluidlm checkpoint convert`) → the checkpoint folder."""
    from fluidlm.train.checkpoint_read import CheckpointError, resolve_resume

    path = Path(path)
    if not path.exists():
        raise EvalError(f"--checkpoint {path}: no such file or folder")
    try:
        found = resolve_resume(str(path), path / "checkpoints")
    except CheckpointError as exc:
        raise EvalError(str(exc).replace("--resume", "--checkpoint")) from None
    if found is None:
        raise EvalError(f"--checkpoint {path}: no complete checkpoint there")
    return found


PIN_ATTEMPTS = 3


def read_pinned(path: str | Path) -> tuple[CheckpointInfo, dict]:
    """(info, dense fp32 state) of the checkpoint `path` names (see resolve_checkpoint), verified and
    read at once. A running training may rotate that checkpoint away meanwhile (checkpoint.keep): when
    its folder vanished, a run or checkpoints/ folder is resolved again (the newest complete
    checkpoint, up to PIN_ATTEMPTS times); a step_* folder named directly is an error saying so."""
    from fluidlm.train.checkpoint_read import CheckpointError, checkpoint_info, read_checkpoint_state

    for _ in range(PIN_ATTEMPTS):
        found = resolve_checkpoint(path)
        try:
            info = checkpoint_info(found)
            _, state, info.source = read_checkpoint_state(found)
            return info, state
        except (CheckpointError, OSError) as exc:
            if found.exists():
                raise EvalError(str(exc)) from None
            if found.resolve() == Path(path).resolve():
                raise EvalError(f"--checkpoint {path} was deleted while it was read (a running training keeps only "
                                "its newest checkpoint.keep checkpoints); pass the run folder to read its newest "
                                "checkpoint") from None
            print(f"note: {found} was rotated away while it was read; reading the newest checkpoint again",
                  file=sys.stderr, flush=True)
    raise EvalError(f"--checkpoint {path}: its newest checkpoint was rotated away {PIN_ATTEMPTS} times while it was "
                    "read; try again, or copy a checkpoint elsewhere first")


def load_model(info: CheckpointInfo, device: torch.device, state: dict | None = None):
    """The dense FluidLM of a checkpoint, in eval mode on `device` (no DeepSpeed engine); `state`:
    its dense state dict when already read (read_pinned)."""
    from fluidlm.model import FluidLM
    from fluidlm.model.config import ModelConfig
    from fluidlm.train.checkpoint_read import CheckpointError, read_checkpoint_state

    if state is None:
        try:
            _, state, info.source = read_checkpoint_state(info.path)
        except CheckpointError as exc:
            raise EvalError(str(exc)) from None
    model = FluidLM(ModelConfig.model_validate(info.config["model"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise EvalError(f"{info.path}: the weights do not fit the model in its config (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    return model.to(device).eval()


# --- documents -----------------------------------------------------------------------------------

def _candidate_data_dirs(config: dict, run_dir: Path | None) -> list[Path]:
    """Where the training data folder may be: absolute, relative to the cwd, or relative to the
    training's cwd (recovered from the run folder's absolute path and the config's relative one)."""
    data_dir = Path(config["data"]["dir"])
    if data_dir.is_absolute():
        return [data_dir]
    out = [Path.cwd() / data_dir]
    rel_run = Path(config["train"]["run_dir"])
    if run_dir is not None and not rel_run.is_absolute():
        absolute = run_dir.resolve()
        parts = rel_run.parts
        if len(absolute.parts) > len(parts) and absolute.parts[-len(parts):] == parts:
            out.append(Path(*absolute.parts[:-len(parts)]) / data_dir)
    return out


def training_tokenizer(info: CheckpointInfo) -> tuple[str | None, Path | None, str]:
    """(sha256, tokenizer file, where found) of the tokenizer the model was trained with, from the
    training data's manifest. (None, None, why) when the training data cannot be found."""
    cfg = info.config
    split = cfg["data"].get("train_split", "train")
    for data_dir in _candidate_data_dirs(cfg, info.run_dir):
        manifest = data_dir / split / "manifest.json"
        if manifest.is_file():
            try:
                m = json.loads(manifest.read_text())
            except (OSError, ValueError):
                continue
            tok = Path(m["tokenizer"]) if m.get("tokenizer") else None
            if tok is None or not tok.is_file():
                tok = data_dir / "tokenizer.model" if (data_dir / "tokenizer.model").is_file() else None
            return m.get("tokenizer_sha256"), tok, str(manifest)
    return None, None, f"training data {cfg['data']['dir']!r} not found"


def load_documents(inputs: list[str], info: CheckpointInfo, *, tokenizer: str | None = None, max_docs: int | None = None,
                   max_tokens: int | None = None, min_doc_tokens: int = 0, max_doc_tokens: int | None = None,
                   quiet: bool = False):
    """The documents to score (int64 arrays, EOS last) and a DataInfo (fluidlm/data/documents.py).
    Checks the data was made with the tokenizer the model was trained with (sha256), raising
    EvalError on a mismatch."""
    from fluidlm.data import DataError
    from fluidlm.data.documents import load_documents as read_documents

    try:
        return read_documents(inputs, vocab_size=int(info.config["model"]["vocab_size"]),
                              train_tokenizer=training_tokenizer(info), tokenizer=tokenizer, max_docs=max_docs,
                              max_tokens=max_tokens, min_doc_tokens=min_doc_tokens, max_doc_tokens=max_doc_tokens,
                              quiet=quiet)
    except DataError as exc:
        raise EvalError(str(exc)) from None
