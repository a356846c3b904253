"""Report stage: every probe, k-NN, feature set and fine-tune compared on the held-out split, with what it cost.

Numbers you can trust: every accuracy here was measured on the held-out split (test when the dataset has one,
else val; stages/evaluation.py), which chose nothing; each carries its 95% Wilson interval, and each row is
compared with the best row on the same held-out images by McNemar's exact test (rows not distinguishable from the
best at alpha 0.05 are marked ≈). Picking the best on the held-out split describes the results; it chooses nothing
that is reported.

Reads the per-backbone reports the other stages write (file -> stage that writes it):

    reports/<bb>/metrics.json      head@<bb>     heldout.* of the chosen probe, how it was chosen (selection), the
                                                 k-NN probe, the few-shot curve, one probe per feature set
    reports/<bb>/predictions.json  head@<bb>     optional: per-image held-out predictions (rows probe, knn,
                                                 layers=<a>+<b>), for the paired tests
    reports/<bb>/extract.json      extract@<bb>  images, seconds, images/s of the feature extraction
    reports/<bb>/weights.json      weights@<bb>  sha256 and verification level of the weight file
    reports/finetune/<bb>/metrics.json      finetune@<bb>  heldout.* of the fine-tune and probe_heldout.* of its probe
    reports/finetune/<bb>/predictions.json  finetune@<bb>  optional: rows finetune and probe (the probe at step 0)
    reports/prepare/quarantine.json         prepare        optional: files that are not usable images (a note)

and writes to `--out` (summary/; outside reports/ because DVC forbids an output inside a dependency):

    summary.md       the table (best row in bold, ≈ marks), few-shot tables, fine-tune verdicts
    summary.json     DVC metrics: {"heldout_split", "primary_metric", "best", "best_value", "alpha",
                     "rows": {row: {"heldout": {"accuracy", "accuracy_ci_low", "accuracy_ci_high", "n"},
                                    "mean_class_accuracy", "ece", "vs_best_p", "indistinguishable_from_best", ...}},
                     "few_shot": {backbone: {shots: {"mean", "std", "min", "max", "draws"}}}}
    comparison.json  DVC plot: held-out accuracy (with its interval) vs extraction cost, one record per row
    comparison.png   the same plot rendered with matplotlib (Agg, offline), error bars = the intervals
    report.html      one self-contained offline page: the table (sortable), plots, confusion matrices, calibration,
                     misclassified images, the audit's findings, provenance (stages/report_html.py); thumbnails are
                     cached in <out>/thumbs (gitignored, not a DVC output)

Rows: `<bb>` (the probe the protocol chose), `<bb> k-NN`, `<bb> @<layer>+<layer>` (each feature set's own probe,
when there is more than one set) and `<bb> fine-tune`.

Changes since the last commit are `dvc metrics diff`'s job (summary.md and the page say so). The report reads no git
state for its numbers (the page's provenance names the commit, as a label only), so they depend only on the inputs
dvc.yaml declares and `dvc status` stays truthful.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.evaluation import ALPHA, Predictions, paired_comparison, read_predictions
from stages.io import atomic_path, read_json, setup_logging, write_json, write_text
from stages.metrics import accuracy_interval
from stages.params import PRIMARY_METRICS, ParamError, load_params
from stages.report_html import PageInputs, render_error_page, render_page, write_page

logger = logging.getLogger(__name__)

# report.primary_metric -> where the value sits in a summary row (the row keeps the accuracy and its interval
# together under "heldout", the other held-out metrics beside it).
PRIMARY_KEYS = {"heldout.accuracy": "heldout.accuracy", "heldout.mean_class_accuracy": "mean_class_accuracy",
                "heldout.macro_f1": "macro_f1"}
assert set(PRIMARY_KEYS) == set(PRIMARY_METRICS)
ROW_METRICS = ("mean_class_accuracy", "macro_f1", "ece", "log_loss")  # held-out, beside "heldout"
INTERVAL_KEYS = ("accuracy_ci_low", "accuracy_ci_high")
# Required keys of each per-backbone report, by file name: (stage prefix, dotted keys).
REQUIRED = {
    "metrics.json": ("head", ("heldout_split", "heldout.accuracy", "heldout.n", "heldout.mean_class_accuracy",
                              "heldout.ece", "feature_dim")),
    "extract.json": ("extract", ("images", "seconds", "images_per_second")),
    "weights.json": ("weights", ("sha256", "verification")),
}
FINETUNE_REQUIRED = ("heldout_split", "heldout.accuracy", "heldout.n")
SHA256_PREFIX = 12
TEXT_COLUMNS = frozenset({"Row", "Kind", "Choice", "Weights"})


class ReportError(RuntimeError):
    """A per-stage report is missing, unreadable or lacks a key the summary needs."""


@dataclass(frozen=True)
class BackboneReports:
    """The parsed reports of one backbone; `predictions` is None when predictions.json is absent or unusable."""
    backbone: str
    metrics: dict[str, Any]
    extract: dict[str, Any]
    weights: dict[str, Any]
    predictions: Predictions | None = None


@dataclass(frozen=True)
class FinetuneReports:
    """The parsed reports of one fine-tuned backbone."""
    backbone: str
    metrics: dict[str, Any]
    weights: dict[str, Any]
    predictions: Predictions | None = None


@dataclass(frozen=True)
class Row:
    """One row of the comparison: its summary.json entry, and its per-image held-out predictions
    (`predictions.rows[predictions_row]`) when there are usable ones."""
    name: str
    data: dict[str, Any]
    predictions: Predictions | None = None
    predictions_row: str | None = None


@dataclass
class Collected:
    """Everything read from reports/: rows in report order, few-shot curves by backbone, notes for the user."""
    rows: list[Row] = field(default_factory=list)
    few_shot: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def get_dotted(obj: Any, dotted: str) -> Any:
    """`obj["a"]["b"]` for "a.b"; None when any part is missing."""
    for part in dotted.split("."):
        if not isinstance(obj, Mapping) or part not in obj:
            return None
        obj = obj[part]
    return obj


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _first_number(obj: Mapping[str, Any], *keys: str) -> Any:
    return next((obj[key] for key in keys if _is_number(obj.get(key))), None)


# ----------------------------------------------------------------------------------------------- read
def read_stage_report(path: Path, stage: str, required: Sequence[str] = ()) -> dict[str, Any]:
    """Read one stage's JSON report; raise ReportError naming the file and the stage to run."""
    if not path.is_file():
        raise ReportError(f"{path} not found: it is written by stage '{stage}'. "
                          f"Run `dvc repro {stage}` (or `dvc repro` for the whole pipeline).")
    try:
        data = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path} is not valid JSON ({exc}); re-run `dvc repro --force {stage}`.") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path} must hold a JSON object; got {type(data).__name__}. "
                          f"Re-run `dvc repro --force {stage}`.")
    missing = [key for key in required if get_dotted(data, key) is None]
    if missing:
        raise ReportError(f"{path} lacks {', '.join(repr(k) for k in missing)}, which the report needs; "
                          f"it was written by an older or different '{stage}'. "
                          f"Re-run `dvc repro --force {stage}`.")
    return data


