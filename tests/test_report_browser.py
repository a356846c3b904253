"""summary/report.html in a real browser: headless Chromium (the OS package, driven by Playwright) with the network
blocked. No request leaves the machine, no console error, one table row per summary row with its numbers, every
image loaded, every gallery link resolves; bad inputs (one backbone, a missing head report, HTML in a class name,
spaces and unicode in paths) render safely.

Needs /usr/bin/chromium (`apt-get install chromium`; .ci/run installs it) and the `playwright` package (the dev
extra). Without them the tests fail under CI (`CI` set) and are skipped otherwise.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from test_report import HOSTILE, LITE0, LITE1, PAGE_PATHS, main, run_report, set_params, write_page_inputs
from test_report import project  # noqa: F401  (the fixture)

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--host-resolver-rules=MAP * ~NOTFOUND"]  # no name resolves: nothing could leave even if asked
RENDER_BUDGET_MS = 2000  # the target for the default run's page, on 2 cores


def chromium_path() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        why = "Chromium is not installed (apt-get install -y chromium; .ci/run does it)"
        if os.environ.get("CI"):
            pytest.fail(why + " and CI is set: the browser test must run")
        pytest.skip(why)
    return path


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        why = "playwright is not installed (pip install -e '.[dev]')"
        if os.environ.get("CI"):
            pytest.fail(why + " and CI is set: the browser test must run")
        pytest.skip(why)
    profile = tempfile.mkdtemp(prefix="report-chromium-")  # a fresh user-data-dir
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(profile, executable_path=path, headless=True,
                                                                args=CHROMIUM_ARGS, viewport={"width": 1280,
                                                                                              "height": 900})
        context.set_offline(True)
        yield context
        context.close()
    shutil.rmtree(profile, ignore_errors=True)


class Opened:
    """A page opened with every request and console message recorded."""

    def __init__(self, context, path: Path) -> None:
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page = context.new_page()
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("console", lambda msg: self.errors.append(msg.text) if msg.type == "error" else None)
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("requestfailed", lambda request: self.errors.append(f"failed: {request.url}"))
        self.page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(("file:", "data:"))
                        else route.abort())
        tick = time.perf_counter()
        self.page.goto(path.resolve().as_uri(), wait_until="load")
        self.seconds = time.perf_counter() - tick
        self.load_ms = self.page.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd")

    def check_safe(self) -> None:
        """Nothing left the machine, nothing failed, every image decoded, no injected script ran."""
        outside = [url for url in self.requests if not url.startswith(("file:", "data:"))]
        assert outside == [] and self.errors == []
        images = self.page.evaluate("Array.from(document.images, i => [i.alt, i.complete, i.naturalWidth])")
        assert [alt for alt, complete, width in images if not complete or width == 0] == []
        assert self.page.evaluate("window.__pwned === undefined")
        assert self.page.evaluate("document.scripts.length") == 1  # the page's own sorter only


def open_page(context, root: Path) -> Opened:
    return Opened(context, root / "summary" / "report.html")


def link_target(href: str) -> Path:
    """The file a resolved file:// link points to."""
    parsed = urllib.parse.urlparse(href)
    assert parsed.scheme == "file" and not parsed.query and not parsed.fragment, href
    return Path(urllib.request.url2pathname(parsed.path))


