#!/usr/bin/env python3
"""Every GPU check of FluidLM in one command, on an offline GPU machine (README: "Running on GPUs").

    bash scripts/gpu_check.sh [--wheelhouse DIR] [--out DIR] [--only STEP,...] [--force] [--dry-run]

1. Checks the machine (a CUDA device visible to torch, else exit 2) and the bundle (the wheels of
   requirements/gpu-offline.txt, built by scripts/wheelhouse.sh), then installs the bundle into a
   private folder, OUT/site (pip --no-index --no-deps --target: no network, no root, the image's
   torch/triton untouched), used through PYTHONPATH=<checkout>:OUT/site.
2. Runs the steps in order, each under its own time cap (the process group is killed when it is
   over), each writing into OUT/<step>/ and ending with OUT/<step>/result.json. A step whose
   result.json exists is skipped (--force reruns it), and inside a step every command that
   finished is skipped too, so a second, shorter try resumes where the first stopped.
3. Writes OUT/summary.md (and summary.json): device, driver, versions, date, the exact commands, and
   every step's headline figures or its error. Every figure in it is read from a file a step wrote.

Budget (one H100/H200; Triton compile time included; caps are hard limits, not estimates):
   install        30 s
   kernels       120 s   pytest tests/test_triton_kernels.py -m gpu (compiled kernels vs the fp32 reference)
   kernel-bench   60 s   bench/da_gpu.py, N = 4k/16k/64k, B=2 H=16 d=128 bf16, 4 implementations
   train         180 s   fluidlm data prepare + DA and softmax 125M at 8k context (40 steps each) + exact resume
   long-context   80 s   bench/long_context_gpu.py, ~350M DA at 65,536 tokens and 2k-64k at equal tokens/step
   total         470 s   (< 8 minutes; summary.md takes < 1 s)

`--dry-run` prints this plan with the exact commands and checks the bundle, on any machine.
`--check-bundle DIR` only checks a bundle (scripts/wheelhouse.sh calls it before writing one).
Exit codes: 0 every step passed, 1 a step failed or timed out (see summary.md), 2 bad input (no
CUDA, no or bad bundle, wrong Python for the bundle).
"""

from __future__ import annotations

import argparse
import datetime
import email.parser
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

try:
    from packaging import tags as pkg_tags
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import InvalidVersion, Version
except ImportError:  # a bare image without `packaging`: pip vendors it
    from pip._vendor.packaging import tags as pkg_tags
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.specifiers import SpecifierSet
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename
    from pip._vendor.packaging.version import InvalidVersion, Version

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "gpu-offline.txt"
MANIFEST = "bundle.json"
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
INSTALL_CAP_S = 30
MAX_MIB = 40.0
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0}  # dense bf16


class BadInput(Exception):
    """Exit 2 with this message."""


# --- the lock file ------------------------------------------------------------------------------

@dataclass
class Lock:
    pins: dict[str, tuple[str, str]] = field(default_factory=dict)   # canonical name -> (name, version)
    builds: dict[str, str] = field(default_factory=dict)             # canonical name -> "ENV=VALUE ..."
    image: dict[str, Requirement] = field(default_factory=dict)      # canonical name -> requirement
    omitted: set[str] = field(default_factory=set)                   # required by fluidlm, left out on purpose


def read_lock(path: Path) -> Lock:
    lock = Lock()
    for number, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.strip()
        if line.startswith("# image:"):
            req = Requirement(line.removeprefix("# image:").strip())
            lock.image[canonicalize_name(req.name)] = req
            continue
        if line.startswith("# omitted:"):
            lock.omitted.add(canonicalize_name(line.removeprefix("# omitted:").strip()))
            continue
        if not line or line.startswith("#"):
            continue
        spec, _, comment = line.partition("#")
        req = Requirement(spec.strip())
        pins = [s for s in req.specifier if s.operator == "=="]
        if len(pins) != 1 or len(req.specifier) != 1:
            raise BadInput(f"{path}:{number}: {spec.strip()!r} must pin one exact version (name==version)")
        name = canonicalize_name(req.name)
        if name in lock.pins:
            raise BadInput(f"{path}:{number}: {req.name} is pinned twice")
        lock.pins[name] = (req.name, pins[0].version)
        comment = comment.strip()
        if comment.startswith("build:"):
            lock.builds[name] = comment.removeprefix("build:").strip().removeprefix("sdist").strip()
    return lock


def project_version() -> str:
    text = (REPO / "pyproject.toml").read_text()
    match = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
    if not match:
        raise BadInput("pyproject.toml has no version")
    return match.group(1)


# --- the bundle ---------------------------------------------------------------------------------

def target_tags(python_version: str) -> set:
    """Tags pip accepts for CPython `python_version` on manylinux x86_64 (glibc up to 2.28)."""
    major, minor = (int(x) for x in python_version.split("."))
    platforms = [f"manylinux_2_{g}_x86_64" for g in range(28, 4, -1)]
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    interpreter = f"cp{major}{minor}"
    supported = set(pkg_tags.cpython_tags((major, minor), abis=[interpreter, "abi3", "none"], platforms=platforms))
    supported |= set(pkg_tags.compatible_tags((major, minor), interpreter=interpreter, platforms=platforms))
    return supported