def read_optional_predictions(path: Path, stage: str, notes: list[str]) -> Predictions | None:
    """predictions.json when it exists and parses; otherwise None and a note saying the paired tests are n/a."""
    if not path.is_file():
        notes.append(f"{path} not found: the paired tests of its rows are n/a (re-run `dvc repro {stage}`).")
        return None
    try:
        return read_predictions(path)
    except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        notes.append(f"{path} is not usable ({exc}): the paired tests of its rows are n/a "
                     f"(re-run `dvc repro --force {stage}`).")
        return None


def read_backbone_reports(reports_dir: Path, backbone: str, notes: list[str]) -> BackboneReports:
    """Read reports/<bb>/{metrics,extract,weights}.json (required) and predictions.json (optional)."""
    parsed = {}
    for name, (stage, required) in REQUIRED.items():
        parsed[name] = read_stage_report(reports_dir / backbone / name, f"{stage}@{backbone}", required)
    predictions = read_optional_predictions(reports_dir / backbone / "predictions.json", f"head@{backbone}", notes)
    return BackboneReports(backbone, parsed["metrics.json"], parsed["extract.json"], parsed["weights.json"],
                           predictions)


def read_finetune_reports(reports_dir: Path, backbone: str, notes: list[str]) -> FinetuneReports:
    """reports/finetune/<bb>/{metrics,predictions}.json (the optional finetune@<bb> stage) and the backbone's
    weights.json."""
    folder = reports_dir / "finetune" / backbone
    metrics = read_stage_report(folder / "metrics.json", f"finetune@{backbone}", FINETUNE_REQUIRED)
    weights = read_stage_report(reports_dir / backbone / "weights.json", f"weights@{backbone}",
                                REQUIRED["weights.json"][1])
    predictions = read_optional_predictions(folder / "predictions.json", f"finetune@{backbone}", notes)
    return FinetuneReports(backbone, metrics, weights, predictions)


# ------------------------------------------------------------------------------------------ compute
def heldout_interval(heldout: Mapping[str, Any]) -> dict[str, Any]:
    """{"accuracy", "accuracy_ci_low", "accuracy_ci_high", "n"} of a held-out metrics block; the 95% Wilson interval
    is computed from `correct` (else accuracy x n) when the block does not carry it."""
    accuracy, n = heldout["accuracy"], heldout.get("n")
    low, high = heldout.get("accuracy_ci_low"), heldout.get("accuracy_ci_high")
    if not (_is_number(low) and _is_number(high)):
        low = high = None
        if _is_number(n):
            correct = heldout["correct"] if _is_number(heldout.get("correct")) else round(accuracy * n)
            low, high = accuracy_interval(int(correct), int(n))
    block = {"accuracy": accuracy, "accuracy_ci_low": low, "accuracy_ci_high": high, "n": n}
    return {key: value for key, value in block.items() if value is not None}


def _heldout_columns(heldout: Mapping[str, Any], split: str) -> dict[str, Any]:
    columns: dict[str, Any] = {"heldout_split": split, "heldout": heldout_interval(heldout)}
    columns.update({key: heldout[key] for key in ROW_METRICS if _is_number(heldout.get(key))})
    return columns


def _extract_cost(extract: Mapping[str, Any]) -> dict[str, Any]:
    images, seconds = extract["images"], extract["seconds"]
    cost = {"images": images, "seconds": seconds, "images_per_second": extract["images_per_second"],
            "seconds_per_1000_images": round(1000.0 * seconds / images, 4) if images else None}
    for key in ("device", "precision"):
        if key in extract:
            cost[key] = extract[key]
    return cost


def _weights_summary(weights: Mapping[str, Any]) -> dict[str, Any]:
    return {"sha256": str(weights["sha256"])[:SHA256_PREFIX], "verification": weights["verification"]}


def _layers(layers: Any) -> str | None:
    if isinstance(layers, str):
        return layers
    if isinstance(layers, Sequence) and layers:
        return "+".join(str(layer) for layer in layers)
    return None


