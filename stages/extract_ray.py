"""Ray engine of the extract stage (`extract.engine: ray`): the local engine's job, computed on a Ray cluster.

`extract.engine: ray` in params.yaml makes the same dvc.yaml stage (`python -m stages.extract ...`) hand the
computation to Ray. Everything around the computation is the local engine's code (stages/extract.py): the
inputs (`read_inputs`), the content-addressed row reuse from the previous output and an interrupted run's work
file (`read_reusable`), the crash-safe work file, the writer and its provenance (`write_output`). Only rows not
already present go to Ray, and for the same compute path and torch thread count the file is byte-identical to the
local engine's (CPU actors run one thread; measured on efficientnet_lite0: 2 threads instead of 1 changed the
last bits, up to 6e-6, of a 14-image batch and of no full batch).

The Ray Data pipeline (streaming; rows come back in manifest order):
  rows to compute, cut into the local engine's batches  -> a Dataset with one row per batch (`batch_items`)
  -> `map_batches(decode_batch)` in Ray tasks: stages.extract.EvalImages, i.e. the same sha256 check, decoder
     and eval preprocessing as the local engine -> images float32 [B, 3, H, W]
  -> `map_batches(FeatureActor)` on an actor pool: each actor builds the verified model once (the weight file's
     bytes are put in the object store once; each actor checks their sha256) and runs `forward_features` + `to_storage`
  -> the driver appends each batch to the work file (fsynced) in order, then writes the HDF5 file.
Why one Dataset row per batch, not per image: which images share a batch changes the last bits of the
features (measured on CPU with timm's test_efficientnet: max abs difference 1e-8 between batches of 16 and of
4+8+4); keeping the local engine's batches keeps the bytes.

Actors (`plan_actors`): one per GPU (`num_gpus=1`) when the cluster has GPUs and extract.device is not cpu; else
one single-threaded actor per CPU, leaving a quarter of the CPUs (at least one) to the decode tasks.
Failures: Ray Data's defaults, see FAULT_TOLERANCE: an actor whose process dies is restarted and its batch
retried; a decode task whose worker dies is retried. Errors raised by the stage's own code (an image
that changed since prepare, an undecodable file) are not retried: they fail the stage with the local engine's
message. An interrupted driver leaves the work file, from which the next run (either engine) resumes.
Cluster: `extract.ray_address`, else $RAY_ADDRESS, else a local Ray instance on this machine's cores. Every
node must see data/raw at the same path (a shared filesystem); the weights need not be there.
Compute path: no measurement (the actors may be on other machines): channels_last, eager (no torch.compile);
the precision by the local engine's rule (stages.extract.choose_precision: extract.precision, or with `auto` the
hardware of a worker: the GPUs' AMP dtype, on CPU bf16 only where native, else float32), never by a timing.
Augmented training views (extract.augment_views) go through the same pipeline after the main rows: a decode task
makes its batch's views (stages.extract.AugmentedImages, the same seeds) and the actors run them as images.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.backbones import Backbone, Preprocess, WeightsError, build_feature_model
from stages.extract import (FORMAT_VERSION, AugmentedImages, ComputePath, EvalImages, ExtractError, RowSource,
                            StageInputs, augmented_key, choose_precision, fix_cuda_algorithms, forward_features,
                            provenance_key, read_inputs, read_reusable, row_counts, set_memory_format, to_storage,
                            write_output)
from stages.hardware import available_cores, read_cpu_capability
from stages.images import ImageDecodeError, ManifestRow
from stages.io import progress, sha256_bytes, sha256_file
from stages.params import ExtractParams, ParamError

logger = logging.getLogger(__name__)

DECODE_WORKER_BYTES = 600 * 2**20  # memory a decode task asks for besides its images
# Ray Data's fault tolerance, used as it is (its per-operator retry arguments are deprecated since Ray 2.60):
FAULT_TOLERANCE = {"actor": "a dead actor is restarted (max_restarts=-1) and its batch retried (max_task_retries=-1)",
                   "decode task": "a task whose worker died is retried (Ray's default max_retries=3)"}
ROW_FIELDS = tuple(f.name for f in dataclasses.fields(ManifestRow))  # a manifest row, as Dataset columns


def import_ray() -> Any:
    """The `ray` module (with ray.data), or ExtractError saying how to install the optional extra."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ExtractError(f"extract.engine is 'ray' but Ray is not importable ({exc}); install the optional "
                          f"extra with `pip install -e '.[ray]'`, or set `engine: local` in params.yaml.") from None
    return ray


