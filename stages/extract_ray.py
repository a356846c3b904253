"""Ray runner of the extract stage (`extract.engine: ray`): the same batches, computed on a Ray cluster.

`extract.engine: ray` in params.yaml makes the same dvc.yaml stage (`python -m stages.extract ...`) hand the
computation to Ray. stages/extract.py still does everything around it, as for the local runner: the inputs, the
content-addressed row reuse (stages.features), the crash-safe work log, the writer and the report; `RayRunner`
only turns the images still to compute into batches of features, in manifest order. For the same engine layout
and torch thread count the file is byte-identical to the local runner's (CPU actors run one thread; measured on
efficientnet_lite0: 2 threads instead of 1 changed the last bits, up to 6e-6, of a 14-image batch and of no
full batch).

The Ray Data pipeline (streaming; rows come back in manifest order):
  rows to compute, cut into the local engine's batches  -> a Dataset with one row per batch (`batch_items`)
  -> `map_batches(decode_batch)` in Ray tasks: stages.extract.EvalImages, i.e. the same sha256 check, decoder
     and eval preprocessing as the local engine -> images float32 [B, 3, H, W]
  -> `map_batches(FeatureActor)` on an actor pool: each actor builds the verified model once (the weight file's
     bytes are put in the object store once; each actor checks their sha256) and runs the torch engine + `to_storage`
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
the precision by the local runner's rule (stages.engines.choose.choose_precision: extract.precision, or with `auto` the
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.backbones import Backbone, Preprocess, WeightsError, build_feature_model
from stages.engines import Candidate, run_views
from stages.engines.choose import choose_precision
from stages.engines.torch import TorchEngine, fix_cuda_algorithms
from stages.features import FORMAT_VERSION
from stages.features_write import to_storage
from stages.hardware import available_cores, read_cpu_capability
from stages.images import AugmentedImages, EvalImages, ImageChangedError, ImageDecodeError, ManifestRow
from stages.io import sha256_bytes
from stages.params import ExtractParams, ParamError

logger = logging.getLogger(__name__)

DECODE_WORKER_BYTES = 600 * 2**20  # memory a decode task asks for besides its images
# Ray Data's fault tolerance, used as it is (its per-operator retry arguments are deprecated since Ray 2.60):
FAULT_TOLERANCE = {"actor": "a dead actor is restarted (max_restarts=-1) and its batch retried (max_task_retries=-1)",
                   "decode task": "a task whose worker died is retried (Ray's default max_retries=3)"}
ROW_FIELDS = tuple(f.name for f in dataclasses.fields(ManifestRow))  # a manifest row, as Dataset columns


def import_ray() -> Any:
    """The `ray` module (with ray.data), or ParamError saying how to install the optional extra."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ParamError(f"extract.engine is 'ray' but Ray is not importable ({exc}); install the optional "
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
                 candidate: dict[str, Any], views: Sequence[str], tta_mode: str, storage_dtype: str, threads: int,
                 crash_flag: str | None = None) -> None:
        import ray

        weights = ray.get(weights)  # an ObjectRef: the file's bytes are put in the object store once
        actual = sha256_bytes(weights)
        if actual != weights_sha256:
            raise WeightsError(f"{backbone.name}: the weights reached the actor with sha256 {actual}, "
                               f"expected {weights_sha256}")
        torch.set_num_threads(threads)
        self.candidate = Candidate(**candidate)
        if self.candidate.device == "cuda":
            fix_cuda_algorithms()
        with tempfile.TemporaryDirectory() as tmp:
            weights_file = Path(tmp) / f"{backbone.name}.pth"
            weights_file.write_bytes(weights)
            self.engine = TorchEngine(build_feature_model(backbone, weights_file, tuple(layers)), self.candidate)
            self.engine.place()
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
                out = run_views(self.engine, images.flatten(0, 1), views=("none",))
                features, tta_mode = {layer: v.reshape(b, a, -1) for layer, v in out.items()}, "rows"
            else:
                features = run_views(self.engine, images, views=self.views)
                tta_mode = self.tta_mode
        arrays = to_storage(features, self.layers, tta_mode=tta_mode, storage_dtype=self.storage_dtype)
        return {"batch": np.asarray(batch["batch"]), **{f"layer_{i}": a[None] for i, a in enumerate(arrays)}}