def _selection(selection: Any, accuracy_keys: Sequence[str] = ("cv_accuracy", "accuracy")) -> dict[str, Any] | None:
    """How a row's settings were chosen: {"method", "folds", "split", "n", "epoch", "accuracy"} (what exists)."""
    if not isinstance(selection, Mapping):
        return None
    out = {key: selection[key] for key in ("method", "folds", "split", "n", "epoch")
           if isinstance(selection.get(key), (str, int)) and not isinstance(selection.get(key), bool)}
    accuracy = _first_number(selection, *accuracy_keys)
    if accuracy is not None:
        out["accuracy"] = accuracy
    return out or None


def _own_selection(selection: Any, entry: Mapping[str, Any]) -> dict[str, Any] | None:
    """The probe's selection (method, folds, split, n) with `entry`'s own selection accuracy (k-NN, a feature set)."""
    out = {k: v for k, v in (_selection(selection) or {}).items() if k != "accuracy"}
    accuracy = _first_number(entry, "cv_accuracy", "selection_accuracy")
    if accuracy is not None:
        out["accuracy"] = accuracy
    return out or None


def _paired_source(predictions: Predictions | None, key: str, heldout: Mapping[str, Any], *, row: str,
                   source: str, notes: list[str]) -> tuple[Predictions | None, str | None]:
    """(predictions, key) when `predictions` has row `key` and it agrees with the metrics' held-out count;
    otherwise (None, None), with a note when the predictions exist but cannot be used."""
    if predictions is None:
        return None, None
    if key not in predictions.rows:
        notes.append(f"{row}: {source} has no row {key!r}; its paired test is n/a (re-run the stage that writes it).")
        return None, None
    correct = int(predictions.correct(key).sum())
    expected = heldout.get("correct")
    if not _is_number(expected) and _is_number(heldout.get("n")):
        expected = round(heldout["accuracy"] * heldout["n"])
    if predictions.split != heldout.get("split", predictions.split) or \
            (_is_number(heldout.get("n")) and heldout["n"] != len(predictions.labels)) or \
            (expected is not None and int(expected) != correct):
        notes.append(f"{row}: {source} row {key!r} ({correct}/{len(predictions.labels)} correct on "
                     f"{predictions.split}) disagrees with its metrics.json; its paired test is n/a "
                     f"(re-run the stage that writes both).")
        return None, None
    return predictions, key


def backbone_rows(reports: BackboneReports, notes: list[str]) -> list[Row]:
    """Rows of one backbone: the chosen probe `<bb>`, `<bb> k-NN`, and `<bb> @<layers>` per feature set when the
    protocol compared more than one set."""
    bb, metrics = reports.backbone, reports.metrics
    split = metrics["heldout_split"]
    source = f"reports/{bb}/predictions.json"
    shared = {"extract": _extract_cost(reports.extract), "weights": _weights_summary(reports.weights)}

    def make(name: str, kind: str, heldout: Mapping[str, Any], settings: dict[str, Any], selection: Any,
             feature_dim: Any, key: str) -> Row:
        data = {"backbone": bb, "kind": kind, **_heldout_columns(heldout, split),
                **{k: v for k, v in settings.items() if v is not None}}
        if selection:
            data["selection"] = selection
        if feature_dim is not None:
            data["feature_dim"] = feature_dim
        data.update(shared)
        predictions, row_key = _paired_source(reports.predictions, key, {"split": split, **heldout}, row=name,
                                              source=source, notes=notes)
        return Row(name, data, predictions, row_key)

    chosen_layers = _layers(metrics.get("layers")) or _layers(metrics.get("layer"))
    rows = [make(bb, "probe", metrics["heldout"],
                 {"head": metrics.get("head"), "C": metrics.get("C") if _is_number(metrics.get("C")) else None,
                  "layers": chosen_layers, "normalization": metrics.get("normalization"),
                  "train_seconds": metrics.get("train_seconds") if _is_number(metrics.get("train_seconds")) else None},
                 _selection(metrics.get("selection")), metrics["feature_dim"], "probe")]
    knn = metrics.get("knn")
    if isinstance(knn, Mapping) and _is_number(get_dotted(knn, "heldout.accuracy")):
        rows.append(make(f"{bb} k-NN", "k-NN", knn["heldout"],
                         {"k": knn.get("k"), "layers": _layers(knn.get("layers")) or chosen_layers},
                         _own_selection(metrics.get("selection"), knn), None, "knn"))
    feature_sets = [entry for entry in metrics.get("feature_sets") or []
                    if isinstance(entry, Mapping) and _layers(entry.get("layers"))
                    and _is_number(get_dotted(entry, "heldout.accuracy"))]
    if len(feature_sets) > 1:
        for entry in feature_sets:
            layers = _layers(entry["layers"])
            head = entry.get("head") or entry.get("kind") or metrics.get("head")
            rows.append(make(f"{bb} @{layers}", "layers (chosen)" if layers == chosen_layers else "layers",
                             entry["heldout"],
                             {"head": head, "C": entry.get("C") if _is_number(entry.get("C")) else None,
                              "layers": layers, "normalization": entry.get("normalization")},
                             _own_selection(metrics.get("selection"), entry), entry.get("feature_dim"),
                             f"layers={layers}"))
    return rows


def finetune_verdict(finetune: Mapping[str, Any], probe: Mapping[str, Any],
                     paired: Mapping[str, Any] | None) -> dict[str, Any]:
    """Does the fine-tune beat its own probe on the same held-out images by more than chance?

    With per-image predictions: McNemar's exact test (`paired`), beaten when better and p < ALPHA. Without: only
    when the 95% intervals do not overlap. Returns {"probe": the probe's interval block, "gain" (fine-tune - probe
    accuracy), "p_value" (McNemar only), "test", "beats_probe" 0/1, "probe_better" 0/1}."""
    gain = finetune["accuracy"] - probe["accuracy"]
    verdict: dict[str, Any] = {"probe": dict(probe), "gain": gain}
    if paired is not None:
        verdict.update(p_value=paired["p_value"], test="mcnemar")
        different = paired["p_value"] < ALPHA
    else:
        verdict["test"] = "intervals"
        different = all(_is_number(side.get(k)) for side in (finetune, probe) for k in INTERVAL_KEYS) and (
            finetune["accuracy_ci_low"] > probe["accuracy_ci_high"]
            or finetune["accuracy_ci_high"] < probe["accuracy_ci_low"])
    verdict["beats_probe"] = int(different and gain > 0)
    verdict["probe_better"] = int(different and gain < 0)
    return verdict


