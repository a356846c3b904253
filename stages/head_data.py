"""The head stage's view of a features file: one row per image, extra training rows, read lazily and in chunks.

`Dataset` arranges the features for the protocol (stages/head.py): one row per manifest image (TTA views averaged)
plus extra training rows (the TTA views themselves with tta_mode "rows", the augmented views), each layer either an
in-memory array (tests, benchmarks: `Dataset.from_arrays`) or `StoredRows` that read the rows asked for from the open
file (`arrange_stored`, stages.features.FeatureReader.take), in the storage dtype. Nothing here holds a whole layer:
- the rows that choose (at most head.selection_max_rows) are read once into memory (`Dataset.subset`);
- a refit on every selection row reads them chunk by chunk (`FitRows`) when their float32 matrix would exceed
  FIT_IN_MEMORY_BYTES: each chunk is normalized (L2 is per row, so per chunk) and standardized by a scaler whose
  mean and variance were accumulated over chunks (stages.probes.ChunkedStandardScaler, float64 accumulators);
- held-out rows are predicted and searched EVAL_CHUNK_ROWS at a time (`Dataset.iter_eval`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stages.evaluation import normalize_blocks
from stages.features import READ_CHUNK_ROWS, FeatureFile, FeatureReader, views_per_image

FIT_IN_MEMORY_BYTES = 1 << 30  # a refit whose float32 features would take more than this reads them in chunks
EVAL_CHUNK_ROWS = READ_CHUNK_ROWS  # held-out rows normalized and predicted at a time


@dataclass(frozen=True)
class StoredRows:
    """One layer's rows in an open features file, read when indexed: row i is file row index[i, 0] of `group`, or
    with V > 1 columns the float32 mean of file rows index[i] (TTA views). Indexing with an index array or a slice
    gives an array [R, D] (the storage dtype when V = 1), read chunk by chunk (FeatureReader.take)."""
    reader: FeatureReader
    layer: str
    index: np.ndarray  # [R, V] int64 file rows
    dim: int
    group: str = "features"

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.index), self.dim)

    @property
    def dtype(self) -> np.dtype:
        stored = np.dtype(self.reader.attrs.get("storage_dtype") or "float32")
        return stored if self.index.shape[1] == 1 else np.dtype(np.float32)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: Any) -> np.ndarray:
        rows = self.index[key]
        x = self.reader.take(rows.ravel(), [self.layer], group=self.group)[self.layer]
        return x if rows.shape[1] == 1 else x.reshape(len(rows), rows.shape[1], self.dim).mean(1, dtype=np.float32)

    def subset(self, keep: np.ndarray) -> StoredRows:
        return dataclasses.replace(self, index=self.index[keep])


@dataclass(frozen=True)
class JoinedRows:
    """Row sources (arrays or StoredRows of one layer) one after another, indexed as one [sum R_i, D] array."""
    parts: tuple[Any, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return (sum(len(p) for p in self.parts), self.parts[0].shape[1])

    @property
    def dtype(self) -> np.dtype:
        return np.result_type(*[p.dtype for p in self.parts])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        rows = np.arange(len(self))[key]
        starts = np.cumsum([0] + [len(p) for p in self.parts])
        out = np.empty((len(rows), self.shape[1]), dtype=self.dtype)
        for part, lo, hi in zip(self.parts, starts[:-1], starts[1:]):
            mine = np.flatnonzero((rows >= lo) & (rows < hi))
            if len(mine):
                out[mine] = part[rows[mine] - lo]
        return out

    def subset(self, keep: np.ndarray) -> JoinedRows:
        keep = np.sort(np.asarray(keep))
        starts = np.cumsum([0] + [len(p) for p in self.parts])
        return JoinedRows(tuple(subset_rows(part, keep[(keep >= lo) & (keep < hi)] - lo)
                                for part, lo, hi in zip(self.parts, starts[:-1], starts[1:])))


def subset_rows(rows: Any, keep: np.ndarray) -> Any:
    """rows[keep] for an array (in memory); the same rows, still unread, for StoredRows / JoinedRows."""
    return rows.subset(keep) if hasattr(rows, "subset") else rows[keep]


@dataclass(frozen=True)
class Dataset:
    """The features file arranged for the protocol: one row per manifest image (`images`, TTA views averaged)
    plus extra training rows (`extra`, each from image `extra_source`): the TTA views themselves with
    tta_mode "rows", and the augmented training views. A fit on images S uses S's extra rows too (with
    tta_mode "rows" instead of S's averaged rows); evaluation uses the images' own rows. Layers are arrays or
    StoredRows (read when indexed)."""
    images: dict[str, Any]  # layer -> [N, D]
    labels: np.ndarray  # [N]
    split: np.ndarray  # [N]
    paths: list[str]  # [N]
    extra: dict[str, Any]  # layer -> [M, D]
    extra_source: np.ndarray  # [M] image index
    views_replace_images: bool = False  # tta_mode "rows": fit on the views instead of their mean

    @classmethod
    def from_arrays(cls, images: dict[str, np.ndarray], labels: np.ndarray, split: Sequence[str]) -> Dataset:
        """A Dataset of in-memory features {layer: [N, D]} without extra rows (tests, benchmarks)."""
        n = len(labels)
        return cls(images=dict(images), labels=np.asarray(labels, dtype=np.int64), split=np.asarray(split),
                   paths=[str(i) for i in range(n)], extra={k: v[:0] for k, v in images.items()},
                   extra_source=np.zeros(0, dtype=np.int64))

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)

    def eval_set(self, layers: Sequence[str], normalization: str, index: np.ndarray) -> np.ndarray:
        """Normalized features [len(index), D] of images `index`."""
        return normalize_blocks([self.images[layer][index] for layer in layers], normalization)

    def iter_eval(self, layers: Sequence[str], normalization: str, index: np.ndarray, *,
                  chunk_rows: int | None = None) -> Iterator[np.ndarray]:
        """eval_set of consecutive slices of `index` (EVAL_CHUNK_ROWS images each): [B, D] float32 per chunk."""
        step = chunk_rows or EVAL_CHUNK_ROWS
        for start in range(0, len(index), step):
            yield self.eval_set(layers, normalization, index[start:start + step])

    def fit_index(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(own image rows, extra rows) a fit on images `index` uses: their rows (none when their views replace
        them) and their extra rows, in that order."""
        extra = np.flatnonzero(np.isin(self.extra_source, index))
        own = np.empty(0, dtype=np.int64) if self.views_replace_images and len(extra) else np.asarray(index)
        return own, extra

    def fit_labels(self, own: np.ndarray, extra: np.ndarray) -> np.ndarray:
        return np.concatenate([self.labels[own], self.labels[self.extra_source[extra]]])

    def fit_set(self, layers: Sequence[str], normalization: str, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(normalized features [R, D], labels [R]) to fit on images `index`: their rows and extra rows."""
        own, extra = self.fit_index(index)
        blocks = [np.concatenate([self.images[layer][own], self.extra[layer][extra]]) for layer in layers]
        return normalize_blocks(blocks, normalization), self.fit_labels(own, extra)

    def fit_rows(self, layers: Sequence[str], normalization: str, index: np.ndarray) -> FitRows:
        """The rows fit_set gives, unread: sliced chunk by chunk (FitRows)."""
        own, extra = self.fit_index(index)
        return FitRows(self, tuple(layers), normalization, own, extra)

    def fit_bytes(self, layers: Sequence[str], index: np.ndarray) -> int:
        """Bytes of fit_set's float32 features for images `index`."""
        own, extra = self.fit_index(index)
        return (len(own) + len(extra)) * sum(self.images[layer].shape[1] for layer in layers) * 4

    def subset(self, index: np.ndarray) -> Dataset:
        """The images `index` (sorted, no repeats) and their extra rows, read into memory as stored: a Dataset
        whose image i is image index[i] here."""
        index = np.asarray(index, dtype=np.int64)
        extra = np.flatnonzero(np.isin(self.extra_source, index))
        return Dataset(images={k: np.asarray(v[index]) for k, v in self.images.items()}, labels=self.labels[index],
                       split=self.split[index], paths=[self.paths[i] for i in index],
                       extra={k: np.asarray(v[extra]) for k, v in self.extra.items()},
                       extra_source=np.searchsorted(index, self.extra_source[extra]).astype(np.int64),
                       views_replace_images=self.views_replace_images)

    def without(self, drop: np.ndarray) -> Dataset:
        """The images where drop [N] bool is False, with their extra rows only (nothing is read)."""
        keep = np.flatnonzero(~drop)
        new_index = np.cumsum(~drop) - 1
        extra = np.flatnonzero(~drop[self.extra_source]) if len(self.extra_source) else self.extra_source
        return Dataset(images={k: subset_rows(v, keep) for k, v in self.images.items()}, labels=self.labels[keep],
                       split=self.split[keep], paths=[self.paths[i] for i in keep],
                       extra={k: subset_rows(v, extra) for k, v in self.extra.items()},
                       extra_source=new_index[self.extra_source[extra]].astype(np.int64),
                       views_replace_images=self.views_replace_images)


@dataclass(frozen=True)
class FitRows:
    """fit_set's features, read when sliced: rows[a:b] -> float32 [B, D] of fit rows a..b-1 (the images' own
    rows, then their extra rows), normalized, and standardized by `scaler` once it is set (fitted). Handed to
    stages.probes.LinearProbe, which slices it chunk by chunk (its chunked path: not a float32 array)."""
    dataset: Dataset
    layers: tuple[str, ...]
    normalization: str
    own: np.ndarray
    extra: np.ndarray
    scaler: Any = None

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), sum(self.dataset.images[layer].shape[1] for layer in self.layers))

    def __len__(self) -> int:
        return len(self.own) + len(self.extra)

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, _ = key.indices(len(self))
        own = self.own[start:stop]
        extra = self.extra[max(0, start - len(self.own)):max(0, stop - len(self.own))]
        blocks = [np.concatenate([self.dataset.images[layer][own], self.dataset.extra[layer][extra]])
                  for layer in self.layers]
        x = normalize_blocks(blocks, self.normalization)
        return x if self.scaler is None else self.scaler.transform(x, copy=False)


