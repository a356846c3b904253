"""Fixtures shared by several test modules, and the one real pipeline run the pipeline-level tests share.

`real_pipeline` (session scope: once per test process; `make test` is one process) runs `dvc repro` on the
real hymenoptera images (found through $PIPELINE_MIRROR, as `make run` finds them) with the real offline efficientnet_lite0 and every other setting
as params.yaml has it, and commits the result to git. Each module that needs a real run takes its own copy
(`real_pipeline.copy_to(dest)`: workspace, .git and the DVC cache), so a test that edits params, re-runs stages
or breaks files changes nothing the others see.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path(os.environ.get("PIPELINE_MIRROR", REPO.parent / "shared" / "datasets"))
LITE0 = "efficientnet_lite0"
# The shared run: the default params with one backbone (the e2e test's settings).
REAL_PIPELINE_PARAMS = {"backbones": [LITE0]}
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "Pipeline Test", "GIT_AUTHOR_EMAIL": "pipeline-tests@example.invalid",
                "GIT_COMMITTER_NAME": "Pipeline Test", "GIT_COMMITTER_EMAIL": "pipeline-tests@example.invalid"}


def pytest_configure(config: pytest.Config) -> None:
    """Each pytest-xdist worker (`make test-fast`) computes on one thread: two workers on two cores, not four threads."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    """Tiny models run faster (and the same) on one thread than on two contended ones; restore afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ pipeline repositories
def make_pipeline_copy(dest: Path, *, params_update: dict | None = None) -> dict[str, str]:
    """Copy the pipeline (code, dvc.yaml, params.yaml) into `dest`, init git + DVC; return the env.

    params_update: {"dotted.key": value} applied to params.yaml (e.g. {"data.max_per_class": 10})."""
    if not (MIRROR / "hymenoptera_data").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"dataset mirror {MIRROR} is missing in CI")
        pytest.skip(f"dataset mirror {MIRROR} not found")
    for name in ("stages", "pipelines"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):  # .gitignore: caches such as .graphs/
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
    """Run `cmd` in `cwd`; its stdout + stderr. Fails the test (with the output's tail) on a non-zero exit."""
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(cmd)} failed ({result.returncode}):\n{output[-6000:]}"
    return output


def stages_run(output: str) -> set[str]:
    """The stages a `dvc repro` / `dvc exp run` output says it ran."""
    return set(re.findall(r"Running stage '([^']+)'", output))


@dataclasses.dataclass(frozen=True)
class PipelineRun:
    """A finished, committed `dvc repro` of the real pipeline: its repository, env and first output."""

    root: Path
    env: dict[str, str]
    output: str  # stdout + stderr of the first `dvc repro`
    seconds: float  # wall time of that `dvc repro`

    def copy_to(self, dest: Path) -> Path:
        """An independent copy of the repository (workspace, .git, .dvc and its cache) at `dest`; returns dest.

        `cp -a` keeps modification times, so DVC's state database still knows the files' hashes."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-a", str(self.root), str(dest)], check=True, timeout=300)
        return dest


@pytest.fixture(scope="session")
def real_pipeline(tmp_path_factory: pytest.TempPathFactory) -> PipelineRun:
    """`dvc repro` of the whole default graph (params .. report) on hymenoptera with efficientnet_lite0, run once
    per session and committed to git ("baseline"). Read it, never change it: take `copy_to` for that."""
    root = tmp_path_factory.mktemp("real_pipeline") / "repo"
    root.mkdir()
    env = {**make_pipeline_copy(root, params_update=REAL_PIPELINE_PARAMS), **GIT_IDENTITY}
    start = time.perf_counter()
    output = run(["dvc", "repro"], root, env)
    seconds = time.perf_counter() - start
    for cmd in (["git", "add", "-A"], ["git", "commit", "-q", "-m", "baseline"]):
        run(cmd, root, env)
    return PipelineRun(root, env, output, seconds)
