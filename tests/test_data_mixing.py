"""Issue 18: shuffled shards, each DP rank (and worker) reading only its own shards, weighted sources."""

import json
import math
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from fluidlm.data import DataError
from fluidlm.data.loader import ShardLoader
from fluidlm.data.shards import load_manifest, read_shard_samples, shard_url, write_shards
from fluidlm.data.tokenizer import EOS, load_tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
FILES = ["textwrap.py", "shlex.py", "tabnanny.py", "calendar.py", "glob.py", "fnmatch.py", "colorsys.py", "bisect.py"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    docs = [(STDLIB / f).read_text() for f in FILES]
    tok = root / "tokenizer.model"
    train_tokenizer(docs, 400, tok)
    # 32 shards of 62 samples: 8 lanes of 4 shards, 2 lanes per rank at DP=4. The token count depends on the
    # tokenizer (and the stdlib's text), so the last document is cut to make exactly 32 × 62 samples of 32
    # tokens: a partial tail shard would make the loader use fewer lanes (every lane's epoch is its fewest
    # samples), which is not what these tests are about.
    sp, want = load_tokenizer(tok), 32 * 62
    head = sum(len(sp.encode(d)) + 1 for d in docs[:-1])

    def samples(cut):
        return (head + len(sp.encode(docs[-1][:cut])) + 1) // 32

    assert samples(len(docs[-1])) >= want and samples(0) < want, "the corpus no longer holds 32 × 62 samples"
    lo, hi = 0, len(docs[-1])  # samples(lo) < want <= samples(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if samples(mid) < want else (lo, mid)
    docs[-1] = docs[-1][:hi]
    a = write_shards(docs, tok, seq_len=31, out=root / "a" / "train", samples_per_shard=62, progress=False,
                     shuffle_seed=0)
    b = write_shards(docs[:3], tok, seq_len=31, out=root / "b" / "train", samples_per_shard=62, progress=False,
                     shuffle_seed=1)
    assert [e["samples"] for e in a["shards"]] == [62] * 32
    return {"root": root, "docs": docs, "tok": tok, "a": a, "b": b}


def test_shuffled_shards_hold_the_corpus_and_each_samples_documents(data):
    sp = load_tokenizer(data["tok"])
    stream, doc_of = [], []
    for i, text in enumerate(data["docs"]):
        ids = sp.encode(text) + [EOS]
        stream += ids
        doc_of += [i] * len(ids)
    m = load_manifest(data["root"] / "a" / "train")
    assert m["shuffle_seed"] == 0 and m["total_tokens"] + m["dropped_tail_tokens"] == len(stream)
    samples, per_shard_docs = {}, []
    for entry in m["shards"]:
        got = read_shard_samples(shard_url(m, entry), entry)
        per_shard_docs.append(len({int(d) for ds in got["docs"] for d in ds}))
        for key, t, s, d in zip(got["keys"], got["tokens"], got["starts"], got["docs"]):
            samples[int(key)] = (t, s, d)
    L = m["seq_len"] + 1
    assert sorted(samples) == list(range(m["total_samples"]))
    for k, (t, s, d) in samples.items():
        assert t.tolist() == stream[k * L:(k + 1) * L]  # key = corpus-order index
        assert d.tolist() == sorted(set(doc_of[k * L:(k + 1) * L]))  # docs.npy: every document it holds a piece of
        assert [int(x) for x in s] == [j for j in range(L) if j == 0 and k * L == 0 or
                                       (j + k * L > 0 and doc_of[k * L + j] != doc_of[k * L + j - 1])]
    # corpus order would put 1-2 documents in most shards; shuffled shards mix many
    assert np.mean(per_shard_docs) >= 5, per_shard_docs


def epoch_reads(data, dp, workers=0, lanes=8):
    out = []
    for rank in range(dp):
        ld = ShardLoader(data["root"] / "a" / "train", dp_rank=rank, dp_size=dp, micro_batch_size=3, num_workers=workers,
                         lanes=lanes)
        it = iter(ld)
        batches = [next(it) for _ in range(ld.batches_per_epoch)]
        out.append((ld, batches))
    return out


def rows(batches):
    return [tuple(r.tolist()) for b in batches for r in b["tokens"]]


def test_dp4_ranks_open_disjoint_shards_that_cover_the_epoch_and_read_a_quarter(data):
    m = data["a"]
    total_bytes = sum(e["bytes"] for e in m["shards"])
    one = epoch_reads(data, 1)[0]
    four = epoch_reads(data, 4)
    sets = [set(ld.stats["shards_opened"]) for ld, _ in four]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not sets[i] & sets[j], (i, j)
    assert set().union(*sets) == set(one[0].stats["shards_opened"])  # together: the epoch's shards
    assert len(set(one[0].stats["shards_opened"])) >= len(m["shards"]) - 1
    per_rank = [ld.stats["bytes_read"] for ld, _ in four]
    assert max(per_rank) <= 0.3 * total_bytes and one[0].stats["bytes_read"] >= 0.9 * total_bytes, (per_rank, total_bytes)
    counts = {ld.batches_per_epoch for ld, _ in four}
    assert len(counts) == 1
    seen = [r for _, b in four for r in rows(b)]
    assert sorted(seen) == sorted(rows(one[1]))  # as a multiset: the corpus repeats a few 32-token rows
    assert len(seen) >= 0.95 * m["total_samples"]
    # the global batch does not depend on dp: DP=4's batch i is DP=1's micro-batches 4i .. 4i+3
    dp1 = one[1]
    for i in range(min(len(b) for _, b in four)):
        for r in range(4):
            assert (four[r][1][i]["tokens"] == dp1[4 * i + r]["tokens"]).all()


def test_workers_open_disjoint_windows_in_the_same_order(data):
    (ld0, plain), = epoch_reads(data, 2)[:1]
    (ld2, workers), = epoch_reads(data, 2, workers=2)[:1]
    assert all((x["tokens"] == y["tokens"]).all() and (x["doc_starts"] == y["doc_starts"]).all()
               for x, y in zip(plain, workers))
    opened = ld2.stats["shards_opened"]
    assert len(opened) == len(set(opened)) == len(set(ld0.stats["shards_opened"]))  # no shard read by two workers


def test_dp4_resume_mid_epoch_is_exact(data):
    make = lambda: ShardLoader(data["root"] / "a" / "train", dp_rank=3, dp_size=4, micro_batch_size=3, window=2)  # noqa: E731
    ld = make()
    n = ld.batches_per_epoch * 2 + 2
    it = iter(ld)
    straight = [next(it) for _ in range(n)]
    for k in (1, ld.batches_per_epoch - 1, ld.batches_per_epoch + 1):
        resumed = make()
        resumed.load_state_dict(json.loads(json.dumps({**ld.state_dict(), "position": k})))
        it = iter(resumed)
        assert all((next(it)["tokens"] == b["tokens"]).all() for b in straight[k:]), k


def sources(data, wa=3.0, wb=1.0):
    return [("a", data["root"] / "a" / "train", wa), ("b", data["root"] / "b" / "train", wb)]


def test_weighted_sources_match_the_weights_and_resume_exactly(data):
    B, n = 4, 150
    ld = ShardLoader(sources(data), micro_batch_size=B, seed=5)
    it = iter(ld)
    straight = [next(it) for _ in range(n)]
    drawn = {"a": 0, "b": 0}
    for batch in ld.batch_documents(range(n)):
        for pieces in batch:
            drawn[pieces[0][0]] += 1
    total = n * B
    p, phat = 0.75, drawn["a"] / total
    assert abs(phat - p) <= 4 * math.sqrt(p * (1 - p) / total), drawn
    tokens = ld.source_tokens()
    assert tokens == {name: c * 32 for name, c in drawn.items()}
    assert ld.mixture_metrics() == {f"source_tokens/{k}": float(v) for k, v in tokens.items()}
    # the smaller source went round several epochs meanwhile; resume anywhere (workers too) is exact
    for k, workers in ((0, 0), (37, 0), (111, 2)):
        resumed = ShardLoader(sources(data), micro_batch_size=B, seed=5, num_workers=workers)
        resumed.load_state_dict(json.loads(json.dumps({**ld.state_dict(), "position": k})))
        it = iter(resumed)
        assert all((next(it)["tokens"] == b["tokens"]).all() for b in straight[k:k + 25]), k
    # and the draws are the seed's, not the run's
    other = ShardLoader(sources(data, 1.0, 1.0), micro_batch_size=B, seed=5)
    assert other.source_tokens(n)["b"] > tokens["b"]


def test_sources_with_other_tokenizers_are_refused(data, tmp_path):
    other = tmp_path / "other.model"
    train_tokenizer(data["docs"][:4], 420, other)
    write_shards(data["docs"][:2], other, seq_len=31, out=tmp_path / "c", samples_per_shard=12, progress=False)
    with pytest.raises(DataError, match="same tokenizer"):
        ShardLoader([("a", data["root"] / "a" / "train", 1), ("c", tmp_path / "c", 1)], micro_batch_size=2)
    with pytest.raises(DataError, match="weight"):
        ShardLoader([("a", data["root"] / "a" / "train", 0)], micro_batch_size=2)


def test_config_sources_are_checked_before_start_and_logged_as_tokens_per_source(tmp_path):
    from train_helpers import make_dataset, read_metrics, tiny_config, write_config

    a = make_dataset(tmp_path / "a", samples=32, samples_per_shard=8, seed=1)
    b = make_dataset(tmp_path / "b", samples=32, samples_per_shard=8, seed=2)
    cfg = tiny_config(a, tmp_path / "run", train={"steps": 4})
    del cfg["data"]["dir"]
    cfg["data"]["sources"] = [{"dir": str(a), "weight": 3}, {"dir": str(b), "weight": 1, "name": "second"}]
    path = write_config(tmp_path / "c.yaml", cfg)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "fluidlm.train", "--config", str(path)], capture_output=True, text=True,
                         env=env, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    last = read_metrics(tmp_path / "run")[-1]
    assert last["source_tokens/a"] + last["source_tokens/second"] == 4 * 2 * 65
    # a source made with another tokenizer is refused before any process group, naming it
    m = json.loads((b / "train" / "manifest.json").read_text())
    m["tokenizer_sha256"] = "f" * 64
    (b / "train" / "manifest.json").write_text(json.dumps(m))
    out = subprocess.run([sys.executable, "-m", "fluidlm.train", "--config", str(path), f"train.run_dir={tmp_path / 'r2'}"],
                         capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert out.returncode == 2 and "another tokenizer" in out.stderr and str(b) in out.stderr, out.stderr[-2000:]
    out = subprocess.run([sys.executable, "-m", "fluidlm.train", "--config", str(path), f"data.dir={tmp_path}",
                          "--print-config"], capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert out.returncode == 2 and "data.sources" in out.stderr
