"""Report stage: one comparison of every backbone (per probed layer, and the fine-tune) and what it cost.

Reads the per-backbone reports the other stages write (file -> stage that writes it):

    reports/<bb>/metrics.json   head@<bb>     val/test accuracy, mean per-class accuracy, ECE, feature dim, head seconds
    reports/<bb>/extract.json   extract@<bb>  images, seconds, images/s of the feature extraction
    reports/<bb>/weights.json   weights@<bb>  sha256 and verification level of the weight file
    reports/<bb>/layers.json    head@<bb>     optional: per-layer probe table (head.layers: all)
    reports/finetune/<bb>/metrics.json  finetune@<bb>  for each of finetune.backbones: same keys as the head
    reports/prepare/quarantine.json     prepare       optional: files that are not usable images (a note, when any)

and writes to `--out` (summary/; outside reports/ because DVC forbids an output inside a dependency):

    summary.md       the table, the best row marked by report.primary_metric, deltas vs git HEAD
    summary.json     DVC metrics: {"primary_metric", "best", "best_value", "rows": {row: {...}}}
    comparison.json  DVC plot: accuracy vs extraction cost, one record per row with an extraction
    comparison.png   the same plot rendered with matplotlib (Agg, offline)

Deltas are computed against `summary.json` as committed at git HEAD (`git show HEAD:./summary.json`),
the baseline that `dvc metrics diff` uses too; without git or without a committed summary there are none.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import sys
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.io import atomic_path, read_json, setup_logging, write_json, write_text
from stages.params import ParamError, load_params

logger = logging.getLogger(__name__)

SPLIT_METRICS = ("accuracy", "mean_class_accuracy", "macro_f1", "log_loss", "ece")
# Required keys of each per-backbone report, by file name: (stage prefix, dotted keys).
REQUIRED = {
    "metrics.json": ("head", ("val.accuracy", "val.mean_class_accuracy", "val.ece", "feature_dim",
                              "train_seconds")),
    "extract.json": ("extract", ("images", "seconds", "images_per_second")),
    "weights.json": ("weights", ("sha256", "verification")),
}
FINETUNE_REQUIRED = ("val.accuracy",)
SHA256_PREFIX = 12
TEXT_COLUMNS = frozenset({"Row", "Kind", "Head", "Device", "Weights sha256", "Verification"})


class ReportError(RuntimeError):
    """A per-stage report is missing, unreadable or lacks a key the summary needs."""


@dataclass(frozen=True)
class BackboneReports:
    """The parsed JSON reports of one backbone; `layers` is None unless layers were probed."""
    backbone: str
    metrics: dict[str, Any]
    extract: dict[str, Any]
    weights: dict[str, Any]
    layers: Any = None


@dataclass(frozen=True)
class Delta:
    """One changed metric, as `dvc metrics diff` shows it; None where a side has no value."""
    row: str
    metric: str
    old: float | None
    new: float | None

    @property
    def change(self) -> float | None:
        return None if self.old is None or self.new is None else self.new - self.old


def get_dotted(obj: Any, dotted: str) -> Any:
    """`obj["a"]["b"]` for "a.b"; None when any part is missing."""
    for part in dotted.split("."):
        if not isinstance(obj, Mapping) or part not in obj:
            return None
        obj = obj[part]
    return obj


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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


def read_backbone_reports(reports_dir: Path, backbone: str) -> BackboneReports:
    """Read reports/<bb>/{metrics,extract,weights}.json and, when present, layers.json."""
    parsed = {}
    for name, (stage, required) in REQUIRED.items():
        parsed[name] = read_stage_report(reports_dir / backbone / name, f"{stage}@{backbone}", required)
    layers_path = reports_dir / backbone / "layers.json"
    layers = None
    if layers_path.is_file():
        try:
            layers = read_json(layers_path)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ReportError(f"{layers_path} is not valid JSON ({exc}); "
                              f"re-run `dvc repro --force head@{backbone}`.") from None
    return BackboneReports(backbone, parsed["metrics.json"], parsed["extract.json"],
                           parsed["weights.json"], layers)


def read_finetune_report(reports_dir: Path, backbone: str) -> dict[str, Any]:
    """reports/finetune/<bb>/metrics.json, written by the optional finetune@<bb> stage."""
    return read_stage_report(reports_dir / "finetune" / backbone / "metrics.json", f"finetune@{backbone}",
                             FINETUNE_REQUIRED)


def read_baseline_summary(summary_path: Path, *, rev: str = "HEAD") -> tuple[dict[str, Any] | None, str]:
    """The summary.json committed at git `rev`, read with `git show`; (None, why) when there is none.

    Runs git in the summary's directory (created if missing), so the repository root does not matter.
    """
    summary_path = Path(summary_path)
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    spec = f"{rev}:./{summary_path.name}"
    try:
        result = subprocess.run(["git", "show", spec], cwd=summary_path.parent, capture_output=True,
                                text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"git is not available ({exc})"
    if result.returncode != 0:
        if "not a git repository" in result.stderr:
            return None, f"{summary_path.parent} is not in a git repository"
        return None, f"no {summary_path} at git {rev}"
    try:
        baseline = json.loads(result.stdout)
    except json.JSONDecodeError as exc:
        logger.warning("%s at git %s is not valid JSON (%s); no deltas", summary_path, rev, exc)
        return None, f"{summary_path} at git {rev} is not valid JSON"
    if not isinstance(baseline, dict) or not isinstance(baseline.get("rows"), dict):
        return None, f"{summary_path} at git {rev} has no 'rows'"
    return baseline, f"{summary_path} at git {rev}"


# ------------------------------------------------------------------------------------------ compute
def _split_metrics(split: Any) -> dict[str, Any] | None:
    if not isinstance(split, Mapping) or not _is_number(split.get("accuracy")):
        return None
    return {key: split[key] for key in SPLIT_METRICS if _is_number(split.get(key))}


def _extract_cost(extract: Mapping[str, Any]) -> dict[str, Any]:
    images, seconds = extract["images"], extract["seconds"]
    cost = {"images": images, "seconds": seconds, "images_per_second": extract["images_per_second"],
            "seconds_per_1000_images": round(1000.0 * seconds / images, 4) if images else None}
    for key in ("device", "precision"):
        if key in extract:
            cost[key] = extract[key]
    return cost


def _weights_summary(weights: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not weights:
        return None
    return {"sha256": str(weights["sha256"])[:SHA256_PREFIX], "verification": weights["verification"]}


def _row(*, backbone: str, kind: str, layer: Any, head: Any, C: Any, val: Any, test: Any,
         feature_dim: Any, extract: Mapping[str, Any] | None, head_seconds: Any,
         weights: Mapping[str, Any] | None) -> dict[str, Any]:
    row: dict[str, Any] = {"backbone": backbone, "kind": kind, "layer": layer, "head": head}
    if _is_number(C):
        row["C"] = C
    row["val"] = _split_metrics(val)
    test_metrics = _split_metrics(test)
    if test_metrics:
        row["test"] = test_metrics
    row["feature_dim"] = feature_dim
    row["extract"] = _extract_cost(extract) if extract else None
    row["head_seconds"] = head_seconds
    row["weights"] = _weights_summary(weights)
    return {key: value for key, value in row.items() if value is not None}


def layer_entries(layers: Any) -> list[dict[str, Any]]:
    """Normalise a layers.json table to a list of {"layer": name, "val": {...}, ...}.

    Accepted shapes: a list of objects with "layer"; an object {layer: {...}}; either under "layers".
    """
    if isinstance(layers, Mapping) and "layers" in layers:
        layers = layers["layers"]
    if isinstance(layers, Mapping):
        layers = [{"layer": name, **entry} for name, entry in layers.items() if isinstance(entry, Mapping)]
    if not isinstance(layers, list):
        return []
    return [entry for entry in layers
            if isinstance(entry, Mapping) and "layer" in entry
            and _is_number(get_dotted(entry, "val.accuracy"))]


def backbone_rows(reports: BackboneReports) -> dict[str, dict[str, Any]]:
    """Rows for one backbone: the head's layer as `<bb>`, each other probed layer as `<bb>:<layer>`."""
    metrics = reports.metrics
    layer = metrics.get("layer", "pool")
    rows = {reports.backbone: _row(
        backbone=reports.backbone, kind="probe", layer=layer, head=metrics.get("head"),
        C=metrics.get("C"), val=metrics["val"], test=metrics.get("test"),
        feature_dim=metrics["feature_dim"], extract=reports.extract,
        head_seconds=metrics["train_seconds"], weights=reports.weights)}
    for entry in layer_entries(reports.layers):
        if entry["layer"] == layer:
            continue
        rows[f"{reports.backbone}:{entry['layer']}"] = _row(
            backbone=reports.backbone, kind="probe", layer=entry["layer"],
            head=entry.get("head", metrics.get("head")), C=entry.get("C"), val=entry["val"],
            test=entry.get("test"), feature_dim=entry.get("feature_dim"), extract=reports.extract,
            head_seconds=entry.get("train_seconds"), weights=reports.weights)
    return rows


