"""The features/<bb>.h5 format, read side: what the extract stage stores and every reader (head, audit) checks.

Layout (written by stages/features_write.py; HDF5, `track_times=False`):
    features/<layer>          [N * V, D] float16 | float32: one row per manifest image (x V TTA views with
                              tta_mode "rows"), in manifest order; chunked along rows (about CHUNK_BYTES a chunk)
    labels [N * V] int64, split [N * V] str, sha256 [N * V] str, path [N * V] str
    augmented/<layer>         optional [M, D]: augmented training views (extract.augment_views)
    augmented_source          optional [M] int64: the manifest image each augmented row came from
    attrs                     backbone, weights_sha256, manifest_sha256, layers, layer_aliases ({"mid": ...}),
                              preprocess, classes, versions, tta, tta_mode, augment, storage_dtype, precision, ...
Read side: `read_features` loads a file and checks shapes, dtypes and finiteness (FeaturesError);
`check_provenance` checks that it was computed from this backbone, weight file and manifest (ProvenanceError).
Lazy side (for 10^5-10^6 rows): `open_features` opens the file without loading any feature matrix and gives a
`FeatureReader`: the row arrays and attributes in memory, feature rows read in row chunks in the storage dtype
(`iter_chunks`), or a subset of rows (`take`), each chunk checked finite as it is read. The feature datasets are
HDF5-chunked, so they are read chunk by chunk through h5py rather than np.memmap'd; a row chunk of 1M x 1472
float16 features is a few MB, and nothing is ever converted to float64.
The write side (row reuse, work log, lock, writer) is stages/features_write.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from stages.images import ManifestRow, read_manifest
from stages.io import sha256_file

FORMAT_VERSION = 1
CHUNK_BYTES = 1 << 20  # HDF5 chunk size target for feature rows
READ_CHUNK_ROWS = 16384  # rows per chunk of FeatureReader.iter_chunks (1472 float16 columns: 48 MB as float32)

JSON_ATTRS = ("layers", "preprocess", "classes", "versions", "tta", "layer_aliases", "augment")


class FeaturesError(RuntimeError):
    """A features file is missing, damaged, or does not fit the manifest; the message says which and how to fix it."""


class ProvenanceError(FeaturesError):
    """The features file was computed from another backbone, weight file or manifest."""


class LockError(FeaturesError):
    """Another process is writing the same features file."""


# ------------------------------------------------------------------------------------------------ features
@dataclass(frozen=True)
class FeatureFile:
    """A features/<bb>.h5 file read into memory: arrays in manifest order, attributes JSON-decoded."""
    path: Path
    features: dict[str, np.ndarray]  # layer -> [N, D] (float16 | float32, as stored)
    labels: np.ndarray  # [N] int64
    split: np.ndarray  # [N] str
    sha256: np.ndarray  # [N] str
    paths: list[str]
    attrs: dict[str, Any]
    augmented: dict[str, np.ndarray] = field(default_factory=dict)  # layer -> [M, D] augmented training views
    augmented_source: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # [M] image index


def _decode_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _read_strings(dataset: h5py.Dataset) -> np.ndarray:
    """A fixed-length or variable-length string dataset as a numpy str array [N]."""
    if h5py.check_string_dtype(dataset.dtype) is not None:
        return np.asarray(dataset.asstr()[()], dtype=str)
    return np.asarray(dataset[()]).astype(str)


def _open(path: Path) -> tuple[h5py.File, dict[str, Any], list[str]]:
    """(open handle, JSON-decoded attributes, stored layers in extract.layers order); FeaturesError when the file
    is absent, unreadable or lacks a row dataset."""
    try:
        handle = h5py.File(path, "r")
    except FileNotFoundError:
        raise FeaturesError(f"{path} does not exist; run `dvc repro extract` first") from None
    except OSError as exc:
        raise FeaturesError(f"{path} is not a readable HDF5 features file ({exc}); re-run `dvc repro extract`") from None
    attrs = {key: _decode_attr(value) for key, value in handle.attrs.items()}
    for key in JSON_ATTRS:
        if isinstance(attrs.get(key), str):
            attrs[key] = json.loads(attrs[key])
    missing = [name for name in ("features", "labels", "split", "sha256", "path") if name not in handle]
    if missing:
        handle.close()
        raise FeaturesError(f"{path} lacks dataset(s) {', '.join(missing)}; re-run `dvc repro extract`")
    in_file = list(handle["features"].keys())
    declared = [layer for layer in attrs.get("layers") or [] if layer in in_file]
    return handle, attrs, declared + [layer for layer in in_file if layer not in declared]


def _wanted(path: Path, stored: list[str], layers: Sequence[str] | None) -> list[str]:
    wanted = list(layers) if layers is not None else stored
    absent = [layer for layer in wanted if layer not in stored]
    if absent:
        raise FeaturesError(f"head.layer(s) {absent} not in {path}, which holds {stored}; add them to "
                            f"extract.layers or set head.layer to a stored layer (params.yaml)")
    return wanted


def _row_arrays(handle: h5py.File) -> dict[str, Any]:
    augmented = "augmented_source" in handle and "augmented" in handle
    return {"labels": handle["labels"][()], "split": _read_strings(handle["split"]),
            "sha256": _read_strings(handle["sha256"]), "paths": [str(p) for p in _read_strings(handle["path"])],
            "augmented_source": (handle["augmented_source"][()].astype(np.int64) if augmented
                                 else np.zeros(0, dtype=np.int64))}


def read_features(path: str | Path, layers: Sequence[str] | None = None) -> FeatureFile:
    """Read `layers` (default: every stored layer) and the row arrays of a features file, in memory as stored."""
    path = Path(path)
    handle, attrs, stored = _open(path)
    with handle:
        wanted = _wanted(path, stored, layers)
        data = FeatureFile(path=path, features={layer: handle["features"][layer][()] for layer in wanted},
                           attrs=attrs, **_row_arrays(handle))
        if "augmented" in handle and "augmented_source" in handle:
            data = dataclasses.replace(data, augmented={layer: handle["augmented"][layer][()] for layer in wanted
                                                        if layer in handle["augmented"]})
    check_arrays(data)
    return dataclasses.replace(data, labels=data.labels.astype(np.int64))


@dataclass
class FeatureReader:
    """An open features file: attributes and row arrays in memory, feature matrices read lazily in row chunks in the
    storage dtype (float16 | float32). Use through `open_features` (a context manager that closes the file).
    Same row attributes as FeatureFile, so check_provenance takes either."""
    path: Path
    handle: h5py.File
    layers: list[str]  # every stored layer, extract.layers order
    labels: np.ndarray  # [N] int64
    split: np.ndarray  # [N] str
    sha256: np.ndarray  # [N] str
    paths: list[str]
    attrs: dict[str, Any]
    augmented_source: np.ndarray  # [M] image index of each augmented row

    @property
    def n_rows(self) -> int:
        return len(self.paths)

    @property
    def augmented_layers(self) -> list[str]:
        """The stored layers that have augmented rows (group "augmented"), extract.layers order."""
        held = self.handle["augmented"] if "augmented" in self.handle and len(self.augmented_source) else {}
        return [layer for layer in self.layers if layer in held]

    def dims(self, layers: Sequence[str] | None = None) -> dict[str, int]:
        """Columns of each layer of `layers` (default: every stored layer)."""
        return {layer: int(self.handle["features"][layer].shape[1]) for layer in _wanted(self.path, self.layers, layers)}

    def _datasets(self, layers: Sequence[str] | None, group: str) -> dict[str, h5py.Dataset]:
        wanted = _wanted(self.path, self.layers, layers)
        if group == "augmented":
            held = self.handle["augmented"] if "augmented" in self.handle else {}
            return {layer: held[layer] for layer in wanted if layer in held}
        return {layer: self.handle["features"][layer] for layer in wanted}

    def iter_chunks(self, layers: Sequence[str] | None = None, *, chunk_rows: int = READ_CHUNK_ROWS,
                    group: str = "features") -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(first row, {layer: [B, D] as stored}) for consecutive row chunks of `group` ("features" or "augmented"),
        each checked finite as it is read (FeaturesError names the layer and rows)."""
        datasets = self._datasets(layers, group)
        total = len(self.augmented_source) if group == "augmented" else self.n_rows
        for start in range(0, total, chunk_rows):
            stop = min(total, start + chunk_rows)
            yield start, {layer: self._checked(f"{group}/{layer}", ds[start:stop], start)
                          for layer, ds in datasets.items()}

    def take(self, rows: np.ndarray, layers: Sequence[str] | None = None, *, group: str = "features",
             chunk_rows: int = READ_CHUNK_ROWS) -> dict[str, np.ndarray]:
        """{layer: [len(rows), D] as stored} for the row indices `rows` (any order, repeats allowed), read chunk by
        chunk: memory is the result plus one chunk."""
        rows = np.asarray(rows, dtype=np.int64)
        total = len(self.augmented_source) if group == "augmented" else self.n_rows
        if len(rows) and (rows.min() < 0 or rows.max() >= total):
            raise FeaturesError(f"{self.path}: row indices must lie in [0, {total}); got [{rows.min()}, {rows.max()}]")
        datasets = self._datasets(layers, group)
        out = {layer: np.empty((len(rows), ds.shape[1]), dtype=ds.dtype) for layer, ds in datasets.items()}
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        for start in range(0, total, chunk_rows):
            lo, hi = np.searchsorted(sorted_rows, [start, start + chunk_rows])
            if lo == hi:
                continue
            stop = min(total, int(sorted_rows[hi - 1]) + 1)
            for layer, ds in datasets.items():
                wanted = sorted_rows[lo:hi]
                out[layer][order[lo:hi]] = self._checked(f"{group}/{layer}", ds[start:stop][wanted - start], wanted)
        return out

    def read(self, layers: Sequence[str] | None = None, *, group: str = "features") -> dict[str, np.ndarray]:
        """Whole layers [N, D] as stored (float16 | float32; for callers whose rows fit in memory)."""
        return {layer: self._checked(f"{group}/{layer}", ds[()], 0)
                for layer, ds in self._datasets(layers, group).items()}

    def check_finite(self, layers: Sequence[str] | None = None, *, chunk_rows: int = READ_CHUNK_ROWS) -> None:
        """check_arrays' finiteness check (the same FeaturesError, counting every NaN or infinite value) on `layers`
        (default: all) and their augmented rows, in one pass over the file, chunk by chunk."""
        for group in ("features", "augmented"):
            for layer, ds in self._datasets(layers, group).items():
                bad = sum(int(block.size - np.count_nonzero(np.isfinite(block)))
                          for block in (ds[start:start + chunk_rows] for start in range(0, ds.shape[0], chunk_rows)))
                if bad and group == "features":
                    raise damaged(self.path, f"the number of NaN or infinite values in features/{layer}", bad, "0")
                if bad:
                    raise damaged(self.path, f"augmented/{layer} (shape {ds.shape}, all finite: False)", "inconsistent",
                                  f"finite values of shape {ds.shape}: one row per augmented_source entry")

    def _checked(self, name: str, block: np.ndarray, rows: int | np.ndarray) -> np.ndarray:
        """`block` unless it holds a non-finite value; `rows`: its first row's index, or every row's index."""
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            first = rows + int(bad[0]) if isinstance(rows, int) else int(rows[bad[0]])
            raise FeaturesError(f"{self.path}: {name} has NaN or infinite values in {len(bad)} row(s) from row "
                                f"{first} but expected finite values; the file is damaged or was not "
                                f"written by the extract stage. Delete it and re-run `dvc repro extract`.")
        return block


