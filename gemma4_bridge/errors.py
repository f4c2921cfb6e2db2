"""One error type for everything a user can fix: what is wrong, where, and what to do."""

from __future__ import annotations

import sys
from enum import Enum

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # Python 3.10 (supported: requires-python >= 3.10) has no StrEnum

    class StrEnum(str, Enum):
        """Members are their values, as strings (enum.StrEnum of Python 3.11)."""

        def __str__(self) -> str:
            return str(self.value)


class ErrorCode(StrEnum):
    """What kind of failure a :class:`BridgeError` is, for code that must tell failures apart."""

    NON_FINITE = "non-finite"  # a tensor holds NaN/Inf
    UNREADABLE = "unreadable"  # a file or tensor cannot be read (truncated, corrupt)


class BridgeError(Exception):
    """A problem with the user's input, reported as one paragraph that names the fix.

    The CLI prints ``str(err)`` and exits non-zero without a traceback (unless ``--debug``);
    plugins raise it at adapter load so the server says the same thing. ``code`` classifies it
    where a caller must act on the kind of failure (never the wording).
    """

    exit_code = 2

    def __init__(self, message: str, *, fix: str | None = None, code: ErrorCode | None = None) -> None:
        self.message = message
        self.fix = fix
        self.code = code
        super().__init__(f"{message} Fix: {fix}." if fix else message)
