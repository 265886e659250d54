"""Errors that a user can fix: the entry points print their message without a traceback.

Every user-fixable error derives from `ZsbirError`; the subclasses that live next to the
code raising them are `CheckpointError` (zsbir.engine.checkpoint), `DatasetError`
(zsbir.data.filelist), `NonFiniteLossError` and `PreemptedError` (zsbir.engine.trainer,
zsbir.engine.preemption). The ones below are raised from several places.
"""


class ZsbirError(RuntimeError):
    """Base class: the message names the problem and the fix."""

    exit_code = 1  # what `python -m zsbir.<verb>` exits with when this error stops it


class ConfigError(ZsbirError):
    """The composed config has an unknown key, a value of the wrong type or an invalid choice."""


class MissingWeightsError(ZsbirError, FileNotFoundError):
    """Pretrained weights were asked for but cannot be found locally or downloaded.

    Also a FileNotFoundError, so code that catches a missing `model.pretrained` file that way
    keeps working.
    """