@contextlib.contextmanager
def open_features(path: str | Path) -> Iterator[FeatureReader]:
    """Open a features file lazily: shapes and dtypes of every stored layer are checked now (check_arrays, without
    reading a feature value), finiteness chunk by chunk as rows are read."""
    path = Path(path)
    handle, attrs, stored = _open(path)
    try:
        rows = _row_arrays(handle)
        augmented = {layer: handle["augmented"][layer] for layer in stored
                     if "augmented_source" in handle and "augmented" in handle and layer in handle["augmented"]}
        check_arrays(FeatureFile(path=path, features={layer: handle["features"][layer] for layer in stored},
                                 attrs=attrs, augmented=augmented, **rows), finite=False)
        rows["labels"] = rows["labels"].astype(np.int64)
        yield FeatureReader(path=path, handle=handle, layers=stored, attrs=attrs, **rows)
    finally:
        handle.close()


def damaged(path: Path, what: str, found: Any, expected: str) -> FeaturesError:
    """The error for a file whose `what` is `found` where the format says `expected`."""
    return FeaturesError(f"{path}: {what} is {found} but expected {expected}; the file is damaged or was not "
                         f"written by the extract stage. Delete it and re-run `dvc repro extract`.")


def check_arrays(data: FeatureFile, *, finite: bool = True) -> None:
    """Raise FeaturesError unless every array has the contract's shape and dtype: features/<layer> [N, D] in the
    file's storage_dtype (float16 | float32) and finite, labels [N] integer, split and sha256 [N]; N = rows of `path`.
    `finite=False`: shapes and dtypes only (the feature arrays may then be h5py datasets, not read here)."""
    def fail(what: str, found: Any, expected: str) -> None:
        raise damaged(data.path, what, found, expected)

    n = len(data.paths)
    for name, values in (("labels", data.labels), ("split", data.split), ("sha256", data.sha256)):
        if values.shape != (n,):
            fail(f"the shape of dataset {name}", values.shape, f"({n},), one entry per row of dataset path")
    if data.labels.dtype.kind not in "iu":
        fail("the dtype of dataset labels", data.labels.dtype, "an integer dtype (int64)")
    storage = data.attrs.get("storage_dtype")
    for layer, values in data.features.items():
        if values.ndim != 2 or values.shape[0] != n:
            fail(f"the shape of features/{layer}", values.shape, f"({n}, D): one row per row of dataset path")
        allowed = [storage] if storage in ("float16", "float32") else ["float16", "float32"]
        if values.dtype.name not in allowed:
            fail(f"the dtype of features/{layer}", values.dtype.name,
                 f"{' or '.join(allowed)} (attribute storage_dtype is {storage!r})")
        bad = int(values.size - np.count_nonzero(np.isfinite(values))) if finite else 0
        if bad:
            fail(f"the number of NaN or infinite values in features/{layer}", bad, "0")
    m = len(data.augmented_source)
    for layer, values in data.augmented.items():
        width = data.features[layer].shape[1]
        all_finite = bool(np.all(np.isfinite(values))) if finite else True
        if values.shape != (m, width) or not all_finite:
            fail(f"augmented/{layer} (shape {values.shape}, all finite: {all_finite})",
                 "inconsistent", f"finite values of shape ({m}, {width}): one row per augmented_source entry")
    if m and (data.augmented_source.min() < 0 or data.augmented_source.max() >= n):
        fail("the range of augmented_source", [int(data.augmented_source.min()), int(data.augmented_source.max())],
             f"image indices in [0, {n})")


