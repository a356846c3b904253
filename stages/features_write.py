"""The features/<bb>.h5 format, write side (the extract stage, whichever engine or cluster computed the rows).

Rows are content-addressed by image sha256 and `provenance_key` (everything besides the bytes that changes a value);
`read_reusable` gathers the rows of the previous output (only when its sha256 matches the previous report) and of an
interrupted run's work log (`WorkLog`, `.<name>.work`: checksummed, fsynced records); `record_batches` appends newly
computed batches to the log, then to the row pool; `write_features` writes the file in manifest order, atomically,
with `track_times=False` (same rows, same bytes); `output_lock` keeps a second writer out. The layout and its
readers are stages/features.py.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import platform
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from stages.backbones import Preprocess, module_version
from stages.features import CHUNK_BYTES, FORMAT_VERSION, LockError
from stages.images import ManifestRow
from stages.io import atomic_path, progress, read_json, sha256_file
from stages.params import ExtractParams

logger = logging.getLogger(__name__)

WORK_MAGIC = b"EXTRACT-WORK\x00\x01\n"


def provenance_key(*, backbone: str, weights_sha256: str, preprocess: Preprocess, layers: Sequence[str],
                   precision: str, params: ExtractParams) -> dict[str, Any]:
    """Everything that changes a row's values besides the image bytes; rows are reused only on equality."""
    return {"backbone": backbone, "weights_sha256": weights_sha256, "preprocess": preprocess.as_dict(),
            "layers": list(layers), "precision": precision, "storage_dtype": params.storage_dtype,
            "tta": list(params.tta), "tta_mode": params.tta_mode}


