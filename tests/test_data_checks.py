"""Issue 16 items 1 and 7: token ids beyond the vocabulary are caught at start-up and at shard read,
naming the shard, the id and the fix; loader caches are per instance (no eviction between two
loaders, loaders are garbage-collectable). Issue 27: member checksums catch a changed token id."""

import gc
import json
import os
import subprocess
import sys
import sysconfig
import weakref
from pathlib import Path

import pytest

from fluidlm.data import DataError
from fluidlm.data.loader import ShardLoader
from fluidlm.data.shards import load_manifest, read_shard, write_shards
from fluidlm.data.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("checks")
    docs = [(STDLIB / f).read_text() for f in ("textwrap.py", "shlex.py", "tabnanny.py")]
    tok = root / "tokenizer.model"
    train_tokenizer(docs, 400, tok)
    write_shards(docs, tok, seq_len=63, out=root / "train", samples_per_shard=16, progress=False, shuffle_seed=0)
    write_shards(docs[:1], tok, seq_len=63, out=root / "val", samples_per_shard=16, progress=False)
    return root


def test_writer_records_each_shards_largest_token_id(shards):
    m = load_manifest(shards / "train")
    assert m["format_version"] == 2
    for entry in m["shards"]:
        tokens, _ = read_shard(shards / "train", entry)
        assert entry["max_token_id"] == max(int(t.max()) for t in tokens)
    assert m["max_token_id"] == max(e["max_token_id"] for e in m["shards"]) < m["vocab_size"]


def _config(shards, tmp_path, vocab):
    from train_helpers import tiny_config, write_config
    cfg = tiny_config(shards, tmp_path / "run", model={"vocab_size": vocab}, data={"seq_len": 63},
                      train={"steps": 2})
    return write_config(tmp_path / "c.yaml", cfg)


def test_start_up_names_the_shard_and_the_id_beyond_the_vocabulary(shards, tmp_path):
    """Shards holding ids of a larger tokenizer under a manifest that says vocab 256 (e.g. folders
    merged by hand): before the fix the run started and died in F.embedding with an IndexError."""
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    m = json.loads((shards / "train" / "manifest.json").read_text())
    for entry in m["shards"]:
        (data / "train" / entry["file"]).write_bytes((shards / "train" / entry["file"]).read_bytes())
    m["vocab_size"] = 256
    (data / "train" / "manifest.json").write_text(json.dumps(m))
    worst = max(m["shards"], key=lambda e: e["max_token_id"])
    path = _config(data, tmp_path, vocab=256)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "fluidlm.train", "--config", str(path)], capture_output=True,
                         text=True, env=env, timeout=60, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    assert worst["file"] in out.stderr and f"token id {worst['max_token_id']}" in out.stderr, out.stderr
    assert "model.vocab_size" in out.stderr and "Traceback" not in out.stderr
    assert "process group" not in out.stderr and not (tmp_path / "run" / "checkpoints").exists()


def test_shard_read_names_the_shard_and_the_id_beyond_the_vocabulary(shards, tmp_path):
    """A format-1 manifest (no recorded ids) and a model vocabulary of 300: the loader refuses the
    first shard it reads with an id ≥ 300, naming it, instead of handing the ids to the model."""
    old = tmp_path / "old"
    old.mkdir()
    m = json.loads((shards / "train" / "manifest.json").read_text())
    for entry in m["shards"]:
        (old / entry["file"]).write_bytes((shards / "train" / entry["file"]).read_bytes())
        entry.pop("max_token_id")
        entry.pop("bytes")
    m.pop("max_token_id")
    m["format_version"] = 1
    (old / "manifest.json").write_text(json.dumps(m))
    ld = ShardLoader(old, micro_batch_size=2, vocab_size=300)
    with pytest.raises(DataError, match=r"shard '.*shard-\d+\.tar' holds token id 3\d\d, outside the vocabulary of 300 "
                                        r"ids.*model\.vocab_size"):
        next(iter(ld))
    assert next(iter(ShardLoader(old, micro_batch_size=2, vocab_size=400)))["tokens"].max() < 400