def finetune_row(metrics: Mapping[str, Any], *, backbone: str,
                 weights: Mapping[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """The fine-tune row `finetune:<bb>`; it has no extraction (the backbone is trained end to end)."""
    seconds = next((metrics[k] for k in ("train_seconds", "seconds") if _is_number(metrics.get(k))), None)
    kind = f"finetune ({metrics['regime']})" if metrics.get("regime") else "finetune"
    return f"finetune:{backbone}", _row(
        backbone=backbone, kind=kind, layer=metrics.get("layer"), head=metrics.get("head"),
        C=None, val=metrics["val"], test=metrics.get("test"), feature_dim=metrics.get("feature_dim"),
        extract=None, head_seconds=seconds, weights=weights)


def report_notes(name: str, metrics: Mapping[str, Any], source: str) -> list[str]:
    """Warnings a user must act on, carried over from a head or fine-tune metrics.json."""
    notes = []
    warnings = metrics.get("warnings")
    if isinstance(warnings, list) and warnings:
        notes.append(f"{name}: {len(warnings)} warning(s) from the head, e.g. {str(warnings[0])!r} "
                     f"(all in {source})")
    if isinstance(metrics.get("note"), str):
        notes.append(f"{name}: {metrics['note']}")
    return notes


def pick_best(rows: Mapping[str, Mapping[str, Any]], primary_metric: str) -> str:
    """The row with the highest `primary_metric` (all allowed ones are higher-is-better); first on ties."""
    scored = [(value, name) for name, row in rows.items()
              if _is_number(value := get_dotted(row, primary_metric))]
    if not scored:
        hint = (" Test metrics exist only when the test split is non-empty: set prepare.test_fraction > 0 "
                "or use `primary_metric: val.accuracy`." if primary_metric.startswith("test.") else "")
        raise ReportError(f"report.primary_metric is {primary_metric!r} but no row has that metric "
                          f"(rows: {', '.join(rows)}).{hint} Edit params.yaml.")
    best_value = max(value for value, _ in scored)
    return next(name for value, name in scored if value == best_value)


def build_summary(rows: Mapping[str, dict[str, Any]], *, primary_metric: str) -> dict[str, Any]:
    """The summary.json object: primary metric, best row and its value, and the rows in order."""
    best = pick_best(rows, primary_metric)
    return {"primary_metric": primary_metric, "best": best,
            "best_value": get_dotted(rows[best], primary_metric), "rows": dict(rows)}


def flatten_numbers(obj: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested mapping under dotted keys, as `dvc metrics diff` flattens them."""
    flat: dict[str, float] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_numbers(value, f"{name}."))
        elif _is_number(value):
            flat[name] = value
    return flat


def diff_summaries(baseline: Mapping[str, Any] | None, summary: Mapping[str, Any]) -> list[Delta]:
    """Every numeric row metric that differs from the baseline (added or removed ones too)."""
    if not baseline:
        return []
    old_rows, new_rows = baseline.get("rows", {}), summary["rows"]
    deltas = []
    for row in list(new_rows) + [r for r in old_rows if r not in new_rows]:
        old = flatten_numbers(old_rows.get(row) or {})
        new = flatten_numbers(new_rows.get(row) or {})
        for metric in list(new) + [m for m in old if m not in new]:
            if old.get(metric) != new.get(metric):
                deltas.append(Delta(row, metric, old.get(metric), new.get(metric)))
    return deltas


def comparison_points(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """DVC plot records, accuracy vs extraction cost, one per row that has an extraction."""
    points = []
    for name, row in summary["rows"].items():
        extract = row.get("extract")
        if not extract or extract.get("seconds_per_1000_images") is None:
            continue
        point = {"row": name, "backbone": row["backbone"], "layer": row.get("layer"),
                 "seconds_per_1000_images": extract["seconds_per_1000_images"],
                 "images_per_second": extract["images_per_second"],
                 "val_accuracy": row["val"]["accuracy"]}
        if "test" in row:
            point["test_accuracy"] = row["test"]["accuracy"]
        point["best"] = name == summary["best"]
        points.append(point)
    return points


# --------------------------------------------------------------------------------------- render
def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def _signed(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:+.{digits}f}"


def render_markdown(summary: Mapping[str, Any], deltas: Sequence[Delta], *,
                    baseline: str | None, baseline_rows: Collection[str] | None = None,
                    no_baseline_reason: str = "", rev: str = "HEAD", notes: Sequence[str] = (),
                    plot_name: str = "comparison.png") -> str:
    """summary.md: the comparison table (best row in bold), notes, then the changes vs `rev`.

    `baseline` describes where the baseline came from (None: no baseline). Rows added or removed since
    it (`baseline_rows`: its row names) get one line each instead of one per metric.
    """
    primary, rows = summary["primary_metric"], summary["rows"]
    has_test = any("test" in row for row in rows.values())
    delta_of = {(d.row, d.metric): d for d in deltas}
    columns = ["Row", "Kind", "Head", "C", "val acc", "val mean-class acc", "val ECE"]
    if has_test:
        columns += ["test acc", "test mean-class acc", "test ECE"]
    columns += ["Feature dim", "Extract img/s", "Extract s", "s / 1000 img", "Device", "Head s",
                "Weights sha256", "Verification"]
    if baseline:
        columns.append(f"Δ {primary} vs {rev}")
    lines = [
        "# Backbone comparison", "",
        f"Primary metric `{primary}` (params `report.primary_metric`); best: "
        f"**{summary['best']}** ({primary} = {_fmt(summary['best_value'])}).", "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join(" --- " if c in TEXT_COLUMNS else " ---: " for c in columns) + "|",
    ]
    for name, row in rows.items():
        extract, weights = row.get("extract") or {}, row.get("weights") or {}
        label = f"**{name}** (best)" if name == summary["best"] else name
        cells = [label, row.get("kind"), row.get("head"), f"{row['C']:g}" if "C" in row else "-"]
        for split in (("val", "test") if has_test else ("val",)):
            metrics = row.get(split) or {}
            cells += [_fmt(metrics.get("accuracy")), _fmt(metrics.get("mean_class_accuracy")),
                      _fmt(metrics.get("ece"))]
        cells += [_fmt(row.get("feature_dim")), _fmt(extract.get("images_per_second"), 1),
                  _fmt(extract.get("seconds"), 2), _fmt(extract.get("seconds_per_1000_images"), 2),
                  _fmt(extract.get("device")), _fmt(row.get("head_seconds"), 2),
                  f"`{weights['sha256']}`" if weights else "-", _fmt(weights.get("verification"))]
        if baseline:
            delta = delta_of.get((name, primary))
            if delta is None:
                cells.append("0" if _is_number(get_dotted(row, primary)) else "-")
            else:
                cells.append("new" if delta.old is None else _signed(delta.change))
        lines.append("| " + " | ".join(str(c) if c is not None else "-" for c in cells) + " |")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in notes]
    lines += ["", f"![Accuracy vs extraction cost]({plot_name})", "", f"## Changes vs {rev}", ""]
    if not baseline:
        lines.append(f"No baseline ({no_baseline_reason}); commit summary/summary.json to compare the "
                     f"next run with this one.")
    elif not deltas:
        lines.append(f"No metric changed (baseline: {baseline}).")
    else:
        lines += [f"Baseline: {baseline}. Changed metrics, as `dvc metrics diff` shows them:", "",
                  f"| Row | Metric | {rev} | workspace | Change |", "| --- | --- | ---: | ---: | ---: |"]
        old_rows = set(rows) if baseline_rows is None else set(baseline_rows)
        listed = set()
        for d in deltas:
            added, removed = d.row not in old_rows, d.row not in rows
            if not (added or removed):
                lines.append(f"| {d.row} | {d.metric} | {_fmt(d.old)} | {_fmt(d.new)} | {_signed(d.change)} |")
            elif d.row not in listed:
                listed.add(d.row)
                lines.append(f"| {d.row} | (row added) | - | {primary} {_fmt(get_dotted(rows[d.row], primary))} | - |"
                             if added else f"| {d.row} | (row removed) | - | - | - |")
    return "\n".join(lines) + "\n"


def write_comparison_png(points: Sequence[Mapping[str, Any]], path: Path, *, primary_metric: str) -> None:
    """Scatter of val accuracy vs extraction seconds per 1000 images, rows labelled, best starred."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state, no display needed

    figure = Figure(figsize=(7, 4.5), dpi=100, layout="constrained")
    axes = figure.subplots()
    xs = [point["seconds_per_1000_images"] for point in points]
    middle = (min(xs) + max(xs)) / 2 if xs else 0.0
    for point in points:
        best = point["best"]
        right_half = len(points) > 1 and point["seconds_per_1000_images"] > middle
        axes.scatter(point["seconds_per_1000_images"], point["val_accuracy"],
                     marker="*" if best else "o", s=180 if best else 50,
                     color="tab:red" if best else "tab:blue", zorder=3)
        axes.annotate(point["row"] + (" (best)" if best else ""),
                      (point["seconds_per_1000_images"], point["val_accuracy"]),
                      textcoords="offset points", xytext=(-6 if right_half else 6, 4),
                      ha="right" if right_half else "left", fontsize=8)
    axes.set_xlabel("feature extraction: seconds per 1000 images")
    axes.set_ylabel("validation accuracy")
    axes.set_title(f"Accuracy vs extraction cost (best by {primary_metric})")
    axes.grid(True, alpha=0.3)
    axes.margins(x=0.25, y=0.15)
    with atomic_path(path, suffix=".png") as tmp:
        figure.savefig(tmp, format="png", metadata={"Software": None})


def write_summary(out_dir: Path, summary: Mapping[str, Any], markdown: str) -> None:
    """Write summary.json, summary.md, comparison.json and comparison.png into `out_dir`, atomically."""
    points = comparison_points(summary)
    write_json(out_dir / "summary.json", summary)
    write_json(out_dir / "comparison.json", points)
    write_comparison_png(points, out_dir / "comparison.png", primary_metric=summary["primary_metric"])
    write_text(out_dir / "summary.md", markdown)


# ----------------------------------------------------------------------------------------- main
def collect_rows(reports_dir: Path, backbones: Sequence[str], *,
                 finetune_backbones: Sequence[str] = ()) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """(rows for every backbone in params order, then one per fine-tuned backbone; notes)."""
    rows: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    weights_by_backbone = {}
    for backbone in backbones:
        reports = read_backbone_reports(reports_dir, backbone)
        weights_by_backbone[backbone] = reports.weights
        rows.update(backbone_rows(reports))
        notes += report_notes(backbone, reports.metrics, str(reports_dir / backbone / "metrics.json"))
    for backbone in finetune_backbones:
        finetune = read_finetune_report(reports_dir, backbone)
        weights = weights_by_backbone.get(backbone)
        if weights is None:  # fine-tuned but not probed: its weights report is still there to cite
            weights = read_stage_report(reports_dir / backbone / "weights.json", f"weights@{backbone}",
                                        REQUIRED["weights.json"][1])
        name, row = finetune_row(finetune, backbone=backbone, weights=weights)
        rows[name] = row
        notes += report_notes(name, finetune, str(reports_dir / "finetune" / backbone / "metrics.json"))
    quarantine = reports_dir / "prepare" / "quarantine.json"  # prepare's list of files that are not usable images
    if quarantine.is_file():
        n_bad = read_stage_report(quarantine, "prepare", ("n_bad",))["n_bad"]
        if n_bad:
            notes.append(f"Quarantined images: {n_bad} (see {quarantine})")
    return rows, notes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--reports", type=Path, default=Path("reports"),
                        help="directory of the per-backbone stage reports")
    parser.add_argument("--out", type=Path, default=Path("summary"),
                        help="directory for summary.md/.json and comparison.json/.png")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--baseline-rev", default="HEAD",
                        help="git revision whose committed summary.json the deltas compare against")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        params = load_params(args.params)
        rows, notes = collect_rows(args.reports, params.backbones, finetune_backbones=params.finetune.backbones)
        summary = build_summary(rows, primary_metric=params.report.primary_metric)
        baseline, why = read_baseline_summary(args.out / "summary.json", rev=args.baseline_rev)
        deltas = diff_summaries(baseline, summary)
        markdown = render_markdown(summary, deltas, baseline=why if baseline else None,
                                   baseline_rows=list(baseline["rows"]) if baseline else None,
                                   no_baseline_reason=why, rev=args.baseline_rev, notes=notes)
        write_summary(args.out, summary, markdown)
    except (ReportError, ParamError, OSError) as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 1
    logger.info("%d rows; best %s (%s = %s); %d changed metrics vs %s; wrote %s", len(rows),
                summary["best"], summary["primary_metric"], summary["best_value"], len(deltas),
                args.baseline_rev, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