def wheel_metadata(path: Path) -> email.message.Message:
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
        if len(names) != 1:
            raise ValueError("no single *.dist-info/METADATA inside")
        return email.parser.Parser().parsestr(zf.read(names[0]).decode("utf-8", "replace"))


def marker_env(python_version: str) -> dict:
    return {"python_version": python_version, "python_full_version": f"{python_version}.0",
            "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
            "platform_release": "", "platform_version": "", "implementation_version": f"{python_version}.0",
            "extra": ""}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_bundle(folder: Path, lock: Lock, python_version: str, max_mib: float = MAX_MIB,
                 fluidlm_version: str | None = None) -> tuple[list[str], dict]:
    """(problems, facts) of a wheel folder against the lock file. No problems = installable offline
    on the target with --no-deps: one wheel per lock line plus fluidlm, nothing else, no package
    twice, tags for the target, every requirement met by the bundle or the image, size in bounds."""
    folder = Path(folder)
    problems: list[str] = []
    if not folder.is_dir():
        return [f"{folder} is not a folder (build a bundle with scripts/wheelhouse.sh --out {folder})"], {}
    fluidlm_version = fluidlm_version or project_version()
    supported = target_tags(python_version)
    wheels: dict[str, list[dict]] = {}
    for path in sorted(folder.iterdir()):
        if path.name == MANIFEST:
            continue
        if path.suffix != ".whl":
            problems.append(f"{path.name}: not a wheel (the bundle holds only .whl files and {MANIFEST})")
            continue
        try:
            name, version, _, file_tags = parse_wheel_filename(path.name)
        except Exception as exc:
            problems.append(f"{path.name}: not a valid wheel file name ({exc})")
            continue
        entry = {"file": path.name, "name": str(name), "version": str(version), "bytes": path.stat().st_size,
                 "path": path}
        if not set(file_tags) & supported:
            problems.append(f"{path.name}: its tags ({', '.join(sorted(map(str, file_tags)))}) do not install on "
                            f"CPython {python_version} manylinux x86_64")
        wheels.setdefault(canonicalize_name(name), []).append(entry)
    for name, entries in wheels.items():
        if len(entries) > 1:
            problems.append(f"two versions of one package: {', '.join(e['file'] for e in entries)}; keep one")
    versions = {name: Version(entries[0]["version"]) for name, entries in wheels.items()}
    expected = {**{n: v for n, (_, v) in lock.pins.items()}, "fluidlm": fluidlm_version}
    for name, version in expected.items():
        if name not in wheels:
            problems.append(f"missing: {name}=={version} (in the lock file)" if name != "fluidlm"
                            else f"missing: the project wheel fluidlm-{version}")
        elif versions[name] != Version(version):
            problems.append(f"{wheels[name][0]['file']}: version {versions[name]}, but "
                            f"{'pyproject.toml says' if name == 'fluidlm' else 'the lock file pins'} {version}")
    for name in wheels:
        if name not in expected:
            problems.append(f"{wheels[name][0]['file']}: not in {LOCK.relative_to(REPO)}; remove it or pin it there")
    for name in wheels:
        if name in lock.image:
            problems.append(f"{wheels[name][0]['file']}: the image provides {name}; bundling it would shadow the "
                            "image's CUDA build")
    env = marker_env(python_version)
    image_needs: dict[str, list[str]] = {}
    for name, entries in wheels.items():
        entry = entries[0]
        try:
            meta = wheel_metadata(entry["path"])
        except Exception as exc:
            problems.append(f"{entry['file']}: unreadable ({exc})")
            continue
        for text in meta.get_all("Requires-Dist") or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            dep = canonicalize_name(req.name)
            if dep in wheels:
                if req.specifier and not req.specifier.contains(versions[dep], prereleases=True):
                    problems.append(f"{entry['file']} requires {req}, the bundle has {dep} {versions[dep]}")
            elif dep in lock.image:
                image_needs.setdefault(dep, []).append(f"{entry['name']}: {req}")
            elif dep in lock.omitted and name == "fluidlm":
                continue  # installed with --no-deps; fluidlm runs without it (see the lock file)
            else:
                problems.append(f"{entry['file']} requires {req}, which is neither in the bundle nor provided by "
                                "the image (add it to the lock file)")
    total = sum(e["bytes"] for entries in wheels.values() for e in entries)
    if total > max_mib * 2**20:
        problems.append(f"the bundle is {total / 2**20:.1f} MiB, above the {max_mib:g} MiB limit")
    facts = {"folder": str(folder), "python": python_version, "wheels": [
        {k: v for k, v in e.items() if k != "path"} for entries in wheels.values() for e in entries],
        "total_bytes": total, "total_mib": round(total / 2**20, 2), "image_requirements": image_needs}
    return problems, facts


def write_manifest(folder: Path, facts: dict, lock_path: Path) -> None:
    for wheel in facts["wheels"]:
        wheel["sha256"] = sha256(Path(folder) / wheel["file"])
    manifest = {"format": "fluidlm-wheelhouse", "python": facts["python"], "total_bytes": facts["total_bytes"],
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "lock_sha256": sha256(lock_path), "wheels": facts["wheels"]}
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def bundle_python(folder: Path) -> str | None:
    """The Python version the bundle was built for, from its manifest (None without one)."""
    path = Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text())["python"]
    except (OSError, ValueError, KeyError):
        return None


