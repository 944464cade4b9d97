"""File modes: what ftalk writes follows the user's umask, like any file a shell command creates.

Temporary files (`tempfile.mkstemp`, 0600) and safetensors files (written 0600) are renamed into place
as outputs; without this, a plan, a clean metadata file or a checkpoint's weights could not be read by
the colleague the umask meant to let in, while the `.ckpt` beside them could."""

from __future__ import annotations

import os
import threading
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
