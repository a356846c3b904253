"""Cosine nearest neighbours through faiss: one search shared by every consumer of a neighbour list.

`cosine_search(base, queries, k=...)` returns the k most similar base rows of each query (inner product of
L2-normalized float32 rows). Rule, by size only (never by a timing, so the same inputs give the same neighbours):
- base rows <= EXACT_MAX_ROWS: exact search (faiss IndexFlatIP), the same neighbours a brute-force search gives;
- larger: an inverted-file index (faiss IndexIVFFlat, inner product) with nlist = round(sqrt(rows)) lists trained by
  seeded k-means on at most TRAIN_PER_LIST rows per list, probing NPROBE lists per query. Cost per query grows as
  sqrt(rows) instead of rows. Its recall@k against exact search is measured on a seeded sample of queries
  (`recall_sample`) and reported with the result, so a reader sees what the approximation cost. An index whose
  float32 vectors would exceed FLAT_MAX_BYTES stores them as float16 instead (IndexIVFScalarQuantizer, QT_fp16:
  half the memory, similarities to about 1e-3; at 1M x 1472 rows 2.9 GB instead of 5.9 GB).
`cosine_search_rows` is the same search over rows read chunk by chunk (a callable), for bases held in a file.
`cosine_index(base)` builds the same choice as a reusable index for searching many query chunks against one base,
added in float32 chunks from a base kept in any float dtype (float16 halves what the caller holds); past
EXACT_MAX_ROWS it stores 8-bit scalar codes (faiss IndexIVFScalarQuantizer: D + 8 bytes a row instead of 4 D).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

EXACT_MAX_ROWS = 50_000
TRAIN_PER_LIST = 40
NPROBE = 16
RECALL_QUERIES = 500
FLAT_MAX_BYTES = 2 << 30  # an approximate index past this many bytes of float32 vectors stores float16
SEARCH_CHUNK_ROWS = 16384  # rows normalized and added / searched at a time by cosine_search_rows
KNN_TEMPERATURE = 0.07  # k-NN vote weight exp(cosine similarity / T), as in the DINO / InstDisc k-NN protocol


@dataclass(frozen=True)
class Neighbours:
    """similarity [Q, k] float32 (descending per row) and index [Q, k] int64 into the base rows; `search` says how."""
    similarity: np.ndarray
    index: np.ndarray
    search: dict[str, Any] = field(default_factory=dict)


def l2_normalized(x: np.ndarray, *, in_place: bool = False) -> np.ndarray:
    """Rows of x [N, D] scaled to unit L2 norm (zero rows stay zero), float32 C-contiguous: x itself when
    `in_place` and it already is such an array (the caller's array is then changed), else a new one."""
    reuse = in_place and x.dtype == np.float32 and x.flags.c_contiguous and x.flags.writeable
    out = x if reuse else np.array(x, dtype=np.float32, order="C", copy=True)
    faiss.normalize_L2(out)
    return out


def _approximate_index(dim: int, rows: int, *, seed: int,
                       codes: str | None = None) -> tuple[Any, np.ndarray, dict[str, Any]]:
    """An untrained inverted-file index for `rows` base rows of `dim` columns, the sorted rows to train it on
    (seeded), and its record. codes: None stores float32 vectors (IndexIVFFlat), or float16 past FLAT_MAX_BYTES;
    "8bit" stores 8-bit scalar codes (D + 8 bytes a row)."""
    nlist = int(round(np.sqrt(rows)))
    quantizer = faiss.IndexFlatIP(dim)
    if codes is None and rows * dim * 4 <= FLAT_MAX_BYTES:
        index, name = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT), "IndexIVFFlat"
    else:
        kind, name = ((faiss.ScalarQuantizer.QT_8bit, "IndexIVFScalarQuantizer(8 bit)") if codes == "8bit" else
                      (faiss.ScalarQuantizer.QT_fp16, "IndexIVFScalarQuantizer(fp16)"))
        index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, kind, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.nprobe = min(NPROBE, nlist)
    sample = np.sort(np.random.default_rng(seed).choice(rows, size=min(rows, TRAIN_PER_LIST * nlist), replace=False))
    return index, sample, {"method": "approximate", "index": name, "rows": rows, "nlist": nlist,
                           "nprobe": int(index.nprobe), "train_rows": int(len(sample))}