def _stage_error(ray: Any, exc: BaseException | None) -> BaseException | None:
    """The stage's own error (a changed image, a bad file, bad weights) inside Ray's wrappers, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        ours = isinstance(exc, (ImageChangedError, ImageDecodeError, WeightsError))
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
    context.raise_original_map_exception = True  # our own errors, not Ray's UserCodeException around them
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
            raise type(cause)(str(cause)) from None
        raise
    finally:
        (context.execution_options.preserve_order, context.enable_progress_bars,
         context.raise_original_map_exception) = saved


class RayRunner:
    """The extract stage's rows computed on Ray (stages.extract drives it like the local runner): joins the
    cluster for the run (`with`), fixes the precision by a worker's hardware, then streams batches in order."""
    name = "ray"

    def __init__(self, *, backbone: Backbone, weights: Path, raw: Path, params: ExtractParams,
                 crash_flag: Path | None = None) -> None:
        self.ray = import_ray()
        self.backbone, self.weights, self.raw, self.params, self.crash_flag = backbone, weights, raw, params, crash_flag
        self.timing: dict[str, Any] = {}

    def __enter__(self) -> RayRunner:
        self._cluster = ray_cluster(self.params.ray_address, num_cpus=available_cores())
        self.cluster = self._cluster.__enter__()
        self.plan = plan_actors(self.cluster["resources"], self.params.device)
        self.timing["ray_start_seconds"] = self.cluster["start_seconds"]
        return self

    def __exit__(self, *exc: Any) -> None:
        self._cluster.__exit__(*exc)

    def precision(self) -> tuple[str, str]:
        return actor_precision(self.ray, self.plan, self.params.precision)

    def start(self, *, inputs: Any, rows: Any, precision: str, n_todo: float) -> None:
        """The actors' engine: torch eager channels_last at `precision`, or the interrupted run's layout."""
        self.inputs = inputs
        self.candidate = Candidate("torch", self.plan.device, precision, "channels_last")
        header = rows.main.header or (rows.augmented.header if rows.augmented is not None else None)
        resumed = Candidate(**header["candidate"]) if header and "candidate" in header else None
        self.resumed = (resumed is not None and resumed.engine == "torch" and resumed.device == self.plan.device
                        and resumed.precision == precision)
        if self.resumed:  # finish with the interrupted run's layout (eager: the actors never compile)
            self.candidate = dataclasses.replace(resumed, compile=False)
        self.weights_ref = self.ray.put(Path(self.weights).read_bytes())  # the weight file's bytes, once

    def header(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "candidate": self.candidate.as_dict(),
                "batch_size": self.params.batch_size, "threads": self.plan.threads, "runner": "ray"}

    def batches(self, todo: list[ManifestRow], *, augment_views: int = 0
                ) -> Iterator[tuple[list[str], list[np.ndarray]]]:
        """As LocalRunner.batches: the same batches (sha256s, per layer arrays), in order, computed by the actors."""
        params = self.params
        items = batch_items(todo, max(1, params.batch_size // augment_views) if augment_views else params.batch_size)
        actor_kwargs = {"backbone": self.backbone, "weights": self.weights_ref,
                        "weights_sha256": self.inputs.weights_sha256, "layers": list(self.inputs.layers),
                        "candidate": self.candidate.as_dict(), "views": list(params.tta), "tta_mode": params.tta_mode,
                        "storage_dtype": params.storage_dtype, "threads": self.plan.threads,
                        "crash_flag": str(self.crash_flag) if self.crash_flag else None}
        start, first = time.perf_counter(), None
        batches = compute_batches(self.ray, items, raw=self.raw, preprocess=self.inputs.preprocess,
                                  actor_kwargs=actor_kwargs, plan=self.plan, augment_views=augment_views)
        for expected, (k, arrays) in enumerate(batches):
            sha256s = items[k]["sha256"]
            if k != expected or any(a.shape[0] != len(sha256s) for a in arrays):
                raise RuntimeError(f"Ray returned batch {k} ({[a.shape for a in arrays]}) where batch {expected} of "
                                   f"{len(sha256s)} images was due; rows would be out of manifest order")
            first = first if first is not None else time.perf_counter() - start
            yield sha256s, arrays
        if expected + 1 != len(items):
            raise RuntimeError(f"Ray returned {expected + 1} of {len(items)} batches")
        self.timing["augmented" if augment_views else "main"] = {
            "pipeline_seconds": round(time.perf_counter() - start, 4), "first_batch_seconds": round(first or 0.0, 4),
            "batches": len(items)}

    def finish(self) -> None:
        return None

    def report(self) -> dict[str, Any]:
        return {"runner": "ray", "engine": "torch", "device": self.plan.device, "path": self.candidate.name,
                "layout": self.candidate.layout, "channels_last": True, "compile": False,
                "torch_threads": self.plan.threads,
                **({"throughput_source": "ray: decode tasks + actor forward passes, from the pipeline's start "
                                         "(actor start-up and model build included) to the last batch written"}
                   if "main" in self.timing else {}),
                "ray": {"address": self.cluster["address"], "resources": self.cluster["resources"],
                        "actors": dataclasses.asdict(self.plan), "fault_tolerance": FAULT_TOLERANCE, **self.timing}}
