"""The training config: schema, overrides, the shipped configs, and bad configs failing fast
(exit code 2, a message naming the field, no traceback, no process group)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from train_helpers import make_dataset, tiny_config, write_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "data", samples=8)


def test_shipped_configs_validate_and_softmax_variants_differ_only_in_attention():
    from fluidlm.train.config import flatten, load_config

    names = {p.name for p in CONFIGS}
    assert {"tiny-cpu.yaml", "da-125m.yaml", "softmax-125m.yaml", "da-350m-64k.yaml", "softmax-350m-64k.yaml"} <= names
    configs = {p.name: load_config(p) for p in CONFIGS}
    for da, softmax in (("da-125m.yaml", "softmax-125m.yaml"), ("da-350m-64k.yaml", "softmax-350m-64k.yaml")):
        a, b = flatten(configs[da].to_dict()), flatten(configs[softmax].to_dict())
        assert {k for k in a if a[k] != b[k]} == {"model.attention", "train.run_dir"}
        assert (a["model.attention"], b["model.attention"]) == ("da", "softmax")


def test_every_field_is_documented():
    from fluidlm.train.config import Config

    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                walk(annotation)

    walk(Config)


def test_overrides_are_yaml_scalars_and_nested(tmp_path, data):
    from fluidlm.train.config import load_config

    path = write_config(tmp_path / "c.yaml", tiny_config(data, tmp_path / "run"))
    config = load_config(path, ["train.steps=200", "model.n_layers=4", "model.pde.scales=[1, 2]",
                                "logging.run_name=abc", "optim.lr=1e-4", "train.stop_at=null"])
    assert config.train.steps == 200 and config.model.n_layers == 4 and config.model.pde.scales == [1, 2]
    assert config.logging.run_name == "abc" and config.optim.lr == 1e-4 and config.train.stop_at is None


@pytest.mark.parametrize("overrides, field", [
    (["optim.lr2=0.1"], "optim.lr2: unknown key; did you mean 'lr'"),
    (["optimm.lr=0.1"], "did you mean 'optim'"),
    (["train.steps=abc"], "train.steps"),
    (["train.micro_batch_size=[1]"], "train.micro_batch_size"),
    (["model.n_heads=3", "parallel.tp=2"], "model.n_heads"),
    (["data.seq_len=2048"], "data.seq_len"),
    (["parallel.zero_stage=4"], "parallel.zero_stage"),
    (["data.dir=/no/such/folder"], "data.dir"),
    (["data.seq_len=32"], "data.seq_len"),          # the shards hold 64-token samples
    (["model.vocab_size=100"], "model.vocab_size"),  # smaller than the data's vocabulary
    (["train.steps"], "section.key=value"),
])
def test_bad_config_names_the_field(tmp_path, data, overrides, field):
    from fluidlm.train.config import ConfigError, load_config, preflight

    path = write_config(tmp_path / "c.yaml", tiny_config(data, tmp_path / "run"))
    with pytest.raises(ConfigError) as info:
        preflight(load_config(path, overrides))
    assert field in str(info.value)


CHECK = """
import sys, time
t = time.perf_counter()
from fluidlm.train.cli import main
code = main(sys.argv[1:])
import torch.distributed as dist
assert "deepspeed" not in sys.modules and not dist.is_initialized(), "validation must come first"
print(f"SECONDS {time.perf_counter() - t:.2f}")
sys.exit(code)
"""


def test_bad_configs_exit_2_fast_without_traceback_or_process_group(tmp_path, data):
    path = write_config(tmp_path / "c.yaml", tiny_config(data, tmp_path / "run"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # Through the real entry point once...
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fluidlm.train", "--config", str(path), "model.n_heads=3", "parallel.tp=2"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "model.n_heads" in proc.stderr
    assert time.perf_counter() - start < 15
    # ...and each kind of mistake in one process that checks DeepSpeed was never imported.
    for overrides in (["optim.lr2=1"], ["train.steps=abc"], ["data.seq_len=4096"], ["data.dir=/no/such"]):
        proc = subprocess.run([sys.executable, "-c", CHECK, "--config", str(path), *overrides],
                              env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and proc.stderr.startswith("error:"), proc.stderr
        assert float(proc.stdout.split("SECONDS")[1]) < 5


def test_resume_with_no_checkpoint_errors_and_existing_checkpoints_need_resume(tmp_path, data):
    from fluidlm.train.cli import main

    path = write_config(tmp_path / "c.yaml", tiny_config(data, tmp_path / "run"))
    assert main(["--config", str(path), "--resume", str(tmp_path / "missing")]) == 2
    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    (step / "client").mkdir(parents=True)
    (step / "client_state.json").write_text('{"world_size": 1, "step": 2, "zero_stage": 0}')
    (step / "mp_rank_00_model_states.pt").write_bytes(b"")
    (step / "client" / "rank_00000.pt").write_bytes(b"")
    assert main(["--config", str(path)]) == 2  # would mix two runs in one folder: ask for --resume auto


def test_print_config(tmp_path, data, capsys):
    from fluidlm.train.cli import main

    path = write_config(tmp_path / "c.yaml", tiny_config(data, tmp_path / "run"))
    assert main(["--config", str(path), "--print-config", "train.steps=3"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["steps"] == 3


def test_param_groups_and_schedule():
    from fluidlm.model import FluidLM
    from fluidlm.train.config import build_config
    from fluidlm.train.optim import lr_factor, param_groups

    config = build_config(tiny_config("unused", "unused", train={"steps": 100}, optim={"warmup_steps": 10, "lr": 1e-3,
                                                                                       "min_lr_ratio": 0.1}))
    model = FluidLM(config.model)
    groups = {g["name"]: g for g in param_groups(model, config)}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    assert {"pde.theta", "blocks.0.attn.flow.proj.bias", "blocks.0.attn_norm.weight", "norm.weight"} <= no_decay
    assert {names[id(p)] for p in groups["rho"]["params"]} == {"blocks.0.attn.rho", "blocks.1.attn.rho"}
    assert groups["rho"]["lr"] == 1e-3 * config.optim.rho_lr_mult and groups["rho"]["weight_decay"] == 0
    assert "embed.weight" in {names[id(p)] for p in groups["decay"]["params"]}
    assert sum(len(g["params"]) for g in groups.values()) == len(names)
    assert lr_factor(0, config) == pytest.approx(0.1) and lr_factor(9, config) == pytest.approx(1.0)
    assert lr_factor(99, config) == pytest.approx(0.1, abs=1e-3)
    assert all(lr_factor(s, config) >= lr_factor(s + 1, config) for s in range(10, 99))


def test_fluidlm_train_subcommand():
    from fluidlm import cli

    assert dict(cli.SUBCOMMANDS)["train"] == "fluidlm.train.cli"
    parser = cli.build_parser()
    args = parser.parse_args(["train", "--config", "x.yaml", "--resume", "auto", "train.steps=3"])
    assert args.overrides == ["train.steps=3"] and args.resume == "auto"
