"""stages.labels: CSV/Parquet labels files (columns, one-hot, lists, splits), every bad row named; prepare reads them."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stages.labels import LabelRow, LabelsError, read_labels
from stages.params import LabelColumns, parse_params
from stages.prepare import PrepareError, manifest_csv, prepare_dataset


def images(raw: Path, names: list[str]) -> None:
    for i, name in enumerate(names):
        (raw / name).parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(raw / name)


def write(raw: Path, name: str, text: str) -> None:
    (raw / name).write_text(text, encoding="utf-8")


def test_csv_with_label_column_and_split(tmp_path: Path) -> None:
    images(tmp_path, ["img/a.png", "img/b c.png"])
    write(tmp_path, "train.csv", "image,y,fold\nimg/a.png, ants ,train\nimg/b c.png,NA,Validation\n")
    rows = read_labels(tmp_path, "train.csv", LabelColumns(path="image", label="y", split="fold"))
    assert rows == [LabelRow(1, "img/a.png", ("ants",), "train"), LabelRow(2, "img/b c.png", ("NA",), "val")]


def test_parquet_onehot_and_separated_lists(tmp_path: Path) -> None:
    images(tmp_path, ["a.png", "b.png"])
    pd.DataFrame({"path": ["a.png", "b.png"], "cat": [1, 0], "dog": [0, 1]}).to_parquet(tmp_path / "l.parquet")
    rows = read_labels(tmp_path, "l.parquet", LabelColumns(label=None, onehot=("cat", "dog")))
    assert [(r.path, r.labels) for r in rows] == [("a.png", ("cat",)), ("b.png", ("dog",))]
    write(tmp_path, "m.csv", "path,tags\na.png,cat; outdoor\nb.png,dog\n")
    rows = read_labels(tmp_path, "m.csv", LabelColumns(label="tags", separator=";"))
    assert [r.labels for r in rows] == [("cat", "outdoor"), ("dog",)]


@pytest.mark.parametrize("text, columns, message", [
    ("path,label\na.png,x\nmissing.png,y\n", {}, "row 2: image 'missing.png' does not exist under"),
    ("file,label\na.png,x\n", {}, "column(s) 'path' named in data.label_columns are not in the file; its columns "
                                  "are 'file', 'label'"),
    ("path,label\na.png,\n", {}, "row 1 (line 2): no label (column 'label' is empty)"),
    ("path,label\na.png,x\nb.png,y\na.png,x\n", {}, "row 3 (line 4): 'a.png' is listed again (first at row 1)"),
    ("path,label\n../a.png,x\n", {}, "row 1 (line 2): column 'path' must be an image path relative"),
    ("path,label\n,x\n", {}, "row 1 (line 2): column 'path' must be an image path relative"),
    ("path,label,split\na.png,x,holdout\n", {"split": "split"}, "row 1 (line 2): column 'split' must be one of"),
    ("path,a,b\na.png,0,0\n", {"label": None, "onehot": ("a", "b")}, "no label (one-hot columns a, b are all 0)"),
    ("path,a,b\na.png,yes,0\n", {"label": None, "onehot": ("a", "b")}, "one-hot column 'a' must be 0 or 1; got 'yes'"),
    ("path,label\na.png,x;x\n", {"separator": ";"}, "label 'x' is given twice"),
    ("path,label\n", {}, "no rows"),
])
def test_bad_rows_are_named(tmp_path: Path, text: str, columns: dict, message: str) -> None:
    images(tmp_path, ["a.png", "b.png"])
    write(tmp_path, "labels.csv", text)
    with pytest.raises(LabelsError, match=re.escape(message)) as err:
        read_labels(tmp_path, "labels.csv", LabelColumns(**columns))
    assert "labels.csv" in str(err.value)


def test_missing_labels_file(tmp_path: Path) -> None:
    with pytest.raises(LabelsError, match=r"labels file .*nope\.csv does not exist"):
        read_labels(tmp_path, "nope.csv", LabelColumns())


def params(**data):
    return parse_params({"backbones": ["efficientnet_lite0"], "data": data,
                         "prepare": {"num_workers": 0, "stats_size": 8}})


def test_prepare_from_a_labels_file_equals_the_folder_layout(tmp_path: Path) -> None:
    names = [f"{split}/{cls}/{cls}{i}.png" for split in ("train", "val") for cls in ("ants", "bees")
             for i in range(3)]
    images(tmp_path, names)
    folders = prepare_dataset(tmp_path, params(), num_workers=0)
    write(tmp_path, "labels.csv", "file,class,part\n" + "".join(
        f"{n},{n.split('/')[1]},{n.split('/')[0]}\n" for n in reversed(names)))
    labelled = prepare_dataset(tmp_path, params(labels="labels.csv", label_columns={
        "path": "file", "label": "class", "split": "part"}), num_workers=0)
    assert manifest_csv(labelled.manifest) == manifest_csv(folders.manifest)
    assert labelled.classes == folders.classes and labelled.stats == folders.stats


def test_prepare_labels_file_errors_are_prepare_errors(tmp_path: Path) -> None:
    images(tmp_path, ["a.png", "b.png"])
    write(tmp_path, "labels.csv", "path,label\na.png,x\nb.png,x;y\n")
    with pytest.raises(PrepareError, match=re.escape("row 2: 'b.png' has 2 labels ['x', 'y']; multi-label")):
        prepare_dataset(tmp_path, params(labels="labels.csv", label_columns={"separator": ";"}), num_workers=0)
    write(tmp_path, "labels.csv", "path,label\na.png,x\nb.png,\n")
    with pytest.raises(PrepareError, match=re.escape("row 2 (line 3): no label")):
        prepare_dataset(tmp_path, params(labels="labels.csv"), num_workers=0)


def test_prepare_quarantines_a_listed_non_image_and_leaves_unlisted_images_out(tmp_path: Path) -> None:
    images(tmp_path, ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png", "unlisted.png"])
    (tmp_path / "notes.txt").write_text("not an image")
    write(tmp_path, "labels.csv", "path,label\nnotes.txt,x\n" + "".join(
        f"{n}.png,{'x' if n in 'abc' else 'y'}\n" for n in "abcdef"))
    prepared = prepare_dataset(tmp_path, params(labels="labels.csv"), num_workers=0)
    assert [q["path"] for q in prepared.quarantine] == ["notes.txt"]
    assert sorted(r["path"] for r in prepared.manifest) == [f"{n}.png" for n in "abcdef"]
    assert {r["path"]: r["class"] for r in prepared.manifest}["d.png"] == "y"
