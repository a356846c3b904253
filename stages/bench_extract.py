"""Benchmark of the extract stage: one table from one run on the same real images.

`python -m stages.bench_extract [--backbones efficientnet_lite0 resnet50] [--images N]` (= `make bench`)

For each backbone, on the same images (hymenoptera from the dataset mirror, or generated JPEGs when it is absent):
- every candidate engine x dtype x layout this machine can run (torch eager contiguous / channels_last at float32
  and bf16 autocast, ONNX Runtime float32, OpenVINO f32 and, where native, bf16), model only, timed by the stage's
  own measurement (stages.engines.choose.measure: interleaved rounds, repeated while noisy), with each one's
  features compared with eager float32 and whether the numerics rule allows it at the stage's precision;
- the stage's choice (stages.engines.choose.choose on those measurements, one-time costs charged against the images
  left) and the ratios the issue states: auto / fastest allowed, auto / eager fp32, exact-fp32 auto / eager fp32;
- end to end per allowed engine: the stage's own loop (decode + preprocess + engine + storage conversion) over all
  images, against the serial bound 1 / (1/model-only + 1/decode-only) measured in the same run;
- the seeds' approach (decode + augment + frozen backbone in fp32 eager, train mode, + a head step, every one of E
  epochs; one epoch measured, times E) against extract-once + head.
Backbones without offline weights (resnet50) run with random-init weights: fine for throughput, and the table says so.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from stages.backbones import (Backbone, FeatureModel, build_feature_model, build_model, classifier_path,
                              get_backbone)
from stages.engines import Candidate, run_views
from stages.engines.choose import (_timed, build_engine, choose, choose_precision, compare_features, measure,
                                   read_capability, within_parity)
from stages.engines.graph import export_graph, graph_key
from stages.engines.torch import resolve_device
from stages.features_write import to_storage
from stages.hardware import DTYPES, read_cpu_capability
from stages.images import IMAGE_EXTENSIONS, ImageDataset, eval_dataset, train_transform
from stages.io import mirror_dirs, setup_logging, sha256_file

logger = logging.getLogger(__name__)

DEFAULT_BACKBONES = ("efficientnet_lite0", "resnet50")
HEAD_C = (0.01, 0.1, 1.0, 10.0)  # the head stage's default sweep


# ------------------------------------------------------------------------------------ inputs
def find_images(n: int | None, *, dataset: Path | None) -> tuple[list[Path], list[int], str]:
    """`n` (None: all) real images, evenly spaced over the sorted dataset, and their labels (the parent
    folder); or `n` (None: 96) generated JPEGs when no dataset is found. Returns (paths, labels, description)."""
    roots = [dataset] if dataset else [d / "hymenoptera_data" for d in mirror_dirs(None)]
    roots.append(Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hymenoptera_data")
    for root in roots:
        if root and root.is_dir():
            files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            if len(files) >= 2:
                count = min(n or len(files), len(files))
                picked = [files[i] for i in np.linspace(0, len(files) - 1, count).astype(int)]
                classes = sorted({p.parent.name for p in picked})
                return picked, [classes.index(p.parent.name) for p in picked], \
                    f"{len(picked)} real images from {root}"
    n = n or 96
    folder = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    return generate_images(folder, n), [i % 2 for i in range(n)], f"{n} generated 500x375 JPEGs (no dataset found)"


def generate_images(folder: Path, n: int) -> list[Path]:
    """`n` smooth random 500x375 JPEGs (photo-like sizes, so decode costs are realistic)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        path = folder / f"{i % 2}" / f"img{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(small).resize((500, 375), Image.BICUBIC).save(path, quality=90)
        paths.append(path)
    return paths


def load_model(backbone: Backbone) -> tuple[FeatureModel, str, str]:
    """The frozen feature model with verified offline weights, or with random-init weights (seeded) when none are
    available offline (throughput is the same). Returns (model, note, weights id for the graph cache)."""
    weights = backbone.weights.package_path()
    if weights is not None and weights.is_file():
        return build_feature_model(backbone, weights), "pretrained (offline package)", sha256_file(weights)
    torch.manual_seed(0)
    model = build_model(backbone)
    feature_model = FeatureModel(model, classifier_path(backbone, model), ("pool",)).eval()
    feature_model.requires_grad_(False)
    return feature_model, "random init (no offline weights; throughput only)", "random-init-seed-0"


