"""`fluidlm export` (issue 19): a checkpoint → model.safetensors + config.json + self-contained HF code.

The export is read back three ways and must give the checkpoint's logits: safetensors alone (no
pickle), FluidLM.from_pretrained, and transformers' AutoModelForCausalLM(trust_remote_code=True) in
a subprocess where fluidlm cannot be imported (the modeling file is self-contained). Greedy
`.generate()` there equals fluidlm's greedy generation. DA and softmax, causal and bidirectional (logits
only), PDE on (2 steps, 2 scales).
The checkpoints are written by tests/export_helpers.py in the single-process ZeRO-0 layout (eval's
reader, which export reuses, is tested on every other layout in tests/test_eval.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export_helpers import tiny_model, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [5, 17, 200, 3, 99, 42, 7, 7, 128, 64, 1, 250]
NEW = 12
# exported and read back; the bidirectional (masked-LM) ones are not generated from
VARIANTS = {"da": ("da", "causal"), "softmax": ("softmax", "causal"), "da-bidirectional": ("da", "bidirectional"),
            "softmax-bidirectional": ("softmax", "bidirectional")}


def export(args, capsys):
    from fluidlm.cli import main

    code = main(["export", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from fluidlm.cli import main

    tmp = tmp_path_factory.mktemp("export")
    found = {}
    for attention, direction in VARIANTS.values():
        model = tiny_model(attention, direction, seed=1)
        key = attention if direction == "causal" else f"{attention}-bidirectional"
        data = tmp / f"data-{key}"
        (data / "train").mkdir(parents=True)
        tok = data / "tokenizer.model"
        tok.write_bytes(b"a sentencepiece model")  # export copies it; nothing here parses it
        (data / "train" / "manifest.json").write_text(json.dumps({"tokenizer": str(tok), "tokenizer_sha256": "x"}))
        run = tmp / f"run-{key}"
        write_checkpoint(model, run, data_dir=str(data))
        out = tmp / f"export-{key}"
        assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
        found[key] = {"model": model, "run": run, "out": out, "tokenizer": tok}
    return {"tmp": tmp, **found}


def full_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


@pytest.mark.parametrize("attention", list(VARIANTS))
def test_export_reloads_to_the_same_logits(exported, attention):
    from safetensors.torch import load_file

    from fluidlm.model import FluidLM

    e = exported[attention]
    out, model = e["out"], e["model"]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["model.safetensors", "config.json", "generation_config.json", "configuration_fluidlm.py",
                            "modeling_fluidlm.py", "tokenizer.model"]), names
    assert (out / "tokenizer.model").read_bytes() == e["tokenizer"].read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "fluidlm" and config["architectures"] == ["FluidLMForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_fluidlm.FluidLMForCausalLM"
    assert (config["attention"], config["direction"]) == VARIANTS[attention]
    assert config["pde"]["steps"] == 2 and config["fluidlm"]["step"] == 3
    # safetensors alone, no pickle: the model's state dict, the tied embedding/head stored once
    state = load_file(str(out / "model.safetensors"))
    reference = model.state_dict()
    assert sorted(state) == sorted(reference)
    assert not any("head" in k for k in state)
    for k, v in reference.items():
        assert state[k].dtype == torch.float32 and torch.equal(state[k], v), k
    reloaded = FluidLM.from_pretrained(out)
    assert not reloaded.training and reloaded.config == model.config
    ids = PROMPT * 4
    torch.testing.assert_close(full_logits(reloaded, ids), full_logits(model, ids), atol=1e-5, rtol=0)


HF_CHECK = r"""
import json, sys
sys.modules["fluidlm"] = None  # only transformers + torch: `import fluidlm` fails here
import torch
from transformers import AutoModelForCausalLM
out = {}
for name, folder in json.loads(sys.argv[1]).items():
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids = torch.tensor([json.loads(sys.argv[2])])
    with torch.no_grad():
        logits = model(ids.repeat(1, 4)).logits[0]
        gen = None if "bidirectional" in name else \
            model.generate(ids, max_new_tokens=int(sys.argv[3]), do_sample=False, eos_token_id=None)[0, ids.shape[1]:].tolist()
    out[name] = {"logits": logits.tolist(), "generated": gen,
                 "class": type(model).__name__, "dtype": str(next(model.parameters()).dtype)}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def transformers_run(exported):
    pytest.importorskip("transformers")
    folders = {a: str(exported[a]["out"]) for a in VARIANTS}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", HF_CHECK, json.dumps(folders), json.dumps(PROMPT), str(NEW)],
                          cwd=exported["tmp"], env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("attention", list(VARIANTS))
def test_transformers_loads_the_export_without_fluidlm(exported, transformers_run, attention):
    from fluidlm.generate import generate

    got = transformers_run[attention]
    model = exported[attention]["model"]
    assert got["class"] == "FluidLMForCausalLM" and got["dtype"] == "torch.float32"
    torch.testing.assert_close(torch.tensor(got["logits"]), full_logits(model, PROMPT * 4), atol=1e-5, rtol=1e-5)
    if "bidirectional" in attention:
        return
    ours = list(generate(model, PROMPT, max_new_tokens=NEW, temperature=0))
    assert got["generated"] == ours


