"""One writer per run folder: an exclusive lock that rank 0 of a training holds for the run's life.

    <run_dir>/.fluidlm-run.lock    fcntl.flock'ed by the holder; holds {"host", "pid", "started"}

The kernel drops a flock when its process dies (kill -9 included), so a lock is never stale. Forked
children (DataLoader workers) share the lock until they exit too: a lock whose holder is dead on this
host is waited for, briefly, before it is refused. Readers (eval, export, convert) take no lock.

Where flock is not supported (some network file systems) the lock is a file created exclusively,
`.fluidlm-run.pid`, removed at exit; one left by a killed run on this host is stale when its pid is
gone and is replaced, with a message. One from another host cannot be checked from here: it is
refused, naming the file to delete when that run is known to be gone.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = ".fluidlm-run.lock"
PID_FILE = ".fluidlm-run.pid"
DEAD_HOLDER_WAIT_S = 30.0  # a dead holder's forked children exit within seconds
_held: dict[str, int | Path] = {}  # run folders this process holds (a second acquire is a no-op)


class RunLockError(ValueError):
    """Another process holds the run folder; the message names it."""


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _describe(holder: dict) -> str:
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"
            if holder else "a process that has not written its name yet")


def _read(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _alive(holder: dict) -> bool:
    """False only when the holder is known dead: on this host and its pid gone."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _refusal(run_dir: Path, holder: dict, how: str) -> RunLockError:
    return RunLockError(f"train.run_dir={str(run_dir)!r} is in use by another training ({_describe(holder)}; {how}); "
                        "one run folder has one writer: wait for that run to finish or stop it (SIGTERM saves a "
                        "checkpoint), then continue with --resume auto, or choose another train.run_dir")


def acquire(run_dir: Path) -> None:
    """Take the run folder's lock for the life of this process, or raise RunLockError naming the holder."""
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _held:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    start = time.monotonic()
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder, waited = _read(path), time.monotonic() - start
            if not holder and waited < 2.0:  # it has just taken the lock and not written its name yet
                time.sleep(0.05)
                continue
            if (holder and _alive(holder)) or waited > DEAD_HOLDER_WAIT_S:
                os.close(fd)
                raise _refusal(run_dir, holder, f"it holds {path}") from None
            time.sleep(0.5)  # the holder died; its forked children still share the lock for a moment
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            print(f"WARNING: the file system of {run_dir} does not support flock ({exc.strerror}); using a pid+host "
                  f"lock file, {run_dir / PID_FILE}, instead", file=sys.stderr, flush=True)
            _acquire_pid_file(run_dir)
            _held[key] = run_dir / PID_FILE
            return
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_me()).encode(), 0)
    _held[key] = fd  # never closed: the kernel releases it when this process ends


def _acquire_pid_file(run_dir: Path) -> None:
    path = run_dir / PID_FILE
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read(path)
            if _alive(holder):
                how = (f"its lock file {path}; if that run is gone (another host cannot be checked from here), "
                       "delete the file")
                raise _refusal(run_dir, holder, how) from None
            print(f"WARNING: removing the stale lock {path} of a run that is gone ({_describe(holder)})",
                  file=sys.stderr, flush=True)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(_me()))
        atexit.register(_remove_pid_file, path, os.getpid())
        return
    raise _refusal(run_dir, _read(path), f"its lock file {path} came back while replacing it")


def _remove_pid_file(path: Path, pid: int) -> None:
    if _read(path).get("pid") == pid and os.getpid() == pid:
        path.unlink(missing_ok=True)


def holder(run_dir: Path) -> str | None:
    """Who holds the run folder's lock now (a description), or None when it is free or ours. Takes
    nothing (for `fluidlm launch`'s checks)."""
    run_dir = Path(run_dir)
    if str(run_dir.resolve()) in _held:
        return None
    pid_file = run_dir / PID_FILE
    if pid_file.is_file() and _alive(_read(pid_file)):
        return _describe(_read(pid_file))
    path = run_dir / LOCK_FILE
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return _describe(_read(path))
    except OSError:
        return None
    finally:
        os.close(fd)  # (closing drops the probe's shared lock)
