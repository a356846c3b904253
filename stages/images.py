"""Image decoding and preprocessing shared by prepare, extract, finetune and predict.

One decoder for the whole project (`load_rgb`; prepare's mean/std and hashes, extract, finetune, audit,
predict and the report's thumbnails all decode through it). The rule, in order:

1. Images over MAX_PIXELS are refused (decompression bomb guard); undecodable files raise ImageDecodeError.
2. EXIF orientation is applied (PIL.ImageOps.exif_transpose), so width/height are as displayed.
3. Depth to 8 bits (`_to_rgb8`):
   - 16-bit grayscale (I;16, I;16B, I;16L: 16-bit PNG and TIFF) -> round(v / 257): 0 -> 0, 65535 -> 255.
   - 32-bit integer (I) -> kept when every value is in [0, 255], else read as 16-bit (round(v / 257)); clipped.
   - 32-bit float (F) -> read as [0, 1] (round(v * 255)) when every value is in [0, 1], else as [0, 255];
     clipped, NaN -> 0.
   - 16-bit RGB PNG/TIFF are reduced to 8-bit RGB by Pillow when it opens them.
4. Transparency (RGBA, LA, PA, palette with tRNS, L/RGB with a tRNS colour) is composited over a white
   background (BACKGROUND); a fully transparent pixel becomes white.
5. Everything else (L, 1, P, CMYK, YCbCr, ...) goes through PIL's `convert("RGB")`; CMYK is converted by
   Pillow's naive formula (an embedded ICC profile is not applied).
"""
from __future__ import annotations

import csv
import hashlib
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from collections.abc import Sequence
from typing import Any, BinaryIO

import numpy as np
import torch
import torchvision
import torchvision.transforms.v2 as T
from PIL import Image, ImageOps, UnidentifiedImageError

from stages.backbones import Preprocess
from stages.io import read_json, sha256_file

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
MAX_PIXELS = 90_000_000  # refuse larger images (PIL's own guard is a warning up to 2x its limit)
AUGMENT_SCALE = (0.35, 1.0)  # RandomResizedCrop area fraction of the augmented training views
MANIFEST_FIELDS = ("path", "class", "label", "split", "sha256", "width", "height")
BACKGROUND = (255, 255, 255)  # what transparent pixels are composited over
_SWAPS_SIDES = frozenset({5, 6, 7, 8})  # EXIF orientations that rotate by 90 or 270 degrees


class ImageDecodeError(ValueError):
    """A file could not be decoded as an image; the message says why."""


class ImageChangedError(ValueError):
    """A file's bytes no longer have the sha256 the manifest recorded (or it cannot be read): re-run prepare."""


class StatsError(ValueError):
    """data/prepared/stats.json is missing or malformed while prepare.normalization is 'dataset'."""


