"""`fluidlm launch`: start training on one node of a multi-node run, through torchrun.

    fluidlm launch --config FILE --nnodes N --nproc-per-node G --rdzv-endpoint HOST:PORT \\
                   [--node-rank R] [--max-restarts K] [--dry-run] [section.key=value ...]

Run it once per node (Slurm: `srun --ntasks-per-node=1`), with the same arguments everywhere but
--node-rank. It checks what can be checked before any process starts, then replaces itself
(exec) with

    python -m torch.distributed.run --nnodes=N --nproc-per-node=G
        --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT --rdzv-id=ID
        --rdzv-conf=join_timeout=T,is_host=0|1 --max-restarts=K --shutdown-timeout=S
        -m fluidlm.train --config FILE --resume auto [overrides]

so signals and the exit code are torchrun's own: SIGTERM/SIGINT reach torchrun, which forwards
them to every rank (each finishes its step, saves, exits 0; torchrun itself then exits 1 with a
SignalException traceback: after a stop, look at checkpoints/latest, not at the exit code).
`--resume auto` is always passed: a fresh run starts from scratch, and when a worker dies torchrun
restarts the whole group (up to --max-restarts times) and every rank continues from the newest
complete checkpoint. TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 is set for torchrun (see launch_env).

Checked first (exit code 2 and a message on failure, within seconds, never a hang):
  - the config (schema, overrides) and its layout for N×G ranks (world divisible by tp×pp, model
    divisible by tp), the NCCL backend only with CUDA, G ≤ the GPUs of this node;
  - the data folder: manifest and every listed shard readable;
  - the run folder: writable (a test file is created and removed), not locked by a running
    training; the checkpoint --resume auto would load (complete, its checksums verified, saved with
    the same world size and layout, not already at train.steps);
  - the rendezvous endpoint: HOST:PORT well-formed (port 1-65535), HOST resolves (5 s limit);
    on node rank 0, which hosts the rendezvous store, HOST must be an address of this machine and
    PORT free; on other nodes, the endpoint must accept connections within --join-timeout.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import shlex
import socket
import sys
import threading
import time
from pathlib import Path

EXIT_OK, EXIT_BAD_INPUT = 0, 2
RESOLVE_TIMEOUT_S = 5.0


class LaunchError(ValueError):
    """Something that would make the launch fail; the message says what and how to fix it."""


# --- rendezvous endpoint ---------------------------------------------------------------------

def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """"HOST:PORT" or "[IPv6]:PORT" → (host, port). Raises LaunchError."""
    hint = "expected HOST:PORT, e.g. node001:29500 or 10.0.0.1:29500"
    text = (endpoint or "").strip()
    match = re.fullmatch(r"\[([0-9A-Fa-f:.%\w]+)\]:(.*)", text) or re.fullmatch(r"([^:\[\]\s]+):(.*)", text)
    if not match:
        raise LaunchError(f"--rdzv-endpoint {endpoint!r} is not HOST:PORT ({hint})")
    host, port_text = match.groups()
    if not re.fullmatch(r"\d{1,5}", port_text):
        raise LaunchError(f"--rdzv-endpoint {endpoint!r}: the port {port_text!r} is not a number ({hint})")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise LaunchError(f"--rdzv-endpoint {endpoint!r}: port {port} is out of range (1-65535)")
    return host, port


def resolve(host: str, timeout: float = RESOLVE_TIMEOUT_S) -> list[tuple]:
    """getaddrinfo with a time limit (a broken DNS must not hang the launch). Returns the
    (family, sockaddr) pairs of HOST. Raises LaunchError."""
    result: dict = {}

    def work():
        try:
            result["infos"] = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            result["error"] = exc

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise LaunchError(f"--rdzv-endpoint: resolving {host!r} took more than {timeout:.0f} s (DNS down?); "
                          "use the IP address of node rank 0")
    if "error" in result:
        raise LaunchError(f"--rdzv-endpoint: the host {host!r} does not resolve ({result['error']}); use the "
                          "hostname or IP address of node rank 0 as the other nodes reach it "
                          "(Slurm: `scontrol show hostnames $SLURM_JOB_NODELIST | head -n1`)")
    seen, out = set(), []
    for family, _, _, _, sockaddr in result["infos"]:
        if family in (socket.AF_INET, socket.AF_INET6) and sockaddr[0] not in seen:
            seen.add(sockaddr[0])
            out.append((family, sockaddr))
    if not out:
        raise LaunchError(f"--rdzv-endpoint: the host {host!r} has no IPv4/IPv6 address")
    return out


def check_can_host(host: str, port: int, addresses: list[tuple]) -> None:
    """Node rank 0 hosts the rendezvous store: HOST must be one of this machine's addresses and
    PORT free. A bind test (SO_REUSEADDR, as the store itself sets) says both at once."""
    errors = []
    for family, sockaddr in addresses:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((sockaddr[0], port, *sockaddr[2:]))
                return
            except OSError as exc:
                errors.append((sockaddr[0], exc))
    if any(exc.errno == errno.EADDRINUSE for _, exc in errors):
        raise LaunchError(f"--rdzv-endpoint {host}:{port}: port {port} is already in use on this machine (another "
                          "run, or a previous one still shutting down); choose another port")
    if all(exc.errno == errno.EADDRNOTAVAIL for _, exc in errors):
        addrs = ", ".join(a for a, _ in errors)
        raise LaunchError(f"--rdzv-endpoint {host}:{port}: node rank 0 hosts the rendezvous, but {host} ({addrs}) is "
                          "not an address of this machine; run node rank 0 on that host, or point --rdzv-endpoint at "
                          "this machine (`hostname`)")
    addr, exc = errors[0]
    raise LaunchError(f"--rdzv-endpoint {host}:{port}: cannot listen on {addr} port {port} ({exc}); choose another "
                      "port (ports below 1024 need root)")


def wait_for_endpoint(host: str, port: int, timeout: float, poll: float = 1.0) -> None:
    """Other nodes: wait until node rank 0's rendezvous store accepts connections, at most
    `timeout` seconds. Raises LaunchError."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, max(0.5, timeout))):
                return
        except OSError as exc:
            last = exc
        if time.monotonic() + poll > deadline:
            break
        time.sleep(poll)
    raise LaunchError(f"--rdzv-endpoint {host}:{port}: nothing accepted a connection within {timeout:.0f} s "
                      f"(--join-timeout; last error: {last}); start node rank 0 first, check that {host} is node "
                      "rank 0's address as seen from here and that the port is open in the firewall")


