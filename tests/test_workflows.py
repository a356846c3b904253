"""DVC workflows on the real pipeline: repro, exp run/show, metrics diff, plots, one stage, CI pull.

The baseline is the session's shared run (tests/conftest.py `real_pipeline`: hymenoptera, efficientnet_lite0,
committed to git); this module works on its own copy, and after each test the workspace is put back to the
baseline (`git reset --hard`, `dvc checkout`), so every test starts from the same committed run. Which stages
ran is read from DVC's own output.

The `params` stage (`python -m stages.params --check`) is upstream of every other stage: it re-runs whenever
params.yaml changes, and its output (the same bytes for every valid params.yaml) lets nothing else re-run.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import REPO, PipelineRun, run, stages_run

pytestmark = pytest.mark.slow

LITE0 = "efficientnet_lite0"
TINY = "tiny"  # tiny_backbone(): a custom entry, as a user adds one
STAGE_MODULES = ("params", "data", "prepare", "weights", "extract", "head", "report")
UPSTREAM_OF_LITE0 = {"params", "data", "prepare", f"weights@{LITE0}", f"extract@{LITE0}", f"head@{LITE0}",
                     f"audit@{LITE0}"}  # the dataset audit (stages/audit.py) runs between extract and head


class Pipeline:
    """A git + DVC repository holding the pipeline, with the env its commands run in."""

    def __init__(self, root: Path, env: dict[str, str], first_output: str, first_seconds: float) -> None:
        self.root, self.env = root, env
        self.first_output, self.first_seconds = first_output, first_seconds

    def __call__(self, *cmd: str, cwd: Path | None = None) -> str:
        return run(list(cmd), cwd or self.root, self.env)

    def set_param(self, dotted: str, value: Any) -> None:
        params = yaml.safe_load((self.root / "params.yaml").read_text())
        *parents, last = dotted.split(".")
        node = params
        for part in parents:
            node = node[part]
        node[last] = value
        (self.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def run_json(self, *cmd: str) -> Any:
        """Parse a command's --json stdout (DVC writes its warnings to stderr)."""
        result = subprocess.run(list(cmd), cwd=self.root, env=self.env, capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}{result.stderr}"
        return json.loads(result.stdout)

    def read_json(self, path: str) -> Any:
        return json.loads((self.root / path).read_text())


def skipped_stages(output: str) -> set[str]:
    """Stages DVC left alone: "Stage 'x' didn't change, skipping"."""
    return set(re.findall(r"Stage '([^']+)' didn't change, skipping", output))