def cosine_index(base: np.ndarray, *, seed: int = 0, exact_max_rows: int = EXACT_MAX_ROWS,
                 chunk: int = 65_536) -> tuple[Any, dict[str, Any]]:
    """A faiss inner-product index of the rows of base [M, D] (unit rows, any float dtype), added `chunk` rows at a
    time as float32: IndexFlatIP (exact, 4 D bytes a row) up to exact_max_rows, else the inverted-file index of
    cosine_search with 8-bit codes (D + 8 bytes a row). Returns (index, how it searches). Search it with
    index.search(queries, k)."""
    rows, dim = base.shape
    if rows <= exact_max_rows:
        index: Any = faiss.IndexFlatIP(dim)
        info: dict[str, Any] = {"method": "exact", "index": "IndexFlatIP", "rows": rows}
    else:
        index, sample, info = _approximate_index(dim, rows, seed=seed, codes="8bit")
        index.train(l2_normalized(base[sample]))
    for start in range(0, rows, chunk):
        index.add(l2_normalized(base[start:start + chunk]))
    return index, info


def cosine_search(base: np.ndarray, queries: np.ndarray, *, k: int, seed: int = 0,
                  exact_max_rows: int = EXACT_MAX_ROWS, recall_sample: int = RECALL_QUERIES,
                  in_place: bool = False) -> Neighbours:
    """The k (at most len(base)) most cosine-similar rows of base [M, D] for each row of queries [Q, D]. Both
    are L2-normalized here: float32 copies, or the arrays themselves with `in_place` (no copy; they are changed).
    Exact search reads base where it lies (faiss.knn, no index copy). With the approximate index,
    `search["recall_at_k"]` is the mean fraction of the exact k neighbours found, over `recall_sample` seeded
    queries."""
    base, queries = l2_normalized(base, in_place=in_place), l2_normalized(queries, in_place=in_place)
    k = int(min(k, len(base)))
    if len(base) <= exact_max_rows:
        similarity, found = faiss.knn(queries, base, k, metric=faiss.METRIC_INNER_PRODUCT)
        info: dict[str, Any] = {"method": "exact", "index": "IndexFlatIP", "rows": len(base)}
    else:
        index, sample, info = _approximate_index(base.shape[1], len(base), seed=seed)
        index.train(base[sample])
        index.add(base)
        similarity, found = index.search(queries, k)
        del index
        if len(queries):
            info["recall_at_k"] = measured_recall(base, queries, found, k=k, sample=recall_sample, seed=seed)
    info["k"] = k
    return Neighbours(similarity=similarity, index=found.astype(np.int64), search=info)


def cosine_search_rows(base: Callable[[np.ndarray], np.ndarray], n_base: int, queries: Callable[[np.ndarray], np.ndarray],
                       n_queries: int, *, k: int, seed: int = 0, chunk_rows: int | None = None,
                       exact_max_rows: int = EXACT_MAX_ROWS, recall_sample: int = RECALL_QUERIES) -> Neighbours:
    """cosine_search for rows too many to hold as one float32 array: base(rows) and queries(rows) give the rows of
    the index array `rows` [B, D] (any float dtype; normalized here, chunk by chunk). The same neighbours as
    cosine_search on the whole arrays (the same rule by size, the same seeded training rows); memory: the exact
    search holds the base (at most exact_max_rows rows), the approximate one its index, plus a chunk."""
    k, chunk_rows = int(min(k, n_base)), chunk_rows or SEARCH_CHUNK_ROWS
    chunks = [np.arange(start, min(n_base, start + chunk_rows)) for start in range(0, n_base, chunk_rows)]
    if n_base <= exact_max_rows:
        index = faiss.IndexFlatIP(int(base(np.arange(1)).shape[1]))
        for rows in chunks:  # faiss.knn on the whole base and IndexFlatIP.search give the same neighbours
            index.add(l2_normalized(base(rows), in_place=True))
        info: dict[str, Any] = {"method": "exact", "index": "IndexFlatIP", "rows": n_base}
    else:
        index, sample, info = _approximate_index(int(base(np.arange(1)).shape[1]), n_base, seed=seed)
        index.train(l2_normalized(base(sample), in_place=True))
        for rows in chunks:
            index.add(l2_normalized(base(rows), in_place=True))
    parts = [index.search(l2_normalized(queries(np.arange(start, min(n_queries, start + chunk_rows))), in_place=True),
                          k) for start in range(0, n_queries, chunk_rows)]
    similarity = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, k), np.float32)
    found = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, k), np.int64)
    if info["method"] == "approximate" and n_queries:
        picked = np.sort(np.random.default_rng(seed).choice(n_queries, size=min(recall_sample, n_queries),
                                                            replace=False))
        sampled = l2_normalized(queries(picked), in_place=True)
        normalized = (l2_normalized(base(rows), in_place=True) for rows in chunks)  # the base, read once more
        truth = _exact_over_chunks(sampled, normalized, offsets=[int(rows[0]) for rows in chunks], k=k)
        hits = [len(np.intersect1d(a[a >= 0], b)) for a, b in zip(found[picked], truth)]
        info["recall_at_k"] = round(float(np.mean(hits)) / k, 4)
    info["k"] = k
    return Neighbours(similarity=similarity, index=found.astype(np.int64), search=info)


