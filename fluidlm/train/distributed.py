"""Process group start-up for training and evaluation: the torchrun world (or a world of one),
its device and CPU threads, DeepSpeed's start-up patches, seeding.

    dist_info = init_distributed(config)      # training: torchrun env, or a world of one
    rank, world, device, created = init_process_group("auto", threads=None)   # evaluation

Training: gloo on CPU, NCCL on CUDA unless parallel.backend says otherwise, through DeepSpeed;
with TP, PP or CP > 1 the model-parallel groups (megatron-core) and DeepSpeed's topology are made
too. Evaluation: torch.distributed alone (no DeepSpeed), a process group only when world > 1.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import sys
from dataclasses import dataclass

import numpy as np
import torch

from fluidlm.parallel.topology import Layout
from fluidlm.train.config import Config


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    created_group: bool  # we created the process group (so we destroy it at exit)
    layout: Layout       # world = PP × DP × CP × TP
    topology: object = None  # DeepSpeed's PipeModelDataParallelTopology when TP, PP or CP > 1

    @property
    def dp_rank(self) -> int:
        return self.layout.coordinates(self.rank)["dp"]

    @property
    def model_parallel(self) -> bool:
        return self.layout.tp * self.layout.pp * self.layout.cp > 1

    @property
    def cp_rank(self) -> int:
        return self.layout.coordinates(self.rank)["cp"]

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(config: Config) -> DistInfo:
    """Join the torchrun world (RANK/WORLD_SIZE/... in the environment) or make a world of one.
    gloo on CPU, NCCL on CUDA unless parallel.backend says otherwise."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    backend = config.parallel.backend if config.parallel.backend != "auto" else ("nccl" if cuda else "gloo")
    if "RANK" not in os.environ:  # plain `fluidlm train`: a world of one
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    device = _device(cuda, local_rank)
    if not cuda:
        _set_cpu_threads(config.train.threads, local_world)
    _quiet_deepspeed()
    import deepspeed

    if device.type == "cpu":
        _skip_deepspeed_shm_op()
    created = not dist.is_initialized()
    if created:
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, rank=rank, world_size=world)
    layout = Layout.from_world(world, config.parallel.tp, config.parallel.pp, config.parallel.cp)
    topology = None
    if layout.tp * layout.pp * layout.cp > 1:
        from fluidlm.parallel.topology import init_model_parallel

        topology = init_model_parallel(layout)
    return DistInfo(rank, world, local_rank, local_world, device, backend, created, layout, topology)


def init_process_group(device_choice: str = "auto", threads: int | None = None) -> tuple[int, int, torch.device, bool]:
    """Evaluation's start-up: (rank, world, device, created) of the torchrun world in the environment
    (RANK, WORLD_SIZE, LOCAL_RANK; a world of one without them). `device_choice` is `fluidlm eval
    --device` (auto: CUDA when visible); a process group (NCCL on CUDA, gloo on CPU) only when world > 1,
    `created` when this call made it (destroy it at exit). On CPU, `threads` per process (None: the
    cores / the local processes). No DeepSpeed, no model-parallel groups."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible")
    device = _device(use_cuda, local_rank)
    created = False
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
            created = True
    if device.type == "cpu":
        _set_cpu_threads(threads, int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))
    return rank, world, device, created


def die_with_parent() -> None:
    """Under torchrun (TORCHELASTIC_RUN_ID set), have the kernel SIGKILL this worker when its agent
    dies (prctl PR_SET_PDEATHSIG): an agent killed with SIGKILL cannot stop its workers, and orphans
    would keep training beside a restart. A worker whose agent is already gone exits at once. Linux
    only; elsewhere a no-op. (SIGKILL, not SIGTERM: with no agent nobody would reap a worker hung in
    a collective whose peers are gone; the newest checkpoint is what a restart continues from.)"""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return
    if os.getppid() == 1:  # the agent died before prctl took effect
        os._exit(1)


def _device(cuda: bool, local_rank: int) -> torch.device:
    """This process's device: CUDA device `local_rank` (made current), else the CPU."""
    if cuda:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _set_cpu_threads(threads: int | None, local_world: int) -> None:
    """`threads` torch threads, or (None) this machine's cores shared among its `local_world` processes."""
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // max(local_world, 1)))


def _skip_deepspeed_shm_op() -> None:
    """On CPU, DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce op at start-up
    (~40 s on 2 cores, and it needs a C++ compiler). It only serves DeepSpeed's inference
    all-reduce; training uses torch.distributed (gloo) collectives. Skip the build."""
    try:
        import importlib

        # (not `import deepspeed.comm.torch as ...`: that attribute path resolves to torch itself)
        ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
        if hasattr(ds_torch_comm, "build_shm_op"):
            ds_torch_comm.build_shm_op = lambda: None
    except Exception:  # pragma: no cover - an optimisation only
        pass


def _quiet_deepspeed() -> None:
    # DeepSpeed logs every config key at INFO on every rank; keep warnings only. Its ZeRO code
    # calls torch.distributed functions torch 2.13 deprecates, every step: not our business.
    import warnings

    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
                            category=FutureWarning)
    os.environ.setdefault("DEEPSPEED_LOG_LEVEL", "warning")
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except Exception:  # pragma: no cover - logging is cosmetic
        pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
