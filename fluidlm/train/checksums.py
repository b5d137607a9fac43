"""Checkpoint integrity: a manifest of every file (size and sha256), and the checks that a
checkpoint agrees with itself.

    checksums.json   {"format_version": 1, "algorithm": "sha256",
                      "files": {"mp_rank_00_model_states.pt": {"bytes": n, "sha256": "…"}, …}}

A save writes it after every rank's files and before `client_state.json` (which marks the folder
complete), so a complete checkpoint always has one; it lists every file but `client_state.json`
and itself. `fluidlm checkpoint convert` writes one into universal checkpoints too. Each rank hashes
its share of the files (every world-th, by name), rank 0 writes the manifest.

sha256 (hashlib, OpenSSL) was chosen by measurement over crc32 (zlib; xxhash and crc32c are not
installed): README, "Checkpoints", gives the cost on a 125M-parameter checkpoint.

`verify(path)` reads every listed file back and also checks that the checkpoint agrees with itself:
the step in `client_state.json` (or `universal.json`) equals the folder's tag and the step in rank
0's client state. Checkpoints saved before checksums existed verify with a note and no hashes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

CHECKSUMS_JSON = "checksums.json"
ALGORITHM = "sha256"
_NOT_LISTED = {"client_state.json", CHECKSUMS_JSON}
_TAG_STEP = re.compile(r"^step_(\d{8,})$")


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, ALGORITHM).hexdigest()


def payload_files(folder: Path) -> list[str]:
    """Every file under `folder` a manifest lists (relative, sorted)."""
    folder = Path(folder)
    names = []
    for root, _, files in os.walk(folder):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel not in _NOT_LISTED and not name.endswith(".tmp"):
                names.append(rel)
    return sorted(names)


def digests(folder: Path, names: list[str]) -> dict[str, dict]:
    return {name: {"bytes": (Path(folder) / name).stat().st_size, ALGORITHM: file_digest(Path(folder) / name)}
            for name in names}


def write_manifest(folder: Path, entries: dict[str, dict]) -> None:
    text = json.dumps({"format_version": 1, "algorithm": ALGORITHM, "files": dict(sorted(entries.items()))}, indent=1)
    tmp = Path(folder) / f".{CHECKSUMS_JSON}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, Path(folder) / CHECKSUMS_JSON)


def write_checksums(folder: Path) -> None:
    """One process: hash every file of `folder` and write its manifest."""
    write_manifest(folder, digests(folder, payload_files(folder)))


def _metadata_problems(path: Path) -> list[str]:
    """The checkpoint's own records disagree about its step (client_state.json / universal.json vs
    the folder's tag vs rank 0's client state)."""
    import torch

    path = Path(path)
    universal = (path / "universal.json").is_file()
    meta_file = path / ("universal.json" if universal else "client_state.json")
    try:
        step = int(json.loads(meta_file.read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{meta_file.name} is unreadable ({exc})"]
    out = []
    tag = _TAG_STEP.match(path.name)
    if tag and int(tag.group(1)) != step:
        out.append(f"{meta_file.name} says step {step} but the folder is {path.name} (step {int(tag.group(1))})")
    rank0 = path / "client" / "rank_00000.pt"
    if not universal and rank0.is_file() and (path / CHECKSUMS_JSON).is_file():  # (older ones kept no step there)
        try:
            saved = torch.load(rank0, map_location="cpu", weights_only=True).get("step")
        except Exception as exc:  # noqa: BLE001 - a corrupt file: the checksums name it too
            return out + [f"client/rank_00000.pt is unreadable ({type(exc).__name__})"]
        if saved is not None and int(saved) != step:
            out.append(f"client/rank_00000.pt (the loader and RNG state) is of step {int(saved)}, "
                       f"{meta_file.name} says step {step}")
    return out


def verify(path: Path) -> tuple[list[str], str]:
    """(problems, summary) of checkpoint folder `path`: every file the manifest lists has its size and
    hash, and the step agrees everywhere (see `_metadata_problems`). [] = it verifies."""
    path = Path(path)
    start = time.perf_counter()
    issues = _metadata_problems(path)
    manifest_file = path / CHECKSUMS_JSON
    if not manifest_file.is_file():
        return issues, "no checksums.json (saved before FluidLM checked checksums): sizes and hashes not checked"
    try:
        manifest = json.loads(manifest_file.read_text())
        files, algorithm = manifest["files"], manifest.get("algorithm", ALGORITHM)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return issues + [f"{CHECKSUMS_JSON} is unreadable ({exc})"], ""
    total = 0
    for name, entry in files.items():
        file = path / name
        try:
            size = file.stat().st_size
        except OSError:
            issues.append(f"{name} is missing")
            continue
        if size != entry["bytes"]:
            issues.append(f"{name} has {size} bytes, {CHECKSUMS_JSON} says {entry['bytes']}")
            continue
        with open(file, "rb") as f:
            digest = hashlib.file_digest(f, algorithm).hexdigest()
        if digest != entry[algorithm]:
            issues.append(f"{name}: its {algorithm} differs from {CHECKSUMS_JSON} (the file is corrupt)")
        total += size
    seconds = time.perf_counter() - start
    return issues, f"{len(files)} files, {total / 2**20:.1f} MiB, {algorithm} verified in {seconds:.2f} s"