def test_bf16_export_and_refusals(exported, capsys):
    from safetensors.torch import load_file

    from fluidlm.model import FluidLM

    e = exported["da"]
    out = exported["tmp"] / "bf16"
    code, stdout, err = export(["--checkpoint", str(e["run"] / "checkpoints" / "step_00000003"), "--out", str(out),
                                "--dtype", "bf16"], capsys)
    assert code == 0, err
    assert all(v.dtype == torch.bfloat16 for v in load_file(str(out / "model.safetensors")).values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = FluidLM.from_pretrained(out)
    assert next(reloaded.parameters()).dtype == torch.float32  # upcast into the fp32 model
    torch.testing.assert_close(full_logits(reloaded, PROMPT), full_logits(e["model"], PROMPT), atol=0.3, rtol=0.05)
    # an existing export is not overwritten without --force
    code, _, err = export(["--checkpoint", str(e["run"]), "--out", str(out)], capsys)
    assert code == 2 and "--force" in err
    # a missing checkpoint
    code, _, err = export(["--checkpoint", str(exported["tmp"] / "nope"), "--out", str(exported["tmp"] / "x")], capsys)
    assert code == 2 and "no such file" in err and "nope" in err
    assert not (exported["tmp"] / "x").exists()
    # no training tokenizer found: exported anyway, with a warning that says so
    bare = exported["tmp"] / "bare-run"
    write_checkpoint(e["model"], bare)
    code, stdout, err = export(["--checkpoint", str(bare), "--out", str(exported["tmp"] / "bare")], capsys)
    assert code == 0 and "no tokenizer copied" in err and "--tokenizer" in err
    assert not (exported["tmp"] / "bare" / "tokenizer.model").exists()
    # not an export
    from fluidlm.export import ExportError, from_pretrained

    with pytest.raises(FileNotFoundError, match="no config.json .not a folder written by `fluidlm export`"):
        FluidLM.from_pretrained(exported["tmp"])
    with pytest.raises(ExportError, match="no config.json"):
        from_pretrained(exported["tmp"])


def test_export_of_a_trained_zero1_checkpoint(tmp_path, capsys):
    """A real (2-step, ZeRO-1, DeepSpeed) DA training run exports to the weights eval reads from it."""
    from train_helpers import make_dataset, tiny_config

    from fluidlm.eval.inputs import load_model, resolve_checkpoint
    from fluidlm.train.checkpoint_read import checkpoint_info
    from fluidlm.model import FluidLM

    data = make_dataset(tmp_path / "data", samples=32)
    run = tmp_path / "run"
    config = tiny_config(data, run, model={"dropout": 0.0, "max_seq_len": 128}, train={"steps": 2})
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([{"name": "da", "config": config}]))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "train_runner.py"), str(jobs), str(tmp_path / "res.json")],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ckpt = resolve_checkpoint(run)
    assert json.loads((ckpt / "client_state.json").read_text())["zero_stage"] == 1
    code, stdout, err = export(["--checkpoint", str(run), "--out", str(tmp_path / "export")], capsys)
    assert code == 0, err
    assert "no tokenizer copied" in err  # synthetic data: there is none
    reference = load_model(checkpoint_info(ckpt), torch.device("cpu"))
    reloaded = FluidLM.from_pretrained(tmp_path / "export")
    for k, v in reference.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v), k
    ids = [3 + (5 + 3 * i) % 250 for i in range(40)]
    torch.testing.assert_close(full_logits(reloaded, ids), full_logits(reference, ids), atol=1e-5, rtol=0)


def test_export_refuses_a_foreign_folder_survives_rotation_and_ctrl_c(exported, tmp_path, capsys, monkeypatch):
    """Issue 27: --out non-empty without an export → exit 2 unless --force (which keeps other files);
    an unwritable --out → exit 2 before reading; a checkpoint rotated away while it is read → the
    run's newest one is read; Ctrl-C → exit 130, one line, no model.safetensors (nothing that looks
    like a complete export) and no temporary file."""
    import safetensors.torch

    import fluidlm.train.checkpoint_read as reader

    e = exported["da"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("{\"mine\": 1}")
    code, _, err = export(["--checkpoint", str(e["run"]), "--out", str(foreign)], capsys)
    assert code == 2 and "is not empty and holds no export (config.json)" in err and "--force" in err
    assert (foreign / "config.json").read_text() == "{\"mine\": 1}"
    (tmp_path / "a-file").write_text("x")
    code, _, err = export(["--checkpoint", str(e["run"]), "--out", str(tmp_path / "a-file" / "out")], capsys)
    assert code == 2 and "--out" in err and "is not writable" in err and "Traceback" not in err

    run = tmp_path / "rotating"
    write_checkpoint(e["model"], run, step=3)
    write_checkpoint(e["model"], run, step=4)
    original, calls = reader.read_checkpoint_state, []

    def rotate_then_read(path):  # the training saves step 5 and deletes step 4 (keep 1) meanwhile
        calls.append(Path(path).name)
        if len(calls) == 1:
            write_checkpoint(e["model"], run, step=5)
            shutil.rmtree(path)
        return original(path)

    monkeypatch.setattr(reader, "read_checkpoint_state", rotate_then_read)
    code, _, err = export(["--checkpoint", str(run), "--out", str(foreign), "--force"], capsys)
    assert code == 0, err
    assert calls == ["step_00000004", "step_00000005"] and "rotated away while it was read" in err
    assert json.loads((foreign / "config.json").read_text())["fluidlm"]["step"] == 5

    def interrupted(state, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    code, _, err = export(["--checkpoint", str(run), "--out", str(foreign), "--force"], capsys)
    assert code == 130 and err.strip().count("\n") == 0 and "interrupted (Ctrl-C)" in err, err
    assert not (foreign / "model.safetensors").exists() and not list(foreign.glob(".*tmp"))
