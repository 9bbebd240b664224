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

        _check_header(Path(path))
        try:
            index = faiss.read_index(str(path))
            vectors = index.reconstruct_n(0, index.ntotal)
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


def _check_header(path: Path) -> None:
    """An index declares its dimension and vector count in its header (faiss' layout: fourcc, d as
    int32, ntotal as int64); the vectors must fit in the file, or faiss would allocate what the
    header claims: ``model.corrupt`` before reading."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(16)
        size = path.stat().st_size
    except OSError as exc:
        raise CoverError(ErrorCode.MODEL_CORRUPT, f"{path.name} is unreadable: {exc}") from None
    if len(header) < 16:
        raise CoverError(ErrorCode.MODEL_CORRUPT, f"{path.name} is too short to be a faiss index")
    dim, total = struct.unpack_from("<i", header, 4)[0], struct.unpack_from("<q", header, 8)[0]
    if not 0 < dim <= MAX_DIM or total < 0 or total * dim * 4 > size:
        raise CoverError(
            ErrorCode.MODEL_CORRUPT,
            f"{path.name} declares {total} vectors of {dim} dimensions, more than its {size} bytes hold",
        )


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