def _change_token_ids(shard: Path, member_index: int = 3, count: int = 16) -> str:
    """Change `count` token ids inside the tokens.npy member of one sample, in place: the same size,
    still inside the vocabulary. Returns the sample's key."""
    import tarfile

    import numpy as np

    with tarfile.open(shard) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(".tokens.npy")][member_index]
    data = bytearray(shard.read_bytes())
    body = member.offset_data + member.size - 2 * count  # the last `count` uint16 ids of the sample
    ids = np.frombuffer(bytes(data[body:body + 2 * count]), dtype=np.uint16)
    data[body:body + 2 * count] = ((ids.astype(np.int64) % 200) + 5).astype(np.uint16).tobytes()
    shard.write_bytes(bytes(data))
    return member.name.split(".")[0]


def test_a_changed_token_id_in_a_shard_is_caught_naming_shard_and_sample(shards, tmp_path, capsys):
    """Issue 27: 16 token ids changed inside a tokens.npy member (same size, ids in the vocabulary):
    the member's crc32 in the manifest catches it when the loader reads the shard, and `fluidlm data
    verify` reports it offline (exit 2); the intact split verifies (exit 0)."""
    import shutil

    from fluidlm.cli import main

    copy = tmp_path / "train"
    shutil.copytree(shards / "train", copy)
    m = load_manifest(copy)
    assert all(len(e["member_crc32"]) == 3 * e["samples"] for e in m["shards"])
    key = _change_token_ids(copy / m["shards"][0]["file"])
    pattern = rf"shard '.*shard-000000\.tar' is unreadable, truncated or corrupt \(sample {key}: its tokens\.npy fails its crc32"
    ld = ShardLoader(copy, micro_batch_size=2, lanes=1, window=len(m["shards"]))
    with pytest.raises(DataError, match=pattern):
        next(iter(ld))
    assert main(["data", "verify", str(copy)]) == 2
    out = capsys.readouterr()
    assert f"sample {key}: its tokens.npy fails its crc32" in out.err and out.out.startswith("FAILED")
    assert main(["data", "verify", str(shards)]) == 0  # a data folder: train/ and val/
    out = capsys.readouterr().out
    assert out.count("ok ") == 2 and "member crc32 checksums" in out and "tokens/s" in out


def test_a_newer_manifest_format_is_refused_with_the_fix(shards, tmp_path):
    m = json.loads((shards / "train" / "manifest.json").read_text())
    m["format_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="format_version 99.*upgrade FluidLM or rebuild"):
        load_manifest(tmp_path)


def test_two_loaders_do_not_evict_each_other_and_are_garbage_collectable(shards, monkeypatch):
    import builtins
    import tarfile

    reads = []
    real_open = builtins.open

    def counting_open(file, *args, **kw):  # every shard open, whatever reads it (tarfile or webdataset)
        if str(file).endswith(".tar"):
            reads.append(str(file))
        return real_open(file, *args, **kw)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(tarfile, "bltn_open", counting_open, raising=False)
    train = ShardLoader(shards / "train", micro_batch_size=2, window=1, lanes=1)
    val = ShardLoader(shards / "val", micro_batch_size=2, window=1, lanes=1)
    a = iter(train)
    next(a)
    first = list(reads)
    b = iter(val)
    for _ in range(val.batches_per_epoch * 2):  # every validation shard, twice (the old cache held 4 shards)
        next(b)
    reads.clear()
    next(a)  # the training loader's window is still its own
    assert reads == [] and first, (first, reads)

    ref = weakref.ref(train)
    del train, a
    gc.collect()
    assert ref() is None, "a ShardLoader stays alive after its last reference is gone (a class-level cache?)"
    arrays = weakref.ref(val)
    del val, b
    gc.collect()
    assert arrays() is None
