"""The one error type users see.

Anything raised as ``UserError`` is a problem with the user's input or environment: the CLI
prints its message as a single line and exits non-zero, without a traceback. Every other
exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input or environment, reported as one line (no traceback)."""

    exit_code = 2
