"""Classify images with an exported classifier: backbone + the extract stage's preprocessing + the head.

    python -m stages.predict IMAGE_OR_FOLDER [--model models/<bb>/classifier.pt] [--topk 3] [--json]
                             [--engine torch|onnxruntime]

Without --model the one `models/*/classifier.pt` under the working directory is used. A folder is searched
recursively for image files (stages.images.IMAGE_EXTENSIONS), sorted by path.

Engines: `torch` rebuilds the classifier from classifier.pt (loaded with weights_only=True); `onnxruntime` runs
the classifier.onnx beside it (or a .onnx given with --model) and reads classes and preprocessing from its
metadata. Both print the same format. `auto` (the default) takes torch on CUDA when present, else onnxruntime
when the classifier.onnx is there (the head stage wrote it only after it matched classifier.pt within 1e-4 on
held-out images; on 2 CPU cores it ran 200 images in 18 s against torch eager's 45 s), else torch: a rule by
what is installed, never a timing. The files and their format: stages/export.py.

Images are decoded by DataLoader workers (up to 2, for 64 images or more) while the model computes.

Images are decoded and transformed by stages.images.eval_dataset, exactly as the extract stage does, so
predictions on the validation images equal the head stage's.
"""
from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from stages.hardware import available_cores
from stages.export import ExportedClassifier, ExportError, load_classifier
from stages.export_onnx import OnnxClassifier, load_onnx, onnx_path_for
from stages.images import IMAGE_EXTENSIONS, ImageDecodeError, eval_dataset
from stages.io import progress, setup_logging

logger = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "onnxruntime")
PARALLEL_DECODE_MIN = 64  # images from which decoding runs in DataLoader workers


# ------------------------------------------------------------------------------------------------ predict
def find_images(target: str | Path) -> list[Path]:
    """`target` itself when it is a file, else every image file below it (recursively), sorted."""
    target = Path(target)
    if target.is_file():
        return [target]
    if not target.is_dir():
        raise FileNotFoundError(f"{target} is neither an image file nor a folder")
    return sorted(p for p in target.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


class _Tolerant(torch.utils.data.Dataset):
    """Items (index, image tensor or None, error message or None): a file that does not decode is reported,
    not raised, so one bad file does not stop a folder."""

    def __init__(self, images: torch.utils.data.Dataset) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return index, self.images[index][0], None
        except ImageDecodeError as exc:
            return index, None, str(exc)


def _as_list(items: list[Any]) -> list[Any]:
    return items


@torch.inference_mode()
def predict_images(model: ExportedClassifier | OnnxClassifier, paths: Sequence[Path], *, topk: int = 3,
                   batch_size: int = 16, device: torch.device = torch.device("cpu")) -> list[dict[str, Any]]:
    """One result per path: {"path", "class", "probability", "topk": [{"class", "probability"}]} or
    {"path", "error"} for a file that does not decode. `model`: either engine's classifier (stages.export)."""
    model = model.to(device)
    k = max(1, min(topk, len(model.classes)))
    images = _Tolerant(eval_dataset(Path("."), [str(p) for p in paths], [0] * len(paths), model.preprocess))
    workers = min(2, available_cores()) if len(paths) >= PARALLEL_DECODE_MIN else 0
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         collate_fn=_as_list)
    results: list[dict[str, Any]] = [{} for _ in paths]
    with progress(total=len(paths), desc="predict", unit="img") as bar:
        for batch in loader:
            good = [(index, tensor) for index, tensor, _ in batch if tensor is not None]
            for index, _, error in batch:
                if error is not None:
                    results[index] = {"path": str(paths[index]), "error": error}
            if good:
                probabilities = model(torch.stack([t for _, t in good]).to(device)).cpu()
                values, indices = probabilities.topk(k, dim=1)
                for (index, _), row_values, row_indices in zip(good, values.tolist(), indices.tolist()):
                    top = [{"class": model.classes[i], "probability": p} for p, i in zip(row_values, row_indices)]
                    results[index] = {"path": str(paths[index]), "class": top[0]["class"],
                                      "probability": top[0]["probability"], "topk": top}
            bar.update(len(batch))
    return results


