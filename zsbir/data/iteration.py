"""Iterating a DataLoader so that its worker processes end with the loop."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager


@contextmanager
def batches(loader: Iterable) -> Iterator[Iterator]:
    """Iterate `loader` and stop its worker processes on leaving the block, by error too.

    A DataLoader iterator stops its workers only when it is garbage-collected; after an error
    the traceback keeps the loop's frame, and with it the iterator, alive. In-process callers
    (tests, notebooks, the sweep launcher) then keep forked workers that hold the run
    directory's lock and the parent's stdout until they exit.
    """
    iterator = iter(loader)
    try:
        yield iterator
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)  # multi-process iterators only
        if shutdown is not None:
            shutdown()
