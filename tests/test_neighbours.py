"""stages.neighbours: exact and approximate cosine search agree on clustered data, one search at the largest k
serves every smaller k, votes weigh by similarity and ignore neighbours an approximate search did not find."""
from __future__ import annotations

import numpy as np
import pytest

from stages import neighbours as nb


def clustered(n: int, *, dim: int = 16, clusters: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (clusters, dim))
    labels = rng.integers(0, clusters, n)
    return (centres[labels] + rng.normal(0, 0.15, (n, dim))).astype(np.float32), labels


def test_exact_search_is_brute_force_cosine() -> None:
    base, _ = clustered(300)
    queries, _ = clustered(40, seed=1)
    found = nb.cosine_search(base, queries, k=5)
    unit = base / np.linalg.norm(base, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    truth = np.argsort(-(q @ unit.T), axis=1, kind="stable")[:, :5]
    assert found.search == {"method": "exact", "index": "IndexFlatIP", "rows": 300, "k": 5}
    np.testing.assert_array_equal(np.sort(found.index, axis=1), np.sort(truth, axis=1))
    np.testing.assert_allclose(found.similarity, np.take_along_axis(q @ unit.T, found.index, axis=1), atol=1e-5)
    assert np.all(np.diff(found.similarity, axis=1) <= 1e-6)  # descending


def test_approximate_index_above_the_threshold_finds_the_exact_neighbours_of_clustered_data() -> None:
    base, _ = clustered(4000)
    queries, _ = clustered(300, seed=2)
    exact = nb.cosine_search(base, queries, k=10)
    approx = nb.cosine_search(base, queries, k=10, exact_max_rows=1000, seed=3)
    assert approx.search["method"] == "approximate" and approx.search["nlist"] == 63
    assert approx.search["nprobe"] == nb.NPROBE and approx.search["train_rows"] == nb.TRAIN_PER_LIST * 63
    overlap = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(approx.index, exact.index)])
    assert overlap >= 0.95
    assert approx.search["recall_at_k"] == pytest.approx(overlap, abs=0.05)  # its own measurement on a sample
    again = nb.cosine_search(base, queries, k=10, exact_max_rows=1000, seed=3)
    np.testing.assert_array_equal(again.index, approx.index)  # seeded: the same neighbours every run


def test_one_search_at_the_largest_k_gives_every_smaller_k_the_same_votes() -> None:
    base, labels = clustered(500, clusters=4)
    queries, _ = clustered(60, clusters=4, seed=5)
    widest = nb.cosine_search(base, queries, k=20)
    for k in (1, 5, 10, 20):
        own = nb.cosine_search(base, queries, k=k)
        np.testing.assert_allclose(nb.knn_vote(widest, labels, k=k, n_classes=4),
                                   nb.knn_vote(own, labels, k=k, n_classes=4), atol=1e-12)


def test_votes_skip_neighbours_not_found_and_k_beyond_the_base_is_clamped() -> None:
    found = nb.Neighbours(similarity=np.array([[0.9, 0.5, -3.4e38]], dtype=np.float32),
                          index=np.array([[2, 0, -1]]))
    proba = nb.knn_vote(found, np.array([1, 0, 0]), k=3, n_classes=2)
    w = np.exp(np.array([0.9, 0.5]) / nb.KNN_TEMPERATURE)  # row 2 votes class 0, row 0 class 1; -1 votes nothing
    np.testing.assert_allclose(proba, [[w[0] / w.sum(), w[1] / w.sum()]], rtol=1e-6)
    lonely = nb.knn_vote(nb.Neighbours(np.zeros((1, 1), np.float32), np.array([[-1]])), np.array([0]), k=1,
                         n_classes=2)
    np.testing.assert_allclose(lonely, [[0.5, 0.5]])  # nothing found: no vote, uniform
    few = nb.cosine_search(np.eye(3, dtype=np.float32), np.ones((1, 3), np.float32), k=10)
    assert few.index.shape == (1, 3) and few.search["k"] == 3


@pytest.mark.parametrize("exact_max_rows", [10_000, 100])
def test_search_over_row_chunks_gives_the_neighbours_of_the_whole_arrays(exact_max_rows: int) -> None:
    """cosine_search_rows (rows read through a callable, normalized chunk by chunk) == cosine_search on the
    whole arrays, exact and approximate (same seeded training rows, same index), with its recall measured."""
    rng = np.random.default_rng(3)
    base = (rng.normal(0, 1, (12, 16))[rng.integers(0, 12, 900)] + rng.normal(0, 0.3, (900, 16))).astype(np.float16)
    queries = base[::7] + np.float16(0.01)
    reads = []

    def rows_of(x):
        def read(index):
            reads.append(len(index))
            return x[index]
        return read

    whole = nb.cosine_search(base, queries, k=5, seed=2, exact_max_rows=exact_max_rows)
    chunked = nb.cosine_search_rows(rows_of(base), len(base), rows_of(queries), len(queries), k=5, seed=2,
                                    chunk_rows=64, exact_max_rows=exact_max_rows)
    np.testing.assert_array_equal(chunked.index, whole.index)
    np.testing.assert_allclose(chunked.similarity, whole.similarity, rtol=0, atol=1e-6)
    assert chunked.search == whole.search
    assert max(reads) <= max(64, whole.search.get("train_rows", 0), nb.RECALL_QUERIES)


def test_a_large_approximate_index_stores_float16_and_still_finds_the_neighbours(monkeypatch) -> None:
    """Past FLAT_MAX_BYTES of float32 vectors the index stores float16 (half the memory): the same lists, the same
    neighbours on clustered data up to ties, similarities within float16 rounding."""
    base, _ = clustered(4000)
    queries, _ = clustered(300, seed=2)
    flat = nb.cosine_search(base, queries, k=10, exact_max_rows=1000, seed=3)
    monkeypatch.setattr(nb, "FLAT_MAX_BYTES", 1000)
    half = nb.cosine_search(base, queries, k=10, exact_max_rows=1000, seed=3)
    assert flat.search["index"] == "IndexIVFFlat" and half.search["index"] == "IndexIVFScalarQuantizer(fp16)"
    overlap = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(half.index, flat.index)])
    assert overlap >= 0.95 and half.search["recall_at_k"] >= flat.search["recall_at_k"] - 0.05
    np.testing.assert_allclose(half.similarity[:, 0], flat.similarity[:, 0], atol=2e-3)
