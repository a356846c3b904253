"""Extract stage: run each frozen backbone once per image into a resumable, incremental HDF5 cache.

`python -m stages.extract --backbone NAME --raw data/raw --manifest data/prepared/manifest.csv
 --weights models/pretrained/NAME.pth --out features/NAME.h5 --report reports/NAME/extract.json`

- The model is in `eval()` and runs under `torch.inference_mode()`; every layer in `extract.layers` comes
  from one forward pass (stages.backbones.FeatureModel). `mid` in extract.layers is the backbone's mid_layer
  (its last stage before the final one), stored under its real name (e.g. `blocks.5`); attr `layer_aliases`
  records {"mid": "blocks.5"}. `extract.tta` views are averaged or kept as rows.
- Preprocessing: the backbone's, at `extract.input_size` when set (resize = input_size / 0.875, as the registry);
  recorded in attr `preprocess`, which the head copies into the exported classifier (predict uses it).
- Numerics never depend on a stopwatch. The autocast precision comes from `extract.precision` or, with `auto`,
  from the hardware alone (choose_precision: CUDA -> its AMP dtype; CPU -> bf16 only with native bf16, else
  float32), recorded with its reason in the report and attr `precision_reason`. Timing then chooses only
  among numerics-neutral options at that precision: memory format (contiguous eager is the baseline; another
  wins only when measured >10% faster), the torch thread count (all cores, or half of them when the CPU is
  shared and that measures faster), and torch.compile where its compile time, charged against the images
  left, pays. Eager fp32 is always measured (the baseline at fp32; otherwise the reference reported beside
  the chosen path, with a feature comparison). CUDA runs with pinned memory and non_blocking copies.
  Decoding runs in DataLoader workers where spare cores exist (see auto_num_workers).
- Augmented training views (`extract.augment_views: N`, off at 0): each TRAIN image also gets N views
  (torchvision transforms.v2 RandomResizedCrop(input_size, scale=(0.35, 1.0)) + horizontal flip p=0.5, then the
  same scaling and normalization), each drawn with the seed sha256(f"{image sha256}:{view}") (view_seed), so a
  rerun, a resumed or an incremental run gives the same rows. They run through the backbone once each (no TTA)
  and are stored apart from the main rows, whose layout is unchanged: `augmented/<layer>` [M, D],
  `augmented_source` [M] int64 (the manifest index of each row's image; M = train rows x N, view 0 first)
  and attr `augment` (JSON: views, scale, ratio, hflip, seed rule; {"views": 0} when off). They are reused,
  resumed (`.<out name>.augmented.work`) and dropped like the main rows, keyed by image sha256.
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
import torchvision.transforms.v2 as T
from torch import nn

from stages.backbones import (Backbone, Preprocess, build_feature_model, get_backbone, input_size_for, module_version,
                              resolve_layers, with_input_size)
from stages.images import ImageDecodeError, ManifestRow, eval_dataset, load_rgb, read_manifest
from stages.io import atomic_path, progress, read_json, setup_logging, sha256_file, write_json
from stages.hardware import DTYPES, NATIVE_FLAGS, read_cpu_capability
from stages.params import ExtractParams, ParamError, load_params

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
WORK_MAGIC = b"EXTRACT-WORK\x00\x01\n"
COMPILE_TRIAL_MIN_S = 60.0  # auto: try torch.compile only when the remaining work is estimated longer
PROBE_IMAGES = 8  # images per warm-up and probe run of each candidate, and per thread-count run
CHUNK_BYTES = 1 << 20  # HDF5 chunk size target for feature rows
AUGMENT_SCALE = (0.35, 1.0)  # RandomResizedCrop area fraction of the augmented training views



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


def read_capability(device: str) -> dict[str, Any]:
    """What decides `precision: auto`: the CPU's instruction sets (stages.hardware) and, on CUDA, bf16 support."""
    capability = read_cpu_capability()
    if device == "cuda":
        capability["cuda_bf16"] = bool(torch.cuda.is_bf16_supported())
    return capability


