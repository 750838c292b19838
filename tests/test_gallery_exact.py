"""ExactIndex search is exact: the int8 pre-scan and the float32 filter never change the
answer of a brute-force scan, ties, near-ties, removals, rescaling and k > n included."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from appliance.gallery.exact import Int8Codes
from appliance.gallery.index import ExactIndex

Arr = np.ndarray[Any, Any]
DIM = 64


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> Arr:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def brute(data: Arr, ids: Arr, queries: Arr, k: int) -> tuple[Arr, Arr]:
    """The reference: every similarity correctly rounded to float32 (float64 products),
    best first, ties to the lower face id; -inf / -1 past the end."""
    sims = (queries.astype(np.float64) @ data.astype(np.float64).T).astype(np.float32)
    out_s = np.full((len(queries), k), -np.inf, np.float32)
    out_i = np.full((len(queries), k), -1, np.int64)
    for r, row in enumerate(sims):
        order = np.lexsort((ids, -row))[:k]
        out_s[r, : len(order)], out_i[r, : len(order)] = row[order], ids[order]
    return out_s, out_i


def index_of(data: Arr, ids: Arr, *, codes_from: int) -> ExactIndex:
    index = ExactIndex(data.shape[1])
    index.INT8_MIN_ROWS = codes_from  # type: ignore[misc]
    index.add(ids, data)
    return index


def assert_exact(index: ExactIndex, data: Arr, ids: Arr, queries: Arr, k: int) -> None:
    want_s, want_i = brute(data, ids, queries, k)
    # One query per call (int8 scan from INT8_MIN_ROWS) and the whole batch (one GEMM).
    singles = [index.search(q[None], k) for q in queries]
    got_s = np.concatenate([s for s, _ in singles])
    got_i = np.concatenate([i for _, i in singles])
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_s, want_s)
    batch_s, batch_i = index.search(queries, k)
    np.testing.assert_array_equal(batch_i, want_i)
    np.testing.assert_array_equal(batch_s, want_s)


@pytest.mark.parametrize("codes_from", [0, 10**9], ids=["int8-scan", "float32-product"])
@pytest.mark.parametrize("k", [1, 5, 40])
def test_search_equals_brute_force_on_random_data(codes_from: int, k: int) -> None:
    rng = np.random.default_rng(k)
    data, ids = unit(rng, 3000), rng.permutation(10**6)[:3000].astype(np.int64)
    index = index_of(data, ids, codes_from=codes_from)
    noisy = data[[3, 99, 2500]] + 0.05 * unit(rng, 3)
    queries = np.concatenate([unit(rng, 5), noisy / np.linalg.norm(noisy, axis=1)[:, None]])
    assert_exact(index, data, ids, queries.astype(np.float32), k)


def test_search_agrees_with_a_float32_blas_scan() -> None:
    rng = np.random.default_rng(1)
    data = unit(rng, 2000)
    ids = np.arange(2000, dtype=np.int64)
    index = index_of(data, ids, codes_from=0)
    for q in unit(rng, 8):
        sims = data @ q  # what `queries @ matrix.T` in float32 gives
        got_s, got_i = index.search(q[None], 10)
        np.testing.assert_array_equal(got_i[0], np.argsort(-sims, kind="stable")[:10])
        np.testing.assert_allclose(got_s[0], np.sort(sims)[::-1][:10], atol=1e-6)


@pytest.mark.parametrize("codes_from", [0, 10**9], ids=["int8-scan", "float32-product"])
def test_ties_and_near_ties_rank_by_similarity_then_face_id(codes_from: int) -> None:
    rng = np.random.default_rng(2)
    base = unit(rng, 1000)
    target = base[7]
    # The same face enrolled 6 times under scattered ids (exact ties), and 6 copies moved by
    # one float32 ulp in one element (near-ties the int8 codes cannot tell apart).
    twins = np.repeat(target[None], 6, axis=0)
    near = np.repeat(target[None], 6, axis=0)
    near[np.arange(6), np.arange(6)] = np.nextafter(near[np.arange(6), np.arange(6)], 2)
    data = np.concatenate([base, twins, near]).astype(np.float32)
    ids = np.concatenate(
        [np.arange(100, 1100), [50_005, 3, 70_000, 1_000_000, 99, 4], np.arange(20, 26)]
    ).astype(np.int64)
    index = index_of(data, ids, codes_from=codes_from)
    queries = np.stack([target, unit(rng, 1)[0], base[500]]).astype(np.float32)
    assert_exact(index, data, ids, queries, 16)
    _, top = index.search(target[None], 13)
    twins_found = [i for i in top[0].tolist() if i in {50_005, 3, 70_000, 1_000_000, 99, 4}]
    assert twins_found == [3, 4, 99, 50_005, 70_000, 1_000_000]  # ties go to the lower id


@pytest.mark.parametrize("codes_from", [0, 10**9], ids=["int8-scan", "float32-product"])
def test_k_past_the_gallery_pads_and_an_empty_index_answers_nothing(codes_from: int) -> None:
    rng = np.random.default_rng(3)
    empty = ExactIndex(DIM)
    s, i = empty.search(unit(rng, 2), 3)
    assert i.tolist() == [[-1] * 3] * 2 and np.isneginf(s).all()
    data, ids = unit(rng, 5), np.arange(5, dtype=np.int64)
    index = index_of(data, ids, codes_from=codes_from)
    assert_exact(index, data, ids, unit(rng, 3), 9)
    s, i = index.search(unit(rng, 1), 9)
    assert sorted(i[0, :5].tolist()) == [0, 1, 2, 3, 4] and i[0, 5:].tolist() == [-1] * 4
    assert np.isneginf(s[0, 5:]).all()


def test_removals_and_later_adds_keep_the_codes_in_step_with_the_rows() -> None:
    rng = np.random.default_rng(4)
    data, ids = unit(rng, 2000), np.arange(2000, dtype=np.int64)
    index = index_of(data, ids, codes_from=0)
    gone = rng.choice(2000, 700, replace=False)
    index.remove(ids[gone])
    keep = np.setdiff1d(np.arange(2000), gone)
    extra = unit(rng, 300)
    index.add(np.arange(5000, 5300, dtype=np.int64), extra)
    live = np.concatenate([data[keep], extra])
    live_ids = np.concatenate([ids[keep], np.arange(5000, 5300)]).astype(np.int64)
    # Queries at removed faces: their own vectors must not bring them back.
    queries = np.concatenate([data[gone[:4]], extra[:2], unit(rng, 2)])
    assert_exact(index, live, live_ids, queries, 12)
    _, found = index.search(data[gone[:4]], 50)
    assert not set(found.ravel().tolist()) & set(ids[gone].tolist())


def test_a_value_past_the_int8_range_rescales_and_stays_exact() -> None:
    rng = np.random.default_rng(5)
    data, ids = unit(rng, 1500), np.arange(1500, dtype=np.int64)
    index = index_of(data, ids, codes_from=0)
    spike = np.zeros((1, DIM), np.float32)
    spike[0, 3] = 1.0  # far past the largest element of random unit vectors (~0.5)
    index.add(np.array([7777], np.int64), spike)
    live = np.concatenate([data, spike])
    live_ids = np.concatenate([ids, [7777]]).astype(np.int64)
    queries = np.concatenate([spike, unit(rng, 4)])
    assert_exact(index, live, live_ids, queries, 8)
    assert index.search(spike, 1)[1][0, 0] == 7777


def test_a_cluster_of_near_identical_faces_widens_the_scan_and_stays_exact() -> None:
    rng = np.random.default_rng(6)
    centre = unit(rng, 1)
    # 3,000 faces within ~1e-3 of one another: the int8 estimates cannot order them, so
    # nearly all are candidates and the scan must widen past its first probe.
    data = centre + 1e-3 * unit(rng, 3000)
    data = (data / np.linalg.norm(data, axis=1)[:, None]).astype(np.float32)
    ids = np.arange(3000, dtype=np.int64)
    index = index_of(data, ids, codes_from=0)
    assert_exact(index, data, ids, np.concatenate([centre, unit(rng, 2)]), 30)


def test_the_int8_bound_holds_for_every_row() -> None:
    rng = np.random.default_rng(7)
    data = unit(rng, 4000, 512)
    data[:10] *= 0.999  # rows a little short of unit length are covered too
    codes = Int8Codes(512)
    codes.rebuild(data)
    queries = np.concatenate([unit(rng, 6, 512), data[[0, 1]]])
    est, rows = codes.scan(queries, len(data))
    true = queries.astype(np.float64) @ data.astype(np.float64).T
    bound = codes.bound(queries)
    for r in range(len(queries)):
        err = np.abs(est[r] - true[r, rows[r]])
        assert err.max() <= bound[r]
        # ...and it is not vacuous: a few percent of the random similarities' spread.
        assert bound[r] < 0.05
