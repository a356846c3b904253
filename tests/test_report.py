"""Report stage: rows, best row, deltas vs git HEAD, DVC plot records and PNG, clear errors, from fixture JSON."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from PIL import Image

from stages.report import (Delta, ReportError, collect_rows, diff_summaries, main,
                           read_baseline_summary)

LITE0, LITE1, LITE2 = "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"
SHA = {LITE0: "5793442" + "a" * 57, LITE1: "77cc716" + "b" * 57, LITE2: "9656183" + "c" * 57}


def head_metrics(backbone: str, val_accuracy: float, *, test: bool = False, **extra) -> dict:
    split = {"accuracy": val_accuracy, "mean_class_accuracy": val_accuracy - 0.01,
             "macro_f1": val_accuracy - 0.005, "log_loss": 0.25, "ece": 0.04,
             "per_class": {"ants": {"precision": 0.9, "recall": 0.88},
                           "bees": {"precision": 0.87, "recall": 0.9}}}
    metrics = {"backbone": backbone, "head": "logreg", "layer": "pool", "C": 0.1, "train_seconds": 0.25,
               "feature_dim": 1280, "features": {"path": f"features/{backbone}.h5"}, "val": split}
    if test:
        metrics["test"] = {**split, "accuracy": val_accuracy - 0.02}
    return {**metrics, **extra}


def write_backbone(reports: Path, backbone: str, val_accuracy: float, *, images: int = 400,
                   seconds: float = 20.0, **metrics_extra) -> None:
    folder = reports / backbone
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(head_metrics(backbone, val_accuracy, **metrics_extra)))
    (folder / "extract.json").write_text(json.dumps(
        {"images": images, "seconds": seconds, "images_per_second": images / seconds, "device": "cpu",
         "precision": "float32", "batch_size": 32, "compile": False, "channels_last": True}))
    (folder / "weights.json").write_text(json.dumps(
        {"backbone": backbone, "source": "package", "sha256": SHA[backbone], "size": 18826032,
         "verification": "full", "parameters": 3371304}))


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with params.yaml and reports for lite0 (0.90 val acc) and lite1 (0.95)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # never see an outer repo
    for key in ("GIT_AUTHOR", "GIT_COMMITTER"):
        monkeypatch.setenv(f"{key}_NAME", "Report Test")
        monkeypatch.setenv(f"{key}_EMAIL", "report@example.invalid")
    set_params(tmp_path, [LITE0, LITE1])
    write_backbone(tmp_path / "reports", LITE0, 0.90, seconds=20.0)
    write_backbone(tmp_path / "reports", LITE1, 0.95, seconds=32.0)
    return tmp_path


def set_params(root: Path, backbones: list[str], primary_metric: str = "val.accuracy",
               finetune: list[str] | None = None) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(
        {"backbones": backbones, "report": {"primary_metric": primary_metric},
         "finetune": {"backbones": finetune or []}}))


def run_report(root: Path) -> dict:
    assert main(["--reports", "reports", "--out", "summary", "--params", "params.yaml"]) == 0
    return json.loads((root / "summary" / "summary.json").read_text())


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def test_summary_table_best_row_plot_and_png(project: Path) -> None:
    summary = run_report(project)

    assert summary["primary_metric"] == "val.accuracy"
    assert summary["best"] == LITE1 and summary["best_value"] == 0.95
    assert list(summary["rows"]) == [LITE0, LITE1]
    row = summary["rows"][LITE0]
    assert row["val"] == {"accuracy": 0.90, "mean_class_accuracy": 0.89, "macro_f1": 0.895,
                          "log_loss": 0.25, "ece": 0.04}
    assert "test" not in row  # no test split in the head metrics
    assert row["extract"] == {"images": 400, "seconds": 20.0, "images_per_second": 20.0,
                              "seconds_per_1000_images": 50.0, "device": "cpu", "precision": "float32"}
    assert row["weights"] == {"sha256": SHA[LITE0][:12], "verification": "full"}
    assert (row["feature_dim"], row["head_seconds"], row["C"], row["layer"]) == (1280, 0.25, 0.1, "pool")

    markdown = (project / "summary" / "summary.md").read_text()
    assert f"| **{LITE1}** (best) | probe | logreg | 0.1 | 0.9500 | 0.9400 | 0.0400 | 1280 | 12.5 | 32.00 " \
           f"| 80.00 | cpu | 0.25 | `{SHA[LITE1][:12]}` | full |" in markdown
    assert f"| {LITE0} | probe |" in markdown
    assert "test acc" not in markdown
    assert "No baseline (summary is not in a git repository)" in markdown

    points = json.loads((project / "summary" / "comparison.json").read_text())
    assert [(p["row"], p["seconds_per_1000_images"], p["images_per_second"], p["val_accuracy"], p["best"])
            for p in points] == [(LITE0, 50.0, 20.0, 0.90, False), (LITE1, 80.0, 12.5, 0.95, True)]
    with Image.open(project / "summary" / "comparison.png") as png:
        assert (png.format, png.size) == ("PNG", (700, 450))


def test_outputs_are_byte_identical_for_identical_inputs(project: Path) -> None:
    def digests() -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (project / "summary").iterdir()}

    run_report(project)
    first = digests()
    shutil.rmtree(project / "summary")
    run_report(project)
    assert digests() == first
    assert set(first) == {"summary.md", "summary.json", "comparison.json", "comparison.png"}


def test_test_split_columns_and_test_primary_metric(project: Path) -> None:
    write_backbone(project / "reports", LITE0, 0.90, test=True)
    write_backbone(project / "reports", LITE1, 0.95, test=True)
    set_params(project, [LITE0, LITE1], primary_metric="test.accuracy")
    summary = run_report(project)
    assert summary["best"] == LITE1 and summary["best_value"] == pytest.approx(0.93)
    assert summary["rows"][LITE0]["test"]["accuracy"] == pytest.approx(0.88)
    assert "| test acc | test mean-class acc | test ECE |" in (project / "summary" / "summary.md").read_text()


def test_test_primary_metric_without_test_split_is_a_clear_error(project: Path, capsys) -> None:
    set_params(project, [LITE0, LITE1], primary_metric="test.accuracy")
    assert main(["--reports", "reports", "--out", "summary"]) == 1
    err = capsys.readouterr().err
    assert "report.primary_metric is 'test.accuracy' but no row has that metric" in err
    assert "set prepare.test_fraction > 0" in err
    assert not (project / "summary" / "summary.json").exists()


@pytest.mark.parametrize(("name", "stage"), [("metrics.json", "head"), ("extract.json", "extract"),
                                             ("weights.json", "weights")])
def test_missing_report_names_the_file_and_the_stage_to_run(project: Path, name: str, stage: str,
                                                            capsys) -> None:
    (project / "reports" / LITE1 / name).unlink()
    expected = (f"reports/{LITE1}/{name} not found: it is written by stage '{stage}@{LITE1}'. "
                f"Run `dvc repro {stage}@{LITE1}`")
    with pytest.raises(ReportError, match=expected.replace("(", r"\(").replace(".", r"\.")):
        collect_rows(Path("reports"), [LITE0, LITE1])
    assert main(["--reports", "reports", "--out", "summary"]) == 1
    assert expected in capsys.readouterr().err


def test_missing_finetune_report_names_its_stage(project: Path) -> None:
    with pytest.raises(ReportError, match=rf"reports/finetune/{LITE1}/metrics.json not found: it is written by "
                                          rf"stage 'finetune@{LITE1}'"):
        collect_rows(Path("reports"), [LITE0, LITE1], finetune_backbones=[LITE1])


def test_report_missing_a_key_or_not_json_is_a_clear_error(project: Path) -> None:
    metrics = head_metrics(LITE0, 0.9)
    del metrics["val"]["ece"]
    (project / "reports" / LITE0 / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(ReportError, match=rf"reports/{LITE0}/metrics.json lacks 'val.ece'.*"
                                          rf"Re-run `dvc repro --force head@{LITE0}`"):
        collect_rows(Path("reports"), [LITE0])
    (project / "reports" / LITE1 / "extract.json").write_text("{not json")
    with pytest.raises(ReportError, match=rf"reports/{LITE1}/extract.json is not valid JSON"):
        collect_rows(Path("reports"), [LITE1])


def test_head_warnings_and_notes_are_carried_into_the_summary(project: Path) -> None:
    write_backbone(project / "reports", LITE0, 0.90,
                   warnings=["C=10: lbfgs failed to converge (status=1)", "C=1: lbfgs failed to converge"],
                   note="head.refit_on_val: the head was refit on train+val, so val metrics are not held out")
    run_report(project)
    markdown = (project / "summary" / "summary.md").read_text()
    assert (f"- {LITE0}: 2 warning(s) from the head, e.g. 'C=10: lbfgs failed to converge (status=1)' "
            f"(all in reports/{LITE0}/metrics.json)") in markdown
    assert f"- {LITE0}: head.refit_on_val: the head was refit on train+val" in markdown
    assert LITE1 + ":" not in markdown


def test_only_params_backbones_are_listed(project: Path) -> None:
    write_backbone(project / "reports", LITE2, 0.99)  # stale reports of a backbone no longer in params
    set_params(project, [LITE1])
    summary = run_report(project)
    assert list(summary["rows"]) == [LITE1]


def test_layer_rows_and_finetune_row(project: Path) -> None:
    layers = {"layers": [
        {"layer": "pool", "val": {"accuracy": 0.90}, "feature_dim": 1280},
        {"layer": "blocks.5", "val": {"accuracy": 0.85, "mean_class_accuracy": 0.84, "ece": 0.07},
         "feature_dim": 192, "C": 1.0, "train_seconds": 0.1},
    ]}
    (project / "reports" / LITE0 / "layers.json").write_text(json.dumps(layers))
    set_params(project, [LITE0, LITE1], finetune=[LITE0])
    (project / "reports" / "finetune" / LITE0).mkdir(parents=True)
    (project / "reports" / "finetune" / LITE0 / "metrics.json").write_text(json.dumps(
        {"backbone": LITE0, "head": "linear", "layer": "pool", "C": None, "regime": "partial",
         "train_seconds": 95.5, "feature_dim": 1280, "device": "cpu",
         "val": {"accuracy": 0.97, "mean_class_accuracy": 0.965, "ece": 0.03}}))
    summary = run_report(project)

    assert list(summary["rows"]) == [LITE0, f"{LITE0}:blocks.5", LITE1, f"finetune:{LITE0}"]
    layer_row = summary["rows"][f"{LITE0}:blocks.5"]
    assert (layer_row["layer"], layer_row["feature_dim"], layer_row["val"]["accuracy"]) == ("blocks.5", 192, 0.85)
    assert layer_row["extract"]["seconds"] == 20.0  # the same single extraction as the pool row
    finetune = summary["rows"][f"finetune:{LITE0}"]
    assert finetune["kind"] == "finetune (partial)" and finetune["head_seconds"] == 95.5
    assert (finetune["head"], finetune["feature_dim"], "C" in finetune) == ("linear", 1280, False)
    assert "extract" not in finetune and finetune["weights"]["sha256"] == SHA[LITE0][:12]
    assert summary["best"] == f"finetune:{LITE0}"
    points = json.loads((project / "summary" / "comparison.json").read_text())
    assert [p["row"] for p in points] == [LITE0, f"{LITE0}:blocks.5", LITE1]  # fine-tune has no extraction


def test_deltas_against_the_summary_committed_at_git_head(project: Path) -> None:
    git(project, "init", "-q")
    run_report(project)
    first_md = (project / "summary" / "summary.md").read_text()
    assert "No baseline (no summary/summary.json at git HEAD)" in first_md  # no commit yet
    git(project, "add", "summary/summary.json")
    git(project, "commit", "-q", "-m", "baseline")

    run_report(project)  # same inputs: a baseline, nothing changed
    assert "No metric changed (baseline: summary/summary.json at git HEAD)." in \
        (project / "summary" / "summary.md").read_text()

    write_backbone(project / "reports", LITE0, 0.97, seconds=20.0)
    write_backbone(project / "reports", LITE2, 0.91, seconds=40.0)
    set_params(project, [LITE0, LITE1, LITE2])
    summary = run_report(project)
    markdown = (project / "summary" / "summary.md").read_text()
    assert summary["best"] == LITE0
    assert "| Row | Metric | HEAD | workspace | Change |" in markdown
    assert f"| {LITE0} | val.accuracy | 0.9000 | 0.9700 | +0.0700 |" in markdown
    assert f"| {LITE0} | val.mean_class_accuracy | 0.8900 | 0.9600 | +0.0700 |" in markdown
    assert f"| {LITE2} | (row added) | - | val.accuracy 0.9100 | - |" in markdown
    assert f"| {LITE2} | val.accuracy" not in markdown  # an added row is one line, not one per metric
    assert f"| {LITE1} |" not in markdown.split("## Changes vs HEAD")[1]  # unchanged rows are not listed
    # the Δ column of the main table: changed, unchanged and new rows
    assert f"| **{LITE0}** (best) |" in markdown and "| +0.0700 |\n" in markdown
    assert markdown.count("| 0 |\n") == 1 and "| new |\n" in markdown

    set_params(project, [LITE0])  # a removed row
    run_report(project)
    changes = (project / "summary" / "summary.md").read_text().split("## Changes vs HEAD")[1]
    assert f"| {LITE1} | (row removed) | - | - | - |" in changes


def test_baseline_is_tolerated_without_git(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(project / "no-such-bin"))
    baseline, why = read_baseline_summary(project / "summary" / "summary.json")
    assert baseline is None and why.startswith("git is not available")
    run_report(project)
    assert "No baseline (git is not available" in (project / "summary" / "summary.md").read_text()


def test_diff_summaries_lists_changed_added_and_removed_metrics() -> None:
    old = {"rows": {"a": {"val": {"accuracy": 0.5, "ece": 0.1}, "head": "logreg"},
                    "gone": {"val": {"accuracy": 0.7}}}}
    new = {"rows": {"a": {"val": {"accuracy": 0.75, "ece": 0.1}, "head": "svm"},
                    "b": {"val": {"accuracy": 0.6}}}}
    deltas = diff_summaries(old, new)
    assert deltas == [Delta("a", "val.accuracy", 0.5, 0.75), Delta("b", "val.accuracy", None, 0.6),
                      Delta("gone", "val.accuracy", 0.7, None)]
    assert [d.change for d in deltas] == [0.25, None, None]
    assert diff_summaries(None, new) == []