def _exact_over_chunks(queries: np.ndarray, chunks: Iterator[np.ndarray], *, offsets: Sequence[int],
                       k: int) -> np.ndarray:
    """Indices [Q, k] of the exact k nearest rows of base chunks (normalized, in order, starting at `offsets`)."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for offset, chunk in zip(offsets, chunks):
        s, i = faiss.knn(queries, chunk, min(k, len(chunk)), metric=faiss.METRIC_INNER_PRODUCT)
        best_s, best_i = np.concatenate([best_s, s], axis=1), np.concatenate([best_i, i + offset], axis=1)
        order = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(best_s, order, axis=1), np.take_along_axis(best_i, order, axis=1)
    return best_i


def measured_recall(base: np.ndarray, queries: np.ndarray, found: np.ndarray, *, k: int, sample: int,
                    seed: int) -> float:
    """Mean over `sample` seeded queries of |found ∩ exact k neighbours| / k (base, queries normalized)."""
    picked = np.sort(np.random.default_rng(seed).choice(len(queries), size=min(sample, len(queries)),
                                                        replace=False))
    _, truth = faiss.knn(queries[picked], base, k, metric=faiss.METRIC_INNER_PRODUCT)
    hits = [len(np.intersect1d(a[a >= 0], b)) for a, b in zip(found[picked], truth)]
    return round(float(np.mean(hits)) / k, 4)


def knn_vote(neighbours: Neighbours, neighbour_labels: np.ndarray, *, k: int, n_classes: int,
             temperature: float = KNN_TEMPERATURE) -> np.ndarray:
    """Class probabilities [Q, K] from the first k of each query's neighbours (a search at any k' >= k):
    each votes for its label with weight exp(similarity / temperature), normalized per query."""
    k = int(min(k, neighbours.index.shape[1]))
    similarity = neighbours.similarity[:, :k].astype(np.float64)
    found = neighbours.index[:, :k] >= 0  # an approximate search may find fewer than k
    weight = np.where(found, np.exp((similarity - similarity[:, :1]) / temperature), 0.0)  # ratios kept, no overflow
    labels = np.asarray(neighbour_labels)[np.where(found, neighbours.index[:, :k], 0)]
    queries = len(similarity)
    flat = (np.arange(queries)[:, None] * n_classes + labels).ravel()
    votes = np.bincount(flat, weights=weight.ravel(), minlength=queries * n_classes).reshape(queries, n_classes)
    total = votes.sum(axis=1, keepdims=True)
    return np.divide(votes, total, out=np.full_like(votes, 1.0 / n_classes), where=total > 0)


def knn_proba(fit_x: np.ndarray, fit_y: np.ndarray, x: np.ndarray, *, k: int, n_classes: int,
              temperature: float = KNN_TEMPERATURE) -> np.ndarray:
    """Cosine k-NN class probabilities [N, K] of x [N, D] from fit_x [M, D] / fit_y [M]: each of the k most
    similar rows votes for its class with weight exp(similarity / temperature) (`cosine_search`)."""
    neighbours = cosine_search(fit_x, x, k=k)
    return knn_vote(neighbours, fit_y, k=k, n_classes=n_classes, temperature=temperature)