def load_rgb(source: str | Path | BinaryIO, *,
             draft_size: int | None = None) -> tuple[Image.Image, dict[str, Any]]:
    """Decode `source` (a path or an open binary file) to an 8-bit RGB PIL image, EXIF orientation applied.

    `draft_size` lets the JPEG decoder scale down by a power of two while keeping every side at
    least `draft_size` (much faster for large photos; exact for a given size). Returns the image and
    facts about the source: format, mode, whether it was rotated, and `width`/`height` of the full
    decoded image after orientation (pixels; the returned image is smaller when drafted).
    Raises ImageDecodeError with a reason that does not depend on the file's location.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                fmt, mode = image.format, image.mode
                if image.width * image.height > MAX_PIXELS:
                    raise ImageDecodeError(f"{image.width}x{image.height} is over the "
                                           f"{MAX_PIXELS:,}-pixel limit (decompression bomb guard)")
                width, height = image.size
                orientation = image.getexif().get(0x0112, 1)  # before load: Pillow applies TIFF's own on load
                drafted = bool(draft_size) and fmt == "JPEG"
                if drafted:
                    image.draft("RGB", (draft_size, draft_size))
                image.load()
                image = ImageOps.exif_transpose(image)
                rgb = _to_rgb8(image)
                if not drafted:
                    width, height = rgb.size
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"decompression bomb guard: {exc}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image: no decoder recognises its contents") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise ImageDecodeError(f"{type(exc).__name__}: {exc}") from None
    if drafted and orientation in _SWAPS_SIDES:
        width, height = height, width
    return rgb, {"format": fmt, "mode": mode, "rotated": orientation not in (0, 1),
                 "width": width, "height": height}


def _to_rgb8(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB by the module's rule: depth to 8 bits, alpha over BACKGROUND."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        image = Image.fromarray(_depth_to_uint8(image), mode="L")
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", image.size, BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _depth_to_uint8(image: Image.Image) -> np.ndarray:
    """uint8 [H, W] of a 16-bit, 32-bit integer or float grayscale image (step 3 of the module's rule)."""
    array = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        array = np.nan_to_num(array, nan=0.0)
        if array.size and array.min() >= 0.0 and array.max() <= 1.0:
            array = array * 255.0
    elif image.mode.startswith("I;16") or (array.size and (array.max() > 255 or array.min() < 0)):
        array = array / 257.0
    return np.clip(np.round(array), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class ManifestRow:
    path: str
    cls: str
    label: int
    split: str
    sha256: str
    width: int
    height: int


def read_manifest(path: str | Path) -> list[ManifestRow]:
    """Read data/prepared/manifest.csv (written by the prepare stage)."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != MANIFEST_FIELDS:
            raise ValueError(f"{path}: expected columns {','.join(MANIFEST_FIELDS)}; "
                             f"got {reader.fieldnames}. Re-run `dvc repro prepare`.")
        return [ManifestRow(r["path"], r["class"], int(r["label"]), r["split"], r["sha256"],
                            int(r["width"]), int(r["height"])) for r in reader]


def stats_transform(size: int) -> T.Compose:
    """Resize the short side to `size` (bilinear, antialiased) and centre-crop: PIL RGB -> uint8 [3, size, size].

    The pixels over which prepare computes the dataset mean/std (divide by 255 for [0, 1] units).
    """
    return T.Compose([
        T.ToImage(),
        T.Resize(size, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.CenterCrop(size),
    ])


def eval_transform(preprocess: Any) -> T.Compose:
    """Resize short side, centre-crop, scale to [0, 1], normalize: PIL RGB -> float32 [3, H, W]."""
    return T.Compose([
        T.ToImage(),
        T.Resize(preprocess.resize, interpolation=T.InterpolationMode(preprocess.interpolation),
                 antialias=True),
        T.CenterCrop(preprocess.input_size),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(list(preprocess.mean), list(preprocess.std)),
    ])


def train_transform(preprocess: Any) -> T.Compose:
    """RandomResizedCrop + horizontal flip, then the same scaling and normalization as eval."""
    return T.Compose([
        T.ToImage(),
        T.RandomResizedCrop(preprocess.input_size,
                            interpolation=T.InterpolationMode(preprocess.interpolation), antialias=True),
        T.RandomHorizontalFlip(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(list(preprocess.mean), list(preprocess.std)),
    ])


class ImageDataset(torch.utils.data.Dataset):
    """Images listed by relative path under `root`, decoded with `load_rgb` and transformed."""

    def __init__(self, root: str | Path, paths: list[str], labels: list[int], transform: Any, *,
                 draft_size: int | None = None) -> None:
        self.root = Path(root)
        self.paths = paths
        self.labels = labels
        self.transform = transform
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        image, _ = load_rgb(self.root / self.paths[index], draft_size=self.draft_size)
        return self.transform(image), self.labels[index], index


def eval_dataset(root: str | Path, paths: list[str], labels: list[int], preprocess: Any) -> ImageDataset:
    """The project's one eval preprocessing (extract, evaluation and predict all use it, so predictions
    equal the head's): JPEG draft-decoded at the resize size, then `eval_transform`. Items are
    (float32 [3, input_size, input_size], label, index)."""
    return ImageDataset(root, paths, labels, eval_transform(preprocess), draft_size=preprocess.resize)


def dataset_preprocess(preprocess: Preprocess, normalization: str, stats_path: Path) -> Preprocess:
    """The backbone's preprocessing, with the dataset mean/std from stats.json when
    `prepare.normalization` is 'dataset'."""
    if normalization != "dataset":
        return preprocess
    try:
        stats = read_json(stats_path)
        mean, std = tuple(float(v) for v in stats["mean"]), tuple(float(v) for v in stats["std"])
    except FileNotFoundError:
        raise StatsError(f"prepare.normalization is 'dataset' but {stats_path} does not exist; "
                           f"run `dvc repro prepare` first.") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise StatsError(f"{stats_path}: expected {{\"mean\": [r, g, b], \"std\": [r, g, b]}}; "
                           f"could not read it ({exc}). Re-run `dvc repro prepare`.") from None
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise StatsError(f"{stats_path}: expected 3 means and 3 positive stds; got mean={mean}, std={std}")
    return replace(preprocess, mean=mean, std=std)


# ------------------------------------------------------------------------------------ checked datasets
class EvalImages(torch.utils.data.Dataset):
    """The manifest's images through the project's one eval preprocessing (stages.images.eval_dataset),
    each file's bytes checked against the manifest sha256 first. Items: (image [3, H, W], index)."""

    def __init__(self, raw: Path, rows: Sequence[ManifestRow], preprocess: Preprocess) -> None:
        self.raw, self.rows = Path(raw), list(rows)
        self.images = eval_dataset(raw, [r.path for r in self.rows], [r.label for r in self.rows], preprocess)

    def __len__(self) -> int:
        return len(self.rows)

    def check(self, index: int) -> None:
        """Raise ImageChangedError unless the file's bytes still have the manifest's sha256."""
        row = self.rows[index]
        path = self.raw / row.path
        try:
            actual = sha256_file(path)
        except OSError as exc:
            raise ImageChangedError(f"{path}: cannot read it ({exc}); re-run `dvc repro prepare`.") from None
        if actual != row.sha256:
            raise ImageChangedError(f"{path} changed since prepare: manifest sha256 {row.sha256}, file {actual}; "
                               f"re-run `dvc repro prepare`.")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        self.check(index)
        path = self.raw / self.rows[index].path
        try:
            image, _, _ = self.images[index]
        except ImageDecodeError as exc:
            raise ImageDecodeError(f"{path}: {exc}") from None
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
            raise ImageDecodeError(f"{self.raw / row.path}: {exc}") from None
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


def augment_spec(views: int) -> dict[str, Any]:
    """What the augmented training views are (attr `augment` of the features file, and part of their rows'
    provenance): `views` per train image, RandomResizedCrop scale/ratio, flip probability, the seed rule."""
    if views == 0:
        return {"views": 0}
    return {"views": views, "scale": list(AUGMENT_SCALE), "ratio": [3 / 4, 4 / 3], "hflip": 0.5,
            "seed": "torch.manual_seed(int.from_bytes(sha256(f'{image sha256}:{view}').digest()[:8], 'little'))",
            "transforms": f"torchvision {torchvision.__version__} transforms.v2: RandomResizedCrop(input_size, "
                          f"scale, ratio, preprocess.interpolation, antialias=True), RandomHorizontalFlip(0.5), "
                          f"scale to [0, 1], Normalize(mean, std)"}
