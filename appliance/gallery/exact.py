"""Exact top-k by inner product over a float32 matrix, found without reading all of it.

A scan of 100,000 x 512-d float32 reads 200 MB per query, and on the 2-vCPU VM that read
alone takes ~8 ms, past the 5 ms goal. `Int8Codes` keeps a second copy of the rows as int8
(50 MB, a quarter of the bytes) that FAISS scans with SIMD kernels; the int8 scores are
only estimates, so they serve as a filter with a proven error bound and the survivors are
re-scored exactly:

1. every row's estimate s~ is within E of its true similarity s (`Int8Codes.bound`);
2. let t be the k-th best estimate. At least k rows have s >= t - E, and every row with
   s~ < t - 2E has s < t - E, so it cannot be in the top k: the top k are all among the
   rows with s~ >= t - 2E (the candidates);
3. the candidates (when many, first narrowed the same way by a float32 product under its
   own error bound, `gemm_bound`) are re-scored in float64 from the float32 rows, rounded
   to float32 and ranked by (similarity descending, face id ascending).

The answer is therefore the exact one, ties included: what a brute-force scan computing each
similarity correctly rounded to float32 returns. A float32 BLAS product gives the same
ranking except where two similarities are within its own rounding error (~1e-7).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from appliance.gallery.records import FloatArray

IntArray = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]

# Headroom above the largest absolute value when an enrolment past the int8 range makes the
# scale be chosen again, so a growing gallery re-encodes a handful of times, not on every
# enrolment (a load fits the scale to the rows exactly: every bit of precision counts).
SCALE_HEADROOM = 1.25
# Rows re-scored per float64 block (a block of 8,192 x 512-d is 32 MB of float64).
RESCORE_BLOCK = 8192
# Rows encoded per block: 256 x 512-d float32 is 512 KiB, so the passes over a block stay
# in the core's L2 instead of going to memory (measured at 100,000 rows: 0.16 s, against
# 0.43 s with blocks of 8,192).
ENCODE_BLOCK = 256
# Absolute slack added to every bound: covers rounding to float32 of the reported values
# (one ulp near 1 is 1.2e-7), so rows outside the candidates also lose after rounding.
ABS_SLACK = 2.0**-18


def _gamma(dim: int) -> float:
    """Higham's gamma_n for float32: the relative error bound of any n-term float32 sum."""
    u = 2.0**-24
    return dim * u / (1 - dim * u)