def check_provenance(data: FeatureFile | FeatureReader, *, backbone: str, weights_path: str | Path, weights_sha256: str,
                     manifest_path: str | Path, manifest_sha256: str, manifest: Sequence[ManifestRow]) -> None:
    """Raise ProvenanceError unless `data` was extracted by `backbone` with these weights from this manifest."""
    def fail(attribute: str, expected: Any, found: Any, what: str) -> None:
        raise ProvenanceError(
            f"{data.path}: {attribute} is {found!r} but expected {expected!r} ({what}); the features were "
            f"computed from other inputs. Re-run `dvc repro extract@{backbone}`.")

    attrs = data.attrs
    if attrs.get("backbone") != backbone:
        fail("attribute backbone", backbone, attrs.get("backbone"), "--backbone")
    if attrs.get("weights_sha256") != weights_sha256:
        fail("attribute weights_sha256", weights_sha256, attrs.get("weights_sha256"), f"sha256 of {weights_path}")
    if attrs.get("manifest_sha256") != manifest_sha256:
        fail("attribute manifest_sha256", manifest_sha256, attrs.get("manifest_sha256"),
             f"sha256 of {manifest_path}")
    views = views_per_image(attrs)
    if len(data.paths) != len(manifest) * views:
        fail("the number of rows", len(manifest) * views, len(data.paths),
             f"{len(manifest)} images in {manifest_path} x {views} stored view(s)")
    for index, row in enumerate(manifest):
        for r in range(index * views, (index + 1) * views):
            found = (data.paths[r], str(data.sha256[r]), int(data.labels[r]), str(data.split[r]))
            if found != (row.path, row.sha256, row.label, row.split):
                fail(f"row {r} (path, sha256, label, split)", (row.path, row.sha256, row.label, row.split),
                     found, f"image {index} of {manifest_path}")




