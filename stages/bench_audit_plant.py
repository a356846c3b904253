"""Planted problems for the audit benchmark (stages/bench_audit.py): near-duplicate copies, off-topic images and a
generated image set, written to disk with a fixed seed. Label flips are planted later, on the rows (bench_audit).

Near-duplicates: each copy applies one transform of TRANSFORMS (drawn in turn), then is saved as JPEG at a quality
drawn from 30-95:
    resize     30-90% of each side
    jpeg       only the re-encode (quality 30-60 for this one)
    crop       70-100% of each side kept, at a random offset
    rotate     90, 180 or 270 degrees, or a small tilt of 3-12 degrees (corners filled with the mean colour)
    mirror     left-right flip
    colour     brightness, contrast and saturation x0.75-1.25 each, a hue shift of up to 8%
    border     a flat border (3-10% of the short side per edge, random colour) around the whole picture
    watermark  a semi-transparent text and a bar drawn over 10-25% of the picture
Off-topic images: a pool of images from another source: another dataset's images, generated textures (smoothed noise,
checkerboards, gradients, stripes) and drawn placeholders (an "image not found" card, flat grey, a page of text).
"""
from __future__ import annotations

import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from stages.images import IMAGE_EXTENSIONS, load_rgb

SPLIT_FOLDERS = ("train", "val", "valid", "validation", "test")
TRANSFORMS = ("resize", "jpeg", "crop", "rotate", "mirror", "colour", "border", "watermark")
DUPLICATE_FRACTION = 0.08  # of the images get a near-duplicate copy
OFF_TOPIC_POOL = 24  # off-topic images written per dataset (each trial of the benchmark includes a few)
TEXTURES = ("noise", "checker", "gradient", "stripes")
PLACEHOLDERS = ("not_found", "grey", "text")
GENERATED_CLASSES = ("circles", "squares", "stripes", "triangles", "dots")


@dataclass
class Planted:
    """What was planted, as paths relative to the corrupted copy's root."""
    duplicates: list[tuple[str, str, str]] = field(default_factory=list)  # (original, copy, transform)
    off_topic: list[tuple[str, str]] = field(default_factory=list)  # (path, what it is)

    def touched(self) -> set[str]:
        return {c for _, c, _ in self.duplicates} | {p for p, _ in self.off_topic}

    def as_json(self) -> dict[str, list]:
        return {"duplicates": [list(d) for d in self.duplicates], "off_topic": [list(o) for o in self.off_topic]}


