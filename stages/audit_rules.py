"""The audit's decision rules (stages/audit.py): every threshold comes from the dataset's own score distribution.

One statistic does it: the robust z-score (Iglewicz and Hoaglin's modified z), (value - median) / (1.4826 MAD),
taken over a reference sample that is mostly ordinary (the bulk of the dataset, or pairs that are known not to be
copies). A finding is a value past `z` of them, `z` one number for every dataset (audit.duplicate_z, audit.outlier_z;
3.5 is Iglewicz and Hoaglin's cut-off): what is unusual is judged against that dataset's spread, not against a
constant fitted to the development sets.

Near-duplicates (pairs), all searches through stages.neighbours.cosine_search, so the cost grows as n (exact) or
n sqrt(n) (an inverted-file index past 50,000 images):
1. Feature evidence: for each of an image's k nearest neighbours (cosine of the features), the distance relative to
   the local scale of both images, log(d_ij / sqrt(d_i,k d_j,k)) with d_i,k the distance to the k-th neighbour
   (a copy is much nearer than the image's other neighbours; scale-free, so a dataset whose bulk cosine is high is
   judged by its own spread). Its robust z over every neighbour pair.
2. Pixel evidence: each image as a 24x24 grayscale thumbnail, zero mean and unit norm (a dot product is the Pearson
   correlation); its 8 rotations and mirrors are searched against every image's thumbnail (a rotated or mirrored
   copy is found). The correlation's Fisher z (atanh) as a robust z over every neighbour pair.
3. Candidates: pairs whose feature or pixel evidence is past z / 2 (cheap evidence, generous).
4. Confirmation (pixel_similarity): the best correlation over crop windows (70-100% of each side, 5 offsets) of
   either image against the other's whole thumbnail, its rotations, mirrors and small tilts; confirmed when its
   Fisher z is past `z` robust z-scores of a null sample: the same statistic for images against their k-th pixel
   neighbour (look-alikes that are not copies), and above MIN_CORRELATION (a floor for tiny or very unlike sets).

Outliers (stages/audit.py): score = the median cosine distance to the k nearest other images; flagged when its
robust z over the dataset is above `z`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from stages.neighbours import cosine_search

MAD_SCALE = 1.4826  # MAD -> standard deviation for normal data
WINDOW_SIDE = 64  # images squeezed to this square (pixels) before the crop windows
WINDOW_ZOOMS = (1.0, 0.93, 0.86, 0.78, 0.7)  # crop windows: these fractions of each side,
WINDOW_OFFSETS = 5  # at this many offsets per side (one for the whole side),
THUMB_SIDE = 24  # each resized to this square thumbnail (pixels)
TILTS = (-6.0, 6.0)  # degrees: small rotations of the whole thumbnail also compared
DETAIL_SIGMA = 3.0  # pixels of the thumbnail: the blur subtracted before correlating
NULL_SAMPLE = 256
MIN_CORRELATION = 0.75  # a floor under the confirmation threshold: with few or very unlike images the null's
#                         spread is poorly measured, and a copy's detail thumbnails correlate far above this anyway  # images whose k-th pixel neighbour gives the null of the confirmation


def robust_z(values: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """(values - median) / (1.4826 MAD), median and MAD of `reference` (default: values); float64. A reference
    with no spread (MAD 0) uses the mean absolute deviation, then 1e-12, so that ties give 0 and anything else a
    large |z|."""
    values = np.asarray(values, dtype=np.float64)
    ref = values if reference is None else np.asarray(reference, dtype=np.float64)
    if ref.size == 0:
        return np.zeros_like(values)
    median = np.median(ref)
    spread = MAD_SCALE * np.median(np.abs(ref - median))
    if spread <= 0:
        spread = 1.2533 * np.mean(np.abs(ref - median))  # mean absolute deviation -> standard deviation
    return (values - median) / max(spread, 1e-12)


# ------------------------------------------------------------------------------------------------ thumbnails
@dataclass(frozen=True)
class Thumbs:
    """An image's pixel descriptor: `windows` [W, T*T] (crop windows, row 0 the whole image) and `views` [V, T*T]
    (the whole image's 8 rotations and mirrors, then the small tilts), every row zero mean and unit norm."""
    windows: np.ndarray
    views: np.ndarray


def crop_boxes(side: int = WINDOW_SIDE, zooms: Sequence[float] = WINDOW_ZOOMS,
               offsets: int = WINDOW_OFFSETS) -> list[tuple[float, ...]]:
    """(left, top, right, bottom) windows of a side x side image: every combination of a width and a height from
    `zooms` (fractions of the side) at 1 (zoom 1) or `offsets` evenly spaced offsets; the whole image first."""
    spans = []
    for zoom in zooms:
        width = zoom * side
        spans += [(float(o), float(o + width)) for o in np.linspace(0, side - width, 1 if zoom == 1 else offsets)]
    return [(x0, y0, x1, y1) for x0, x1 in spans for y0, y1 in spans]


def _standardize(rows: np.ndarray) -> np.ndarray:
    """Flat THUMB_SIDE px thumbnails [R, T*T] less their blur (DETAIL_SIGMA px: the shape of the subject, which
    unrelated look-alikes share, is removed and the detail kept), then zero mean and unit norm per row."""
    from scipy.ndimage import gaussian_filter

    squares = rows.reshape(-1, THUMB_SIDE, THUMB_SIDE)
    rows = (squares - gaussian_filter(squares, sigma=(0, DETAIL_SIGMA, DETAIL_SIGMA), mode="nearest")).reshape(
        len(rows), -1)
    rows = rows - rows.mean(1, keepdims=True)
    return (rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-6)).astype(np.float32)