def finetune_row(reports: FinetuneReports, *, probe_row: Row | None, notes: list[str]) -> Row:
    """`<bb> fine-tune`: the fine-tuned network on the held-out split (no extraction: it is trained end to end),
    with `vs_probe`, its comparison with its own probe (the probe at step 0) on the same images."""
    bb, metrics = reports.backbone, reports.metrics
    name, split = f"{bb} fine-tune", metrics["heldout_split"]
    source = f"reports/finetune/{bb}/predictions.json"
    data: dict[str, Any] = {"backbone": bb, "kind": "fine-tune", **_heldout_columns(metrics["heldout"], split)}
    for key in ("regime", "head"):
        if isinstance(metrics.get(key), str):
            data[key] = metrics[key]
    selection = _selection(metrics.get("selection"), ("accuracy", "cv_accuracy"))
    if selection:
        data["selection"] = selection
    for key in ("feature_dim", "train_seconds"):
        if _is_number(metrics.get(key)):
            data[key] = metrics[key]
    data["weights"] = _weights_summary(reports.weights)
    predictions, key = _paired_source(reports.predictions, "finetune", {"split": split, **metrics["heldout"]},
                                      row=name, source=source, notes=notes)

    # its own probe: the fine-tune stage's probe_heldout; else the head's probe when it was held out on the same split
    probe_heldout = metrics.get("probe_heldout")
    if isinstance(probe_heldout, Mapping) and _is_number(probe_heldout.get("accuracy")):
        probe = heldout_interval(probe_heldout)
        probe_source, probe_key = _paired_source(predictions, "probe", {"split": split, **probe_heldout},
                                                 row=name, source=source, notes=notes)
    elif probe_row is not None and probe_row.data["heldout_split"] == split:
        probe, probe_source, probe_key = probe_row.data["heldout"], probe_row.predictions, probe_row.predictions_row
        notes.append(f"{name}: reports/finetune/{bb}/metrics.json has no probe_heldout; compared with the head's "
                     f"probe {bb} instead.")
    else:
        notes.append(f"{name}: no probe on the same held-out split to compare with (probe_heldout missing).")
        return Row(name, data, predictions, key)
    paired = None
    if predictions is not None and probe_source is not None:
        paired = paired_comparison((probe_source, probe_key), (predictions, key))
    data["vs_probe"] = finetune_verdict(data["heldout"], probe, paired)
    return Row(name, data, predictions, key)


