"""Image decoding and preprocessing shared by prepare, extract, finetune and predict.

One decoder for the whole project: EXIF orientation applied; grayscale, palette, CMYK, 16-bit and
alpha images converted to 8-bit RGB; decompression bombs refused.
"""
from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torchvision.transforms.v2 as T
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
MAX_PIXELS = 90_000_000  # refuse larger images (PIL's own guard is a warning up to 2x its limit)
MANIFEST_FIELDS = ("path", "class", "label", "split", "sha256", "width", "height")
_SWAPS_SIDES = frozenset({5, 6, 7, 8})  # EXIF orientations that rotate by 90 or 270 degrees


class ImageDecodeError(ValueError):
    """A file could not be decoded as an image; the message says why."""


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
                if draft_size and fmt == "JPEG":
                    image.draft("RGB", (draft_size, draft_size))
                image.load()
                orientation = image.getexif().get(0x0112, 1)
                image = ImageOps.exif_transpose(image)
                rgb = _to_rgb8(image)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"decompression bomb guard: {exc}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image: no decoder recognises its contents") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise ImageDecodeError(f"{type(exc).__name__}: {exc}") from None
    if orientation in _SWAPS_SIDES:
        width, height = height, width
    return rgb, {"format": fmt, "mode": mode, "rotated": orientation not in (0, 1),
                 "width": width, "height": height}


def _to_rgb8(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; alpha is composited on white, 16-bit is scaled."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        scale = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(np.round(array / scale * 255.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(array, mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB") if image.mode != "RGB" else image


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
