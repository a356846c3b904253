"""The audit's decision rules (stages/audit.py): every threshold comes from the dataset's own score distribution.

One statistic does it: the robust z-score (Iglewicz and Hoaglin's modified z), (value - median) / (1.4826 MAD),
taken over a reference sample that is mostly ordinary (the bulk of the dataset, or pairs that are known not to be
copies). A finding is a value past `z` of them, `z` one number for every dataset (audit.duplicate_z, audit.outlier_z;
3.5 is Iglewicz and Hoaglin's cut-off): what is unusual is judged against that dataset's spread, not against a
constant fitted to the development sets.

Near-duplicates (pairs), all searches through stages.neighbours (cosine_search, cosine_index), so the cost grows as
n (exact) or n sqrt(n) (an inverted-file index past 50,000 images):
1. Feature evidence: for each of an image's k nearest neighbours (cosine of the features), the distance relative to
   the local scale of both images, log(d_ij / sqrt(d_i,k d_j,k)) with d_i,k the distance to the k-th neighbour
   (a copy is much nearer than the image's other neighbours; scale-free, so a dataset whose bulk cosine is high is
   judged by its own spread). Its robust z over every neighbour pair.
2. Pixel evidence: each image as 24x24 grayscale detail thumbnails, zero mean and unit norm (a dot product is the
   Pearson correlation), of the whole and of 9 80% windows; the whole thumbnail of every image is indexed (float16,
   8-bit codes past 50,000 images) and the 8 rotations and mirrors of every thumbnail of each image are searched
   against it (a rotated, mirrored, cropped or bordered copy is found). The correlation's Fisher z (atanh) as a
   robust z over every neighbour pair. Memory kept per image (pixel_neighbours): 1152 B (float16 whole) + 2304 B
   (exact index) or 584 B (8-bit codes + id) + 120 B (lists, k = 10): 3.6 KB up to 50,000 images, 1.9 KB past
   (1M images: ~1.9 GB), where indexing all ten thumbnails in float32 kept 23 KB (~69 KB with the per-image
   arrays and the search's float32 copy; 1M: 23-69 GB). The gray squares they come from are on disk (4 KB).
3. Candidates: pairs whose feature or pixel evidence is past z / 2 (cheap evidence, generous).
4. Confirmation (pixel_similarity): the best correlation over crop windows (70-100% of each side, 5 offsets) of
   either image against the other's whole thumbnail, its rotations, mirrors and small tilts; confirmed when its
   Fisher z is past `z` robust z-scores of a null sample: the same statistic for images against their k-th pixel
   neighbour (look-alikes that are not copies), and above MIN_CORRELATION (a floor for tiny or very unlike sets).

Outliers (stages/audit.py): score = the median cosine distance to the k nearest other images; flagged when its
robust z over the dataset is above `z`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from stages.neighbours import EXACT_MAX_ROWS, cosine_index

MAD_SCALE = 1.4826  # MAD -> standard deviation for normal data
WINDOW_SIDE = 64  # images squeezed to this square (pixels) before the crop windows
WINDOW_ZOOMS = (1.0, 0.93, 0.86, 0.78, 0.7)  # crop windows: these fractions of each side,
WINDOW_OFFSETS = 5  # at this many offsets per side (one for the whole side),
THUMB_SIDE = 24  # each resized to this square thumbnail (pixels)
TILTS = (-6.0, 6.0)  # degrees: small rotations of the whole thumbnail also compared
DETAIL_SIGMA = 3.0  # pixels of the thumbnail: the blur subtracted before correlating
NULL_SAMPLE = 256  # images whose k-th pixel neighbour gives the null of the confirmation
SEARCH_CHUNK = 256  # images whose pixel search queries (80 rows each, 184 KB) are made and searched at a time
MIN_CORRELATION = 0.75  # a floor under the confirmation threshold: with few or very unlike images the null's
#                         spread is poorly measured, and a copy's detail thumbnails correlate far above this anyway


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


@lru_cache(maxsize=None)
def _blur_matrix(side: int = THUMB_SIDE, sigma: float = DETAIL_SIGMA) -> np.ndarray:
    """[side, side] float32: B with B @ x = scipy's gaussian_filter1d(x, sigma, mode="nearest") along axis 0."""
    from scipy.ndimage import gaussian_filter1d

    return gaussian_filter1d(np.eye(side), sigma, axis=0, mode="nearest").astype(np.float32)


def _standardize(rows: np.ndarray) -> np.ndarray:
    """Flat THUMB_SIDE px thumbnails [R, T*T] less their blur (DETAIL_SIGMA px: the shape of the subject, which
    unrelated look-alikes share, is removed and the detail kept), then zero mean and unit norm per row."""
    squares = rows.reshape(-1, THUMB_SIDE, THUMB_SIDE).astype(np.float32)
    blur = _blur_matrix()
    return _unit_rows((squares - blur @ squares @ blur.T).reshape(len(rows), -1))


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    rows = rows - rows.mean(1, keepdims=True)
    return (rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-6)).astype(np.float32)


