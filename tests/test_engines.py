"""stages.engines: each engine against torch eager float32 on a tiny model, the ONNX graph cache, the parity gate,
and the extract stage running on a graph engine."""
from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from stages import extract as ex
from stages.backbones import build_feature_model
from stages.engines import Candidate, choose, run_views
from stages.engines.graph import export_graph, graph_key, graph_path
from stages.engines.onnxruntime import OnnxRuntimeEngine
from stages.engines.openvino import OpenVinoEngine
from stages.engines.torch import TorchEngine
from stages.hardware import read_cpu_capability
from test_extract import TINY_LAYERS, plain_features, project, read_h5  # noqa: F401 - `project` is a fixture

LAYERS = ("pool", *TINY_LAYERS)


@pytest.fixture
def graph(project: dict, tmp_path: Path) -> dict:
    model = build_feature_model(project["backbone"], project["weights"], LAYERS)
    key = graph_key(backbone="tiny", weights_sha256=project["backbone"].weights.sha256, layers=LAYERS, input_size=32)
    path, info = export_graph(model, key=key, cache=tmp_path / "graphs")
    return {"model": model, "key": key, "path": path, "info": info, "cache": tmp_path / "graphs"}


def test_graph_is_exported_once_and_keyed_by_what_it_depends_on(graph: dict) -> None:
    assert not graph["info"]["cached"] and graph["info"]["export_seconds"] > 0
    assert json.loads(graph["path"].with_suffix(".json").read_text()) == graph["key"]
    again, info = export_graph(graph["model"], key=graph["key"], cache=graph["cache"])
    assert (again, info["cached"], info["export_seconds"]) == (graph["path"], True, 0.0)
    for change in ({"weights_sha256": "0" * 64}, {"input_size": 64}, {"layers": ["pool"]}):
        assert graph_path(graph["cache"], {**graph["key"], **change}) != graph["path"]


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_graph_engines_match_torch_float32_on_every_layer(graph: dict, engine: str) -> None:
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = run_views(TorchEngine(graph["model"], Candidate("torch", "cpu", "float32")), images,
                          views=("none", "hflip"))
    candidate = Candidate(engine, "cpu", "float32", "graph")
    cls = OnnxRuntimeEngine if engine == "onnxruntime" else OpenVinoEngine
    got = run_views(cls(graph["path"], LAYERS, candidate, threads=1), images, views=("none", "hflip"))
    assert got.keys() == reference.keys()
    for layer in LAYERS:
        assert got[layer].shape == reference[layer].shape and got[layer].dtype == np.float32
    assert choose.within_parity(choose.compare_features(reference, got))  # 1e-4 x max(1, |value|)


def test_openvino_bf16_only_where_the_cpu_runs_it(graph: dict) -> None:
    """Where bf16 is not native OpenVINO silently runs f32 (AVX2) or emulates bf16 (AVX-512 without bf16): the
    engine refuses rather than mislabel the rows or run an emulation; where it is native the rows stay within bf16 tolerance of float32."""
    candidate = Candidate("openvino", "cpu", "bfloat16", "graph")
    if not read_cpu_capability()["native_bfloat16"]:
        with pytest.raises(ValueError, match="no native bf16"):
            OpenVinoEngine(graph["path"], LAYERS, candidate, threads=1)
        return
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    reference = run_views(TorchEngine(graph["model"], Candidate("torch", "cpu", "float32")), images, views=("none",))
    got = run_views(OpenVinoEngine(graph["path"], LAYERS, candidate, threads=1), images, views=("none",))
    assert min(c["min_cosine"] for c in choose.compare_features(reference, got).values()) > 0.99


def test_extract_on_a_graph_engine_stores_torch_float32_features(project: dict, graph: dict) -> None:
    """With the graph cached, the stage measures the graph engines and, forced to ONNX Runtime, stores features
    equal to plain eager float32 within 1e-4; the report names the engine and the parity check."""
    only_ort = lambda device, precision, engines=(), **_: [Candidate("torch", device, precision),  # noqa: E731
                                                           Candidate("onnxruntime", "cpu", precision, "graph")]
    fake = {"torch+cpu+float32+contiguous": 1.0, "onnxruntime+cpu+float32+graph": 1000.0}

    def measure(engines, batches, *, views):
        stats, outputs, rounds = real_measure(engines, batches, views=views)
        for name in stats:
            stats[name]["images_per_second"] = fake[name]
        return stats, outputs, rounds

    real_measure = choose.measure
    with mock.patch.object(ex, "candidate_list", only_ort), mock.patch.object(choose, "measure", measure):
        report = ex.extract(backbone=project["backbone"], weights=project["weights"], raw=project["raw"],
                            manifest=project["manifest"], out=project["out"], graphs=graph["cache"],
                            params=ex.ExtractParams(batch_size=4, num_workers=0, layers=LAYERS, compile="off"))
    assert (report["engine"], report["path"]) == ("onnxruntime", "onnxruntime+cpu+float32+graph")
    assert report["selection"]["graph"]["cached"] is True
    assert report["selection"]["decision"].startswith("fastest estimated")
    assert choose.within_parity(report["selection"]["precision_check"])
    data, _ = read_h5(project["out"])
    reference = plain_features(project, LAYERS)
    for layer in LAYERS:
        np.testing.assert_allclose(data[f"features/{layer}"], reference[layer], rtol=0,
                                   atol=1e-4 * max(1.0, float(np.abs(reference[layer]).max())))


def test_an_engine_whose_float32_features_differ_is_excluded(project: dict, graph: dict) -> None:
    """The parity gate: a float32 engine off by more than 1e-4 is never chosen, however fast it measures."""
    class Off(OnnxRuntimeEngine):
        def __call__(self, images):
            return {k: v + 0.01 for k, v in super().__call__(images).items()}

    def build(candidate, **kwargs):
        if candidate.engine == "onnxruntime":
            return Off(kwargs["graph"], kwargs["layers"], candidate, threads=1)
        return real_build(candidate, **kwargs)

    real_build = choose.build_engine
    candidates = [Candidate("torch", "cpu", "float32"), Candidate("onnxruntime", "cpu", "float32", "graph")]
    batches = [torch.randn(8, 3, 32, 32)]
    with mock.patch.object(choose, "build_engine", build), torch.inference_mode():
        engine, selection = choose.select_engine(
            graph["model"], candidates, batches, n_todo=10_000, compile_mode="off", views=("none",), cores=1,
            batch_size=8, layers=LAYERS, graph=lambda: (graph["path"], graph["info"]), export_anyway=True)
    assert engine.candidate.engine == "torch"
    assert "differ from eager float32" in selection["excluded"]["onnxruntime+cpu+float32+graph"]


@pytest.mark.parametrize("cores", [1, 2])  # 2: the eager rate comes from the thread choice, not timed again
def test_the_export_is_not_tried_when_it_cannot_pay(project: dict, graph: dict, cores: int) -> None:
    """No cached graph and a few seconds of eager work left: the graph engines are not tried (reason recorded)."""
    candidates = choose.candidate_list("cpu", "float32")
    exported = []
    with torch.inference_mode():
        engine, selection = choose.select_engine(
            graph["model"], candidates, [torch.randn(8, 3, 32, 32)], n_todo=12, compile_mode="off", views=("none",),
            cores=cores, batch_size=8, layers=LAYERS, graph=lambda: exported.append(1), export_anyway=False)
    assert exported == [] and engine.candidate.engine == "torch"
    assert all("not tried" in selection["excluded"][c.name] for c in candidates if c.engine != "torch")
