"""Model loads, said aloud: each load of a model logs what it loaded and how long it took
(``model.loaded``), and tells whoever watches this thread (the command line's progress bars show
"loading ..." beside the stage's bar, where the bar would otherwise stand still at 0 %)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from shared.logs import fields

log = logging.getLogger("melodia.models")
Watcher = Callable[[str | None], None]  # "loading WHAT", then None once loaded

_watcher: ContextVar[Watcher | None] = ContextVar("model_load_watcher", default=None)


@contextmanager
def loading(what: str) -> Iterator[None]:
    """Around one model's load: ``what`` names it for people ("the separator (htdemucs)")."""
    watcher = _watcher.get()
    if watcher is not None:
        watcher(f"loading {what}")
    started = time.perf_counter()
    try:
        yield
    finally:
        if watcher is not None:
            watcher(None)
    seconds = time.perf_counter() - started
    log.info("loaded %s in %.1f s", what, seconds, extra=fields(event="model.loaded", seconds=round(seconds, 2)))


@contextmanager
def watched_by(watcher: Watcher) -> Iterator[None]:
    """Tell ``watcher`` of the model loads in this thread while the block runs."""
    token = _watcher.set(watcher)
    try:
        yield
    finally:
        _watcher.reset(token)
