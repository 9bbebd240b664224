"""The vocals' analysis cache: what the conversion hears in the vocals before any voice sings them.

A conversion runs two networks that do not depend on the voice: the content encoder (HuBERT's
features, per RVC version) and the pitch trackers (f0 per 10 ms). For a second voice on the same
song (the stems from the stem cache) or a repair candidate on the same stretch, they would compute
the same numbers again: a quarter of a conversion on the CPU. This cache keeps them by what
determines them, so they are computed once.

Each entry is one chunk's result (a chunk as the engine cuts the vocals, with its context), kept
under the sha256 of a tag naming everything that changes the numbers (the model files' sha256, the
layer, the tracker and its smoothing, the device type and the kernels, HuBERT's precision where it
is not fp32, and :data:`VERSION` for our own code) followed by the chunk's own samples. A hit is
therefore exactly what the computation would give on the same path: nothing is approximated.
Entries live in two places:

- a bounded in-process memory (``memory_mb``, least recently used out first): repair candidates
  of one stretch, duets' shared context;
- the storage of the stem cache (``analysis/{kind}/{digest}.npy``, see :mod:`shared.storage`): the
  bucket for the service, so a second voice in another execution finds them, a local folder for
  the command line. Entries are written by a thread of their own while the conversion goes on
  (an upload to the bucket does not hold it up); :meth:`AnalysisCache.flush` waits for them.

Stored arrays are plain ``.npy`` (read with ``allow_pickle=False``) and checked against the shape
and type the computation would give before they are used; one that fails the check, or a storage
that fails, is logged and the numbers are computed (a cache never fails a cover).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from shared.errors import CoverError
from shared.hashing import sha256_of
from shared.storage import Keys, Storage

log = logging.getLogger("melodia.analysis")

CONTENT = "content"  # HuBERT's features of a chunk: [frames, dim] float32
PITCH = "pitch"  # a chunk's f0 after smoothing: [samples // 160 + 1] float32
KINDS = (CONTENT, PITCH)
VERSION = 2  # part of every tag: raise it when our own code computes different features or pitch
# (2: RMVPE channels-last on the fast kernels, 2026-12-07, its pitch differing by float32 rounding)
MEMORY_MB = 8  # the in-process part: a repair stretch's chunks several times over (v2: 1.8 MB per 12 s)


def _storage_errors() -> tuple[type[BaseException], ...]:
    """What a failing storage raises (botocore imported only when a cache is used)."""
    from botocore.exceptions import BotoCoreError, ClientError

    return OSError, CoverError, BotoCoreError, ClientError


def digest(tag: dict[str, object], samples: np.ndarray) -> str:
    """The entry's name: sha256 of the tag (sorted JSON) and the chunk's float32 samples."""
    h = hashlib.sha256(json.dumps({**tag, "version_of_the_code": VERSION}, sort_keys=True).encode())
    h.update(b"\0")
    h.update(np.ascontiguousarray(samples, dtype=np.float32).tobytes())
    return h.hexdigest()


class ModelDigests:
    """sha256 of model files (or folders), each computed once per file version and kept."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, int, float], str] = {}
        self._lock = threading.Lock()

    def of(self, path: Path) -> str:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        parts = []
        for file in files:
            stat = file.stat()
            key = (str(file), stat.st_size, stat.st_mtime)
            with self._lock:
                known = self._known.get(key)
            if known is None:
                known = sha256_of(file)
                with self._lock:
                    self._known[key] = known
            parts.append(f"{file.relative_to(path) if path.is_dir() else file.name}:{known}")
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class AnalysisCache:
    """Content features and pitch by chunk, in memory and in a storage.

    Args:
        storage: where entries are kept between processes (the stem cache's), or None for memory only
        memory_mb: the in-process part's bound
    """

    def __init__(self, storage: Storage | None, memory_mb: int = MEMORY_MB) -> None:
        self.storage = storage
        self.memory_bytes = memory_mb << 20
        self._memory: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()
        self._writer: ThreadPoolExecutor | None = None
        self._pending: list[Future[None]] = []
        self.hits = dict.fromkeys(KINDS, 0)
        self.misses = dict.fromkeys(KINDS, 0)

    def through(
        self,
        kind: str,
        tag: dict[str, object],
        samples: np.ndarray,
        compute: Callable[[], np.ndarray],
        check: Callable[[np.ndarray], bool],
    ) -> np.ndarray:
        """The cached result for ``samples`` under ``tag``, else ``compute()``'s (then kept).

        Args:
            kind: :data:`CONTENT` or :data:`PITCH`
            tag: everything besides the samples that changes the result
            samples: the chunk the result is of
            compute: makes the result (a float32 array)
            check: whether a stored array is what ``compute`` would return (shape, type, values)
        """
        name = digest(tag, samples)
        found = self._recall(kind, name)
        if found is None:
            found = self._fetch(kind, name, check)
            if found is not None:
                self._remember(kind, name, found)
        if found is not None:
            self.hits[kind] += 1
            return found.copy()
        self.misses[kind] += 1
        result = np.ascontiguousarray(compute(), dtype=np.float32)
        self._remember(kind, name, result)
        self._store(kind, name, result)
        return result.copy()

    # --- memory ----------------------------------------------------------------------------------
    def _recall(self, kind: str, name: str) -> np.ndarray | None:
        with self._lock:
            found = self._memory.get((kind, name))
            if found is not None:
                self._memory.move_to_end((kind, name))
            return found

    def _remember(self, kind: str, name: str, value: np.ndarray) -> None:
        if value.nbytes > self.memory_bytes:
            return
        with self._lock:
            if (kind, name) in self._memory:
                return
            self._memory[(kind, name)] = value
            self._held += value.nbytes
            while self._held > self.memory_bytes:
                _, old = self._memory.popitem(last=False)
                self._held -= old.nbytes

    # --- storage ---------------------------------------------------------------------------------
    def _fetch(self, kind: str, name: str, check: Callable[[np.ndarray], bool]) -> np.ndarray | None:
        if self.storage is None:
            return None
        key = Keys.analysis(kind, name)
        try:
            raw = self.storage.get_bytes(key)
        except _storage_errors() as exc:
            log.warning("analysis cache: %s not read (%s): computed instead", key, exc)
            return None
        if raw is None:
            return None
        try:
            value = np.load(io.BytesIO(raw), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            log.warning("analysis cache: %s is not an array (%s): computed instead", key, exc)
            return None
        if value.dtype != np.float32 or not check(value):
            log.warning("analysis cache: %s is not what its computation gives %s: computed instead", key, value.shape)
            return None
        return value

    def flush(self) -> None:
        """Wait until every entry handed to the storage so far is written (or has failed, logged)."""
        with self._lock:
            pending, self._pending = self._pending, []
        for write in pending:
            write.result()

    def _store(self, kind: str, name: str, value: np.ndarray) -> None:
        if self.storage is None:
            return
        with self._lock:
            if self._writer is None:
                self._writer = ThreadPoolExecutor(1, thread_name_prefix="analysis-writer")
            self._pending.append(self._writer.submit(self._write, self.storage, kind, name, value))

    @staticmethod
    def _write(storage: Storage, kind: str, name: str, value: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, value, allow_pickle=False)
        key = Keys.analysis(kind, name)
        try:
            storage.put_bytes(key, buffer.getvalue(), "application/octet-stream")
        except _storage_errors() as exc:
            log.warning("analysis cache: %s not kept (%s)", key, exc)
