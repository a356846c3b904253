"""Gathering for the report stage (stages/report.py): read the per-backbone stage reports under reports/, turn them
into comparison rows and build summary.json's object (the best row, each row's paired test against it, few-shot
curves); also the dataset audit's findings across backbones. Nothing here renders: summary.md and comparison.png
are stages/report_markdown.py's, report.html is stages/report_html.py's.

Every accuracy is on the held-out split (stages/evaluation.py), which chose nothing; rows are compared on the same
held-out images by McNemar's exact test where per-image predictions exist.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.evaluation import ALPHA, Predictions, paired_comparison, read_predictions
from stages.io import read_json
from stages.metrics import accuracy_interval
from stages.params import PRIMARY_METRICS

PRIMARY_KEYS = {"heldout.accuracy": "heldout.accuracy", "heldout.mean_class_accuracy": "mean_class_accuracy",
                "heldout.macro_f1": "macro_f1"}
assert set(PRIMARY_KEYS) == set(PRIMARY_METRICS)
ROW_METRICS = ("mean_class_accuracy", "macro_f1", "ece", "log_loss",  # held-out, beside "heldout"
               "ece_calibrated", "log_loss_calibrated")  # the head's probe after temperature scaling, when applied
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


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def first_number(obj: Mapping[str, Any], *keys: str) -> Any:
    return next((obj[key] for key in keys if is_number(obj.get(key))), None)


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
    if not (is_number(low) and is_number(high)):
        low = high = None
        if is_number(n):
            correct = heldout["correct"] if is_number(heldout.get("correct")) else round(accuracy * n)
            low, high = accuracy_interval(int(correct), int(n))
    block = {"accuracy": accuracy, "accuracy_ci_low": low, "accuracy_ci_high": high, "n": n}
    return {key: value for key, value in block.items() if value is not None}


def _heldout_columns(heldout: Mapping[str, Any], split: str) -> dict[str, Any]:
    columns: dict[str, Any] = {"heldout_split": split, "heldout": heldout_interval(heldout)}
    columns.update({key: heldout[key] for key in ROW_METRICS if is_number(heldout.get(key))})
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
    accuracy = first_number(selection, *accuracy_keys)
    if accuracy is not None:
        out["accuracy"] = accuracy
    return out or None


def _own_selection(selection: Any, entry: Mapping[str, Any]) -> dict[str, Any] | None:
    """The probe's selection (method, folds, split, n) with `entry`'s own selection accuracy (k-NN, a feature set)."""
    out = {k: v for k, v in (_selection(selection) or {}).items() if k != "accuracy"}
    accuracy = first_number(entry, "cv_accuracy", "selection_accuracy")
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
    if not is_number(expected) and is_number(heldout.get("n")):
        expected = round(heldout["accuracy"] * heldout["n"])
    if predictions.split != heldout.get("split", predictions.split) or \
            (is_number(heldout.get("n")) and heldout["n"] != len(predictions.labels)) or \
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
                 {"head": metrics.get("head"), "C": metrics.get("C") if is_number(metrics.get("C")) else None,
                  "layers": chosen_layers, "normalization": metrics.get("normalization"),
                  "class_weight": metrics.get("class_weight"),
                  "temperature": get_dotted(metrics, "calibration.temperature"),
                  "train_seconds": metrics.get("train_seconds") if is_number(metrics.get("train_seconds")) else None},
                 _selection(metrics.get("selection")), metrics["feature_dim"], "probe")]
    knn = metrics.get("knn")
    if isinstance(knn, Mapping) and is_number(get_dotted(knn, "heldout.accuracy")):
        rows.append(make(f"{bb} k-NN", "k-NN", knn["heldout"],
                         {"k": knn.get("k"), "layers": _layers(knn.get("layers")) or chosen_layers},
                         _own_selection(metrics.get("selection"), knn), None, "knn"))
    feature_sets = [entry for entry in metrics.get("feature_sets") or []
                    if isinstance(entry, Mapping) and _layers(entry.get("layers"))
                    and is_number(get_dotted(entry, "heldout.accuracy"))]
    if len(feature_sets) > 1:
        for entry in feature_sets:
            layers = _layers(entry["layers"])
            head = entry.get("head") or entry.get("kind") or metrics.get("head")
            rows.append(make(f"{bb} @{layers}", "layers (chosen)" if layers == chosen_layers else "layers",
                             entry["heldout"],
                             {"head": head, "C": entry.get("C") if is_number(entry.get("C")) else None,
                              "layers": layers, "normalization": entry.get("normalization"),
                              "class_weight": entry.get("class_weight")},
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
        different = all(is_number(side.get(k)) for side in (finetune, probe) for k in INTERVAL_KEYS) and (
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
        if is_number(metrics.get(key)):
            data[key] = metrics[key]
    data["weights"] = _weights_summary(reports.weights)
    predictions, key = _paired_source(reports.predictions, "finetune", {"split": split, **metrics["heldout"]},
                                      row=name, source=source, notes=notes)

    # its own probe: the fine-tune stage's probe_heldout; else the head's probe when it was held out on the same split
    probe_heldout = metrics.get("probe_heldout")
    if isinstance(probe_heldout, Mapping) and is_number(probe_heldout.get("accuracy")):
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
        if isinstance(point, Mapping) and "shots" in point and is_number(point.get("mean")):
            points.append({key: point[key] for key in ("shots", "draws", "mean", "std", "min", "max")
                           if key == "shots" or is_number(point.get(key))})
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
        return value if is_number(value) else -math.inf

    scored = [(-primary_value(row, primary_metric), -score(get_dotted(row, tie_key)), name)
              for name, row in rows.items() if is_number(primary_value(row, primary_metric))]
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


# --------------------------------------------------------------------------------------------- collect
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


# ------------------------------------------------------------------------------------------- audit
AUDIT_REQUIRED = ("counts", "duplicates", "label_issues", "outliers")
AUDIT_KINDS = ("near-duplicates", "leakage", "label issue", "outlier")


def read_audits(reports_dir: Path, backbones: Sequence[str]) -> dict[str, dict[str, Any]]:
    """{backbone: reports/<bb>/audit.json} (written by audit@<bb>, stages/audit.py) for the backbones that have one."""
    audits = {}
    for backbone in backbones:
        path = reports_dir / backbone / "audit.json"
        if path.is_file():
            audits[backbone] = read_stage_report(path, f"audit@{backbone}", AUDIT_REQUIRED)
    return audits


def agreed_findings(audits: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Findings (kind + its set of paths) that several backbones flag: [{"kind", "paths", "detail", "backbones"}],
    most backbones first, then by kind and paths."""
    flagged: dict[tuple[str, frozenset[str]], dict[str, Any]] = {}
    for backbone, audit in audits.items():
        findings = ([("leakage" if g["cross_split"] else "near-duplicates", g["paths"], "") for g in audit["duplicates"]]
                    + [("label issue", [f["path"]], f"{f['given']} -> {f['suggested']}") for f in audit["label_issues"]]
                    + [("outlier", [f["path"]], f["class"]) for f in audit["outliers"]])
        for kind, paths, detail in findings:
            entry = flagged.setdefault((kind, frozenset(paths)), {"kind": kind, "paths": sorted(paths),
                                                                  "detail": detail, "backbones": []})
            entry["backbones"].append(backbone)
    return sorted((e for e in flagged.values() if len(e["backbones"]) > 1),
                  key=lambda e: (-len(e["backbones"]), e["kind"], e["paths"]))


def audit_summary(audits: Mapping[str, Mapping[str, Any]], agreed: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """summary.json's "audit" object: each backbone's counts (and flagged fraction), agreed findings per kind."""
    summary: dict[str, Any] = {"backbones": {}, "agreed": {}}
    for backbone, audit in audits.items():
        summary["backbones"][backbone] = {**audit["counts"], "flagged_fraction": audit.get("flagged_fraction")}
    for kind in AUDIT_KINDS:
        summary["agreed"][kind] = sum(1 for e in agreed if e["kind"] == kind)
    return summary
