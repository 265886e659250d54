"""Errors that a user can fix: the entry points print their message without a traceback.

Every user-fixable error derives from `ZsbirError`; the subclasses that live next to the
code raising them are `CheckpointError` (zsbir.engine.checkpoint), `DatasetError`
(zsbir.data.filelist), `NonFiniteLossError` and `PreemptedError` (zsbir.engine.trainer,
zsbir.engine.preemption). The ones below are raised from several places.
"""


import re


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
