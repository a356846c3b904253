"""stages.audit: near-duplicates (faiss candidates confirmed by a thumbnail pixel check, grouped, leakage apart), cleanlab label
issues from out-of-fold probabilities, k-NN outliers, on synthetic embeddings with planted problems (exact expected
findings); the stage on a tiny real-image project (outputs, drop_from_heldout, head's filter); bad inputs (too few
images per class, features of another manifest or missing rows, bad params); the report's audit section."""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from PIL import Image

from stages import audit, audit_rules
from stages.features import ProvenanceError
from stages.images import MANIFEST_FIELDS
from stages.params import AuditParams, ParamError, parse_params

CLASSES = ["ants", "bees"]


def blobs(n_per_class: int, n_classes: int, dim: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around one axis per class (cosine within a class ~0.5, across ~0): [n, dim], labels [n]."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_classes), n_per_class)
    centres = np.eye(dim)[:n_classes] * 3.0
    return audit.l2_normalize(centres[y] + rng.normal(0, 0.5, (len(y), dim))), y


# ------------------------------------------------------------------------------------------------ core, synthetic
def test_feature_evidence_flags_the_planted_near_copies_even_when_the_bulk_cosine_is_high() -> None:
    x, _ = blobs(30, 3, 16, seed=0)
    rng = np.random.default_rng(1)
    copies = {5: 90, 40: 91, 77: 92}  # original -> copy row
    x = np.concatenate([x, audit.l2_normalize(x[list(copies)] + rng.normal(0, 0.05, (3, 16)))])
    for data in (x, audit.l2_normalize(x + 4.0)):  # the second: every cosine > 0.95, the copies still stand out
        evidence = audit_rules.feature_evidence(*audit.nearest_neighbours(data, 5))
        ranked = sorted(evidence, key=evidence.get)
        assert sorted(ranked[:3]) == sorted(copies.items())  # the copies stand out most, by a wide gap
        assert max(evidence[p] for p in ranked[:3]) < 2 * evidence[ranked[3]] < -3.5
    sims, idx = audit.nearest_neighbours(x, 3)
    assert sims.shape == idx.shape == (93, 3) and not np.any(idx == np.arange(93)[:, None])  # never itself


def test_robust_z_cut_off_flags_planted_outliers_and_not_the_bulk() -> None:
    rng = np.random.default_rng(0)
    for scale in (0.01, 1.0, 100.0):  # the same rule at any scale of the scores
        bulk = rng.lognormal(0, 0.3, 500) * scale
        values = np.concatenate([bulk, [8 * scale, 12 * scale]])
        z = audit_rules.robust_z(np.log(values))
        assert set(np.flatnonzero(z > 3.5)) == {500, 501}
    assert np.all(audit_rules.robust_z(np.ones(5)) == 0)


def test_pixel_check_confirms_resized_recoded_cropped_rotated_and_bordered_copies_only() -> None:
    original = photo(7)
    w, h = original.size
    bordered = Image.new("RGB", (w + 12, h + 12), (200, 30, 30))
    bordered.paste(original, (6, 6))
    copies = [original.resize((60, 60)), original.crop((20, 10, 110, 100)),  # 70% of each side
              original.point(lambda v: int(v * 0.85 + 20)), original.rotate(90), original.transpose(0), bordered]
    a = audit.thumbnail_windows(original)
    assert a.windows.shape == (len(audit_rules.crop_boxes()), audit_rules.THUMB_SIDE ** 2) and a.views.shape[0] == 10
    assert np.allclose(np.linalg.norm(a.windows, axis=1), 1, atol=1e-5)
    same = [audit.pixel_similarity(a, audit.thumbnail_windows(c)) for c in copies]
    others = [audit.pixel_similarity(a, audit.thumbnail_windows(photo(seed))) for seed in range(8, 30)]
    threshold = audit_rules.confirm_threshold(others, z=3.5)
    assert min(same) > threshold > max(others)
    assert audit_rules.crop_boxes(10, (1.0, 0.9), 3)[:2] == [(0.0, 0.0, 10.0, 10.0), (0.0, 0.0, 10.0, 9.0)]


def test_confirmation_groups_and_heldout_drops() -> None:
    w = {i: audit.thumbnail_windows(photo(100 + i)) for i in range(5)}
    w[1] = audit.thumbnail_windows(photo(100).resize((50, 50)))  # a copy of 0
    w[4] = audit.thumbnail_windows(photo(103).crop((8, 8, 120, 120)))  # a copy of 3
    w[5] = None  # could not be read
    pairs = [(0, 1, -5.0, 2.0), (0, 2, -4.0, 2.0), (3, 4, -6.0, 9.0), (4, 5, -6.0, 9.0)]
    confirmed = audit.confirm_pairs(pairs, w.get, min_correlation=0.9)
    assert [(i, j) for i, j, *_ in confirmed] == [(0, 1), (3, 4)]
    assert all(r > 0.95 for *_, r in confirmed)
    assert audit.group_pairs([(0, 1), (1, 6), (3, 4)], 8) == [[0, 1, 6], [3, 4]]
    assert audit.group_pairs([], 5) == []
    rows = audit.Rows(features=np.zeros((5, 2), np.float32), labels=np.array([0, 0, 1, 1, 1]),
                      split=np.array(["train", "val", "val", "val", "train"]), paths=list("abcde"), classes=CLASSES)
    groups = audit.describe_groups([[0, 1], [2, 3]], [(0, 1, 0.95, 0.99), (2, 3, 0.9, 0.95)], rows)
    assert [g["cross_split"] for g in groups] == [True, False]
    assert groups[0]["cross_split_pairs"] == [{"paths": ["a", "b"], "splits": ["train", "val"], "cosine": 0.95,
                                               "pixel_correlation": 0.99}]
    assert groups[0]["classes"] == ["ants", "ants"] and groups[1]["score"] == 0.9
    assert audit.heldout_drops(groups, "val") == ["b"]  # the within-val pair c, d stays


def test_label_issues_are_exactly_the_flipped_rows_with_their_true_class_suggested() -> None:
    x, y = blobs(40, 3, 16, seed=2)
    flipped = {3: 1, 50: 2, 100: 0, 110: 1}
    given = y.copy()
    for row, label in flipped.items():
        given[row] = label
    proba = audit.out_of_fold_proba(x, given, folds=5, C=1.0, seed=0)
    assert proba.shape == (120, 3) and np.allclose(proba.sum(1), 1)
    issues = audit.label_issues(proba, given)
    assert sorted(i for i, _, _ in issues) == sorted(flipped)
    assert all(suggested == y[i] for i, suggested, _ in issues)
    assert [s for *_, s in issues] == sorted((s for *_, s in issues), reverse=True)  # most likely first
    assert all(s > 0.5 for *_, s in issues)


def test_label_check_is_skipped_with_the_reason_when_a_class_is_too_small() -> None:
    y = np.array([0] * 10 + [1] * 3)
    reason = audit.label_check_skip(y, CLASSES, 5)
    assert "bees (3)" in reason and "audit.label_folds = 5" in reason
    assert audit.label_check_skip(y, CLASSES, 3) is None
    assert "only 1 class" in audit.label_check_skip(np.zeros(8, int), CLASSES, 2)


def test_outliers_are_the_planted_off_class_rows_even_in_a_small_cluster() -> None:
    x, y = blobs(40, 2, 16, seed=3)
    rng = np.random.default_rng(4)
    off = audit.l2_normalize(np.eye(16)[[7, 7, 7, 9]] * 3 + rng.normal(0, 0.5, (4, 16)))  # 3 alike + 1
    x = np.concatenate([x, off])
    y = np.concatenate([y, [0, 0, 0, 1]])
    scores, z = audit.outlier_scores(x, k=10)
    assert set(np.flatnonzero(z > 3.5)) == {80, 81, 82, 83}
    assert scores.shape == (84,) and scores[80:].min() > scores[:80].max()


def photo(seed: int, size: int = 128) -> Image.Image:
    """A photo-like RGB picture with detail at every scale: smooth colour regions plus fine texture."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)).resize((size, size),
                                                                                    Image.Resampling.BICUBIC)
    fine = Image.fromarray(rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)).resize((size, size),
                                                                                     Image.Resampling.BICUBIC)
    return Image.blend(coarse, fine, 0.5)


# ------------------------------------------------------------------------------------------------ stage, tiny project
def picture(seed: int, tint: int) -> Image.Image:
    """A smooth 64x64 RGB picture: a random 4x4 colour grid upsampled, one channel tinted by class."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 160, (4, 4, 3))
    grid[..., tint] += 90
    coarse = Image.fromarray(grid.astype(np.uint8)).resize((64, 64), Image.Resampling.BICUBIC)
    fine = Image.fromarray(rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)).resize((64, 64),
                                                                                     Image.Resampling.BICUBIC)
    return Image.blend(coarse, fine, 0.3)  # fine detail too, as photos have: the pixel check compares detail


