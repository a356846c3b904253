"""Extract stage: run each frozen backbone once per image into a resumable, incremental HDF5 cache.

`python -m stages.extract --backbone NAME --raw data/raw --manifest data/prepared/manifest.csv
 --weights models/pretrained/NAME.pth --out features/NAME.h5 --report reports/NAME/extract.json`

- The model is in `eval()` and runs under `torch.inference_mode()`; every layer in `extract.layers` comes
  from one forward pass (stages.backbones.FeatureModel). `extract.tta` views are averaged or kept as rows.
- Compute path: CUDA with autocast, pinned memory and non_blocking copies when present; on CPU the fastest
  of fp32 contiguous, fp32 channels_last and (only where the CPU has native bf16/fp16 instructions)
  low-precision autocast, chosen by a short measurement on real images, then the torch thread count
  (all cores, or half of them when the CPU is shared and that measures faster), then torch.compile where
  the remaining work is long enough for it to pay. `extract.precision` / `extract.compile` force a choice.
  Decoding runs in DataLoader workers where spare cores exist (see auto_num_workers).
- Rows are content-addressed: keyed by the image's sha256 and the provenance that changes values
  (`provenance_key`). Rows already in the previous output or in the work file with the same key are
  reused; only new images run through the backbone; images no longer in the manifest drop out.
- Resumable: computed rows are appended batch by batch to `.<out name>.work` beside the output (an
  append-only log of checksummed records, fsynced per batch). After a crash (even kill -9) the next run
  reuses those rows and continues with the same batches, so the final file is byte-identical to an
  uninterrupted run. The final file is written in manifest order, `track_times=False`, and renamed into
  place atomically; the work file is then removed.
- Trusted reuse: the previous output is reused only when its sha256 equals `features_sha256` in the previous
  report (`--report`, kept by `persist: true`); an edited, unreported or unreadable file is recomputed.
- One writer per output: an exclusive advisory lock (`.<out name>.lock` beside the output, holding the PID)
  is held for the whole run; a second extract on the same output fails at once, naming the holder.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import os
import platform
import struct
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn

from stages.backbones import Backbone, Preprocess, build_feature_model, get_backbone, module_version
from stages.images import ImageDecodeError, ManifestRow, eval_dataset, read_manifest
from stages.io import atomic_path, progress, read_json, setup_logging, sha256_file, write_json
from stages.hardware import DTYPES, NATIVE_FLAGS, read_cpu_capability
from stages.params import ExtractParams, ParamError, load_params

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
WORK_MAGIC = b"EXTRACT-WORK\x00\x01\n"
COMPILE_TRIAL_MIN_S = 60.0  # auto: try torch.compile only when the remaining work is estimated longer
PROBE_IMAGES = 8  # images per warm-up and probe run of each candidate, and per thread-count run
CHUNK_BYTES = 1 << 20  # HDF5 chunk size target for feature rows



class ExtractError(RuntimeError):
    """Inputs to the extract stage are missing or inconsistent; the message says which and how to fix it."""


def auto_num_workers(device: str, cores: int) -> int:
    """DataLoader workers for `extract.num_workers: auto`.

    CPU with 1-2 cores: none. The model's threads already keep both cores busy, so a decode worker only
    steals from them (measured on a 2-core EPYC, efficientnet_lite0, 398 images: bf16 98 images/s without
    a worker vs 75 with one; fp32 44 vs 41). More cores: a quarter of them decode (decode is ~15-25% of
    the per-image cost on CPU) while the model computes. CUDA: decode is the bottleneck, all but one core.
    """
    if device == "cuda":
        return max(1, min(cores - 1, 16))
    return 0 if cores <= 2 else max(1, cores // 4)


# ------------------------------------------------------------------------------------ compute paths
@dataclass(frozen=True)
class ComputePath:
    """How the backbone runs: device, autocast precision, memory format, torch.compile."""
    device: str  # "cpu" | "cuda"
    precision: str  # "float32" | "bfloat16" | "float16"
    channels_last: bool
    compile: bool = False

    @property
    def name(self) -> str:
        parts = [self.device, self.precision, "channels_last" if self.channels_last else "contiguous"]
        return "+".join(parts + (["compile"] if self.compile else []))

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_device(requested: str) -> str:
    """`extract.device` -> "cuda" or "cpu"; asking for CUDA without one fails clearly."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ParamError("extract.device is 'cuda' but torch sees no CUDA device; "
                         "use `device: auto` or `device: cpu`.")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def fix_cuda_algorithms() -> None:
    """Fixed cuDNN algorithms and no TF32, so that a resumed run (or another engine) gives the same bytes."""
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.allow_tf32 = False  # float32 means float32
    torch.backends.cuda.matmul.allow_tf32 = False


