"""stages.bench_audit and stages.bench_audit_plant: each planting function makes the kind it claims (a copy is its
source transformed as recorded, off-topic images are written and listed, flips change the stated fraction of labels
of untouched images), and the scoring of a hand-made findings set gives the exact counts, Wilson intervals and
PASS/FAIL verdicts. Tiny generated images only (numpy -> PIL)."""
from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages import audit, bench_audit
from stages.bench_audit_plant import TRANSFORMS, Planted, near_duplicate, plant_images


def picture(seed: int, size: tuple[int, int] = (40, 32)) -> Image.Image:
    """An RGB image of smooth random colour blobs plus fine noise (distinct per seed)."""
    g = np.random.default_rng(seed)
    cells = Image.fromarray(g.integers(0, 256, (4, 5, 3)).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
    pixels = np.asarray(cells, np.int16) + g.integers(-20, 21, (size[1], size[0], 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), np.int16)


# ------------------------------------------------------------------------------------------------ planting
@pytest.mark.parametrize("how", TRANSFORMS)
def test_near_duplicate_is_its_source_transformed_as_named(how: str) -> None:
    source = picture(1)
    copy, quality = near_duplicate(source, how, random.Random(3))
    src, out = pixels(source), pixels(copy)
    assert 30 <= quality <= (60 if how == "jpeg" else 95)
    if how == "jpeg":
        assert copy is source
    elif how == "mirror":
        assert np.array_equal(out, src[:, ::-1])
    elif how == "resize":
        assert all(0.3 * s - 1 <= c <= 0.9 * s + 1 for c, s in zip(copy.size, source.size))
        assert np.abs(out - pixels(source.resize(copy.size, Image.Resampling.BILINEAR))).max() <= 1
    elif how == "crop":
        w, h = copy.size
        assert 0.7 * 40 - 1 <= w <= 40 and 0.7 * 32 - 1 <= h <= 32
        assert any(np.array_equal(out, src[y:y + h, x:x + w]) for y in range(33 - h) for x in range(41 - w))
    elif how == "rotate":
        exact = [pixels(source.transpose(t)) for t in (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180,
                                                       Image.Transpose.ROTATE_270)]
        assert any(out.shape == e.shape and np.array_equal(out, e) for e in exact) or copy.size == source.size
    elif how == "border":
        pad = (copy.width - source.width) // 2
        assert pad >= 2 and copy.height - source.height == 2 * pad
        assert np.array_equal(out[pad:-pad, pad:-pad], src)
        assert len(np.unique(out[0].reshape(-1, 3), axis=0)) == 1  # one flat colour
    elif how == "watermark":
        changed = np.flatnonzero(np.any(out != src, axis=(1, 2)))
        assert copy.size == source.size and 0 < len(changed) < copy.height  # some rows untouched
        assert changed.max() - changed.min() + 1 == len(changed)  # one horizontal bar (with its text)
    elif how == "colour":
        assert copy.size == source.size and np.abs(out - src).mean() > 1
        assert np.corrcoef(out.mean(2).ravel(), src.mean(2).ravel())[0, 1] > 0.8
    with pytest.raises(ValueError, match="unknown transform 'blur'"):
        near_duplicate(source, "blur", random.Random(0))


def write_images(root: Path, folders: list[str], per_folder: int, seed: int) -> None:
    for f, folder in enumerate(folders):
        (root / folder).mkdir(parents=True)
        for i in range(per_folder):
            picture(seed + 100 * f + i).save(root / folder / f"img{i:02d}.jpg", quality=95)


def test_plant_images_writes_the_copies_and_off_topic_images_it_records(tmp_path: Path) -> None:
    source, other = tmp_path / "source", tmp_path / "other"
    write_images(source, ["train/ants", "train/bees", "val/ants", "val/bees"], 4, seed=0)
    write_images(other, ["cars"], 4, seed=1000)
    planted = plant_images(source, tmp_path / "raw", others=[other], seed=0, duplicate_fraction=0.5, n_off_topic=6)
    raw = tmp_path / "raw"
    assert [h for *_, h in planted.duplicates] == list(TRANSFORMS)  # 8 copies of 16 images, the transforms in turn
    assert len({o for o, *_ in planted.duplicates}) == 8  # distinct originals
    for i, (original, copy, how) in enumerate(planted.duplicates):
        assert (raw / copy).is_file() and Path(copy).stem.startswith(Path(original).stem + "_copy")
        assert copy.split("/")[1] == original.split("/")[1]  # same class
        assert (copy.split("/")[0] != original.split("/")[0]) == (i % 2 == 1)  # every other copy leaks
        if how == "mirror":  # the copy is its recorded original, mirrored (through JPEG)
            assert np.abs(pixels(Image.open(raw / copy)) - pixels(Image.open(raw / original))[:, ::-1]).mean() < 8
    assert len(planted.off_topic) == 6
    assert all((raw / p).is_file() and p.startswith("train/") for p, _ in planted.off_topic)
    whats = [w for _, w in planted.off_topic]
    assert sum(w.startswith("other/cars/") for w in whats) == 3 and whats[3:] == [  # then the kinds in turn
        "texture stripes", "placeholder not_found", "placeholder grey"]
    assert planted.touched() == {c for _, c, _ in planted.duplicates} | {p for p, _ in planted.off_topic}
    assert len(list(raw.rglob("*.jpg"))) == 16 + 8 + 6  # no copy written over another (names repeat across splits)


def trial_rows(n_per_class: int = 100) -> tuple[audit.Rows, Planted]:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), n_per_class)
    centres = np.array([[1.0, 0, 0], [0.8, 0.6, 0], [0.3, 0, 0.95]])  # cosines: 0-1 0.8, 0-2 0.3, 1-2 0.24
    x = audit.l2_normalize(centres[labels] + rng.normal(0, 0.05, (len(labels), 3)))
    paths = [f"train/c{c}/{i:03d}.jpg" for i, c in enumerate(labels)]
    planted = Planted(duplicates=[(paths[0], paths[1], "resize")],
                      off_topic=[(p, "texture noise") for p in paths[290:]])
    return audit.Rows(features=x, labels=labels, split=np.array(["train"] * len(labels)), paths=paths,
                      classes=["c0", "c1", "c2"]), planted