def check_machine(facts: dict, lock: Lock) -> tuple[list[str], list[str]]:
    """(problems, warnings) of this interpreter for the bundle: same Python, and every requirement
    on an image package met by what is installed here."""
    import importlib.metadata

    problems, warnings = [], []
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if here != facts["python"]:
        problems.append(f"this Python is {here}, the bundle is for {facts['python']} "
                        f"(run with the image's python{facts['python']}, or rebuild with --python {here})")
    for dep, req in lock.image.items():
        try:
            installed = Version(importlib.metadata.version(dep))
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{dep} is not installed here; the bundle expects the image to provide it ({req})")
            continue
        except InvalidVersion:
            continue
        for need in facts["image_requirements"].get(dep, []):
            spec = SpecifierSet(str(Requirement(need.split(": ", 1)[1]).specifier))
            if spec and not spec.contains(installed, prereleases=True):
                problems.append(f"{need}, but this machine has {dep} {installed}")
        if req.specifier and not req.specifier.contains(installed, prereleases=True):
            warnings.append(f"the lock file was written for {req}; this machine has {dep} {installed}")
    return problems, warnings


# --- running commands ---------------------------------------------------------------------------

@dataclass
class Command:
    name: str                 # unique inside its step; its log is <step>/<name>.log
    argv: list[str]
    cap_s: float              # own time cap (also bounded by what is left of the step's budget)
    clear: list[Path] = field(default_factory=list)   # outputs removed before a (re)run
    required: bool = True     # a failure stops the step (later commands depend on it)


@dataclass
class Step:
    name: str
    budget_s: float
    what: str
    commands: list[Command]
    headline: object = None   # fn(step_dir, outcomes) -> (figures dict, error str | None)