def few_shot_curve(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The head's few-shot points [{"shots", "draws", "mean", "std", "min", "max"}], in its order."""
    points = []
    for point in metrics.get("few_shot") or []:
        if isinstance(point, Mapping) and "shots" in point and _is_number(point.get("mean")):
            points.append({key: point[key] for key in ("shots", "draws", "mean", "std", "min", "max")
                           if key == "shots" or _is_number(point.get(key))})
    return points


def report_notes(name: str, metrics: Mapping[str, Any], source: str) -> list[str]:
    """Warnings a user must act on, carried over from a head or fine-tune metrics.json."""
    notes = []
    warnings = metrics.get("warnings")
    if isinstance(warnings, list) and warnings:
        notes.append(f"{name}: {len(warnings)} warning(s), e.g. {str(warnings[0])!r} (all in {source})")
    if isinstance(metrics.get("note"), str):
        notes.append(f"{name}: {metrics['note']}")
    return notes


def primary_value(row: Mapping[str, Any], primary_metric: str) -> Any:
    """The row's value of report.primary_metric (None when it has none)."""
    return get_dotted(row, PRIMARY_KEYS[primary_metric])


def pick_best(rows: Mapping[str, Mapping[str, Any]], primary_metric: str) -> str:
    """The row with the highest `primary_metric` (all are higher-is-better); ties: the higher held-out accuracy
    (mean-class accuracy when accuracy is the primary metric), then the first name in sort order."""
    tie_key = "mean_class_accuracy" if primary_metric == "heldout.accuracy" else "heldout.accuracy"

    def score(value: Any) -> float:
        return value if _is_number(value) else -math.inf

    scored = [(-primary_value(row, primary_metric), -score(get_dotted(row, tie_key)), name)
              for name, row in rows.items() if _is_number(primary_value(row, primary_metric))]
    if not scored:
        raise ReportError(f"report.primary_metric is {primary_metric!r} but no row has that metric "
                          f"(rows: {', '.join(rows)}); re-run the head stages (`dvc repro`).")
    return min(scored)[2]


def build_summary(collected: Collected, *, primary_metric: str) -> dict[str, Any]:
    """The summary.json object: the held-out split, the best row, every row with its paired test against the best
    (vs_best_p, indistinguishable_from_best 0/1; absent when not testable), and the few-shot curves."""
    rows = {row.name: dict(row.data) for row in collected.rows}
    if not rows:
        raise ReportError("no rows: params.yaml `backbones` is empty")
    splits = sorted({row["heldout_split"] for row in rows.values()})
    best = pick_best(rows, primary_metric)
    if len(splits) == 1:
        by_name = {row.name: row for row in collected.rows}
        top = by_name[best]
        for row in collected.rows:
            if top.predictions is None or row.predictions is None:
                continue
            paired = paired_comparison((top.predictions, top.predictions_row), (row.predictions, row.predictions_row))
            if paired is not None:
                rows[row.name]["vs_best_p"] = paired["p_value"]
                rows[row.name]["indistinguishable_from_best"] = int(paired["indistinguishable"])
    few_shot = {bb: {str(p["shots"]): {k: v for k, v in p.items() if k != "shots"} for p in points}
                for bb, points in collected.few_shot.items() if points}
    summary = {"heldout_split": splits[0] if len(splits) == 1 else "mixed: " + ", ".join(splits),
               "primary_metric": primary_metric, "best": best,
               "best_value": primary_value(rows[best], primary_metric), "alpha": ALPHA, "rows": rows}
    if few_shot:
        summary["few_shot"] = few_shot
    return summary


def comparison_points(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """DVC plot records, held-out accuracy (and its interval) vs extraction cost, one per row with an extraction."""
    points = []
    for name, row in summary["rows"].items():
        extract = row.get("extract")
        if not extract or extract.get("seconds_per_1000_images") is None:
            continue
        heldout = row["heldout"]
        points.append({"row": name, "backbone": row["backbone"], "kind": row["kind"],
                       "seconds_per_1000_images": extract["seconds_per_1000_images"],
                       "images_per_second": extract["images_per_second"],
                       "heldout_split": row["heldout_split"], "heldout_accuracy": heldout["accuracy"],
                       "heldout_accuracy_ci_low": heldout.get("accuracy_ci_low"),
                       "heldout_accuracy_ci_high": heldout.get("accuracy_ci_high"),
                       "best": name == summary["best"]})
    return points


# --------------------------------------------------------------------------------------- render
def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def format_accuracy(block: Mapping[str, Any] | None) -> str:
    """"0.948 [0.900, 0.973]": an accuracy with its 95% interval (the interval omitted when unknown)."""
    if not block or not _is_number(block.get("accuracy")):
        return "-"
    if all(_is_number(block.get(key)) for key in INTERVAL_KEYS):
        return f"{block['accuracy']:.3f} [{block['accuracy_ci_low']:.3f}, {block['accuracy_ci_high']:.3f}]"
    return f"{block['accuracy']:.3f}"


def format_p(p_value: float) -> str:
    """"p = 0.125", or "p < 0.001"."""
    return "p < 0.001" if p_value < 0.001 else f"p = {p_value:.3f}"


def _choice(row: Mapping[str, Any]) -> str:
    if row["kind"] == "k-NN":
        parts = [f"k={row['k']}" if "k" in row else None, "cosine", row.get("layers")]
    elif row["kind"] == "fine-tune":
        epoch = get_dotted(row, "selection.epoch")
        parts = [row.get("regime"), f"epoch {epoch}" if epoch is not None else None]
    else:
        parts = [row.get("head"), f"C={row['C']:g}" if "C" in row else None, row.get("layers"),
                 row.get("normalization")]
    return ", ".join(str(p) for p in parts if p) or "-"


def _selection_cell(row: Mapping[str, Any]) -> str:
    selection = row.get("selection") or {}
    if not _is_number(selection.get("accuracy")):
        return "-"
    return f"{selection['accuracy']:.3f} ({selection['method']})" if "method" in selection \
        else f"{selection['accuracy']:.3f}"


def _vs_best_cell(name: str, row: Mapping[str, Any], best: str, testable: bool) -> str:
    if name == best:
        return "best"
    if not testable or not _is_number(row.get("vs_best_p")):
        return "n/a"
    p_value = row["vs_best_p"]
    text = "< 0.001" if p_value < 0.001 else f"{p_value:.3f}"
    return f"{text} ≈ best" if row.get("indistinguishable_from_best") else text


def describe_selection(selection: Mapping[str, Any] | None) -> str:
    """How a probe's settings were chosen, in words."""
    if not selection:
        return "as recorded in its metrics.json (no selection section)"
    n = f" ({selection['n']} images)" if "n" in selection else ""
    split = selection.get("split", "selection")
    if selection.get("method") == "cv":
        folds = f"{selection['folds']}-fold " if "folds" in selection else ""
        return f"by {folds}stratified cross-validation on the {split} images{n}, then refit on them"
    if selection.get("method") == "val":
        return f"by fitting on train and scoring on val, then refit on {split}{n}"
    return f"by {selection.get('method', 'an unnamed method')} on {split}{n}"


def _header(summary: Mapping[str, Any]) -> list[str]:
    rows, best, primary = summary["rows"], summary["best"], summary["primary_metric"]
    splits = sorted({row["heldout_split"] for row in rows.values()})
    sizes = sorted({row["heldout"]["n"] for row in rows.values() if "n" in row["heldout"]})
    images = "" if not sizes else f", {sizes[0]} images" if len(sizes) == 1 else f", {sizes[0]}–{sizes[-1]} images"
    lines = ["# Backbone comparison", ""]
    if len(splits) == 1:
        lines.append(f"Held-out split: **{splits[0]}**{images}. Every number in this report is measured on it, and "
                     f"nothing was chosen on it.")
    else:
        by_split = {s: [n for n, r in rows.items() if r["heldout_split"] == s] for s in splits}
        lines.append("**Rows were evaluated on different held-out splits** ("
                     + "; ".join(f"{s}: {', '.join(names)}" for s, names in by_split.items())
                     + "), so their accuracies are not comparable and no paired test was run. This should not "
                       "happen: re-run the stages of the older rows (`dvc repro`).")
    probes = {row["backbone"]: describe_selection(row.get("selection"))
              for row in rows.values() if row["kind"] == "probe"}
    what = "Each probe's head, C, layers and normalization, and the k of k-NN, were chosen"
    if len(set(probes.values())) == 1:
        lines.append(f"{what} {next(iter(probes.values()))}.")
    elif probes:
        lines.append(f"{what}:")
        lines += [f"- {bb}: {text}" for bb, text in probes.items()]
    for row in rows.values():
        if row["kind"] == "fine-tune" and row.get("selection"):
            selection = row["selection"]
            n = f" ({selection['n']} images)" if "n" in selection else ""
            lines.append(f"The {row['backbone']} fine-tune's epoch was chosen on {selection.get('method', '?')}{n}.")
    lines += ["", f"Accuracies carry 95% Wilson intervals. Best row: **{best}**, the highest `{primary}` "
                  f"({_fmt(summary['best_value'], 4)}; params `report.primary_metric`; ties: "
                  f"{'mean-class' if primary == 'heldout.accuracy' else 'plain'} accuracy, then name). "
                  f"\"vs best\" is the p-value of McNemar's exact test against it on the same held-out images; rows "
                  f"marked ≈ are not distinguishable from the best (p ≥ {summary['alpha']}, alpha "
                  f"{summary['alpha']}); n/a: no per-image predictions to test. Picking the best on the held-out "
                  f"split describes the results; it chose nothing reported here.", ""]
    return lines


def render_table(summary: Mapping[str, Any]) -> list[str]:
    rows, best = summary["rows"], summary["best"]
    testable = not str(summary["heldout_split"]).startswith("mixed")
    columns = ["Row", "Kind", "Held-out acc [95% CI]", "Mean-class acc", "ECE", "Choice", "Selection acc",
               "s / 1000 img", "Feature dim", "Weights", "vs best (p)"]
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join(" --- " if c in TEXT_COLUMNS else " ---: " for c in columns) + "|"]
    for name, row in rows.items():
        extract, weights = row.get("extract") or {}, row.get("weights") or {}
        cells = [f"**{name}**" if name == best else name, row["kind"], format_accuracy(row["heldout"]),
                 _fmt(row.get("mean_class_accuracy")), _fmt(row.get("ece")), _choice(row), _selection_cell(row),
                 _fmt(extract.get("seconds_per_1000_images"), 1), _fmt(row.get("feature_dim")),
                 f"`{weights['sha256']}` {weights['verification']}" if weights else "-",
                 _vs_best_cell(name, row, best, testable)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_few_shot(summary: Mapping[str, Any]) -> list[str]:
    few_shot = summary.get("few_shot") or {}
    if not few_shot:
        return []
    lines = ["", "## Few-shot", "",
             f"Held-out {summary['heldout_split']} accuracy of the chosen probe settings trained on N images per "
             f"class, drawn from the selection images (mean ± std over seeded draws, [min, max]); \"all\" is the "
             f"probe itself."]
    for bb, points in few_shot.items():
        lines += ["", f"### {bb}", "", "| Images per class | Accuracy | [min, max] | Draws |",
                  "| ---: | ---: | ---: | ---: |"]
        for shots, point in points.items():
            draws = point.get("draws")
            if draws == 1 or not _is_number(point.get("std")):
                accuracy, span = _fmt(point["mean"]), "-"
            else:
                accuracy = f"{point['mean']:.3f} ± {point['std']:.3f}"
                span = f"[{_fmt(point.get('min'))}, {_fmt(point.get('max'))}]"
            lines.append(f"| {shots} | {accuracy} | {span} | {_fmt(draws)} |")
    return lines


def finetune_sentence(name: str, row: Mapping[str, Any]) -> str:
    """The plain verdict on one fine-tune row (with `vs_probe`)."""
    bb, verdict = row["backbone"], row["vs_probe"]
    points = 100.0 * verdict["gain"]
    test = format_p(verdict["p_value"]) if verdict["test"] == "mcnemar" else \
        "no per-image predictions for a paired test; compared by interval overlap"
    sides = (f"fine-tune {format_accuracy(row['heldout'])}, probe {format_accuracy(verdict['probe'])} on the same "
             f"{row['heldout'].get('n', '?')} held-out {row['heldout_split']} images")
    if verdict["beats_probe"]:
        return f"Fine-tuning {bb} gained {points:.1f} points over its probe ({test}; {sides})."
    cost = ""
    seconds = row.get("train_seconds")
    if _is_number(seconds):
        cost = f" (the fine-tune took {seconds:.0f} s)"
    conclusion = "the probe is better and costs seconds" if verdict["probe_better"] else \
        "the probe is as good and costs seconds"
    return (f"Fine-tuning {bb} did not beat its probe by more than the interval ({sides}; {points:+.1f} points, "
            f"{test}); {conclusion}{cost}.")


def render_finetune(summary: Mapping[str, Any]) -> list[str]:
    rows = [(name, row) for name, row in summary["rows"].items() if row["kind"] == "fine-tune"]
    if not rows:
        return []
    lines = ["", "## Fine-tuning vs the probe", "",
             f"Each fine-tune against its own probe (the probe it started from) on the same held-out images "
             f"(McNemar's exact test, alpha {summary['alpha']}).", ""]
    for name, row in rows:
        if "vs_probe" in row:
            lines.append(f"- {finetune_sentence(name, row)}")
        else:
            lines.append(f"- {name}: no probe on the same held-out images to compare with (see the notes).")
    return lines


def render_markdown(summary: Mapping[str, Any], *, notes: Sequence[str] = (),
                    plot_name: str = "comparison.png") -> str:
    """summary.md: what was held out and how choices were made, the table (best in bold, ≈ marks), notes, few-shot
    tables, fine-tune verdicts, the plot, and where to look next (the page, `dvc metrics diff`)."""
    lines = _header(summary) + render_table(summary)
    if notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in notes]
    lines += render_few_shot(summary) + render_finetune(summary)
    lines += ["", f"![Held-out accuracy vs extraction cost]({plot_name})"]
    lines += ["", "The whole report, offline: `summary/report.html`. Changes since the last commit: `dvc metrics diff` "
                  "(`dvc metrics diff --md summary/summary.json` for this table's rows)."]
    return "\n".join(lines) + "\n"


KIND_MARKERS = {"probe": "o", "k-NN": "^", "layers": "s", "layers (chosen)": "s"}


def write_comparison_png(points: Sequence[Mapping[str, Any]], path: Path, *, primary_metric: str) -> None:
    """Held-out accuracy (error bars: 95% intervals) vs extraction seconds per 1000 images; marker by kind, probe
    rows labelled, the best in red."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state, no display needed

    figure = Figure(figsize=(7, 4.5), dpi=100, layout="constrained")
    axes = figure.subplots()
    xs = [point["seconds_per_1000_images"] for point in points]
    middle = (min(xs) + max(xs)) / 2 if xs else 0.0
    splits = sorted({point["heldout_split"] for point in points})
    # the rows of one backbone share its extraction cost: spread them a little sideways so none hides another
    spacing = 0.012 * ((max(xs) - min(xs)) or max(xs, default=1.0) or 1.0)
    siblings: dict[str, list[str]] = {}
    for point in points:
        siblings.setdefault(point["backbone"], []).append(point["row"])
    kinds_seen = set()
    for point in points:
        group = siblings[point["backbone"]]
        x = point["seconds_per_1000_images"] + spacing * (group.index(point["row"]) - (len(group) - 1) / 2)
        best, accuracy = point["best"], point["heldout_accuracy"]
        low, high = point.get("heldout_accuracy_ci_low"), point.get("heldout_accuracy_ci_high")
        yerr = [[accuracy - low], [high - accuracy]] if _is_number(low) and _is_number(high) else None
        kind = point["kind"].replace(" (chosen)", "")
        axes.errorbar(x, accuracy, yerr=yerr, fmt=KIND_MARKERS.get(kind, "o"),
                      markersize=9 if best else 6, color="tab:red" if best else "tab:blue", ecolor="0.6",
                      capsize=3, zorder=3, label=None if kind in kinds_seen else kind)
        kinds_seen.add(kind)
        if point["kind"] == "probe" or best:
            right_half = len(points) > 1 and point["seconds_per_1000_images"] > middle
            axes.annotate(point["row"] + (" (best)" if best else ""), (x, accuracy), textcoords="offset points",
                          xytext=(-6 if right_half else 6, 4), ha="right" if right_half else "left", fontsize=8)
    axes.set_xlabel("feature extraction: seconds per 1000 images")
    axes.set_ylabel(f"held-out {'/'.join(splits) or '?'} accuracy (95% Wilson interval)")
    axes.set_title(f"Held-out accuracy vs extraction cost (best by {primary_metric})")
    axes.grid(True, alpha=0.3)
    axes.margins(x=0.25, y=0.15)
    if len(kinds_seen) > 1:
        axes.legend(fontsize=8, loc="lower right")
    with atomic_path(path, suffix=".png") as tmp:
        figure.savefig(tmp, format="png", metadata={"Software": None})


def render_audit(reports_dir: Path, backbones: Sequence[str]) -> tuple[list[str], dict[str, Any], list[str]]:
    """The dataset audit (reports/<bb>/audit.json, written by audit@<bb>, stages/audit.py) across backbones:
    (markdown lines of a "## Dataset audit" section, summary.json's "audit" object, a one-line note for the top).

    Counts per kind per backbone; a finding (kind + its set of paths) that several backbones flag is marked
    "agreed by N backbones". Backbones without an audit.json are skipped (an empty result when none has one)."""
    audits = {}
    for backbone in backbones:
        path = reports_dir / backbone / "audit.json"
        if path.is_file():
            audits[backbone] = read_stage_report(path, f"audit@{backbone}", ("counts", "duplicates", "label_issues",
                                                                             "outliers"))
    if not audits:
        return [], {}, []
    flagged: dict[tuple[str, frozenset[str]], dict[str, Any]] = {}
    for backbone, audit in audits.items():
        findings = ([("leakage" if g["cross_split"] else "near-duplicates", g["paths"], "") for g in audit["duplicates"]]
                    + [("label issue", [f["path"]], f"{f['given']} -> {f['suggested']}") for f in audit["label_issues"]]
                    + [("outlier", [f["path"]], f["class"]) for f in audit["outliers"]])
        for kind, paths, detail in findings:
            entry = flagged.setdefault((kind, frozenset(paths)), {"kind": kind, "paths": sorted(paths),
                                                                  "detail": detail, "backbones": []})
            entry["backbones"].append(backbone)
    agreed = sorted((e for e in flagged.values() if len(e["backbones"]) > 1),
                    key=lambda e: (-len(e["backbones"]), e["kind"], e["paths"]))
    lines = ["", "## Dataset audit", "",
             "From the cached features of each backbone (`reports/<backbone>/audit.json`, `audit.csv`, contact sheets "
             "in `reports/<backbone>/audit/*.png`). Nothing in data/ was changed.", "",
             "| Backbone | Near-duplicate groups (images) | Leakage groups (pairs) | Likely label errors | Outliers | "
             "Flagged images | Dropped from held-out |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    summary: dict[str, Any] = {"backbones": {}, "agreed": {}}
    for backbone, audit in audits.items():
        c = audit["counts"]
        skipped = audit.get("label_check", {}).get("status") == "skipped"
        lines.append(f"| {backbone} | {c['duplicate_groups']} ({c['duplicate_images']}) | {c['leakage_groups']} "
                     f"({c['leakage_pairs']}) | {'skipped' if skipped else c['label_issues']} | {c['outliers']} | "
                     f"{c['flagged_images']} ({100 * audit.get('flagged_fraction', 0):.1f}%) | "
                     f"{c.get('dropped_from_heldout', 0)} |")
        summary["backbones"][backbone] = {**c, "flagged_fraction": audit.get("flagged_fraction")}
    for kind in ("near-duplicates", "leakage", "label issue", "outlier"):
        summary["agreed"][kind] = sum(1 for e in agreed if e["kind"] == kind)
    if len(audits) > 1:
        lines += ["", f"Findings agreed by several backbones ({len(agreed)}):" if agreed else
                  "No finding is agreed by several backbones.", ""]
        lines += [f"- {e['kind']}: {', '.join(f'`{p}`' for p in e['paths'])}"
                  f"{' (' + e['detail'] + ')' if e['detail'] else ''}: agreed by {len(e['backbones'])} backbones"
                  for e in agreed[:40]]
        if len(agreed) > 40:
            lines.append(f"- ... and {len(agreed) - 40} more (audit.json of each backbone)")
    note = ("Dataset audit: " + "; ".join(
        f"{bb} {a['counts']['duplicate_groups']} near-duplicate group(s), {a['counts']['leakage_groups']} across "
        f"splits, {a['counts']['label_issues']} likely label error(s), {a['counts']['outliers']} outlier(s)"
        for bb, a in audits.items()) + (f"; {len(agreed)} finding(s) agreed by several backbones" if len(audits) > 1
                                        else "") + " (section Dataset audit below)")
    return lines, summary, [note]


def write_summary(out_dir: Path, summary: Mapping[str, Any], markdown: str) -> None:
    """Write summary.json, summary.md, comparison.json and comparison.png into `out_dir`, atomically."""
    points = comparison_points(summary)
    write_json(out_dir / "summary.json", summary)
    write_json(out_dir / "comparison.json", points)
    write_comparison_png(points, out_dir / "comparison.png", primary_metric=summary["primary_metric"])
    write_text(out_dir / "summary.md", markdown)


# ----------------------------------------------------------------------------------------- main
def collect_rows(reports_dir: Path, backbones: Sequence[str], *,
                 finetune_backbones: Sequence[str] = ()) -> Collected:
    """Rows for every backbone in params order, then one per fine-tuned backbone; few-shot curves; notes."""
    collected = Collected()
    notes = collected.notes
    probe_rows: dict[str, Row] = {}
    for backbone in backbones:
        reports = read_backbone_reports(reports_dir, backbone, notes)
        rows = backbone_rows(reports, notes)
        probe_rows[backbone] = rows[0]
        collected.rows += rows
        collected.few_shot[backbone] = few_shot_curve(reports.metrics)
        notes += report_notes(backbone, reports.metrics, str(reports_dir / backbone / "metrics.json"))
    for backbone in finetune_backbones:
        reports = read_finetune_reports(reports_dir, backbone, notes)
        collected.rows.append(finetune_row(reports, probe_row=probe_rows.get(backbone), notes=notes))
        notes += report_notes(f"{backbone} fine-tune", reports.metrics,
                              str(reports_dir / "finetune" / backbone / "metrics.json"))
    quarantine = reports_dir / "prepare" / "quarantine.json"  # prepare's list of files that are not usable images
    if quarantine.is_file():
        n_bad = read_stage_report(quarantine, "prepare", ("n_bad",))["n_bad"]
        if n_bad:
            notes.append(f"Quarantined images: {n_bad} (see {quarantine})")
    return collected


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--reports", type=Path, default=Path("reports"),
                        help="directory of the per-backbone stage reports")
    parser.add_argument("--out", type=Path, default=Path("summary"),
                        help="directory for summary.md/.json and comparison.json/.png")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--raw", type=Path, default=Path("data/raw"),
                        help="the images, for the thumbnails of misclassified and audited images")
    parser.add_argument("--manifest", type=Path, default=Path("data/prepared/manifest.csv"),
                        help="the prepare stage's manifest: each image's sha256 keys its cached thumbnail")
    parser.add_argument("--thumbs", type=Path, default=None,
                        help="thumbnail cache (default: <out>/thumbs; a memo, gitignored, not a DVC output)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        params = load_params(args.params)
        collected = collect_rows(args.reports, params.backbones, finetune_backbones=params.finetune.backbones)
        audit_lines, audit_summary, audit_note = render_audit(args.reports, params.backbones)  # audit@<bb>
        collected.notes += audit_note
        summary = build_summary(collected, primary_metric=params.report.primary_metric)
        if audit_summary:
            summary["audit"] = audit_summary
        markdown = render_markdown(summary, notes=collected.notes)
        markdown += "\n".join(audit_lines + [""]) if audit_lines else ""
        write_summary(args.out, summary, markdown)
        inputs = PageInputs(reports=args.reports, raw=args.raw, page_dir=args.out,
                            thumbs=args.thumbs or args.out / "thumbs", manifest=args.manifest, params=args.params)
        write_page(args.out / "report.html",
                   render_page(summary, inputs, backbones=params.backbones, notes=collected.notes))
    except (ReportError, ParamError, OSError) as exc:
        print(f"report: {exc}", file=sys.stderr)
        try:  # the page says why instead of showing the last run's numbers as if they were current
            write_page(args.out / "report.html", render_error_page(f"report: {exc}"))
        except OSError:
            pass
        return 1
    logger.info("%d rows on held-out %s; best %s (%s = %s); wrote %s (page: %s)",
                len(summary["rows"]), summary["heldout_split"], summary["best"], summary["primary_metric"],
                summary["best_value"], args.out, args.out / "report.html")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