def choose_precision(requested: str, *, device: str, capability: dict[str, Any]) -> tuple[str, str]:
    """The autocast precision and why: from `extract.precision` or the hardware alone, never from a timing,
    so the same params on the same machine always store the same dtype.

    auto: CUDA -> its AMP dtype (bf16 where supported, else fp16); CPU -> bf16 only where the CPU has native
    bf16 instructions (emulated bf16 is many times slower than fp32), else float32. Returns (precision,
    reason), e.g. ("bfloat16", "capability: avx512_bf16") or ("float32", "no native bf16: float32").
    """
    if requested != "auto":
        reason = f"params: extract.precision {requested}"
        if device == "cpu" and requested != "float32" and not capability[f"native_{requested}"]:
            reason += (f" (the CPU has none of {', '.join(NATIVE_FLAGS[requested])}: expect it to be slower "
                       f"than float32)")
            logger.warning(reason)
        return requested, reason
    if device == "cuda":
        if capability["cuda_bf16"]:
            return "bfloat16", "capability: cuda bf16 autocast"
        return "float16", "capability: cuda without bf16: float16 autocast"
    if capability["native_bfloat16"]:
        flag = next((f for f in NATIVE_FLAGS["bfloat16"] if capability.get(f)), NATIVE_FLAGS["bfloat16"][-1])
        return "bfloat16", f"capability: {flag}"
    return "float32", "no native bf16: float32"


def candidate_paths(device: str, precision: str) -> list[ComputePath]:
    """The eager paths worth measuring at `precision`: only numerics-neutral options (memory format) vary.

    The first, contiguous, is the baseline: another path is used only when it measures clearly faster
    (choose_path). torch threads and torch.compile are chosen afterwards, also at this precision.
    """
    return [ComputePath(device, precision, False), ComputePath(device, precision, True)]


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


def choose_path(candidates: Sequence[ComputePath], rates: dict[str, float], *, margin: float = 0.1) -> ComputePath:
    """The fastest of `candidates` (one precision: numerics-neutral options only) when it measures more than
    `margin` faster than the baseline `candidates[0]`, else the baseline, so a path is never chosen that
    measured slower than the baseline and measurement noise rarely flips the choice. `rates`: images/s."""
    if {c.precision for c in candidates} != {candidates[0].precision}:
        raise ValueError(f"candidates differ in precision: {[c.name for c in candidates]}; timing may only "
                         f"choose among numerics-neutral options")
    baseline = candidates[0]
    fastest = max(candidates, key=lambda c: rates[c.name])
    return fastest if rates[fastest.name] > rates[baseline.name] * (1 + margin) else baseline


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


def augment_spec(views: int) -> dict[str, Any]:
    """What the augmented training views are (attr `augment` of the features file, and part of their rows'
    provenance): `views` per train image, RandomResizedCrop scale/ratio, flip probability, the seed rule."""
    if views == 0:
        return {"views": 0}
    return {"views": views, "scale": list(AUGMENT_SCALE), "ratio": [3 / 4, 4 / 3], "hflip": 0.5,
            "seed": "torch.manual_seed(int.from_bytes(sha256(f'{image sha256}:{view}').digest()[:8], 'little'))",
            "transforms": f"torchvision {module_version('torchvision')} transforms.v2: RandomResizedCrop(input_size, "
                          f"scale, ratio, preprocess.interpolation, antialias=True), RandomHorizontalFlip(0.5), "
                          f"scale to [0, 1], Normalize(mean, std)"}