def run_command(cmd: Command, cap_s: float, log: Path, env: dict, cwd: Path) -> dict:
    """Run one command in its own process group under a hard cap; stdout+stderr to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "w") as f:
        f.write(f"$ {shlex.join(cmd.argv)}\n")
        f.flush()
        proc = subprocess.Popen(cmd.argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(cap_s, 1))
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            rc = proc.returncode
    seconds = time.monotonic() - start
    if timed_out:
        with open(log, "a") as f:
            f.write(f"\n[gpu_check] killed after {seconds:.0f} s (cap {cap_s:.0f} s)\n")
    return {"name": cmd.name, "command": shlex.join(cmd.argv), "rc": rc, "seconds": round(seconds, 1),
            "cap_s": round(cap_s), "timed_out": timed_out, "log": str(log)}


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def execute_step(step: Step, out: Path, env: dict, cwd: Path = REPO, force: bool = False) -> dict:
    """Run (or skip) one step; returns its result (also written to out/<step>/result.json)."""
    folder = out / step.name
    result_path = folder / "result.json"
    if result_path.exists() and not force:
        result = json.loads(result_path.read_text())
        result["skipped"] = True
        return result
    if force and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    outcomes, error = [], None
    for cmd in step.commands:
        done = folder / f".done-{cmd.name}.json"
        if done.exists():  # finished in an earlier try
            outcomes.append({**json.loads(done.read_text()), "reused": True})
            continue
        left = step.budget_s - (time.monotonic() - start)
        if left < 1:
            outcome = {"name": cmd.name, "command": shlex.join(cmd.argv), "rc": None, "seconds": 0, "cap_s": 0,
                       "timed_out": True, "log": None, "not_started": "the step's budget was spent"}
            outcomes.append(outcome)
            error = error or f"{cmd.name}: not started, the step's {step.budget_s:.0f} s budget was spent"
            if cmd.required:
                break
            continue
        for path in cmd.clear:
            shutil.rmtree(path, ignore_errors=True)
        outcome = run_command(cmd, min(cmd.cap_s, left), folder / f"{cmd.name}.log", env, cwd)
        outcomes.append(outcome)
        if outcome["rc"] == 0 and not outcome["timed_out"]:
            done.write_text(json.dumps(outcome))
            continue
        why = (f"timed out after {outcome['seconds']:.0f} s (cap {outcome['cap_s']} s)" if outcome["timed_out"]
               else f"exit code {outcome['rc']}")
        error = error or f"{cmd.name}: {why}; last lines of {Path(outcome['log']).name}:\n{tail(outcome['log'])}"
        if cmd.required:
            break
    figures = {}
    if step.headline is not None:
        try:
            figures, finding = step.headline(folder, outcomes)
        except Exception as exc:  # a missing or partial result file: the error says which
            figures, finding = {}, f"no headline figures ({type(exc).__name__}: {exc})"
        error = error or finding
    timed_out = any(o["timed_out"] for o in outcomes)
    status = "ok" if error is None else ("timeout" if timed_out else "failed")
    result = {"step": step.name, "status": status, "seconds": round(time.monotonic() - start, 1),
              "budget_s": step.budget_s, "what": step.what, "commands": outcomes, "figures": figures,
              "error": error, "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    result_path.write_text(json.dumps(result, indent=2) + "\n")
    return result


# --- the steps ----------------------------------------------------------------------------------

def peak_tflops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    for key, value in PEAK_TFLOPS.items():  # "H100 PCIe" before "H100"
        if key in device_name:
            return value
    return None


def kernels_step(py: str, out: Path) -> Step:
    d = out / "kernels"
    argv = [py, "-m", "pytest", "tests/test_triton_kernels.py", "-m", "gpu", "-v", "-rfE", "-p", "no:cacheprovider",
            "--junitxml", str(d / "junit.xml")]
    return Step("kernels", 120, "compiled Triton DA kernels, forward and every gradient vs the fp32 reference "
                "(causal/bidirectional, bf16/fp32, packed documents, head dims 16-256, 64k/128k tokens, int64 offsets)",
                [Command("pytest", argv, 120, clear=[d / "junit.xml"])], headline=kernels_headline)


def kernels_headline(folder: Path, outcomes: list[dict]) -> tuple[dict, str | None]:
    junit = folder / "junit.xml"
    if junit.exists():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        failed = []
        for case in suite.iter("testcase"):
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if bad is not None:
                failed.append(f"{case.get('name')}: {(bad.get('message') or '').splitlines()[0][:300] if bad.get('message') else ''}")
        passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        figures = {"passed": passed, "failed": counts["failures"] + counts["errors"], "skipped": counts["skipped"],
                   "seconds": float(suite.get("time", 0)), "failures": failed}
    else:  # killed before pytest wrote its report: count the outcome lines of -v
        log = Path(outcomes[-1]["log"]) if outcomes and outcomes[-1].get("log") else None
        text = log.read_text(errors="replace") if log and log.exists() else ""
        figures = {"passed": len(re.findall(r" PASSED", text)), "failed": len(re.findall(r" (?:FAILED|ERROR)", text)),
                   "skipped": len(re.findall(r" SKIPPED", text)), "complete": False,
                   "failures": re.findall(r"^(\S+::\S+) (?:FAILED|ERROR)", text, re.M)}
    if figures["failed"]:
        return figures, f"{figures['failed']} kernel test(s) failed: " + "; ".join(figures["failures"][:5])
    if figures["passed"] == 0:
        return figures, "no GPU kernel test ran (all skipped or none collected)"
    return figures, None


def kernel_bench_step(py: str, out: Path) -> Step:
    d = out / "kernel-bench"
    argv = [py, "bench/da_gpu.py", "--sweep", "length", "--lengths", "4096,16384,65536", "--batch", "2",
            "--heads", "16", "--head-dim", "128", "--dtype", "bf16", "--impls", "triton,chunked,sdpa,fla_chunk_simple_gla",
            "--warmup", "5", "--rep", "20", "--out", str(d / "da_gpu")]
    return Step("kernel-bench", 60, "DA kernels: triton vs chunked vs SDPA (flash) vs fla chunk_simple_gla, forward and "
                "forward+backward, N = 4k/16k/64k, B=2 H=16 d=128 bf16: time, TFLOP/s, GB/s, peak memory",
                [Command("da_gpu", argv, 60)], headline=kernel_bench_headline)


def kernel_bench_headline(folder: Path, outcomes: list[dict]) -> tuple[dict, str | None]:
    data = json.loads((folder / "da_gpu.json").read_text())
    rows = data["results"]
    figures = {}
    for row in rows:
        key = f"{row['mode']} N={row['n']}"
        figures.setdefault(key, {})[row["impl"]] = (
            {"ms": round(row["ms"], 3), "tflops": round(row["tflops"], 1), "gbps": round(row["gbps"]),
             "peak_mib": round(row["peak_mib"])} if "ms" in row else {"error": row.get("error", "no result")})
    broken = [f"{impl} at {key}: {v['error']}" for key, impls in figures.items() for impl, v in impls.items()
              if "error" in v and impl in ("triton", "sdpa")]
    return figures, ("; ".join(broken[:4]) if broken else None)


TRAIN = {"steps": 40, "resume_from": 20, "resume_to": 25, "seq_len": 8192, "micro_batch": 2, "vocab": 4096,
         "tolerance": 1e-2}
REHEARSAL = {"steps": 8, "resume_from": 4, "resume_to": 6, "seq_len": 256, "micro_batch": 2, "vocab": 4096,
             "tolerance": 1e-2}


def train_step(py: str, out: Path, device_name: str | None, rehearsal: bool = False) -> Step:
    """data prepare; DA 125M and softmax 125M at 8k context, 40 steps each, bf16 through DeepSpeed;
    then resume the DA run from its step-20 checkpoint in a fresh process to step 25 and compare
    those 5 losses with the uninterrupted run's (train.stop_at keeps the LR schedule of 40 steps)."""
    p = REHEARSAL if rehearsal else TRAIN
    d = out / "train"
    data = d / "data"
    nproc = str(max(1, min(8, os.cpu_count() or 1)))
    common = [f"data.dir={data}", f"data.seq_len={p['seq_len']}", f"model.vocab_size={p['vocab']}",
              f"train.steps={p['steps']}", f"train.micro_batch_size={p['micro_batch']}", "train.grad_accum=1",
              "optim.warmup_steps=4", "logging.every=1", "logging.progress=false", "logging.mlflow=false",
              "checkpoint.keep=2"]
    peak = peak_tflops(device_name)
    if peak:
        common.append(f"train.peak_tflops={peak:g}")
    da_cfg, sm_cfg = ("configs/tiny-cpu.yaml", "configs/tiny-cpu.yaml") if rehearsal else \
        ("configs/da-125m.yaml", "configs/softmax-125m.yaml")
    if rehearsal:
        common.append("model.max_seq_len=4096")
    sm_extra = ["model.attention=softmax"] if rehearsal else []
    fluidlm = [py, "-m", "fluidlm"]
    step_tag = f"step_{p['resume_from']:08d}"
    commands = [
        Command("data", [*fluidlm, "data", "prepare", "--out", str(data), "--vocab-size", str(p["vocab"]),
                         "--seq-len", str(p["seq_len"]), "--workers", nproc], 40),
        Command("da", [*fluidlm, "train", "--config", da_cfg, *common, f"train.run_dir={d / 'da'}",
                       f"checkpoint.every={p['resume_from']}"], 55, clear=[d / "da"]),
        Command("softmax", [*fluidlm, "train", "--config", sm_cfg, *common, *sm_extra,
                            f"train.run_dir={d / 'softmax'}", "checkpoint.every=0"], 45, clear=[d / "softmax"],
                required=False),
        Command("resume", [*fluidlm, "train", "--config", da_cfg, *common, f"train.run_dir={d / 'da-resume'}",
                           f"checkpoint.every={p['resume_from']}", f"train.stop_at={p['resume_to']}",
                           "--resume", str(d / "da" / "checkpoints" / step_tag)], 40, clear=[d / "da-resume"],
                required=False),
    ]
    return Step("train", 180, f"the real stack on one GPU: fluidlm data prepare, then fluidlm train (DeepSpeed, bf16) of "
                f"da-125m and softmax-125m at {p['seq_len']} tokens of context, {p['steps']} steps each: tokens/s, MFU, "
                f"peak memory, loss falling; then exact resume: step {p['resume_from']} -> {p['resume_to']} in a "
                f"fresh process vs the uninterrupted run",
                commands, headline=lambda folder, outcomes: train_headline(folder, outcomes, p))


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def run_figures(rows: list[dict], expected_steps: int) -> dict:
    """Headline figures of one run's metrics.jsonl. Throughput figures skip the first 5 steps
    (Triton compilation, allocator warm-up) when the run is long enough."""
    if not rows:
        raise ValueError("metrics.jsonl is empty")
    steady = rows[5:] if len(rows) > 10 else rows
    losses = [r["loss"] for r in rows]
    k = max(1, min(5, len(losses) // 4))
    first, last = statistics.fmean(losses[:k]), statistics.fmean(losses[-k:])
    figures = {"steps": rows[-1]["step"], "expected_steps": expected_steps, "loss_first": round(losses[0], 4),
               "loss_last": round(losses[-1], 4), f"loss_mean_first_{k}": round(first, 4),
               f"loss_mean_last_{k}": round(last, 4), "loss_falling": last < first,
               "tokens_per_s_median": round(statistics.median(r["tokens_per_s"] for r in steady)),
               "peak_mem_mib": round(max(r["peak_mem_mib"] for r in rows))}
    mfu = [r["mfu"] for r in steady if r.get("mfu") is not None]
    figures["mfu_median"] = round(statistics.median(mfu), 4) if mfu else None
    return figures


def compare_resume(reference: list[dict], resumed: list[dict], first: int, last: int, tolerance: float) -> dict:
    """The resumed run's losses at steps first..last vs the uninterrupted run's: max |Δ| and
    max |Δ|/|loss| (the tolerance is relative: bf16 round-off and non-deterministic reductions)."""
    ref = {r["step"]: r["loss"] for r in reference}
    res = {r["step"]: r["loss"] for r in resumed}
    steps = list(range(first, last + 1))
    missing = [s for s in steps if s not in ref or s not in res]
    if missing:
        return {"steps": steps, "missing_steps": missing, "passed": False}
    diffs = [abs(res[s] - ref[s]) for s in steps]
    rel = [abs(res[s] - ref[s]) / max(abs(ref[s]), 1e-12) for s in steps]
    return {"steps": steps, "reference": [ref[s] for s in steps], "resumed": [res[s] for s in steps],
            "max_abs_diff": max(diffs), "max_rel_diff": max(rel), "bitwise_equal": max(diffs) == 0.0,
            "tolerance_rel": tolerance, "passed": max(rel) <= tolerance}


def train_headline(folder: Path, outcomes: list[dict], p: dict) -> tuple[dict, str | None]:
    figures, problems = {}, []
    ran = {o["name"]: o for o in outcomes}
    for run in ("da", "softmax"):
        if ran.get(run, {}).get("rc") != 0:
            continue
        try:
            figures[run] = run_figures(read_metrics(folder / run), p["steps"])
        except (OSError, ValueError, KeyError) as exc:
            problems.append(f"{run}: no metrics ({type(exc).__name__}: {exc})")
            continue
        if figures[run]["steps"] != p["steps"]:
            problems.append(f"{run}: logged up to step {figures[run]['steps']}, expected {p['steps']}")
        if not figures[run]["loss_falling"]:
            problems.append(f"{run}: the loss did not fall")
    if ran.get("resume", {}).get("rc") == 0:
        try:
            figures["resume"] = compare_resume(read_metrics(folder / "da"), read_metrics(folder / "da-resume"),
                                               p["resume_from"] + 1, p["resume_to"], p["tolerance"])
            if not figures["resume"]["passed"]:
                problems.append(f"exact resume: the resumed losses differ from the uninterrupted run's beyond "
                                f"rel {p['tolerance']:g} ({figures['resume']})")
        except (OSError, ValueError, KeyError) as exc:
            problems.append(f"resume: no metrics ({type(exc).__name__}: {exc})")
    return figures, ("; ".join(problems) if problems else None)


def long_context_step(py: str, out: Path) -> Step:
    d = out / "long-context"
    argv = [py, "bench/long_context_gpu.py", "--steps", "3", "--out", str(d / "long_context_cuda")]
    return Step("long-context", 80, "~350M DA model, bf16 autocast, activation checkpointing, plain PyTorch: "
                "65,536-token step (peak memory, tokens/s, MFU) and tokens/s at 2k/8k/32k/64k with 65,536 tokens per step",
                [Command("long_context_gpu", argv, 80)], headline=long_context_headline)


def long_context_headline(folder: Path, outcomes: list[dict]) -> tuple[dict, str | None]:
    data = json.loads((folder / "long_context_cuda.json").read_text())
    at = data["at_context"]
    figures = {"context": at["seq_len"], "peak_gib": round(at["peak_gib"], 2), "tokens_per_s": round(at["tokens_per_s"]),
               "mfu": None if at.get("mfu") is None else round(at["mfu"], 4), "parameters": at.get("parameters"),
               "sweep": {r["seq_len"]: round(r["tokens_per_s"]) for r in data["sweep"]},
               "spread": None if data.get("spread") is None else round(data["spread"], 4)}
    return figures, None


STEP_NAMES = ["kernels", "kernel-bench", "train", "long-context"]


def build_plan(py: str, out: Path, device_name: str | None, rehearsal: bool = False) -> list[Step]:
    return [kernels_step(py, out), kernel_bench_step(py, out), train_step(py, out, device_name, rehearsal),
            long_context_step(py, out)]


# --- install and environment --------------------------------------------------------------------

def step_env(out: Path) -> dict:
    env = dict(os.environ)
    site = str(out / "site")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), site] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PATH"] = os.pathsep.join([str(out / "site" / "bin"), env.get("PATH", "")])
    env.setdefault("TRITON_CACHE_DIR", str(out / ".triton-cache"))  # a second try reuses compiled kernels
    env["PYTHONUNBUFFERED"] = "1"
    env["FLUIDLM_STRICT_KERNELS"] = "1"  # a failing Triton kernel fails the step; no silent chunked fallback
    env.pop("TRITON_INTERPRET", None)
    return env


