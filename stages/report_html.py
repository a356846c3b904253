"""The report page: summary/report.html, one self-contained page that opens offline (written by stages/report.py).

Everything the page shows is inside the file: plots and thumbnails are base64 data: URIs, the table sorter is a
few lines of inline JavaScript, there is no CDN, font or network request (a Content-Security-Policy forbids any).
Only links point outside it: each thumbnail to its full image under data/raw, and to errors.csv and the audit's
contact sheets under reports/ (relative links, so they work wherever the repository is checked out).

    comparison   the summary table (held-out accuracy with its 95% interval, cost per 1000 images, the best row,
                 the rows indistinguishable from it), sortable by any column
    plots        accuracy vs cost (summary/comparison.png), held-out recall per class and backbone
    backbones    per backbone: confusion matrix (plots/confusion.json), calibration curve (plots/calibration.png),
                 the misclassified held-out images (errors.csv), most confident mistake first
    audit        per audited backbone (reports/<bb>/audit.json, when the audit stage ran): duplicates, leakage
                 across splits, likely label errors, outliers, as thumbnails
    provenance   params.yaml, weights (source, sha256), dataset counts, quarantined files and reasons, git commit,
                 library versions, the compute path of each extraction. The commit is the one thing on the page
                 that dvc.yaml does not declare: it labels the run and changes no number.

Thumbnails are JPEGs cached under `PageInputs.thumbs` as <image sha256>-<size>.jpg (the sha256 from the manifest), so an
image is decoded and encoded once, however often the report runs. The cache is a memo, not an output: it is
gitignored and outside DVC, and a missing or deleted entry is simply made again.

Every string that comes from a file (class names, paths, notes, params) is escaped with html.escape.
"""
from __future__ import annotations

import base64
import csv
import io
import json
import logging
import os
import subprocess
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from importlib import metadata
from pathlib import Path
from typing import Any

from stages.io import atomic_path, read_json, sha256_file

logger = logging.getLogger(__name__)

THUMB_SIZE = 160  # px, the longer side
THUMB_QUALITY = 80  # JPEG
GALLERY_MAX = 48  # misclassified images shown per backbone (the rest: errors.csv)
AUDIT_MAX = 24  # findings shown per audit kind
AUDIT_KINDS = (("leakage", "Leakage: near-duplicates across splits"),
               ("duplicates", "Near-duplicates within a split"),
               ("label_issues", "Likely label errors (given -> suggested)"),
               ("outliers", "Outliers (far from their class)"))
LIBRARIES = ("torch", "torchvision", "timm", "numpy", "scikit-learn", "scipy", "h5py", "pillow", "matplotlib",
             "dvc", "dvclive")


@dataclass
class PageInputs:
    """Where the page's inputs are; `page_dir` is where report.html goes (links are relative to it)."""
    reports: Path
    raw: Path
    page_dir: Path
    thumbs: Path
    manifest: Path | None = None
    params: Path | None = None
    hashes: dict[str, str] = field(default_factory=dict)  # image path (relative to raw) -> sha256

    def link(self, path: Path) -> str:
        """A relative URL from the page to `path`, percent-encoded (spaces, unicode, '#', '?'); symlinks are not
        followed (DVC may link data/raw's files into its cache)."""
        relative = os.path.relpath(os.path.abspath(path), os.path.abspath(self.page_dir))
        return urllib.parse.quote(Path(relative).as_posix())


# -------------------------------------------------------------------------------------------- read
def read_manifest_hashes(path: Path | None) -> dict[str, str]:
    """{path: sha256} from data/prepared/manifest.csv; {} when there is none.

    Reads the two columns with csv rather than stages.images.read_manifest, which would import torch (seconds) for
    a page that needs no tensor.
    """
    if path is None or not Path(path).is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as fh:
        return {row["path"]: row["sha256"] for row in csv.DictReader(fh) if row.get("path") and row.get("sha256")}


