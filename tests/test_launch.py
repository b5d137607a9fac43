"""`fluidlm launch` (python -m fluidlm.launch): multi-node training through torchrun, on one CPU
machine. Two "nodes" (two launches, --nnodes=2, one gloo process each, rendezvous on 127.0.0.1)
reproduce the single-node 2-process losses; SIGKILL of a worker mid-run makes torchrun restart
the group (--max-restarts 1), which resumes from the newest complete checkpoint and ends with the
uninterrupted run's losses and weights; --dry-run prints the torchrun command; bad endpoints and
layouts fail in seconds with exit code 2. Issue 27: one writer per run folder (two trainings started
together; --resume auto while one runs), no orphans after SIGKILL of the agent. Tiny model (d_model
32, 2 layers, vocab 256)."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train_helpers import losses, make_dataset, read_metrics, tiny_config, write_config

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NODE_RANK"))}
ENV.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
STEPS, EVERY = 30, 6
# Two nodes vs one node with the same two ranks: the same sums of the same two numbers.
TOLERANCE = 1e-6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: Path, *args: str, cwd: Path, background: bool = False, timeout: float = 240):
    cmd = [sys.executable, "-m", "fluidlm.launch", "--config", str(config), *args]
    if background:
        # Own session: on a timeout the whole tree (agent and workers) is killed with one killpg.
        return subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def two_nodes(config: Path, cwd: Path, *args: str):
    """Start node ranks 0 and 1 (node 1 waits for node 0's endpoint). Returns the two Popens."""
    endpoint = f"127.0.0.1:{free_port()}"
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", endpoint, "--join-timeout", "120", *args]
    return [launch(config, *common, "--node-rank", str(r), cwd=cwd, background=True) for r in (0, 1)]


def finish(procs, timeout: float = 180) -> list[tuple[int, str]]:
    out = []
    deadline = time.time() + timeout
    for p in procs:
        try:
            text, _ = p.communicate(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                try:
                    os.killpg(q.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            raise
        out.append((p.returncode, text))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("launch")
    data = make_dataset(tmp / "data", samples=128)

    def config(name: str, **sections) -> Path:
        base = {"train": {"steps": STEPS}, "checkpoint": {"every": EVERY, "keep": 10}}
        for key, value in sections.items():
            base.setdefault(key, {}).update(value)
        return write_config(tmp / f"{name}.yaml", tiny_config(data, tmp / "runs" / name, **base))

    return tmp, config


@pytest.fixture(scope="module")
def single_node(setup):
    """The reference: one node, two processes, uninterrupted (dropout on)."""
    tmp, config = setup
    proc = launch(config("single"), "--nproc-per-node", "2", cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "starts from scratch" in proc.stderr
    return tmp / "runs" / "single"


def test_two_nodes_reproduce_the_single_node_losses(setup, single_node):
    tmp, config = setup
    results = finish(two_nodes(config("two"), tmp))
    for code, text in results:
        assert code == 0, text[-4000:]
    assert "--rdzv-backend=c10d" in results[1][1] and "is_host=0" in results[1][1]
    a, b = losses(single_node), losses(tmp / "runs" / "two")
    assert list(a) == list(b) == list(range(1, STEPS + 1))
    assert max(abs(a[k] - b[k]) for k in a) <= TOLERANCE
    assert read_metrics(tmp / "runs" / "two")[-1]["tokens"] == STEPS * 2 * 2 * 64


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _workers(agent_pids) -> dict[int, int]:
    """{global RANK: pid} of the training processes under the torchrun agents."""
    found = {}
    for agent in agent_pids:
        for child in _children(agent):
            try:
                if b"fluidlm.train" not in Path(f"/proc/{child}/cmdline").read_bytes():
                    continue
                env = dict(item.split(b"=", 1) for item in Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
                           if b"=" in item)
            except OSError:
                continue
            if b"RANK" in env:
                found[int(env[b"RANK"])] = child
    return found


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the worker processes through /proc")
def test_sigkill_of_a_worker_restarts_the_group_from_the_last_checkpoint(setup, single_node):
    from fluidlm.train.checkpoint_read import complete_checkpoints, problems

    tmp, config = setup
    run = tmp / "runs" / "killed"
    procs = two_nodes(config("killed"), tmp, "--max-restarts", "1")
    latest = run / "checkpoints" / "latest"
    deadline, killed = time.time() + 180, None
    while time.time() < deadline and killed is None and all(p.poll() is None for p in procs):
        # Kill mid-training, two steps past the first checkpoint: steps that must be trained again.
        if latest.exists() and len(read_metrics(run)) >= EVERY + 2:
            workers = _workers([p.pid for p in procs])
            if 0 in workers:
                saved = latest.read_text().strip()
                os.kill(workers[0], signal.SIGKILL)  # global rank 0: it writes metrics and publishes checkpoints
                killed = (saved, len(read_metrics(run)))
        time.sleep(0.05)
    results = finish(procs)
    for rank, (code, text) in enumerate(results):
        (run / f"node{rank}.log").write_text(text)  # for a post-mortem
        assert code == 0, text[-5000:]
    assert killed is not None, "the run ended before a worker could be killed: " + results[0][1][-2000:]
    saved, logged = killed
    assert logged < STEPS, f"the kill came after the last step ({killed})"
    text = results[0][1] + results[1][1]
    assert "resuming from" in text, text[-4000:]
    resumed = int(text.split("resuming from")[1].split("step_")[1][:8])
    assert resumed >= int(saved.split("_")[1])  # the newest complete checkpoint (or a later one)

    # Every step trained exactly once into the final model: the uninterrupted run's losses, bitwise,
    # and its final weights.
    assert losses(run) == losses(single_node)
    assert [m["step"] for m in read_metrics(run)] == list(range(1, STEPS + 1))
    import torch

    final = f"checkpoints/step_{STEPS:08d}/mp_rank_00_model_states.pt"
    w_killed = torch.load(run / final, map_location="cpu", weights_only=False)["module"]
    w_single = torch.load(single_node / final, map_location="cpu", weights_only=False)["module"]
    assert w_killed.keys() == w_single.keys()
    assert all(torch.equal(w_killed[k], w_single[k]) for k in w_killed)
    # No corrupted checkpoint: every step_* folder is complete, no temporary folder is left.
    ck = run / "checkpoints"
    steps = sorted(p.name for p in ck.iterdir() if p.name.startswith("step_"))
    assert steps == [f"step_{s:08d}" for s in range(EVERY, STEPS + 1, EVERY)]
    assert all(not problems(ck / s) for s in steps) and len(complete_checkpoints(ck)) == len(steps)
    assert not list(ck.glob(".tmp-*"))


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except OSError:
        return False


def _wait_for(condition, timeout: float, what: str):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _train(cfg: Path, *args: str, background: bool = False):
    cmd = [sys.executable, "-m", "fluidlm.train", "--config", str(cfg), *args]
    if background:
        return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)


def test_two_trainings_on_one_run_folder_one_writer(setup):
    """Issue 27 item 1: two `fluidlm train` started together on one folder: one trains, the other
    exits 2 naming it (host, pid, start time) before any process group; so does `--resume auto` (and
    `fluidlm launch`) while the first still runs. metrics.jsonl gets every step once."""
    tmp, config = setup
    cfg = config("locked", train={"steps": 100000}, checkpoint={"every": 2, "keep": 2})
    run = tmp / "runs" / "locked"
    procs = [_train(cfg, background=True) for _ in range(2)]
    try:
        _wait_for(lambda: any(p.poll() is not None for p in procs), 90, "one of the two to give up")
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        err = loser.stderr.read()
        assert loser.returncode == 2, err
        assert (f"is in use by another training (host {socket.gethostname()}, pid {winner.pid}, started "
                in err), err
        assert "Traceback" not in err and "deepspeed" not in err.lower()
        _wait_for(lambda: (run / "checkpoints" / "latest").exists(), 90, "the winner's first checkpoint")
        again = _train(cfg, "--resume", "auto")
        assert again.returncode == 2 and f"pid {winner.pid}, started" in again.stderr, again.stderr
        assert "Traceback" not in again.stderr
        launched = launch(cfg, "--dry-run", cwd=tmp, timeout=60)
        assert launched.returncode == 2 and "is in use by another training" in launched.stderr, launched.stderr
        winner.send_signal(signal.SIGTERM)  # stops after its step, saves, exits 0
        assert winner.wait(timeout=60) == 0, winner.stderr.read()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    steps = [m["step"] for m in read_metrics(run)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 2


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the worker processes through /proc")
def test_sigkill_of_the_agent_leaves_no_worker_behind(setup):
    """Issue 27 item 4: SIGKILL of the torchrun agent (what `fluidlm launch` execs into): both workers
    die within seconds (PR_SET_PDEATHSIG), instead of training on as orphans; the run lock is free."""
    from fluidlm.train.runlock import holder

    tmp, config = setup
    cfg = config("orphans", train={"steps": 100000}, checkpoint={"every": 0})
    run = tmp / "runs" / "orphans"
    agent = launch(cfg, "--nproc-per-node", "2", cwd=tmp, background=True)
    try:
        _wait_for(lambda: len(read_metrics(run)) >= 2 or agent.poll() is not None, 150, "training to start")
        assert agent.poll() is None, agent.stdout.read()[-3000:]
        workers = _workers([agent.pid])
        assert sorted(workers) == [0, 1] and holder(run) is not None
        os.kill(agent.pid, signal.SIGKILL)
        deadline = time.time() + 5
        while time.time() < deadline and any(_alive(pid) for pid in workers.values()):
            time.sleep(0.1)
        survivors = [pid for pid in workers.values() if _alive(pid)]
        assert not survivors, f"workers {survivors} outlived their agent"
        # the lock goes with the last process sharing it (a worker's forked helpers follow it shortly)
        _wait_for(lambda: holder(run) is None, 15, "the run lock to be released")
    finally:
        try:
            os.killpg(agent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        agent.wait()


def test_dry_run_prints_the_torchrun_command(setup):
    tmp, config = setup
    cfg = config("dry")
    proc = launch(cfg, "--nnodes", "2", "--nproc-per-node", "4", "--rdzv-endpoint", "localhost:29400",
                  "--node-rank", "1", "--max-restarts", "3", "--dry-run", "train.steps=5", cwd=tmp, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout.strip()) == [
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d",
        "--rdzv-endpoint=localhost:29400", "--rdzv-id=fluidlm-dry", "--rdzv-conf=join_timeout=600,is_host=0",
        "--max-restarts=3", "--shutdown-timeout=120", "-m", "fluidlm.train", "--config", str(cfg), "--resume", "auto", "train.steps=5"]
    assert "world 8" in proc.stderr and not (tmp / "runs" / "dry" / "checkpoints").exists()


def _bad(tmp: Path, cfg: Path, *args: str) -> str:
    start = time.time()
    proc = launch(cfg, *args, cwd=tmp, timeout=60)
    took = time.time() - start
    assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
    assert took < 20, (args, took)
    assert "Traceback" not in proc.stderr
    return proc.stderr


def test_bad_endpoints_and_layouts_fail_fast_with_exit_code_2(setup):
    tmp, config = setup
    cfg = config("bad")
    two = ["--nnodes", "2", "--nproc-per-node", "1"]
    assert "the port 'xx' is not a number" in _bad(tmp, cfg, *two, "--rdzv-endpoint", "nohost:xx", "--node-rank", "0")
    assert "does not resolve" in _bad(tmp, cfg, *two, "--rdzv-endpoint", "nohost.invalid:29500", "--node-rank", "1")
    assert "out of range" in _bad(tmp, cfg, *two, "--rdzv-endpoint", "127.0.0.1:70000", "--node-rank", "0")
    assert "not HOST:PORT" in _bad(tmp, cfg, *two, "--rdzv-endpoint", "29500", "--node-rank", "0")
    assert "not an address of this machine" in _bad(tmp, cfg, *two, "--rdzv-endpoint", "192.0.2.1:29500",
                                                     "--node-rank", "0")
    with socket.socket() as busy:  # node rank 0 must be able to host the store
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert "already in use" in _bad(tmp, cfg, *two, "--rdzv-endpoint", f"127.0.0.1:{port}", "--node-rank", "0")
    # Another node whose endpoint never answers gives up after --join-timeout, not torchrun's 600 s.
    assert "nothing accepted a connection within 3 s" in _bad(
        tmp, cfg, *two, "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--node-rank", "1", "--join-timeout", "3")
    assert "pass --node-rank" in _bad(tmp, cfg, *two, "--rdzv-endpoint", "127.0.0.1:29500")
    # Layouts that do not fit the ranks.
    assert "world size 3 is not divisible by parallel.tp × parallel.pp × parallel.cp = 2 × 1 × 1" in _bad(
        tmp, cfg, "--nproc-per-node", "3", "parallel.tp=2")
    assert "model.n_heads=2 is not divisible by the tensor-parallel size 4" in _bad(
        tmp, cfg, *two, "--rdzv-endpoint", "127.0.0.1:29500", "--node-rank", "0", "parallel.tp=4")
