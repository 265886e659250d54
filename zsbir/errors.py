"""Errors that a user can fix: the entry points print their message without a traceback.

Every user-fixable error derives from `ZsbirError`; the subclasses that live next to the
code raising them are `CheckpointError` (zsbir.engine.checkpoint), `DatasetError`
(zsbir.data.filelist), `NonFiniteLossError` and `PreemptedError` (zsbir.engine.trainer,
zsbir.engine.preemption). The ones below are raised from several places. `run_cli` and
`exit_on_user_error` are the entry points' one way of turning them into a line and an exit status.
"""


import logging
import re
import sys
from typing import Any, Callable


class ZsbirError(RuntimeError):
    """Base class: the message names the problem and the fix."""

    exit_code = 1  # what `python -m zsbir.<verb>` exits with when this error stops it

    def __init__(self, message: str = "", *args):
        super().__init__(_unwrap_worker_message(str(message), type(self).__name__), *args)


def _unwrap_worker_message(message: str, name: str) -> str:
    """Our own message, when a DataLoader worker re-raised this error with its traceback around it.

    PyTorch re-raises a worker's exception in the main process as the same type, built from
    "Caught X in DataLoader worker process N.\nOriginal Traceback ...\n<module>.X: <message>":
    the user should read the message, not the worker's traceback.
    """
    if not (message.startswith("Caught ") and "Original Traceback" in message):
        return message
    original = re.search(rf"^(?:[\w.]+\.)?{re.escape(name)}: (.*)\Z", message, re.MULTILINE | re.DOTALL)
    return original.group(1).strip() if original else message


class ConfigError(ZsbirError):
    """The composed config has an unknown key, a value of the wrong type or an invalid choice."""


class MissingWeightsError(ZsbirError, FileNotFoundError):
    """Pretrained weights were asked for but cannot be found locally or downloaded.

    Also a FileNotFoundError, so code that catches a missing `model.pretrained` file that way
    keeps working.
    """


def run_cli(body: Callable[[], Any], log: logging.Logger) -> int:
    """Run a command-line entry point's body; its exit status.

    0 when `body` returns; a ZsbirError is logged as one line (`Name: message`, no traceback:
    the message already names the fix) and gives its `exit_code`. Other exceptions propagate
    with their traceback: they are bugs, not user errors.
    """
    try:
        body()
    except ZsbirError as err:
        log.error("%s: %s", type(err).__name__, err)
        return err.exit_code
    return 0


def exit_on_user_error(body: Callable[[], Any], log: logging.Logger) -> Any:
    """`run_cli` for a Hydra entry point, which returns a value: `body`'s result, or exit with the error's status."""
    result = []
    status = run_cli(lambda: result.append(body()), log)
    if status:
        sys.exit(status)
    return result[0]
