"""In-memory vector indexes of unit-length embeddings, keyed by face id; similarity = dot
product (cosine, as the vectors are unit length).

`ExactIndex` keeps the embeddings in one float32 matrix and answers exactly, but reads a
quarter of it per query: int8 codes of the rows, scanned by FAISS, rule out every row that
provably cannot be in the top k, and the rest are re-scored from the float32 rows (exact.py
has the proof). A float32 scan is memory-bandwidth bound: 100,000 x 512-d is 200 MB read
per query, ~8 ms on the 2-vCPU VM. `ApproximateIndex`, for galleries past
GALLERY_ANN_MIN_FACES, scans binary codes with FAISS and re-scores the best candidates
exactly (docs/GALLERY.md has the measurements that chose it over an HNSW graph).

Neither index locks: the gallery serialises access (see gallery.py).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from appliance.gallery.exact import (
    SCALE_HEADROOM,
    Int8Codes,
    candidates,
    exact_scores,
    gemm_bound,
    max_norm,
    product,
    rank,
)
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
    so the live rows stay one contiguous block for BLAS.

    Search is exact (exact.py proves it): one query against INT8_MIN_ROWS rows or more scans
    int8 codes of the matrix with FAISS and re-scores the candidates that scan cannot rule
    out; a batch of GEMM_MIN_QUERIES or more, or a small matrix, takes one float32 product
    as the filter instead (it reads the matrix once for the whole batch).
    """

    # Below this many rows the float32 product reads <= 32 MB (~1 ms) and the codes' scan
    # saves little.
    INT8_MIN_ROWS = 16_384
    # From this many queries per call one GEMM (the matrix read once for all of them) costs
    # less than one int8 scan per query: benchmarks/gallery_search.py measured a GEMM of 16
    # at 0.14-0.20 of a GEMV per query, an int8 search at 0.28-0.34, so they cross near 4.
    GEMM_MIN_QUERIES = 4

    def __init__(
        self,
        dim: int,
        capacity: int = 1024,
        dtype: type[np.floating[Any]] = np.float32,
        *,
        int8_codes: bool = True,
    ) -> None:
        self.dim = dim
        self._mat: npt.NDArray[Any] = np.empty((max(capacity, 1), dim), dtype)
        self._ids = np.empty(max(capacity, 1), np.int64)
        self._row: dict[int, int] = {}
        self._n = 0
        self._max_norm = 0.0
        self._codes = Int8Codes(dim) if int8_codes else None

    @classmethod
    def adopt(cls, ids: IntArray, matrix: FloatArray) -> ExactIndex:
        """An index over the first len(ids) rows of `matrix`, taken without a copy; the rest
        of its rows are room to grow."""
        index = cls(matrix.shape[1], capacity=1)
        index._mat = matrix
        index._ids = np.empty(len(matrix), np.int64)
        index._ids[: len(ids)] = ids
        index._row = dict(zip(ids.tolist(), range(len(ids)), strict=True))
        index._n = len(ids)
        index._note_norms(matrix[: len(ids)])
        if index._codes is not None and len(ids):
            index._codes.rebuild(matrix[: len(ids)])
        return index

    def __len__(self) -> int:
        return self._n

    def _grow(self, need: int) -> None:
        if need <= len(self._ids):
            return
        cap = max(need, 2 * len(self._ids))
        mat = np.empty((cap, self.dim), self._mat.dtype)
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
        self._note_norms(self._mat[self._n - m : self._n])
        if self._codes is not None and m:
            if self._codes.fits(vecs):
                self._codes.add(self._mat[self._n - m : self._n])
            else:  # a value past the int8 range: a new scale for every row
                self._codes.rebuild(self._mat[: self._n], SCALE_HEADROOM)

    def _note_norms(self, vecs: npt.NDArray[Any]) -> None:
        # float32 norms are within ~2^-20 of the true ones; the slack keeps this an upper bound.
        self._max_norm = max(self._max_norm, max_norm(vecs) * (1 + 2.0**-18))

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
            if self._codes is not None:
                self._codes.move_last_to(row)

    def search(self, queries: FloatArray, k: int) -> tuple[FloatArray, IntArray]:
        m = queries.shape[0]
        k_eff = min(k, self._n)
        sims_out = np.full((m, k), -np.inf, np.float32)
        ids_out = np.full((m, k), -1, np.int64)
        if k_eff == 0:
            return sims_out, ids_out
        if self._codes is not None and self._n >= self.INT8_MIN_ROWS and m < self.GEMM_MIN_QUERIES:
            rows = [
                cand
                if (cand := self._scan_codes(q, k_eff)) is not None
                else self._scan_product(q[None], k_eff)[0]
                for q in queries
            ]
        else:
            rows = self._scan_product(queries, k_eff)
        for i, cand in enumerate(rows):
            if len(cand) > 4 * k_eff + 64:
                # Many candidates (a wide int8 bound): narrow them with float32 first, so
                # the float64 re-score below sees only the near-ties.
                est = product(np.take(self._mat, cand, axis=0), queries[i])
                bound = gemm_bound(queries[i : i + 1], self._max_norm)[0]
                cand = cand[candidates(est, bound, k_eff)]
            sims = exact_scores(self._mat, cand, queries[i])
            sims_out[i, :k_eff], ids_out[i, :k_eff] = rank(sims, self._ids[cand], k_eff)
        return sims_out, ids_out

    def _scan_product(self, queries: FloatArray, k: int) -> list[IntArray]:
        """Candidate rows per query from one float32 product (GEMV, or GEMM for a batch)."""
        est = queries @ self._mat[: self._n].T
        bounds = gemm_bound(queries, self._max_norm)
        return [candidates(e, b, k) for e, b in zip(est, bounds.tolist(), strict=True)]

    def _scan_codes(self, query: FloatArray, k: int) -> IntArray | None:
        """Candidate rows for one query from the int8 codes, or None when they are too many
        for one scan. FAISS keeps the best `probe` estimates; when even the last of them is
        above the candidates' floor, rows outside the list may be candidates too. Widening
        the list costs FAISS's heap more than the float32 product then costs (4,096 kept:
        ~3x a 512 scan), so the caller falls back to the product: near-duplicate faces by
        the thousand, not the usual case."""
        assert self._codes is not None
        bound = float(self._codes.bound(query[None])[0])
        probe = min(self._n, max(64 * k, 512))
        est, rows = self._codes.scan(query[None], probe)
        floor = est[0, k - 1] - 2 * bound
        if probe < self._n and est[0, probe - 1] >= floor:
            return None
        found: IntArray = rows[0][(est[0] >= floor) & (rows[0] >= 0)]
        return found

    def vectors(self, ids: IntArray) -> FloatArray:
        rows = [self._row[fid] for fid in ids.tolist()]
        return np.asarray(self._mat[rows], np.float32)

    def all(self) -> tuple[IntArray, FloatArray]:
        return self._ids[: self._n].copy(), self._mat[: self._n].copy()


