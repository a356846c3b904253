"""The scale ladder's pure parts on tiny inputs: exponent fit, synthetic features, image generator, targets."""
from __future__ import annotations

import io
import sys

import numpy as np
import pytest
from PIL import Image

from stages import bench_scale as bs
from stages.features import read_checked
from stages.io import sha256_file, write_json


def test_fit_exponents_recovers_known_powers():
    n = [1_000, 10_000, 100_000]
    linear = bs.fit_exponents([(x, 2e-3 * x) for x in n])
    assert linear["all"] == pytest.approx(1.0)
    assert [k for _, _, k in linear["pairs"]] == pytest.approx([1.0, 1.0])
    bent = bs.fit_exponents([(1_000, 1.0), (10_000, 10.0), (100_000, 1000.0)])
    assert [k for _, _, k in bent["pairs"]] == pytest.approx([1.0, 2.0])
    assert bent["all"] == pytest.approx(1.5)
    assert bs.fit_exponents([(1_000, 3.0)])["all"] is None


def test_synthetic_features_pass_the_real_reader(tmp_path):
    n = 200
    rows = bs.synthetic_manifest(n, seed=3)
    manifest = tmp_path / "data" / "prepared" / "manifest.csv"
    bs.write_manifest(manifest, rows)
    classes = [f"c{c:02d}" for c in range(bs.FEATURE_CLASSES)]
    write_json(manifest.parent / "classes.json", classes)
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"not a real weight file: only its sha256 is checked by the reader")
    attrs = bs.feature_attrs(weights_sha256=sha256_file(weights), manifest_sha256=sha256_file(manifest), n=n,
                             classes=classes)
    out = tmp_path / "features.h5"
    bs.write_synthetic_features(out, rows, attrs, seed=3)
    data, _ = read_checked(out, backbone=bs.BACKBONE, manifest_path=manifest, weights_path=weights)
    assert data.features["pool"].shape == (n, bs.POOL_DIM) and data.features[bs.MID_LAYER].shape == (n, bs.MID_DIM)
    assert data.features["pool"].dtype == np.float32
    assert data.attrs["layer_aliases"] == {"mid": bs.MID_LAYER}
    assert set(data.split.tolist()) == {"train", "test"}
    # learnable, not trivial: nearest class mean (from 4,800 train rows) on 1,200 rows is far above chance
    pool, mid, y, _ = bs.synthetic_chunk(0, 6_000, seed=3)
    x, train = np.hstack([pool, mid]), np.arange(6_000) < 4_800
    means = np.stack([x[train & (y == c)].mean(0) for c in range(len(classes))])
    distance = (means ** 2).sum(1) - 2 * x[~train] @ means.T
    accuracy = np.mean(distance.argmin(1) == y[~train])
    assert 3 / len(classes) < accuracy < 0.9
    # deterministic: the file holds exactly the seeded rows
    assert np.array_equal(bs.synthetic_chunk(0, n, seed=3)[0], data.features["pool"])


def test_image_generator_is_deterministic(tmp_path):
    source = tmp_path / "src.jpg"
    pixels = np.random.default_rng(0).integers(0, 256, (300, 420, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(source, quality=90)
    first, again, other = bs.generate_image(source, 7), bs.generate_image(source, 7), bs.generate_image(source, 8)
    assert first == again and first != other
    with Image.open(io.BytesIO(first)) as image:
        assert image.format == "JPEG" and 200 <= max(image.size) <= 500


def test_run_measured_reports_the_child_peak_rss(tmp_path):
    code = "import numpy as np; a = np.ones(300 * 2**20 // 8); print(a.sum())"
    wall, rss_mb, rc, killed = bs.run_measured([sys.executable, "-c", code], cwd=tmp_path, log=tmp_path / "log",
                                               timeout_s=60)
    assert rc == 0 and not killed and rss_mb >= 300 and wall > 0
    _, _, rc, killed = bs.run_measured([sys.executable, "-c", "import time; time.sleep(30)"], cwd=tmp_path,
                                       log=tmp_path / "log2", timeout_s=1)
    assert killed and rc != 0


def test_targets_of_rungs_not_run_are_skipped_never_pass():
    lines = bs.target_lines([])
    assert lines[2:] and all(line.startswith("SKIPPED") for line in lines[2:])
    fast = bs.StageRun("feature", "head", 10_000, 10.0, 100.0, 0, False, "t", {})
    killed = bs.StageRun("feature", "head", 100_000, 900.0, 100.0, -9, True, "t", {})
    text = "\n".join(bs.target_lines([fast, killed]))
    assert "FAIL  feature head: exponent 10,000 -> 100,000 <= 1.15: >= 1.95" in text
    assert "FAIL  feature head (default protocol) 100k rows <= 600 s: > 900 (killed) s" in text
