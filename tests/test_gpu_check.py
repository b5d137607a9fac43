"""scripts/gpu_check.py on a CPU machine (issue 14): the lock file pins what CI resolves, a bundle is
checked against it (one wheel a pin, no package twice, the closure complete, tags, size), the dry
run prints the plan within 8 minutes and runs nothing, a real run without CUDA exits 2, and a step
with a result is skipped. The bundle here is built from stubs of this environment's own packages:
a wheel per pin holding only its real METADATA (Requires-Dist read from the installed package),
so the closure check meets the real dependency graph without any network."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
NOT_IN_CI = {"fla-core": ["torch>=2.7", "triton>=3.3", "einops"]}  # the lock says CI does not install it


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


gc = load_script()


def stub_wheel(folder: Path, name: str, version: str, requires: list[str], pad: int = 0) -> Path:
    dist = f"{re.sub(r'[-.]+', '_', name)}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    meta = [f"Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    meta += [f"Requires-Dist: {r}" for r in requires]
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{dist}.dist-info/METADATA", "\n".join(meta) + "\n")
        zf.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        if pad:
            zf.writestr("pad.bin", os.urandom(pad))  # incompressible
    return path


def requirements_of(name: str) -> list[str]:
    if name in NOT_IN_CI:
        return NOT_IN_CI[name]
    return importlib.metadata.requires(name) or []


@pytest.fixture
def bundle(tmp_path):
    lock = gc.read_lock(gc.LOCK)
    folder = tmp_path / "wheelhouse"
    folder.mkdir()
    for name, version in lock.pins.values():
        stub_wheel(folder, name, version, requirements_of(name))
    stub_wheel(folder, "fluidlm", gc.project_version(),
               [r for r in importlib.metadata.requires("fluidlm") or [] if "extra" not in r])
    problems, facts = gc.check_bundle(folder, lock, "3.12")
    assert problems == [], problems
    gc.write_manifest(folder, facts, gc.LOCK)
    return folder


def run_script(*args, timeout=120):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def test_the_lock_pins_the_versions_this_environment_resolves():
    lock = gc.read_lock(gc.LOCK)
    assert {"deepspeed", "megatron-core", "pydantic", "pydantic-core", "webdataset", "hjson", "fla-core"} <= set(lock.pins)
    wrong = {}
    for key, (name, version) in lock.pins.items():
        if key in NOT_IN_CI:
            continue
        installed = importlib.metadata.version(name)
        if installed != version:
            wrong[name] = (version, installed)
    assert not wrong, f"requirements/gpu-offline.txt pins (pinned, installed): {wrong}"
    # pydantic-core must be exactly the one this pydantic was built against
    needs = [r for r in importlib.metadata.requires("pydantic") if r.startswith("pydantic-core")]
    assert needs and lock.pins["pydantic-core"][1] in needs[0], needs


def test_dry_run_prints_the_plan_checks_the_bundle_and_runs_nothing(bundle, tmp_path):
    out = tmp_path / "results"
    proc = run_script("--dry-run", "--wheelhouse", str(bundle), "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for step in ("kernels", "kernel-bench", "train", "long-context"):
        assert f"  {step}: budget" in proc.stdout
    assert "pytest" in proc.stdout and "bench/da_gpu.py" in proc.stdout and "bench/long_context_gpu.py" in proc.stdout
    total = int(re.search(r"total budget: (\d+) s", proc.stdout).group(1))
    assert total <= 480, total  # the whole check in 8 minutes
    assert "OK" in proc.stdout and "nothing was run" in proc.stdout
    assert not out.exists()  # nothing written


def test_a_step_with_a_result_is_skipped_by_the_plan(bundle, tmp_path):
    out = tmp_path / "results"
    (out / "kernels").mkdir(parents=True)
    (out / "kernels" / "result.json").write_text(json.dumps({"status": "ok"}))
    proc = run_script("--dry-run", "--wheelhouse", str(bundle), "--out", str(out), "--only", "kernels,train")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"kernels: budget \d+ s, result exists, would be skipped", proc.stdout)
    assert re.search(r"train: budget \d+ s, would run", proc.stdout)
    assert "kernel-bench" not in proc.stdout
    forced = run_script("--dry-run", "--force", "--wheelhouse", str(bundle), "--out", str(out), "--only", "kernels")
    assert re.search(r"kernels: budget \d+ s, would run", forced.stdout)


def test_bad_bundles_are_refused_with_the_reason(bundle, tmp_path):
    lock = gc.read_lock(gc.LOCK)
    name, version = lock.pins["hjson"]
    stub_wheel(bundle, name, "0.0.1", [])
    problems, _ = gc.check_bundle(bundle, lock, "3.12")
    assert any("two versions of one package" in p and "hjson" in p for p in problems), problems
    proc = run_script("--check-bundle", str(bundle))
    assert proc.returncode == 2 and "two versions of one package" in proc.stderr
    next(bundle.glob("hjson-0.0.1-*.whl")).unlink()

    missing = next(bundle.glob("webdataset-*.whl"))
    missing.unlink()
    problems, _ = gc.check_bundle(bundle, lock, "3.12")
    assert any(p.startswith("missing: webdataset==") for p in problems), problems

    stub_wheel(bundle, "webdataset", lock.pins["webdataset"][1], ["no-such-package>=1"])
    problems, _ = gc.check_bundle(bundle, lock, "3.12")
    assert any("no-such-package" in p and "neither in the bundle nor provided by the image" in p for p in problems)
    next(bundle.glob("webdataset-*.whl")).unlink()
    stub_wheel(bundle, "webdataset", lock.pins["webdataset"][1], requirements_of("webdataset"), pad=2 << 20)
    problems, _ = gc.check_bundle(bundle, lock, "3.12", max_mib=1.0)
    assert any("above the 1 MiB limit" in p for p in problems), problems
    assert gc.check_bundle(bundle, lock, "3.12")[0] == []

    stub_wheel(bundle, "torch", "2.11.0", [])
    problems, _ = gc.check_bundle(bundle, lock, "3.12")
    assert any("the image provides torch" in p for p in problems), problems


def test_a_real_run_without_cuda_exits_2_and_says_why(bundle, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = run_script("--wheelhouse", str(bundle), "--out", str(tmp_path / "results"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA" in proc.stderr and "--dry-run" in proc.stderr
    assert not (tmp_path / "results" / "site").exists()  # nothing installed


def test_help_and_a_missing_bundle():
    proc = run_script("--help")
    assert proc.returncode == 0 and "--wheelhouse" in proc.stdout and "Budget" in proc.stdout
    proc = run_script("--dry-run", "--wheelhouse", "/nonexistent/wheelhouse")
    assert proc.returncode == 2 and "scripts/wheelhouse.sh" in proc.stderr


def test_wheelhouse_defaults_to_the_checkouts_venv_and_names_a_missing_build_requirement(tmp_path):
    """A fresh clone: scripts/wheelhouse.sh picks .venv/bin/python (what scripts/setup.sh makes) over
    the system python3, and a builder without setuptools/wheel/torch is refused before any download."""
    import venv

    clone = tmp_path / "clone"
    (clone / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "wheelhouse.sh", clone / "scripts")
    shutil.copytree(ROOT / "requirements", clone / "requirements")
    venv.create(clone / ".venv", with_pip=False)  # no pip, setuptools, wheel or torch
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    proc = subprocess.run(["bash", str(clone / "scripts" / "wheelhouse.sh"), "--out", str(tmp_path / "wh")],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{clone}/.venv/bin/python lacks: pip setuptools wheel torch" in proc.stderr, proc.stderr
    assert "bash scripts/setup.sh" in proc.stderr and "downloading" not in proc.stdout
    assert not (tmp_path / "wh").exists()


def test_wheelhouse_builder_check_runs_in_this_environment():
    """The builder check of scripts/wheelhouse.sh, run by this interpreter (a venv made by setup.sh, as on
    a fresh clone): it names nothing missing and raises nothing (it once imported setuptools after
    find_spec("pip"), which makes setuptools' distutils shim fail with an AssertionError)."""
    text = (Path(__file__).resolve().parents[1] / "scripts" / "wheelhouse.sh").read_text()
    snippet = text.split("<<'PY'\n", 1)[1].split("\nPY\n", 1)[0]
    out = subprocess.run([sys.executable, "-"], input=snippet, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "", out.stdout + out.stderr