@pytest.fixture(scope="module")
def pipeline(real_pipeline: PipelineRun, tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    missing = [m for m in STAGE_MODULES if not (REPO / "stages" / f"{m}.py").is_file()]
    if missing:
        pytest.fail(f"stage modules missing: {', '.join(missing)}")
    root = real_pipeline.copy_to(tmp_path_factory.mktemp("workflows") / "repo")
    return Pipeline(root, dict(real_pipeline.env), real_pipeline.output, real_pipeline.seconds)


@pytest.fixture
def repo(pipeline: Pipeline) -> Iterator[Pipeline]:
    """The committed smoke run; whatever a test changes is undone afterwards."""
    yield pipeline
    for cmd in (["git", "reset", "-q", "--hard"], ["git", "clean", "-q", "-fd"],
                ["dvc", "checkout", "-q", "--force", "dvc.yaml"]):  # not the optional fine-tune
        run(cmd, pipeline.root, pipeline.env)


def test_repro_runs_the_whole_graph(repo: Pipeline) -> None:
    assert stages_run(repo.first_output) == UPSTREAM_OF_LITE0 | {"report"}  # its time is printed, not asserted
    summary = repo.read_json("summary/summary.json")
    probes = [row for row, values in summary["rows"].items() if values["kind"] == "probe"]
    assert probes == [LITE0] and summary["rows"][summary["best"]]["backbone"] == LITE0
    assert summary["rows"][LITE0]["extract"]["images"] == 398  # every image: train 124 + 121, val 70 + 83
    assert 0.5 <= summary["best_value"] <= 1.0
    assert "up to date" in repo("dvc", "status", "dvc.yaml")  # the default pipeline, not the fine-tune
    print(f"dvc repro: {repo.first_seconds:.1f}s")


def tiny_backbone(tmp_path: Path) -> dict[str, Any]:
    """A `weights.custom` entry: timm's tiny test_efficientnet with seeded random weights, 32x32 input (extracting
    398 images with it takes a second, where a second real backbone would take most of a minute)."""
    import timm
    import torch

    weights = tmp_path / "tiny.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("test_efficientnet", pretrained=False).state_dict(), weights)
    return {"arch": "timm:test_efficientnet", "source": str(weights),
            "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(), "input_size": 32, "resize": 36}


def test_exp_run_adding_a_backbone_extracts_only_it_and_exp_show_lists_it(repo: Pipeline, tmp_path: Path) -> None:
    repo.set_param("weights.custom", {TINY: tiny_backbone(tmp_path)})  # the experiment starts from this workspace
    output = repo("dvc", "exp", "run", "-S", f"backbones=[{LITE0},{TINY}]")
    ran = stages_run(output)
    assert {f"weights@{TINY}", f"extract@{TINY}", f"head@{TINY}", "report"} <= ran, output
    # lite0's weights, features and head are reused. (prepare may rerun: it depends on `backbones`; its manifest
    # comes out byte-identical. params re-checks params.yaml. weights@ and extract@ track the whole weights.custom
    # mapping, so lite0's run again on the new entry, fetch nothing and recompute no row: the file is unchanged.)
    assert not ran & (UPSTREAM_OF_LITE0 - {"prepare", "params", f"weights@{LITE0}", f"extract@{LITE0}"}), output
    assert {f"head@{LITE0}", f"audit@{LITE0}"} <= skipped_stages(output), output
    assert f"{LITE0}: models/pretrained/{LITE0}.pth is already verified" in output
    assert f"{LITE0}: wrote features/{LITE0}.h5 (398 rows): computed 0, reused 398" in output
    assert (repo.root / "features" / f"{TINY}.h5").is_file()  # the experiment is applied to the workspace

    print("\n".join(line for line in output.splitlines() if "stage" in line.lower()))
    shown = repo.run_json("dvc", "exp", "show", "--json")
    found = [data for data in _walk_exp_data(shown)
             if data.get("params", {}).get("params.yaml", {}).get("data", {}).get("backbones") == [LITE0, TINY]]
    assert found, json.dumps(shown)[:3000]
    summary = found[0]["metrics"]["summary/summary.json"]["data"]
    assert {row for row, values in summary["rows"].items() if values["kind"] == "probe"} == {LITE0, TINY}
    heldout = summary["rows"][TINY]["heldout"]
    assert heldout["n"] == 153  # val: 70 + 83 images
    assert heldout["accuracy_ci_low"] <= heldout["accuracy"] <= heldout["accuracy_ci_high"]
    assert f"reports/{TINY}/metrics.json" in found[0]["metrics"]
    table = repo("dvc", "exp", "show", "--no-pager", "--md", "--drop", ".*",
                 "--keep", rf"Experiment|best.*|rows\.{TINY}\.heldout\.accuracy.*|backbones|head\.C")
    print(table)
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    # the held-out accuracy and its 95% interval side by side, as a user comparing experiments sees them
    assert {f"rows.{TINY}.heldout.accuracy", f"rows.{TINY}.heldout.accuracy_ci_low",
            f"rows.{TINY}.heldout.accuracy_ci_high", "backbones", "head.C"} <= set(header), table


def _walk_exp_data(node: Any) -> Iterator[dict]:
    """Every `data` object (params + metrics of one revision) in `dvc exp show --json` output."""
    if isinstance(node, dict):
        if isinstance(node.get("data"), dict) and "params" in node["data"]:
            yield node["data"]
        for value in node.values():
            yield from _walk_exp_data(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk_exp_data(value)


def test_repro_single_stage_then_metrics_diff_shows_the_change(repo: Pipeline) -> None:
    before = repo.read_json(f"reports/{LITE0}/metrics.json")
    repo.set_param("head.C", [1000.0])  # outside the default sweep, so the chosen C must change
    ran = stages_run(repo("dvc", "repro", "-s", f"head@{LITE0}"))
    assert ran == {f"head@{LITE0}"}
    diff = repo.run_json("dvc", "metrics", "diff", "--json")
    head_diff = diff[f"reports/{LITE0}/metrics.json"]
    assert head_diff["C"] == {"old": before["C"], "new": 1000.0, "diff": 1000.0 - before["C"]}
    assert "summary/summary.json" not in diff  # the report stage did not run yet

    assert stages_run(repo("dvc", "repro")) == {"params", "report"}  # params: head.C changed, still valid
    diff = repo.run_json("dvc", "metrics", "diff", "--json")
    assert diff["summary/summary.json"][f"rows.{LITE0}.C"]["new"] == 1000.0
    table = repo("dvc", "metrics", "diff")
    assert f"rows.{LITE0}.C" in table and "HEAD" in table and "workspace" in table
    assert "dvc metrics diff" in (repo.root / "summary" / "summary.md").read_text()  # where changes are shown


def test_plots_show_and_diff_write_html_offline(repo: Pipeline, tmp_path: Path) -> None:
    for cmd, out, revs in ((["dvc", "plots", "show"], tmp_path / "show", ["workspace"]),
                           (["dvc", "plots", "diff", "HEAD"], tmp_path / "diff", ["HEAD", "workspace"])):
        repo(*cmd, "-o", str(out))
        html = (out / "index.html").read_text()
        # the vega-lite scatter from comparison.json, with the axis titles from dvc.yaml
        assert "feature extraction seconds per 1000 images" in html and "held-out accuracy" in html
        assert 'id="summary_comparison_png"' in html
        for rev in revs:  # the PNG is copied next to the page, one per revision
            png = out / "static" / f"{rev}_summary_comparison.png"
            assert f'src="static/{png.name}"' in html
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = repo.run_json("dvc", "plots", "show", "--json", "summary/comparison.json")
    assert "seconds_per_1000_images" in json.dumps(data)


def test_ci_pulls_only_what_one_stage_needs_from_a_remote(repo: Pipeline, tmp_path: Path) -> None:
    remote, clone = tmp_path / "remote", tmp_path / "clone"
    repo("dvc", "remote", "add", "-d", "ci", str(remote))
    repo("dvc", "push", "-q")
    repo("git", "clone", "-q", str(repo.root), str(clone))
    repo("dvc", "remote", "add", "-d", "ci", str(remote), cwd=clone)
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["head"]["C"] = [1000.0]
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    output = repo("dvc", "repro", "--pull", "--allow-missing", "-s", f"head@{LITE0}", cwd=clone)
    assert stages_run(output) == {f"head@{LITE0}"}, output
    # Pulled, not recomputed: head's inputs only (the features, and the images: head checks classifier.onnx against
    # classifier.pt on the held-out images); nothing upstream ran.
    assert (clone / f"features/{LITE0}.h5").exists() and (clone / "data" / "raw").exists()
    assert json.loads((clone / f"reports/{LITE0}/metrics.json").read_text())["C"] == 1000.0
    shutil.rmtree(remote)


def test_team_cache_a_fresh_clone_pulls_the_features_and_extracts_nothing(repo: Pipeline, tmp_path: Path) -> None:
    """README "Team cache": after a run, `dvc push` to the team's remote (a local folder here; S3, GCS, SSH, ...
    work alike); a teammate's fresh `git clone` then `dvc pull` + `dvc repro` runs no stage at all (no extraction)
    and has byte-identical features; `dvc repro --pull` does the same in one command."""
    remote = tmp_path / "team-cache"
    baseline = repo("git", "rev-parse", "HEAD").strip()
    repo("dvc", "remote", "add", "-d", "team", str(remote))
    repo("git", "commit", "-q", "-am", "team cache remote")  # .dvc/config travels with the repository
    try:
        repo("dvc", "push")
        features = f"features/{LITE0}.h5"
        for name, commands in (("pull-then-repro", (["dvc", "pull"], ["dvc", "repro"])),
                               ("repro-pull", (["dvc", "repro", "--pull"],))):
            clone = tmp_path / name
            repo("git", "clone", "-q", str(repo.root), str(clone))
            assert not (clone / features).exists()
            output = [repo(*cmd, cwd=clone) for cmd in commands][-1]
            assert stages_run(output) == set(), output
            # `dvc repro --pull` says "Pulling data for stage" where `dvc repro` says "didn't change, skipping"
            reused = skipped_stages(output) | set(re.findall(r"Pulling data for stage: '([^']+)'", output))
            assert UPSTREAM_OF_LITE0 | {"report"} <= reused, output
            assert (clone / features).read_bytes() == (repo.root / features).read_bytes()
            assert "up to date" in repo("dvc", "status", cwd=clone)
    finally:
        repo("git", "reset", "-q", "--hard", baseline)


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file of the workspace but .git/ and .dvc/."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*")
            if p.is_file() and not {".git", ".dvc"} & set(p.relative_to(root).parts)}


INVALID_PARAMS = [  # (dotted key, invalid value, what the error must say)
    ("backbones", [LITE0, "efficientnet_lite3"], "backbones[1] must be a registered backbone or one declared "
                                                 "under weights.custom; got 'efficientnet_lite3'"),
    ("prepare.stats_sise", 224, "unknown parameter 'prepare.stats_sise'. Did you mean 'stats_size'?"),
    ("head.C", [-1.0], "head.C must be a positive float or a list of them; got [-1.0]"),
    ("reprot", {"primary_metric": "heldout.accuracy"}, "unknown parameter 'reprot'. Did you mean 'report'?"),
]


def test_invalid_params_yaml_fails_first_and_leaves_every_output_in_place(repo: Pipeline) -> None:
    """The `params` stage is upstream of data and weights@, so DVC runs it before any stage whose params changed
    (and whose outputs DVC would remove before running it): a bad backbone name used to cost reports/prepare/."""
    before = snapshot(repo.root)
    assert "data/params.ok" in before and "reports/prepare/summary.json" in before
    for dotted, value, message in INVALID_PARAMS:
        repo.set_param(dotted, value)
        result = subprocess.run(["dvc", "repro"], cwd=repo.root, env=repo.env, capture_output=True, text=True,
                                timeout=900)
        output = result.stdout + result.stderr
        assert result.returncode != 0, output
        assert f"params: error: {message}" in output, output[-3000:]
        assert stages_run(output) == {"params"}, output
        after = snapshot(repo.root)
        # only the check's own marker is gone (DVC removes a stage's outputs before running it)
        assert set(before) - set(after) == {"data/params.ok"} and set(after) <= set(before), output
        assert {k: v for k, v in after.items() if k != "params.yaml"} == {
            k: v for k, v in before.items() if k in after and k != "params.yaml"}
        repo("git", "checkout", "-q", "params.yaml")
    output = repo("dvc", "repro")  # the valid params again: the marker comes back, nothing else runs
    assert stages_run(output) <= {"params"}, output
    assert "up to date" in repo("dvc", "status", "dvc.yaml")
    assert snapshot(repo.root) == before


def test_a_changed_custom_backbone_entry_re_extracts_its_features(repo: Pipeline, tmp_path: Path) -> None:
    """extract@ tracks weights.custom (arch, input size, mean/std) and classes.json, so a changed custom backbone
    cannot leave stale features."""
    import h5py

    entry = tiny_backbone(tmp_path)
    stage = "extract@tiny"
    extract = yaml.safe_load((repo.root / "dvc.yaml").read_text())["stages"]["extract"]
    assert "weights.custom" in extract["params"] and "data/prepared/classes.json" in extract["deps"]

    repo.set_param("backbones", [LITE0, "tiny"])
    repo.set_param("weights.custom", {"tiny": entry})
    assert {"weights@tiny", stage} <= stages_run(repo("dvc", "repro", stage))
    assert repo.run_json("dvc", "status", "--json", stage) == {}
    features = (repo.root / "features/tiny.h5").read_bytes()

    repo.set_param("weights.custom", {"tiny": {**entry, "mean": [0.5, 0.5, 0.5]}})
    assert repo.run_json("dvc", "status", "--json", stage) == {
        stage: [{"changed deps": {"params.yaml": {"weights.custom": "modified"}}}]}  # DVC lists params as deps
    assert stage in stages_run(repo("dvc", "repro", stage))
    assert (repo.root / "features/tiny.h5").read_bytes() != features
    with h5py.File(repo.root / "features/tiny.h5", "r") as h5:
        assert json.loads(h5.attrs["preprocess"])["mean"] == [0.5, 0.5, 0.5]
