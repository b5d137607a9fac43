"""A thin machine (issue 14): `--help` of every command imports neither torch, deepspeed, megatron-core
nor mlflow (each in a fresh interpreter), and training and evaluation finish without MLflow
installed, warning once and keeping metrics.jsonl / the JSON report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train_helpers import make_dataset, read_metrics, tiny_config, write_config

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "deepspeed", "megatron", "mlflow")
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

LIST_COMMANDS = """
import argparse, json
from fluidlm.cli import build_parser
def walk(parser, prefix):
    out = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += walk(sub, prefix + [name])
    return out
import sys
print(json.dumps({"commands": walk(build_parser(), []), "heavy": sorted(m for m in sys.modules if m.split('.')[0] in %r)}))
""" % (HEAVY,)

HELP = """
import sys, time, json
t = time.perf_counter()
from fluidlm.cli import main
try:
    main(sys.argv[1:] + ["--help"])
except SystemExit:
    pass
print(json.dumps({"heavy": sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in %r}),
                  "seconds": time.perf_counter() - t}))
""" % (HEAVY,)

HIDE_MLFLOW = """
import sys
sys.modules["mlflow"] = None  # `import mlflow` raises ImportError, as on a machine without it
from fluidlm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_help_of_every_command_imports_no_heavy_library():
    listed = subprocess.run([sys.executable, "-c", LIST_COMMANDS], capture_output=True, text=True, env=ENV, timeout=60)
    assert listed.returncode == 0, listed.stderr
    found = json.loads(listed.stdout.splitlines()[-1])
    assert found["heavy"] == [], found["heavy"]  # building the whole parser tree is light too
    commands = found["commands"]
    for expected in (["train"], ["eval"], ["data", "prepare"], ["data", "tokenizer"], ["checkpoint", "convert"],
                     ["launch"], ["info"], ["export"], ["generate"]):
        assert expected in commands, commands
    slow = {}
    for argv in commands:
        proc = subprocess.run([sys.executable, "-c", HELP, *argv], capture_output=True, text=True, env=ENV, timeout=60)
        assert proc.returncode == 0, (argv, proc.stderr[-2000:])
        assert "usage:" in proc.stdout, argv
        report = json.loads(proc.stdout.splitlines()[-1])
        assert report["heavy"] == [], (argv, report["heavy"])
        slow[" ".join(argv) or "fluidlm"] = round(report["seconds"], 2)
    print("--help seconds:", slow)


@pytest.fixture(scope="module")
def thin_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("thin")
    data = make_dataset(tmp / "data", samples=64)
    run = tmp / "run"
    config = write_config(tmp / "tiny.yaml", tiny_config(data, run, train={"steps": 3}, logging={"mlflow": True},
                                                         model={"max_seq_len": 256, "dropout": 0.0}))
    proc = subprocess.run([sys.executable, "-c", HIDE_MLFLOW, "train", "--config", str(config)], cwd=tmp, env=ENV,
                          capture_output=True, text=True, timeout=300)
    return {"tmp": tmp, "data": data, "run": run, "proc": proc}


def test_training_without_mlflow_warns_once_and_keeps_metrics_jsonl(thin_run):
    proc = thin_run["proc"]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines() if "MLflow is not available" in line]
    assert len(warnings) == 1, warnings
    assert "metrics.jsonl" in warnings[0] and "fluidlm[mlflow]" in warnings[0]
    start = next(line for line in proc.stdout.splitlines() if line.startswith("run folder"))
    assert "metrics.jsonl only (MLflow off: not installed)" in start and "sqlite" not in start, start
    assert [m["step"] for m in read_metrics(thin_run["run"])] == [1, 2, 3]
    assert not (thin_run["tmp"] / "mlflow.db").exists()


def test_eval_without_mlflow_warns_once_and_writes_its_report(thin_run):
    assert thin_run["proc"].returncode == 0
    out = thin_run["tmp"] / "eval.json"
    proc = subprocess.run([sys.executable, "-c", HIDE_MLFLOW, "eval", "--checkpoint", str(thin_run["run"]),
                           "--data", str(thin_run["data"] / "val" / "manifest.json"), "--context-lengths", "64,128",
                           "--out", str(out), "--no-progress", "--no-plot"],
                          cwd=thin_run["tmp"], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines() if "MLflow is not available" in line]
    assert len(warnings) == 1, warnings
    report = json.loads(out.read_text())
    assert [r["context_length"] for r in report["results"]] == [64, 128]
    assert all(r["perplexity"] > 1 for r in report["results"])