def views_per_image(attrs: dict[str, Any]) -> int:
    """Rows the features file holds per image: one per TTA view with tta_mode "rows", else one."""
    tta = attrs.get("tta") or ["none"]
    return len(tta) if attrs.get("tta_mode") == "rows" else 1


def _input_hashes(*, backbone: str, manifest_path: Path, weights_path: Path) -> tuple[list[ManifestRow], dict[str, str]]:
    for path, hint in ((manifest_path, "dvc repro prepare"), (weights_path, f"dvc repro weights@{backbone}")):
        if not Path(path).is_file():
            raise FeaturesError(f"{path} does not exist; run `{hint}`")
    return read_manifest(manifest_path), {"manifest_sha256": sha256_file(manifest_path),
                                          "weights_sha256": sha256_file(weights_path)}


def _check_inputs(data: FeatureFile | FeatureReader, *, backbone: str, manifest_path: Path, weights_path: Path,
                  manifest: list[ManifestRow], hashes: dict[str, str]) -> None:
    check_provenance(data, backbone=backbone, weights_path=weights_path, manifest_path=manifest_path,
                     manifest=manifest, **hashes)
    classes = data.attrs.get("classes") or []
    if len(classes) < 2 or data.labels.max(initial=0) >= len(classes):
        raise FeaturesError(f"{data.path}: attribute classes {classes} does not name every label "
                            f"0..{data.labels.max(initial=0)}; re-run `dvc repro extract@{backbone}`")