def augmented_key(key: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """The provenance of augmented rows: the main rows' key plus the augment spec."""
    return {**key, "augment": spec}


def stored_views(key: dict[str, Any]) -> int:
    """Rows stored per image: one per TTA view in "rows" mode, else one."""
    return len(key["tta"]) if key["tta_mode"] == "rows" else 1


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


# ------------------------------------------------------------------------------------ row pool
class RowPool:
    """Feature rows by image sha256, for one provenance key: {sha256: {layer: array [V, D]}}."""

    def __init__(self, key: dict[str, Any]) -> None:
        self.key = key
        self.rows: dict[str, dict[str, np.ndarray]] = {}

    def add(self, sha256s: Sequence[str], features: dict[str, np.ndarray]) -> None:
        """Add rows: `features` {layer: [B, V, D]} for the B images `sha256s`."""
        for i, sha in enumerate(sha256s):
            self.rows.setdefault(sha, {layer: values[i] for layer, values in features.items()})

    def __contains__(self, sha: str) -> bool:
        return sha in self.rows

    def __len__(self) -> int:
        return len(self.rows)


def read_rows(path: Path) -> tuple[RowPool, RowPool | None] | None:
    """The rows of a previous features file, keyed by its provenance attributes: (main rows, augmented rows or
    None when it has none); None when absent or unreadable (a warning says why: the file is then simply not
    reused)."""
    if not path.exists():
        return None
    try:
        with h5py.File(path, "r") as h5:
            attrs = h5.attrs
            key = {"backbone": str(attrs["backbone"]), "weights_sha256": str(attrs["weights_sha256"]),
                   "preprocess": json.loads(attrs["preprocess"]), "layers": json.loads(attrs["layers"]),
                   "precision": str(attrs["precision"]), "storage_dtype": str(attrs["storage_dtype"]),
                   "tta": json.loads(attrs["tta"]), "tta_mode": str(attrs["tta_mode"])}
            views = stored_views(key)
            sha256s = [s.decode() for s in h5["sha256"][::views]]
            features = {layer: h5[f"features/{layer}"][()] for layer in key["layers"]}
            spec = json.loads(attrs.get("augment", '{"views": 0}'))
            augmented = None
            if spec["views"] and "augmented_source" in h5:
                source = h5["augmented_source"][()][::spec["views"]]
                augmented = RowPool(augmented_key(key, spec))
                augmented.add([sha256s[i] for i in source],
                              {layer: h5[f"augmented/{layer}"][()].reshape(len(source), spec["views"], -1)
                               for layer in key["layers"]})
    except Exception as exc:  # noqa: BLE001 - any unreadable file is simply not reused
        logger.warning("not reusing %s: %s: %s", path, type(exc).__name__, exc)
        return None
    pool = RowPool(key)
    pool.add(sha256s, {layer: values.reshape(len(sha256s), views, -1) for layer, values in features.items()})
    return pool, augmented


class WorkLog:
    """Append-only, crash-safe record of computed rows beside the output (`.<name>.work`).

    Layout: WORK_MAGIC, then records `len (uint64 LE) | payload | sha256(payload)`. The first payload is
    a JSON header (provenance key, compute path, batch size); each further payload is an .npz of one
    batch: `sha256` [B] (S64) and `layer_<i>` [B, V, D] in the storage dtype. A torn last record (a
    kill during a write) fails its checksum and is cut off on the next open.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: io.BufferedWriter | None = None

    def read(self) -> tuple[dict[str, Any] | None, list[tuple[list[str], list[np.ndarray]]]]:
        """(header, [(sha256s, [layer arrays])]) of the intact records; (None, []) if absent or foreign."""
        if not self.path.exists():
            return None, []
        data = self.path.read_bytes()
        if not data.startswith(WORK_MAGIC):
            logger.warning("ignoring %s: not an extract work file", self.path)
            return None, []
        offset, payloads = len(WORK_MAGIC), []
        while offset + 8 <= len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            end = offset + 8 + length + 32
            payload = data[offset + 8: offset + 8 + length]
            if end > len(data) or hashlib.sha256(payload).digest() != data[end - 32: end]:
                logger.warning("%s: dropping a torn record at byte %d (interrupted write)", self.path, offset)
                break
            payloads.append(payload)
            offset = end
        self.valid_bytes = offset
        if not payloads:
            return None, []
        try:
            header = json.loads(payloads[0])
            chunks = []
            for payload in payloads[1:]:
                with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
                    chunks.append(([s.decode() for s in npz["sha256"]],
                                   [npz[f"layer_{i}"] for i in range(len(header["key"]["layers"]))]))
        except (ValueError, KeyError, TypeError, OSError) as exc:  # another format version
            logger.warning("ignoring %s: unreadable (%s: %s)", self.path, type(exc).__name__, exc)
            return None, []
        return header, chunks

    def open(self, header: dict[str, Any], *, resume: bool) -> None:
        """Start a new log with `header`, or (resume) append after the intact records of the existing one."""
        if resume:
            self._fh = open(self.path, "r+b")
            self._fh.seek(self.valid_bytes)
            self._fh.truncate()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "wb")
            self._fh.write(WORK_MAGIC)
            self._append(json.dumps(header, sort_keys=True).encode())

    def append(self, sha256s: Sequence[str], arrays: Sequence[np.ndarray]) -> None:
        """Durably record one batch: `arrays[i]` [B, V, D] for layer i."""
        buffer = io.BytesIO()
        np.savez(buffer, sha256=np.array(sha256s, dtype="S64"),
                 **{f"layer_{i}": a for i, a in enumerate(arrays)})
        self._append(buffer.getvalue())

    def _append(self, payload: bytes) -> None:
        assert self._fh is not None
        self._fh.write(struct.pack("<Q", len(payload)) + payload + hashlib.sha256(payload).digest())
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def work_path_for(out: Path, *, augmented: bool = False) -> Path:
    """The work file of the main rows (`.<name>.work`) or of the augmented rows (`.<name>.augmented.work`)."""
    return out.with_name(f".{out.name}{'.augmented' if augmented else ''}.work")


def lock_path_for(out: Path) -> Path:
    return out.with_name(f".{out.name}.lock")


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[Path]:
    """Hold an exclusive, non-blocking flock on `.<out name>.lock` (beside `out`) for the block.

    A second holder (another extract on the same output, e.g. one left running after DVC's own lock was
    removed) makes this raise LockError at once, naming the holder's PID. The lock file holds this
    process's PID and is removed (while still locked) on exit; one left by a kill is harmless, since the
    kernel releases the lock with the process.
    """
    path = lock_path_for(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockError(f"another extract is writing {out} (pid {holder}); wait for it or kill it "
                               f"(lock file {path})") from None
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)  # the previous holder removed the file between our open and flock: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        path.unlink(missing_ok=True)  # before unlocking, so that a waiter sees a changed inode and retries
        os.close(fd)


def to_storage(features: dict[str, np.ndarray], layers: Sequence[str], *, tta_mode: str,
               storage_dtype: str) -> list[np.ndarray]:
    """Per layer [B, V, D] float32 -> [B, V', D] in the storage dtype (V' = 1 when views are averaged)."""
    out = []
    for layer in layers:
        values = features[layer]
        if tta_mode == "average":
            values = values.mean(axis=1, keepdims=True, dtype=np.float32)
        out.append(values.astype(storage_dtype))
    return out


# ------------------------------------------------------------------------------------ output
def write_features(out: Path, *, rows: Sequence[ManifestRow], pool: RowPool, attrs: dict[str, Any],
                   augmented: RowPool | None = None) -> None:
    """Write features/<backbone>.h5 in manifest order, atomically, with `track_times=False` everywhere
    so that the same rows and attributes give the same bytes. Rows per image: V' (see stored_views).
    `augmented`: the train images' augmented views, written as augmented/<layer> and augmented_source."""
    key = pool.key
    views = stored_views(key)
    n_rows = len(rows) * views
    # Built in memory (HDF5 core driver), then written with plain file I/O: on a full disk HDF5 reports the failed
    # write while closing the file, where h5py only prints it and the process may crash; a Python write raises
    # OSError(ENOSPC) instead, and atomic_path keeps the previous file. The image is the same bytes as a file.
    with h5py.File(out.name, "w", driver="core", backing_store=False, track_order=False) as h5:
        group = h5.create_group("features", track_order=False)
        for layer in key["layers"]:
            values = np.stack([pool.rows[r.sha256][layer] for r in rows]).reshape(n_rows, -1)
            chunk_rows = max(1, min(n_rows, CHUNK_BYTES // max(1, values.shape[1] * values.itemsize)))
            group.create_dataset(layer, data=values, chunks=(chunk_rows, values.shape[1]),
                                 track_times=False)
        columns = {
            "labels": np.repeat(np.array([r.label for r in rows], dtype=np.int64), views),
            "split": np.repeat(np.array([r.split.encode() for r in rows], dtype="S5"), views),
            "sha256": np.repeat(np.array([r.sha256.encode() for r in rows], dtype="S64"), views),
            "path": np.repeat(np.array([r.path for r in rows], dtype=object), views),
        }
        if key["tta_mode"] == "rows":
            columns["view"] = np.tile(np.array([v.encode() for v in key["tta"]], dtype="S8"), len(rows))
        for name, values in columns.items():
            dtype = h5py.string_dtype("utf-8") if name == "path" else values.dtype
            h5.create_dataset(name, data=values, dtype=dtype, track_times=False)
        if augmented is not None:
            _write_augmented(h5, rows=rows, pool=augmented)
        for name, value in attrs.items():
            h5.attrs[name] = value
        h5.flush()
        image = h5.id.get_file_image()
    with atomic_path(out, suffix=".h5") as tmp:
        tmp.write_bytes(image)


def _write_augmented(h5: h5py.File, *, rows: Sequence[ManifestRow], pool: RowPool) -> None:
    """augmented/<layer> [M, D] and augmented_source [M] int64 (the manifest index of each row's image): the
    `views` rows of each train image in manifest order, view 0 first."""
    views = pool.key["augment"]["views"]
    train = [i for i, r in enumerate(rows) if r.split == "train"]
    h5.create_dataset("augmented_source", data=np.repeat(np.array(train, dtype=np.int64), views), track_times=False)
    group = h5.create_group("augmented", track_order=False)
    for layer in pool.key["layers"]:
        width = h5[f"features/{layer}"].shape[1]
        values = (np.stack([pool.rows[rows[i].sha256][layer] for i in train]).reshape(-1, width) if train
                  else np.zeros((0, width), dtype=pool.key["storage_dtype"]))
        chunk_rows = max(1, min(len(values), CHUNK_BYTES // max(1, width * values.itemsize)))
        group.create_dataset(layer, data=values, chunks=(chunk_rows, width) if len(values) else None,
                             track_times=False)


def file_attributes(*, key: dict[str, Any], n_images: int, manifest_sha256: str, classes: Sequence[str],
                    precision_reason: str, layer_aliases: dict[str, str], augment: dict[str, Any]) -> dict[str, Any]:
    """The provenance attributes of the features file (the contract in the project notes)."""
    versions = {name: module_version(name) for name in ("torch", "torchvision", "timm", "numpy", "h5py", "PIL")}
    versions["python"] = platform.python_version()
    return {
        "format_version": FORMAT_VERSION,
        "backbone": key["backbone"],
        "weights_sha256": key["weights_sha256"],
        "layers": json.dumps(key["layers"]),
        "preprocess": json.dumps(key["preprocess"]),
        "storage_dtype": key["storage_dtype"],
        "precision": key["precision"],
        "precision_reason": precision_reason,  # why that precision: params or hardware capability, never a timing
        "layer_aliases": json.dumps(layer_aliases, sort_keys=True),  # e.g. {"mid": "blocks.5"}
        "augment": json.dumps(augment, sort_keys=True),  # {"views": 0}: no augmented rows
        "n_images": n_images,
        "manifest_sha256": manifest_sha256,
        "classes": json.dumps(list(classes)),
        "versions": json.dumps(versions, sort_keys=True),
        "tta": json.dumps(key["tta"]),
        "tta_mode": key["tta_mode"],
    }


def gather_reusable(key: dict[str, Any], shas: set[str], *, previous: RowPool | None,
                    work_header: dict[str, Any] | None, work_chunks: Sequence[tuple[list[str], list[np.ndarray]]]
                    ) -> tuple[RowPool, dict[str, int]]:
    """Rows for the images `shas` computed earlier with provenance `key`: from the previous output and
    from the work file of an interrupted run. Returns (pool, {"features": n, "work_file": n})."""
    pool, counts = RowPool(key), {"features": 0, "work_file": 0}
    if previous is not None and canonical(previous.key) == canonical(key):
        for sha in shas & previous.rows.keys():
            pool.rows[sha] = previous.rows[sha]
            counts["features"] += 1
    if work_header is not None and canonical(work_header["key"]) == canonical(key):
        for sha256s, arrays in work_chunks:
            for i, sha in enumerate(sha256s):
                if sha in shas and sha not in pool:
                    pool.rows[sha] = {layer: arrays[j][i] for j, layer in enumerate(key["layers"])}
                    counts["work_file"] += 1
    return pool, counts


@dataclass
class RowSource:
    """Rows of one kind (main, or augmented views) for one provenance key: those reusable, and the work file
    that records the ones computed now."""
    pool: RowPool
    reused_from: dict[str, int]  # {"features": n, "work_file": n}
    work: WorkLog
    header: dict[str, Any] | None  # the work file's header, when it was written with this key


@dataclass
class Reusable:
    """Rows computed earlier: the previous output (persist: true) and an interrupted run's work files."""
    previous: RowPool | None  # the previous output's main rows (trusted ones only)
    main: RowSource
    augmented: RowSource | None  # None when extract.augment_views is 0


def previous_output_trusted(out: Path, report: Path) -> bool:
    """Whether the previous output `out` is the file the previous run wrote: its sha256 equals the
    `features_sha256` recorded in that run's report. A warning says why when it is not."""
    try:
        recorded = read_json(report).get("features_sha256")
    except FileNotFoundError:
        logger.warning("not reusing %s: no previous report %s records its sha256; recomputing its rows", out, report)
        return False
    except (OSError, ValueError, AttributeError) as exc:
        logger.warning("not reusing %s: previous report %s is unreadable (%s: %s); recomputing its rows",
                       out, report, type(exc).__name__, exc)
        return False
    if not recorded:
        logger.warning("not reusing %s: previous report %s has no features_sha256; recomputing its rows", out, report)
        return False
    actual = sha256_file(out)
    if actual != recorded:
        logger.warning("not reusing %s: its sha256 is %s but %s records %s (the file was changed after it was "
                       "written); recomputing its rows", out, actual, report, recorded)
        return False
    return True


def read_reusable(out: Path, key: dict[str, Any], shas: set[str], *, report: Path | None = None,
                  augmented_key: dict[str, Any] | None = None, augmented_shas: set[str] = frozenset()) -> Reusable:
    """The reusable rows for provenance `key` (images `shas`) and, with `augmented_key`, the augmented views of
    the images `augmented_shas`.

    `report`: the previous run's extract.json; the previous output is reused only when it matches the
    sha256 recorded there (previous_output_trusted). None: the caller vouches for `out` (not checked).
    The work files' records carry their own checksums.
    """
    trusted = not out.exists() or report is None or previous_output_trusted(out, report)
    previous_main, previous_augmented = (read_rows(out) if trusted else None) or (None, None)
    main = _row_source(WorkLog(work_path_for(out)), key, shas, previous_main)
    augmented = (None if augmented_key is None else
                 _row_source(WorkLog(work_path_for(out, augmented=True)), augmented_key, augmented_shas,
                             previous_augmented))
    return Reusable(previous=previous_main, main=main, augmented=augmented)


def _row_source(work: WorkLog, key: dict[str, Any], shas: set[str], previous: RowPool | None) -> RowSource:
    header, chunks = work.read()
    if header is not None and (header.get("format_version") != FORMAT_VERSION or
                               canonical(header["key"]) != canonical(key)):
        logger.info("%s was written with other settings; not reusing it", work.path)
        header, chunks = None, []
    pool, counts = gather_reusable(key, shas, previous=previous, work_header=header, work_chunks=chunks)
    return RowSource(pool=pool, reused_from=counts, work=work, header=header)


def record_batches(source: RowSource, batches: Iterable[tuple[Sequence[str], Sequence[np.ndarray]]], *,
                   header: dict[str, Any], resume: bool, total: int, desc: str,
                   on_batch: Callable[[], None] | None = None) -> float:
    """Consume computed `batches` (sha256s [B], per layer [B, V, D] in the storage dtype), each first durably
    appended to `source.work` (started with `header`, or continued with `resume`), then added to `source.pool`.
    Returns the seconds taken (the batches' computation included). The log stays for resuming on an error."""
    layers = source.pool.key["layers"]
    source.work.open(header, resume=resume)
    start = time.perf_counter()
    try:
        with progress(total=total, unit="img", desc=desc) as bar:
            for sha256s, arrays in batches:
                source.work.append(sha256s, arrays)
                source.pool.add(sha256s, dict(zip(layers, arrays)))
                bar.update(len(sha256s))
                if on_batch is not None:
                    on_batch()
    finally:
        source.work.close()
    return time.perf_counter() - start