def read_optional_json(path: Path) -> Any:
    """The parsed file, or None when it is missing or not JSON (the page then says 'not available')."""
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def read_errors(path: Path) -> list[dict[str, Any]] | None:
    """errors.csv rows {path, true, predicted, prob}, the most confident mistake first; None when absent."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [row for row in csv.DictReader(fh) if row.get("path")]
    except (OSError, ValueError, csv.Error):
        return None

    def prob(row: Mapping[str, Any]) -> float:
        try:
            return float(row.get("prob") or "nan")
        except ValueError:
            return float("nan")

    for row in rows:
        row["prob"] = prob(row)
    return sorted(rows, key=lambda r: (-r["prob"] if r["prob"] == r["prob"] else 1.0, r["path"]))


def git_commit(cwd: Path) -> str:
    """"<sha> (+ uncommitted changes)" of the repository holding `cwd`, or why there is none."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return "not a git repository, or no commit yet"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"git not available ({exc})"
    return head.stdout.strip() + (" with uncommitted changes" if dirty else "")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


# ---------------------------------------------------------------------------------------- images
def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def file_uri(path: Path, mime: str = "image/png") -> str | None:
    """A data: URI of a file, or None when it cannot be read."""
    try:
        return data_uri(Path(path).read_bytes(), mime)
    except OSError:
        return None


def make_thumbnail(image_path: Path, *, size: int = THUMB_SIZE, quality: int = THUMB_QUALITY) -> bytes:
    """JPEG bytes of the image shrunk to at most `size` px a side, decoded by the project's one rule
    (stages.images.load_rgb: EXIF orientation, 16-bit, CMYK, alpha over white). Imported here: stages.images
    imports torch (seconds), which the rest of the report never needs."""
    from stages.images import load_rgb

    image, _ = load_rgb(image_path, draft_size=2 * size)  # JPEG: decoded at a reduced scale, much faster
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


def cached_thumbnail(inputs: PageInputs, path: str) -> tuple[str, int, int] | None:
    """(data URI, width, height) of data/raw/`path`'s thumbnail, made once into the cache; None when the image
    is missing, unreadable or outside data/raw (a path like ../../x in errors.csv)."""
    from PIL import Image

    source = inputs.raw / path
    if not os.path.abspath(source).startswith(os.path.join(os.path.abspath(inputs.raw), "")):
        logger.warning("no thumbnail for %r: not a path inside %s", path, inputs.raw)
        return None
    try:
        sha256 = inputs.hashes.get(path) or sha256_file(source)
        cached = inputs.thumbs / f"{sha256}-{THUMB_SIZE}.jpg"
        if not cached.is_file():
            data = make_thumbnail(source)
            with atomic_path(cached, suffix=".jpg") as tmp:
                tmp.write_bytes(data)
        data = cached.read_bytes()
        with Image.open(io.BytesIO(data)) as thumb:
            width, height = thumb.size
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        logger.warning("no thumbnail for %s: %s", source, exc)
        return None
    return data_uri(data, "image/jpeg"), width, height


# ---------------------------------------------------------------------------------------- render
def e(value: Any) -> str:
    """HTML-escaped text of any value (quotes too, so it is safe inside attributes)."""
    return escape(str(value), quote=True)