def embed(path: Path) -> np.ndarray:
    """Deterministic 'features' of an image: its 6x6 thumbnail, centred (stands in for a backbone's pool)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB").resize((6, 6), Image.Resampling.BOX), np.float32).ravel() - 128.0


def make_project(root: Path, *, n_train: int = 10, n_val: int = 5, audit_params: dict | None = None) -> dict:
    """data/raw/<split>/<class>/*.jpg, one near-duplicate of a train image in val (leakage) and one in train, a flat
    grey off-topic image, the manifest, a weight file, params.yaml and a features file in the extract layout."""
    raw = root / "data" / "raw"
    rows = []

    def add(rel: str, image: Image.Image, label: int) -> None:
        (raw / rel).parent.mkdir(parents=True, exist_ok=True)
        image.save(raw / rel, quality=92)
        split = rel.split("/")[0]
        rows.append([rel, CLASSES[label], label, split, hashlib.sha256((raw / rel).read_bytes()).hexdigest(),
                     image.width, image.height])

    for split, count in (("train", n_train), ("val", n_val)):
        for label, name in enumerate(CLASSES):
            for i in range(count):
                add(f"{split}/{name}/{name}{i:02d}.jpg", picture(1000 * label + 100 * (split == "val") + i,
                                                                  2 * label), label)
    original = picture(0, 0)  # train/ants/ants00.jpg
    add("val/ants/ants00_copy.jpg", original.resize((48, 48), Image.Resampling.BILINEAR), 0)
    add("train/ants/ants00_small.jpg", original.resize((40, 40), Image.Resampling.BILINEAR), 0)
    add("train/bees/grey.jpg", Image.new("RGB", (64, 64), (128, 128, 128)), 1)
    rows.sort()
    prepared = root / "data" / "prepared"
    prepared.mkdir(parents=True)
    with open(prepared / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(MANIFEST_FIELDS)
        writer.writerows(rows)
    weights = root / "models" / "pretrained" / "tiny.pth"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"tiny weights")
    (root / "params.yaml").write_text(yaml.safe_dump({"backbones": ["efficientnet_lite0"],
                                                      "audit": audit_params or {}}, sort_keys=False))
    project = {"root": root, "raw": raw, "manifest": prepared / "manifest.csv", "weights": weights,
               "features": root / "features" / "tiny.h5", "reports": root / "reports" / "tiny", "rows": rows}
    write_features(project)
    return project


def write_features(project: dict, *, drop_last: bool = False) -> Path:
    """features/tiny.h5 in the extract stage's layout (stages/features.py), one row per manifest image."""
    rows = project["rows"][:-1] if drop_last else project["rows"]
    out = project["features"]
    out.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(out, "w") as h5:
        h5.create_dataset("features/pool", data=np.stack([embed(project["raw"] / r[0]) for r in rows]))
        h5.create_dataset("labels", data=np.array([r[2] for r in rows], dtype=np.int64))
        h5.create_dataset("split", data=np.array([r[3].encode() for r in rows], dtype="S5"))
        h5.create_dataset("sha256", data=np.array([r[4].encode() for r in rows], dtype="S64"))
        h5.create_dataset("path", data=[r[0] for r in rows], dtype=h5py.string_dtype("utf-8"))
        attrs = {"backbone": "tiny", "weights_sha256": hashlib.sha256(project["weights"].read_bytes()).hexdigest(),
                 "manifest_sha256": hashlib.sha256(project["manifest"].read_bytes()).hexdigest(),
                 "layers": json.dumps(["pool"]), "classes": json.dumps(CLASSES), "storage_dtype": "float32",
                 "tta": '["none"]', "tta_mode": "average", "layer_aliases": "{}"}
        for key, value in attrs.items():
            h5.attrs[key] = value
    return out


def run_stage(project: dict) -> int:
    return audit.main(["--backbone", "tiny", "--features", str(project["features"]), "--manifest",
                       str(project["manifest"]), "--weights", str(project["weights"]), "--raw", str(project["raw"]),
                       "--reports", str(project["reports"]), "--params", str(project["root"] / "params.yaml")])


def test_stage_on_tiny_images_finds_the_copies_the_leak_and_the_grey_image(tmp_path: Path) -> None:
    project = make_project(tmp_path, audit_params={"cross_split": "drop_from_heldout"})
    assert run_stage(project) == 0
    reports = project["reports"]
    report = json.loads((reports / "audit.json").read_text())
    assert report["n_images"] == 33 and report["heldout_split"] == "val"
    (group,) = report["duplicates"]  # one group of three: the pixel check rejects distinct pictures
    assert group["paths"] == ["train/ants/ants00.jpg", "train/ants/ants00_small.jpg", "val/ants/ants00_copy.jpg"]
    assert group["cross_split"] and group["splits"] == ["train", "train", "val"]
    assert report["counts"] == {"duplicate_groups": 0, "duplicate_images": 0, "leakage_groups": 1,
                                "leakage_pairs": 2, "label_issues": report["counts"]["label_issues"],
                                "outliers": report["counts"]["outliers"], "dropped_from_heldout": 1,
                                "flagged_images": report["counts"]["flagged_images"]}
    assert {tuple(p["paths"]) for p in report["leakage_pairs"]} <= {
        ("train/ants/ants00.jpg", "val/ants/ants00_copy.jpg"), ("train/ants/ants00_small.jpg", "val/ants/ants00_copy.jpg")}
    assert report["dropped_from_heldout"] == ["val/ants/ants00_copy.jpg"]
    assert report["label_check"]["status"] == "ran"
    assert report["outliers"][0]["path"] == "train/bees/grey.jpg"
    decision = json.loads((reports / "audit" / "heldout.json").read_text())
    assert decision == {"policy": "drop_from_heldout", "heldout_split": "val",
                        "dropped_from_heldout": ["val/ants/ants00_copy.jpg"]}
    with open(reports / "audit.csv", newline="") as fh:
        findings = list(csv.DictReader(fh))
    assert findings[0] == {"kind": "leakage", "paths": ";".join(group["paths"]), "splits": "train;train;val",
                           "classes": "ants;ants;ants", "score": str(group["score"]), "suggested_label": ""}
    assert len(findings) == 1 + report["counts"]["label_issues"] + report["counts"]["outliers"]
    for kind in audit.KINDS:
        with Image.open(reports / "audit" / f"{kind}.png") as sheet:
            assert sheet.format == "PNG" and sheet.width >= 3 * audit.THUMB
    with Image.open(reports / "audit" / "duplicates.png") as empty:  # "no findings" card
        assert empty.height < audit.THUMB


def test_head_leaves_the_listed_heldout_copies_out_of_evaluation_only(tmp_path: Path) -> None:
    from stages.head import Dataset, drop_audited_heldout

    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    data = Dataset.from_arrays({"pool": x}, np.array([0, 1, 0, 1, 0, 1]), ["train"] * 3 + ["val"] * 3)
    data = Dataset(images=data.images, labels=data.labels, split=data.split, paths=list("abcdef"),
                   extra={"pool": x[[0, 4, 5]] + 100}, extra_source=np.array([0, 4, 5]))
    decision = tmp_path / "heldout.json"
    decision.write_text(json.dumps({"policy": "drop_from_heldout", "dropped_from_heldout": ["e", "a"]}))
    kept, audit_info = drop_audited_heldout(data, decision)
    assert kept.paths == list("abcdf")  # "a" is listed but in train: never dropped
    assert audit_info == {"policy": "drop_from_heldout", "dropped_from_heldout": ["e"]}
    np.testing.assert_array_equal(kept.images["pool"], x[[0, 1, 2, 3, 5]])
    np.testing.assert_array_equal(kept.extra_source, [0, 4])  # e's extra row is gone, f's now points at row 4
    np.testing.assert_array_equal(kept.extra["pool"], x[[0, 5]] + 100)
    decision.write_text(json.dumps({"policy": "report", "dropped_from_heldout": ["e"]}))
    assert drop_audited_heldout(data, decision)[0] is data
    assert drop_audited_heldout(data, None) == (data, None)


# ------------------------------------------------------------------------------------------------ bad inputs
def test_too_few_images_per_class_skips_the_label_check_and_runs_the_rest(tmp_path: Path) -> None:
    project = make_project(tmp_path, n_train=2, n_val=1, audit_params={})
    assert run_stage(project) == 0
    report = json.loads((project["reports"] / "audit.json").read_text())
    assert report["label_check"]["status"] == "skipped"
    assert "audit.label_folds = 5" in report["label_check"]["reason"] and "bees (4)" in report["label_check"]["reason"]
    assert report["label_issues"] == [] and report["counts"]["leakage_groups"] == 1  # the other checks ran
    with Image.open(project["reports"] / "audit" / "label_issues.png") as sheet:
        assert sheet.height < audit.THUMB


def test_features_of_another_manifest_or_missing_rows_are_provenance_errors(tmp_path: Path, caplog) -> None:
    project = make_project(tmp_path)
    kwargs = dict(backbone="tiny", features_path=project["features"], manifest_path=project["manifest"],
                  weights_path=project["weights"], raw=project["raw"], reports_dir=project["reports"],
                  params=AuditParams())
    text = project["manifest"].read_text()
    project["manifest"].write_text(text.replace("ants01.jpg", "ants01b.jpg"))
    with pytest.raises(ProvenanceError, match=r"attribute manifest_sha256 is .* Re-run `dvc repro extract@tiny`"):
        audit.run_audit(**kwargs)
    assert run_stage(project) == 1 and "manifest_sha256" in caplog.text
    project["manifest"].write_text(text)
    write_features(project, drop_last=True)
    with pytest.raises(ProvenanceError, match=r"the number of rows is 32 but expected 33"):
        audit.run_audit(**kwargs)
    assert not (project["reports"] / "audit.json").exists()
    write_features(project)
    with pytest.raises(audit.AuditError, match=r"audit.layer 'mid' is not in .* holds \['pool'\]"):
        audit.run_audit(**{**kwargs, "params": AuditParams(layer="mid")})


@pytest.mark.parametrize(("key", "value", "message"), [
    ("duplicate_cosine", 0.8, "'audit.duplicate_cosine' was removed: .* set by 'audit.duplicate_z'"),
    ("duplicate_z", -1, "audit.duplicate_z must be a positive"),
    ("cross_split", "drop", "audit.cross_split must be one of 'report', 'drop_from_heldout'; got 'drop'"),
    ("label_folds", 1, "audit.label_folds must be an integer of at least 2"),
    ("duplicate_pixel_correlation", 0.9, "'audit.duplicate_pixel_correlation' was removed"),
    ("outlier_zz", 3, "unknown parameter 'audit.outlier_zz'. Did you mean 'outlier_z'?"),
])
def test_audit_params_are_validated(key: str, value, message: str) -> None:
    with pytest.raises(ParamError, match=message):
        parse_params({"audit": {key: value}}, known_backbones=["efficientnet_lite0"])


# ------------------------------------------------------------------------------------------------ report
def test_report_section_counts_per_backbone_and_marks_agreed_findings(tmp_path: Path) -> None:
    from stages.report import render_audit

    def write(backbone: str, label_paths: list[str], skipped: bool = False) -> None:
        counts = {"duplicate_groups": 1, "duplicate_images": 2, "leakage_groups": 0, "leakage_pairs": 0,
                  "label_issues": len(label_paths), "outliers": 0, "dropped_from_heldout": 0, "flagged_images": 3}
        (tmp_path / backbone).mkdir()
        (tmp_path / backbone / "audit.json").write_text(json.dumps({
            "counts": counts, "flagged_fraction": 0.1, "label_check": {"status": "skipped" if skipped else "ran"},
            "duplicates": [{"paths": ["a.jpg", "b.jpg"], "cross_split": False}], "outliers": [],
            "label_issues": [{"path": p, "given": "ants", "suggested": "bees"} for p in label_paths]}))

    write("bb1", ["x.jpg", "y.jpg"])
    write("bb2", ["x.jpg"])
    lines, summary, note = render_audit(tmp_path, ["bb1", "bb2", "absent"])
    text = "\n".join(lines)
    assert "## Dataset audit" in text and "| bb1 | 1 (2) | 0 (0) | 2 | 0 | 3 (10.0%) | 0 |" in text
    assert "- near-duplicates: `a.jpg`, `b.jpg`: agreed by 2 backbones" in text
    assert "- label issue: `x.jpg` (ants -> bees): agreed by 2 backbones" in text and "`y.jpg`" not in text
    assert summary["agreed"] == {"near-duplicates": 1, "leakage": 0, "label issue": 1, "outlier": 0}
    assert summary["backbones"]["bb2"]["label_issues"] == 1 and "absent" not in summary["backbones"]
    assert note[0].startswith("Dataset audit: bb1 1 near-duplicate group(s)")
    assert render_audit(tmp_path, ["absent"]) == ([], {}, [])


@pytest.mark.parametrize("exact_max_rows", [50_000, 0])  # exact index; IVF with 8-bit codes
def test_pixel_neighbours_find_mirrored_and_cropped_copies_searching_in_chunks(exact_max_rows: int) -> None:
    squares = np.stack([audit_rules.gray_square(photo(seed)) for seed in range(200)]).astype(np.uint8)
    squares[150] = squares[3][:, ::-1]  # a mirror of 3
    squares[151] = audit_rules.gray_square(photo(7).crop((0, 0, 100, 100)))  # a 78% crop of 7
    readable = np.ones(200, bool)
    readable[199] = False
    sims, idx = audit_rules.pixel_neighbours(lambda a, b: squares[a:b], readable, 3, chunk=64,
                                             exact_max_rows=exact_max_rows)
    assert sims.shape == idx.shape == (200, 3) and idx[3, 0] == 150 and idx[150, 0] == 3
    assert idx[7, 0] == 151  # the original's 80% window is the copy's whole (a pair: in either list)
    assert sims[150, 0] > 0.95 and np.all(np.diff(sims[:199], axis=1) <= 0) and np.all(idx[199] == -1)
    assert not np.any(idx == np.arange(200)[:, None])


def test_rows_are_read_in_chunks_with_their_views_averaged_as_a_whole_read_gives(tmp_path: Path,
                                                                                 monkeypatch) -> None:
    """read_rows reads the file lazily, a few rows at a time: each image's TTA view rows (tta_mode rows) averaged
    and normalized, exactly as the whole layer read at once; labels, splits and paths one per image."""
    project = make_project(tmp_path)
    with h5py.File(project["features"], "r+") as h5:
        x = h5["features/pool"][()]
        views = np.stack([x, x + np.random.default_rng(1).normal(0, 0.1, x.shape).astype(np.float32)], axis=1)
        for name in ("features/pool", "labels", "split", "sha256", "path"):
            values = views.reshape(-1, x.shape[1]) if name == "features/pool" else np.repeat(h5[name][()], 2)
            del h5[name]
            h5.create_dataset(name, data=values, dtype=h5py.string_dtype("utf-8") if name == "path" else None)
        h5.attrs["tta"], h5.attrs["tta_mode"] = '["none", "hflip"]', "rows"
    monkeypatch.setattr(audit, "READ_CHUNK_ROWS", 5)  # 4 rows (2 images) a chunk, the last one short
    rows = audit.read_rows(backbone="tiny", features_path=project["features"], manifest_path=project["manifest"],
                           weights_path=project["weights"], layer="pool")
    np.testing.assert_array_equal(rows.features, audit.l2_normalize(views.mean(1, dtype=np.float32)))
    assert rows.features.dtype == np.float32 and rows.features.shape == x.shape
    assert rows.paths == [r[0] for r in project["rows"]] and rows.labels.tolist() == [r[2] for r in project["rows"]]
