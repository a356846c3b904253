"""Benchmark of the extract stage: one table from one run on the same real images.

`python -m stages.bench_extract [--backbones resnet50 efficientnet_lite0] [--images N]`

For each backbone, on the same images (hymenoptera from the dataset mirror, or generated JPEGs when it
is absent): images/s of plain eager fp32 and of the path `extract.device/precision/compile: auto` picks
(the precision by hardware capability, stages.extract.choose_precision; memory format, threads and compile by
stages.extract.select_path: the stage's own code), timed batch by batch interleaved so that load from
other processes hits both; achieved GFLOP/s (FLOPs counted with torch.utils.flop_counter) against a
matmul ceiling measured in the same run in the chosen dtype; the decode-only rate (is decode or the model
the bottleneck?); and the cost of the seeds' approach (decode + augment + frozen backbone in fp32 eager,
train mode, + a head step, every one of E epochs; one epoch measured, times E) against extract-once + head
(choosing the path as the stage does, the stage's decode + forward loop, then the head stage's sklearn
LogisticRegression sweep on the cached features).
Backbones without offline weights (resnet50) run with random-init weights: fine for throughput, and the
table says so.
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

from stages import extract as ex
from stages.backbones import (Backbone, FeatureModel, build_feature_model, build_model, classifier_path,
                              get_backbone)
from stages.images import IMAGE_EXTENSIONS, ImageDataset, eval_dataset, train_transform
from stages.io import mirror_dirs, setup_logging

logger = logging.getLogger(__name__)

DEFAULT_BACKBONES = ("resnet50", "efficientnet_lite0")
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


def load_model(backbone: Backbone) -> tuple[FeatureModel, str]:
    """The frozen feature model with verified offline weights, or with random-init weights when none are
    available offline (throughput is the same)."""
    weights = backbone.weights.package_path()
    if weights is not None and weights.is_file():
        return build_feature_model(backbone, weights), "pretrained (offline package)"
    model = build_model(backbone)
    feature_model = FeatureModel(model, classifier_path(backbone, model), ("pool",)).eval()
    feature_model.requires_grad_(False)
    return feature_model, "random init (no offline weights; throughput only)"


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


def interleaved_rates(runners: dict[str, tuple[Callable, ex.ComputePath, int]], batches: Sequence[torch.Tensor]
                      ) -> dict[str, float]:
    """images/s of each (model, path, torch threads) over all `batches`, timed batch by batch in turn
    (after a warm-up batch), so that load from other processes hits every runner alike."""
    totals = dict.fromkeys(runners, 0.0)
    size = batches[0].shape[0]  # a compiled model sees one shape
    with torch.inference_mode():
        for model, path, threads in runners.values():
            torch.set_num_threads(threads)
            ex.forward_features(model, batches[0], path=path, views=("none",), pad_to=size)
        for batch in batches:
            for name, (model, path, threads) in runners.items():
                torch.set_num_threads(threads)
                totals[name] += _seconds(lambda: ex.forward_features(model, batch, path=path, views=("none",),
                                                                     pad_to=size))
    images = sum(b.shape[0] for b in batches)
    return {name: images / seconds for name, seconds in totals.items()}


def extract_once(model: Callable, path: ex.ComputePath, files: Sequence[Path], labels: Sequence[int],
                 backbone: Backbone, *, batch_size: int, num_workers: int) -> tuple[np.ndarray, float, float]:
    """The stage's loop end to end (decode in workers + forward). Returns (features [N, D], seconds,
    decode-only images/s of the same loader)."""
    dataset = eval_dataset("/", [str(f) for f in files], list(labels), backbone.preprocess)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                         prefetch_factor=4 if num_workers else None)
    start = time.perf_counter()
    features = []
    with torch.inference_mode():
        for images, _, _ in loader:
            features.append(ex.forward_features(model, images, path=path, views=("none",),
                                                pad_to=batch_size)["pool"][:, 0])
    seconds = time.perf_counter() - start
    decode_seconds = _seconds(lambda: [None for _ in loader])
    return np.concatenate(features), seconds, len(files) / decode_seconds


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


def bench_backbone(name: str, files: Sequence[Path], labels: Sequence[int], *, batch_size: int, epochs: int,
                   compile_mode: str, capability: dict[str, Any], num_workers: int) -> dict[str, Any]:
    """All measurements for one backbone (see the module docstring)."""
    backbone = get_backbone(name)
    model, weights_note = load_model(backbone)
    dataset = eval_dataset("/", [str(f) for f in files], list(labels), backbone.preprocess)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    batches = list(images.split(batch_size))

    device = ex.resolve_device("auto")
    cores = capability["cores"]
    precision, precision_reason = ex.choose_precision("auto", device=device, capability=ex.read_capability(device))
    candidates = ex.candidate_paths(device, precision)
    auto_model = copy.deepcopy(model)
    torch.set_num_threads(cores)
    start = time.perf_counter()
    with torch.inference_mode():
        path, compiled, selection = ex.select_path(
            auto_model, candidates, batches[:2], n_todo=len(files), compile_mode=compile_mode, views=("none",),
            cores=cores if device == "cpu" else 1, batch_size=batch_size)
    selection_seconds = time.perf_counter() - start  # measuring the candidates (+ compiling)
    threads = torch.get_num_threads()
    auto_runner = compiled if compiled is not None else ex.set_memory_format(auto_model, path)
    eager_path = ex.ComputePath(device, "float32", False)
    rates = interleaved_rates({"eager": (ex.set_memory_format(model, eager_path), eager_path, cores),
                               "auto": (auto_runner, path, threads)}, batches)

    flops = flops_per_image(model, backbone.preprocess.input_size)
    dtype = ex.DTYPES[path.precision]
    torch.set_num_threads(threads)  # the ceiling at the thread count the auto path runs with
    ceiling = matmul_ceiling(dtype) if device == "cpu" else None
    ceiling_fp32 = matmul_ceiling(torch.float32) if device == "cpu" and dtype != torch.float32 else ceiling

    features, extract_seconds, decode_rate = extract_once(auto_runner, path, files, labels, backbone,
                                                          batch_size=batch_size, num_workers=num_workers)

    head_seconds = fit_head(features, labels)
    torch.set_num_threads(cores)  # the seeds ran with torch's default threads
    epoch_seconds = seeds_epoch(model, files, labels, backbone, batch_size=batch_size,
                                num_workers=num_workers, feature_dim=features.shape[1])
    achieved = flops * rates["auto"] / 1e9
    return {
        "backbone": name, "weights": weights_note, "path": path.name, "threads": threads,
        "precision_reason": precision_reason, "candidates": [c.name for c in candidates],
        "selection": selection,
        "eager_fp32_images_per_second": rates["eager"], "auto_images_per_second": rates["auto"],
        "auto_over_eager": rates["auto"] / rates["eager"],
        "gflop_per_image": flops / 1e9, "achieved_gflops": achieved,
        "eager_gflops": flops * rates["eager"] / 1e9,
        "ceiling_dtype": path.precision, "matmul_ceiling_gflops": ceiling, "matmul_ceiling_fp32_gflops": ceiling_fp32,
        "fraction_of_ceiling": achieved / ceiling if ceiling else None,
        "compiled_fraction_of_ceiling": (flops * selection["compile"]["images_per_second"] / 1e9 / ceiling
                                         if ceiling and "images_per_second" in selection["compile"] else None),
        "end_to_end_images_per_second": len(files) / extract_seconds, "decode_images_per_second": decode_rate,
        "bottleneck": "decode" if decode_rate < rates["auto"] else "model",
        "extract_seconds": extract_seconds, "selection_seconds": selection_seconds, "head_seconds": head_seconds,
        "seeds_epoch_seconds": epoch_seconds, "seeds_seconds": epochs * epoch_seconds,
        "extract_once_seconds": selection_seconds + extract_seconds + head_seconds,
        "seeds_over_extract_once": epochs * epoch_seconds / (selection_seconds + extract_seconds + head_seconds),
    }


# ------------------------------------------------------------------------------------ output
def format_table(results: Sequence[dict[str, Any]], *, capability: dict[str, Any], header: dict[str, Any]) -> str:
    """The benchmark as one plain-text table, metrics as rows and backbones as columns."""
    yes = {True: "yes", False: "no"}
    lines = [
        f"CPU: {capability['model']}, {capability['cores']} cores; torch capability "
        f"{capability['torch_capability']}; AVX2 {yes[capability['avx2']]}, AVX512 {yes[capability['avx512']]}, "
        f"AVX512_BF16 {yes[capability['avx512_bf16']]}, AMX_BF16 {yes[capability['amx_bf16']]}, "
        f"AVX512_FP16 {yes[capability['avx512_fp16']]} -> native bf16: {yes[capability['native_bfloat16']]}",
        f"Images: {header['images']}; batch {header['batch_size']}, DataLoader workers {header['workers']}; "
        f"torch {torch.__version__}; eager fp32 runs with {header['cores']} threads (torch's default)",
        "",
    ]

    def fmt(value: Any, digits: int = 1) -> str:
        if value is None:
            return "-"
        return f"{value:,.{digits}f}" if isinstance(value, float) else str(value)

    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("weights", lambda r: r["weights"].split(" (")[0]),
        ("eager fp32 images/s", lambda r: fmt(r["eager_fp32_images_per_second"])),
        ("auto path", lambda r: r["path"]),
        ("auto precision: why", lambda r: r["precision_reason"]),
        ("auto torch threads", lambda r: str(r["threads"])),
        ("auto images/s", lambda r: fmt(r["auto_images_per_second"])),
        ("auto / eager fp32", lambda r: fmt(r["auto_over_eager"], 2) + "x"),
        ("GFLOP per image (flop_counter)", lambda r: fmt(r["gflop_per_image"], 2)),
        ("achieved GFLOP/s, eager fp32", lambda r: fmt(r["eager_gflops"])),
        ("achieved GFLOP/s, auto", lambda r: fmt(r["achieved_gflops"])),
        ("matmul ceiling GFLOP/s (chosen dtype)", lambda r: f"{fmt(r['matmul_ceiling_gflops'])} ({r['ceiling_dtype']})"),
        ("matmul ceiling GFLOP/s (float32)", lambda r: fmt(r["matmul_ceiling_fp32_gflops"])),
        ("auto / ceiling", lambda r: fmt(100 * r["fraction_of_ceiling"], 0) + "%" if r["fraction_of_ceiling"] else "-"),
        ("compile trial (full batch)", lambda r: _compile_cell(r)),
        ("end to end images/s (decode+forward)", lambda r: fmt(r["end_to_end_images_per_second"])),
        ("decode only images/s (the loader)", lambda r: fmt(r["decode_images_per_second"])),
        ("bottleneck", lambda r: r["bottleneck"]),
        (f"seeds: {header['epochs']} epochs, s", lambda r: fmt(r["seeds_seconds"], 1)),
        ("extract once: choose + run + head, s", lambda r: (
            f"{fmt(r['selection_seconds'], 1)} + {fmt(r['extract_seconds'], 1)} + {fmt(r['head_seconds'], 2)}")),
        ("seeds / extract once", lambda r: fmt(r["seeds_over_extract_once"], 1) + "x"),
    ]
    width = max(len(label) for label, _ in rows) + 2
    columns = [max(len(r["backbone"]), *(len(cell(r)) for _, cell in rows)) + 2 for r in results]
    lines.append("".ljust(width) + "".join(r["backbone"].rjust(w) for r, w in zip(results, columns)))
    for label, cell in rows:
        lines.append(label.ljust(width) + "".join(cell(r).rjust(w) for r, w in zip(results, columns)))
    notes = [f"{r['backbone']}: {r['weights']}" for r in results if r["weights"].startswith("random")]
    notes.append(f"seeds: one epoch measured (full decode + augmentation, fp32 eager backbone in train mode, "
                 f"linear head step), times {header['epochs']}; extract once: choosing the path (measuring the "
                 f"candidates, compiling if tried), the stage's loop (decode + forward), then LogisticRegression "
                 f"for C in {list(HEAD_C)}.")
    notes.append("auto and eager are timed batch by batch in turn on the same pre-decoded batches; the CPU may "
                 "be shared with other processes, so compare ratios rather than absolute rates.")
    return "\n".join(lines + [""] + [f"* {n}" for n in notes])


def _compile_cell(result: dict[str, Any]) -> str:
    trial = result["selection"].get("compile", {})
    if not trial.get("tried"):
        return "not tried"
    if "error" in trial:
        return "failed"
    share = result["compiled_fraction_of_ceiling"]
    return (f"{trial['images_per_second']:.1f}/s vs {trial['eager_images_per_second']:.1f}"
            + (f", {100 * share:.0f}% of ceiling" if share else "") + (", kept" if trial["kept"] else ", not kept"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", default=list(DEFAULT_BACKBONES))
    parser.add_argument("--images", type=int, default=None,
                        help="images to time (default: all of hymenoptera, 398; 96 generated without it)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the seeds' loop to compare with")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="as extract.compile; `on` measures torch.compile even where auto would skip it")
    parser.add_argument("--dataset", type=Path, default=None, help="an image folder (default: hymenoptera)")
    parser.add_argument("--json", type=Path, default=None, help="also write all measurements here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    if (args.images is not None and args.images < 2) or args.batch_size < 1:
        print("bench_extract: error: --images must be >= 2 and --batch-size >= 1", file=sys.stderr)
        return 2
    capability = ex.read_cpu_capability()
    torch.set_num_threads(capability["cores"])
    workers = ex.auto_num_workers(ex.resolve_device("auto"), capability["cores"])
    files, labels, description = find_images(args.images, dataset=args.dataset)
    results = []
    for name in args.backbones:
        logger.info("benchmarking %s on %d images", name, len(files))
        results.append(bench_backbone(name, files, labels, batch_size=args.batch_size, epochs=args.epochs,
                                      compile_mode=args.compile, capability=capability, num_workers=workers))
    header = {"images": description, "batch_size": args.batch_size, "cores": capability["cores"],
              "workers": workers, "epochs": args.epochs}
    print(format_table(results, capability=capability, header=header))
    if args.json:
        args.json.write_text(json.dumps({"capability": capability, **header, "results": results}, indent=2,
                                        default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
