"""The one root of ftalk's user-facing errors. Every error a user can cause or fix derives from `FtalkError`:
its message names the file, the field and the fix; the command line prints it and exits with its
`exit_code`, without a traceback (`ftalk --debug ...` or `FTALK_DEBUG=1` shows one)."""

from __future__ import annotations

from typing import ClassVar


class FtalkError(Exception):
    """Something the user can fix: the message says what, where, and how. Exit code 1 (problems found)."""

    exit_code: ClassVar[int] = 1


class FtalkUsageError(FtalkError):
    """The command cannot run as asked (a bad option, a missing input, an output it must not replace): exit 2."""

    exit_code: ClassVar[int] = 2