# ------------------------------------------------------------------------------------ measurements
def matmul_ceiling(dtype: torch.dtype, *, n: int = 2048, repeats: int = 5) -> float:
    """Best GFLOP/s of an [n, n] @ [n, n] matmul in `dtype` on the CPU with the current threads."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(dtype)
    b = torch.randn(n, n, generator=generator).to(dtype)
    with torch.inference_mode():
        torch.mm(a, b)
        best = min(_seconds(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def flops_per_image(model: nn.Module, input_size: int) -> float:
    """FLOPs of one image's forward pass (a multiply-add counts 2), by torch.utils.flop_counter."""
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.zeros(1, 3, input_size, input_size))
    return float(counter.get_total_flops())


def _seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def table_candidates(device: str, capability: dict[str, Any]) -> list[Candidate]:
    """Every engine x dtype x layout worth a row on this machine (the numerics rule decides later which are
    allowed): eager fp32 first."""
    found = [Candidate("torch", device, "float32", "contiguous"), Candidate("torch", device, "float32", "channels_last"),
             Candidate("torch", device, "bfloat16", "channels_last")]
    if device == "cpu":
        found += [Candidate("onnxruntime", "cpu", "float32", "graph"), Candidate("openvino", "cpu", "float32", "graph")]
        if capability["native_bfloat16"]:
            found.append(Candidate("openvino", "cpu", "bfloat16", "graph"))
    return found


def model_only_rates(engines: dict[str, Callable], batches: Sequence[torch.Tensor], *, repeats: int = 3
                     ) -> dict[str, float]:
    """Best images/s of each engine on full batches, timed in turn (round-robin, `repeats` rounds) so that load
    from other processes hits every engine alike."""
    best = dict.fromkeys(engines, 0.0)
    for batch in [b for b in batches if b.shape[0] == batches[0].shape[0]][:1] * repeats:
        for name, engine in engines.items():
            seconds, _ = _timed(engine, batch, ("none",))
            best[name] = max(best[name], batch.shape[0] / seconds)
    return best


def extract_loop(engine: Callable, files: Sequence[Path], labels: Sequence[int], backbone: Backbone, *,
                 batch_size: int, num_workers: int) -> tuple[np.ndarray, float]:
    """The stage's loop end to end: decode + preprocess (DataLoader, the stage's workers) + engine + storage
    conversion, over every image. Returns (pool features [N, D], seconds)."""
    dataset = eval_dataset("/", [str(f) for f in files], list(labels), backbone.preprocess)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                         prefetch_factor=4 if num_workers else None)
    start = time.perf_counter()
    features = []
    with torch.inference_mode():
        for images, _, _ in loader:
            out = run_views(engine, images, views=("none",))
            features.append(to_storage(out, ["pool"], tta_mode="average", storage_dtype="float32")[0][:, 0])
    return np.concatenate(features), time.perf_counter() - start


def decode_only_rate(files: Sequence[Path], labels: Sequence[int], backbone: Backbone, *, batch_size: int,
                     num_workers: int) -> float:
    """images/s of the stage's decode + preprocess alone (the same DataLoader, no model)."""
    dataset = eval_dataset("/", [str(f) for f in files], list(labels), backbone.preprocess)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                         prefetch_factor=4 if num_workers else None)
    return len(files) / _seconds(lambda: [None for _ in loader])


