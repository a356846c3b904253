"""The lazy features reader (stages/features.py open_features / open_checked) on tiny HDF5 files."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from stages.features import FeaturesError, open_features, read_features


def write_file(path, *, n=37, dims=(5, 3), dtype="float16", augmented=0, bad_row=None):
    """A features file in the extract stage's layout with chunked feature datasets; returns the arrays written."""
    rng = np.random.default_rng(0)
    layers = {f"l{i}": rng.normal(size=(n, d)).astype(dtype) for i, d in enumerate(dims)}
    if bad_row is not None:
        layers["l0"][bad_row, 1] = np.nan
    source = np.repeat(np.arange(0, n, 2, dtype=np.int64), augmented) if augmented else None
    with h5py.File(path, "w") as h5:
        for layer, values in layers.items():
            h5.create_dataset(f"features/{layer}", data=values, chunks=(4, values.shape[1]))
        h5["labels"] = np.arange(n, dtype=np.int64) % 2
        h5["split"] = np.array([b"train", b"test"] * (n // 2) + [b"train"] * (n % 2), dtype="S5")
        h5["sha256"] = np.array([f"{i:064x}".encode() for i in range(n)], dtype="S64")
        h5.create_dataset("path", data=np.array([f"img{i}.jpg" for i in range(n)], dtype=object),
                          dtype=h5py.string_dtype("utf-8"))
        if source is not None:
            h5["augmented_source"] = source
            for layer, values in layers.items():
                h5.create_dataset(f"augmented/{layer}", data=values[source] + 1, chunks=(4, values.shape[1]))
        h5.attrs["layers"] = json.dumps(list(layers))
        h5.attrs["storage_dtype"] = dtype
        h5.attrs["classes"] = json.dumps(["a", "b"])
    return layers, source


def test_chunks_and_take_give_the_stored_rows_in_the_stored_dtype(tmp_path):
    path = tmp_path / "f.h5"
    layers, source = write_file(path, augmented=2)
    with open_features(path) as reader:
        assert reader.n_rows == 37 and reader.layers == ["l0", "l1"] and reader.dims() == {"l0": 5, "l1": 3}
        assert reader.attrs["classes"] == ["a", "b"] and reader.labels.dtype == np.int64
        chunks = list(reader.iter_chunks(["l1"], chunk_rows=10))
        assert [start for start, _ in chunks] == [0, 10, 20, 30]
        assert all(block["l1"].dtype == np.float16 for _, block in chunks)
        assert np.array_equal(np.concatenate([block["l1"] for _, block in chunks]), layers["l1"])
        rows = np.array([36, 0, 5, 5, 17, 11])
        taken = reader.take(rows, chunk_rows=8)
        for layer, values in layers.items():
            assert np.array_equal(taken[layer], values[rows])
        assert reader.take(np.zeros(0, dtype=np.int64))["l0"].shape == (0, 5)
        aug = np.concatenate([b["l0"] for _, b in reader.iter_chunks(["l0"], group="augmented", chunk_rows=7)])
        assert np.array_equal(aug, layers["l0"][source] + 1)
        assert np.array_equal(reader.read(["l0"])["l0"], read_features(path, ["l0"]).features["l0"])
        with pytest.raises(FeaturesError, match=r"row indices must lie in \[0, 37\); got \[0, 37\]"):
            reader.take(np.array([0, 37]))
        with pytest.raises(FeaturesError, match=r"head.layer\(s\) \['nope'\] not in"):
            next(reader.iter_chunks(["nope"]))
    assert not reader.handle.id.valid  # closed on leaving the block


def test_a_non_finite_row_is_named_when_its_chunk_is_read(tmp_path):
    path = tmp_path / "f.h5"
    write_file(path, bad_row=22)
    with open_features(path) as reader:  # opening reads no feature value
        assert len(list(reader.iter_chunks(["l1"], chunk_rows=8))) == 5
        with pytest.raises(FeaturesError, match=r"features/l0 has NaN or infinite values in 1 row\(s\) from row 22 "):
            list(reader.iter_chunks(["l0"], chunk_rows=8))
        reader.take(np.array([3, 30]))  # chunks without the bad row read fine
        with pytest.raises(FeaturesError, match=r"from row 22 "):
            reader.take(np.array([21, 22]))


def test_shapes_and_dtypes_are_checked_on_open(tmp_path):
    path = tmp_path / "f.h5"
    write_file(path, dtype="float64")
    with pytest.raises(FeaturesError, match=r"the dtype of features/l0 is float64 but expected float16 or float32"):
        with open_features(path):
            pass
    with h5py.File(path, "a") as h5:
        del h5["labels"]
    with pytest.raises(FeaturesError, match=r"lacks dataset\(s\) labels"):
        with open_features(path):
            pass
    with pytest.raises(FeaturesError, match=r"does not exist; run `dvc repro extract` first"):
        with open_features(tmp_path / "missing.h5"):
            pass


def test_check_finite_counts_every_bad_value_with_the_whole_file_message(tmp_path):
    """FeatureReader.check_finite: one chunked pass, the same FeaturesError read_features gives (every value
    counted), so a stage that reads lazily refuses a damaged file with the same message."""
    path = tmp_path / "f.h5"
    write_file(path, bad_row=22)
    with h5py.File(path, "r+") as h5:
        values = h5["features/l0"][()]
        values[3, 0] = np.inf
        del h5["features/l0"]
        h5.create_dataset("features/l0", data=values, chunks=(4, values.shape[1]))
    with pytest.raises(FeaturesError) as whole:
        read_features(path)
    with open_features(path) as reader:
        reader.check_finite(["l1"])  # l1 is finite
        with pytest.raises(FeaturesError) as lazy:
            reader.check_finite(chunk_rows=5)
    assert str(lazy.value) == str(whole.value)
    assert "the number of NaN or infinite values in features/l0 is 2 but expected 0" in str(lazy.value)