def augmented_key(key: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """The provenance of augmented rows: the main rows' key plus the augment spec."""
    return {**key, "augment": spec}


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


def read_features_rows(path: Path) -> tuple[RowPool, RowPool | None] | None:
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

    def check(self, index: int) -> None:
        """Raise ExtractError unless the file's bytes still have the manifest's sha256."""
        row = self.rows[index]
        path = self.raw / row.path
        try:
            actual = sha256_file(path)
        except OSError as exc:
            raise ExtractError(f"{path}: cannot read it ({exc}); re-run `dvc repro prepare`.") from None
        if actual != row.sha256:
            raise ExtractError(f"{path} changed since prepare: manifest sha256 {row.sha256}, file {actual}; "
                               f"re-run `dvc repro prepare`.")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        self.check(index)
        path = self.raw / self.rows[index].path
        try:
            image, _, _ = self.images[index]
        except ImageDecodeError as exc:
            raise ExtractError(f"{path}: {exc}") from None
        return image, index


def view_seed(sha256: str, view: int) -> int:
    """The RNG seed of augmented view `view` of the image with content `sha256`: the same on every run."""
    return int.from_bytes(hashlib.sha256(f"{sha256}:{view}".encode()).digest()[:8], "little")


def augment_transform(preprocess: Preprocess) -> T.Compose:
    """One augmented training view: PIL RGB -> float32 [3, input_size, input_size] (see augment_spec)."""
    return T.Compose([
        T.ToImage(),
        T.RandomResizedCrop(preprocess.input_size, scale=AUGMENT_SCALE, ratio=(3 / 4, 4 / 3),
                            interpolation=T.InterpolationMode(preprocess.interpolation), antialias=True),
        T.RandomHorizontalFlip(0.5),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(list(preprocess.mean), list(preprocess.std)),
    ])


class AugmentedImages(EvalImages):
    """`views` augmented views of each image, each drawn with its own seed (view_seed), so a view is the same
    whichever run, batch or worker computes it. Items: (views [A, 3, H, W], index)."""

    def __init__(self, raw: Path, rows: Sequence[ManifestRow], preprocess: Preprocess, *, views: int) -> None:
        super().__init__(raw, rows, preprocess)
        self.views, self.transform = views, augment_transform(preprocess)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = self.rows[index]
        self.check(index)
        try:
            image, _ = load_rgb(self.raw / row.path)  # full resolution: a crop may cover a third of the image
        except ImageDecodeError as exc:
            raise ExtractError(f"{self.raw / row.path}: {exc}") from None
        views = []
        for view in range(self.views):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(view_seed(row.sha256, view))
                views.append(self.transform(image))
        return torch.stack(views), index


def make_loader(dataset: torch.utils.data.Dataset, *, batch_size: int, num_workers: int,
                device: str) -> torch.utils.data.DataLoader:
    """In-order batches; workers decode and preprocess while the model computes."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=device == "cuda", prefetch_factor=4 if num_workers else None,
        persistent_workers=False)


def extract_features(model: Callable, loader: torch.utils.data.DataLoader, *, path: ComputePath,
                     views: Sequence[str], pad_to: int | None = None
                     ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Yield (dataset indices [B], {layer: float32 features [B, V, D]}) per batch, in order.

    Items of AugmentedImages ([B, A, 3, H, W]) run as B*A images of one forward pass each: V = A.
    `pad_to`: see forward_features (a compiled model). The caller holds torch.inference_mode() and has put
    the model in eval mode."""
    for images, indices in loader:
        if images.ndim == 5:
            b, a = images.shape[:2]
            out = forward_features(model, images.flatten(0, 1), path=path, views=("none",), pad_to=pad_to)
            yield indices.numpy(), {layer: values.reshape(b, a, -1) for layer, values in out.items()}
        else:
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
                n_todo: float, compile_mode: str, views: Sequence[str], cores: int,
                batch_size: int) -> tuple[ComputePath, Callable | None, dict[str, Any]]:
    """Pick torch threads, the memory format and torch.compile by measurement on real `batches` (under
    torch.inference_mode()). The precision is fixed beforehand (choose_precision): every candidate has it,
    and no timing here can change it.

    Plain eager fp32 (contiguous) is always measured: at float32 it is the baseline no choice may be slower
    than; at a lower precision it is the reference the chosen path's features are compared with
    (`precision_check`) and whose speed is reported beside the chosen one. `n_todo`: images left to compute
    (in units of the measured batches); with none left the candidates are still measured, for the report.
    The threads are chosen first (`choose_threads`, on the baseline) and torch.compile last (`try_compile`).
    Returns (path, compiled module or None, report section).
    """
    selection: dict[str, Any] = {"measurements": {}, "precision_check": None}
    if cores > 1 and n_todo:  # first, so that the candidates are compared at the threads they get
        probe = batches[-1][:PROBE_IMAGES]
        threads, thread_rates = choose_threads(model, probe, candidates[0], cores=cores, views=views)
        selection["threads"] = {"chosen": threads, "images_per_second": thread_rates, "path": candidates[0].name,
                                "images": int(probe.shape[0])}
    reference = ComputePath(candidates[0].device, "float32", False)
    measured = list(candidates) + ([reference] if reference not in candidates else [])
    if len(measured) == 1 and n_todo:
        path = candidates[0]
        selection["reason"] = "the only candidate"
    else:
        selection["measurements"], outputs = measure_paths(model, batches, measured, views=views)
        rates = {name: m["images_per_second"] for name, m in selection["measurements"].items()}
        path = choose_path(candidates, rates)
        selection["reason"] = (f"memory format by measurement at {path.precision}: {candidates[0].name} unless "
                               f"another measures more than 10% faster")
        if path != reference:
            selection["precision_check"] = compare_features(outputs[reference.name], outputs[path.name])
        if rates[path.name] < rates[reference.name]:
            selection["slower_than_eager_float32"] = (
                f"{path.name} measured {rates[path.name]} images/s, eager float32 {rates[reference.name]}: "
                f"the precision is not chosen by speed; set extract.precision: float32 to use it")
            logger.warning(selection["slower_than_eager_float32"])
    rate = selection["measurements"].get(path.name, {}).get("images_per_second")
    path, compiled, trial = try_compile(model, path, batches, mode=compile_mode, eager_rate=rate, n_todo=n_todo,
                                        views=views, batch_size=batch_size)
    check = trial.pop("precision_check", None)
    if compiled is not None:
        selection["precision_check"] = check
    selection["compile"] = trial
    return path, compiled, selection


