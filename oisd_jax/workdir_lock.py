"""One trainer per workdir: `<workdir>/train.lock` holds the owner's host and pid.

Without it two trainers on one folder both exit 0, one run's checkpoints replaced by the
other's and metrics.jsonl interleaved. The file is created with O_EXCL (atomic on local
and NFSv3+ file systems). A lock whose pid is dead on this host is stale (a crashed or
killed run) and is taken over with a warning; a lock from another host cannot be checked
from here, so it is refused with the file to delete. Cloud paths (gs://) are not locked.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import time

from oisd_jax.cli import UserError

LOCK_NAME = "train.lock"
log = logging.getLogger(__name__)


class WorkdirLocked(UserError):
    """Another live trainer owns the workdir."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            d = json.load(f)
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}  # empty or garbled: a writer killed between create and write


class WorkdirLock:
    """`acquire()` takes `<workdir>/train.lock` or raises WorkdirLocked; `release()` drops it."""

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = os.fspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_NAME)
        self.held = False

    def _owner(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self._owner(), f)
        return True

    def acquire(self) -> "WorkdirLock":
        if "://" in self.workdir:
            return self
        for _ in range(3):  # a stale lock removed by two takers at once: one wins the O_EXCL
            if self._create():
                self.held = True
                atexit.register(self.release)
                return self
            d = _read(self.path)
            host, pid = d.get("host"), d.get("pid")
            here = host == socket.gethostname()
            if d and not here:
                raise WorkdirLocked(f"{self.workdir} is in use by a trainer on host {host} (pid {pid}); "
                                    f"if that run is dead, delete {self.path}")
            if d and isinstance(pid, int) and pid != os.getpid() and _alive(pid):
                raise WorkdirLocked(f"{self.workdir} is in use by another trainer (pid {pid} on {host}); "
                                    "wait for it or choose another --workdir")
            # dead pid on this host, this very process (an earlier train() that raised), or garbled
            log.warning("taking over the stale lock %s (%s)", self.path, d or "unreadable")
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        raise WorkdirLocked(f"could not take {self.path}: other processes keep creating it")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if _read(self.path).get("pid") == os.getpid():
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
