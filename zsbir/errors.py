"""Errors that a user can fix: the entry points print their message without a traceback."""


class ZsbirError(RuntimeError):
    """Base class: the message names the problem and the fix."""
