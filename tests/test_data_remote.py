"""Issue 18 item 4: shards served over HTTP (a real http.server on 127.0.0.1, in a thread) and read
through webdataset's I/O: the same batches and the same training as from the local files; a
server that dies mid-shard, a truncated shard and a missing one give a clear error naming the URL."""

import functools
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fluidlm.data import DataError
from fluidlm.data.loader import ShardLoader
from fluidlm.data.shards import read_shard_samples, shard_url

from train_helpers import losses, make_dataset, tiny_config, write_config

ROOT = Path(__file__).resolve().parents[1]


class Server:
    """http.server in a thread; `mode` can make it cut a shard short, then die."""

    def __init__(self, directory: Path):
        outer = self
        self.mode, self.requests = "ok", []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.requests.append(self.path)
                if outer.mode == "ok" or not self.path.endswith(".tar"):
                    return super().do_GET()
                data = (Path(directory) / self.path.lstrip("/")).read_bytes()
                self.send_response(200)
                if outer.mode == "die":  # promise the whole shard, send half, drop the connection, stop serving
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)
                    threading.Thread(target=outer.stop).start()
                else:  # "truncate": a complete response that holds a shard cut short
                    cut = data[: len(data) * 2 // 3]
                    self.send_header("Content-Length", str(len(cut)))
                    self.end_headers()
                    self.wfile.write(cut)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):  # stop serving and close the listening socket: later connections are refused
        self.httpd.shutdown()
        self.httpd.server_close()

    close = stop


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("remote")
    local = make_dataset(tmp / "local", samples=64, samples_per_shard=16)
    server = Server(local)
    remote = tmp / "remote"
    for split in ("train", "val"):
        m = json.loads((local / split / "manifest.json").read_text())
        m["base_url"] = f"{server.url}/{split}"
        (remote / split).mkdir(parents=True)
        (remote / split / "manifest.json").write_text(json.dumps(m))
    yield {"tmp": tmp, "local": local, "remote": remote, "server": server}
    server.close()


def test_batches_from_urls_equal_batches_from_files(served):
    for workers in (0, 2):
        a = iter(ShardLoader(served["local"] / "train", micro_batch_size=3, num_workers=workers))
        b_loader = ShardLoader(served["remote"] / "train", micro_batch_size=3, num_workers=workers)
        b = iter(b_loader)
        for _ in range(30):
            x, y = next(a), next(b)
            assert (x["tokens"] == y["tokens"]).all() and (x["doc_starts"] == y["doc_starts"]).all()
        if workers == 0:
            assert all(u.startswith(served["server"].url) for u in b_loader.stats["shards_opened"])
    assert any(p.endswith(".tar") for p in served["server"].requests)


def test_training_from_urls_equals_training_from_files(served):
    tmp = served["tmp"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in ("local", "remote"):
        path = write_config(tmp / f"{name}.yaml", tiny_config(served[name], tmp / "runs" / name, model={"dropout": 0.0},
                                                              train={"steps": 4}))
        out = subprocess.run([sys.executable, "-m", "fluidlm.train", "--config", str(path)], capture_output=True,
                             text=True, env=env, timeout=120, cwd=tmp)
        assert out.returncode == 0, out.stderr[-3000:]
    assert losses(tmp / "runs" / "local") == losses(tmp / "runs" / "remote")  # bitwise


def _entry(served):
    m = json.loads((served["remote"] / "train" / "manifest.json").read_text())
    m["root"] = str(served["remote"] / "train")
    return m, m["shards"][0]


def test_a_truncated_or_missing_remote_shard_is_named_after_the_retries(served):
    m, entry = _entry(served)
    url = shard_url(m, entry)
    served["server"].mode = "truncate"
    try:
        t0 = time.perf_counter()
        with pytest.raises(DataError, match=rf"shard '{url}' is unreadable, truncated or corrupt after 3 attempts"):
            read_shard_samples(url, entry, retries=2, backoff=0.05)
        assert time.perf_counter() - t0 < 20
        assert served["server"].requests.count("/train/" + entry["file"]) >= 3
    finally:
        served["server"].mode = "ok"
    missing = {**entry, "file": "shard-999999.tar"}
    with pytest.raises(DataError, match=r"shard-999999\.tar.*HTTP error"):
        read_shard_samples(shard_url(m, missing), missing, retries=1, backoff=0.05)


def test_a_server_dying_mid_shard_gives_the_clear_error(tmp_path):
    data = make_dataset(tmp_path / "d", samples=32, samples_per_shard=16)
    server = Server(data)
    try:
        m = json.loads((data / "train" / "manifest.json").read_text())
        m["base_url"] = f"{server.url}/train"
        remote = tmp_path / "remote"
        remote.mkdir()
        (remote / "manifest.json").write_text(json.dumps(m))
        server.mode = "die"
        os.environ["FLUIDLM_SHARD_BACKOFF"] = "0.05"
        t0 = time.perf_counter()
        with pytest.raises(DataError) as err:
            next(iter(ShardLoader(remote, micro_batch_size=2)))
        msg = str(err.value)
        assert server.url in msg and "after 4 attempts" in msg and "cannot connect" in msg, msg
        assert "first attempt: curl exit 18" in msg, msg  # the transfer cut short, then the server gone
        assert time.perf_counter() - t0 < 30  # never a hang
    finally:
        os.environ.pop("FLUIDLM_SHARD_BACKOFF", None)
        server.httpd.server_close()  # (already closed when the test passed)
