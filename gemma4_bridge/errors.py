"""One error type for everything a user can fix: what is wrong, where, and what to do."""

from __future__ import annotations


class BridgeError(Exception):
    """A problem with the user's input, reported as one paragraph that names the fix.

    The CLI prints ``str(err)`` and exits non-zero without a traceback (unless ``--debug``);
    plugins raise it at adapter load so the server says the same thing.
    """

    exit_code = 2

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        self.message = message
        self.fix = fix
        super().__init__(f"{message} Fix: {fix}." if fix else message)