def install(wheelhouse: Path, out: Path, facts: dict) -> dict:
    site = out / "site"
    stamp = site / ".bundle.json"
    key = hashlib.sha256(json.dumps(sorted((w["file"], w["bytes"]) for w in facts["wheels"])).encode()).hexdigest()
    if stamp.exists() and json.loads(stamp.read_text()).get("key") == key:
        return {"status": "ok", "skipped": True, "site": str(site)}
    shutil.rmtree(site, ignore_errors=True)
    argv = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--disable-pip-version-check",
            "--no-compile", "--target", str(site), *[str(Path(wheelhouse) / w["file"]) for w in facts["wheels"]]]
    outcome = run_command(Command("install", argv, INSTALL_CAP_S), INSTALL_CAP_S, out / "install.log", dict(os.environ),
                          REPO)
    if outcome["rc"] != 0 or outcome["timed_out"]:
        raise BadInput(f"installing the bundle failed ({'timed out' if outcome['timed_out'] else 'exit code ' + str(outcome['rc'])}); "
                       f"last lines of {out / 'install.log'}:\n{tail(out / 'install.log')}")
    stamp.write_text(json.dumps({"key": key, "wheelhouse": str(wheelhouse)}))
    return {"status": "ok", "skipped": False, "site": str(site), "seconds": outcome["seconds"],
            "command": outcome["command"]}


