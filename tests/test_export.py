"""`fluidlm export` (issue 19): a checkpoint → model.safetensors + config.json + self-contained HF code.

The export is read back three ways and must give the checkpoint's logits: safetensors alone (no
pickle), FluidLM.from_pretrained, and transformers' AutoModelForCausalLM(trust_remote_code=True) in
a clean environment (a venv holding only transformers, torch and their dependencies: no fluidlm,
sentencepiece or protobuf), with no MISSING/UNEXPECTED key. Greedy `.generate()` there, with its
cache (one token per step) and without, and batched with left padding, equals fluidlm's greedy
generation; a left-padded row has the unpadded row's logits. DA and softmax, causal and
bidirectional (logits only), the DA variants (output_gate, qkv_conv, output_norm), PDE on (2 steps,
2 scales). AutoTokenizer there loads the exported tokenizer.json and gives sentencepiece's ids.
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

from export_helpers import clean_python, tiny_model, train_test_tokenizer, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [5, 17, 200, 3, 99, 42, 7, 7, 128, 64, 1, 250]
NEW = 12
# exported and read back; the bidirectional (masked-LM) ones are not generated from
VARIANTS = {"da": ("da", "causal"), "softmax": ("softmax", "causal"), "da-bidirectional": ("da", "bidirectional"),
            "softmax-bidirectional": ("softmax", "bidirectional"), "da-gate": ("da", "causal"),
            "da-qkv-conv": ("da", "causal"), "da-output-norm": ("da", "causal")}
OPTIONS = {"da-gate": {"output_gate": "sigmoid"}, "da-qkv-conv": {"qkv_conv": 3},
           "da-output-norm": {"output_norm": "rmsnorm", "output_gate": "silu", "feature_map": "elu1"}}
TOKENIZER_FILES = ["tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
SECOND_PROMPT = [9, 8, 77, 31, 4]  # shorter: left-padded in the batch
# sentencepiece's ids on these must come back from AutoTokenizer: code, whitespace runs, tabs and
# newlines, Unicode (byte fallback), the special pieces' text (never matched in text), digits
TEXTS = ["def main(x):\n    return x  # ok\n\n", "  leading and trailing  ", "\t tabs\tand\n\nnewlines \n",
         "naïve café — 日本語 🎉 e\u0301", "<mask> <s> </s> <unk>", "3.14159 and 1,000,000", "", " ", "x" * 300,
         "\x00\x01 control bytes"]


def export(args, capsys):
    from fluidlm.cli import main

    code = main(["export", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from fluidlm.cli import main

    tmp = tmp_path_factory.mktemp("export")
    tokenizer = train_test_tokenizer(tmp / "tokenizer.model")
    found = {}
    for key, (attention, direction) in VARIANTS.items():
        model = tiny_model(attention, direction, seed=1, **OPTIONS.get(key, {}))
        data = tmp / f"data-{key}"
        (data / "train").mkdir(parents=True)
        tok = data / "tokenizer.model"
        tok.write_bytes(tokenizer.read_bytes())
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
                            "modeling_fluidlm.py", *TOKENIZER_FILES]), names
    assert (out / "tokenizer.model").read_bytes() == e["tokenizer"].read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "fluidlm" and config["architectures"] == ["FluidLMForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_fluidlm.FluidLMForCausalLM"
    assert (config["attention"], config["direction"]) == VARIANTS[attention]
    assert all(config[k] == v for k, v in OPTIONS.get(attention, {}).items())
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
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folders, prompt, second, new, texts = (json.loads(a) for a in sys.argv[1:])
out = {}
for name, folder in folders.items():
    model, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    model.eval()
    ids = torch.tensor([prompt])
    got = {"loading": {k: sorted(v) for k, v in info.items() if v}, "class": type(model).__name__,
           "dtype": str(next(model.parameters()).dtype)}
    with torch.no_grad():
        got["logits"] = model(ids.repeat(1, 4)).logits[0].tolist()
        if "bidirectional" not in name:
            fed = []  # tokens per forward: the prompt, then one per step with the cache
            hook = model.embed.register_forward_hook(lambda m, i, o: fed.append(i[0].shape[1]))
            gen = lambda **kw: model.generate(do_sample=False, eos_token_id=None, max_new_tokens=new, **kw)
            got["generated"] = gen(input_ids=ids)[0, len(prompt):].tolist()
            got["fed"] = fed
            hook.remove()
            got["uncached"] = gen(input_ids=ids, use_cache=False)[0, len(prompt):].tolist()
            pad = len(prompt) - len(second)
            batch = torch.tensor([prompt, [0] * pad + second])
            mask = torch.tensor([[1] * len(prompt), [0] * pad + [1] * len(second)])
            got["batched"] = gen(input_ids=batch, attention_mask=mask)[:, len(prompt):].tolist()
            got["padded_logits"] = model(batch, attention_mask=mask).logits[1, pad:].tolist()
    out[name] = got
tok = AutoTokenizer.from_pretrained(next(iter(folders.values())), trust_remote_code=False)  # no custom code
out["tokenizer"] = {"ids": [tok.encode(t, add_special_tokens=False) for t in texts],
                    "decoded": [tok.decode(tok.encode(t, add_special_tokens=False)) for t in texts],
                    "max_length": tok.model_max_length, "special": {k: getattr(tok, k + "_id") for k in
                                                                     ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")}}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def transformers_run(exported):
    pytest.importorskip("transformers")
    python = clean_python(exported["tmp"] / "clean-venv")
    folders = {a: str(exported[a]["out"]) for a in VARIANTS}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    args = [json.dumps(x) for x in (folders, PROMPT, SECOND_PROMPT, NEW, TEXTS)]
    proc = subprocess.run([str(python), "-c", HF_CHECK, *args], cwd=exported["tmp"],
                          env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("{"), proc.stdout[:500] + proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("attention", list(VARIANTS))
def test_transformers_loads_the_export_without_fluidlm(exported, transformers_run, attention):
    from fluidlm.generate import generate

    got = transformers_run[attention]
    model = exported[attention]["model"]
    assert got["loading"] == {}, got["loading"]  # no missing, unexpected or mismatched key
    assert got["class"] == "FluidLMForCausalLM" and got["dtype"] == "torch.float32"
    torch.testing.assert_close(torch.tensor(got["logits"]), full_logits(model, PROMPT * 4), atol=1e-5, rtol=1e-5)
    if "bidirectional" in attention:
        return
    ours = list(generate(model, PROMPT, max_new_tokens=NEW, temperature=0))
    assert got["generated"] == ours and got["uncached"] == ours
    assert got["fed"] == [len(PROMPT)] + [1] * (NEW - 1)  # the cache: one new token per step
    assert got["batched"] == [ours, list(generate(model, SECOND_PROMPT, max_new_tokens=NEW, temperature=0))]
    torch.testing.assert_close(torch.tensor(got["padded_logits"]), full_logits(model, SECOND_PROMPT), atol=1e-5,
                               rtol=1e-5)


def test_autotokenizer_gives_sentencepieces_ids_without_sentencepiece(exported, transformers_run):
    from fluidlm.data.tokenizer import load_tokenizer

    sp = load_tokenizer(exported["da"]["tokenizer"])
    got = transformers_run["tokenizer"]
    assert got["ids"] == [sp.encode(t) for t in TEXTS]
    assert got["decoded"] == TEXTS  # byte fallback and whitespace round-trip
    assert got["max_length"] == exported["da"]["model"].config.max_seq_len
    assert got["special"] == {"bos_token": 1, "eos_token": 2, "unk_token": 0, "pad_token": 0,
                              "mask_token": sp.piece_to_id("<mask>")}
    # a longer, varied text: this repository's tests, token for token
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(exported["da"]["out"]))
    text = "".join(p.read_text() for p in sorted((ROOT / "tests").glob("test_*.py"))[:8])
    assert tok.encode(text, add_special_tokens=False) == sp.encode(text)


def test_export_refuses_a_model_option_its_code_does_not_implement(monkeypatch):
    from fluidlm import export
    from fluidlm.model import ModelConfig

    # every ModelConfig field is either implemented by the exported code or training-only
    assert set(ModelConfig.model_fields) == export.EXPORTED_FIELDS | export.TRAINING_ONLY_FIELDS
    export.check_exportable(ModelConfig(qkv_conv=3, dropout=0.1))
    monkeypatch.setattr(export, "EXPORTED_FIELDS", export.EXPORTED_FIELDS - {"qkv_conv"})
    export.check_exportable(ModelConfig())  # off: fine
    with pytest.raises(export.ExportError, match=r"model\.qkv_conv=3: not implemented by the exported modeling code"):
        export.check_exportable(ModelConfig(qkv_conv=3))


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
