"""Retrieval: pull content features toward the voice's own training features (faiss index).

RVC trains an IVF-Flat index over the voice's content features. Each frame's top-8 neighbours are
averaged with inverse-squared-distance weights and blended in with ``index_rate``.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from shared.errors import CoverError, ErrorCode

TOP_K = 8


class FeatureIndex:
    def __init__(self, index, vectors: np.ndarray) -> None:
        self.index = index
        self.vectors = vectors

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @classmethod
    def load(cls, path: Path) -> FeatureIndex:
        import faiss

        check_layout(Path(path))  # every length it declares fits, before faiss allocates any
        try:
            index = faiss.read_index(str(path))
            vectors = index.reconstruct_n(0, index.ntotal)
        except MemoryError:  # the layout check leaves no length unchecked; kept as the last word
            raise CoverError(ErrorCode.MODEL_CORRUPT, f"{Path(path).name} declares more than memory holds") from None
        except RuntimeError as exc:
            raise CoverError(
                ErrorCode.MODEL_CORRUPT, f"{Path(path).name} is not a faiss index: {str(exc).splitlines()[0][:200]}"
            ) from None
        if index.ntotal < TOP_K:
            raise CoverError(ErrorCode.MODEL_CORRUPT, f"{Path(path).name} holds only {index.ntotal} vectors")
        return cls(index, np.ascontiguousarray(vectors, dtype=np.float32))

    def blend(self, features: np.ndarray, index_rate: float) -> np.ndarray:
        """features [frames, dim] -> index_rate * retrieved + (1 - index_rate) * features."""
        if index_rate <= 0:
            return features
        query = np.ascontiguousarray(features, dtype=np.float32)
        distances, ids = self.index.search(query, TOP_K)
        weights = np.square(1.0 / np.maximum(distances, 1e-12))
        weights /= weights.sum(axis=1, keepdims=True)
        retrieved = np.einsum("fk,fkd->fd", weights, self.vectors[ids])
        return (index_rate * retrieved + (1.0 - index_rate) * features).astype(np.float32)


MAX_DIM = 4096


class _Reader:
    """A cursor over an index's bytes that refuses any declared length the file cannot hold."""

    def __init__(self, data: bytes, name: str) -> None:
        self.data, self.at, self.name = data, 0, name

    def corrupt(self, why: str) -> CoverError:
        return CoverError(ErrorCode.MODEL_CORRUPT, f"{self.name}: {why} (byte {self.at})")

    def take(self, size: int, what: str) -> bytes:
        if size < 0 or size > len(self.data) - self.at:
            raise self.corrupt(f"{what} declares {size} bytes, more than the file holds after it")
        chunk = self.data[self.at : self.at + size]
        self.at += size
        return chunk

    def number(self, fmt: str, what: str) -> int:
        return int(struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0])

    def fourcc(self, *expected: bytes) -> bytes:
        code = self.take(4, "a type code")
        if code not in expected:
            raise self.corrupt(f"type {code!r} where {b' or '.join(expected)!r} was expected")
        return code


def _index_header(reader: _Reader) -> tuple[int, int]:
    """faiss' common index header: d (int32), ntotal (int64), two unused int64, is_trained (one
    byte), the metric (int32) and, for metrics past inner product and L2, its argument (float)."""
    dim, total = reader.number("<i", "the dimension"), reader.number("<q", "the vector count")
    reader.take(17, "the header")
    if reader.number("<i", "the metric") > 1:
        reader.take(4, "the metric's argument")
    if not 0 < dim <= MAX_DIM or total < 0:
        raise reader.corrupt(f"it declares {total} vectors of {dim} dimensions")
    return dim, total


def check_layout(path: Path) -> None:
    """Walk an IVF-Flat index (what RVC's trainer writes) as faiss would read it, checking every
    length it declares (the quantizer's vectors, the direct map, each inverted list's size) against
    the bytes that really follow, and that the lists hold the vectors the header counts: faiss
    allocates what a length claims before it reads, so a 6 MB file whose inner lengths lie once
    made it take gigabytes. ``model.corrupt`` on the first length that does not fit, before faiss
    reads anything. Layout (faiss' ``index_write.cpp``): ``IwFl`` header, nlist and nprobe (size_t),
    the flat quantizer (``IxF2``/``IxFI``, header, its floats), the direct map (a type byte and an
    id vector), then ``ilar``: nlist, code size, the list sizes (``full``: every list's, ``sprs``:
    (list, size) pairs) and each list's codes and ids."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CoverError(ErrorCode.MODEL_CORRUPT, f"{path.name} is unreadable: {exc}") from None
    reader = _Reader(data, path.name)
    reader.fourcc(b"IwFl")
    dim, total = _index_header(reader)
    nlist = reader.number("<Q", "the list count")
    reader.take(8, "nprobe")
    reader.fourcc(b"IxF2", b"IxFI")
    if _index_header(reader) != (dim, nlist):
        raise reader.corrupt(f"its quantizer is not {nlist} vectors of {dim} dimensions")
    if reader.number("<Q", "the quantizer's size") != nlist * dim:
        raise reader.corrupt("the quantizer's vectors do not match its header")
    reader.take(nlist * dim * 4, "the quantizer's vectors")
    reader.take(1, "the direct map's type")
    reader.take(reader.number("<Q", "the direct map") * 8, "the direct map")
    reader.fourcc(b"ilar")
    if reader.number("<Q", "the inverted lists' count") != nlist:
        raise reader.corrupt("its inverted lists do not match its list count")
    code_size = reader.number("<Q", "the code size")
    if code_size != dim * 4:
        raise reader.corrupt(f"a code size of {code_size} bytes for {dim} float dimensions")
    encoding = reader.fourcc(b"full", b"sprs")
    raw = reader.take(reader.number("<Q", "the list sizes") * 8, "the list sizes")
    values = struct.unpack(f"<{len(raw) // 8}Q", raw)
    if encoding == b"full" and len(values) != nlist:
        raise reader.corrupt(f"{len(values)} list sizes for {nlist} lists")
    if encoding == b"sprs" and (len(values) % 2 or any(number >= nlist for number in values[0::2])):
        raise reader.corrupt("its (list, size) pairs name lists it does not have")
    sizes = values if encoding == b"full" else values[1::2]
    if sum(sizes) != total:
        raise reader.corrupt(f"its lists hold {sum(sizes)} vectors, its header counts {total}")
    for size in sizes:
        reader.take(size * (code_size + 8), "an inverted list")


def build_index(vectors: np.ndarray, path: Path, n_list: int | None = None) -> Path:
    """Train and write an IVF-Flat index as RVC's trainer does (used by the demo and the tests)."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n_list = n_list or max(1, min(int(16 * np.sqrt(len(vectors))), len(vectors) // 39))
    index = faiss.index_factory(vectors.shape[1], f"IVF{n_list},Flat")
    index.train(vectors)
    index.add(vectors)
    faiss.extract_index_ivf(index).nprobe = 1
    path.parent.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(path))
    return path
