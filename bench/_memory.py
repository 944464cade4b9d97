"""Peak resident memory of a bench's child process, measured right.

`ru_maxrss` is wrong for a child started by `subprocess`: Linux carries the high-water mark of the image it
replaced across `exec` (with vfork, the parent's), so a small child of a big parent reports the parent's peak.
The kernel's high-water mark of the child's own address space, `VmHWM` in /proc/self/status, is not inherited.
"""

from __future__ import annotations

import resource
from pathlib import Path

PEAK_WRAPPER = (
    "import atexit, runpy, sys\n"
    "from bench._memory import peak_rss_mb\n"
    "out = sys.argv.pop(1)\n"
    "atexit.register(lambda: open(out, 'w').write(str(peak_rss_mb())))\n"
    "sys.argv[0] = 'ftalk'\n"
    "runpy.run_module('fantasytalk_cli', run_name='__main__', alter_sys=True)\n"
)
"""`python -c PEAK_WRAPPER OUT_FILE ARGS...`: runs ``python -m fantasytalk_cli ARGS...`` and writes its peak RSS in
MB to OUT_FILE at exit (run from the repository root, so that `bench` imports)."""


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB since its program started (`VmHWM`; `ru_maxrss` where there is
    no /proc, which is right only for a process that was not exec'd by a larger one)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