def num(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-" if value is None else e(value)
    return str(value) if isinstance(value, int) else f"{value:.{digits}f}"


def anchor(name: str) -> str:
    """An id for `name` that is safe in HTML and in a URL fragment."""
    return "bb-" + "".join(c if c.isascii() and (c.isalnum() or c == "_") else f"-{ord(c):x}" for c in name)


def _cell(text: str, value: Any = None, css: str = "") -> str:
    sort = "" if value is None else f' data-value="{e(value)}"'
    cls = f' class="{css}"' if css else ""
    return f"<td{cls}{sort}>{text}</td>"


def render_table(summary: Mapping[str, Any]) -> str:
    """The comparison: one <tr data-row=name> per summary row; numeric cells carry their exact value in data-value
    (what the sorter and the browser test read)."""
    best = summary["best"]
    header = ["Row", "Kind", "Held-out accuracy [95% CI]", "Mean-class acc", "ECE (→ calibrated)", "Choice",
              "s / 1000 images",
              "Images / s", "vs best (McNemar p)"]
    lines = ['<table id="comparison-table" class="sortable"><thead><tr>'
             + "".join(f'<th scope="col" data-col="{i}" tabindex="0">{e(h)}</th>' for i, h in enumerate(header))
             + "</tr></thead><tbody>"]
    for name, row in summary["rows"].items():
        heldout, extract = row.get("heldout") or {}, row.get("extract") or {}
        tie = bool(row.get("indistinguishable_from_best")) and name != best
        css = "best" if name == best else "tie" if tie else ""
        accuracy = heldout.get("accuracy")
        interval = (f' <span class="ci">[{num(heldout["accuracy_ci_low"])}, {num(heldout["accuracy_ci_high"])}]'
                    f"</span>" if "accuracy_ci_low" in heldout and "accuracy_ci_high" in heldout else "")
        p_value = row.get("vs_best_p")
        vs_best = "best" if name == best else "n/a" if p_value is None else (
            ("&lt; 0.001" if p_value < 0.001 else num(p_value)) + (" ≈ best" if tie else ""))
        mark = " ★" if name == best else " ≈" if tie else ""
        cells = [_cell(f"{e(name)}{mark}", name, "text"), _cell(e(row.get("kind", "-")), row.get("kind"), "text"),
                 _cell(f"{num(accuracy)}{interval}", accuracy),
                 _cell(num(row.get("mean_class_accuracy")), row.get("mean_class_accuracy")),
                 _cell(num(row.get("ece")) + (f" → {num(row['ece_calibrated'])}" if "ece_calibrated" in row else ""),
                       row.get("ece")), _cell(e(_choice(row)), _choice(row), "text"),
                 _cell(num(extract.get("seconds_per_1000_images"), 1), extract.get("seconds_per_1000_images")),
                 _cell(num(extract.get("images_per_second"), 1), extract.get("images_per_second")),
                 _cell(vs_best, -1.0 if name == best else p_value)]
        lines.append(f'<tr data-row="{e(name)}"' + (f' class="{css}"' if css else "") + ">" + "".join(cells)
                     + "</tr>")
    return "\n".join(lines) + "</tbody></table>"


def _choice(row: Mapping[str, Any]) -> str:
    parts = [row.get("head"), f"C={row['C']:g}" if isinstance(row.get("C"), (int, float)) else None,
             f"k={row['k']}" if "k" in row else None, row.get("regime"), row.get("layers"), row.get("normalization"),
             "balanced class weights" if row.get("class_weight") == "balanced" else None]
    return ", ".join(str(p) for p in parts if p) or "-"


def render_per_class(per_class: Mapping[str, Mapping[str, Any]]) -> str:
    """Held-out recall per class (rows) and backbone (columns), as bars; `per_class`: backbone -> class -> block."""
    backbones = [bb for bb, classes in per_class.items() if classes]
    if not backbones:
        return '<p class="na">No per-class metrics (heldout.per_class) in the head reports.</p>'
    classes = list(dict.fromkeys(c for bb in backbones for c in per_class[bb]))
    lines = ['<table class="per-class"><thead><tr><th scope="col">Class</th>'
             + "".join(f'<th scope="col">{e(bb)}</th>' for bb in backbones) + "</tr></thead><tbody>"]
    for name in classes:
        cells = []
        for bb in backbones:
            recall = (per_class[bb].get(name) or {}).get("recall")
            if isinstance(recall, (int, float)):
                cells.append(f'<td><div class="bar" style="width:{100 * max(0.0, min(1.0, recall)):.0f}px"></div>'
                             f"<span>{num(recall)}</span></td>")
            else:
                cells.append("<td>-</td>")
        lines.append(f'<tr><th scope="row">{e(name)}</th>{"".join(cells)}</tr>')
    return "\n".join(lines) + "</tbody></table>"


def render_confusion(records: Any, classes: Sequence[str]) -> str:
    """A confusion-matrix table from plots/confusion.json records [{"actual", "predicted"}]."""
    if not isinstance(records, list) or not records:
        return '<p class="na">No confusion matrix (plots/confusion.json missing).</p>'
    pairs = [(str(r.get("actual")), str(r.get("predicted"))) for r in records if isinstance(r, Mapping)]
    order = list(dict.fromkeys([*classes, *(a for a, _ in pairs), *(p for _, p in pairs)]))
    counts: dict[tuple[str, str], int] = {}
    for pair in pairs:
        counts[pair] = counts.get(pair, 0) + 1
    top = max(counts.values(), default=1)
    lines = ['<table class="confusion"><caption>rows: true class; columns: predicted</caption><thead><tr><th></th>'
             + "".join(f'<th scope="col">{e(c)}</th>' for c in order) + "</tr></thead><tbody>"]
    for actual in order:
        cells = []
        for predicted in order:
            count = counts.get((actual, predicted), 0)
            shade = 0.08 + 0.6 * count / top if count else 0.0
            hue = "34,139,34" if actual == predicted else "200,40,40"
            cells.append(f'<td style="background:rgba({hue},{shade:.2f})">{count}</td>')
        lines.append(f'<tr><th scope="row">{e(actual)}</th>{"".join(cells)}</tr>')
    return "\n".join(lines) + "</tbody></table>"


def render_thumb(inputs: PageInputs, path: str, caption: str, *, css: str = "") -> str:
    """A <figure> with the thumbnail (linking to the full image) and `caption` (already HTML)."""
    thumb = cached_thumbnail(inputs, path)
    href = inputs.link(inputs.raw / path)
    if thumb is None:
        picture = '<div class="missing">image not available</div>'
    else:
        uri, width, height = thumb
        picture = (f'<a class="full" href="{e(href)}"><img src="{uri}" width="{width}" height="{height}" '
                   f'alt="{e(path)}" loading="eager"></a>')
    cls = f' class="{css}"' if css else ""
    return (f"<figure{cls}>{picture}<figcaption>{caption}<br><span class=\"path\">{e(path)}</span>"
            f"</figcaption></figure>")


def render_gallery(inputs: PageInputs, backbone: str, errors: list[dict[str, Any]] | None) -> str:
    if errors is None:
        return f'<p class="na">No errors.csv for {e(backbone)} (re-run <code>dvc repro head@{e(backbone)}</code>).</p>'
    if not errors:
        return "<p>No misclassified held-out images.</p>"
    figures = [render_thumb(inputs, row["path"],
                            f"true <b>{e(row.get('true', '?'))}</b> → predicted <b>{e(row.get('predicted', '?'))}</b>"
                            f" (p {num(row['prob'])})") for row in errors[:GALLERY_MAX]]
    more = "" if len(errors) <= GALLERY_MAX else (
        f'<p>{len(errors) - GALLERY_MAX} more in <a href="{e(inputs.link(inputs.reports / backbone / "errors.csv"))}">'
        f"errors.csv</a>.</p>")
    return (f"<p>{len(errors)} misclassified held-out images, most confident mistake first.</p>"
            f'<div class="gallery">{"".join(figures)}</div>{more}')


def render_backbone(inputs: PageInputs, backbone: str, metrics: Any) -> str:
    folder = inputs.reports / backbone
    classes = list(((metrics or {}).get("heldout") or {}).get("per_class") or {}) if isinstance(metrics, dict) else []
    calibration = file_uri(folder / "plots" / "calibration.png")
    calibration_html = (f'<img class="plot" src="{calibration}" alt="calibration curve of {e(backbone)}">'
                        if calibration else '<p class="na">No calibration plot (plots/calibration.png missing).</p>')
    note = "" if isinstance(metrics, dict) else \
        f'<p class="na">reports/{e(backbone)}/metrics.json is missing or unreadable.</p>'
    return (f'<section class="backbone" id="{anchor(backbone)}"><h3>{e(backbone)}</h3>{note}'
            f'<div class="pair"><div><h4>Confusion matrix (held-out)</h4>'
            f'{render_confusion(read_optional_json(folder / "plots" / "confusion.json"), classes)}</div>'
            f"<div><h4>Calibration</h4>{calibration_html}</div></div>"
            f"<h4>Misclassified held-out images</h4>"
            f"{render_gallery(inputs, backbone, read_errors(folder / 'errors.csv'))}"
            f"</section>")


def _finding_caption(finding: Mapping[str, Any]) -> str:
    """"key: value; ..." of a finding's scalar fields (paths, splits and classes are shown per image)."""
    parts = [f"{e(k)}: {num(v) if isinstance(v, (int, float)) else e(v)}" for k, v in finding.items()
             if k not in ("path", "paths", "splits", "classes", "pairs", "cross_split")
             and isinstance(v, (str, int, float))]
    return "; ".join(parts) or "&nbsp;"


def render_finding(inputs: PageInputs, finding: Mapping[str, Any], *, css: str) -> str:
    """One finding: a thumbnail per image (its split and class below it), the finding's fields under the first."""
    paths = [str(p) for p in finding.get("paths") or [finding.get("path")] if p]
    splits, classes = finding.get("splits"), finding.get("classes")
    figures = []
    for i, path in enumerate(paths):
        where = [splits[i] if isinstance(splits, list) and i < len(splits) else finding.get("split"),
                 classes[i] if isinstance(classes, list) and i < len(classes) else finding.get("class")]
        label = ", ".join(e(w) for w in where if isinstance(w, str))
        caption = (_finding_caption(finding) + "<br>" if i == 0 else "") + label
        figures.append(render_thumb(inputs, path, caption or "&nbsp;"))
    return f'<div class="{css}"><div class="gallery">{"".join(figures)}</div></div>'


def render_audit_kind(inputs: PageInputs, kind: str, findings: Any) -> str:
    if not isinstance(findings, list):
        return '<p class="na">Not in audit.json.</p>'
    if not findings:
        return "<p>None found.</p>"
    css = "finding leak" if kind == "leakage" else "finding"
    blocks = [render_finding(inputs, f, css=css) for f in findings[:AUDIT_MAX] if isinstance(f, Mapping)]
    more = f"<p>{len(findings) - AUDIT_MAX} more in audit.json / audit.csv.</p>" if len(findings) > AUDIT_MAX else ""
    return f"<p>{len(findings)} found.</p>{''.join(blocks)}{more}"


def audit_findings(audit: Mapping[str, Any], kind: str) -> Any:
    """The findings of one kind; duplicate groups split into leakage (across splits) and within a split."""
    if kind in ("leakage", "duplicates"):
        groups = audit.get("duplicates")
        if not isinstance(groups, list):
            return None
        return [g for g in groups if isinstance(g, Mapping) and bool(g.get("cross_split")) == (kind == "leakage")]
    return audit.get(kind)


def render_audit(inputs: PageInputs, backbones: Sequence[str]) -> str:
    """The audit's findings for every backbone with a reports/<bb>/audit.json; '' when none has one."""
    sections = []
    for backbone in backbones:
        audit = read_optional_json(inputs.reports / backbone / "audit.json")
        if audit is None:
            continue
        if not isinstance(audit, Mapping):
            sections.append(f'<p class="na">reports/{e(backbone)}/audit.json is not a JSON object.</p>')
            continue
        parts = [f"<h3>Audit on {e(backbone)} features</h3>"]
        check = audit.get("label_check")
        for kind, title in AUDIT_KINDS:
            parts.append(f"<h4>{e(title)}</h4>")
            if kind == "label_issues" and isinstance(check, Mapping) and check.get("status") not in (None, "ran"):
                parts.append(f'<p class="na">Label check {e(check.get("status"))}: {e(check.get("reason", ""))}</p>')
                continue
            parts.append(render_audit_kind(inputs, kind, audit_findings(audit, kind)))
            sheet = inputs.reports / backbone / "audit" / f"{kind}.png"
            if sheet.is_file():
                parts.append(f'<p><a href="{e(inputs.link(sheet))}">contact sheet</a></p>')
        sections.append("".join(parts))
    return "".join(sections)


def render_mapping(obj: Mapping[str, Any]) -> str:
    """A two-column table of a mapping's keys and values (nested values as compact JSON)."""
    rows = []
    for key, value in obj.items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        rows.append(f'<tr><th scope="row">{e(key)}</th><td>{e(text)}</td></tr>')
    return f'<table class="kv">{"".join(rows)}</table>'


def render_provenance(inputs: PageInputs, backbones: Sequence[str]) -> str:
    """Params, dataset counts, quarantine, weights and extraction per backbone, git commit, library versions."""
    parts = []
    prepare = read_optional_json(inputs.reports / "prepare" / "summary.json")
    if isinstance(prepare, Mapping) and isinstance(prepare.get("splits"), Mapping):
        splits = {name: counts for name, counts in prepare["splits"].items() if isinstance(counts, Mapping)}
        classes = list(dict.fromkeys(c for counts in splits.values() for c in counts if c != "total"))
        parts.append("<h3>Dataset</h3><table><thead><tr><th>Split</th>"
                     + "".join(f"<th>{e(c)}</th>" for c in classes) + "<th>total</th></tr></thead><tbody>"
                     + "".join(f"<tr><th scope=\"row\">{e(s)}</th>"
                               + "".join(f"<td>{num(counts.get(c, 0))}</td>" for c in classes)
                               + f"<td>{num(counts.get('total'))}</td></tr>" for s, counts in splits.items())
                     + "</tbody></table>")
        extra = {k: prepare[k] for k in ("n_images", "split_method", "n_bad", "n_duplicates", "n_duplicates_dropped")
                 if k in prepare}
        parts.append(render_mapping(extra))
    else:
        parts.append('<h3>Dataset</h3><p class="na">reports/prepare/summary.json missing or unreadable.</p>')
    quarantine = read_optional_json(inputs.reports / "prepare" / "quarantine.json")
    files = quarantine.get("files") if isinstance(quarantine, Mapping) else None
    parts.append("<h3>Quarantined files</h3>")
    if isinstance(files, list) and files:
        parts.append("<table><thead><tr><th>File</th><th>Reason</th></tr></thead><tbody>" + "".join(
            f"<tr><td>{e(f.get('path', '?'))}</td><td>{e(f.get('reason', '?'))}</td></tr>"
            for f in files if isinstance(f, Mapping)) + "</tbody></table>")
    else:
        parts.append("<p>None.</p>" if isinstance(files, list) else '<p class="na">quarantine.json not available.</p>')
    parts.append(render_backbone_provenance(inputs, backbones))
    parts.append("<h3>Code and libraries</h3>"
                 + render_mapping({"git commit": git_commit(inputs.page_dir), **library_versions()}))
    params = inputs.params.read_text(encoding="utf-8") if inputs.params and inputs.params.is_file() else None
    if params is not None:
        parts.append(f"<h3>params.yaml</h3><details><summary>show</summary><pre>{e(params)}</pre></details>")
    return "".join(parts)


PROVENANCE_COLUMNS = (  # (title, file, dotted key)
    ("Weights source", "weights.json", "source"), ("Weights sha256", "weights.json", "sha256"),
    ("Verification", "weights.json", "verification"), ("Compute path", "extract.json", "path"),
    ("Engine", "extract.json", "engine"), ("Images / s", "extract.json", "images_per_second"),
    ("Features sha256", "metrics.json", "features.sha256"))


def _dotted(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = obj.get(part) if isinstance(obj, Mapping) else None
    return obj


def render_backbone_provenance(inputs: PageInputs, backbones: Sequence[str]) -> str:
    """One row per backbone (weights, compute path of its extraction, features hash), then each backbone's
    weights.json, extract.json and the head's features block in full, folded."""
    reports = {bb: {name: read_optional_json(inputs.reports / bb / name)
                    for name in ("weights.json", "extract.json", "metrics.json")} for bb in backbones}
    rows = []
    for bb in backbones:
        cells = [_dotted(reports[bb][name], key) for _, name, key in PROVENANCE_COLUMNS]
        rows.append(f'<tr><th scope="row">{e(bb)}</th>' + "".join(
            f'<td class="text mono">{num(c, 2)}</td>' for c in cells) + "</tr>")
    parts = ["<h3>Weights and compute path per backbone</h3><table><thead><tr><th>Backbone</th>"
             + "".join(f"<th>{e(title)}</th>" for title, _, _ in PROVENANCE_COLUMNS) + "</tr></thead><tbody>"
             + "".join(rows) + "</tbody></table>"]
    for bb in backbones:
        blocks = [(f"{name} (reports/{bb}/{name})", reports[bb][name]) for name in ("weights.json", "extract.json")]
        blocks.append(("features the head read (metrics.json: features)", _dotted(reports[bb]["metrics.json"],
                                                                                  "features")))
        parts.append(f"<details><summary>{e(bb)}: every field</summary>" + "".join(
            f"<h4>{e(title)}</h4>" + (render_mapping(block) if isinstance(block, Mapping)
                                     else '<p class="na">not available.</p>') for title, block in blocks)
            + "</details>")
    return "".join(parts)


STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:0 16px;
color:#1d1d1f;background:#fff}
h1{margin:16px 0 4px}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
nav a{margin-right:12px}table{border-collapse:collapse;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right;vertical-align:top}
th{background:#f4f4f6;text-align:left}td{white-space:nowrap}td.text,th[scope=row]{text-align:left;white-space:normal}
.mono{font-family:monospace;font-size:12px}td.mono{white-space:normal;word-break:break-all}
details{margin:6px 0}summary{cursor:pointer}.kv th{text-align:left;white-space:nowrap}
.kv td{text-align:left;white-space:normal;word-break:break-all;font-family:monospace;font-size:12px}
#comparison-table th{cursor:pointer;user-select:none}#comparison-table th[aria-sort=ascending]::after{content:" ▲"}
#comparison-table th[aria-sort=descending]::after{content:" ▼"}
tr.best{background:#e8f5e9;font-weight:600}tr.tie{background:#f3faf3}.ci{color:#666;font-weight:normal}
.na{color:#8a5a00}.notes li{margin:2px 0}img.plot{max-width:min(100%,480px);height:auto}
.pair{display:flex;flex-wrap:wrap;gap:24px}.pair>div{flex:1 1 360px;min-width:0;overflow-x:auto}
.per-class td{min-width:140px;text-align:left;position:relative}
.bar{background:#90caf9;height:16px;display:inline-block;vertical-align:middle;max-width:100px;margin-right:6px}
.confusion td{min-width:36px;text-align:center}
.gallery{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:170px;font-size:12px}figure img{display:block;max-width:160px;height:auto;border:1px solid #ccc}
.path{color:#666;word-break:break-all}.missing{width:160px;height:100px;background:#eee;color:#666;display:flex;
align-items:center;justify-content:center}
.finding{border-left:3px solid #bbb;padding-left:8px;margin:8px 0}.finding.leak{border-color:#c62828}
pre{background:#f6f8fa;padding:8px;overflow-x:auto;font-size:12px}
"""

SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    function sort() {
      var asc = th.getAttribute("aria-sort") !== "ascending";
      table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      function key(row) {
        var v = row.cells[col].getAttribute("data-value"), n = parseFloat(v);
        return v === null || v === "" ? null : isNaN(n) ? v : n;
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === null || y === null) return x === y ? 0 : x === null ? 1 : -1;
        var c = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
        return asc ? c : -c;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    }
    th.addEventListener("click", sort);
    th.addEventListener("keydown", function (ev) { if (ev.key === "Enter") sort(); });
  });
});
"""


def page(title: str, body: str) -> str:
    """A whole HTML document; `body` is HTML. No external resource (the empty icon stops a favicon request)."""
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">"
            f"<link rel=\"icon\" href=\"data:,\"><title>{e(title)}</title><style>{STYLE}</style></head>\n"
            f"<body>\n{body}\n<script>{SCRIPT}</script>\n</body></html>\n")


def render_page(summary: Mapping[str, Any], inputs: PageInputs, *, backbones: Sequence[str],
                notes: Sequence[str] = ()) -> str:
    """The whole report.html for a built summary (summary.json's object)."""
    inputs.hashes = inputs.hashes or read_manifest_hashes(inputs.manifest)
    metrics = {bb: read_optional_json(inputs.reports / bb / "metrics.json") for bb in backbones}
    per_class = {bb: ((m.get("heldout") or {}).get("per_class") or {}) if isinstance(m, Mapping) else {}
                 for bb, m in metrics.items()}
    comparison = file_uri(inputs.page_dir / "comparison.png")
    audit = render_audit(inputs, backbones)
    best, primary = summary["best"], summary["primary_metric"]
    sections = [
        "<header><h1>Backbone comparison</h1>",
        f"<p>Held-out split: <b>{e(summary['heldout_split'])}</b>; nothing was chosen on it. Best row: "
        f"<b>{e(best)}</b> ★ by <code>{e(primary)}</code> = {num(summary.get('best_value'), 4)}. Rows marked ≈ are "
        f"not distinguishable from it (McNemar's exact test on the same images, p ≥ {e(summary.get('alpha'))}). "
        f"Compare with the last commit: <code>dvc metrics diff</code>.</p>",
        '<nav><a href="#comparison">Comparison</a><a href="#plots">Plots</a><a href="#backbones">Backbones</a>'
        + ('<a href="#audit">Audit</a>' if audit else "") + '<a href="#provenance">Provenance</a></nav></header>',
        f'<section id="comparison"><h2>Comparison</h2><p>Click a column to sort.</p>{render_table(summary)}',
        ('<ul class="notes">' + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>" if notes else "") + "</section>",
        '<section id="plots"><h2>Plots</h2><div class="pair"><div><h3>Accuracy vs extraction cost</h3>'
        + (f'<img class="plot" src="{comparison}" alt="held-out accuracy vs extraction cost">' if comparison
           else '<p class="na">comparison.png not available.</p>')
        + f"</div><div><h3>Held-out recall per class</h3>{render_per_class(per_class)}</div></div></section>",
        '<section id="backbones"><h2>Backbones</h2>'
        + "".join(render_backbone(inputs, bb, metrics[bb]) for bb in backbones) + "</section>",
        f'<section id="audit"><h2>Dataset audit</h2>{audit}</section>' if audit else "",
        f'<section id="provenance"><h2>Provenance</h2>{render_provenance(inputs, backbones)}</section>']
    return page("Backbone comparison", "\n".join(sections))


def render_error_page(message: str) -> str:
    """The page when the report could not be built: the reason (escaped) and what to run."""
    return page("Backbone comparison: not built", "<h1>The report could not be built</h1>"
                f'<p class="na" id="error">{e(message)}</p><p>Fix the cause, then run <code>dvc repro</code>.</p>')


def write_page(path: Path, text: str) -> None:
    with atomic_path(path, suffix=".html") as tmp:
        tmp.write_text(text, encoding="utf-8")