def bilinear_matrix(start: float, stop: float, *, size: int = WINDOW_SIDE, out: int = THUMB_SIDE) -> np.ndarray:
    """[out, size] float64: the weights of PIL's BILINEAR resize of the span [start, stop) of `size` pixels to
    `out` pixels (a triangle filter widened by the scale when shrinking, as PIL's precompute_coeffs), so that
    R_y @ square @ R_x.T is Image.resize((out, out), BILINEAR, box=(x0, y0, x1, y1)) of a mode "F" square."""
    scale = (stop - start) / out
    width = max(scale, 1.0)
    weights = np.zeros((out, size))
    for i in range(out):
        centre = start + (i + 0.5) * scale
        lo, hi = max(int(centre - width + 0.5), 0), min(int(centre + width + 0.5), size)
        w = np.maximum(0.0, 1.0 - np.abs((np.arange(lo, hi) - centre + 0.5) / width))
        weights[i, lo:hi] = w / w.sum() if w.sum() else w
    return weights


@lru_cache(maxsize=8)
def _span_matrices(spans: tuple[tuple[float, float], ...]) -> tuple[np.ndarray, np.ndarray]:
    """([len(spans) T, S] resize weights, the same followed by the detail blur) float32, stacked per span."""
    plain = np.stack([bilinear_matrix(a, b) for a, b in spans]).astype(np.float32)
    return plain.reshape(-1, WINDOW_SIDE), (_blur_matrix() @ plain).reshape(-1, WINDOW_SIDE)


def box_thumbnails(square: np.ndarray, boxes: Sequence[tuple[float, ...]]) -> np.ndarray:
    """[B, T*T] float32: standardized detail thumbnails (THUMB_SIDE px, _standardize) of the (left, top, right,
    bottom) boxes of a WINDOW_SIDE px square [S, S]: resize and blur are linear, so every box of a grid of spans
    comes out of two matrix products (the values of a PIL resize per box, then gaussian_filter, to float32)."""
    xs = tuple(sorted({(b[0], b[2]) for b in boxes}))
    ys = tuple(sorted({(b[1], b[3]) for b in boxes}))
    (rx, bx), (ry, by) = _span_matrices(xs), _span_matrices(ys)
    g = np.asarray(square, np.float32)
    detail = (ry @ g @ rx.T - by @ g @ bx.T).reshape(len(ys), THUMB_SIDE, len(xs), THUMB_SIDE)
    y = np.array([ys.index((b[1], b[3])) for b in boxes])
    x = np.array([xs.index((b[0], b[2])) for b in boxes])
    return _unit_rows(detail.transpose(0, 2, 1, 3)[y, x].reshape(len(boxes), -1))


def gray_square(image: Image.Image | np.ndarray) -> np.ndarray:
    """[S, S] float32: the image in grayscale, squeezed to WINDOW_SIDE x WINDOW_SIDE (BOX filter, 8-bit levels);
    an array is taken as such a square already (read_gray_squares keeps them as uint8)."""
    if isinstance(image, np.ndarray):
        return image.astype(np.float32)
    return np.asarray(image.convert("L").resize((WINDOW_SIDE, WINDOW_SIDE), Image.Resampling.BOX), np.float32)


SEARCH_BOXES = [(0.0, 0.0, 1.0, 1.0)] + [(x, y, x + 0.8, y + 0.8) for y in (0.0, 0.1, 0.2) for x in (0.0, 0.1, 0.2)]


def search_thumbnails(image: Image.Image | np.ndarray) -> np.ndarray:
    """[S, T*T] float32: standardized THUMB_SIDE px grayscale thumbnails of the whole image (row 0) and of its
    80% windows at 3 x 3 offsets (SEARCH_BOXES, fractions of the side) of an image or its gray square: row 0 is
    what the pixel neighbour search indexes, all S rows (with their rotations and mirrors) are its queries, so that
    a bordered copy or a crop finds its original."""
    return box_thumbnails(gray_square(image), [tuple(WINDOW_SIDE * v for v in box) for box in SEARCH_BOXES])


def dihedral(thumbnails: np.ndarray) -> np.ndarray:
    """[..., 8, T*T]: flat thumbnails' [..., T*T] 4 rotations and the 4 rotations of their mirror (identity first)."""
    squares = thumbnails.reshape(*thumbnails.shape[:-1], THUMB_SIDE, THUMB_SIDE)
    views = [np.rot90(m, r, axes=(-2, -1)) for m in (squares, squares[..., ::-1]) for r in range(4)]
    return np.stack(views, axis=-3).reshape(*thumbnails.shape[:-1], 8, -1)


