"""stages.extract_ray (extract.engine: ray) on a local 2-CPU Ray instance, the tiny timm CNN and generated images:
the local engine's bytes, an actor killed mid-run, resume from an interrupted run, incremental rows, errors."""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml

from stages import extract as ex
from stages import hardware
from stages import extract_ray
from stages.engines import Candidate
from stages.images import ImageChangedError
from stages.params import ExtractParams, ParamError
from test_extract import project, read_h5, save_image, write_manifest  # noqa: F401 - `project` is a fixture

try:
    import ray
except ImportError:  # the optional extra is not installed: the tests that need Ray are skipped
    ray = None
needs_ray = pytest.mark.skipif(ray is None, reason="Ray is an optional extra: pip install -e '.[ray]'")

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"batch_size": 4, "num_workers": 0, "precision": "float32", "compile": "off"}


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance with 2 CPUs for the module (the engine uses an initialised Ray as it is)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


def channels_last(device: str, precision: str, engines=(), **_) -> list[Candidate]:
    """The local runner pinned to the Ray actors' engine (no measurement): torch channels_last at the precision."""
    return [Candidate("torch", device, precision, "channels_last")]


def run(project: dict, out: Path, *, engine: str, on_batch=None, **params) -> dict:
    """The stage through stages.extract.extract (which dispatches on extract.engine)."""
    settings = {**SETTINGS, **params, "engine": engine}
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
    with mock.patch.object(ex, "candidate_list", channels_last), \
            mock.patch.object(hardware, "available_cores", lambda: 1):
        return ex.extract(backbone=project["backbone"], weights=project["weights"], raw=project["raw"],
                          manifest=project["manifest"], out=out, params=ExtractParams(**settings),
                          on_batch=on_batch)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
@needs_ray
def test_ray_engine_writes_the_local_engines_bytes(project: dict, ray_local, tmp_path: Path) -> None:
    options = {"layers": ["pool", "blocks.1"], "tta": ["none", "hflip"], "tta_mode": "rows",
               "storage_dtype": "float16"}
    local = run(project, tmp_path / "local.h5", engine="local", **options)
    report = run(project, tmp_path / "ray.h5", engine="ray", **options)
    assert sha(tmp_path / "ray.h5") == sha(tmp_path / "local.h5") == report["features_sha256"]
    assert (report["runner"], local["runner"], report["path"], local["path"]) == (
        "ray", "local", "torch+cpu+float32+channels_last", "torch+cpu+float32+channels_last")
    assert (report["computed"], report["rows"], report["reused"]) == (12, 24, 0)
    assert report["ray"]["actors"] == {"device": "cpu", "actors": 1, "num_gpus": 0.0, "num_cpus": 1.0,
                                       "threads": 1, "decode_cpus": 1.0}
    assert report["ray"]["main"]["batches"] == 3 and report["ray"]["resources"] == {"CPU": 2.0}
    data, attrs = read_h5(tmp_path / "ray.h5")
    assert data["features/blocks.1"].shape == (24, 24) and attrs["precision"] == "float32"
    assert not (tmp_path / ".ray.h5.work").exists()


@pytest.mark.slow
@needs_ray
def test_an_actor_killed_mid_run_loses_and_duplicates_no_row(project: dict, ray_local, tmp_path: Path) -> None:
    run(project, tmp_path / "local.h5", engine="local")
    flag = tmp_path / "crash-once"
    flag.touch()
    params = ExtractParams(**SETTINGS, engine="ray")
    with mock.patch.object(hardware, "available_cores", lambda: 1):
        runner = extract_ray.RayRunner(backbone=project["backbone"], weights=project["weights"], raw=project["raw"],
                                       params=params, crash_flag=flag)
        report = ex.extract(backbone=project["backbone"], weights=project["weights"], raw=project["raw"],
                            manifest=project["manifest"], out=tmp_path / "ray.h5", params=params, runner=runner)
    assert not flag.exists() and flag.with_name("crash-once.taken").exists()  # the actor did die (os._exit)
    assert report["computed"] == 12 and report["rows"] == 12
    data, _ = read_h5(tmp_path / "ray.h5")
    assert [p.decode() if isinstance(p, bytes) else p for p in data["path"]] == sorted(
        rel for rel, _ in project["entries"])
    assert len(set(data["sha256"])) == 12
    assert report["features_sha256"] == sha(tmp_path / "local.h5")


@pytest.mark.slow
@needs_ray
def test_resume_after_an_interrupted_ray_run_then_only_new_images(project: dict, ray_local,
                                                                  tmp_path: Path) -> None:
    run(project, tmp_path / "local.h5", engine="local")

    def crash(k: int) -> None:
        if k == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(project, tmp_path / "ray.h5", engine="ray", on_batch=crash)
    assert (tmp_path / ".ray.h5.work").exists() and not (tmp_path / "ray.h5").exists()
    report = run(project, tmp_path / "ray.h5", engine="ray")
    assert (report["computed"], report["reused_from"]) == (4, {"features": 0, "work_file": 8})
    assert sha(tmp_path / "ray.h5") == sha(tmp_path / "local.h5")

    entries = project["entries"] + [(f"val/ants/new{i}.jpg", save_image(project["raw"], f"val/ants/new{i}.jpg", 50 + i))
                                    for i in range(3)]
    write_manifest(project["root"] / "data", entries)
    report = run(project, tmp_path / "ray.h5", engine="ray")
    assert (report["computed"], report["reused"], report["reused_from"]["features"]) == (3, 12, 12)
    again = run(project, tmp_path / "ray.h5", engine="ray")
    assert again["computed"] == 0 and again["images_per_second"] is None
    assert again["features_sha256"] == report["features_sha256"]


