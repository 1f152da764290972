"""One exception type for bad input: the CLI prints its message on one line and exits with code 2."""

from __future__ import annotations


class NormscopeError(Exception):
    """Bad input or an unusable environment, with a message that says what is wrong and what to do.

    The message is one sentence meant for the user. The CLI prints it to stderr and exits with code 2,
    without a traceback. Library callers can catch it like any exception.
    """

    exit_code = 2
