"""One process per run folder: a lock file that two sweeps over the same runs folder respect.

`RunLock(run_dir).acquire()` creates `<run_dir>/.lock` with `O_CREAT | O_EXCL` (atomic, also on NFS v3+),
holding the owner's pid, host name, start time and, on Linux, the boot id and the process's start tick.
Another process that finds the file reads it:

* an owner on this host that is no longer running (its pid is gone, the machine rebooted since, or the pid
  now belongs to a process that started later) left a stale lock: it is taken over;
* a running owner, or one on another host (whose processes cannot be seen from here), holds the folder:
  `acquire` returns False and `holder` describes it, so a sweep can skip that run and go on;
* a lock file that cannot be parsed is being written by its owner unless it is older than
  `UNREADABLE_GRACE_S` seconds, in which case its writer died: it is taken over.

In a data-parallel job (`torchrun`) only rank 0 takes the lock; the other ranks follow its decision.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

LOCK_FILE = ".lock"
UNREADABLE_GRACE_S = 30.0
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@dataclass(frozen=True)
class LockOwner:
    pid: int
    host: str
    started: float
    """Seconds since the epoch when the lock was taken."""
    token: str
    boot_id: str | None = None
    process_start: int | None = None
    """The owner's start time in clock ticks after boot (Linux), to tell a reused pid from the owner."""

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on {self.host} since {when}"

    def to_json(self) -> str:
        return json.dumps(asdict(self)) + "\n"

    @classmethod
    def from_json(cls, text: str) -> LockOwner:
        data: dict[str, Any] = json.loads(text)
        return cls(
            pid=int(data["pid"]),
            host=str(data["host"]),
            started=float(data["started"]),
            token=str(data["token"]),
            boot_id=data.get("boot_id"),
            process_start=data.get("process_start"),
        )


def this_process(token: str | None = None) -> LockOwner:
    pid = os.getpid()
    return LockOwner(
        pid=pid,
        host=socket.gethostname(),
        started=time.time(),
        token=token or uuid.uuid4().hex,
        boot_id=_boot_id(),
        process_start=process_start_ticks(pid),
    )


def _boot_id() -> str | None:
    try:
        return _BOOT_ID.read_text().strip() or None
    except OSError:
        return None


def process_start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (start time after boot, in clock ticks); None where there is no /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces: count fields after the last ')'.
    fields = text[text.rfind(")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def pid_is_running(pid: int) -> bool:
    if pid <= 0:
        return False
    if os.name == "nt":
        return True  # os.kill(pid, 0) would end the process on Windows: assume it runs (the lock is honoured)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by another user
    return True


def owner_is_gone(owner: LockOwner) -> bool:
    """True only when the owner certainly no longer runs: it is on this host and its process has ended."""
    if owner.host != socket.gethostname():
        return False
    current_boot = _boot_id()
    if owner.boot_id and current_boot and owner.boot_id != current_boot:
        return True  # the machine restarted since the lock was taken
    if not pid_is_running(owner.pid):
        return True
    if owner.process_start is not None:
        start = process_start_ticks(owner.pid)
        if start is not None and start != owner.process_start:
            return True  # the pid was reused by a later process
    return False


class RunLockError(RuntimeError):
    """The lock file cannot be created (e.g. a read-only folder); the message says where."""


class RunLock:
    """The lock of one run folder. `acquire()` -> bool; `release()`; usable as a context manager that
    raises `RunBusy` when the folder is held."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.owner: LockOwner | None = None  # set while this process holds the lock
        self.holder: LockOwner | None = None  # the other owner, after a failed acquire
        self.took_over: LockOwner | None = None  # the stale owner replaced by the last acquire

    @property
    def held(self) -> bool:
        return self.owner is not None

    def acquire(self) -> bool:
        """Take the lock if it is free or stale; False (with `holder` set) when another process holds it."""
        if self.owner is not None:
            return True
        self.run_dir.mkdir(parents=True, exist_ok=True)
        me = this_process()
        for _ in range(5):  # a few rounds in case another process takes over the same stale lock at once
            if self._create(me):
                self.owner, self.holder = me, None
                return True
            current = self._read()
            if current is None:
                if self._unreadable_for_long():
                    self._remove_if_unchanged(None)
                    continue
                self.holder = None
                return False
            if owner_is_gone(current):
                if self._remove_if_unchanged(current):
                    self.took_over = current
                continue
            self.holder = current
            return False
        self.holder = self._read()
        return False

    def release(self) -> None:
        """Remove the lock file if it is still this process's (not one that replaced it)."""
        if self.owner is None:
            return
        current = self._read()
        if current is not None and current.token == self.owner.token:
            self.path.unlink(missing_ok=True)
        self.owner = None

    def describe_holder(self) -> str:
        if self.holder is None:
            return f"another process (its lock file {self.path} is being written)"
        return self.holder.describe()

    def busy_message(self) -> str:
        return (
            f"{self.run_dir} is in use by {self.describe_holder()}; this run is left to it. If that process is "
            f"gone (e.g. on another machine that crashed), delete {self.path} and run again with --resume"
        )

    def __enter__(self) -> RunLock:
        if not self.acquire():
            raise RunBusy(self.busy_message(), self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- file operations -------------------------------------------------------------------------------------
    def _create(self, me: LockOwner) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as err:
            raise RunLockError(self._cannot_create(err)) from err
        try:
            try:
                os.write(fd, me.to_json().encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as err:
            # A lock file left empty (e.g. on a full disk) would read as "being written" and block a retry.
            self.path.unlink(missing_ok=True)
            raise RunLockError(self._cannot_create(err)) from err
        return True

    def _cannot_create(self, err: OSError) -> str:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            what = "the disk quota is used up" if err.errno == errno.EDQUOT else "the disk is full"
            return (
                f"{what}: cannot create the lock file {self.path}{_free_space(self.run_dir)}; no lock is left "
                "behind. Free some space there (or write the runs to another disk: --runs-dir, --output), then "
                "run the command again"
            )
        return f"cannot create the lock file {self.path}: {err.strerror or err}; check that {self.run_dir} is writable"

    def _read(self) -> LockOwner | None:
        try:
            return LockOwner.from_json(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _unreadable_for_long(self) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True  # gone meanwhile: try to create it again
        return age > UNREADABLE_GRACE_S

    def _remove_if_unchanged(self, expected: LockOwner | None) -> bool:
        """Remove a stale lock file, unless another process replaced it since it was judged stale: the file
        is first renamed to a name of our own, then its content compared with what was judged."""
        aside = self.path.with_name(f"{LOCK_FILE}.stale.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        moved = _read_owner(aside)
        same = (moved is None and expected is None) or (
            moved is not None and expected is not None and moved.token == expected.token
        )
        if not same:
            # A fresh lock was moved by mistake: put it back unless yet another one exists meanwhile.
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
        aside.unlink(missing_ok=True)
        return same


def _free_space(folder: Path) -> str:
    """` (N MiB free on the file system of <folder>)`, or "" where that cannot be told."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    return f" ({free / 2**20:.1f} MiB free on the file system of {folder})"


def _read_owner(path: Path) -> LockOwner | None:
    try:
        return LockOwner.from_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class RunBusy(RuntimeError):
    """A run folder held by another running process; the message names it and the holder."""

    def __init__(self, message: str, lock: RunLock) -> None:
        super().__init__(message)
        self.lock = lock


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[RunLock]:
    """Hold the lock of `run_dir` for the block; `RunBusy` if another process holds it."""
    with RunLock(run_dir) as lock:
        yield lock
