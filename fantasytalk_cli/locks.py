"""One writer per folder: an exclusive OS advisory lock (`fcntl.flock`) on a lock file that records who holds it
(host, pid, start time, command), so that two `ftalk train` into one run folder, two `ftalk cache` processes of one
rank into one cache, or two commands writing one output cannot interleave their files.

The lock lives as long as the process holds the file open: a killed holder's lock is released by the OS at once,
so a stale lock file never blocks (what it records is then only read, never trusted). A process that finds the lock
held refuses at once, naming the holder and the fix; nothing waits and nothing retries but the bounded re-open when
the file it locked was removed by the holder's release in between.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fantasytalk_cli.errors import FtalkUsageError

LOCK_NAME = ".ftalk.lock"
"""The lock file of a run folder or a cache folder (beside an output file: `.NAME.ftalk.lock`)."""
_REOPENS = 3


class FolderBusyError(FtalkUsageError):
    """Another process holds the lock: the message names it and the fix; exit 2, nothing written."""


@dataclass(frozen=True)
class Holder:
    """What a lock file records of the process holding it."""

    host: str
    pid: int
    started: str
    command: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started} ({self.command})"


def _me() -> Holder:
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())
    return Holder(socket.gethostname(), os.getpid(), started, " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200])


def _read_holder(fd: int) -> Holder | None:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return Holder(str(data["host"]), int(data["pid"]), str(data["started"]), str(data["command"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _busy(fd: int, what: str, fix: str) -> FolderBusyError:
    """The refusal for a lock file (open as `fd`) that another process holds, naming it as it recorded itself."""
    holder = _read_holder(fd)
    who = holder.describe() if holder is not None else "another process (it has not recorded itself yet)"
    return FolderBusyError(f"{what} is in use by {who}: {fix}. Nothing was written")


@dataclass
class FolderLock:
    """A held lock (see `hold`): release it with `release`, or leave the `with` block."""

    path: Path
    fd: int

    def release(self) -> None:
        """Remove the lock file, then unlock (a process that opened it meanwhile sees it gone and re-opens)."""
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):  # a read-only folder: the file stays, unlocked, and blocks nobody
            self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = -1


def acquire(path: Path, what: str, fix: str) -> FolderLock:
    """Hold the lock file `path` for `what` (e.g. "the run folder out/"), or raise `FolderBusyError` naming the
    holder and `fix`. The folder holding `path` must exist."""
    for _ in range(_REOPENS):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise FolderBusyError(f"cannot create the lock file {path} ({exc.strerror}): {fix}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            busy = _busy(fd, what, fix)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise FolderBusyError(f"cannot lock {path} ({exc.strerror}): {fix}") from exc
            raise busy from exc
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder released (and removed) it between our open and our lock: open it anew
            os.close(fd)
            continue
        record = json.dumps(_me().__dict__).encode("utf-8")
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        return FolderLock(path, fd)
    raise FolderBusyError(f"{path} was removed and re-created {_REOPENS} times while locking it: {fix}")


def refuse_if_held(path: Path, what: str, fix: str) -> None:
    """Raise `FolderBusyError` when a live process holds the lock file `path`; creates nothing. A quick look before
    other checks (it takes and drops the lock at once when it is free), so a busy folder is reported as busy."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return  # no lock file (or none we may open): nobody holds it, `acquire` decides
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        raise _busy(fd, what, fix) from exc
    finally:
        os.close(fd)


@contextmanager
def hold(path: Path, what: str, fix: str) -> Iterator[FolderLock]:
    """`acquire` for the block's life."""
    lock = acquire(path, what, fix)
    try:
        yield lock
    finally:
        lock.release()


def beside(output: Path) -> Path:
    """The lock file of an output file or folder that does not exist yet: `.NAME.ftalk.lock` in its folder."""
    return output.parent / f".{output.name}{LOCK_NAME}"
