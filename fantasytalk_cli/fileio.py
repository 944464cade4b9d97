"""Writing files and folders so that a crash never leaves a partial one where a good one was: the one place
that renames things into place.

- `AtomicFile`: written under a temporary sibling name, fsync'd, given the umask's mode, renamed over the
  target (an atomic replace on one filesystem), the folder fsync'd; `abort` leaves the target as it was.
  `atomic_file` is the context-manager form, `write_text_atomic` / `write_bytes_atomic` the one-shot ones.
- `swap_folder`: a finished staging folder takes the place of a target folder (the old one set aside first,
  put back if the swap fails, removed after).
- `follow_umask`: what ftalk writes gets the modes a shell command would give it. Temporary files
  (`tempfile.mkstemp`, 0600), staging folders (`mkdtemp`, 0700) and safetensors files (written 0600) are
  renamed into place as outputs; without this a plan, a clean metadata file or a checkpoint's weights could
  not be read by the colleague the umask meant to let in, while the `.ckpt` beside them could.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (read by setting and restoring it, under a lock)."""
    with _LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def follow_umask(*paths: Path | str) -> None:
    """Give each file mode 0666 & ~umask and each folder 0777 & ~umask."""
    mask = current_umask()
    for path in paths:
        os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~mask)


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (its directory entry reaches the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicFile:
    """A file written in full or not at all: `open()`, write to `handle`, then `commit()` or `abort()`."""

    def __init__(self, path: Path, *, binary: bool = False, suffix: str = ".tmp") -> None:
        self.path = Path(path)
        self.binary = binary
        self.suffix = suffix
        self.tmp: Path | None = None
        self.handle: io.IOBase | None = None

    def open(self) -> AtomicFile:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=self.suffix, dir=self.path.parent)
        self.tmp = Path(name)
        mode = "wb" if self.binary else "w"
        self.handle = open(fd, mode) if self.binary else open(fd, mode, encoding="utf-8", newline="")  # noqa: SIM115
        return self

    def finish_writing(self) -> Path:
        """Flush, fsync and close the temporary file (to rework it before `commit`); returns its path."""
        assert self.handle is not None and self.tmp is not None, "call open() first"
        if not self.handle.closed:
            try:
                self.handle.flush()
                os.fsync(self.handle.fileno())
            except BaseException:
                with contextlib.suppress(OSError):  # a full disk fails the flush again on close
                    self.handle.close()
                raise
            self.handle.close()
        return self.tmp

    def commit(self) -> None:
        """Move the finished file into place (the folder fsync'd); on failure the target is as it was."""
        assert self.tmp is not None, "call open() first"
        tmp = self.tmp
        try:
            self.finish_writing()
            follow_umask(tmp)
            os.replace(tmp, self.path)
            fsync_dir(self.path.parent)
        finally:
            tmp.unlink(missing_ok=True)

    def abort(self) -> None:
        """Drop what was written; the target is left as it was."""
        try:
            if self.handle is not None:
                with contextlib.suppress(OSError):  # closing flushes what a full disk refused: fails again
                    self.handle.close()
        finally:
            if self.tmp is not None:
                self.tmp.unlink(missing_ok=True)


@contextmanager
def atomic_file(path: Path, *, binary: bool = False) -> Iterator[io.IOBase]:
    """`with atomic_file(p) as fh: fh.write(...)`: committed when the block succeeds, aborted when not."""
    out = AtomicFile(path, binary=binary).open()
    try:
        assert out.handle is not None
        yield out.handle
    except BaseException:
        out.abort()
        raise
    out.commit()


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (fsync'd, umask modes)."""
    with atomic_file(path) as fh:
        fh.write(text)  # type: ignore[call-overload]


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (fsync'd, umask modes)."""
    with atomic_file(path, binary=True) as fh:
        fh.write(data)  # type: ignore[call-overload]


def swap_folder(staging: Path, target: Path) -> None:
    """Put the finished folder `staging` in the place of `target` (which may exist): the old one is moved
    aside first and put back if the swap fails, removed once the new one is in place."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
        try:
            os.replace(staging, target)
        except BaseException:
            os.replace(old, target)  # put the previous folder back rather than leave nothing
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)
    fsync_dir(target.parent)


def file_sha256(path: Path, *, chunk: int = 1 << 20) -> str:
    """sha256 (hex) of a file's bytes, read in `chunk`-byte blocks (memory stays flat for any size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def format_size(nbytes: int) -> str:
    """Bytes for people: the largest of GB, MB and KB (decimal) that fits, with two decimals."""
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes} B"
