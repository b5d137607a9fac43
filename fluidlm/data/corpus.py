"""Documents: the embedded default corpus (the interpreter's own standard library) and user corpora.

Default corpus: one document per top-level stdlib package (its .py files in sorted order, each
preceded by a `# ---- path ----` header line); the top-level single modules are grouped in
sorted order into documents of at least MIN_GROUP_CHARS. Split train/validation by a stable hash
of the document name (about 95/5). It depends on the Python version that builds it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from fluidlm.data import DataError

MIN_GROUP_CHARS = 200_000
SKIP_DIRS = {"site-packages", "__pycache__", "dist-packages"}


@dataclass
class ReadStats:
    documents: int = 0
    characters: int = 0
    replaced_bytes_docs: list = field(default_factory=list)  # documents with non-UTF-8 bytes
    empty_skipped: int = 0


def read_text(path: Path, stats: ReadStats) -> str:
    raw = path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    if "\ufffd" in text and "\ufffd".encode() not in raw:
        stats.replaced_bytes_docs.append(str(path))
    return text


def stdlib_documents() -> list[tuple[str, str]]:
    """[(name, text)] for the running interpreter's standard library, in a stable order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    stats = ReadStats()
    docs, singles = [], []
    for entry in sorted(root.iterdir()):
        if entry.name in SKIP_DIRS:
            continue
        if entry.is_dir() and (entry / "__init__.py").exists():
            files = sorted(p for p in entry.rglob("*.py") if "__pycache__" not in p.parts)
            text = "".join(f"# ---- {p.relative_to(root)} ----\n{read_text(p, stats)}" for p in files)
            if text:
                docs.append((entry.name, text))
        elif entry.is_file() and entry.suffix == ".py":
            singles.append(entry)
    group, size = [], 0
    for p in singles:
        group.append(f"# ---- {p.relative_to(root)} ----\n{read_text(p, stats)}")
        size += len(group[-1])
        if size >= MIN_GROUP_CHARS:
            docs.append((f"modules:{singles.index(p) - len(group) + 1:03d}", "".join(group)))
            group, size = [], 0
    if group:
        docs.append((f"modules:{len(singles) - len(group):03d}", "".join(group)))
    return docs


def is_validation(name: str, val_percent: int = 5) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 100 < val_percent


def write_default_corpus(out: Path) -> dict:
    """Write out/train.jsonl and out/val.jsonl; return a report."""
    docs = stdlib_documents()
    if not docs:
        raise DataError(f"no standard-library source found under {sysconfig.get_paths()['stdlib']}")
    val = [d for d in docs if is_validation(d[0])]
    if not val:  # keep a validation set whatever the hash gives: the smallest package that is not tiny
        val = [min((d for d in docs if len(d[1]) > 50_000), key=lambda d: len(d[1]))]
    train = [d for d in docs if d not in val]
    out.mkdir(parents=True, exist_ok=True)
    for split, items in (("train", train), ("val", val)):
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for name, text in items:
                f.write(json.dumps({"name": name, "text": text}) + "\n")
    longest = sorted(docs, key=lambda d: -len(d[1]))[:5]
    return {
        "documents": len(docs), "train_documents": len(train), "val_documents": len(val),
        "characters": sum(len(t) for _, t in docs), "val_names": [n for n, _ in val],
        "longest": [(n, len(t)) for n, t in longest],
    }


def iter_documents(inputs: list[str], stats: ReadStats | None = None):
    """Yield document texts from files, folders (recursive), globs and .jsonl files ({"text": ...})."""
    stats = stats if stats is not None else ReadStats()
    paths = []
    for item in inputs:
        matches = sorted(glob.glob(item, recursive=True)) if any(c in item for c in "*?[") else [item]
        if not matches:
            raise DataError(f"input {item!r} matches no file; check the path or glob pattern")
        for m in matches:
            p = Path(m)
            if p.is_dir():
                paths += sorted(q for q in p.rglob("*") if q.is_file() and "__pycache__" not in q.parts)
            elif p.is_file():
                paths.append(p)
            else:
                raise DataError(f"input {str(p)!r} does not exist")
    for text in _texts(paths, stats):
        if not text:
            stats.empty_skipped += 1
            continue
        stats.documents += 1
        stats.characters += len(text)
        yield text


def _texts(paths: list[Path], stats: ReadStats):
    for p in paths:
        if p.suffix != ".jsonl":
            yield read_text(p, stats)
            continue
        with open(p, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise DataError(f"{p}:{lineno}: not a JSON object with a 'text' field ({exc})") from None
                if "\ufffd" in text:
                    stats.replaced_bytes_docs.append(f"{p}:{lineno}")
                yield text


def describe(stats: ReadStats) -> str:
    msg = f"{stats.documents} documents, {stats.characters:,} characters"
    if stats.empty_skipped:
        msg += f", {stats.empty_skipped} empty documents skipped"
    if stats.replaced_bytes_docs:
        msg += f", {len(stats.replaced_bytes_docs)} documents had non-UTF-8 bytes replaced (U+FFFD)"
    return msg


__all__ = ["ReadStats", "iter_documents", "stdlib_documents", "write_default_corpus"]
