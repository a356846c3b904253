"""End to end: `dvc repro` on the real hymenoptera images with the real offline efficientnet_lite0.

The first `dvc repro` is the session's shared run (tests/conftest.py `real_pipeline`); this module checks it and
then works on its own copy."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import PipelineRun, run, stages_run

pytestmark = pytest.mark.slow


def test_dvc_repro_end_to_end_then_only_head_reruns(real_pipeline: PipelineRun, tmp_path: Path) -> None:
    first = real_pipeline.output
    assert {"data", "prepare", "weights@efficientnet_lite0", "extract@efficientnet_lite0",
            "head@efficientnet_lite0", "report"} <= stages_run(first)
    root = real_pipeline.copy_to(tmp_path / "repo")
    env = real_pipeline.env

    metrics = json.loads((root / "reports/efficientnet_lite0/metrics.json").read_text())
    assert metrics["heldout_split"] == "val" and metrics["selection"]["split"] == "train"  # val is held out
    heldout = metrics["heldout"]
    assert heldout["n"] == 153 and heldout["accuracy"] >= 0.90, heldout
    assert heldout["accuracy_ci_low"] < heldout["accuracy"] < heldout["accuracy_ci_high"]
    assert (root / "models/efficientnet_lite0/MODEL_CARD.md").is_file()
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], root, env))
    assert "reports/efficientnet_lite0/metrics.json" in json.dumps(shown)

    status = run(["dvc", "status"], root, env)
    assert "up to date" in status, status
    assert stages_run(run(["dvc", "repro"], root, env)) == set()

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["head"]["C"] = [0.5]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    again = stages_run(run(["dvc", "repro"], root, env))
    assert "head@efficientnet_lite0" in again
    assert not {s for s in again if s.startswith(("extract@", "weights@", "prepare", "data"))}, again
    metrics = json.loads((root / "reports/efficientnet_lite0/metrics.json").read_text())
    assert metrics["C"] == 0.5
    assert metrics["heldout"]["accuracy"] >= 0.90