VERSIONS_PY = r"""
import json, platform, sys
out = {"python": platform.python_version()}
try:
    import torch
    out.update(torch=torch.__version__, cuda_build=torch.version.cuda, cuda=torch.cuda.is_available())
    if out["cuda"]:
        out.update(device=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
except Exception as exc:
    out["torch_error"] = f"{type(exc).__name__}: {exc}"
import importlib.metadata as md
for dist in ("triton", "fla-core", "deepspeed", "megatron-core", "pydantic", "webdataset", "numpy", "fluidlm"):
    try:
        out[dist] = md.version(dist)
    except Exception:
        out[dist] = None
try:
    import fluidlm
    out["fluidlm_path"] = fluidlm.__file__
except Exception as exc:
    out["fluidlm_path"] = f"not importable: {exc}"
print(json.dumps(out))
"""


def probe_versions(env: dict, timeout: float = 60) -> dict:
    try:
        res = subprocess.run([sys.executable, "-c", VERSIONS_PY], capture_output=True, text=True, env=env,
                             timeout=timeout, cwd=REPO)
        versions = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else \
            {"error": res.stderr.strip()[-500:]}
    except (subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        versions = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        versions["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        versions["nvidia_smi"] = f"not available ({exc})"
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True,
                               timeout=10)
        versions["git"] = sha.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        versions["git"] = None
    return versions


# --- summary ------------------------------------------------------------------------------------

def write_summary(out: Path, results: list[dict], versions: dict, invocation: str, bundle: dict) -> Path:
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    lines = ["# FluidLM GPU check", "",
             f"- date: {now}",
             f"- device: {versions.get('device', 'none')} (compute capability {versions.get('capability', '?')}, "
             f"{versions.get('memory_gib', '?')} GiB); nvidia-smi: {versions.get('nvidia_smi')}",
             f"- torch {versions.get('torch')} (CUDA {versions.get('cuda_build')}), triton {versions.get('triton')}, "
             f"fla-core {versions.get('fla-core')}, deepspeed {versions.get('deepspeed')}, megatron-core "
             f"{versions.get('megatron-core')}, python {versions.get('python')}",
             f"- fluidlm {versions.get('fluidlm')} from {versions.get('fluidlm_path')}, git {versions.get('git')}",
             f"- bundle: {bundle.get('folder')} ({bundle.get('total_mib')} MiB, {len(bundle.get('wheels', []))} wheels)",
             f"- command: `{invocation}`", ""]
    total = sum(r.get("seconds", 0) for r in results)
    budget = sum(r.get("budget_s", 0) for r in results)
    lines += ["| step | status | seconds (budget) |", "|---|---|---|"]
    for r in results:
        note = " (result from an earlier try)" if r.get("skipped") else ""
        lines.append(f"| {r['step']} | {r['status']}{note} | {r.get('seconds', 0):.0f} ({r.get('budget_s', 0):.0f}) |")
    lines += ["", f"Steps took {total:.0f} s of a {budget:.0f} s budget.", ""]
    for r in results:
        lines += [f"## {r['step']}: {r['status']}", "", r.get("what", ""), "", "Commands (exact, run from the checkout "
                  "with PYTHONPATH=<checkout>:<out>/site):", ""]
        for c in r.get("commands", []):
            state = ("reused from an earlier try" if c.get("reused") else c.get("not_started")
                     or ("timed out" if c["timed_out"] else f"exit {c['rc']}"))
            lines.append(f"- `{c['command']}` — {state}, {c['seconds']:.0f} s (cap {c['cap_s']} s)")
        lines += ["", "Figures (read from the files this step wrote):", "", "```",
                  json.dumps(r.get("figures", {}), indent=1), "```", ""]
        if r.get("error"):
            lines += ["Error:", "", "```", r["error"], "```", ""]
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps({"date": now, "versions": versions, "command": invocation,
                                                   "bundle": {k: v for k, v in bundle.items() if k != "wheels"},
                                                   "steps": results}, indent=2) + "\n")
    return path