class ApproximateIndex:
    """Binary codes scanned exhaustively, then the best candidates re-scored exactly.

    Each embedding is reduced to one sign bit per dimension (64 bytes for 512-d); FAISS's
    `IndexBinaryFlat` ranks all codes by Hamming distance with popcount kernels (64 MB read
    per query at 1,000,000 faces instead of 2 GB), and the RERANK best are re-scored with
    their float16 vectors, so reported similarities are (near) exact. For the query this
    gallery serves, a face near one enrolled face (cosine ~0.5-0.9 while strangers score
    ~0), the right face's code differs in far fewer bits than anyone else's, and a re-rank
    list of 200 holds it with room to spare. Measured against usearch's HNSW graph, which
    needed a beam of 1024 (26 ms) for recall 0.99 at 100,000 random 512-d vectors and
    minutes to build: docs/GALLERY.md.
    """

    RERANK = 200

    def __init__(self, dim: int, rerank: int = RERANK) -> None:
        import faiss

        # One thread per search: searches already run concurrently from the API's executor,
        # and FAISS's OpenMP team on top of them oversubscribes the cores (measured 20 ms
        # instead of 4 ms per query at 1,000,000 faces on the 2-vCPU VM). The setting is
        # process-wide; nothing else in the appliance uses FAISS.
        faiss.omp_set_num_threads(1)
        self.dim = dim
        self._rerank = rerank
        # IndexBinaryFlat wants whole bytes; packbits pads the last byte with zero bits.
        self._codes: Any = faiss.IndexBinaryFlat(-(-dim // 8) * 8)
        self._positions = np.empty(0, np.int64)  # face id at each code position
        self._vectors = ExactIndex(dim, dtype=np.float16, int8_codes=False)

    def __len__(self) -> int:
        return len(self._vectors)

    @staticmethod
    def _pack(vecs: FloatArray) -> npt.NDArray[np.uint8]:
        return np.packbits(np.asarray(vecs) > 0, axis=1)

    def add(self, ids: IntArray, vecs: FloatArray) -> None:
        if len(ids):
            self._codes.add(self._pack(vecs))
            self._positions = np.concatenate([self._positions, ids.astype(np.int64)])
            self._vectors.add(ids, vecs)

    def remove(self, ids: IntArray) -> None:
        import faiss

        where = np.flatnonzero(np.isin(self._positions, ids))
        if len(where):
            # Positions after a removed one shift down in FAISS; mirror that here.
            self._codes.remove_ids(faiss.IDSelectorBatch(where.astype(np.int64)))
            self._positions = np.delete(self._positions, where)
        self._vectors.remove(ids)

    def search(self, queries: FloatArray, k: int) -> tuple[FloatArray, IntArray]:
        m = queries.shape[0]
        sims_out = np.full((m, k), -np.inf, np.float32)
        ids_out = np.full((m, k), -1, np.int64)
        n = len(self._positions)
        if n == 0:
            return sims_out, ids_out
        _, found = self._codes.search(self._pack(queries), min(n, max(k, self._rerank)))
        for i in range(m):
            cand = self._positions[found[i][found[i] >= 0]]
            # On this thread, not OpenBLAS's: see exact.product.
            sims = product(self._vectors.vectors(cand), queries[i])
            order = np.argsort(-sims, kind="stable")[:k]
            sims_out[i, : len(order)] = sims[order]
            ids_out[i, : len(order)] = cand[order]
        return sims_out, ids_out

    def vectors(self, ids: IntArray) -> FloatArray:
        return self._vectors.vectors(ids)