def thumbnail_windows(image: Image.Image | np.ndarray) -> Thumbs:
    """The pixel descriptor of an image or its gray square (Thumbs): crop windows (crop_boxes) and views of the
    whole (8 rotations and mirrors, then TILTS)."""
    square = gray_square(image)
    windows = box_thumbnails(square, crop_boxes())
    full = _span_matrices(((0.0, float(WINDOW_SIDE)),))[0]
    whole = Image.fromarray(full @ square @ full.T, "F")
    tilts = [np.asarray(whole.rotate(a, Image.Resampling.BILINEAR, fillcolor=float(np.mean(whole))), np.float32)
             .ravel() for a in TILTS]
    return Thumbs(windows=windows, views=np.concatenate([dihedral(windows[0]), _standardize(np.stack(tilts))]))


def pixel_similarity(a: Thumbs, b: Thumbs) -> float:
    """The best correlation of any crop window of one image with any view of the whole other one (float32; two
    matrix products [W, P] x [P, V]: one BLAS call each, ~1 ms a pair on one thread, so callers limit BLAS to one
    thread: on shared cores its threads waited on each other, 30 ms a pair)."""
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


def pixel_neighbours(read_squares: Callable[[int, int], np.ndarray], readable: np.ndarray, k: int, *,
                     chunk: int = SEARCH_CHUNK, exact_max_rows: int = EXACT_MAX_ROWS,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Each image's k most correlated other images by search thumbnails (search_thumbnails) of the gray squares
    read_squares(start, stop) -> uint8 [stop - start, S, S] (images whose `readable` [N] is False take no part):
    the whole thumbnail of every image is indexed (stages.neighbours.cosine_index, float16 in memory), and the
    8 rotations and mirrors of each image's S search thumbnails (whole and 80% windows) are its queries, searched
    `chunk` images at a time and not kept; the best correlation per other image is kept. (Correlation is symmetric
    under a rotation of both thumbnails, so this finds the pairs that indexing every window and querying the whole
    found.) Returns (correlations [N, k] descending, indices [N, k]; -inf / -1 where fewer were found).
    Kept per image: the float16 whole thumbnail (2 T^2 = 1152 bytes), its row in the index (4 T^2 = 2304 bytes
    exact, T^2 + 8 = 584 past exact_max_rows) and the lists (12 k bytes)."""
    n = len(readable)
    k = int(min(k, n - 1))
    out_s = np.full((n, max(k, 0)), -np.inf, np.float32)
    out_i = np.full((n, max(k, 0)), -1, np.int64)
    if k < 1:
        return out_s, out_i
    wholes = np.zeros((n, THUMB_SIDE ** 2), np.float16)
    for start in range(0, n, chunk):
        squares = read_squares(start, min(n, start + chunk))
        for r, square in enumerate(squares):
            if readable[start + r]:
                wholes[start + r] = search_thumbnails(square)[0]
    index, _ = cosine_index(wholes, seed=seed, exact_max_rows=exact_max_rows)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        thumbs = np.stack([search_thumbnails(square) for square in read_squares(start, stop)])  # [C, S, P]
        sims, found = index.search(dihedral(thumbs).reshape(-1, THUMB_SIDE ** 2), k + 1)
        rows = np.arange(start, stop)
        sims, found = sims.reshape(len(rows), -1), found.reshape(len(rows), -1)
        out_s[start:stop], out_i[start:stop] = best_per_image(sims, found, rows, k)
        out_s[start:stop][~readable[start:stop]], out_i[start:stop][~readable[start:stop]] = -np.inf, -1
    out_i[out_s == -np.inf] = -1
    return out_s, out_i


def best_per_image(sims: np.ndarray, found: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Of the hits sims / found [C, H] of the images `rows` [C] (found -1: none), the k best other images each, each
    at its best similarity: (similarities [C, k] descending, indices [C, k]; -inf / -1 where fewer)."""
    sims = np.where((found >= 0) & (found != rows[:, None]), sims, -np.inf).astype(np.float32)
    order = np.argsort(-sims, axis=1, kind="stable")
    sims, found = np.take_along_axis(sims, order, 1), np.take_along_axis(found, order, 1)
    by_image = np.argsort(found, axis=1, kind="stable")  # each image's hits together, its best first
    ids = np.take_along_axis(found, by_image, 1)
    repeat = np.zeros_like(ids, bool)
    repeat[:, 1:] = ids[:, 1:] == ids[:, :-1]
    drop = np.zeros_like(repeat)
    np.put_along_axis(drop, by_image, repeat, 1)
    sims[drop] = -np.inf
    keep = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    best_s, best_i = np.take_along_axis(sims, keep, 1), np.take_along_axis(found, keep, 1)
    pad = k - best_s.shape[1]
    if pad > 0:
        best_s = np.pad(best_s, ((0, 0), (0, pad)), constant_values=-np.inf)
        best_i = np.pad(best_i, ((0, 0), (0, pad)), constant_values=-1)
    return best_s, np.where(best_s > -np.inf, best_i, -1)


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