def list_images(root: Path) -> list[str]:
    """Image files under root (relative POSIX paths, sorted), hidden files skipped."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def class_of(rel: str) -> str:
    return rel.split("/")[-2]


# ------------------------------------------------------------------------------------------------ transforms
def _rotate(image: Image.Image, rng: random.Random) -> Image.Image:
    if rng.random() < 0.5:
        return image.transpose(rng.choice([Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180,
                                           Image.Transpose.ROTATE_270]))
    mean = tuple(int(v) for v in np.asarray(image).reshape(-1, 3).mean(0))
    angle = rng.uniform(3, 12) * rng.choice([-1, 1])
    return image.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=mean)


def _colour(image: Image.Image, rng: random.Random) -> Image.Image:
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhancer(image).enhance(rng.uniform(0.75, 1.25))
    hsv = np.asarray(image.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(int) + round(rng.uniform(-0.08, 0.08) * 255)) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def _border(image: Image.Image, rng: random.Random) -> Image.Image:
    pad = max(2, round(rng.uniform(0.03, 0.10) * min(image.size)))
    colour = tuple(rng.randrange(256) for _ in range(3))
    out = Image.new("RGB", (image.width + 2 * pad, image.height + 2 * pad), colour)
    out.paste(image, (pad, pad))
    return out


def _watermark(image: Image.Image, rng: random.Random) -> Image.Image:
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    w, h = image.size
    bar = rng.uniform(0.10, 0.25) * h
    top = rng.uniform(0, h - bar)
    draw.rectangle((0, top, w, top + bar), fill=(255, 255, 255, rng.randrange(60, 140)))
    draw.text((w * 0.05, top + bar * 0.3), "(c) stock photo " * 3, fill=(0, 0, 0, 180))
    return Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB")


def near_duplicate(image: Image.Image, how: str, rng: random.Random) -> tuple[Image.Image, int]:
    """A near-duplicate of an RGB image made by `how` (one of TRANSFORMS) and the JPEG quality to save it at."""
    quality = rng.randint(30, 60) if how == "jpeg" else rng.randint(30, 95)
    if how == "resize":
        scale = rng.uniform(0.3, 0.9)
        return image.resize((max(8, round(image.width * scale)), max(8, round(image.height * scale))),
                            Image.Resampling.BILINEAR), quality
    if how == "jpeg":
        return image, quality
    if how == "crop":
        fw, fh = rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0)
        w, h = image.size
        left, top = rng.uniform(0, 1 - fw) * w, rng.uniform(0, 1 - fh) * h
        return image.crop((round(left), round(top), round(left + fw * w), round(top + fh * h))), quality
    if how == "rotate":
        return _rotate(image, rng), quality
    if how == "mirror":
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), quality
    if how == "colour":
        return _colour(image, rng), quality
    if how == "border":
        return _border(image, rng), quality
    if how == "watermark":
        return _watermark(image, rng), quality
    raise ValueError(f"unknown transform {how!r}; one of {TRANSFORMS}")


# ------------------------------------------------------------------------------------------------ generated images
def texture(kind: str, rng: random.Random, size: int = 256) -> Image.Image:
    """A generated texture (one of TEXTURES): smoothed colour noise, a checkerboard, a gradient or stripes."""
    g = np.random.default_rng(rng.randrange(2 ** 32))
    if kind == "noise":
        cells = g.integers(0, 256, (rng.randint(4, 16),) * 2 + (3,)).astype(np.uint8)
        return Image.fromarray(cells).resize((size, size), Image.Resampling.BICUBIC)
    yy, xx = np.mgrid[0:size, 0:size] / size
    a, b = g.integers(0, 256, 3), g.integers(0, 256, 3)
    if kind == "checker":
        n = rng.randint(3, 12)
        mask = ((xx * n).astype(int) + (yy * n).astype(int)) % 2
    elif kind == "gradient":
        mask = (xx * np.cos(rng.uniform(0, 3.14)) + yy * np.sin(rng.uniform(0, 3.14))) % 1.0
    elif kind == "stripes":
        mask = (np.sin((xx + yy * rng.uniform(-1, 1)) * rng.uniform(10, 60)) > 0).astype(float)
    else:
        raise ValueError(f"unknown texture {kind!r}; one of {TEXTURES}")
    pixels = a[None, None] * (1 - mask[..., None]) + b[None, None] * mask[..., None]
    return Image.fromarray(pixels.astype(np.uint8))


def placeholder(kind: str, rng: random.Random) -> Image.Image:
    """A drawn placeholder (one of PLACEHOLDERS) of a random size: an "image not found" card, flat grey (a random
    level), or a page of text."""
    size = (rng.randint(200, 400), rng.randint(200, 400))
    if kind == "grey":
        return Image.new("RGB", size, (rng.randint(60, 200),) * 3)
    image = Image.new("RGB", size, (rng.randint(230, 255),) * 3)
    draw = ImageDraw.Draw(image)
    w, h = size
    if kind == "text":
        for line in range(12):
            draw.text((w * 0.08, h * (0.06 + 0.075 * line)), "Lorem ipsum dolor sit amet, consectetur", fill=0)
        return image
    draw.rectangle((w * 0.3, h * 0.2, w * 0.7, h * 0.55), outline=(170, 170, 170), width=4)
    draw.line((w * 0.3, h * 0.2, w * 0.7, h * 0.55), fill=(170, 170, 170), width=4)
    draw.line((w * 0.3, h * 0.55, w * 0.7, h * 0.2), fill=(170, 170, 170), width=4)
    draw.text((w * 0.22, h * 0.68), "Image not found", fill=(90, 90, 90))
    return image


def shape_picture(cls: str, rng: random.Random, size: int = 192) -> Image.Image:
    """One image of a generated class (GENERATED_CLASSES): shapes of that kind, random colours, places and sizes,
    on a noisy textured background."""
    g = np.random.default_rng(rng.randrange(2 ** 32))
    background = texture("noise", rng, size).filter(ImageFilter.GaussianBlur(6))
    image = Image.blend(background, Image.new("RGB", (size, size), tuple(g.integers(0, 256, 3).tolist())), 0.5)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 4)):
        colour = tuple(g.integers(0, 256, 3).tolist())
        r = rng.uniform(0.1, 0.3) * size
        x, y = rng.uniform(r, size - r), rng.uniform(r, size - r)
        if cls == "circles":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        elif cls == "squares":
            draw.rectangle((x - r, y - r, x + r, y + r), fill=colour)
        elif cls == "triangles":
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colour)
        elif cls == "stripes":
            for k in range(-4, 5):
                draw.line((x - r + k * r / 4, y - r, x - r + k * r / 4 + r, y + r), fill=colour, width=3)
        elif cls == "dots":
            for _ in range(12):
                dx, dy = rng.uniform(-r, r), rng.uniform(-r, r)
                draw.ellipse((x + dx - 4, y + dy - 4, x + dx + 4, y + dy + 4), fill=colour)
        else:
            raise ValueError(f"unknown generated class {cls!r}; one of {GENERATED_CLASSES}")
    noise = g.normal(0, 8, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(image, np.float64) + noise, 0, 255).astype(np.uint8))


def write_generated_set(dest: Path, *, per_class: int = 60, seed: int = 0) -> Path:
    """dest/<class>/<class>_NNN.jpg, `per_class` images of each GENERATED_CLASSES class (no split folders)."""
    if dest.exists():
        shutil.rmtree(dest)
    rng = random.Random(seed)
    for cls in GENERATED_CLASSES:
        (dest / cls).mkdir(parents=True)
        for i in range(per_class):
            shape_picture(cls, rng).save(dest / cls / f"{cls}_{i:03d}.jpg", quality=90)
    return dest


# ------------------------------------------------------------------------------------------------ planting
def off_topic_images(others: list[Path], rng: random.Random, n: int = OFF_TOPIC_POOL
                     ) -> list[tuple[Image.Image, str]]:
    """n off-topic images: half from the other datasets (when given), the rest generated textures and placeholders
    in turn, each with a description."""
    found = [(root, rel) for root in others for rel in list_images(root) if rel.lower().endswith((".jpg", ".jpeg"))]
    picked = rng.sample(found, min(len(found), n // 2))
    out = [(load_rgb(root / rel)[0], f"{root.name}/{rel}") for root, rel in picked]
    kinds = [("texture", t) for t in TEXTURES] + [("placeholder", p) for p in PLACEHOLDERS]
    while len(out) < n:
        family, kind = kinds[len(out) % len(kinds)]
        out.append((texture(kind, rng) if family == "texture" else placeholder(kind, rng), f"{family} {kind}"))
    return out


def plant_images(source: Path, dest: Path, *, others: list[Path], seed: int = 0,
                 duplicate_fraction: float = DUPLICATE_FRACTION, n_off_topic: int = OFF_TOPIC_POOL) -> Planted:
    """Copy `source` to `dest` and write near-duplicate copies and a pool of off-topic images (the module doc).
    With split folders every other copy goes into another split folder (leakage). Originals of duplicates are
    distinct pictures; off-topic images go into random training class folders."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns(".*"))
    rng = random.Random(seed)
    images = [p for p in list_images(dest) if p.lower().endswith((".jpg", ".jpeg"))]
    split_layout = images[0].split("/")[0] in SPLIT_FOLDERS
    splits = sorted({p.split("/")[0] for p in images}) if split_layout else [""]
    pool = list(images)
    rng.shuffle(pool)
    planted = Planted()
    for i, original in enumerate(pool[:max(2, round(duplicate_fraction * len(images)))]):
        how = TRANSFORMS[i % len(TRANSFORMS)]
        folder = Path(original).parent.as_posix()
        if split_layout and i % 2 == 1 and len(splits) > 1:
            split = original.split("/")[0]
            folder = f"{rng.choice([s for s in splits if s != split])}/{class_of(original)}"
        copy, quality = near_duplicate(load_rgb(dest / original)[0], how, rng)
        rel = f"{folder}/{Path(original).stem}_copy.jpg"
        if (dest / rel).exists():  # the same name in another split, or that one's copy: keep both
            rel = f"{folder}/{Path(original).stem}_copy{i}.jpg"
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        copy.save(dest / rel, quality=quality)
        planted.duplicates.append((original, rel, how))
    train_folders = sorted({Path(p).parent.as_posix() for p in images if not split_layout or p.startswith("train/")})
    for i, (image, what) in enumerate(off_topic_images(others, rng, n_off_topic)):
        target = f"{rng.choice(train_folders)}/offtopic_{i:02d}.jpg"
        image.convert("RGB").save(dest / target, quality=90)
        planted.off_topic.append((target, what))
    return planted