def arrange(data: FeatureFile) -> Dataset:
    """A features file read into memory (stages.features.read_features) as a Dataset."""
    views = views_per_image(data.attrs)
    n = len(data.paths) // views
    images = {layer: (x if views == 1 else x.reshape(n, views, x.shape[1]).mean(1, dtype=np.float32))
              for layer, x in data.features.items()}
    extra = {layer: data.augmented.get(layer, np.zeros((0, x.shape[1]), x.dtype)) for layer, x in images.items()}
    source = data.augmented_source
    if views > 1:
        extra = {layer: np.concatenate([x, extra[layer]]) for layer, x in data.features.items()}
        source = np.concatenate([np.repeat(np.arange(n), views), source])
    return Dataset(images=images, labels=data.labels[::views], split=data.split[::views],
                   paths=data.paths[::views], extra=extra, extra_source=source.astype(np.int64),
                   views_replace_images=views > 1)


def arrange_stored(reader: FeatureReader) -> Dataset:
    """arrange for a lazily opened file (stages.features.open_features): the same rows, as StoredRows (unread)."""
    views = views_per_image(reader.attrs)
    n = reader.n_rows // views
    dims = reader.dims()
    augmented = set(reader.augmented_layers)
    images, extra = {}, {}
    for layer, dim in dims.items():
        images[layer] = StoredRows(reader, layer, np.arange(n * views, dtype=np.int64).reshape(n, views), dim)
        parts = [StoredRows(reader, layer, np.arange(n * views, dtype=np.int64)[:, None], dim)] if views > 1 else []
        if layer in augmented:
            parts.append(StoredRows(reader, layer, np.arange(len(reader.augmented_source), dtype=np.int64)[:, None],
                                    dim, group="augmented"))
        extra[layer] = (JoinedRows(tuple(parts)) if parts else
                        np.zeros((0, dim), np.dtype(reader.attrs.get("storage_dtype") or "float32")))
    source = reader.augmented_source
    if views > 1:
        source = np.concatenate([np.repeat(np.arange(n), views), source])
    return Dataset(images=images, labels=reader.labels[::views], split=reader.split[::views],
                   paths=reader.paths[::views], extra=extra, extra_source=source.astype(np.int64),
                   views_replace_images=views > 1)