def test_report_page_in_a_real_browser(browser, project: Path, tmp_path: Path) -> None:
    write_page_inputs(project, [LITE0, LITE1])
    summary = run_report(project)
    opened = open_page(browser, project)
    page = opened.page
    opened.check_safe()
    assert opened.load_ms < RENDER_BUDGET_MS

    # the table: one row per summary row, the exact numbers of summary.json
    table = page.evaluate("""Array.from(document.querySelectorAll('#comparison-table tbody tr'), tr =>
        [tr.dataset.row, tr.className, parseFloat(tr.cells[2].dataset.value), tr.cells[2].innerText])""")
    assert [row[0] for row in table] == list(summary["rows"])
    for name, css, accuracy, text in table:
        heldout = summary["rows"][name]["heldout"]
        assert accuracy == heldout["accuracy"]
        low, high = heldout["accuracy_ci_low"], heldout["accuracy_ci_high"]
        assert text == f"{heldout['accuracy']:.3f} [{low:.3f}, {high:.3f}]"
        assert (css == "best") == (name == summary["best"])
        assert (css == "tie") == (name != summary["best"] and summary["rows"][name]["indistinguishable_from_best"] == 1)

    # sortable: accuracy ascending, then descending
    header = page.locator("#comparison-table th", has_text="Held-out accuracy")
    header.click()
    ascending = page.evaluate("Array.from(document.querySelectorAll('#comparison-table tbody tr'), "
                              "tr => parseFloat(tr.cells[2].dataset.value))")
    assert ascending == sorted(row["heldout"]["accuracy"] for row in summary["rows"].values())
    header.click()
    assert page.evaluate("document.querySelector('#comparison-table tbody tr').dataset.row") == summary["best"]

    # the gallery: every thumbnail links to its image in data/raw (spaces, unicode, '#', '?' quoted)
    links = page.evaluate("Array.from(document.querySelectorAll('a.full'), a => a.href)")
    assert len(links) == 2 * len(PAGE_PATHS)
    raw = (project / "data" / "raw").resolve()
    assert sorted({link_target(href) for href in links}) == sorted(raw / p for p in PAGE_PATHS)
    full = page.context.new_page()
    full.goto(links[0])
    assert full.evaluate("document.images[0].naturalWidth") == 32
    full.close()

    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert (tmp_path / "report.png").stat().st_size > 10_000
    page.close()


def test_one_backbone_and_html_in_names_render_safely(browser, project: Path) -> None:
    set_params(project, [LITE0])
    write_page_inputs(project, [LITE0], classes=[HOSTILE, "bees"], paths=[f"val/{HOSTILE}/ä b.jpg"])
    metrics_path = project / "reports" / LITE0 / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["warnings"] = [HOSTILE]
    metrics["heldout"]["per_class"] = {HOSTILE: {"recall": 0.5}, "bees": {"recall": 1.0}}
    metrics_path.write_text(json.dumps(metrics))
    summary = run_report(project)
    opened = open_page(browser, project)
    opened.check_safe()
    page = opened.page
    assert page.evaluate("document.querySelectorAll('#comparison-table tbody tr').length") == len(summary["rows"])
    assert all(row["backbone"] == LITE0 for row in summary["rows"].values())
    text = page.inner_text("body")
    assert text.count(HOSTILE) >= 4  # shown as text: per-class table, confusion matrix, gallery, the warning
    href = page.evaluate("document.querySelector('a.full').href")
    assert link_target(href) == (project / "data" / "raw" / f"val/{HOSTILE}/ä b.jpg").resolve()
    page.close()


def test_missing_head_report_gives_a_page_that_says_why(browser, project: Path) -> None:
    (project / "reports" / LITE1 / "metrics.json").unlink()
    assert main(["--reports", "reports", "--out", "summary", "--params", "params.yaml"]) == 1
    opened = open_page(browser, project)
    opened.check_safe()
    assert f"reports/{LITE1}/metrics.json not found" in opened.page.inner_text("#error")
    opened.page.close()


REPO = Path(__file__).resolve().parents[1]


def test_the_workspace_page_after_make_run(browser, tmp_path: Path) -> None:
    """The page `make run` wrote in this checkout, when there is one: the same checks on real data."""
    page_path, summary_path = REPO / "summary" / "report.html", REPO / "summary" / "summary.json"
    if not (page_path.is_file() and summary_path.is_file()):
        pytest.skip("no summary/report.html in this checkout: run `make run` first")
    summary = json.loads(summary_path.read_text())
    opened = Opened(browser, page_path)
    opened.check_safe()
    assert opened.load_ms < RENDER_BUDGET_MS and page_path.stat().st_size < 5_000_000
    rows = opened.page.evaluate("Array.from(document.querySelectorAll('#comparison-table tbody tr'), tr => "
                                "[tr.dataset.row, parseFloat(tr.cells[2].dataset.value)])")
    assert rows == [[name, row["heldout"]["accuracy"]] for name, row in summary["rows"].items()]
    if (REPO / "data" / "raw").is_dir():  # the images are DVC data: absent in a fresh clone before `make run`
        for href in opened.page.evaluate("Array.from(document.querySelectorAll('a.full'), a => a.href)"):
            assert link_target(href).is_file(), href
    opened.page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    opened.page.close()
