"""Cosine nearest neighbours through faiss: one search shared by every consumer of a neighbour list.

`cosine_search(base, queries, k=...)` returns the k most similar base rows of each query (inner product of
L2-normalized float32 rows). Rule, by size only (never by a timing, so the same inputs give the same neighbours):
- base rows <= EXACT_MAX_ROWS: exact search (faiss IndexFlatIP), the same neighbours a brute-force search gives;
- larger: an inverted-file index (faiss IndexIVFFlat, inner product) with nlist = round(sqrt(rows)) lists trained by
  seeded k-means on at most TRAIN_PER_LIST rows per list, probing NPROBE lists per query. Cost per query grows as
  sqrt(rows) instead of rows. Its recall@k against exact search is measured on a seeded sample of queries
  (`recall_sample`) and reported with the result, so a reader sees what the approximation cost.
`cosine_index(base)` builds the same choice as a reusable index for searching many query chunks against one base,
added in float32 chunks from a base kept in any float dtype (float16 halves what the caller holds); past
EXACT_MAX_ROWS it stores 8-bit scalar codes (faiss IndexIVFScalarQuantizer: D + 8 bytes a row instead of 4 D).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

EXACT_MAX_ROWS = 50_000
TRAIN_PER_LIST = 40
NPROBE = 16
RECALL_QUERIES = 500
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


def _approximate_index(base: np.ndarray, *, seed: int) -> tuple[Any, dict[str, Any]]:
    rows, dim = base.shape
    nlist = int(round(np.sqrt(rows)))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    sample = np.random.default_rng(seed).choice(rows, size=min(rows, TRAIN_PER_LIST * nlist), replace=False)
    index.train(base[np.sort(sample)])
    index.add(base)
    index.nprobe = min(NPROBE, nlist)
    return index, {"method": "approximate", "index": "IndexIVFFlat", "rows": rows, "nlist": nlist,
                   "nprobe": int(index.nprobe), "train_rows": int(len(sample))}


def cosine_index(base: np.ndarray, *, seed: int = 0, exact_max_rows: int = EXACT_MAX_ROWS,
                 chunk: int = 65_536) -> tuple[Any, dict[str, Any]]:
    """A faiss inner-product index of the rows of base [M, D] (unit rows, any float dtype), added `chunk` rows at a
    time as float32: IndexFlatIP (exact, 4 D bytes a row) up to exact_max_rows, else IndexIVFScalarQuantizer with
    8-bit codes (D + 8 bytes a row), nlist = round(sqrt(M)) trained by seeded k-means on at most TRAIN_PER_LIST rows
    per list, NPROBE lists probed. Returns (index, how it searches). Search it with index.search(queries, k)."""
    rows, dim = base.shape
    if rows <= exact_max_rows:
        index: Any = faiss.IndexFlatIP(dim)
        info: dict[str, Any] = {"method": "exact", "index": "IndexFlatIP", "rows": rows}
    else:
        nlist = int(round(np.sqrt(rows)))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                              faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        sample = np.sort(np.random.default_rng(seed).choice(rows, size=min(rows, TRAIN_PER_LIST * nlist),
                                                            replace=False))
        index.train(l2_normalized(base[sample]))
        index.nprobe = min(NPROBE, nlist)
        info = {"method": "approximate", "index": "IndexIVFScalarQuantizer(8 bit)", "rows": rows, "nlist": nlist,
                "nprobe": int(index.nprobe), "train_rows": int(len(sample))}
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
        index, info = _approximate_index(base, seed=seed)
        similarity, found = index.search(queries, k)
        del index
        if len(queries):
            info["recall_at_k"] = measured_recall(base, queries, found, k=k, sample=recall_sample, seed=seed)
    info["k"] = k
    return Neighbours(similarity=similarity, index=found.astype(np.int64), search=info)


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
