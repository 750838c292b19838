"""In-memory vector indexes of unit-length embeddings, keyed by face id; similarity = dot
product (cosine, as the vectors are unit length).

`ExactIndex` keeps the embeddings in one float32 matrix and scores a query against all of
them with one BLAS product: exact, and memory-bandwidth bound (100,000 x 512-d is 200 MB
read per query). `ApproximateIndex` wraps usearch's HNSW graph for galleries past
GALLERY_ANN_MIN_FACES, where reading every vector per query is too slow; usearch is chosen
over FAISS because it adds and removes single keys in place (FAISS's HNSW cannot remove),
and its aarch64 wheel is small (docs/GALLERY.md has the measurements).

Neither index locks: the gallery serialises access (see gallery.py).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from appliance.gallery.records import FloatArray

IntArray = npt.NDArray[np.int64]


class VectorIndex(Protocol):
    dim: int

    def __len__(self) -> int: ...

    def add(self, ids: IntArray, vecs: FloatArray) -> None: ...

    def remove(self, ids: IntArray) -> None: ...

    def search(self, queries: FloatArray, k: int) -> tuple[FloatArray, IntArray]:
        """(m, k) similarities best first and (m, k) face ids; -1 pads when fewer exist."""
        ...

    def vectors(self, ids: IntArray) -> FloatArray: ...


class ExactIndex:
    """Brute force over a growable float32 matrix; delete moves the last row into the hole
    so the live rows stay one contiguous block for BLAS."""

    def __init__(self, dim: int, capacity: int = 1024) -> None:
        self.dim = dim
        self._mat = np.empty((max(capacity, 1), dim), np.float32)
        self._ids = np.empty(max(capacity, 1), np.int64)
        self._row: dict[int, int] = {}
        self._n = 0

    @classmethod
    def adopt(cls, ids: IntArray, matrix: FloatArray) -> ExactIndex:
        """An index over the first len(ids) rows of `matrix`, taken without a copy; the rest
        of its rows are room to grow."""
        index = cls(matrix.shape[1], capacity=1)
        index._mat = matrix
        index._ids = np.empty(len(matrix), np.int64)
        index._ids[: len(ids)] = ids
        index._row = {fid: row for row, fid in enumerate(ids.tolist())}
        index._n = len(ids)
        return index

    def __len__(self) -> int:
        return self._n

    def _grow(self, need: int) -> None:
        if need <= len(self._ids):
            return
        cap = max(need, 2 * len(self._ids))
        mat = np.empty((cap, self.dim), np.float32)
        mat[: self._n] = self._mat[: self._n]
        ids = np.empty(cap, np.int64)
        ids[: self._n] = self._ids[: self._n]
        self._mat, self._ids = mat, ids

    def add(self, ids: IntArray, vecs: FloatArray) -> None:
        m = len(ids)
        self._grow(self._n + m)
        self._mat[self._n : self._n + m] = vecs
        self._ids[self._n : self._n + m] = ids
        for i, fid in enumerate(ids.tolist()):
            self._row[fid] = self._n + i
        self._n += m

    def remove(self, ids: IntArray) -> None:
        for fid in ids.tolist():
            row = self._row.pop(fid, None)
            if row is None:
                continue
            last = self._n - 1
            if row != last:
                self._mat[row] = self._mat[last]
                moved = int(self._ids[last])
                self._ids[row] = moved
                self._row[moved] = row
            # Overwrite the freed row: a removed face leaves no copy in memory either.
            self._mat[last] = 0.0
            self._n = last

    def search(self, queries: FloatArray, k: int) -> tuple[FloatArray, IntArray]:
        m = queries.shape[0]
        k_eff = min(k, self._n)
        sims_out = np.full((m, k), -np.inf, np.float32)
        ids_out = np.full((m, k), -1, np.int64)
        if k_eff == 0:
            return sims_out, ids_out
        # (m, n): one GEMM for a batch of queries, GEMV for one.
        sims = queries @ self._mat[: self._n].T
        if k_eff < self._n:
            part = np.argpartition(-sims, k_eff - 1, axis=1)[:, :k_eff]
        else:
            part = np.broadcast_to(np.arange(self._n), (m, self._n))
        top = np.take_along_axis(sims, part, axis=1)
        order = np.argsort(-top, axis=1, kind="stable")
        sims_out[:, :k_eff] = np.take_along_axis(top, order, axis=1)
        ids_out[:, :k_eff] = self._ids[np.take_along_axis(part, order, axis=1)]
        return sims_out, ids_out

    def vectors(self, ids: IntArray) -> FloatArray:
        rows = [self._row[fid] for fid in ids.tolist()]
        return np.array(self._mat[rows], np.float32)

    def all(self) -> tuple[IntArray, FloatArray]:
        return self._ids[: self._n].copy(), self._mat[: self._n].copy()


class ApproximateIndex:
    """usearch HNSW with inner-product metric. Vectors are stored as float16: half the memory
    of float32 (1 GB at 1,000,000 x 512-d) for a similarity error near 1e-3."""

    # Graph degree and beam widths, measured on 1,000,000 random 512-d unit vectors (the
    # hardest case for a graph index) in benchmarks/gallery_search.py: see docs/BENCHMARKS.md.
    CONNECTIVITY = 16
    EXPANSION_ADD = 64
    EXPANSION_SEARCH = 256

    def __init__(
        self,
        dim: int,
        threads: int = 0,
        *,
        connectivity: int = CONNECTIVITY,
        expansion_add: int = EXPANSION_ADD,
        expansion_search: int = EXPANSION_SEARCH,
    ) -> None:
        from usearch.index import Index

        self.dim = dim
        self._threads = threads
        self._index: Any = Index(
            ndim=dim,
            metric="ip",
            dtype="f16",
            connectivity=connectivity,
            expansion_add=expansion_add,
            expansion_search=expansion_search,
        )

    @property
    def expansion_search(self) -> int:
        return int(self._index.expansion_search)

    @expansion_search.setter
    def expansion_search(self, value: int) -> None:
        self._index.expansion_search = value

    def __len__(self) -> int:
        return len(self._index)

    def add(self, ids: IntArray, vecs: FloatArray) -> None:
        if len(ids):
            self._index.add(ids.astype(np.uint64), vecs, threads=self._threads)

    def remove(self, ids: IntArray) -> None:
        if len(ids):
            self._index.remove(ids.astype(np.uint64))

    def search(self, queries: FloatArray, k: int) -> tuple[FloatArray, IntArray]:
        m = queries.shape[0]
        sims_out = np.full((m, k), -np.inf, np.float32)
        ids_out = np.full((m, k), -1, np.int64)
        if len(self) == 0:
            return sims_out, ids_out
        found = self._index.search(queries, k, threads=self._threads)
        keys = np.asarray(found.keys).reshape(m, -1)
        dist = np.asarray(found.distances, np.float32).reshape(m, -1)
        # usearch answers one query with `Matches` (no counts), several with `BatchMatches`.
        counts = np.asarray(getattr(found, "counts", [keys.shape[1]])).reshape(m)
        for i in range(m):
            c = int(counts[i])
            # usearch's "ip" distance is 1 - dot.
            sims_out[i, :c] = 1.0 - dist[i, :c]
            ids_out[i, :c] = keys[i, :c].astype(np.int64)
        return sims_out, ids_out

    def vectors(self, ids: IntArray) -> FloatArray:
        got = self._index.get(ids.astype(np.uint64), dtype=np.float32)
        return np.asarray(got, np.float32).reshape(len(ids), self.dim)