def test_make_trial_flips_the_stated_fraction_of_untouched_labels_and_keeps_few_off_topic() -> None:
    rows, planted = trial_rows()
    trial, truth = bench_audit.make_trial(rows, planted, seed=5)
    n = 300 - 10  # images less the off-topic pool
    kept_off = max(1, round(bench_audit.OFF_TOPIC_RATE * n))
    assert len(truth["off_topic"]) == kept_off and len(trial.paths) == n + kept_off
    assert set(truth["off_topic"]) <= {p for p, _ in planted.off_topic}
    original = dict(zip(rows.paths, rows.labels))
    changed = [p for p, y in zip(trial.paths, trial.labels) if original[p] != y]
    assert len(changed) == len(truth["flips"]) == max(1, round(bench_audit.FLIP_RATE * n)) == 3
    assert sorted(changed) == sorted(f["path"] for f in truth["flips"])
    assert not set(changed) & (planted.touched() | {paths[0] for paths in planted.duplicates})
    nearest = {"c0": "c1", "c1": "c0", "c2": "c0"}
    farthest = {"c0": "c2", "c1": "c2", "c2": "c1"}
    for f in truth["flips"]:
        assert f["given"] == (nearest if f["kind"] == "similar" else farthest)[f["true"]]
    assert [f["kind"] for f in truth["flips"]] == ["similar", "dissimilar", "similar"]
    assert np.array_equal(trial.features, rows.features[[rows.paths.index(p) for p in trial.paths]])