def candidate_paths(device: str, precision: str, capability: dict[str, Any]) -> tuple[list[ComputePath], list[str]]:
    """Eager (uncompiled) paths worth measuring, and notes on what was left out and why.

    CPU, `precision: auto`: fp32 channels_last and contiguous, plus bf16/fp16 autocast only where the CPU
    has those instructions natively (emulated bf16 GEMM is many times slower than fp32). CUDA: fp32 and
    AMP (bf16 where supported, else fp16), channels_last. A forced precision is used as given.
    The order is the preference order for near-ties (see choose_path).
    """
    notes: list[str] = []
    if device == "cuda":
        amp = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        precisions = ["float32", amp] if precision == "auto" else [precision]
        return [ComputePath("cuda", p, True) for p in precisions], notes
    if precision == "auto":
        precisions = ["float32"]
        for low in ("bfloat16", "float16"):
            if capability[f"native_{low}"]:
                precisions.append(low)
            else:
                notes.append(f"{low} left out: the CPU has none of {', '.join(NATIVE_FLAGS[low])}")
    else:
        precisions = [precision]
        if precision != "float32" and not capability[f"native_{precision}"]:
            notes.append(f"{precision} forced by extract.precision although the CPU has no native "
                         f"{precision} instructions: expect it to be slower than float32")
            logger.warning(notes[-1])
    paths = [ComputePath("cpu", p, cl) for p in precisions for cl in (True, False)]
    return paths, notes


def set_memory_format(model: nn.Module, path: ComputePath) -> nn.Module:
    """Move the model to the path's device and memory format (in place; returns it)."""
    fmt = torch.channels_last if path.channels_last else torch.contiguous_format
    return model.to(device=path.device, memory_format=fmt)


def forward_features(model: Callable[[torch.Tensor], dict[str, torch.Tensor]], images: torch.Tensor, *,
                     path: ComputePath, views: Sequence[str], pad_to: int | None = None) -> dict[str, np.ndarray]:
    """Run `images` [B, 3, H, W] (float32, normalized) through `model` once per TTA view.

    Returns {layer: float32 array [B, V, D]} (V = len(views); "hflip" mirrors the width axis).
    `pad_to`: zero-pad the batch to this many images (rows are independent in eval mode) so that a
    compiled model sees one shape and never recompiles for the last, smaller batch.
    Must be called under torch.inference_mode() with the model in eval mode.
    """
    n = images.shape[0]
    if pad_to and n < pad_to:
        images = torch.cat([images, images.new_zeros((pad_to - n, *images.shape[1:]))])
    images = images.to(path.device, non_blocking=True)
    per_view: list[dict[str, torch.Tensor]] = []
    for view in views:
        batch = images.flip(3) if view == "hflip" else images
        if path.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.autocast(path.device, dtype=DTYPES[path.precision], enabled=path.precision != "float32"):
            out = model(batch)
        per_view.append({layer: value[:n].float() for layer, value in out.items()})
    return {layer: torch.stack([v[layer] for v in per_view], dim=1).cpu().numpy() for layer in per_view[0]}


def _timed_forward(model: Callable, images: torch.Tensor, path: ComputePath, views: Sequence[str],
                   pad_to: int | None = None) -> tuple[float, dict[str, np.ndarray]]:
    start = time.perf_counter()
    out = forward_features(model, images, path=path, views=views, pad_to=pad_to)  # .cpu() syncs CUDA
    return time.perf_counter() - start, out


def measure_paths(model: nn.Module, batches: Sequence[torch.Tensor], candidates: Sequence[ComputePath], *,
                  views: Sequence[str]) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, np.ndarray]]]:
    """Time each candidate on real images (call under torch.inference_mode()).

    Each candidate runs a warm-up (lazy init, weight reorders, kernel JIT) and two timed runs on
    PROBE_IMAGES other images, in rounds interleaved across candidates so that a load spike from another
    process hits one run, not one candidate; the finalists (within 1.5x of the best) are then timed on a
    full batch, which decides between close candidates. A candidate's rate is its best run on the largest
    batch it ran. Returns ({path name: {"images_per_second", "runs": [{"images", "seconds"}]}},
    {path name: features of the warm-up images, {layer: float32 [P, V, D]}}).
    """
    images = torch.cat(list(batches))
    warm_up = images[:PROBE_IMAGES]
    probes = [images[-PROBE_IMAGES:], images[-2 * PROBE_IMAGES:-PROBE_IMAGES]]
    probes = [p for p in probes if p.shape[0]] or [warm_up]
    stats: dict[str, dict[str, Any]] = {p.name: {"runs": []} for p in candidates}
    outputs: dict[str, dict[str, np.ndarray]] = {}

    def timed(path: ComputePath, batch: torch.Tensor) -> None:
        set_memory_format(model, path)
        seconds, _ = _timed_forward(model, batch, path, views)
        entry = stats[path.name]
        entry["runs"].append({"images": int(batch.shape[0]), "seconds": round(seconds, 5)})
        largest = max(r["images"] for r in entry["runs"])
        entry["images_per_second"] = round(max(r["images"] / r["seconds"] for r in entry["runs"]
                                               if r["images"] == largest), 2)

    for path in candidates:
        set_memory_format(model, path)
        outputs[path.name] = _timed_forward(model, warm_up, path, views)[1]
    for probe in probes:
        for path in candidates:
            timed(path, probe)
    best = max(entry["images_per_second"] for entry in stats.values())
    finalists = [p for p in candidates if stats[p.name]["images_per_second"] * 1.5 >= best]
    if len(finalists) > 1 and batches[-1].shape[0] > PROBE_IMAGES:
        for path in finalists:
            timed(path, batches[-1])
    return stats, outputs