def resolve_engine(engine: str, model_path: Path, *, device: str) -> str:
    """`--engine auto`: torch on CUDA (when asked for or present), onnxruntime for a .onnx or when the
    classifier.onnx beside the .pt exists and onnxruntime imports, else torch. Other values pass through."""
    if engine != "auto":
        return engine
    if model_path.suffix == ".onnx":
        return "onnxruntime"
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return "torch"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "torch"
    return "onnxruntime" if onnx_path_for(model_path).is_file() else "torch"


def default_model_path(root: Path = Path(".")) -> Path:
    """The only `models/*/classifier.pt` under `root`; an error naming the candidates otherwise."""
    found = sorted((root / "models").glob("*/classifier.pt"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise ExportError(f"no {root / 'models'}/*/classifier.pt found; run `dvc repro` or pass --model")
    raise ExportError(f"several exported classifiers: {', '.join(map(str, found))}; choose one with --model")


def format_text(results: Sequence[dict[str, Any]]) -> str:
    """One line per image: `path: class prob, class prob, ...` (or `path: error: ...`)."""
    lines = []
    for result in results:
        if "error" in result:
            lines.append(f"{result['path']}: error: {result['error']}")
        else:
            top = ", ".join(f"{t['class']} {t['probability']:.4f}" for t in result["topk"])
            lines.append(f"{result['path']}: {top}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages.predict", description=__doc__.split("\n")[0])
    parser.add_argument("target", metavar="IMAGE_OR_FOLDER", help="an image file or a folder of images")
    parser.add_argument("--model", type=Path, default=None,
                        help="exported classifier (default: the only models/*/classifier.pt); with --engine "
                             "onnxruntime the classifier.onnx beside it, or a .onnx file")
    parser.add_argument("--engine", default="auto", choices=ENGINES,
                        help="auto (default): torch on CUDA, else onnxruntime when classifier.onnx is there, else "
                             "torch; torch: classifier.pt; onnxruntime: classifier.onnx")
    parser.add_argument("--topk", type=int, default=3, help="classes to show per image (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="torch engine only; onnxruntime runs on the CPU")
    args = parser.parse_args(argv)
    if args.topk < 1 or args.batch_size < 1:
        parser.error(f"--topk and --batch-size must be at least 1; got {args.topk} and {args.batch_size}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        model_path = args.model or default_model_path()
        model: ExportedClassifier | OnnxClassifier
        engine = resolve_engine(args.engine, model_path, device=args.device)
        logger.info("engine: %s (--engine %s)", engine, args.engine)
        if engine == "onnxruntime":
            model_path = onnx_path_for(model_path)
            model = load_onnx(model_path)
        elif model_path.suffix == ".onnx":
            raise ExportError(f"{model_path} is an ONNX model: run it with --engine onnxruntime, or pass the "
                              f"classifier.pt beside it")
        else:
            model = load_classifier(model_path)
        paths = find_images(args.target)
        if not paths:
            raise FileNotFoundError(f"{args.target} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        cuda = engine == "torch" and (args.device == "cuda" or (args.device == "auto" and
                                                                    torch.cuda.is_available()))
        results = predict_images(model, paths, topk=args.topk, batch_size=args.batch_size,
                                 device=torch.device("cuda" if cuda else "cpu"))
    except (ExportError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return 1
    if args.json:
        print(json.dumps({"model": str(model_path), "engine": engine, "backbone": model.name,
                          "classes": model.classes, "predictions": results}, indent=2))
    else:
        print(format_text(results))
    failed = sum("error" in r for r in results)
    if failed:
        logger.warning("%d of %d images could not be decoded", failed, len(results))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
