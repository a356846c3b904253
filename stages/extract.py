"""Extract stage: run each frozen backbone once per image into a resumable, incremental HDF5 cache.

`python -m stages.extract --backbone NAME --raw data/raw --manifest data/prepared/manifest.csv
 --weights models/pretrained/NAME.pth --out features/NAME.h5 --report reports/NAME/extract.json`

One orchestration, top to bottom (`extract`): read the inputs -> fix the precision -> gather the rows computed
before -> compute the rest with the chosen engine, batch by batch into the work log -> write the file -> report.
What it delegates:
- stages.features owns the file: provenance key, row reuse (previous output, only when its sha256 matches the
  previous report; an interrupted run's work log), work log, lock, writer. Rows are keyed by image sha256, so
  only new images are computed and a crashed run resumes with the same batches (the same bytes).
- stages.engines.choose picks the engine. Numbers never depend on a stopwatch: the precision comes from
  `extract.precision` (default float32: the same features, within 1e-4, on every machine) or, with `auto`, from
  the hardware alone, and is recorded with its reason (attr `precision_reason`). Timing then chooses among
  engines that give the same numbers at that precision: torch eager (contiguous, the baseline; channels_last),
  ONNX Runtime and OpenVINO on an ONNX graph exported once per backbone and cached in `--graphs`
  (features/.graphs), torch threads and torch.compile, one-time costs charged against the images left.
- `extract.engine: ray` computes the same batches on a Ray cluster (stages/extract_ray.py) instead of here.
- `mid` in extract.layers is the backbone's mid_layer, stored under its real name (attr `layer_aliases`);
  `extract.input_size` sets the crop; `extract.tta` views are averaged or kept as rows; `extract.augment_views`
  adds seeded augmented views of each train image (stages.images.AugmentedImages), stored apart.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stages.backbones import (Backbone, Preprocess, build_feature_model, get_backbone, input_size_for, resolve_layers,
                              with_input_size)
from stages.engines import Candidate, run_views
from stages.engines.choose import build_engine, candidate_list, choose_precision, read_capability, select_engine
from stages.engines.graph import export_graph, graph_key, graph_path
from stages.engines.torch import TorchEngine, compile_model, fix_cuda_algorithms, resolve_device
from stages.features import FORMAT_VERSION, FeaturesError
from stages.features_write import (Reusable, WorkLog, augmented_key, file_attributes, output_lock, provenance_key,
                                   read_reusable, record_batches, stored_views, to_storage, work_path_for,
                                   write_features)
from stages.images import (AugmentedImages, EvalImages, ImageChangedError, ImageDecodeError, ManifestRow, augment_spec,
                           dataset_preprocess, make_loader, read_manifest)
from stages.io import read_json, setup_logging, sha256_file, write_json
from stages.params import ExtractParams, ParamError, load_params

logger = logging.getLogger(__name__)


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


# ------------------------------------------------------------------------------------------------ inputs
def unique_by_sha(rows: list[ManifestRow]) -> list[ManifestRow]:
    """First manifest row of each distinct image content, in manifest order."""
    seen: set[str] = set()
    return [r for r in rows if not (r.sha256 in seen or seen.add(r.sha256))]


@dataclass(frozen=True)
class StageInputs:
    """What the stage reads before computing anything (whichever runner computes)."""
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


# ------------------------------------------------------------------------------------------------ local runner
class LocalRunner:
    """Computes rows in this process with the engine stages.engines.choose picks (or the interrupted run's)."""
    name = "local"

    def __init__(self, *, backbone: Backbone, weights: Path, raw: Path, params: ExtractParams, graphs: Path) -> None:
        self.backbone, self.weights, self.raw, self.params, self.graphs = backbone, weights, raw, params, graphs
        self.device = resolve_device(params.device)
        self.capability = read_capability(self.device)
        if self.device == "cuda":
            fix_cuda_algorithms()
        torch.set_num_threads(self.capability["cores"])
        self.num_workers = (auto_num_workers(self.device, self.capability["cores"]) if params.num_workers == "auto"
                            else params.num_workers)
        self.selection: dict[str, Any] = {}

    def __enter__(self) -> LocalRunner:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def precision(self) -> tuple[str, str]:
        return choose_precision(self.params.precision, device=self.device, capability=self.capability)

    def start(self, *, inputs: StageInputs, rows: Reusable, precision: str, n_todo: float) -> None:
        """Build the model and the engine: the interrupted run's when a work log names one at this precision
        (same batches, same bytes), else the measured choice."""
        self.inputs = inputs
        self.model = build_feature_model(self.backbone, self.weights, inputs.layers)
        self.bn_before = _bn_state(self.model)
        candidates = candidate_list(self.device, precision, self.params.engines,
                                    native_bfloat16=self.capability.get("native_bfloat16", False))
        key = graph_key(backbone=self.backbone.name, weights_sha256=inputs.weights_sha256, layers=inputs.layers,
                        input_size=inputs.preprocess.input_size)
        graph = lambda: export_graph(self.model, key=key, cache=self.graphs)  # noqa: E731
        header = rows.main.header or (rows.augmented.header if rows.augmented is not None else None)
        resumed = Candidate(**header["candidate"]) if header and "candidate" in header else None
        self.resumed = resumed is not None and resumed.precision == precision
        with torch.inference_mode():
            if self.resumed:
                torch.set_num_threads(header.get("threads", self.capability["cores"]))
                self.engine = self._resume_engine(resumed, graph)
                self.selection = {"reason": "resumed the interrupted run's engine", "candidates": [resumed.name]}
            else:
                start = time.perf_counter()
                batches = _measurement_batches(self.raw, inputs.unique, inputs.preprocess, self.params.batch_size)
                self.engine, self.selection = select_engine(
                    self.model, candidates, batches, n_todo=n_todo, compile_mode=self.params.compile,
                    views=self.params.tta, cores=self.capability["cores"] if self.device == "cpu" else 1,
                    batch_size=self.params.batch_size, layers=inputs.layers, graph=graph,
                    export_anyway=graph_path(self.graphs, key).is_file() or "torch" not in self.params.engines)
                self.selection["seconds"] = round(time.perf_counter() - start, 3)
        self.candidate: Candidate = self.engine.candidate

    def _resume_engine(self, candidate: Candidate, graph: Callable[[], tuple[Path, dict[str, Any]]]) -> Callable:
        if candidate.engine != "torch":
            return build_engine(candidate, model=self.model, graph=graph()[0], layers=self.inputs.layers,
                                threads=torch.get_num_threads())
        engine = TorchEngine(self.model, candidate, compiled=compile_model(self.model) if candidate.compile else None)
        engine.place()  # before the first (compiling) call
        return engine

    def header(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "candidate": self.candidate.as_dict(),
                "batch_size": self.params.batch_size, "threads": torch.get_num_threads()}

    def batches(self, todo: list[ManifestRow], *, augment_views: int = 0
                ) -> Iterator[tuple[list[str], list[np.ndarray]]]:
        """(sha256s [B], per layer [B, V', D] in the storage dtype) per batch of `todo`, in order; with
        `augment_views` A the images' augmented views ([B, A, D]) in batches of batch_size // A images."""
        params, layers = self.params, self.inputs.layers
        if augment_views:
            dataset = AugmentedImages(self.raw, todo, self.inputs.preprocess, views=augment_views)
            views, tta_mode, batch_size = ("none",), "rows", max(1, params.batch_size // augment_views)
        else:
            dataset = EvalImages(self.raw, todo, self.inputs.preprocess)
            views, tta_mode, batch_size = params.tta, params.tta_mode, params.batch_size
        pad_to = params.batch_size if self.candidate.compile else None
        loader = make_loader(dataset, batch_size=batch_size, num_workers=self.num_workers, device=self.device)
        with torch.inference_mode():
            for images, indices in loader:
                if images.ndim == 5:  # augmented views: one forward pass each, kept apart as rows
                    b, a = images.shape[:2]
                    out = run_views(self.engine, images.flatten(0, 1), views=views, pad_to=pad_to)
                    out = {layer: values.reshape(b, a, -1) for layer, values in out.items()}
                else:
                    out = run_views(self.engine, images, views=views, pad_to=pad_to)
                yield ([todo[i].sha256 for i in indices.tolist()],
                       to_storage(out, layers, tta_mode=tta_mode, storage_dtype=params.storage_dtype))

    def finish(self) -> None:
        if _bn_state(self.model) != self.bn_before:
            raise ExtractError("BatchNorm running statistics changed during extraction: the model was not in "
                               "eval mode.")

    def report(self) -> dict[str, Any]:
        candidate = self.candidate
        return {"runner": "local", "engine": candidate.engine, "device": self.device, "path": candidate.name,
                "layout": candidate.layout, "channels_last": candidate.layout == "channels_last",
                "compile": candidate.compile, "torch_threads": torch.get_num_threads(),
                "num_workers": self.num_workers, "selection": self.selection,
                "cpu": {k: v for k, v in self.capability.items() if k != "cuda_bf16"},
                "gpu": torch.cuda.get_device_name() if self.device == "cuda" else None}


# ------------------------------------------------------------------------------------------------ the stage
def extract(*, backbone: Backbone, weights: Path, raw: Path, manifest: Path, out: Path,
            params: ExtractParams, normalization: str = "backbone", report: Path | None = None,
            graphs: Path | None = None, on_batch: Callable[[int], None] | None = None,
            runner: Any = None) -> dict[str, Any]:
    """Run the whole stage: write `out` (and remove its work files); return the extract.json report.

    Holds `output_lock(out)` throughout. `report`: the previous run's extract.json, whose features_sha256
    the previous output must match to be reused (None: not checked). `graphs`: the ONNX graph cache
    (default: `.graphs` beside `out`). `on_batch(k)`: called after the k-th computed batch is durably in its
    work file (tests use it to simulate a crash). `runner`: computes the rows (default: LocalRunner, or
    stages.extract_ray.RayRunner with extract.engine: ray).
    """
    start = time.perf_counter()
    with output_lock(out):
        inputs = read_inputs(backbone=backbone, weights=weights, manifest=manifest, params=params,
                             normalization=normalization)
        if runner is None and params.engine == "ray":
            from stages.extract_ray import RayRunner  # Ray is an optional extra: imported only when asked for

            runner = RayRunner(backbone=backbone, weights=weights, raw=raw, params=params)
        runner = runner or LocalRunner(backbone=backbone, weights=weights, raw=raw, params=params,
                                       graphs=graphs or out.parent / ".graphs")
        with runner:
            precision, precision_reason = runner.precision()
            key = provenance_key(backbone=backbone.name, weights_sha256=inputs.weights_sha256,
                                 preprocess=inputs.preprocess, layers=inputs.layers, precision=precision, params=params)
            views = inputs.augment["views"]
            rows = read_reusable(out, key, inputs.shas, report=report,
                                 augmented_key=augmented_key(key, inputs.augment) if views else None,
                                 augmented_shas={r.sha256 for r in inputs.train_unique})
            todo = [r for r in inputs.unique if r.sha256 not in rows.main.pool]
            todo_augmented = [r for r in inputs.train_unique if r.sha256 not in rows.augmented.pool] if views else []
            runner.start(inputs=inputs, rows=rows, precision=precision,
                         n_todo=len(todo) + len(todo_augmented) * views / len(params.tta))
            logger.info("%s: %d images, %d reused (%d from %s, %d from the work file), %d to compute%s with %s "
                        "(%s, %s)", backbone.name, len(inputs.rows), len(rows.main.pool),
                        rows.main.reused_from["features"], out.name, rows.main.reused_from["work_file"], len(todo),
                        f" and {len(todo_augmented)} x {views} augmented views" if views else "",
                        runner.candidate.name, precision_reason, runner.name)
            seconds, seconds_augmented = compute_missing(runner, rows, todo=todo, todo_augmented=todo_augmented,
                                                         key=key, views=views, name=backbone.name, on_batch=on_batch)
            runner.finish()
            write_output(out, inputs=inputs, manifest=manifest, rows=rows, precision_reason=precision_reason)
            result = stage_report(backbone=backbone, inputs=inputs, rows=rows, params=params, todo=todo,
                                  seconds=seconds, todo_augmented=todo_augmented, seconds_augmented=seconds_augmented,
                                  precision=precision, precision_reason=precision_reason, out=out)
            result.update(runner.report())
            if not todo:
                result.update(_measured_throughput(result.get("selection", {}), result["path"]))
    result["stage_seconds"] = round(time.perf_counter() - start, 3)
    logger.info("%s: wrote %s (%d rows%s): computed %d, reused %d, dropped %d%s", backbone.name, out,
                result["rows"], f" + {result['augmented']['rows']} augmented" if views else "", result["computed"],
                result["reused"], result["dropped"],
                f"; {result['images_per_second']} images/s" if result["images_per_second"] else "")
    return result


def compute_missing(runner: Any, rows: Reusable, *, todo: list[ManifestRow], todo_augmented: list[ManifestRow],
                    key: str, views: int, name: str,
                    on_batch: Callable[[int], None] | None = None) -> tuple[float, float]:
    """Compute the rows no earlier output or work file had, the images then their augmented views, each batch
    durably in its work file before it joins the pool; return the compute seconds of each (0.0: nothing to do).
    `on_batch(k)` after the k-th batch of either."""
    counter = iter(range(1, 1 << 62))
    tick = (lambda: on_batch(next(counter))) if on_batch is not None else None
    seconds = seconds_augmented = 0.0
    if todo:
        seconds = record_batches(rows.main, runner.batches(todo), header={**runner.header(), "key": key},
                                 resume=runner.resumed and rows.main.header is not None, total=len(todo),
                                 desc=f"extract {name}", on_batch=tick)
    if todo_augmented:
        seconds_augmented = record_batches(
            rows.augmented, runner.batches(todo_augmented, augment_views=views),
            header={**runner.header(), "key": rows.augmented.pool.key},
            resume=runner.resumed and rows.augmented.header is not None, total=len(todo_augmented),
            desc=f"augment {name}", on_batch=tick)
    return seconds, seconds_augmented


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


def stage_report(*, backbone: Backbone, inputs: StageInputs, rows: Reusable, params: ExtractParams,
                 todo: list[ManifestRow], seconds: float, todo_augmented: list[ManifestRow], seconds_augmented: float,
                 precision: str, precision_reason: str, out: Path) -> dict[str, Any]:
    """extract.json without the runner's part: rows written, computed, reused (and from where), dropped, speed."""
    views = inputs.augment["views"]
    result: dict[str, Any] = {
        "backbone": backbone.name,
        "images": len(todo),
        "seconds": round(seconds, 4),
        "images_per_second": round(len(todo) / seconds, 2) if seconds else None,
        "throughput_source": "extraction: decode + forward + work log" if todo else "none: every row was reused",
        "n_images": len(inputs.rows),
        "rows": len(inputs.rows) * stored_views(rows.main.pool.key),
        "computed": len(todo),
        "reused": len(inputs.unique) - len(todo),
        "reused_from": rows.main.reused_from,
        "dropped": len(rows.previous.rows.keys() - inputs.shas) if rows.previous is not None else 0,
        "duplicates": len(inputs.rows) - len(inputs.unique),
    }
    if rows.augmented is not None:
        train_rows = sum(r.split == "train" for r in inputs.rows)
        n_views = len(todo_augmented) * views
        result["augmented"] = {"views": views, "rows": train_rows * views, "images": len(inputs.train_unique),
                               "computed": len(todo_augmented), "reused": len(inputs.train_unique) - len(todo_augmented),
                               "reused_from": rows.augmented.reused_from, "seconds": round(seconds_augmented, 4),
                               "views_per_second": round(n_views / seconds_augmented, 2) if seconds_augmented else None}
    result.update({
        "precision": precision, "precision_reason": precision_reason, "storage_dtype": params.storage_dtype,
        "batch_size": params.batch_size, "layers": list(inputs.layers), "layer_aliases": inputs.layer_aliases,
        "feature_dims": {layer: int(next(iter(rows.main.pool.rows.values()))[layer].shape[-1])
                         for layer in inputs.layers},
        "preprocess": inputs.preprocess.as_dict(), "tta": list(params.tta), "tta_mode": params.tta_mode,
        "augment_views": views, "warnings": inputs.warnings, "weights_sha256": inputs.weights_sha256,
        "features_sha256": sha256_file(out)})
    return result


def _measured_throughput(selection: dict[str, Any], name: str) -> dict[str, Any]:
    """With every row reused, the speed comes from the chosen engine's best measured run (forward only)."""
    measured = selection.get("measurements", {}).get(name)
    if not measured:
        return {}
    fastest = max(measured["runs"], key=lambda r: r["images"] / r["seconds"])
    return {"images": fastest["images"], "seconds": fastest["seconds"],
            "images_per_second": round(fastest["images"] / fastest["seconds"], 2),
            "throughput_source": "measurement on a real batch (forward only): every row was reused"}


def _bn_state(model: nn.Module) -> list[bytes]:
    """Bytes of every BatchNorm running statistic (to prove extraction left them unchanged)."""
    return [buffer.detach().cpu().numpy().tobytes() for name, buffer in model.named_buffers()
            if name.endswith(("running_mean", "running_var", "num_batches_tracked"))]


def _measurement_batches(raw: Path, rows: list[ManifestRow], preprocess: Preprocess,
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
    parser.add_argument("--graphs", type=Path, help="cache of exported ONNX graphs (default: .graphs beside --out)")
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
                         report=args.report, graphs=args.graphs)
    except (ExtractError, FeaturesError, ParamError, ImageChangedError, ImageDecodeError, KeyError, ValueError,
            OSError) as exc:
        print(f"extract: error: {exc}", file=sys.stderr)
        return 1
    write_json(args.report, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
