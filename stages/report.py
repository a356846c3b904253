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

Code: this module reads, builds and writes in that order; stages/report_summary.py gathers (reads the stage reports,
builds the rows and summary.json's object), stages/report_markdown.py renders summary.md and comparison.png, and
stages/report_html.py renders the page.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stages.io import setup_logging, write_json, write_text
from stages.params import ParamError, load_params
from stages.report_html import PageInputs, render_error_page, render_page, write_page
from stages.report_markdown import audit_lines, audit_note, render_markdown, write_comparison_png
from stages.report_summary import (ReportError, agreed_findings, audit_summary, build_summary, collect_rows,
                                   comparison_points, read_audits)

logger = logging.getLogger(__name__)


def render_audit(reports_dir: Path, backbones: Sequence[str]) -> tuple[list[str], dict[str, Any], list[str]]:
    """The dataset audit (reports/<bb>/audit.json, written by audit@<bb>, stages/audit.py) across backbones:
    (markdown lines of a "## Dataset audit" section, summary.json's "audit" object, a one-line note for the top).

    Counts per kind per backbone; a finding (kind + its set of paths) that several backbones flag is marked
    "agreed by N backbones". Backbones without an audit.json are skipped (an empty result when none has one)."""
    audits = read_audits(reports_dir, backbones)
    if not audits:
        return [], {}, []
    agreed = agreed_findings(audits)
    return audit_lines(audits, agreed), audit_summary(audits, agreed), [audit_note(audits, agreed)]


def write_summary(out_dir: Path, summary: Mapping[str, Any], markdown: str) -> None:
    """Write summary.json, summary.md, comparison.json and comparison.png into `out_dir`, atomically."""
    points = comparison_points(summary)
    write_json(out_dir / "summary.json", summary)
    write_json(out_dir / "comparison.json", points)
    write_comparison_png(points, out_dir / "comparison.png", primary_metric=summary["primary_metric"])
    write_text(out_dir / "summary.md", markdown)


# ----------------------------------------------------------------------------------------- main
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
        audit_section, audit_numbers, audit_notes = render_audit(args.reports, params.backbones)  # audit@<bb>
        collected.notes += audit_notes
        summary = build_summary(collected, primary_metric=params.report.primary_metric)
        if audit_numbers:
            summary["audit"] = audit_numbers
        markdown = render_markdown(summary, notes=collected.notes)
        markdown += "\n".join(audit_section + [""]) if audit_section else ""
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