# --- config, data, run folder ----------------------------------------------------------------

def check_training(config_path: str, overrides: list[str], world: int, nproc: int) -> tuple[object, str | None]:
    """The checks `fluidlm train` would make, for a world of `world` ranks, plus the data files
    and the run folder. Returns (config, the checkpoint --resume auto would load or None)."""
    from fluidlm.data import DataError
    from fluidlm.train.checkpoint_read import CheckpointError, resolve_resume
    from fluidlm.train.checks import check_layout, check_resume
    from fluidlm.train.config import ConfigError, load_config, preflight

    try:
        config = load_config(config_path, overrides)
        manifest = preflight(config)
    except (ConfigError, DataError) as exc:
        raise LaunchError(str(exc)) from None
    p = config.parallel
    try:
        check_layout(config, world)  # (heads/FFN/vocabulary vs tp: already checked by load_config)
    except ConfigError as exc:
        raise LaunchError(f"{exc} (world = --nnodes × --nproc-per-node = {world})") from None

    import torch

    cuda = torch.cuda.is_available()
    if p.backend == "nccl" and not cuda:
        raise LaunchError("parallel.backend=nccl needs CUDA GPUs, and this node has none; use parallel.backend=auto")
    if cuda and nproc > torch.cuda.device_count():
        raise LaunchError(f"--nproc-per-node={nproc} but this node has {torch.cuda.device_count()} GPU(s) visible "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); one process per GPU")

    # Every local shard the manifest lists must be readable from this node (a shared file system);
    # remote ones (http(s)://, s3://, pipe:, ...) are fetched by each rank, with retries.
    from fluidlm.data.shards import is_remote, shard_url

    shard_dir = config.manifest_path().parent
    for shard in manifest.get("shards", []):
        path = shard_url({**manifest, "root": str(shard_dir)}, shard)
        if not is_remote(path) and not os.access(path, os.R_OK):
            raise LaunchError(f"data.dir={config.data.dir!r}: shard {str(path)!r} is missing or unreadable on this "
                              f"node ({socket.gethostname()}); every node needs the data (a shared file system)")

    # The run folder (checkpoints, metrics.jsonl) must be writable, shared by all nodes, and not in use.
    from fluidlm.train.checks import check_writable
    from fluidlm.train.runlock import holder

    try:
        check_writable(config.run_dir, f"train.run_dir={config.train.run_dir!r} (from {socket.gethostname()})")
    except ConfigError as exc:
        raise LaunchError(f"{exc}; checkpoints go there: use a folder on a file system every node can write") from None
    busy = holder(config.run_dir)
    if busy is not None:
        raise LaunchError(f"train.run_dir={config.train.run_dir!r} is in use by another training ({busy}); one run "
                          "folder has one writer: wait for it or stop it, or choose another train.run_dir")

    resume_from = None
    try:
        resume_from = resolve_resume("auto", config.checkpoint_dir)
        if resume_from is not None:
            check_resume(resume_from, config, world)
    except CheckpointError as exc:
        raise LaunchError(f"{exc} (this launch: world {world} = {world // nproc} node(s) × {nproc}; "
                          f"--resume auto would continue from {resume_from}; or use another train.run_dir)") from None
    return config, (str(resume_from) if resume_from is not None else None)


