"""The features/<bb>.h5 format, read side: what the extract stage stores and every reader (head, audit) checks.

Layout (written by stages/extract.py; HDF5, `track_times=False`):
    features/<layer>          [N * V, D] float16 | float32: one row per manifest image (x V TTA views with
                              tta_mode "rows"), in manifest order
    labels [N * V] int64, split [N * V] str, sha256 [N * V] str, path [N * V] str
    augmented/<layer>         optional [M, D]: augmented training views (extract.augment_views)
    augmented_source          optional [M] int64: the manifest image each augmented row came from
    attrs                     backbone, weights_sha256, manifest_sha256, layers, layer_aliases ({"mid": ...}),
                              preprocess, classes, versions, tta, tta_mode, augment, storage_dtype, precision, ...
`read_features` loads a file and checks shapes, dtypes and finiteness (FeaturesError); `check_provenance`
checks that it was computed from this backbone, weight file and manifest (ProvenanceError).
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from stages.images import ManifestRow, read_manifest
from stages.io import sha256_file

JSON_ATTRS = ("layers", "preprocess", "classes", "versions", "tta", "layer_aliases", "augment")


class FeaturesError(RuntimeError):
    """A features file is missing, damaged, or does not fit the manifest; the message says which and how to fix it."""


class ProvenanceError(FeaturesError):
    """The features file was computed from another backbone, weight file or manifest."""


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


def read_features(path: str | Path, layers: Sequence[str] | None = None) -> FeatureFile:
    """Read `layers` (default: every stored layer) and the row arrays of a features file."""
    path = Path(path)
    try:
        handle = h5py.File(path, "r")
    except FileNotFoundError:
        raise FeaturesError(f"{path} does not exist; run `dvc repro extract` first") from None
    except OSError as exc:
        raise FeaturesError(f"{path} is not a readable HDF5 features file ({exc}); re-run `dvc repro extract`") from None
    with handle:
        attrs = {key: _decode_attr(value) for key, value in handle.attrs.items()}
        for key in JSON_ATTRS:
            if isinstance(attrs.get(key), str):
                attrs[key] = json.loads(attrs[key])
        missing = [name for name in ("features", "labels", "split", "sha256", "path") if name not in handle]
        if missing:
            raise FeaturesError(f"{path} lacks dataset(s) {', '.join(missing)}; re-run `dvc repro extract`")
        in_file = list(handle["features"].keys())
        declared = [layer for layer in attrs.get("layers") or [] if layer in in_file]
        stored = declared + [layer for layer in in_file if layer not in declared]  # extract.layers order
        wanted = list(layers) if layers is not None else stored
        absent = [layer for layer in wanted if layer not in stored]
        if absent:
            raise FeaturesError(f"head.layer(s) {absent} not in {path}, which holds {stored}; add them to "
                            f"extract.layers or set head.layer to a stored layer (params.yaml)")
        data = FeatureFile(
            path=path, features={layer: handle["features"][layer][()] for layer in wanted},
            labels=handle["labels"][()],
            split=_read_strings(handle["split"]), sha256=_read_strings(handle["sha256"]),
            paths=[str(p) for p in _read_strings(handle["path"])], attrs=attrs)
        if "augmented" in handle and "augmented_source" in handle:
            data = dataclasses.replace(
                data, augmented={layer: handle["augmented"][layer][()] for layer in wanted
                                 if layer in handle["augmented"]},
                augmented_source=handle["augmented_source"][()].astype(np.int64))
    check_arrays(data)
    return dataclasses.replace(data, labels=data.labels.astype(np.int64))


def check_arrays(data: FeatureFile) -> None:
    """Raise FeaturesError unless every array has the contract's shape and dtype: features/<layer> [N, D] in the
    file's storage_dtype (float16 | float32) and finite, labels [N] integer, split and sha256 [N]; N = rows of `path`."""
    def fail(what: str, found: Any, expected: str) -> None:
        raise FeaturesError(f"{data.path}: {what} is {found} but expected {expected}; the file is damaged or was not "
                        f"written by the extract stage. Delete it and re-run `dvc repro extract`.")

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
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
        if bad:
            fail(f"the number of NaN or infinite values in features/{layer}", bad, "0")
    m = len(data.augmented_source)
    for layer, values in data.augmented.items():
        width = data.features[layer].shape[1]
        if values.shape != (m, width) or not np.all(np.isfinite(values)):
            fail(f"augmented/{layer} (shape {values.shape}, all finite: {bool(np.all(np.isfinite(values)))})",
                 "inconsistent", f"finite values of shape ({m}, {width}): one row per augmented_source entry")
    if m and (data.augmented_source.min() < 0 or data.augmented_source.max() >= n):
        fail("the range of augmented_source", [int(data.augmented_source.min()), int(data.augmented_source.max())],
             f"image indices in [0, {n})")


def check_provenance(data: FeatureFile, *, backbone: str, weights_path: str | Path, weights_sha256: str,
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


def read_checked(features_path: Path, *, backbone: str, manifest_path: Path, weights_path: Path,
                 layers: Sequence[str] | None = None) -> tuple[FeatureFile, dict[str, str]]:
    """Read `layers` (default: all) of features_path and check its provenance against this manifest and weight
    file and that its classes name every label; returns (data, {"manifest_sha256", "weights_sha256"})."""
    for path, hint in ((manifest_path, "dvc repro prepare"), (weights_path, f"dvc repro weights@{backbone}")):
        if not Path(path).is_file():
            raise FeaturesError(f"{path} does not exist; run `{hint}`")
    manifest = read_manifest(manifest_path)
    hashes = {"manifest_sha256": sha256_file(manifest_path), "weights_sha256": sha256_file(weights_path)}
    data = read_features(features_path, layers)
    check_provenance(data, backbone=backbone, weights_path=weights_path, manifest_path=manifest_path,
                     manifest=manifest, **hashes)
    classes = data.attrs.get("classes") or []
    if len(classes) < 2 or data.labels.max(initial=0) >= len(classes):
        raise FeaturesError(f"{features_path}: attribute classes {classes} does not name every label "
                            f"0..{data.labels.max(initial=0)}; re-run `dvc repro extract@{backbone}`")
    return data, hashes
