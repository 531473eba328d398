"""An exclusive lock on a run directory for the lifetime of a run.

Two launches into one ``output_dir`` (a requeued Slurm job, a second terminal) would otherwise both train,
writing and rotating the same checkpoints. The lock is ``fcntl.flock`` on ``OUTPUT_DIR/.xlt.lock``: the
kernel releases it when the holder exits, however it exits (SIGKILL included), so a stale lock after a crash
is simply free and the next launch takes it over; the file records who holds it (host, pid, since when) so a
refused launch can say so in one line.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from typing import Optional

from xlt.config import XltError

LOCK_FILE = ".xlt.lock"


class RunLock:
    """Hold ``OUTPUT_DIR/.xlt.lock`` exclusively; use as a context manager (released on exit, or by the kernel)."""

    def __init__(self, output_dir: str, stage: str) -> None:
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.stage = stage
        self._fd: Optional[int] = None

    def acquire(self) -> RunLock:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise XltError(f"output dir {os.path.dirname(self.path)} is in use by another run ({holder}); wait for "
                           "it to end or use another --output_dir") from None
        except OSError as e:  # e.g. a filesystem without locks: say so rather than run unprotected silently
            os.close(fd)
            raise XltError(f"cannot lock {self.path}: {e.strerror}") from None
        info = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                "stage": self.stage}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "holder unknown"
    return f"{info.get('stage', 'run')} on host {info.get('host')}, pid {info.get('pid')}, since {info.get('since')}"


def run_lock(output_dir: str, stage: str):
    """The run directory's lock, held by the main process for the whole run (the other ranks hold nothing)."""
    import contextlib

    from xlt.train.distributed import is_main_process

    return RunLock(output_dir, stage) if is_main_process() else contextlib.nullcontext()