class Int8Codes:
    """The rows of a matrix as int8 codes c = rint(x * scale) in a FAISS
    `IndexScalarQuantizer` (8-bit direct, inner product), in the matrix's row order.

    Queries go in as integers too, q~ = rint(q * T) with T per query (FAISS truncates the
    query to int8 for this code type: measured, 0.6 scores as 0), so the kernel's sums are
    exact integers and the estimate is s~ = (q~ . c) / (T * scale). With e = x - c / scale
    (each row's own rounding, measured when it is encoded) and d = q - q~ / T:

        s - s~ = q . e + (c / scale) . d
        |s - s~| <= min(|q|_1 |e|_inf, |q|_2 |e|_2) + |d|_2 |c / scale|_2

    with the row terms at their maxima over all rows ever added (`bound`).
    """

    def __init__(self, dim: int) -> None:
        import faiss

        # One thread per search, for the reason ApproximateIndex gives (index.py).
        faiss.omp_set_num_threads(1)
        self.dim = dim
        self._faiss: Any = faiss
        self._index: Any = faiss.IndexScalarQuantizer(
            dim, faiss.ScalarQuantizer.QT_8bit_direct_signed, faiss.METRIC_INNER_PRODUCT
        )
        self._scale = 0.0  # 0 until rows arrive: the first rows choose it
        # Maxima over every row ever added (removals keep them: still upper bounds).
        self._err_l2 = self._max_norm = 0.0

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def _encode(self, vecs: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
        """Codes of `vecs` (code byte = c + 128), noting the maxima the bound needs: |x|_2
        and the measured |e|_2 (|e|_inf needs no measuring: rint keeps it within half a step,
        and |c/scale|_2 <= |x|_2 + |e|_2)."""
        out = np.empty(vecs.shape, np.uint8)
        scale, step = np.float32(self._scale), np.float32(1 / self._scale)
        for a in range(0, len(vecs), ENCODE_BLOCK):
            x = np.asarray(vecs[a : a + ENCODE_BLOCK], np.float32)
            c = np.rint(x * scale)
            e = np.subtract(x, c * step)
            # float32 arithmetic: the measured norms are off by ~2^-22 at most; the 2^-20
            # terms keep them upper bounds.
            err = float(np.sqrt(np.einsum("ij,ij->i", e, e).max())) + 2.0**-20 * self.dim**0.5
            norm = float(np.sqrt(np.einsum("ij,ij->i", x, x).max())) * (1 + 2.0**-20)
            self._err_l2, self._max_norm = max(self._err_l2, err), max(self._max_norm, norm)
            c += 128
            out[a : a + len(c)] = c
        return out

    def fits(self, vecs: npt.NDArray[Any]) -> bool:
        """Whether `vecs` encode without clipping at the current scale."""
        return self._scale > 0 and _peak(vecs) * self._scale <= 127

    def rebuild(self, matrix: npt.NDArray[Any], headroom: float = 1.0) -> None:
        """Re-encode every row, the scale chosen from them (and `headroom` above)."""
        self._index.reset()
        peak = _peak(matrix)
        self._scale = 127.0 / (peak * headroom) if peak > 0 else 127.0
        self._err_l2 = self._max_norm = 0.0
        self.add(matrix)

    def add(self, vecs: npt.NDArray[Any]) -> None:
        """Append rows; the caller rebuilds instead when they do not `fit`."""
        if len(vecs):
            self._index.add_sa_codes(self._encode(vecs))

    def move_last_to(self, row: int) -> None:
        """Mirror ExactIndex.remove: the last row's code moves into `row`, the last goes."""
        n = len(self)
        if row != n - 1:
            codes = self._faiss.rev_swig_ptr(self._index.codes.data(), n * self.dim)
            codes = codes.reshape(n, self.dim)  # a view of FAISS's own buffer, no copy
            codes[row] = codes[n - 1]
        self._index.remove_ids(self._faiss.IDSelectorRange(n - 1, n))

    def _quantize(self, queries: npt.NDArray[Any]) -> tuple[F64, F64]:
        """(q~, T): each query as integers in [-127, 127] and its factor."""
        q = np.asarray(queries, np.float64)
        peak = np.abs(q).max(axis=1)
        t = 127.0 / np.where(peak > 0, peak, 1.0)
        return np.rint(q * t[:, None]), t

    def bound(self, queries: FloatArray) -> F64:
        """Per query, E >= |s~ - s| for every row (the class docstring derives it), plus
        gamma_d of float32 accumulation in case a kernel sums in float32 rather than int32
        (those sums are exact integers below 2^24, but the bound should not depend on it)."""
        q = np.asarray(queries, np.float64)
        q_int, t = self._quantize(q)
        dq = q - q_int / t[:, None]
        # Half a step from rint, widened for the float32 rounding of x * scale and of the
        # scale itself (each at most 127 * 2^-24 of a step; 2^-15 covers both).
        err_inf = (0.5 + 2.0**-15) / self._scale
        code_l2 = self._max_norm + self._err_l2
        l2, d_l2 = np.linalg.norm(q, axis=1), np.linalg.norm(dq, axis=1)
        own = np.minimum(np.abs(q).sum(axis=1) * err_inf, l2 * self._err_l2)
        acc = _gamma(self.dim) * (l2 + d_l2) * code_l2
        out: F64 = (own + d_l2 * code_l2 + acc) * (1 + 2.0**-20) + ABS_SLACK
        return out

    def scan(self, queries: FloatArray, k: int) -> tuple[F64, IntArray]:
        """(m, k) estimated similarities best first and their rows (-1 past the end)."""
        q_int, t = self._quantize(queries)
        est, rows = self._index.search(q_int.astype(np.float32), k)
        return np.asarray(est, np.float64) / (self._scale * t[:, None]), np.asarray(rows, np.int64)


def _peak(vecs: npt.NDArray[Any]) -> float:
    """max |x| without an |x| temporary."""
    if vecs.size == 0:
        return 0.0
    return float(max(vecs.max(), -vecs.min()))


def max_norm(vecs: npt.NDArray[Any]) -> float:
    """The largest row norm, computed block by block in float32 (no float64 copy)."""
    best = 0.0
    for a in range(0, len(vecs), ENCODE_BLOCK * 16):
        x = np.asarray(vecs[a : a + ENCODE_BLOCK * 16], np.float32)
        best = max(best, float(np.sqrt(np.einsum("ij,ij->i", x, x).max(initial=0.0))))
    return best


def gemm_bound(queries: FloatArray, row_norm: float) -> F64:
    """E for float32 BLAS estimates: their accumulation error only (gamma_d * |q| * |x|)."""
    q = np.asarray(queries, np.float64)
    out: F64 = 2 * _gamma(q.shape[1]) * np.linalg.norm(q, axis=1) * row_norm + ABS_SLACK
    return out


def exact_scores(matrix: npt.NDArray[Any], rows: IntArray, query: FloatArray) -> FloatArray:
    """Similarities of `rows` of `matrix` to `query`, computed in float64 and rounded once to
    float32: the correctly rounded value (to ~1e-13), whatever order BLAS would sum in."""
    q = np.asarray(query, np.float64)
    out = np.empty(len(rows), np.float32)
    for a in range(0, len(rows), RESCORE_BLOCK):
        block = np.take(matrix, rows[a : a + RESCORE_BLOCK], axis=0).astype(np.float64)
        out[a : a + len(block)] = product(block, q)
    return out


def product(rows: npt.NDArray[Any], query: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """rows @ query on this thread. OpenBLAS splits a GEMV of more than ~10,000 elements over
    its own threads (one per core); for the ~1,000 rows re-scored here, on a loaded 2-vCPU
    VM, that hand-off cost a median 5.5-9.3 ms against 0.55 ms for einsum's loop
    (benchmarks/gallery_search.py measures both)."""
    out: npt.NDArray[Any] = np.einsum("ij,j->i", rows, query)
    return out


def rank(sims: FloatArray, ids: IntArray, k: int) -> tuple[FloatArray, IntArray]:
    """The best k of (sims, ids): similarity descending, then face id ascending."""
    order = np.lexsort((ids, -sims))[:k]
    return sims[order], ids[order]


def candidates(est: npt.NDArray[Any], bound: float, k: int) -> IntArray:
    """Positions in `est` (one query's estimates, float32 or float64) that may be in the
    exact top k."""
    if len(est) <= k:
        return np.arange(len(est), dtype=np.int64)
    kth = float(np.partition(est, len(est) - k)[len(est) - k])
    floor = kth - 2 * bound
    # Compared in est's own type: round the floor down, never up (more candidates is safe).
    typed = est.dtype.type(floor)
    if float(typed) > floor:
        typed = np.nextafter(typed, est.dtype.type(-np.inf))
    return np.flatnonzero(est >= typed).astype(np.int64)