def try_compile(model: nn.Module, path: ComputePath, batches: Sequence[torch.Tensor], *, mode: str,
                eager_rate: float | None, n_todo: float, views: Sequence[str], batch_size: int
                ) -> tuple[ComputePath, Callable | None, dict[str, Any]]:
    """torch.compile the chosen path at its precision: always with `compile: on`; with `auto` tried only when
    the remaining work (`n_todo` / `eager_rate`) is estimated longer than COMPILE_TRIAL_MIN_S, and kept only
    when compiling plus the remaining images compiled is estimated faster than the remaining images eager
    (the one-time compile cost is charged against the images left).

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
    estimates = {"eager": n_todo / eager, "compiled": compile_seconds + n_todo / rate}
    trial = {"tried": True, "compile_seconds": round(compile_seconds, 2), "images_per_second": round(rate, 2),
             "eager_images_per_second": round(eager, 2), "images": int(batch.shape[0]),
             "estimated_seconds_left": {k: round(v, 2) for k, v in estimates.items()},
             "precision_check": compare_features(reference, first)}
    trial["kept"] = mode == "on" or estimates["compiled"] < estimates["eager"]
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
    preprocess: Preprocess  # the backbone's at extract.input_size, with the dataset mean/std under normalization: dataset
    weights_sha256: str
    layers: tuple[str, ...]  # stored layer names, aliases resolved (resolve_layers)
    layer_aliases: dict[str, str]  # {"mid": "blocks.5"} when that layer is stored
    augment: dict[str, Any]  # augment_spec(extract.augment_views)
    warnings: list[str]  # for the report

    @property
    def shas(self) -> set[str]:
        return {r.sha256 for r in self.unique}

    @property
    def train_unique(self) -> list[ManifestRow]:
        """The distinct train images that get augmented views (none when extract.augment_views is 0)."""
        return unique_by_sha([r for r in self.rows if r.split == "train"]) if self.augment["views"] else []


def read_inputs(*, backbone: Backbone, weights: Path, manifest: Path, params: ExtractParams,
                normalization: str) -> StageInputs:
    """Read the manifest, classes.json beside it, the preprocessing and the weight file's sha256; resolve
    extract.layers (`mid`) and extract.input_size for this backbone."""
    rows = read_manifest(manifest)
    if not rows:
        raise ExtractError(f"{manifest} lists no images; nothing to extract.")
    classes_path = manifest.parent / "classes.json"
    if not classes_path.exists():
        raise ExtractError(f"{classes_path} not found beside the manifest; run `dvc repro prepare`.")
    preprocess = with_input_size(dataset_preprocess(backbone.preprocess, normalization, manifest.parent / "stats.json"),
                                 input_size_for(backbone.name, params.input_size))
    if not Path(weights).is_file():
        raise ExtractError(f"weight file {weights} not found; run `dvc repro weights@{backbone.name}` first.")
    layers, aliases, warnings = resolve_layers(backbone, tuple(params.layers))
    for warning in warnings:
        logger.warning(warning)
    if not layers:
        raise ExtractError(f"extract.layers {list(params.layers)} names no layer of {backbone.name}; "
                           f"available: {', '.join(backbone.all_layers)}")
    return StageInputs(rows=rows, unique=unique_by_sha(rows), classes=list(read_json(classes_path)),
                       preprocess=preprocess, weights_sha256=sha256_file(weights), layers=layers,
                       layer_aliases=aliases, augment=augment_spec(params.augment_views), warnings=warnings)


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
    previous_main, previous_augmented = (read_features_rows(out) if trusted else None) or (None, None)
    main = _row_source(WorkLog(work_path_for(out)), key, shas, previous_main)
    augmented = (None if augmented_key is None else
                 _row_source(WorkLog(work_path_for(out, augmented=True)), augmented_key, augmented_shas,
                             previous_augmented))
    return Reusable(previous=previous_main, main=main, augmented=augmented)


def _row_source(work: WorkLog, key: dict[str, Any], shas: set[str], previous: RowPool | None) -> RowSource:
    header, chunks = work.read()
    if header is not None and (header.get("format_version") != FORMAT_VERSION or
                               _canonical(header["key"]) != _canonical(key)):
        logger.info("%s was written with other settings; not reusing it", work.path)
        header, chunks = None, []
    pool, counts = gather_reusable(key, shas, previous=previous, work_header=header, work_chunks=chunks)
    return RowSource(pool=pool, reused_from=counts, work=work, header=header)


def write_output(out: Path, *, inputs: StageInputs, manifest: Path, rows: Reusable, precision_reason: str) -> None:
    """Write the features file from `rows` (every image's rows, and the augmented views), then remove the
    work files."""
    attrs = file_attributes(key=rows.main.pool.key, n_images=len(inputs.rows), manifest_sha256=sha256_file(manifest),
                            classes=inputs.classes, precision_reason=precision_reason,
                            layer_aliases=inputs.layer_aliases, augment=inputs.augment)
    write_features(out, rows=inputs.rows, pool=rows.main.pool, attrs=attrs,
                   augmented=rows.augmented.pool if rows.augmented is not None else None)
    rows.main.work.remove()
    WorkLog(work_path_for(out, augmented=True)).remove()


def row_counts(inputs: StageInputs, rows: Reusable, *, computed: int, computed_augmented: int = 0) -> dict[str, Any]:
    """The report's row bookkeeping (both engines): rows written, computed, reused (and from where), dropped;
    `augmented` the same for the augmented views (counted in images; rows = images x views)."""
    counts = {
        "n_images": len(inputs.rows),
        "rows": len(inputs.rows) * stored_views(rows.main.pool.key),
        "computed": computed,
        "reused": len(inputs.unique) - computed,
        "reused_from": rows.main.reused_from,
        "dropped": len(rows.previous.rows.keys() - inputs.shas) if rows.previous is not None else 0,
        "duplicates": len(inputs.rows) - len(inputs.unique),
    }
    views = inputs.augment["views"]
    if rows.augmented is not None:
        train_rows = sum(r.split == "train" for r in inputs.rows)
        counts["augmented"] = {"views": views, "rows": train_rows * views, "images": len(inputs.train_unique),
                               "computed": computed_augmented,
                               "reused": len(inputs.train_unique) - computed_augmented,
                               "reused_from": rows.augmented.reused_from}
    return counts


def extract(*, backbone: Backbone, weights: Path, raw: Path, manifest: Path, out: Path,
            params: ExtractParams, normalization: str = "backbone", report: Path | None = None,
            on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run the whole stage: write `out` (and remove its work files); return the extract.json report.

    Holds `output_lock(out)` throughout. `report`: the previous run's extract.json, whose features_sha256
    the previous output must match to be reused (see read_reusable; None: not checked).
    `extract.engine: ray` hands the same job to stages.extract_ray (same rows, file and report keys).

    `on_batch(k)` is called after the k-th computed batch (main rows first, then augmented views) is durably
    in its work file (tests use it to simulate a crash).
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
    device = resolve_device(params.device)
    capability = read_capability(device)
    precision, precision_reason = choose_precision(params.precision, device=device, capability=capability)
    if device == "cuda":
        fix_cuda_algorithms()
    torch.set_num_threads(capability["cores"])
    num_workers = (auto_num_workers(device, capability["cores"]) if params.num_workers == "auto"
                   else params.num_workers)

    # Reusable rows: the previous output (persist: true) and the work files, at the one precision.
    key = provenance_key(backbone=backbone.name, weights_sha256=inputs.weights_sha256, preprocess=inputs.preprocess,
                         layers=inputs.layers, precision=precision, params=params)
    views = inputs.augment["views"]
    rows = read_reusable(out, key, inputs.shas, report=previous_report,
                         augmented_key=augmented_key(key, inputs.augment) if views else None,
                         augmented_shas={r.sha256 for r in inputs.train_unique})
    todo = [r for r in inputs.unique if r.sha256 not in rows.main.pool]
    todo_augmented = [r for r in inputs.train_unique if r.sha256 not in rows.augmented.pool] if views else []

    model = build_feature_model(backbone, weights, inputs.layers)
    bn_before = _bn_state(model)
    batches = iter(range(1, 1 << 62))
    tick = (lambda: on_batch(next(batches))) if on_batch is not None else None
    with torch.inference_mode():
        path, runner, selection, resumed = _compute_path(
            model, rows, raw=raw, inputs=inputs, params=params, device=device, capability=capability,
            n_todo=len(todo) + len(todo_augmented) * views / len(params.tta))
        logger.info("%s: %d images, %d reused (%d from %s, %d from the work file), %d to compute%s with %s at %s "
                    "(%s), %d threads, %d workers", backbone.name, len(inputs.rows), len(rows.main.pool),
                    rows.main.reused_from["features"], out.name, rows.main.reused_from["work_file"], len(todo),
                    f" and {len(todo_augmented)} x {views} augmented views" if views else "", path.name,
                    path.precision, precision_reason, torch.get_num_threads(), num_workers)
        header = {"format_version": FORMAT_VERSION, "path": path.as_dict(), "batch_size": params.batch_size,
                  "threads": torch.get_num_threads()}
        common = {"layers": inputs.layers, "path": path, "storage_dtype": params.storage_dtype,
                  "num_workers": num_workers, "device": device, "on_batch": tick,
                  "pad_to": params.batch_size if path.compile else None}
        seconds = seconds_augmented = 0.0
        if todo:
            seconds = compute_rows(runner, rows.main, EvalImages(raw, todo, inputs.preprocess),
                                   header={**header, "key": rows.main.pool.key},
                                   resume=resumed and rows.main.header is not None, views=params.tta,
                                   tta_mode=params.tta_mode, batch_size=params.batch_size,
                                   desc=f"extract {backbone.name}", **common)
        if todo_augmented:
            seconds_augmented = compute_rows(
                runner, rows.augmented, AugmentedImages(raw, todo_augmented, inputs.preprocess, views=views),
                header={**header, "key": rows.augmented.pool.key},
                resume=resumed and rows.augmented.header is not None, views=("none",), tta_mode="rows",
                batch_size=max(1, params.batch_size // views), desc=f"augment {backbone.name}", **common)
    if _bn_state(model) != bn_before:
        raise ExtractError("BatchNorm running statistics changed during extraction: the model was not in "
                           "eval mode.")

    write_output(out, inputs=inputs, manifest=manifest, rows=rows, precision_reason=precision_reason)
    report = _local_report(backbone=backbone, inputs=inputs, rows=rows, params=params, path=path,
                           selection=selection, todo=todo, seconds=seconds, todo_augmented=todo_augmented,
                           seconds_augmented=seconds_augmented, device=device, capability=capability,
                           precision_reason=precision_reason, num_workers=num_workers, out=out)
    report["stage_seconds"] = round(time.perf_counter() - stage_start, 3)
    logger.info("%s: wrote %s (%d rows%s): computed %d, reused %d, dropped %d%s", backbone.name, out,
                report["rows"], f" + {report['augmented']['rows']} augmented" if views else "", report["computed"],
                report["reused"], report["dropped"],
                f"; {report['images_per_second']} images/s" if report["images_per_second"] else "")
    return report


def _compute_path(model: nn.Module, rows: Reusable, *, raw: Path, inputs: StageInputs, params: ExtractParams,
                  device: str, capability: dict[str, Any], n_todo: float
                  ) -> tuple[ComputePath, Callable, dict[str, Any], bool]:
    """(path, the module to run, the report's selection section, whether an interrupted run is resumed).

    An interrupted run's path when a work file has one at this precision (same batches, same bytes), else
    measured among the numerics-neutral candidates at the chosen precision (select_path). Leaves the model
    in the path's memory format and torch at the chosen thread count."""
    candidates = candidate_paths(device, rows.main.pool.key["precision"])
    header = rows.main.header or (rows.augmented.header if rows.augmented is not None else None)
    resumed = ComputePath(**header["path"]) if header is not None else None
    if resumed is not None and dataclasses.replace(resumed, compile=False) not in candidates:
        resumed = None
    compiled: Callable | None = None
    if resumed is not None:
        path = resumed
        torch.set_num_threads(header.get("threads", capability["cores"]))
        selection: dict[str, Any] = {"reason": "resumed the interrupted run's path", "measurements": {},
                                     "precision_check": None}
    else:
        start = time.perf_counter()
        batches = _measurement_batches(raw, inputs.unique, inputs.preprocess, params.batch_size)
        path, compiled, selection = select_path(model, candidates, batches, n_todo=n_todo,
                                                compile_mode=params.compile, views=params.tta,
                                                cores=capability["cores"] if device == "cpu" else 1,
                                                batch_size=params.batch_size)
        selection["seconds"] = round(time.perf_counter() - start, 3)
    selection = {"candidates": [c.name for c in candidates], **selection}
    if compiled is None:
        set_memory_format(model, path)
    if path.compile and compiled is None:  # resuming a compiled path
        compiled = compile_model(model)
    return path, compiled if compiled is not None else model, selection, resumed is not None


def compute_rows(runner: Callable, source: RowSource, dataset: EvalImages, *, header: dict[str, Any], resume: bool,
                 layers: Sequence[str], path: ComputePath, views: Sequence[str], tta_mode: str, storage_dtype: str,
                 batch_size: int, pad_to: int | None, num_workers: int, device: str, desc: str,
                 on_batch: Callable[[], None] | None) -> float:
    """Run `dataset` (the images still to compute, in order) through `runner` in batches of `batch_size`
    items; each batch goes durably into `source.work` (started with `header`, or continued with `resume`)
    and then into `source.pool`. Returns the seconds taken (decode + forward). Call under inference_mode."""
    images = dataset.rows
    source.work.open(header, resume=resume)
    loader = make_loader(dataset, batch_size=batch_size, num_workers=num_workers, device=device)
    start = time.perf_counter()
    try:
        with progress(total=len(images), unit="img", desc=desc) as bar:
            for indices, features in extract_features(runner, loader, path=path, views=views, pad_to=pad_to):
                sha256s = [images[i].sha256 for i in indices]
                arrays = to_storage(features, layers, tta_mode=tta_mode, storage_dtype=storage_dtype)
                source.work.append(sha256s, arrays)
                source.pool.add(sha256s, dict(zip(layers, arrays)))
                bar.update(len(indices))
                if on_batch is not None:
                    on_batch()
    finally:
        source.work.close()  # what was appended stays for the next run to resume from
    return time.perf_counter() - start


def _local_report(*, backbone: Backbone, inputs: StageInputs, rows: Reusable, params: ExtractParams,
                  path: ComputePath, selection: dict[str, Any], todo: list[ManifestRow], seconds: float,
                  todo_augmented: list[ManifestRow], seconds_augmented: float, device: str,
                  capability: dict[str, Any], precision_reason: str, num_workers: int, out: Path) -> dict[str, Any]:
    """The local engine's extract.json (without stage_seconds)."""
    measured = selection["measurements"].get(path.name)
    if todo:
        images, source = len(todo), "extraction: decode + forward"
    elif measured:
        fastest = max(measured["runs"], key=lambda r: r["images"] / r["seconds"])
        images, seconds = fastest["images"], fastest["seconds"]
        source = "measurement on a real batch (forward only): every row was reused"
    else:
        images, seconds, source = 0, 0.0, "none: every row was reused"
    counts = row_counts(inputs, rows, computed=len(todo), computed_augmented=len(todo_augmented))
    if "augmented" in counts:
        n_views = len(todo_augmented) * inputs.augment["views"]
        counts["augmented"].update({"seconds": round(seconds_augmented, 4), "views_per_second":
                                    round(n_views / seconds_augmented, 2) if seconds_augmented else None})
    return {
        "backbone": backbone.name,
        "images": images,
        "seconds": round(seconds, 4),
        "images_per_second": round(images / seconds, 2) if seconds else None,
        "throughput_source": source,
        **counts,
        "engine": "local",
        "device": device,
        "precision": path.precision,
        "precision_reason": precision_reason,
        "storage_dtype": params.storage_dtype,
        "batch_size": params.batch_size,
        "compile": path.compile,
        "channels_last": path.channels_last,
        "path": path.name,
        "torch_threads": torch.get_num_threads(),
        "num_workers": num_workers,
        "layers": list(inputs.layers),
        "layer_aliases": inputs.layer_aliases,
        "feature_dims": {layer: int(next(iter(rows.main.pool.rows.values()))[layer].shape[-1])
                         for layer in inputs.layers},
        "preprocess": inputs.preprocess.as_dict(),
        "tta": list(params.tta),
        "tta_mode": params.tta_mode,
        "augment_views": inputs.augment["views"],
        "selection": selection,
        "warnings": inputs.warnings,
        "cpu": {k: v for k, v in capability.items() if k != "cuda_bf16"},
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "weights_sha256": inputs.weights_sha256,
        "features_sha256": sha256_file(out),
    }


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