# ------------------------------------------------------------------------------------------------ scoring
def wilson(hits: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def test_rate_is_the_proportion_with_its_wilson_interval() -> None:
    r = bench_audit.rate(2, 4)
    assert (r["hits"], r["n"], r["value"]) == (2, 4, 0.5)
    assert (r["low"], r["high"]) == pytest.approx(wilson(2, 4), abs=1e-9)
    assert (bench_audit.rate(9, 10)["low"], bench_audit.rate(9, 10)["high"]) == pytest.approx(wilson(9, 10), abs=1e-9)
    assert bench_audit.rate(0, 0) == {"hits": 0, "n": 0, "value": 1.0, "low": 0.0, "high": 1.0}


def findings() -> tuple[Planted, dict, dict]:
    planted = Planted(duplicates=[("a.jpg", "a_copy.jpg", "resize"), ("b.jpg", "b_copy.jpg", "crop"),
                                  ("c.jpg", "c_copy.jpg", "mirror"), ("d.jpg", "d_copy.jpg", "resize")],
                      off_topic=[("o1.jpg", "texture noise"), ("o2.jpg", "placeholder grey")])
    report = {"n_images": 100, "label_check": {"status": "ran"},
              "duplicates": [{"paths": ["a.jpg", "a_copy.jpg"]},  # right
                             {"paths": ["b.jpg", "b_copy.jpg", "x.jpg"]},  # 1 right, b-x pre-existing, copy-x false
                             {"paths": ["c_copy.jpg", "e.jpg"]}],  # false (c itself not in it: c missed)
              "label_issues": [{"path": "f1.jpg"}, {"path": "u1.jpg"}, {"path": "f2.jpg"}],
              "outliers": [{"path": "o1.jpg"}, {"path": "u2.jpg"}, {"path": "o2.jpg"}]}
    truth = {"flips": [{"path": "f1.jpg", "kind": "similar"}, {"path": "f2.jpg", "kind": "dissimilar"}],
             "off_topic": ["o1.jpg", "o2.jpg"]}
    return planted, report, truth


def test_scoring_a_hand_made_findings_set_gives_the_exact_counts() -> None:
    planted, report, truth = findings()
    d = bench_audit.score_duplicates(report, planted)
    assert (d["recall"]["hits"], d["recall"]["n"]) == (2, 4)
    assert (d["precision"]["hits"], d["precision"]["n"]) == (2, 4)
    assert (d["precision"]["low"], d["precision"]["high"]) == pytest.approx(wilson(2, 4), abs=1e-9)
    assert d["preexisting_pairs"] == [["b.jpg", "x.jpg"]]
    assert d["false_pairs"] == [["b_copy.jpg", "x.jpg"], ["c_copy.jpg", "e.jpg"]]
    assert [(m["copy"], m["transform"]) for m in d["missed"]] == [("c_copy.jpg", "mirror"), ("d_copy.jpg", "resize")]
    assert {h: (v["hits"], v["n"]) for h, v in d["recall_by_transform"].items() if v["n"]} == {
        "resize": (1, 2), "crop": (1, 1), "mirror": (0, 1)}
    labels = bench_audit.score_labels(report, truth)  # review list: the first ceil(2% of 100) = 2 findings
    assert labels == {"planted": 2, "review": 2, "found": 1, "findings": 3,
                      "by_kind": {"similar": [1, 1], "dissimilar": [0, 1]}}
    outliers = bench_audit.score_outliers(report, truth)  # top ceil(1% of 100) = 1
    assert outliers == {"planted": 2, "found_top": 1, "flagged": 3, "flagged_right": 2, "other_flagged": ["u2.jpg"]}
    assert bench_audit.score_labels({"label_check": {"status": "skipped", "reason": "few"}}, truth) == {
        "skipped": "few"}
    pooled = bench_audit.pool_trials([labels, labels], [outliers, outliers])
    assert (pooled["labels"]["recall"]["hits"], pooled["labels"]["recall"]["n"]) == (2, 4)
    assert (pooled["labels"]["precision"]["hits"], pooled["labels"]["precision"]["n"]) == (2, 4)
    assert (pooled["outliers"]["recall"]["hits"], pooled["outliers"]["recall"]["n"]) == (2, 4)
    assert (pooled["outliers"]["precision"]["hits"], pooled["outliers"]["precision"]["n"]) == (4, 6)
    assert pooled["outliers"]["other_flagged"] == ["u2.jpg"]


def test_table_marks_each_target_pass_or_fail() -> None:
    planted, report, truth = findings()
    labels, outliers = bench_audit.score_labels(report, truth), bench_audit.score_outliers(report, truth)
    result = {"dataset": "tiny", "images": 100, "trials": 1, "duplicates": bench_audit.score_duplicates(report, planted),
              **bench_audit.pool_trials([labels], [outliers])}
    table = bench_audit.format_table([result]).splitlines()
    assert len(table) == 5
    assert "| 0.500 [0.15, 0.85] (2/4) | 0.500 [0.15, 0.85] (2/4) | FAIL (>= 0.95) / FAIL (>= 0.9) |" in table[2]
    assert "label flips (top 2%) | 0.500" in table[3] and "FAIL (>= 0.8)" in table[3]
    assert bench_audit.verdict(0.8, 0.8) == "PASS (>= 0.8)" and bench_audit.verdict(0.79, 0.8) == "FAIL (>= 0.8)"
