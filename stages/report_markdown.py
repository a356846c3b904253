"""Rendering for the report stage (stages/report.py): summary.md (what was held out and how choices were made, the
comparison table with the best row in bold and ≈ marks, notes, few-shot tables, fine-tune verdicts, the dataset
audit) and comparison.png, from the summary object stages/report_summary.py builds. The HTML page is
stages/report_html.py's.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stages.io import atomic_path
from stages.report_summary import INTERVAL_KEYS, get_dotted, is_number

TEXT_COLUMNS = frozenset({"Row", "Kind", "Choice", "Weights"})


def _fmt(value: Any, digits: int = 3) -> str:
    """A table cell: "-" for None, ints as they are, floats to `digits` places."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def format_accuracy(block: Mapping[str, Any] | None) -> str:
    """"0.948 [0.900, 0.973]": an accuracy with its 95% interval (the interval omitted when unknown)."""
    if not block or not is_number(block.get("accuracy")):
        return "-"
    if all(is_number(block.get(key)) for key in INTERVAL_KEYS):
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
                 row.get("normalization"), "balanced class weights" if row.get("class_weight") == "balanced" else None]
    return ", ".join(str(p) for p in parts if p) or "-"


def _selection_cell(row: Mapping[str, Any]) -> str:
    selection = row.get("selection") or {}
    if not is_number(selection.get("accuracy")):
        return "-"
    return f"{selection['accuracy']:.3f} ({selection['method']})" if "method" in selection \
        else f"{selection['accuracy']:.3f}"


def _vs_best_cell(name: str, row: Mapping[str, Any], best: str, testable: bool) -> str:
    if name == best:
        return "best"
    if not testable or not is_number(row.get("vs_best_p")):
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
    what = "Each probe's head, C, class weight, layers and normalization, and the k of k-NN, were chosen"
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
                  f"split describes the results; it chose nothing reported here."
                  + (" ECE a → b: before → after the probe's temperature scaling (head.calibration; the exported "
                     "classifier outputs the calibrated probabilities)."
                     if any("ece_calibrated" in row for row in rows.values()) else ""), ""]
    return lines


def ece_cell(row: Mapping[str, Any]) -> str:
    """The row's held-out ECE, and "-> after" where the head's temperature scaling calibrated its probabilities."""
    after = row.get("ece_calibrated")
    return _fmt(row.get("ece")) + (f" → {_fmt(after)}" if after is not None else "")


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
                 _fmt(row.get("mean_class_accuracy")), ece_cell(row), _choice(row), _selection_cell(row),
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
            if draws == 1 or not is_number(point.get("std")):
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
    if is_number(seconds):
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
        yerr = [[accuracy - low], [high - accuracy]] if is_number(low) and is_number(high) else None
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


def audit_lines(audits: Mapping[str, Mapping[str, Any]], agreed: Sequence[Mapping[str, Any]]) -> list[str]:
    """The "## Dataset audit" section of summary.md: counts per kind per backbone, then the findings several
    backbones agree on (at most 40; when more than one backbone was audited)."""
    lines = ["", "## Dataset audit", "",
             "From the cached features of each backbone (`reports/<backbone>/audit.json`, `audit.csv`, contact sheets "
             "in `reports/<backbone>/audit/*.png`). Nothing in data/ was changed.", "",
             "| Backbone | Near-duplicate groups (images) | Leakage groups (pairs) | Likely label errors | Outliers | "
             "Flagged images | Dropped from held-out |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for backbone, audit in audits.items():
        c = audit["counts"]
        skipped = audit.get("label_check", {}).get("status") == "skipped"
        lines.append(f"| {backbone} | {c['duplicate_groups']} ({c['duplicate_images']}) | {c['leakage_groups']} "
                     f"({c['leakage_pairs']}) | {'skipped' if skipped else c['label_issues']} | {c['outliers']} | "
                     f"{c['flagged_images']} ({100 * audit.get('flagged_fraction', 0):.1f}%) | "
                     f"{c.get('dropped_from_heldout', 0)} |")
    if len(audits) > 1:
        lines += ["", f"Findings agreed by several backbones ({len(agreed)}):" if agreed else
                  "No finding is agreed by several backbones.", ""]
        lines += [f"- {e['kind']}: {', '.join(f'`{p}`' for p in e['paths'])}"
                  f"{' (' + e['detail'] + ')' if e['detail'] else ''}: agreed by {len(e['backbones'])} backbones"
                  for e in agreed[:40]]
        if len(agreed) > 40:
            lines.append(f"- ... and {len(agreed) - 40} more (audit.json of each backbone)")
    return lines


def audit_note(audits: Mapping[str, Mapping[str, Any]], agreed: Sequence[Mapping[str, Any]]) -> str:
    """The one-line audit note for the top of summary.md."""
    return ("Dataset audit: " + "; ".join(
        f"{bb} {a['counts']['duplicate_groups']} near-duplicate group(s), {a['counts']['leakage_groups']} across "
        f"splits, {a['counts']['label_issues']} likely label error(s), {a['counts']['outliers']} outlier(s)"
        for bb, a in audits.items()) + (f"; {len(agreed)} finding(s) agreed by several backbones" if len(audits) > 1
                                        else "") + " (section Dataset audit below)")