def read_checked(features_path: Path, *, backbone: str, manifest_path: Path, weights_path: Path,
                 layers: Sequence[str] | None = None) -> tuple[FeatureFile, dict[str, str]]:
    """Read `layers` (default: all) of features_path and check its provenance against this manifest and weight
    file and that its classes name every label; returns (data, {"manifest_sha256", "weights_sha256"})."""
    manifest, hashes = _input_hashes(backbone=backbone, manifest_path=manifest_path, weights_path=weights_path)
    data = read_features(features_path, layers)
    _check_inputs(data, backbone=backbone, manifest_path=manifest_path, weights_path=weights_path,
                  manifest=manifest, hashes=hashes)
    return data, hashes


@contextlib.contextmanager
def open_checked(features_path: Path, *, backbone: str, manifest_path: Path,
                 weights_path: Path) -> Iterator[tuple[FeatureReader, dict[str, str]]]:
    """read_checked's checks on a lazily opened file (open_features): yields (reader, input hashes)."""
    manifest, hashes = _input_hashes(backbone=backbone, manifest_path=manifest_path, weights_path=weights_path)
    with open_features(features_path) as reader:
        _check_inputs(reader, backbone=backbone, manifest_path=manifest_path, weights_path=weights_path,
                      manifest=manifest, hashes=hashes)
        yield reader, hashes