# --- the command -----------------------------------------------------------------------------

def default_rdzv_id(config) -> str:
    """The same on every node: the Slurm job id, else the run folder's name."""
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        return f"fluidlm-{job}"
    return "fluidlm-" + (re.sub(r"[^A-Za-z0-9_.-]", "-", Path(config.train.run_dir).name) or "run")


def build_command(args: argparse.Namespace, endpoint: str, node_rank: int, rdzv_id: str) -> list[str]:
    conf = f"join_timeout={int(args.join_timeout)},is_host={1 if node_rank == 0 else 0}"
    cmd = [sys.executable, "-m", "torch.distributed.run",
           f"--nnodes={args.nnodes}", f"--nproc-per-node={args.nproc_per_node}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={rdzv_id}", f"--rdzv-conf={conf}",
           f"--max-restarts={args.max_restarts}", f"--shutdown-timeout={int(args.shutdown_timeout)}"]
    if args.local_addr:
        cmd.append(f"--local-addr={args.local_addr}")
    if args.log_dir:
        cmd.append(f"--log-dir={args.log_dir}")
    cmd += ["-m", "fluidlm.train", "--config", args.config, "--resume", "auto", *args.overrides]
    return cmd


def launch_env() -> dict[str, str]:
    """Environment torchrun needs for restarts to work. By default (torch ≥ 2.5) the workers'
    store is the rendezvous store of torchrun's agent, shared across restarts and keyed by each
    agent's own restart count; when one node restarts after a failure and another after a
    membership change those counts differ and the new group waits forever (pytorch#135712,
    reproduced here with torch 2.13: SIGKILL of one worker hung the restarted group).
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives every restart a fresh store; an explicit value in
    the environment wins."""
    return {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")}


def _node_rank(args) -> int:
    if args.node_rank is not None:
        rank = args.node_rank
    elif args.nnodes == 1:
        rank = 0
    else:
        env = next((k for k in ("NODE_RANK", "SLURM_NODEID") if os.environ.get(k, "").strip()), None)
        if env is None:
            raise LaunchError(f"--nnodes={args.nnodes}: pass --node-rank (0 on the node named in --rdzv-endpoint, "
                              "1..N-1 elsewhere), or set NODE_RANK / run under Slurm (SLURM_NODEID)")
        try:
            rank = int(os.environ[env])
        except ValueError:
            raise LaunchError(f"${env}={os.environ[env]!r} is not an integer node rank") from None
    if not 0 <= rank < args.nnodes:
        raise LaunchError(f"--node-rank={rank} is outside 0..{args.nnodes - 1} (--nnodes={args.nnodes})")
    return rank


def plan(args: argparse.Namespace) -> list[str]:
    """Every check, then the torchrun command. Raises LaunchError."""
    for name in ("nnodes", "nproc_per_node"):
        if getattr(args, name) < 1:
            raise LaunchError(f"--{name.replace('_', '-')}={getattr(args, name)} must be ≥ 1")
    if args.max_restarts < 0:
        raise LaunchError(f"--max-restarts={args.max_restarts} must be ≥ 0")
    if args.join_timeout <= 0 or args.shutdown_timeout <= 0:
        raise LaunchError(f"--join-timeout={args.join_timeout} and --shutdown-timeout={args.shutdown_timeout} must be > 0")
    node_rank = _node_rank(args)
    endpoint = args.rdzv_endpoint
    if endpoint is None:
        if args.nnodes > 1:
            raise LaunchError(f"--nnodes={args.nnodes} needs --rdzv-endpoint HOST:PORT (node rank 0's address and a "
                              "free port, the same on every node)")
        from fluidlm.train.distributed import free_port

        endpoint = f"127.0.0.1:{free_port()}"
    host, port = parse_endpoint(endpoint)
    world = args.nnodes * args.nproc_per_node
    # Config, data and run folder before the network: they are the likelier mistakes.
    config, resume_from = check_training(args.config, args.overrides, world, args.nproc_per_node)
    addresses = resolve(host)
    if node_rank == 0:
        check_can_host(host, port, addresses)
    elif not args.dry_run:
        wait_for_endpoint(host, port, args.join_timeout)
    rdzv_id = args.rdzv_id or default_rdzv_id(config)
    where = f"from {resume_from}" if resume_from else "from scratch (no checkpoint yet)"
    print(f"launch: node {node_rank} of {args.nnodes} × {args.nproc_per_node} process(es) = world {world}; "
          f"rendezvous {host}:{port} (id {rdzv_id}); starts {where}; run folder {config.train.run_dir}",
          file=sys.stderr, flush=True)
    endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return build_command(args, endpoint, node_rank, rdzv_id)


def run(args: argparse.Namespace) -> int:
    try:
        cmd = plan(args)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    env_vars = launch_env()
    shown = shlex.join([f"{k}={v}" for k, v in env_vars.items()] + cmd)
    if args.dry_run:
        print(shown, flush=True)
        return EXIT_OK
    print(f"launch: exec {shown}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # exec, not a child: signals reach torchrun directly (Ctrl-C once, not twice) and its exit
    # code is ours. torchrun forwards SIGTERM/SIGINT to the workers, which save and exit 0.
    os.execve(sys.executable, cmd, {**os.environ, **env_vars})
    return 1  # pragma: no cover - exec does not return


# --- argument parsing ------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML run config (see configs/)")
    p.add_argument("--nnodes", type=int, default=1, help="number of nodes (machines); default 1")
    p.add_argument("--nproc-per-node", type=int, default=1,
                   help="processes on this node: one per GPU (on a CPU, a few); default 1")
    p.add_argument("--rdzv-endpoint", metavar="HOST:PORT", default=None,
                   help="where node rank 0 hosts the rendezvous: its hostname or IP as the other nodes reach it, and "
                        "a free port (e.g. 29500); the same on every node. Optional with --nnodes=1")
    p.add_argument("--node-rank", type=int, default=None,
                   help="0 on the node named by --rdzv-endpoint (it hosts the rendezvous store), 1..N-1 on the others; "
                        "default $NODE_RANK, else $SLURM_NODEID, else 0 when --nnodes=1. Global ranks are assigned by "
                        "torchrun")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="restart the whole worker group this many times when a worker dies; each restart resumes "
                        "from the newest complete checkpoint (default 0)")
    p.add_argument("--join-timeout", type=float, default=600.0,
                   help="seconds to wait for all nodes to join the rendezvous (and, on nodes other than 0, for node "
                        "0's endpoint to answer) before failing; default 600")
    p.add_argument("--shutdown-timeout", type=float, default=120.0,
                   help="seconds torchrun gives the ranks after forwarding SIGTERM/SIGINT (they finish the step and "
                        "save a checkpoint) before it SIGKILLs them; torchrun's own default is 30. Default 120")
    p.add_argument("--rdzv-id", default=None,
                   help="rendezvous id, the same on every node; default fluidlm-$SLURM_JOB_ID, else fluidlm-<run folder name>")
    p.add_argument("--local-addr", default=None,
                   help="address of this node as the others reach it (torchrun --local-addr), when the hostname does "
                        "not resolve there")
    p.add_argument("--log-dir", default=None, help="torchrun --log-dir: one log file per worker under this folder")
    p.add_argument("--dry-run", action="store_true",
                   help="run the checks, print the torchrun command and exit (other nodes: the endpoint is not polled)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="dotted config overrides passed to every rank (train.steps=200)")


def register(subparsers) -> None:
    p = subparsers.add_parser("launch", help="multi-node training through torchrun (checks, then exec)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fluidlm.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_intermixed_args(argv))
