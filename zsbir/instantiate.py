"""Build an object from a `_target_` config node (model, optim, loss terms), keeping our own error messages.

Hydra wraps whatever a constructor raises in an InstantiationException whose message
repeats the config and the traceback. Our constructors raise errors whose message already
names the key and the fix (a ZsbirError such as MissingWeightsError, or a ValueError /
FileNotFoundError about a `model.*` / `loss.*` value): those are re-raised as they are.
"""
from __future__ import annotations

from typing import Any

from zsbir.errors import ZsbirError

OWN_ERRORS = (ZsbirError, ValueError, FileNotFoundError)


def plain_node(node, drop: tuple[str, ...] = ("name",)) -> dict:
    """The node as a resolved plain dict, without the keys in `drop` (labels and settings read elsewhere)."""
    from omegaconf import DictConfig, OmegaConf

    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    for key in drop:
        values.pop(key, None)
    return values


def build_from_config(node, drop: tuple[str, ...] = ("name",), **kwargs: Any) -> Any:
    """`node._target_(**node, **kwargs)`, the keys in `drop` left out; our own errors come out unwrapped."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(plain_node(node, drop), **kwargs, _convert_="all")
    except InstantiationException as error:
        if isinstance(error.__cause__, OWN_ERRORS):
            raise error.__cause__ from None
        raise
