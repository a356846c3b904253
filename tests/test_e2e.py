"""End to end: `dvc repro` on the real hymenoptera images with the real offline efficientnet_lite0."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path(os.environ.get("PIPELINE_MIRROR", REPO.parent / "shared" / "datasets"))

pytestmark = pytest.mark.slow


def make_pipeline_copy(dest: Path, *, params_update: dict | None = None) -> dict[str, str]:
    """Copy the pipeline (code, dvc.yaml, params.yaml) into `dest`, init git + DVC; return the env."""
    if not (MIRROR / "hymenoptera_data").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"dataset mirror {MIRROR} is missing in CI")
        pytest.skip(f"dataset mirror {MIRROR} not found")
    for name in ("stages", "pipelines"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy2(REPO / name, dest / name)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    for dotted, value in (params_update or {}).items():
        node = params
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PIPELINE_MIRROR": str(MIRROR), "DVC_NO_ANALYTICS": "1", "CI": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"]):
        run(cmd, dest, env)
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(cmd)} failed ({result.returncode}):\n{output[-6000:]}"
    return output


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def test_dvc_repro_end_to_end_then_only_head_reruns(tmp_path: Path) -> None:
    env = make_pipeline_copy(tmp_path, params_update={"backbones": ["efficientnet_lite0"]})

    first = run(["dvc", "repro"], tmp_path, env)
    assert {"data", "prepare", "weights@efficientnet_lite0", "extract@efficientnet_lite0",
            "head@efficientnet_lite0", "report"} <= stages_run(first)

    metrics = json.loads((tmp_path / "reports/efficientnet_lite0/metrics.json").read_text())
    assert metrics["heldout_split"] == "val" and metrics["selection"]["split"] == "train"  # val is held out
    heldout = metrics["heldout"]
    assert heldout["n"] == 153 and heldout["accuracy"] >= 0.90, heldout
    assert heldout["accuracy_ci_low"] < heldout["accuracy"] < heldout["accuracy_ci_high"]
    assert (tmp_path / "models/efficientnet_lite0/MODEL_CARD.md").is_file()
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], tmp_path, env))
    assert "reports/efficientnet_lite0/metrics.json" in json.dumps(shown)

    status = run(["dvc", "status"], tmp_path, env)
    assert "up to date" in status, status
    assert stages_run(run(["dvc", "repro"], tmp_path, env)) == set()

    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["head"]["C"] = [0.5]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    again = stages_run(run(["dvc", "repro"], tmp_path, env))
    assert "head@efficientnet_lite0" in again
    assert not {s for s in again if s.startswith(("extract@", "weights@", "prepare", "data"))}, again
    metrics = json.loads((tmp_path / "reports/efficientnet_lite0/metrics.json").read_text())
    assert metrics["C"] == 0.5
    assert metrics["heldout"]["accuracy"] >= 0.90