def gray_square(image: Image.Image) -> Image.Image:
    """The image in grayscale (float), squeezed to WINDOW_SIDE x WINDOW_SIDE."""
    return image.convert("L").resize((WINDOW_SIDE, WINDOW_SIDE), Image.Resampling.BOX).convert("F")


SEARCH_BOXES = [(0.0, 0.0, 1.0, 1.0)] + [(x, y, x + 0.8, y + 0.8) for y in (0.0, 0.1, 0.2) for x in (0.0, 0.1, 0.2)]


def search_thumbnails(image: Image.Image) -> np.ndarray:
    """[S, T*T] float32: standardized THUMB_SIDE px grayscale thumbnails of the whole image (row 0) and of its
    80% windows at 3 x 3 offsets (SEARCH_BOXES, fractions of the side): what the pixel neighbour search indexes, so
    that a bordered copy or a crop finds its original."""
    gray = gray_square(image)
    rows = [np.asarray(gray.resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BILINEAR,
                                   box=tuple(WINDOW_SIDE * v for v in box)), np.float32).ravel()
            for box in SEARCH_BOXES]
    return _standardize(np.stack(rows))


def dihedral(thumbnail: np.ndarray) -> np.ndarray:
    """[8, T*T]: a flat thumbnail's 4 rotations and the 4 rotations of its mirror (the identity first)."""
    square = thumbnail.reshape(THUMB_SIDE, THUMB_SIDE)
    return np.stack([np.rot90(m, r).ravel() for m in (square, square[:, ::-1]) for r in range(4)])


def thumbnail_windows(image: Image.Image) -> Thumbs:
    """The pixel descriptor of an image (Thumbs): crop windows (crop_boxes) and views of the whole."""
    gray = gray_square(image)
    windows = np.stack([np.asarray(gray.resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BILINEAR, box=box),
                                   np.float32).ravel() for box in crop_boxes()])
    whole = gray.resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BILINEAR)
    tilts = [np.asarray(whole.rotate(a, Image.Resampling.BILINEAR, fillcolor=float(np.mean(whole))), np.float32)
             .ravel() for a in TILTS]
    windows = _standardize(windows)
    return Thumbs(windows=windows, views=np.concatenate([dihedral(windows[0]), _standardize(np.stack(tilts))]))


def pixel_similarity(a: Thumbs, b: Thumbs) -> float:
    """The best correlation of any crop window of one image with any view of the whole other one."""
    return float(max((a.windows @ b.views.T).max(), (b.windows @ a.views.T).max()))


def fisher(r: np.ndarray | float) -> np.ndarray:
    """atanh of a correlation, clipped to +-0.9999 (makes correlations near 1 comparable on a linear scale)."""
    return np.arctanh(np.clip(np.asarray(r, dtype=np.float64), -0.9999, 0.9999))


# ------------------------------------------------------------------------------------------------ duplicate rules
def neighbour_pairs(sims: np.ndarray, idx: np.ndarray) -> dict[tuple[int, int], float]:
    """{(i, j) with i < j: the largest similarity} over the neighbour lists sims / idx [N, k] (-1 = none)."""
    pairs: dict[tuple[int, int], float] = {}
    for i, r in zip(*np.nonzero(idx >= 0)):
        a, b = sorted((int(i), int(idx[i, r])))
        if a != b:
            pairs[(a, b)] = max(pairs.get((a, b), -np.inf), float(sims[i, r]))
    return pairs