# --- the command --------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wheelhouse", default=str(REPO / "wheelhouse"), help="the bundle (default: wheelhouse/)")
    p.add_argument("--out", default=str(REPO / "gpu-check"), help="results folder (default: gpu-check/)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(STEP_NAMES)}")
    p.add_argument("--force", action="store_true", help="rerun the selected steps even if their result exists")
    p.add_argument("--dry-run", action="store_true", help="print the plan, check the bundle, run nothing")
    p.add_argument("--cpu-rehearsal", action="store_true",
                   help="run without CUDA, the train step on the tiny CPU model (wiring test of the script; "
                        "no figure from it is a GPU figure)")
    p.add_argument("--check-bundle", metavar="DIR", default=None, help="only check the bundle in DIR and exit")
    p.add_argument("--python-version", default=None, help="with --check-bundle: the target (default: the manifest's, "
                   "else this interpreter's)")
    p.add_argument("--lock", default=str(LOCK), help="the lock file (default: requirements/gpu-offline.txt)")
    p.add_argument("--max-mib", type=float, default=MAX_MIB, help="size limit of the bundle")
    p.add_argument("--write-manifest", action="store_true", help="with --check-bundle: write bundle.json if it passes")
    args = p.parse_args(argv)
    if args.only:
        args.only = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [s for s in args.only if s not in STEP_NAMES]
        if unknown:
            p.error(f"--only: unknown step(s) {unknown}; choose from {STEP_NAMES}")
    else:
        args.only = list(STEP_NAMES)
    return args