def choose_path(candidates: Sequence[ComputePath], rates: dict[str, float], *, to_compute: dict[str, int],
                margin: float = 0.1) -> ComputePath:
    """The candidate with the least estimated time `to_compute[precision] / images_per_second`.

    `to_compute[precision]` is the number of images that would run through the backbone with that
    precision: only the new ones when reusable rows of that precision exist, all of them otherwise.
    Candidates within `margin` of the best estimate count as equal and the earliest in `candidates`
    (the preference order of candidate_paths: float32 first, channels_last first) wins, so a lower
    precision is used only when it is clearly faster and measurement noise rarely flips the choice.
    """
    estimates = {p.name: to_compute[p.precision] / rates[p.name] for p in candidates}
    best = min(estimates.values())
    return next(p for p in candidates if estimates[p.name] <= best * (1 + margin))


def compare_features(reference: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per layer: max abs difference, max abs reference value, and min/mean cosine similarity per row."""
    result = {}
    for layer, ref in reference.items():
        a = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
        b = other[layer].reshape(-1, ref.shape[-1]).astype(np.float64)
        cosine = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
        result[layer] = {"max_abs_diff": float(np.abs(a - b).max()), "max_abs_value": float(np.abs(a).max()),
                         "min_cosine": float(cosine.min()), "mean_cosine": float(cosine.mean()),
                         "rows": int(a.shape[0])}
    return result


def compile_model(model: nn.Module) -> Callable:
    """torch.compile for inference: inductor with weight freezing (constant-folds and prepacks weights)."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    return torch.compile(model, dynamic=False)


# ------------------------------------------------------------------------------------ provenance
def dataset_preprocess(preprocess: Preprocess, normalization: str, stats_path: Path) -> Preprocess:
    """The backbone's preprocessing, with the dataset mean/std from stats.json when
    `prepare.normalization` is 'dataset'."""
    if normalization != "dataset":
        return preprocess
    try:
        stats = read_json(stats_path)
        mean, std = tuple(float(v) for v in stats["mean"]), tuple(float(v) for v in stats["std"])
    except FileNotFoundError:
        raise ExtractError(f"prepare.normalization is 'dataset' but {stats_path} does not exist; "
                           f"run `dvc repro prepare` first.") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ExtractError(f"{stats_path}: expected {{\"mean\": [r, g, b], \"std\": [r, g, b]}}; "
                           f"could not read it ({exc}). Re-run `dvc repro prepare`.") from None
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ExtractError(f"{stats_path}: expected 3 means and 3 positive stds; got mean={mean}, std={std}")
    return dataclasses.replace(preprocess, mean=mean, std=std)


def provenance_key(*, backbone: str, weights_sha256: str, preprocess: Preprocess, layers: Sequence[str],
                   precision: str, params: ExtractParams) -> dict[str, Any]:
    """Everything that changes a row's values besides the image bytes; rows are reused only on equality."""
    return {"backbone": backbone, "weights_sha256": weights_sha256, "preprocess": preprocess.as_dict(),
            "layers": list(layers), "precision": precision, "storage_dtype": params.storage_dtype,
            "tta": list(params.tta), "tta_mode": params.tta_mode}


def stored_views(key: dict[str, Any]) -> int:
    """Rows stored per image: one per TTA view in "rows" mode, else one."""
    return len(key["tta"]) if key["tta_mode"] == "rows" else 1


def _canonical(obj: Any) -> str:
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


def read_features_rows(path: Path) -> RowPool | None:
    """The rows of a previous features file, keyed by its provenance attributes; None when absent or
    unreadable (a warning says why: the file is then simply not reused)."""
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
    except Exception as exc:  # noqa: BLE001 - any unreadable file is simply not reused
        logger.warning("not reusing %s: %s: %s", path, type(exc).__name__, exc)
        return None
    pool = RowPool(key)
    pool.add(sha256s, {layer: values.reshape(len(sha256s), views, -1) for layer, values in features.items()})
    return pool


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


def work_path_for(out: Path) -> Path:
    return out.with_name(f".{out.name}.work")


def lock_path_for(out: Path) -> Path:
    return out.with_name(f".{out.name}.lock")


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[Path]:
    """Hold an exclusive, non-blocking flock on `.<out name>.lock` (beside `out`) for the block.

    A second holder (another extract on the same output, e.g. one left running after DVC's own lock was
    removed) makes this raise ExtractError at once, naming the holder's PID. The lock file holds this
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
            raise ExtractError(f"another extract is writing {out} (pid {holder}); wait for it or kill it "
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


# ------------------------------------------------------------------------------------ data loading
class EvalImages(torch.utils.data.Dataset):
    """The manifest's images through the project's one eval preprocessing (stages.images.eval_dataset),
    each file's bytes checked against the manifest sha256 first. Items: (image [3, H, W], index)."""

    def __init__(self, raw: Path, rows: Sequence[ManifestRow], preprocess: Preprocess) -> None:
        self.raw, self.rows = Path(raw), list(rows)
        self.images = eval_dataset(raw, [r.path for r in self.rows], [r.label for r in self.rows], preprocess)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = self.rows[index]
        path = self.raw / row.path
        try:
            actual = sha256_file(path)
        except OSError as exc:
            raise ExtractError(f"{path}: cannot read it ({exc}); re-run `dvc repro prepare`.") from None
        if actual != row.sha256:
            raise ExtractError(f"{path} changed since prepare: manifest sha256 {row.sha256}, file {actual}; "
                               f"re-run `dvc repro prepare`.")
        try:
            image, _, _ = self.images[index]
        except ImageDecodeError as exc:
            raise ExtractError(f"{path}: {exc}") from None
        return image, index


def make_loader(dataset: torch.utils.data.Dataset, *, batch_size: int, num_workers: int,
                device: str) -> torch.utils.data.DataLoader:
    """In-order batches; workers decode and preprocess while the model computes."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=device == "cuda", prefetch_factor=4 if num_workers else None,
        persistent_workers=False)


def extract_features(model: Callable, loader: torch.utils.data.DataLoader, *, path: ComputePath,
                     views: Sequence[str]) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Yield (dataset indices [B], {layer: float32 features [B, V, D]}) per batch, in order.
    The caller holds torch.inference_mode() and has put the model in eval mode."""
    pad_to = loader.batch_size if path.compile else None
    for images, indices in loader:
        yield indices.numpy(), forward_features(model, images, path=path, views=views, pad_to=pad_to)


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
def write_features(out: Path, *, rows: Sequence[ManifestRow], pool: RowPool, attrs: dict[str, Any]) -> None:
    """Write features/<backbone>.h5 in manifest order, atomically, with `track_times=False` everywhere
    so that the same rows and attributes give the same bytes. Rows per image: V' (see stored_views)."""
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
        for name, value in attrs.items():
            h5.attrs[name] = value
        h5.flush()
        image = h5.id.get_file_image()
    with atomic_path(out, suffix=".h5") as tmp:
        tmp.write_bytes(image)


def file_attributes(*, key: dict[str, Any], n_images: int, manifest_sha256: str,
                    classes: Sequence[str]) -> dict[str, Any]:
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
        "n_images": n_images,
        "manifest_sha256": manifest_sha256,
        "classes": json.dumps(list(classes)),
        "versions": json.dumps(versions, sort_keys=True),
        "tta": json.dumps(key["tta"]),
        "tta_mode": key["tta_mode"],
    }