@pytest.mark.slow  # a local Ray instance and its actors
@needs_ray
def test_ray_engine_writes_the_local_engines_augmented_views(project: dict, ray_local, tmp_path: Path) -> None:
    """Augmented views on Ray: the local engine's bytes, then only a new train image's views are computed."""
    local = run(project, tmp_path / "local.h5", engine="local", augment_views=2, layers=["pool"])
    report = run(project, tmp_path / "ray.h5", engine="ray", augment_views=2, layers=["pool"])
    assert sha(tmp_path / "ray.h5") == sha(tmp_path / "local.h5")
    assert report["augmented"]["rows"] == local["augmented"]["rows"] == 16
    assert report["augmented"]["computed"] == 8 and report["ray"]["augmented"]["batches"] == 4
    assert report["precision"] == "float32" and report["precision_reason"] == "params: extract.precision float32"
    entries = project["entries"] + [("train/ants/new.jpg", save_image(project["raw"], "train/ants/new.jpg", 77))]
    write_manifest(project["root"] / "data", entries)
    again = run(project, tmp_path / "ray.h5", engine="ray", augment_views=2, layers=["pool"])
    assert (again["computed"], again["augmented"]["computed"], again["augmented"]["reused"]) == (1, 1, 8)


def test_ray_precision_follows_the_local_rule_not_a_timing() -> None:
    """`auto` asks a worker like the actors for its hardware and applies stages.extract.choose_precision."""
    class FakeRay:
        def __init__(self, capability: dict) -> None:
            self.capability = capability

        def remote(self, **resources):
            return lambda fn: mock.Mock(remote=lambda device: (resources, device))

        def get(self, ref):
            return self.capability

    cpu = extract_ray.ActorPlan("cpu", 1, 0.0, 1.0, 1, 1.0)
    gpu = extract_ray.ActorPlan("cuda", 1, 1.0, 1.0, 1, 1.0)
    no_bf16 = {"native_bfloat16": False, "native_float16": False}
    assert extract_ray.actor_precision(FakeRay(no_bf16), cpu, "auto") == ("float32", "no native bf16: float32")
    assert extract_ray.actor_precision(FakeRay({"native_bfloat16": True, "avx512_bf16": True}), cpu, "auto") == (
        "bfloat16", "capability: avx512_bf16")
    assert extract_ray.actor_precision(FakeRay({"cuda_bf16": False}), gpu, "auto")[0] == "float16"
    assert extract_ray.actor_precision(FakeRay(no_bf16), cpu, "float32") == ("float32",
                                                                              "params: extract.precision float32")


@needs_ray
def test_a_changed_image_fails_with_the_local_engines_message(project: dict, ray_local, tmp_path: Path) -> None:
    rel = project["entries"][3][0]
    save_image(project["raw"], rel, 99)
    with pytest.raises(ImageChangedError, match="changed since prepare: manifest sha256"):
        run(project, tmp_path / "ray.h5", engine="ray")
    assert not (tmp_path / "ray.h5").exists()


@pytest.mark.parametrize("resources, device, expected", [
    ({"CPU": 2.0}, "auto", ("cpu", 1, 0.0, 1.0, 1, 1.0)),
    ({"CPU": 16.0}, "auto", ("cpu", 12, 0.0, 1.0, 1, 1.0)),
    ({"CPU": 1.0}, "auto", ("cpu", 1, 0.0, 0.5, 1, 0.5)),
    ({"CPU": 32.0, "GPU": 4.0}, "auto", ("cuda", 4, 1.0, 1.0, 1, 1.0)),
    ({"CPU": 32.0, "GPU": 4.0}, "cpu", ("cpu", 24, 0.0, 1.0, 1, 1.0)),
])
def test_one_actor_per_gpu_or_per_cpu_slot(resources: dict, device: str, expected: tuple) -> None:
    assert dataclasses.astuple(extract_ray.plan_actors(resources, device)) == expected


def test_cuda_without_gpus_in_the_cluster_fails_clearly() -> None:
    with pytest.raises(ParamError, match="extract.device is 'cuda' but the Ray cluster has no GPU"):
        extract_ray.plan_actors({"CPU": 8.0}, "cuda")


@pytest.mark.parametrize("address, env, expected", [
    ("ray://head:10001", "other:6379", {"address": "ray://head:10001"}),
    (None, "head:6379", {"address": "head:6379"}),
    (None, None, {"num_cpus": 2, "include_dashboard": False}),
])
@needs_ray
def test_ray_address_then_env_then_a_local_instance(monkeypatch, address, env, expected) -> None:
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(("init", kwargs)))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "memory": 1e9})
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append(("shutdown", {})))
    if env:
        monkeypatch.setenv("RAY_ADDRESS", env)
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with extract_ray.ray_cluster(address, num_cpus=2) as cluster:
        assert cluster["resources"] == {"CPU": 2.0}
    (name, kwargs), last = calls
    assert name == "init" and expected.items() <= kwargs.items() and last[0] == "shutdown"


def test_without_ray_the_error_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ParamError, match=r"Ray is not importable .*pip install -e '\.\[ray\]'"):
        extract_ray.import_ray()


def test_dvc_yaml_extract_tracks_every_key_but_the_engine() -> None:
    """Switching runner, compute engine or cluster changes no row beyond 1e-4 (checked on every run by
    stages.engines.choose), so it must not re-run extract@ (nor what follows)."""
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["extract"]
    tracked = {p for p in stage["params"] if str(p).startswith("extract.")}
    assert tracked == {f"extract.{f.name}" for f in dataclasses.fields(ExtractParams)} - {
        "extract.engine", "extract.engines", "extract.ray_address"}
    assert "stages/extract_ray.py" in stage["deps"]