def here_python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def cmd_check_bundle(args) -> int:
    folder = Path(args.check_bundle)
    lock = read_lock(Path(args.lock))
    pyv = args.python_version or bundle_python(folder) or here_python()
    problems, facts = check_bundle(folder, lock, pyv, args.max_mib)
    if problems:
        print(f"bundle {folder}: {len(problems)} problem(s), not usable:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.write_manifest:
        write_manifest(folder, facts, Path(args.lock))
    print(f"bundle {folder}: OK for CPython {pyv} manylinux x86_64, {len(facts['wheels'])} wheels, "
          f"{facts['total_mib']:.1f} MiB (limit {args.max_mib:g} MiB)")
    return EXIT_OK


def cuda_device() -> tuple[str | None, str]:
    """(device name or None, reason) from torch in this interpreter, in a subprocess (quick to kill)."""
    code = ("import torch, json; ok = torch.cuda.is_available(); "
            "print(json.dumps([torch.cuda.get_device_name(0) if ok else None, torch.__version__, torch.version.cuda]))")
    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return None, "torch did not answer within 120 s"
    if res.returncode != 0:
        return None, f"torch is not importable here ({res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode})"
    name, version, cuda = json.loads(res.stdout.strip().splitlines()[-1])
    if name is None:
        return None, (f"torch {version} sees no CUDA device ({'a CPU-only build' if not cuda else 'CUDA ' + cuda + ' build'}; "
                      "check nvidia-smi and CUDA_VISIBLE_DEVICES)")
    return name, f"{name} (torch {version}, CUDA {cuda})"


def print_plan(steps: list[Step], args, out: Path) -> None:
    print(f"plan: results in {out}; python {sys.executable} ({here_python()})")
    print(f"  install: {sys.executable} -m pip install --no-index --no-deps --target {out / 'site'} "
          f"{Path(args.wheelhouse)}/*.whl   (cap {INSTALL_CAP_S} s)")
    total = INSTALL_CAP_S
    for step in steps:
        state = "result exists, would be skipped" if (out / step.name / "result.json").exists() and not args.force \
            else "would run"
        print(f"  {step.name}: budget {step.budget_s:.0f} s, {state}\n    measures: {step.what}")
        for cmd in step.commands:
            print(f"    [{cmd.cap_s:.0f} s] {shlex.join(cmd.argv)}")
        total += step.budget_s
    print(f"  summary: {out / 'summary.md'}")
    print(f"  total budget: {total:.0f} s ({total / 60:.1f} min)")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.check_bundle:
            return cmd_check_bundle(args)
        return run_check(args)
    except BadInput as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def run_check(args) -> int:
    out = Path(args.out).resolve()
    wheelhouse = Path(args.wheelhouse).resolve()
    lock = read_lock(Path(args.lock))
    pyv = bundle_python(wheelhouse) or here_python()
    problems, facts = check_bundle(wheelhouse, lock, pyv, args.max_mib)
    if args.dry_run:
        if not problems:
            machine, warnings = check_machine(facts, lock)
            for w in machine + warnings:
                print(f"note: this machine: {w} (a real run checks this again)")
        steps = [s for s in build_plan(sys.executable, out, None, args.cpu_rehearsal) if s.name in args.only]
        print_plan(steps, args, out)
        if problems:
            print(f"bundle {wheelhouse}: {len(problems)} problem(s):", file=sys.stderr)
            for problem in problems:
                print(f"  - {problem}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(f"bundle {wheelhouse}: OK, {len(facts['wheels'])} wheels, {facts['total_mib']:.1f} MiB, CPython {pyv}")
        print("dry run: nothing was run")
        return EXIT_OK
    if problems:
        raise BadInput(f"bundle {wheelhouse} is not usable:\n" + "\n".join(f"  - {p}" for p in problems))
    device, reason = cuda_device()
    if device is None and not args.cpu_rehearsal:
        raise BadInput(f"no CUDA: {reason}. This check needs one NVIDIA GPU; `--dry-run` checks the plan and the "
                       "bundle on any machine.")
    machine, warnings = check_machine(facts, lock)
    for w in warnings:
        print(f"gpu_check: warning: {w}", file=sys.stderr)
    if machine:
        raise BadInput("this machine does not fit the bundle:\n" + "\n".join(f"  - {p}" for p in machine))
    out.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check: {reason}; results in {out}", flush=True)
    installed = install(wheelhouse, out, facts)
    print(f"gpu_check: bundle {'already installed' if installed['skipped'] else 'installed'} in {installed['site']}",
          flush=True)
    env = step_env(out)
    results = []
    for step in build_plan(sys.executable, out, device, args.cpu_rehearsal):
        if step.name not in args.only:
            continue
        print(f"gpu_check: {step.name} (budget {step.budget_s:.0f} s) ...", flush=True)
        result = execute_step(step, out, env, force=args.force)
        results.append(result)
        print(f"gpu_check: {step.name}: {result['status']}{' (earlier result)' if result.get('skipped') else ''}, "
              f"{result['seconds']:.0f} s" + (f"\n  {result['error'].splitlines()[0]}" if result.get("error") else ""),
              flush=True)
    versions = probe_versions(env)
    invocation = (os.environ.get("GPU_CHECK_INVOCATION", "").strip()
                  or shlex.join([os.path.basename(sys.executable), "scripts/gpu_check.py", *sys.argv[1:]]))
    summary = write_summary(out, results, versions, invocation, facts)
    print(f"gpu_check: wrote {summary}")
    return EXIT_OK if all(r["status"] == "ok" for r in results) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