# ------------------------------------------------------------------------------------ path selection
def choose_threads(model: nn.Module, images: torch.Tensor, path: ComputePath, *, cores: int,
                   views: Sequence[str], margin: float = 0.1) -> tuple[int, dict[str, float]]:
    """torch threads: all cores, unless half of them measures more than `margin` faster on `images`.

    On a CPU shared with other processes a full-width OpenMP team stalls at every barrier waiting for a
    descheduled thread (measured: 2 threads 5-10x slower than 1 on a loaded 2-core machine); on a quiet
    machine all cores win. Returns (threads, {threads: images/s}) and leaves torch set to the choice.
    """
    options = [cores, max(1, cores // 2)]
    rates = dict.fromkeys(options, 0.0)
    set_memory_format(model, path)
    for timed in (False, True, True):  # a warm-up round, then two timed rounds, interleaved
        for threads in options:
            torch.set_num_threads(threads)
            seconds, _ = _timed_forward(model, images, path, views)
            if timed:
                rates[threads] = max(rates[threads], images.shape[0] / seconds)
    best = max(rates.values())
    chosen = next(t for t in options if rates[t] * (1 + margin) >= best)
    torch.set_num_threads(chosen)
    return chosen, {str(t): round(r, 2) for t, r in rates.items()}


def select_path(model: nn.Module, candidates: Sequence[ComputePath], batches: Sequence[torch.Tensor], *,
                to_compute: dict[str, int], compile_mode: str, views: Sequence[str], cores: int,
                batch_size: int) -> tuple[ComputePath, Callable | None, dict[str, Any]]:
    """Pick threads and the compute path by measurement on real `batches` (under torch.inference_mode()).

    Candidates whose precision has nothing left to compute win outright (only they are measured, for
    the report); otherwise every candidate is measured and `choose_path` weighs speed against the rows
    each precision could reuse. A plain fp32 eager reference is measured too when a lower precision is in
    play, and the chosen path's features are compared with it. The thread count is chosen first
    (`choose_threads`, on the first candidate) and torch.compile is tried last (`try_compile`).
    Returns (path, compiled module or None, report section).
    """
    finished = [c for c in candidates if to_compute[c.precision] == 0]
    viable = finished or list(candidates)
    selection: dict[str, Any] = {"measurements": {}, "precision_check": None}
    if cores > 1 and not finished:  # first, so that the candidates are compared at the threads they get
        probe = batches[-1][:PROBE_IMAGES]
        threads, thread_rates = choose_threads(model, probe, viable[0], cores=cores, views=views)
        selection["threads"] = {"chosen": threads, "images_per_second": thread_rates, "path": viable[0].name,
                                "images": int(probe.shape[0])}
    reference = ComputePath(viable[0].device, "float32", False)
    measured = list(viable)
    if reference not in measured and any(c.precision != "float32" for c in viable):
        measured.append(reference)
    if len(measured) == 1 and not finished:
        path = viable[0]
        selection["reason"] = "the only candidate"
    else:
        selection["measurements"], outputs = measure_paths(model, batches, measured, views=views)
        rates = {name: m["images_per_second"] for name, m in selection["measurements"].items()}
        path = choose_path(viable, rates, to_compute=to_compute)
        selection["reason"] = ("every row is reused at this precision; the first of the fastest" if finished
                               else "least estimated time: images to compute / measured images per second")
        if path.precision != "float32":
            selection["precision_check"] = compare_features(outputs[reference.name], outputs[path.name])
    rate = selection["measurements"].get(path.name, {}).get("images_per_second")
    path, compiled, trial = try_compile(model, path, batches, mode=compile_mode, eager_rate=rate,
                                        n_todo=to_compute[path.precision], views=views, batch_size=batch_size)
    check = trial.pop("precision_check", None)
    if compiled is not None:
        selection["precision_check"] = check
    selection["compile"] = trial
    return path, compiled, selection


def try_compile(model: nn.Module, path: ComputePath, batches: Sequence[torch.Tensor], *, mode: str,
                eager_rate: float | None, n_todo: int, views: Sequence[str], batch_size: int
                ) -> tuple[ComputePath, Callable | None, dict[str, Any]]:
    """torch.compile the chosen path: always with `compile: on`; with `auto` only when the remaining work
    (`n_todo` / `eager_rate`) is estimated to take longer than COMPILE_TRIAL_MIN_S; kept when it measures
    >= 5% faster than eager on the same full batch.

    Batches are zero-padded to `batch_size`, as in the extraction loop (one compiled shape). The trial's
    "precision_check" compares compiled features with plain eager fp32 (constant folding changes bits).
    """
    if mode == "off":
        return path, None, {"tried": False, "reason": "extract.compile is off"}
    if n_todo == 0:
        return path, None, {"tried": False, "reason": "nothing to compute"}
    estimate = n_todo / eager_rate if eager_rate else 0.0
    if mode == "auto" and estimate < COMPILE_TRIAL_MIN_S:
        return path, None, {"tried": False, "reason": f"estimated remaining work {estimate:.1f} s < "
                                                      f"{COMPILE_TRIAL_MIN_S:.0f} s: compiling cannot pay"}
    batch = batches[0]
    reference_path = ComputePath(path.device, "float32", False)
    set_memory_format(model, reference_path)
    reference = forward_features(model, batch, path=reference_path, views=views)
    set_memory_format(model, path)
    eager_seconds, _ = _timed_forward(model, batch, path, views, pad_to=batch_size)
    target = dataclasses.replace(path, compile=True)
    start = time.perf_counter()
    try:
        compiled = compile_model(model)
        _, first = _timed_forward(compiled, batch, target, views, pad_to=batch_size)  # compiles
    except Exception as exc:  # noqa: BLE001 - no C compiler, unsupported op, ...
        logger.warning("torch.compile failed (%s: %s); running eager", type(exc).__name__, exc)
        return path, None, {"tried": True, "kept": False, "error": f"{type(exc).__name__}: {exc}"}
    compile_seconds = time.perf_counter() - start
    compiled_seconds, _ = _timed_forward(compiled, batch, target, views, pad_to=batch_size)
    rate, eager = batch.shape[0] / compiled_seconds, batch.shape[0] / eager_seconds
    trial = {"tried": True, "compile_seconds": round(compile_seconds, 2), "images_per_second": round(rate, 2),
             "eager_images_per_second": round(eager, 2), "images": int(batch.shape[0]),
             "precision_check": compare_features(reference, first)}
    trial["kept"] = mode == "on" or rate > 1.05 * eager
    return (target, compiled, trial) if trial["kept"] else (path, None, trial)


# ------------------------------------------------------------------------------------ the stage
def unique_by_sha(rows: Sequence[ManifestRow]) -> list[ManifestRow]:
    """First manifest row of each distinct image content, in manifest order."""
    seen: set[str] = set()
    return [r for r in rows if not (r.sha256 in seen or seen.add(r.sha256))]


def gather_reusable(key: dict[str, Any], shas: set[str], *, previous: RowPool | None,
                    work_header: dict[str, Any] | None, work_chunks: Sequence[tuple[list[str], list[np.ndarray]]]
                    ) -> tuple[RowPool, dict[str, int]]:
    """Rows for the images `shas` computed earlier with provenance `key`: from the previous output and
    from the work file of an interrupted run. Returns (pool, {"features": n, "work_file": n})."""
    pool, counts = RowPool(key), {"features": 0, "work_file": 0}
    if previous is not None and _canonical(previous.key) == _canonical(key):
        for sha in shas & previous.rows.keys():
            pool.rows[sha] = previous.rows[sha]
            counts["features"] += 1
    if work_header is not None and _canonical(work_header["key"]) == _canonical(key):
        for sha256s, arrays in work_chunks:
            for i, sha in enumerate(sha256s):
                if sha in shas and sha not in pool:
                    pool.rows[sha] = {layer: arrays[j][i] for j, layer in enumerate(key["layers"])}
                    counts["work_file"] += 1
    return pool, counts


@dataclass(frozen=True)
class StageInputs:
    """What both engines (local here, ray in stages/extract_ray.py) read before computing anything."""
    rows: list[ManifestRow]  # the manifest, in its order
    unique: list[ManifestRow]  # the first row of each distinct image content (unique_by_sha)
    classes: list[str]
    preprocess: Preprocess  # the backbone's, with the dataset mean/std under prepare.normalization: dataset
    weights_sha256: str
    layers: tuple[str, ...]

    @property
    def shas(self) -> set[str]:
        return {r.sha256 for r in self.unique}


def read_inputs(*, backbone: Backbone, weights: Path, manifest: Path, params: ExtractParams,
                normalization: str) -> StageInputs:
    """Read the manifest, classes.json beside it, the preprocessing and the weight file's sha256."""
    rows = read_manifest(manifest)
    if not rows:
        raise ExtractError(f"{manifest} lists no images; nothing to extract.")
    classes_path = manifest.parent / "classes.json"
    if not classes_path.exists():
        raise ExtractError(f"{classes_path} not found beside the manifest; run `dvc repro prepare`.")
    preprocess = dataset_preprocess(backbone.preprocess, normalization, manifest.parent / "stats.json")
    if not Path(weights).is_file():
        raise ExtractError(f"weight file {weights} not found; run `dvc repro weights@{backbone.name}` first.")
    return StageInputs(rows=rows, unique=unique_by_sha(rows), classes=list(read_json(classes_path)),
                       preprocess=preprocess, weights_sha256=sha256_file(weights), layers=tuple(params.layers))


@dataclass
class Reusable:
    """Rows computed earlier: the previous output (persist: true) and an interrupted run's work file."""
    previous: RowPool | None
    work: WorkLog
    header: dict[str, Any] | None  # the work file's header, when it was written with one of the keys
    pools: dict[str, tuple[RowPool, dict[str, int]]]  # per precision: (pool, {"features": n, "work_file": n})


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


def read_reusable(out: Path, keys: dict[str, dict[str, Any]], shas: set[str], *,
                  report: Path | None = None) -> Reusable:
    """The reusable rows for each candidate precision's provenance key `keys[precision]`.

    `report`: the previous run's extract.json; the previous output is reused only when it matches the
    sha256 recorded there (previous_output_trusted). None: the caller vouches for `out` (not checked).
    The work file's records carry their own checksums.
    """
    trusted = not out.exists() or report is None or previous_output_trusted(out, report)
    previous = read_features_rows(out) if trusted else None
    work = WorkLog(work_path_for(out))
    header, chunks = work.read()
    if header is not None and (header.get("format_version") != FORMAT_VERSION or
                               _canonical(header["key"]) not in {_canonical(k) for k in keys.values()}):
        logger.info("%s was written with other settings; not reusing it", work.path)
        header, chunks = None, []
    pools = {p: gather_reusable(key, shas, previous=previous, work_header=header, work_chunks=chunks)
             for p, key in keys.items()}
    return Reusable(previous=previous, work=work, header=header, pools=pools)


def write_output(out: Path, *, inputs: StageInputs, manifest: Path, pool: RowPool, work: WorkLog) -> None:
    """Write the features file from `pool` (every image's row), then remove the work file."""
    attrs = file_attributes(key=pool.key, n_images=len(inputs.rows), manifest_sha256=sha256_file(manifest),
                            classes=inputs.classes)
    write_features(out, rows=inputs.rows, pool=pool, attrs=attrs)
    work.remove()


def row_counts(inputs: StageInputs, *, pool: RowPool, computed: int, reused_from: dict[str, int],
               previous: RowPool | None) -> dict[str, Any]:
    """The report's row bookkeeping (both engines): rows written, computed, reused (and from where), dropped."""
    return {
        "n_images": len(inputs.rows),
        "rows": len(inputs.rows) * stored_views(pool.key),
        "computed": computed,
        "reused": len(inputs.unique) - computed,
        "reused_from": reused_from,
        "dropped": len(previous.rows.keys() - inputs.shas) if previous is not None else 0,
        "duplicates": len(inputs.rows) - len(inputs.unique),
    }


def extract(*, backbone: Backbone, weights: Path, raw: Path, manifest: Path, out: Path,
            params: ExtractParams, normalization: str = "backbone", report: Path | None = None,
            on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run the whole stage: write `out` (and remove its work file); return the extract.json report.

    Holds `output_lock(out)` throughout. `report`: the previous run's extract.json, whose features_sha256
    the previous output must match to be reused (see read_reusable; None: not checked).
    `extract.engine: ray` hands the same job to stages.extract_ray (same rows, file and report keys).

    `on_batch(k)` is called after the k-th computed batch is durably in the work file (tests use it to
    simulate a crash).
    """
    with output_lock(out):
        if params.engine == "ray":
            from stages.extract_ray import extract_ray  # Ray is an optional extra: imported only when asked for

            return extract_ray(backbone=backbone, weights=weights, raw=raw, manifest=manifest, out=out,
                               params=params, normalization=normalization, previous_report=report,
                               on_batch=on_batch)
        return _extract_local(backbone=backbone, weights=weights, raw=raw, manifest=manifest, out=out,
                              params=params, normalization=normalization, previous_report=report,
                              on_batch=on_batch)


def _extract_local(*, backbone: Backbone, weights: Path, raw: Path, manifest: Path, out: Path,
                   params: ExtractParams, normalization: str, previous_report: Path | None,
                   on_batch: Callable[[int], None] | None) -> dict[str, Any]:
    """extract() on this machine (the caller holds the output lock)."""
    stage_start = time.perf_counter()
    inputs = read_inputs(backbone=backbone, weights=weights, manifest=manifest, params=params,
                         normalization=normalization)
    rows, unique, shas = inputs.rows, inputs.unique, inputs.shas
    preprocess, weights_sha256, layers = inputs.preprocess, inputs.weights_sha256, inputs.layers

    device = resolve_device(params.device)
    capability = read_cpu_capability()
    cores = capability["cores"] if device == "cpu" else 1
    if device == "cuda":
        fix_cuda_algorithms()
    torch.set_num_threads(capability["cores"])
    num_workers = (auto_num_workers(device, capability["cores"]) if params.num_workers == "auto"
                   else params.num_workers)
    candidates, notes = candidate_paths(device, params.precision, capability)

    # Reusable rows, per candidate precision: the previous output (persist: true) and the work file.
    keys = {c.precision: provenance_key(backbone=backbone.name, weights_sha256=weights_sha256,
                                        preprocess=preprocess, layers=layers, precision=c.precision,
                                        params=params) for c in candidates}
    reusable = read_reusable(out, keys, shas, report=previous_report)
    previous, work, header, pools = reusable.previous, reusable.work, reusable.header, reusable.pools
    to_compute = {p: len(unique) - len(pool) for p, (pool, _) in pools.items()}

    # The compute path: an interrupted run's (same batches, same bytes), else measured.
    resumed = ComputePath(**header["path"]) if header is not None else None
    if resumed is not None and dataclasses.replace(resumed, compile=False) not in candidates:
        resumed = None
    model = build_feature_model(backbone, weights, layers)
    bn_before = _bn_state(model)
    compiled: Callable | None = None
    with torch.inference_mode():
        if resumed is not None:
            path = resumed
            torch.set_num_threads(header.get("threads", capability["cores"]))
            selection: dict[str, Any] = {"reason": f"resumed the interrupted run's path ({work.path.name})",
                                         "measurements": {}, "precision_check": None}
        else:
            start = time.perf_counter()
            batches = _measurement_batches(raw, unique, preprocess, params.batch_size)
            path, compiled, selection = select_path(model, candidates, batches, to_compute=to_compute,
                                                    compile_mode=params.compile, views=params.tta, cores=cores,
                                                    batch_size=params.batch_size)
            selection["seconds"] = round(time.perf_counter() - start, 3)
        selection = {"candidates": [c.name for c in candidates], "notes": notes, **selection}
        if compiled is None:
            set_memory_format(model, path)
        if path.compile and compiled is None:  # resuming a compiled path
            compiled = compile_model(model)
        runner = compiled if compiled is not None else model

        pool, reused_from = pools[path.precision]
        todo = [r for r in unique if r.sha256 not in pool]
        logger.info("%s: %d images, %d reused (%d from %s, %d from the work file), %d to compute with %s, "
                    "%d threads, %d workers", backbone.name, len(rows), len(pool), reused_from["features"],
                    out.name, reused_from["work_file"], len(todo), path.name, torch.get_num_threads(), num_workers)
        compute_seconds = 0.0
        if todo:
            work.open({"format_version": FORMAT_VERSION, "key": pool.key, "path": path.as_dict(),
                       "batch_size": params.batch_size, "threads": torch.get_num_threads()},
                      resume=resumed is not None)
            loader = make_loader(EvalImages(raw, todo, preprocess), batch_size=params.batch_size,
                                 num_workers=num_workers, device=device)
            start = time.perf_counter()
            try:
                with progress(total=len(todo), unit="img", desc=f"extract {backbone.name}") as bar:
                    batches_done = extract_features(runner, loader, path=path, views=params.tta)
                    for k, (indices, features) in enumerate(batches_done, start=1):
                        sha256s = [todo[i].sha256 for i in indices]
                        arrays = to_storage(features, layers, tta_mode=params.tta_mode,
                                            storage_dtype=params.storage_dtype)
                        work.append(sha256s, arrays)
                        pool.add(sha256s, dict(zip(layers, arrays)))
                        bar.update(len(indices))
                        if on_batch is not None:
                            on_batch(k)
            finally:
                work.close()  # what was appended stays for the next run to resume from
            compute_seconds = time.perf_counter() - start
    if _bn_state(model) != bn_before:
        raise ExtractError("BatchNorm running statistics changed during extraction: the model was not in "
                           "eval mode.")

    write_output(out, inputs=inputs, manifest=manifest, pool=pool, work=work)

    measured = selection["measurements"].get(path.name)
    if todo:
        images, seconds, source = len(todo), compute_seconds, "extraction: decode + forward"
    elif measured:
        fastest = max(measured["runs"], key=lambda r: r["images"] / r["seconds"])
        images, seconds = fastest["images"], fastest["seconds"]
        source = "measurement on a real batch (forward only): every row was reused"
    else:
        images, seconds, source = 0, 0.0, "none: every row was reused"
    report = {
        "backbone": backbone.name,
        "images": images,
        "seconds": round(seconds, 4),
        "images_per_second": round(images / seconds, 2) if seconds else None,
        "throughput_source": source,
        **row_counts(inputs, pool=pool, computed=len(todo), reused_from=reused_from, previous=previous),
        "stage_seconds": round(time.perf_counter() - stage_start, 3),
        "engine": "local",
        "device": device,
        "precision": path.precision,
        "storage_dtype": params.storage_dtype,
        "batch_size": params.batch_size,
        "compile": path.compile,
        "channels_last": path.channels_last,
        "path": path.name,
        "torch_threads": torch.get_num_threads(),
        "num_workers": num_workers,
        "layers": list(layers),
        "feature_dims": {layer: int(next(iter(pool.rows.values()))[layer].shape[-1]) for layer in layers},
        "tta": list(params.tta),
        "tta_mode": params.tta_mode,
        "selection": selection,
        "cpu": capability,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "weights_sha256": weights_sha256,
        "features_sha256": sha256_file(out),
    }
    logger.info("%s: wrote %s (%d rows): computed %d, reused %d, dropped %d%s", backbone.name, out,
                report["rows"], report["computed"], report["reused"], report["dropped"],
                f"; {report['images_per_second']} images/s" if report["images_per_second"] else "")
    return report


def _bn_state(model: nn.Module) -> list[bytes]:
    """Bytes of every BatchNorm running statistic (to prove extraction left them unchanged)."""
    return [buffer.detach().cpu().numpy().tobytes() for name, buffer in model.named_buffers()
            if name.endswith(("running_mean", "running_var", "num_batches_tracked"))]


def _measurement_batches(raw: Path, rows: Sequence[ManifestRow], preprocess: Preprocess,
                         batch_size: int) -> list[torch.Tensor]:
    """Up to two real batches [B, 3, H, W] (decoded in this process) for timing the candidates."""
    dataset = EvalImages(raw, rows[: 2 * batch_size], preprocess)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return list(images.split(batch_size))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--raw", type=Path, required=True, help="the dataset tree (data/raw)")
    parser.add_argument("--manifest", type=Path, required=True, help="data/prepared/manifest.csv")
    parser.add_argument("--weights", type=Path, required=True, help="the verified weight file")
    parser.add_argument("--out", type=Path, required=True, help="features/<backbone>.h5")
    parser.add_argument("--report", type=Path, required=True, help="reports/<backbone>/extract.json")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        params = load_params(args.params)
        backbone = get_backbone(args.backbone, params.weights.custom)
        report = extract(backbone=backbone, weights=args.weights, raw=args.raw, manifest=args.manifest,
                         out=args.out, params=params.extract, normalization=params.prepare.normalization,
                         report=args.report)
    except (ExtractError, ParamError, KeyError, ValueError, OSError) as exc:
        print(f"extract: error: {exc}", file=sys.stderr)
        return 1
    write_json(args.report, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