def fit_head(features: np.ndarray, labels: Sequence[int]) -> float:
    """Seconds to fit the head stage's logistic-regression sweep on cached features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    start = time.perf_counter()
    x = StandardScaler().fit_transform(features)
    for c in HEAD_C:
        LogisticRegression(C=c, max_iter=2000).fit(x, labels)
    return time.perf_counter() - start


def seeds_epoch(model: FeatureModel, files: Sequence[Path], labels: Sequence[int], backbone: Backbone, *,
                batch_size: int, num_workers: int, feature_dim: int) -> float:
    """Seconds of one epoch of the seeds' loop: full decode + RandomResizedCrop/flip every epoch, the
    frozen backbone in fp32 eager and train() mode (BatchNorm statistics drift), then a linear-head
    training step. Runs on a copy, so `model` keeps its statistics."""
    seed_model = copy.deepcopy(model).train()
    device = next(seed_model.parameters()).device
    head = nn.Linear(feature_dim, max(labels) + 1).to(device)
    optimizer = torch.optim.SGD(head.parameters(), lr=1e-3, momentum=0.9)
    dataset = ImageDataset("/", [str(f) for f in files], list(labels), train_transform(backbone.preprocess))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                                         prefetch_factor=4 if num_workers else None,
                                         generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    for images, targets, _ in loader:
        with torch.no_grad():
            embedding = seed_model(images.to(device))["pool"]
        loss = nn.functional.cross_entropy(head(embedding), targets.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def build_table_engines(candidates: Sequence[Candidate], *, model: nn.Module, graph: Any,
                        threads: int) -> tuple[dict[str, Callable], dict[str, float]]:
    """{name: engine} for every table candidate and {name: seconds it took to build}."""
    engines: dict[str, Callable] = {}
    costs: dict[str, float] = {}
    for candidate in candidates:
        start = time.perf_counter()
        engines[candidate.name] = build_engine(candidate, model=model, graph=graph, layers=("pool",), threads=threads)
        costs[candidate.name] = time.perf_counter() - start
    return engines, costs


def candidate_rows(engines: dict[str, Callable], outputs: dict[str, Any], rates: dict[str, float], *,
                   costs: dict[str, float], stats: dict[str, dict[str, Any]], eager: str,
                   stage_precision: str) -> list[dict[str, Any]]:
    """One table row per engine: its model-only rate, whether the stage may choose it (the stage's precision and,
    at float32, features within parity of eager float32), its largest difference from eager float32 and its
    one-time cost (build + warm-up seconds)."""
    rows = []
    for engine_name in engines:
        check = compare_features(outputs[eager], outputs[engine_name])
        precision_of = engine_name.split("+")[2]
        allowed = precision_of == stage_precision and (precision_of != "float32" or within_parity(check))
        rows.append({"candidate": engine_name, "images_per_second": rates[engine_name], "allowed": allowed,
                     "max_abs_diff": max(c["max_abs_diff"] for c in check.values()),
                     "one_time_seconds": round(costs[engine_name] + stats[engine_name]["warm_up_seconds"], 3)})
    return rows


def pick_candidate(rows: Sequence[dict[str, Any]], rates: dict[str, float], allowed_names: set[str], *,
                   n_todo: int) -> Candidate:
    """The stage's choice (engines.choose.choose) among the rows named in `allowed_names`, eager contiguous first
    (the baseline)."""
    candidates = [Candidate(*r["candidate"].split("+")[:4]) for r in rows]
    options = [c for c in candidates if c.name in allowed_names]
    ordered = sorted(options, key=lambda c: (c.engine, c.layout) != ("torch", "contiguous"))
    return choose(ordered, rates, costs={r["candidate"]: r["one_time_seconds"] for r in rows}, n_todo=n_todo)[0]


def end_to_end_rates(engines: dict[str, Callable], names: Sequence[str], files: Sequence[Path], labels: Sequence[int],
                     backbone: Backbone, batches: Sequence[torch.Tensor], *, batch_size: int, num_workers: int,
                     keep: str) -> tuple[dict[str, dict[str, float]], np.ndarray, float]:
    """End to end, per engine in `names`, measured back to back with its own bound (decode-only, then the stage's
    loop, then model-only over the same images), so that a load change between engines does not enter the ratio.
    Returns ({name: rates}, the features [N, D] and loop seconds of engine `keep`)."""
    end_to_end = {}
    for engine_name in names:
        decode_rate = decode_only_rate(files, labels, backbone, batch_size=batch_size, num_workers=num_workers)
        features, seconds = extract_loop(engines[engine_name], files, labels, backbone, batch_size=batch_size,
                                         num_workers=num_workers)
        with torch.inference_mode():
            model_seconds = sum(_timed(engines[engine_name], batch, ("none",))[0] for batch in batches)
        model_rate = len(files) / model_seconds
        bound = 1 / (1 / model_rate + 1 / decode_rate)
        end_to_end[engine_name] = {"images_per_second": len(files) / seconds, "decode_images_per_second": decode_rate,
                                   "model_images_per_second": model_rate, "serial_bound": bound,
                                   "fraction_of_bound": len(files) / seconds / bound, "seconds": seconds}
        if engine_name == keep:
            kept = features, seconds
    return end_to_end, *kept


def bench_backbone(name: str, files: Sequence[Path], labels: Sequence[int], *, batch_size: int, epochs: int,
                   capability: dict[str, Any], num_workers: int, graphs: Path, precision: str) -> dict[str, Any]:
    """All measurements for one backbone (see the module docstring)."""
    backbone = get_backbone(name)
    model, weights_note, weights_id = load_model(backbone)
    dataset = eval_dataset("/", [str(f) for f in files], list(labels), backbone.preprocess)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    batches = list(images.split(batch_size))
    device = resolve_device("auto")
    cores = capability["cores"]
    torch.set_num_threads(cores)
    stage_precision, precision_reason = choose_precision(precision, device=device, capability=read_capability(device))

    key = graph_key(backbone=name, weights_sha256=weights_id, layers=("pool",), input_size=backbone.preprocess.input_size)
    graph, export = export_graph(model, key=key, cache=graphs)
    engines, costs = build_table_engines(table_candidates(device, capability), model=model, graph=graph,
                                         threads=cores)
    with torch.inference_mode():
        stats, outputs, rounds = measure(engines, batches[:2], views=("none",))  # the stage's measurement
        rates = model_only_rates(engines, batches)
    eager = "torch+cpu+float32+contiguous" if device == "cpu" else f"torch+{device}+float32+contiguous"
    rows = candidate_rows(engines, outputs, rates, costs=costs, stats=stats, eager=eager,
                          stage_precision=stage_precision)
    allowed = {r["candidate"] for r in rows if r["allowed"]} | ({eager} if stage_precision == "float32" else set())
    auto = pick_candidate(rows, rates, allowed, n_todo=len(files))
    exact = pick_candidate(rows, rates, {r["candidate"] for r in rows if r["candidate"].split("+")[2] == "float32"
                                         and within_parity(compare_features(outputs[eager], outputs[r["candidate"]]))},
                           n_todo=len(files))
    for row in rows:
        row["chosen"] = row["candidate"] == auto.name
    fastest_allowed = max(rates[n] for n in allowed)

    end_to_end, auto_features, auto_seconds = end_to_end_rates(
        engines, sorted(allowed | {exact.name}, key=lambda n: -rates[n]), files, labels, backbone, batches,
        batch_size=batch_size, num_workers=num_workers, keep=auto.name)

    flops = flops_per_image(model, backbone.preprocess.input_size)
    ceiling = matmul_ceiling(DTYPES[auto.precision]) if device == "cpu" else None
    head_seconds = fit_head(auto_features, labels)
    epoch_seconds = seeds_epoch(model, files, labels, backbone, batch_size=batch_size, num_workers=num_workers,
                                feature_dim=auto_features.shape[1])
    extract_once = export["export_seconds"] + auto_seconds + head_seconds
    return {
        "backbone": name, "weights": weights_note, "precision": stage_precision, "precision_reason": precision_reason,
        "graph_export": export, "measurement": rounds, "candidates": rows, "auto": auto.name, "exact_fp32": exact.name,
        "eager_fp32_images_per_second": rates[eager], "auto_images_per_second": rates[auto.name],
        "auto_over_fastest_allowed": rates[auto.name] / fastest_allowed,
        "auto_over_eager": rates[auto.name] / rates[eager], "exact_over_eager": rates[exact.name] / rates[eager],
        "decode_images_per_second": end_to_end[auto.name]["decode_images_per_second"], "end_to_end": end_to_end,
        "gflop_per_image": flops / 1e9, "achieved_gflops": flops * rates[auto.name] / 1e9,
        "matmul_ceiling_gflops": ceiling, "fraction_of_ceiling": flops * rates[auto.name] / 1e9 / ceiling if ceiling else None,
        "head_seconds": head_seconds, "seeds_epoch_seconds": epoch_seconds, "seeds_seconds": epochs * epoch_seconds,
        "extract_once_seconds": extract_once, "seeds_over_extract_once": epochs * epoch_seconds / extract_once,
    }


# ------------------------------------------------------------------------------------ output
def _fmt(value: Any, digits: int = 2) -> str:
    """A table cell: "-" for None, floats with thousands separators to `digits` places."""
    return "-" if value is None else (f"{value:,.{digits}f}" if isinstance(value, float) else str(value))


def summary_cells(results: Sequence[dict[str, Any]], *, header: dict[str, Any],
                  ) -> list[tuple[str, Callable[[dict[str, Any]], str]]]:
    """The ratio lines under the candidate table: (label, the cell of one backbone's result)."""
    return [
        ("weights", lambda r: r["weights"].split(" (")[0]),
        ("ONNX export (cached after)", lambda r: "cached" if r["graph_export"]["cached"]
         else f"{r['graph_export']['export_seconds']:.1f} s"),
        ("auto engine", lambda r: r["auto"]),
        ("auto / fastest allowed (>= 0.95)", lambda r: _fmt(r["auto_over_fastest_allowed"]) + "x"),
        ("auto / eager fp32", lambda r: _fmt(r["auto_over_eager"]) + "x"),
        ("exact-fp32 auto / eager fp32 (>= 2)", lambda r: _fmt(r["exact_over_eager"]) + "x"),
        ("decode only img/s (before the auto run)", lambda r: _fmt(r["decode_images_per_second"], 1)),
        *[(f"end to end / serial bound, {engine.split('+')[0]}+{engine.split('+')[3]}",
           (lambda e: lambda r: _fmt(r["end_to_end"][e]["fraction_of_bound"]) + "x" if e in r["end_to_end"] else "-")(engine))
          for engine in dict.fromkeys(e for r in results for e in r["end_to_end"])],
        ("end to end img/s, auto", lambda r: _fmt(r["end_to_end"][r["auto"]]["images_per_second"], 1)),
        ("achieved GFLOP/s, auto (of matmul ceiling)", lambda r: f"{_fmt(r['achieved_gflops'], 1)} "
         f"({_fmt(100 * r['fraction_of_ceiling'], 0)}%)" if r["fraction_of_ceiling"] else "-"),
        (f"seeds: {header['epochs']} epochs, s", lambda r: _fmt(r["seeds_seconds"], 1)),
        ("extract once (export + run + head), s", lambda r: _fmt(r["extract_once_seconds"], 1)),
        ("seeds / extract once", lambda r: _fmt(r["seeds_over_extract_once"], 1) + "x"),
    ]


def format_table(results: Sequence[dict[str, Any]], *, capability: dict[str, Any], header: dict[str, Any]) -> str:
    """The benchmark as plain text: the CPU flags, the candidate table per backbone, then the ratios."""
    yes = {True: "yes", False: "no"}
    lines = [
        f"CPU: {capability['model']}, {capability['cores']} cores; torch capability {capability['torch_capability']}; "
        f"AVX2 {yes[capability['avx2']]}, AVX512 {yes[capability['avx512']]}, AVX512_BF16 "
        f"{yes[capability['avx512_bf16']]}, AMX_BF16 {yes[capability['amx_bf16']]}, AVX512_FP16 "
        f"{yes[capability['avx512_fp16']]} -> native bf16: {yes[capability['native_bfloat16']]}",
        f"Images: {header['images']}; batch {header['batch_size']}, DataLoader workers {header['workers']}; "
        f"torch {torch.__version__}; precision: {results[0]['precision']} ({results[0]['precision_reason']})", ""]
    names = [r["backbone"] for r in results]
    width = max(len(c["candidate"]) for r in results for c in r["candidates"]) + 2
    columns = [max(len(n), 30, len(r["auto"])) + 2 for n, r in zip(names, results)]
    lines.append(f"model only, img/s (batch {header['batch_size']})".ljust(width) + "".join(n.rjust(w) for n, w in zip(names, columns)))
    for candidate in [c["candidate"] for c in results[0]["candidates"]]:
        cells = []
        for r in results:
            row = next((c for c in r["candidates"] if c["candidate"] == candidate), None)
            if row is None:
                cells.append("-")
                continue
            mark = "CHOSEN" if row["chosen"] else ("allowed" if row["allowed"] else "not allowed")
            cells.append(f"{row['images_per_second']:.1f} {mark} ({row['max_abs_diff']:.0e})")
        lines.append(candidate.ljust(width) + "".join(c.rjust(w) for c, w in zip(cells, columns)))
    lines.append("")

    summary = summary_cells(results, header=header)
    label_width = max(len(label) for label, _ in summary) + 2
    for label, cell in summary:
        lines.append(label.ljust(label_width) + "".join(cell(r).rjust(w) for r, w in zip(results, columns)))
    notes = [f"{r['backbone']}: {r['weights']}" for r in results if r["weights"].startswith("random")]
    notes.append("model only: each candidate timed in turn on the same pre-decoded batch, best of 3; in brackets the "
                 "max |difference| from eager fp32 (allowed at float32: within 1e-4 x max(1, |value|)). The choice "
                 "is the stage's rule (stages.engines.choose.choose) on these rates, one-time costs (engine build, "
                 "warm-up) charged against the images. End to end: the stage's loop over every image per engine, with its serial "
                 "bound 1 / (1/model-only + 1/decode-only) from decode-only and model-only passes over the same images "
                 "right before and after it.")
    notes.append(f"seeds: one epoch measured (full decode + augmentation, fp32 eager backbone in train mode, linear "
                 f"head step), times {header['epochs']}; the CPU may be shared with other processes, so compare "
                 f"ratios rather than absolute rates.")
    return "\n".join(lines + [""] + [f"* {n}" for n in notes])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", default=list(DEFAULT_BACKBONES))
    parser.add_argument("--images", type=int, default=None,
                        help="images to time (default: all of hymenoptera, 398; 96 generated without it)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the seeds' loop to compare with")
    parser.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="float32",
                        help="as extract.precision (default float32, the stage's default)")
    parser.add_argument("--graphs", type=Path, default=Path("features/.graphs"),
                        help="the ONNX graph cache (the stage's default)")
    parser.add_argument("--dataset", type=Path, default=None, help="an image folder (default: hymenoptera)")
    parser.add_argument("--json", type=Path, default=None, help="also write all measurements here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    if (args.images is not None and args.images < 2) or args.batch_size < 1:
        print("bench_extract: error: --images must be >= 2 and --batch-size >= 1", file=sys.stderr)
        return 2
    capability = read_cpu_capability()
    torch.set_num_threads(capability["cores"])
    cores = capability["cores"]
    workers = 0 if cores <= 2 else max(1, cores // 4)  # stages.extract.auto_num_workers on the CPU
    files, labels, description = find_images(args.images, dataset=args.dataset)
    results = []
    for name in args.backbones:
        logger.info("benchmarking %s on %d images", name, len(files))
        results.append(bench_backbone(name, files, labels, batch_size=args.batch_size, epochs=args.epochs,
                                      capability=capability, num_workers=workers, graphs=args.graphs,
                                      precision=args.precision))
    header = {"images": description, "batch_size": args.batch_size, "cores": capability["cores"],
              "workers": workers, "epochs": args.epochs}
    print(format_table(results, capability=capability, header=header))
    if args.json:
        args.json.write_text(json.dumps({"capability": capability, **header, "results": results}, indent=2,
                                        default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