def feature_evidence(sims: np.ndarray, idx: np.ndarray) -> dict[tuple[int, int], float]:
    """{(i, j): robust z of log(d_ij / sqrt(d_i,k d_j,k))} over every pair of the feature neighbour lists sims /
    idx [N, k] (cosine similarities, descending); d = 1 - cosine, d_i,k the distance to i's last neighbour.
    Negative: nearer than the two images' own neighbourhoods."""
    found = idx >= 0
    distance = np.maximum(1.0 - sims.astype(np.float64), 1e-6)
    last = np.where(found.any(1), np.take_along_axis(distance, np.maximum(found.sum(1) - 1, 0)[:, None], 1)[:, 0],
                    1.0)
    pairs = neighbour_pairs(sims, idx)
    if not pairs:
        return {}
    keys = list(pairs)
    a, b = np.array([k[0] for k in keys]), np.array([k[1] for k in keys])
    ratio = np.log(np.maximum(1.0 - np.array([pairs[k] for k in keys]), 1e-6) / np.sqrt(last[a] * last[b]))
    return dict(zip(keys, robust_z(ratio).tolist()))


def pixel_neighbours(thumbnails: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each image's k most correlated other images from search thumbnails [N, S, T*T] (search_thumbnails): the 8
    rotations and mirrors of its whole thumbnail are searched against every image's S thumbnails
    (stages.neighbours.cosine_search), the best correlation per other image kept: (correlations [N, k] descending,
    indices [N, k]; -inf / -1 where fewer were found)."""
    n, views = thumbnails.shape[:2]
    k = int(min(k, n - 1))
    if k < 1:
        return np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)
    queries = np.concatenate([dihedral(t[0]) for t in thumbnails])  # [8N, P], image i's views at 8i..8i+7
    found = cosine_search(thumbnails.reshape(n * views, -1), queries, k=min(n * views, views * (k + 1)), seed=0)
    sims = found.similarity.reshape(n, -1)  # [N, 8 S (k + 1)]: every view's neighbours
    index = np.where(found.index >= 0, found.index // views, -1).reshape(n, -1)
    valid = (index >= 0) & (index != np.arange(n)[:, None])
    out_s = np.full((n, k), -np.inf, np.float32)
    out_i = np.full((n, k), -1, np.int64)
    for i in range(n):  # best view per other image, then the k best images
        best: dict[int, float] = {}
        for j, s in zip(index[i][valid[i]].tolist(), sims[i][valid[i]].tolist()):
            if s > best.get(j, -np.inf):
                best[j] = s
        ranked = sorted(best.items(), key=lambda t: -t[1])[:k]
        out_i[i, :len(ranked)] = [j for j, _ in ranked]
        out_s[i, :len(ranked)] = [s for _, s in ranked]
    return out_s, out_i


def pixel_evidence(sims: np.ndarray, idx: np.ndarray) -> dict[tuple[int, int], float]:
    """{(i, j): robust z of the Fisher z of the thumbnail correlation} over every pair of the pixel neighbour lists."""
    pairs = neighbour_pairs(sims, idx)
    if not pairs:
        return {}
    keys = list(pairs)
    return dict(zip(keys, robust_z(fisher(np.array([pairs[k] for k in keys]))).tolist()))


def candidate_pairs(feature: dict[tuple[int, int], float], pixel: dict[tuple[int, int], float], *,
                    z: float) -> list[tuple[int, int, float, float]]:
    """Pairs whose feature evidence is below -z / 2 or pixel evidence above z / 2: (i, j, feature z, pixel z), sorted
    (nan where a pair is in one neighbour list only)."""
    keys = {k for k, v in feature.items() if v < -z / 2} | {k for k, v in pixel.items() if v > z / 2}
    return sorted((a, b, feature.get((a, b), np.nan), pixel.get((a, b), np.nan)) for a, b in keys)


def null_pairs(pixel_idx: np.ndarray, *, sample: int = NULL_SAMPLE, seed: int = 0) -> list[tuple[int, int]]:
    """(image, its last pixel neighbour) for a seeded sample of up to `sample` images: look-alikes that are not
    copies (a copy would need k copies of one picture to rank last)."""
    has = np.flatnonzero(pixel_idx[:, -1] >= 0) if pixel_idx.shape[1] else np.zeros(0, np.int64)
    picked = np.sort(np.random.default_rng(seed).choice(has, size=min(sample, len(has)), replace=False))
    return [(int(i), int(pixel_idx[i, -1])) for i in picked]


def confirm_threshold(null: Sequence[float], *, z: float) -> float:
    """The correlation above which a pair is confirmed: tanh(median + z 1.4826 MAD) of the null's Fisher z values,
    at least MIN_CORRELATION (1.0, nothing confirmed, without a null)."""
    if len(null) == 0:
        return 1.0
    values = fisher(np.asarray(null))
    median = np.median(values)
    spread = MAD_SCALE * np.median(np.abs(values - median))
    if spread <= 0:
        spread = 1.2533 * np.mean(np.abs(values - median))
    return max(MIN_CORRELATION, float(np.tanh(median + z * max(spread, 1e-12))))