@contextlib.contextmanager
def ray_cluster(address: str | None, *, num_cpus: int) -> Iterator[dict[str, Any]]:
    """Join the cluster at `address` (extract.ray_address), else at $RAY_ADDRESS, else start a local Ray
    instance with `num_cpus` CPUs; an already initialised Ray (a test, a notebook) is used as it is.

    Yields {"address", "resources" (ray.cluster_resources()), "start_seconds"}; shuts down only what it started.
    """
    ray = import_ray()
    start = time.perf_counter()
    started = not ray.is_initialized()
    target = address or os.environ.get("RAY_ADDRESS")
    if started:
        if target:
            ray.init(address=target, logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield {"address": (target or "local instance") if started else "the session already running",
               "resources": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")},
               "start_seconds": round(time.perf_counter() - start, 3)}
    finally:
        if started:
            ray.shutdown()


@dataclass(frozen=True)
class ActorPlan:
    """Where the features are computed: `actors` actors of `num_gpus`/`num_cpus` each, `threads` torch threads
    per actor; decode tasks ask for `decode_cpus` each."""
    device: str  # "cuda" | "cpu"
    actors: int
    num_gpus: float
    num_cpus: float
    threads: int
    decode_cpus: float


def plan_actors(resources: dict[str, float], device: str) -> ActorPlan:
    """One actor per GPU of the cluster; without GPUs (or with extract.device: cpu) one single-threaded actor
    per CPU, leaving a quarter of the CPUs (at least one) to the decode tasks (decode is ~15-25% of the
    per-image cost on CPU, the same rule as the local engine's DataLoader workers)."""
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    if device == "cuda" and not gpus:
        raise ParamError("extract.device is 'cuda' but the Ray cluster has no GPU "
                         f"(resources: {resources}); use `device: auto` or `device: cpu`.")
    if gpus and device != "cpu":
        return ActorPlan("cuda", gpus, 1.0, 1.0, 1, 1.0)
    if cpus < 2:  # share the one CPU between the actor and the decode tasks
        return ActorPlan("cpu", 1, 0.0, 0.5, 1, 0.5)
    decode = max(1, cpus // 4)
    return ActorPlan("cpu", cpus - decode, 0.0, 1.0, 1, 1.0)


def _worker_capability(device: str) -> dict[str, Any]:
    capability = read_cpu_capability()
    if device == "cuda":
        capability["cuda_bf16"] = bool(torch.cuda.is_bf16_supported())
    return capability


def actor_precision(ray: Any, plan: ActorPlan, requested: str) -> tuple[str, str]:
    """(precision, reason) for the actors, by the local engine's rule (choose_precision): a forced one as given;
    `auto` from the hardware of a worker like the actors' (a GPU worker on CUDA), never from a timing."""
    capability: dict[str, Any] = {}
    if requested == "auto":
        resources = {"num_gpus": 1} if plan.device == "cuda" else {"num_cpus": plan.decode_cpus}
        capability = ray.get(ray.remote(**resources)(_worker_capability).remote(plan.device))
    return choose_precision(requested, device=plan.device, capability=capability)


def batch_items(rows: Sequence[ManifestRow], batch_size: int) -> list[dict[str, Any]]:
    """The Dataset's rows: one per batch of `batch_size` consecutive manifest rows (the local engine's
    DataLoader batches), {"batch": k, <each ManifestRow field>: [values]}."""
    items = []
    for k, start in enumerate(range(0, len(rows), batch_size)):
        chunk = rows[start: start + batch_size]
        items.append({"batch": k, **{name: [getattr(r, name) for r in chunk] for name in ROW_FIELDS}})
    return items


def decode_batch(batch: dict[str, np.ndarray], *, raw: str, preprocess: Preprocess,
                 augment_views: int = 0) -> dict[str, np.ndarray]:
    """Ray task (map_batches, batch_size=1): one batch row -> {"batch": [k], "images": float32 [1, B, 3, H, W]},
    through the local engine's EvalImages (sha256 check against the manifest, decoder, eval preprocessing);
    with `augment_views` A: its AugmentedImages, [1, B, A, 3, H, W]."""
    columns = [list(batch[name][0]) for name in ROW_FIELDS]
    rows = [ManifestRow(*(v.item() if hasattr(v, "item") else v for v in values)) for values in zip(*columns)]
    dataset = (AugmentedImages(Path(raw), rows, preprocess, views=augment_views) if augment_views
               else EvalImages(Path(raw), rows, preprocess))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return {"batch": np.asarray(batch["batch"]), "images": images.numpy()[None]}


class FeatureActor:
    """Ray actor (map_batches, batch_size=1): builds the verified model once, then maps
    {"batch": [k], "images": [1, B, 3, H, W]} -> {"batch": [k], "layer_<i>": [1, B, V', D] in the storage dtype};
    augmented views [1, B, A, 3, H, W] run as B*A images -> [1, B, A, D].

    `crash_flag` is for tests: the first call on a batch after the first that can rename that file away ends
    the actor's process (os._exit), as a machine failure would.
    """

    def __init__(self, *, backbone: Backbone, weights: Any, weights_sha256: str, layers: Sequence[str],
                 path: dict[str, Any], views: Sequence[str], tta_mode: str, storage_dtype: str, threads: int,
                 crash_flag: str | None = None) -> None:
        import ray

        weights = ray.get(weights)  # an ObjectRef: the file's bytes are put in the object store once
        actual = sha256_bytes(weights)
        if actual != weights_sha256:
            raise WeightsError(f"{backbone.name}: the weights reached the actor with sha256 {actual}, "
                               f"expected {weights_sha256}")
        torch.set_num_threads(threads)
        self.path = ComputePath(**path)
        if self.path.device == "cuda":
            fix_cuda_algorithms()
        with tempfile.TemporaryDirectory() as tmp:
            weights_file = Path(tmp) / f"{backbone.name}.pth"
            weights_file.write_bytes(weights)
            self.model = set_memory_format(build_feature_model(backbone, weights_file, tuple(layers)), self.path)
        self.layers, self.views = tuple(layers), tuple(views)
        self.tta_mode, self.storage_dtype = tta_mode, storage_dtype
        self.crash_flag = crash_flag

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.crash_flag and int(batch["batch"][0]) >= 1:
            with contextlib.suppress(FileNotFoundError):
                os.rename(self.crash_flag, f"{self.crash_flag}.taken")
                os._exit(1)
        images = torch.from_numpy(np.array(batch["images"][0], dtype=np.float32))  # a writable copy
        with torch.inference_mode():
            if images.ndim == 5:  # augmented views: one forward pass each, kept apart
                b, a = images.shape[:2]
                out = forward_features(self.model, images.flatten(0, 1), path=self.path, views=("none",))
                features, tta_mode = {layer: v.reshape(b, a, -1) for layer, v in out.items()}, "rows"
            else:
                features = forward_features(self.model, images, path=self.path, views=self.views)
                tta_mode = self.tta_mode
        arrays = to_storage(features, self.layers, tta_mode=tta_mode, storage_dtype=self.storage_dtype)
        return {"batch": np.asarray(batch["batch"]), **{f"layer_{i}": a[None] for i, a in enumerate(arrays)}}


def _stage_error(ray: Any, exc: BaseException | None) -> BaseException | None:
    """The stage's own error (a changed image, a bad file, bad weights) inside Ray's wrappers, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        ours = isinstance(exc, (ExtractError, ImageDecodeError, WeightsError))
        if ours and not isinstance(exc, ray.exceptions.RayError):  # not Ray's copy of it with the remote traceback
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__  # RayTaskError.cause: the remote one
    return None


def compute_batches(ray: Any, items: list[dict[str, Any]], *, raw: Path, preprocess: Preprocess,
                    actor_kwargs: dict[str, Any], plan: ActorPlan, augment_views: int = 0
                    ) -> Iterator[tuple[int, list[np.ndarray]]]:
    """Run the Ray Data pipeline over `items` (batch_items); yield (batch index, [per layer [B, V', D]]) in order
    (with `augment_views` A: the items' augmented views, [B, A, D])."""
    # A decode worker: the interpreter with torch loaded (Ray measured ~520 MB on hymenoptera) plus about two
    # copies of its batch of float32 images. Asking for memory also keeps decoding in its own tasks: Ray Data
    # fuses a map into the next one when their resource requests are equal.
    size = preprocess.input_size
    decode_memory = DECODE_WORKER_BYTES + 2 * len(items[0]["sha256"]) * max(1, augment_views) * 3 * size * size * 4
    context = ray.data.DataContext.get_current()
    saved = (context.execution_options.preserve_order, context.enable_progress_bars,
             context.raise_original_map_exception)
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False  # the driver shows one tqdm bar over images
    context.raise_original_map_exception = True  # our ExtractError, not Ray's UserCodeException around it
    try:
        dataset = (
            ray.data.from_items(items, override_num_blocks=len(items))
            .map_batches(decode_batch, batch_size=1, fn_kwargs={"raw": str(raw), "preprocess": preprocess,
                                                                "augment_views": augment_views},
                         num_cpus=plan.decode_cpus, memory=decode_memory)
            .map_batches(FeatureActor, batch_size=1, fn_constructor_kwargs=actor_kwargs,
                         compute=ray.data.ActorPoolStrategy(size=plan.actors), num_cpus=plan.num_cpus,
                         num_gpus=plan.num_gpus))
        n_layers = len(actor_kwargs["layers"])
        for row in dataset.iter_rows():
            yield int(row["batch"]), [np.asarray(row[f"layer_{i}"]) for i in range(n_layers)]
    except Exception as exc:  # noqa: BLE001 - Ray wraps the stage's errors in its own types
        cause = _stage_error(ray, exc)
        if cause is not None:
            raise ExtractError(str(cause)) from None
        raise
    finally:
        (context.execution_options.preserve_order, context.enable_progress_bars,
         context.raise_original_map_exception) = saved


def extract_ray(*, backbone: Backbone, weights: Path, raw: Path, manifest: Path, out: Path, params: ExtractParams,
                normalization: str = "backbone", previous_report: Path | None = None,
                on_batch: Callable[[int], None] | None = None,
                crash_flag: Path | None = None) -> dict[str, Any]:
    """The extract stage on Ray: write `out` (as stages.extract.extract does) and return the extract.json report.

    `previous_report`: the previous extract.json, whose features_sha256 the previous output must match to be
    reused (as in the local engine). `on_batch(k)`: called after the k-th computed batch is durably in the
    work file; `crash_flag`: see FeatureActor (both for tests).
    """
    stage_start = time.perf_counter()
    ray = import_ray()
    inputs = read_inputs(backbone=backbone, weights=weights, manifest=manifest, params=params,
                         normalization=normalization)
    views = inputs.augment["views"]
    with ray_cluster(params.ray_address, num_cpus=available_cores()) as cluster:
        plan = plan_actors(cluster["resources"], params.device)
        precision, precision_reason = actor_precision(ray, plan, params.precision)
        key = provenance_key(backbone=backbone.name, weights_sha256=inputs.weights_sha256,
                             preprocess=inputs.preprocess, layers=inputs.layers, precision=precision, params=params)
        rows = read_reusable(out, key, inputs.shas, report=previous_report,
                             augmented_key=augmented_key(key, inputs.augment) if views else None,
                             augmented_shas={r.sha256 for r in inputs.train_unique})
        path = ComputePath(plan.device, precision, True)
        header = rows.main.header or (rows.augmented.header if rows.augmented is not None else None)
        resumed = header is not None and header["path"]["device"] == plan.device
        if resumed:  # finish with the interrupted run's path
            path = dataclasses.replace(ComputePath(**header["path"]), compile=False)
        todo = [r for r in inputs.unique if r.sha256 not in rows.main.pool]
        todo_augmented = [r for r in inputs.train_unique if r.sha256 not in rows.augmented.pool] if views else []
        logger.info("%s on Ray (%s, %s): %d images, %d reused (%d from %s, %d from the work file), %d to compute%s "
                    "with %s (%s) on %d actor(s)", backbone.name, cluster["address"], cluster["resources"],
                    len(inputs.rows), len(rows.main.pool), rows.main.reused_from["features"], out.name,
                    rows.main.reused_from["work_file"], len(todo),
                    f" and {len(todo_augmented)} x {views} augmented views" if views else "", path.name,
                    precision_reason, plan.actors)
        timing = {"ray_start_seconds": cluster["start_seconds"]}
        job = {"inputs": inputs, "weights": weights, "backbone": backbone, "raw": raw, "params": params, "path": path,
               "plan": plan, "crash_flag": crash_flag}
        batches_done = 0
        if todo:
            timing.update(_compute(ray, todo, source=rows.main, resume=resumed and rows.main.header is not None,
                                   on_batch=on_batch, **job))
            batches_done = timing["batches"]
        if todo_augmented:
            augmented = _compute(ray, todo_augmented, source=rows.augmented, augment_views=views,
                                 resume=resumed and rows.augmented.header is not None,
                                 on_batch=(lambda k: on_batch(batches_done + k)) if on_batch else None, **job)
            timing["augmented"] = augmented
    write_output(out, inputs=inputs, manifest=manifest, rows=rows, precision_reason=precision_reason)

    seconds = timing.get("pipeline_seconds", 0.0)
    counts = row_counts(inputs, rows, computed=len(todo), computed_augmented=len(todo_augmented))
    if "augmented" in counts:
        augmented_seconds = timing.get("augmented", {}).get("pipeline_seconds", 0.0)
        counts["augmented"].update({"seconds": augmented_seconds, "views_per_second": round(
            len(todo_augmented) * views / augmented_seconds, 2) if augmented_seconds else None})
    report = {
        "backbone": backbone.name,
        "images": len(todo),
        "seconds": round(seconds, 4),
        "images_per_second": round(len(todo) / seconds, 2) if seconds else None,
        "throughput_source": ("ray: decode tasks + actor forward passes, from the pipeline's start (actor "
                              "start-up and model build included) to the last batch written" if todo
                              else "none: every row was reused"),
        **counts,
        "stage_seconds": round(time.perf_counter() - stage_start, 3),
        "engine": "ray",
        "device": plan.device,
        "precision": path.precision,
        "precision_reason": precision_reason,
        "storage_dtype": params.storage_dtype,
        "batch_size": params.batch_size,
        "compile": False,
        "channels_last": path.channels_last,
        "path": path.name,
        "torch_threads": plan.threads,
        "layers": list(inputs.layers),
        "layer_aliases": inputs.layer_aliases,
        "feature_dims": {layer: int(next(iter(rows.main.pool.rows.values()))[layer].shape[-1])
                         for layer in inputs.layers},
        "preprocess": inputs.preprocess.as_dict(),
        "tta": list(params.tta),
        "tta_mode": params.tta_mode,
        "augment_views": views,
        "warnings": inputs.warnings,
        "ray": {"address": cluster["address"], "resources": cluster["resources"],
                "actors": dataclasses.asdict(plan), "fault_tolerance": FAULT_TOLERANCE, **timing},
        "weights_sha256": inputs.weights_sha256,
        "features_sha256": sha256_file(out),
    }
    logger.info("%s: wrote %s (%d rows) with Ray: computed %d, reused %d, dropped %d%s", backbone.name, out,
                report["rows"], report["computed"], report["reused"], report["dropped"],
                f"; {report['images_per_second']} images/s" if report["images_per_second"] else "")
    return report


def _compute(ray: Any, todo: list[ManifestRow], *, source: RowSource, resume: bool, inputs: StageInputs,
             weights: Path, backbone: Backbone, raw: Path, params: ExtractParams, path: ComputePath,
             plan: ActorPlan, on_batch: Callable[[int], None] | None, crash_flag: Path | None,
             augment_views: int = 0) -> dict[str, float]:
    """Compute `todo` on Ray into `source.pool`, each batch appended to its work file first; return timings (s).
    `augment_views` A: the images' augmented views instead, in batches of batch_size // A images (as local)."""
    pool, work = source.pool, source.work
    items = batch_items(todo, max(1, params.batch_size // augment_views) if augment_views else params.batch_size)
    actor_kwargs = {"backbone": backbone, "weights": ray.put(Path(weights).read_bytes()),
                    "weights_sha256": inputs.weights_sha256, "layers": list(inputs.layers), "path": path.as_dict(),
                    "views": list(params.tta), "tta_mode": params.tta_mode, "storage_dtype": params.storage_dtype,
                    "threads": plan.threads, "crash_flag": str(crash_flag) if crash_flag else None}
    work.open({"format_version": FORMAT_VERSION, "key": pool.key, "path": path.as_dict(),
               "batch_size": params.batch_size, "threads": plan.threads, "engine": "ray"}, resume=resume)
    start = time.perf_counter()
    first = None
    try:
        desc = f"{'augment' if augment_views else 'extract'} {backbone.name} (ray)"
        with progress(total=len(todo), unit="img", desc=desc) as bar:
            batches = compute_batches(ray, items, raw=raw, preprocess=inputs.preprocess,
                                      actor_kwargs=actor_kwargs, plan=plan, augment_views=augment_views)
            for expected, (k, arrays) in enumerate(batches):
                if k != expected:
                    raise ExtractError(f"Ray returned batch {k} where batch {expected} was due; rows would be "
                                       f"out of manifest order")
                sha256s = items[k]["sha256"]
                if any(a.shape[0] != len(sha256s) for a in arrays):
                    raise ExtractError(f"Ray returned {[a.shape for a in arrays]} for batch {k} of "
                                       f"{len(sha256s)} images")
                work.append(sha256s, arrays)
                pool.add(sha256s, dict(zip(inputs.layers, arrays)))
                bar.update(len(sha256s))
                if first is None:
                    first = time.perf_counter() - start
                if on_batch is not None:
                    on_batch(k + 1)
            expected = len(inputs.train_unique) if augment_views else len(inputs.unique)
            if len(pool) != expected:
                raise ExtractError(f"Ray returned {len(pool)} of {expected} rows")
    finally:
        work.close()  # what was appended stays for the next run to resume from
    seconds = time.perf_counter() - start
    return {"pipeline_seconds": round(seconds, 4), "first_batch_seconds": round(first or 0.0, 4),
            "batches": len(items)}
