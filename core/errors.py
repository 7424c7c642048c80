"""The one error type users see.

Anything raised as SimfedError is a user-facing problem (bad input, bad config, missing file);
the CLI prints its message as one line on stderr and exits with code 2. Everything else is a bug
and keeps its traceback.
"""


class SimfedError(Exception):
    """A problem with the user's input: message says what, where and how to fix it."""


class RunFailed(SimfedError):
    """A run that could not go on for a reason outside the user's input (a fault that kept recurring):
    one line like any SimfedError, but exit code 1."""

    exit_code = 1
