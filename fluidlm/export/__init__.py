"""`fluidlm export`: a checkpoint → a Hugging Face-style folder; and `from_pretrained` back.

    DIR/model.safetensors          the dense weights under FluidLM's own names (tied embedding/head once)
    DIR/config.json                transformers-style config: model_type, architectures, auto_map, and the
                                   FluidLM model config (fluidlm/model/config.py) at the top level
    DIR/generation_config.json     bos/eos/pad ids, use_cache on (causal models: FluidLMCache)
    DIR/configuration_fluidlm.py   self-contained (transformers + torch only): AutoConfig
    DIR/modeling_fluidlm.py        self-contained reference model: AutoModelForCausalLM(trust_remote_code=True)
    DIR/tokenizer.model            the sentencepiece model the checkpoint was trained with, when found,
    DIR/tokenizer.json, tokenizer_config.json, special_tokens_map.json
                                   the same tokenizer for transformers alone (fluidlm/export/tokenizer.py)

The checkpoint is read by evaluation's reader (fluidlm.eval.inputs: any layout, ZeRO 0-3,
universal checkpoints), so export reads exactly what `fluidlm eval` scores.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

HF_DIR = Path(__file__).resolve().parent / "hf"
MODEL_FILES = ("configuration_fluidlm.py", "modeling_fluidlm.py")
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.model"
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
PAD_ID = 0  # <unk>: the tokenizer has no pad piece; padded positions are masked, so any id works, and
            # unlike </s> it does not hide end-of-document labels from collators that mask the pad id
# ModelConfig fields the exported modeling code implements, and those that do not change an
# eval-mode forward; export refuses a model with any other field off its default, naming it.
EXPORTED_FIELDS = {"vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "ffn_hidden", "attention", "direction",
                   "feature_map", "da_eps", "max_seq_len", "pde", "norm_eps", "rope_theta", "output_gate", "qkv_conv",
                   "output_norm"}
TRAINING_ONLY_FIELDS = {"da_backend", "chunk_size", "dropout", "init_std", "half_life_min", "half_life_max"}


class ExportError(ValueError):
    """Bad export input (checkpoint, output folder, exported folder); the message names the fix."""


@dataclass
class ExportResult:
    out: Path
    files: list[str]
    tokenizer: str | None          # where the copied tokenizer came from, None when not found
    notes: list[str] = field(default_factory=list)
    parameters: int = 0
    source: str = ""


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError:
        raise ExportError("export and from_pretrained need safetensors: pip install 'fluidlm[export]'") from None
    return st


def check_exportable(config) -> None:
    """ExportError naming every model option the exported modeling code does not implement."""
    defaults = type(config)()
    unknown = [f"model.{name}={getattr(config, name)!r}" for name in type(config).model_fields
               if name not in EXPORTED_FIELDS | TRAINING_ONLY_FIELDS and getattr(config, name) != getattr(defaults, name)]
    if unknown:
        raise ExportError(f"{', '.join(unknown)}: not implemented by the exported modeling code "
                          "(fluidlm/export/hf/modeling_fluidlm.py), so transformers would compute another model; "
                          "not exported")


def hf_config(model_config: dict, *, dtype: str, step: int | None = None, source: str | None = None) -> dict:
    """config.json: the transformers keys, then the FluidLM model config (its fields at the top level)."""
    from fluidlm import __version__

    return {
        "model_type": "fluidlm",
        "architectures": ["FluidLMForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_fluidlm.FluidLMConfig",
                     "AutoModelForCausalLM": "modeling_fluidlm.FluidLMForCausalLM"},
        "dtype": DTYPES[dtype],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": PAD_ID,
        "tie_word_embeddings": True,
        "use_cache": True,
        **model_config,
        "fluidlm": {"version": __version__, "step": step, "source": source},
    }


def check_out(out: Path, force: bool) -> None:
    """--out may be new, empty, or (with --force) anything; without --force a folder that holds an
    export or any other file is refused. Then it must be writable. ExportError otherwise."""
    from fluidlm.train.checks import check_writable
    from fluidlm.train.config import ConfigError

    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file, not a folder")
    if not force and out.is_dir():
        if (out / WEIGHTS).exists():
            raise ExportError(f"--out {out} already holds an export ({WEIGHTS}); pass --force to overwrite it")
        others = sorted(p.name for p in out.iterdir())
        if others:
            raise ExportError(f"--out {out} is not empty and holds no export ({', '.join(others[:5])}"
                              f"{', …' if len(others) > 5 else ''}); export into a new or empty folder, or pass "
                              "--force to write the export's files beside those (files of the same name are replaced)")
    try:
        check_writable(out, f"--out {out}")
    except ConfigError as exc:
        raise ExportError(str(exc)) from None


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, dtype: str = "fp32", tokenizer: str | Path | None = None,
                      force: bool = False) -> ExportResult:
    """Write the folder above from a checkpoint (a step_* folder, a checkpoints/ folder, a run folder
    or a universal checkpoint), read pinned (eval's read_pinned: verified, and read again if a running
    training rotates it away). Files are written under temporary names and renamed, model.safetensors
    last (an existing one is removed first): an interrupted export never looks complete (is_export).
    Raises ExportError (or EvalError from the reader) on bad input."""
    import torch

    from fluidlm.eval.inputs import load_model, read_pinned, training_tokenizer

    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    st = _safetensors()
    out = Path(out)
    check_out(out, force)
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise ExportError(f"--tokenizer {tokenizer}: no such file")
    info, dense = read_pinned(checkpoint)
    model = load_model(info, torch.device("cpu"), dense)
    del dense
    check_exportable(model.config)
    torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    # FluidLM's state dict holds the tied embedding/head once (embed.weight); contiguous copies, no sharing.
    state = {k: v.detach().to(torch_dtype if v.is_floating_point() else v.dtype).contiguous().clone()
             for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    model_config = model.config.model_dump(mode="json")
    notes = []
    if tokenizer is not None:
        tok_path = Path(tokenizer)
    else:
        _, tok_path, where = training_tokenizer(info)
        where = f"the training data ({where})" if tok_path is not None else where
        if tok_path is None:
            notes.append(f"no tokenizer copied: the training tokenizer was not found ({where}); copy the sentencepiece "
                         f"model the checkpoint was trained with to {out / TOKENIZER}, or pass --tokenizer PATH")
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=out))  # tokenizer.json & co., moved in like the rest
    try:
        tokenizer_files = []
        if tok_path is not None:
            from fluidlm.export.tokenizer import write_hf_tokenizer

            try:
                tokenizer_files = write_hf_tokenizer(tok_path, staging, model_max_length=model.config.max_seq_len)
            except (RuntimeError, OSError) as exc:  # sentencepiece's error for a file that is not a model
                raise ExportError(f"the tokenizer {tok_path} ({where}) is not a sentencepiece model ({exc}); "
                                  "pass the one the checkpoint was trained with as --tokenizer PATH") from None
        (out / WEIGHTS).unlink(missing_ok=True)  # what marks a folder as an export goes first, comes back last
        writers = {
            CONFIG: lambda tmp: tmp.write_text(json.dumps(hf_config(model_config, dtype=dtype, step=info.step,
                                                                    source=str(info.path)), indent=2)),
            "generation_config.json": lambda tmp: tmp.write_text(json.dumps(
                {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": PAD_ID, "use_cache": True, "do_sample": False},
                indent=2)),
            **{name: (lambda tmp, name=name: shutil.copyfile(HF_DIR / name, tmp)) for name in MODEL_FILES},
            **({TOKENIZER: lambda tmp: shutil.copyfile(tok_path, tmp)} if tok_path is not None else {}),
            **{name: (lambda tmp, name=name: shutil.copyfile(staging / name, tmp)) for name in tokenizer_files},
            WEIGHTS: lambda tmp: st.save_file(state, str(tmp), metadata={"format": "pt", "fluidlm_step": str(info.step),
                                                                         "dtype": DTYPES[dtype]}),
        }
        for name, write in writers.items():
            tmp = out / f".{name}.tmp"
            try:
                write(tmp)
                tmp.replace(out / name)
            finally:
                tmp.unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    files = [WEIGHTS, CONFIG, "generation_config.json", *MODEL_FILES]
    files += [TOKENIZER, *tokenizer_files] if tok_path is not None else []
    return ExportResult(out=out, files=files, tokenizer=str(tok_path) if tok_path is not None else None, notes=notes,
                        parameters=model.num_parameters(), source=info.source)


def read_config(path: str | Path) -> dict:
    """The FluidLM model config of an exported folder (config.json), as a dict of ModelConfig fields."""
    from fluidlm.model.config import ModelConfig

    path = Path(path)
    file = path / CONFIG
    if not file.is_file():
        raise ExportError(f"{path}: no {CONFIG} (not a folder written by `fluidlm export`)")
    try:
        config = json.loads(file.read_text())
    except ValueError as exc:
        raise ExportError(f"{file} is not JSON ({exc})") from None
    if config.get("model_type") != "fluidlm":
        raise ExportError(f"{file}: model_type is {config.get('model_type')!r}, not 'fluidlm'")
    return {k: v for k, v in config.items() if k in ModelConfig.model_fields}


def is_export(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def from_pretrained(path: str | Path, *, dtype=None, device="cpu"):
    """The FluidLM (eval mode) of a folder written by `fluidlm export` (FluidLM.from_pretrained, which
    reads config.json and model.safetensors without pickle); `dtype` a torch dtype or "fp32"/"bf16".
    Raises ExportError naming the problem."""
    import torch

    from fluidlm.model import FluidLM

    _safetensors()
    if isinstance(dtype, str):
        dtype = getattr(torch, DTYPES.get(dtype, dtype))
    path = Path(path)
    try:
        return FluidLM.from_pretrained(path, dtype=dtype, device=device)
    except FileNotFoundError as exc:
        raise ExportError(str(exc)) from None
    except (ValueError, RuntimeError) as exc:  # pydantic's ValidationError is a ValueError
        raise ExportError(f"{path}: the export does not load ({type(exc).__name__}: {str(exc)[:500]})") from None
