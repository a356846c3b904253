"""stages.prepare: bad-input quarantine, manifest contents and determinism, splits, exact mean/std, reports."""
from __future__ import annotations

import csv
import io
import json
import re
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages import prepare
from stages.backbones import LITE_MEAN, LITE_STD
from stages.images import load_rgb, read_manifest, stats_transform
from stages.params import PrepareParams, parse_params
from stages.prepare import PrepareError, manifest_csv, prepare_dataset, stratified_split

BACKBONES = ["efficientnet_lite0"]


def png_header(width: int, height: int) -> bytes:
    """A PNG signature + IHDR + IEND claiming `width` x `height` RGB pixels, with no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


def make_params(**prepare_kwargs):
    return parse_params({"backbones": BACKBONES, "prepare": {"num_workers": 0, **prepare_kwargs}})


def noise(seed: int, size: tuple[int, int] = (32, 32)) -> Image.Image:
    """A random RGB image of `size` (width, height)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def save(path: Path, image: Image.Image, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


def write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def make_bad_corpus(raw: Path) -> dict[str, str]:
    """The issue's bad-input corpus; returns {path: class} of every file that must reach the manifest."""
    valid: dict[str, str] = {}
    for i in range(3):
        save(raw / f"train/ants/a{i}.jpg", noise(i))
        save(raw / f"train/bees/b{i}.jpg", noise(10 + i))
        save(raw / f"val/ants/va{i}.jpg", noise(20 + i))
        save(raw / f"val/bees/vb{i}.jpg", noise(30 + i))
    valid |= {f"train/ants/a{i}.jpg": "ants" for i in range(3)} | {f"train/bees/b{i}.jpg": "bees" for i in range(3)}
    valid |= {f"val/ants/va{i}.jpg": "ants" for i in range(3)} | {f"val/bees/vb{i}.jpg": "bees" for i in range(3)}
    # bad: must be quarantined
    write_bytes(raw / "train/ants/zero.jpg", b"")
    jpeg = io.BytesIO()
    noise(99, (64, 64)).save(jpeg, format="JPEG")
    write_bytes(raw / "train/ants/truncated.jpg", jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    write_bytes(raw / "train/bees/text.jpg", b"this is not an image\n")
    write_bytes(raw / "train/bees/huge.png", png_header(50_000, 50_000))
    write_bytes(raw / "train/bees/notes.txt", b"labelling notes")
    write_bytes(raw / "val/stray.jpg", jpeg.getvalue())  # in a split folder, but in no class folder
    # odd but valid: converted and kept
    save(raw / "train/ants/placeholder.gif", noise(40).convert("P", palette=Image.Palette.ADAPTIVE))
    save(raw / "train/ants/cmyk.jpg", noise(41).convert("CMYK"))
    save(raw / "train/bees/gray.png", noise(42).convert("L"))
    save(raw / "train/bees/gray16.png", Image.fromarray((np.arange(32 * 32, dtype=np.uint16) * 60).reshape(32, 32)))
    rgba = noise(43).convert("RGBA")
    rgba.putalpha(128)
    save(raw / "train/bees/rgba.png", rgba)
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees counter-clockwise to display
    save(raw / "train/ants/rotated.jpg", noise(44, (48, 32)), exif=exif.tobytes())
    save(raw / "train/bees/one.png", Image.new("RGB", (1, 1), (200, 100, 50)))
    save(raw / "train/ants/ant photo é.jpg", noise(45))
    save(raw / "val/bees/abeille été 蜂.png", noise(46))
    write_bytes(raw / "train/ants/.DS_Store", b"\x00\x00\x00\x01Bud1")
    valid |= {"train/ants/placeholder.gif": "ants", "train/ants/cmyk.jpg": "ants", "train/bees/gray.png": "bees",
              "train/bees/gray16.png": "bees", "train/bees/rgba.png": "bees", "train/ants/rotated.jpg": "ants",
              "train/bees/one.png": "bees", "train/ants/ant photo é.jpg": "ants",
              "val/bees/abeille été 蜂.png": "bees"}
    return valid


QUARANTINED = {
    "train/ants/zero.jpg": r"^empty file \(0 bytes\)$",
    "train/ants/truncated.jpg": r"truncated|broken data stream",
    "train/bees/text.jpg": r"^not an image: no decoder recognises its contents$",
    "train/bees/huge.png": r"^decompression bomb guard: .*2500000000 pixels",
    "train/bees/notes.txt": r"^extension '\.txt' is not an image extension",
    "val/stray.jpg": r"^not inside a class folder \(it is in a split folder",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str], prepare.Prepared]:
    raw = tmp_path_factory.mktemp("corpus") / "raw"
    valid = make_bad_corpus(raw)
    return raw, valid, prepare_dataset(raw, make_params(stats_size=16), num_workers=2)


def test_bad_corpus_quarantine_is_exact(corpus) -> None:
    _, _, prepared = corpus
    reasons = {q["path"]: q["reason"] for q in prepared.quarantine}
    assert set(reasons) == set(QUARANTINED)
    for path, pattern in QUARANTINED.items():
        assert re.search(pattern, reasons[path]), (path, reasons[path])
    assert prepared.summary["n_bad"] == 6
    assert prepared.summary["n_hidden_skipped"] == 1


def test_every_valid_image_is_in_the_manifest_with_its_class(corpus) -> None:
    _, valid, prepared = corpus
    rows = {r["path"]: r for r in prepared.manifest}
    assert {p: r["class"] for p, r in rows.items()} == valid
    assert [r["path"] for r in prepared.manifest] == sorted(valid)
    assert prepared.classes == ["ants", "bees"]
    assert all(r["label"] == prepared.classes.index(r["class"]) for r in prepared.manifest)
    assert all(r["split"] == r["path"].split("/")[0] for r in prepared.manifest)
    assert (rows["train/ants/rotated.jpg"]["width"], rows["train/ants/rotated.jpg"]["height"]) == (32, 48)
    assert (rows["train/bees/one.png"]["width"], rows["train/bees/one.png"]["height"]) == (1, 1)
    assert prepared.summary["splits"] == {"train": {"total": 14, "ants": 7, "bees": 7},
                                          "val": {"total": 7, "ants": 3, "bees": 4},
                                          "test": {"total": 0, "ants": 0, "bees": 0}}


def test_warnings_name_the_odd_but_valid_images(corpus) -> None:
    _, _, prepared = corpus
    warnings = {w["path"]: w["issues"] for w in prepared.summary["warnings"]}
    assert warnings["train/ants/placeholder.gif"] == ["non-JPEG format (GIF)",
                                                     "palette mode (P) converted to 8-bit RGB"]
    assert "CMYK mode (CMYK) converted to 8-bit RGB" in warnings["train/ants/cmyk.jpg"]
    assert "EXIF orientation applied (width/height are after rotation)" in warnings["train/ants/rotated.jpg"]
    assert "tiny image (1x1), upscaled for features" in warnings["train/bees/one.png"]
    assert any("16-bit" in issue for issue in warnings["train/bees/gray16.png"])
    assert "train/ants/a0.jpg" not in warnings and "val/bees/abeille été 蜂.png" in warnings
    assert warnings["train/bees/gray.png"] == ["non-JPEG format (PNG)", "grayscale mode (L) converted to 8-bit RGB"]
    assert prepared.summary["n_warnings"] == len(prepared.summary["warnings"])


def test_pool_and_in_process_decoding_agree(corpus) -> None:
    raw, _, pooled = corpus
    single = prepare_dataset(raw, make_params(stats_size=16), num_workers=0)
    assert single.manifest == pooled.manifest and single.stats == pooled.stats


def test_mean_std_equal_numpy_over_the_resized_training_pixels(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    sizes = [(40, 30), (17, 50), (64, 64), (23, 23), (90, 12)]
    for i, size in enumerate(sizes):
        save(raw / f"train/c{i % 2}/img{i}.png", noise(i, size))
        save(raw / f"val/c{i % 2}/img{i}.png", noise(100 + i, size))  # must not count
    prepared = prepare_dataset(raw, make_params(stats_size=20), num_workers=0)
    train = sorted(raw.glob("train/*/*.png"))
    stacked = np.stack([stats_transform(20)(load_rgb(p)[0]).numpy() for p in train]).astype(np.float64) / 255
    assert stacked.shape == (5, 3, 20, 20)
    np.testing.assert_allclose(prepared.stats["mean"], stacked.mean(axis=(0, 2, 3)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(prepared.stats["std"], stacked.std(axis=(0, 2, 3)), rtol=0, atol=1e-12)
    assert prepared.stats["n_images"] == 5 and prepared.stats["n_pixels"] == 5 * 400
    assert prepared.summary["mean"] == prepared.stats["mean"]


def class_tree(raw: Path, per_class: dict[str, int], *, offset: int = 0) -> None:
    """A <class>/<image> tree (no split folders) of tiny images, distinct for distinct (class, i, offset)."""
    for c, n in per_class.items():
        for i in range(n):
            save(raw / c / f"{i:03d}.png", noise(zlib.crc32(f"{c}/{i}/{offset}".encode()), (8, 8)))


def test_stratified_split_counts_per_class_and_seed(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    class_tree(raw, {"cat": 20, "dog": 10, "eel": 3})
    split = {}
    for seed in (0, 1):
        prepared = prepare_dataset(raw, make_params(val_fraction=0.25, test_fraction=0.1, seed=seed,
                                                    stats_size=8), num_workers=0)
        split[seed] = {r["path"]: r["split"] for r in prepared.manifest}
        counts = Counter((r["class"], r["split"]) for r in prepared.manifest)
        # round half up per class: cat 5 val / 2 test, dog 3 (2.5) / 1, eel 1 (0.75) / 0 (0.3) raised to 1:
        # test is held out and keeps every class
        assert counts == {("cat", "train"): 13, ("cat", "val"): 5, ("cat", "test"): 2,
                          ("dog", "train"): 6, ("dog", "val"): 3, ("dog", "test"): 1,
                          ("eel", "train"): 1, ("eel", "val"): 1, ("eel", "test"): 1}
        assert prepared.summary["split_method"] == "stratified"
    assert split[0] != split[1]
    again = prepare_dataset(raw, make_params(val_fraction=0.25, test_fraction=0.1, seed=0, stats_size=8),
                            num_workers=0)
    assert {r["path"]: r["split"] for r in again.manifest} == split[0]


def test_stratified_split_keeps_every_class_in_train_and_held_out() -> None:
    groups = [("a0", "a"), ("a1", "a"), ("b0", "b"), ("b1", "b"), ("b2", "b")] + [(f"c{i}", "c") for i in range(10)]
    # a: round(0.2) = 0 to test, raised to 1 (held out); b: round(0.3) = 0 -> 1; c: round(1.0) = 1; val: 0
    result = stratified_split(groups, val_fraction=0.0, test_fraction=0.1, seed=3)
    for cls, n in (("a", 2), ("b", 3), ("c", 10)):
        splits = sorted(result[k] for k, c in groups if c == cls)
        assert splits == ["test"] + ["train"] * (n - 1), cls
    # only val drawn: val is the held-out split and gets one of each class
    result = stratified_split(groups[:5], val_fraction=0.1, test_fraction=0.0, seed=3)
    assert sorted(result[k] for k in ("a0", "a1")) == ["train", "val"]
    # b: round(1.2) = 1 to test; round(1.5) = 2 to val but only 1 left over after train's one
    result = stratified_split(groups[2:5], val_fraction=0.5, test_fraction=0.4, seed=3)
    assert sorted(result.values()) == ["test", "train", "val"]


def test_stratified_split_refuses_a_class_with_one_image() -> None:
    with pytest.raises(PrepareError, match=r"class\(es\) \['a'\] have a single distinct image: it cannot be both "
                                           r"in train and in the held-out test split"):
        stratified_split([("a0", "a"), ("b0", "b"), ("b1", "b")], val_fraction=0.5, test_fraction=0.4, seed=3)
    assert stratified_split([("a0", "a")], val_fraction=0.0, test_fraction=0.0, seed=3) == {"a0": "train"}


def test_a_class_missing_from_the_held_out_folder_is_an_error(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    for seed, name in enumerate(["train/a/x.png", "train/b/y.png", "val/a/z.png"]):
        save(raw / name, noise(seed, (8, 8)))
    with pytest.raises(PrepareError, match=r"class\(es\) \['b'\] have no valid image in the held-out val split"):
        prepare_dataset(raw, make_params(stats_size=8), num_workers=0)


def test_duplicates_across_split_folders_are_kept_in_train_only(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    for seed, (split, c) in enumerate([("train", "a"), ("train", "b"), ("val", "a"), ("val", "b")]):
        save(raw / f"{split}/{c}/{split}{c}.png", noise(seed, (8, 8)))
    save(raw / "train/a/dup.png", noise(7, (8, 8)))
    (raw / "val/a/dup copy.png").write_bytes((raw / "train/a/dup.png").read_bytes())
    (raw / "train/a/dup again.png").write_bytes((raw / "train/a/dup.png").read_bytes())
    prepared = prepare_dataset(raw, make_params(stats_size=8), num_workers=0)
    paths = [r["path"] for r in prepared.manifest]
    assert "val/a/dup copy.png" not in paths and {"train/a/dup.png", "train/a/dup again.png"} <= set(paths)
    (group,) = prepared.summary["duplicates"]
    assert group["dropped"] == ["val/a/dup copy.png"]
    assert sorted(group["kept"]) == ["train/a/dup again.png", "train/a/dup.png"]
    assert prepared.summary["n_duplicates"] == 2 and prepared.summary["n_duplicates_dropped"] == 1


def test_stratified_split_keeps_identical_files_together(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    class_tree(raw, {"a": 12, "b": 12})
    for i in range(12):  # every image of a has a twin under a/twins/
        write_bytes(raw / "a" / "twins" / f"{i:03d}.png", (raw / "a" / f"{i:03d}.png").read_bytes())
    prepared = prepare_dataset(raw, make_params(val_fraction=0.3, stats_size=8), num_workers=0)
    split = {r["path"]: r["split"] for r in prepared.manifest}
    assert all(split[f"a/{i:03d}.png"] == split[f"a/twins/{i:03d}.png"] for i in range(12))
    assert prepared.summary["n_duplicates"] == 12 and prepared.summary["n_duplicates_dropped"] == 0


def test_missing_val_folder_is_drawn_from_train(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    class_tree(raw / "train", {"a": 10, "b": 10})
    class_tree(raw / "test", {"a": 2, "b": 2}, offset=1)
    prepared = prepare_dataset(raw, make_params(val_fraction=0.2, stats_size=8), num_workers=0)
    assert prepared.summary["splits"]["val"] == {"total": 4, "a": 2, "b": 2}
    assert prepared.summary["splits"]["test"]["total"] == 4
    assert prepared.summary["split_method"] == "folders (train, test); val drawn from train, stratified"


@pytest.mark.parametrize("per_class, kwargs, match", [
    ({"only": 5}, {}, r"found 1 class folder\(s\) \['only'\]; a classifier needs at least 2"),
    # b: one image cannot be both in train and in the held-out test split
    ({"a": 2, "b": 1}, {}, r"class\(es\) \['b'\] have a single distinct image: it cannot be both in train and "
                           r"in the held-out test split\. Add images"),
    ({"a": 3, "b": 3}, {"val_fraction": 0.5, "test_fraction": 0.0}, None),  # val held out: fine
])
def test_unusable_datasets_fail_clearly(tmp_path: Path, per_class, kwargs, match) -> None:
    class_tree(tmp_path / "raw", per_class)
    if match is None:
        prepared = prepare_dataset(tmp_path / "raw", make_params(stats_size=8, **kwargs), num_workers=0)
        assert prepared.summary["splits"]["val"]["total"] == 4 and prepared.summary["splits"]["test"]["total"] == 0
        return
    with pytest.raises(PrepareError, match=match):
        prepare_dataset(tmp_path / "raw", make_params(stats_size=8, **kwargs), num_workers=0)


def test_default_split_is_train_and_a_stratified_held_out_test(tmp_path: Path) -> None:
    assert (PrepareParams().val_fraction, PrepareParams().test_fraction) == (0.0, 0.2)
    raw = tmp_path / "raw"
    class_tree(raw, {"a": 10, "b": 13})
    for i in range(3):  # b/000..002 each have an identical copy: 13 distinct files in b, 16 files
        write_bytes(raw / "b" / "copies" / f"{i:03d}.png", (raw / "b" / f"{i:03d}.png").read_bytes())
    runs = [prepare_dataset(raw, make_params(stats_size=8), num_workers=0) for _ in range(2)]
    prepared = runs[0]
    # round half up per class over distinct files: a 2 (10 x 0.2), b 3 (13 x 0.2 = 2.6); copies follow their twin
    split = {r["path"]: r["split"] for r in prepared.manifest}
    assert all(split[f"b/copies/{i:03d}.png"] == split[f"b/{i:03d}.png"] for i in range(3))
    distinct = Counter((r["class"], r["split"]) for r in prepared.manifest if "/copies/" not in r["path"])
    assert distinct == {("a", "train"): 8, ("a", "test"): 2, ("b", "train"): 10, ("b", "test"): 3}
    totals = {s: v["total"] for s, v in prepared.summary["splits"].items()}
    assert totals["val"] == 0 and totals["train"] + totals["test"] == 26
    assert prepared.summary["split_method"] == "stratified"
    assert prepared.summary["n_duplicates"] == 3 and prepared.summary["n_duplicates_dropped"] == 0
    assert runs[1].manifest == prepared.manifest  # deterministic
    assert manifest_csv(runs[1].manifest) == manifest_csv(prepared.manifest)


def test_train_val_folders_keep_val_as_the_held_out_split(tmp_path: Path) -> None:
    """hymenoptera's layout: the default test_fraction draws nothing, val stays the held-out split."""
    raw = tmp_path / "raw"
    class_tree(raw / "train", {"a": 10, "b": 10})
    class_tree(raw / "val", {"a": 3, "b": 3}, offset=1)
    prepared = prepare_dataset(raw, make_params(stats_size=8), num_workers=0)
    assert {s: v["total"] for s, v in prepared.summary["splits"].items()} == {"train": 20, "val": 6, "test": 0}
    assert prepared.summary["split_method"] == "folders"
    assert all(r["split"] == r["path"].split("/")[0] for r in prepared.manifest)


def test_train_folder_alone_gets_a_held_out_test_split(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    class_tree(raw / "train", {"a": 10, "b": 5})
    prepared = prepare_dataset(raw, make_params(stats_size=8), num_workers=0)
    assert prepared.summary["splits"]["test"] == {"total": 3, "a": 2, "b": 1}
    assert prepared.summary["splits"]["val"]["total"] == 0
    assert prepared.summary["split_method"] == "folders (train); test drawn from train, stratified"


def test_a_small_class_still_gets_a_held_out_image(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    class_tree(raw, {"a": 10, "b": 2})  # b: round(2 x 0.2) = 0 test images, raised to 1 (test is held out)
    prepared = prepare_dataset(raw, make_params(stats_size=8), num_workers=0)
    assert prepared.summary["splits"]["test"] == {"total": 3, "a": 2, "b": 1}
    assert prepared.summary["splits"]["train"] == {"total": 9, "a": 8, "b": 1}
    # val drawn beside a held-out test split is not raised: a class may miss it, with a warning
    prepared = prepare_dataset(raw, make_params(stats_size=8, val_fraction=0.1), num_workers=0)
    assert prepared.summary["splits"]["val"]["b"] == 0
    assert {"path": None, "issues": ["class(es) ['b'] have no val images"]} in prepared.summary["warnings"]


@pytest.mark.parametrize("folders", [(), ("train",)])
def test_nothing_held_out_is_an_error_naming_test_fraction(tmp_path: Path, monkeypatch, folders) -> None:
    raw = tmp_path / "raw"
    class_tree(raw.joinpath(*folders), {"a": 5, "b": 5})
    monkeypatch.setattr(prepare, "decode_all", lambda *a, **k: pytest.fail("decoded before the layout check"))
    layout = "split folders: train" if folders else "no split folders"
    with pytest.raises(PrepareError, match=re.escape(
            f"{raw}: nothing would be held out for evaluation: the dataset has no val/ or test/ folder ({layout}) "
            f"and prepare.test_fraction and prepare.val_fraction are both 0. Set prepare.test_fraction in "
            f"params.yaml, e.g. `test_fraction: 0.2` (a stratified held-out test split), or add a test/ folder "
            f"to the dataset.")):
        prepare_dataset(raw, make_params(stats_size=8, val_fraction=0.0, test_fraction=0.0), num_workers=0)


def test_both_fractions_zero_is_fine_with_a_test_or_val_folder(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    class_tree(raw / "train", {"a": 4, "b": 4})
    class_tree(raw / "test", {"a": 1, "b": 1}, offset=1)
    prepared = prepare_dataset(raw, make_params(stats_size=8, val_fraction=0.0, test_fraction=0.0), num_workers=0)
    assert {s: v["total"] for s, v in prepared.summary["splits"].items()} == {"train": 8, "val": 0, "test": 2}


def test_empty_split_folder_and_mixed_layout_fail(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    class_tree(raw / "train", {"a": 2, "b": 2})
    write_bytes(raw / "val/a/broken.jpg", b"")
    with pytest.raises(PrepareError, match=r"the val split has no images \(4 valid images in all, 1 quarantined"):
        prepare_dataset(raw, make_params(stats_size=8), num_workers=0)
    class_tree(raw / "extra", {"a": 1})
    with pytest.raises(PrepareError, match=r"mixed layout: split folders \['train', 'val'\] next to other "
                                           r"folders \['extra'\]"):
        prepare_dataset(raw, make_params(stats_size=8), num_workers=0)


def test_normalization_report_per_backbone(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    class_tree(raw, {"a": 5, "b": 5})
    own = prepare_dataset(raw, make_params(stats_size=8), num_workers=0).summary["normalization"]
    assert own["backbones"]["efficientnet_lite0"] == {"uses": "pretrained", "mean": list(LITE_MEAN),
                                                      "std": list(LITE_STD)}
    dataset = prepare_dataset(raw, make_params(stats_size=8, normalization="dataset"), num_workers=0)
    assert dataset.summary["normalization"]["backbones"]["efficientnet_lite0"] == {
        "uses": "dataset", "mean": dataset.stats["mean"], "std": dataset.stats["std"]}


def test_main_writes_byte_identical_outputs_on_rerun(corpus, tmp_path: Path, monkeypatch) -> None:
    raw, valid, _ = corpus
    (tmp_path / "params.yaml").write_text(
        "backbones: [efficientnet_lite0]\nprepare:\n  stats_size: 16\n  num_workers: 0\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    outputs = []
    for run in ("one", "two"):
        assert prepare.main(["--raw", str(raw), "--out", f"{run}/prepared", "--reports", f"{run}/reports"]) == 0
        outputs.append({p.relative_to(tmp_path / run).as_posix(): p.read_bytes()
                        for p in sorted((tmp_path / run).rglob("*")) if p.is_file()})
    assert sorted(outputs[0]) == ["prepared/classes.json", "prepared/manifest.csv", "prepared/stats.json",
                                  "reports/quarantine.json", "reports/summary.json"]
    assert outputs[0] == outputs[1]
    rows = read_manifest(tmp_path / "one/prepared/manifest.csv")
    assert {r.path: r.cls for r in rows} == valid
    with open(tmp_path / "one/prepared/manifest.csv", newline="", encoding="utf-8") as fh:
        assert next(csv.reader(fh)) == ["path", "class", "label", "split", "sha256", "width", "height"]
    summary = json.loads(outputs[0]["reports/summary.json"])
    assert summary["n_bad"] == 6 and summary["splits"]["train"]["total"] == 14
    quarantine = json.loads(outputs[0]["reports/quarantine.json"])
    assert quarantine["n_bad"] == 6 and [q["path"] for q in quarantine["files"]] == sorted(QUARANTINED)
