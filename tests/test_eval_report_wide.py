"""A comparison report with many metrics stays inside a 1280-px window: wide tables scroll in their own
box and keep their first column (the run, the sample id) in view."""

from __future__ import annotations

import os

import pytest

from editkit.eval.report import build_report

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
METRICS = [f"metric_{k:02d}" for k in range(16)]
RUNS = ["baseline-cfg-4.0", "lora-rank-64-step-3000", "lora-rank-128-step-9000"]


def _wide_report(path):
    """The shape `editkit compare` writes: per metric its mean, 95% CI and difference to the baseline."""
    columns = ["run", "cfg", "missing", *[c for m in METRICS for c in (m, f"{m} 95% CI", f"Δ{m} vs baseline")]]
    rows = []
    for i, run in enumerate(RUNS):
        row = {"run": run, "cfg": 4.0, "missing": 0}
        for m in METRICS:
            row.update({m: 0.5 + i / 10, f"{m} 95% CI": "[0.4812, 0.5377]",
                        f"Δ{m} vs baseline": "+0.0123 [0.0011, 0.0240]"})
        rows.append(row)
    samples = [{"run": RUNS[0], "id": f"sample-{j:04d}", **{m: j / 7 for m in METRICS}} for j in range(5)]
    return build_report(path, "Wide", summary_rows=rows, summary_columns=columns,
                        table_rows=samples, table_columns=["run", "id", *METRICS])


def test_tables_sit_in_scroll_boxes(tmp_path):
    page = _wide_report(tmp_path / "r.html").read_text()
    assert '<div class="table-scroll"><table id="summary" class="sortable">' in page
    assert '<div class="table-scroll"><table id="samples" class="sortable">' in page


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed at /usr/bin/chromium")
def test_wide_summary_fits_1280_px_and_keeps_its_first_column(tmp_path):
    from playwright.sync_api import sync_playwright

    path = _wide_report(tmp_path / "r.html")
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(path.as_uri())
            page.wait_for_load_state("load")
            assert page.evaluate("() => document.documentElement.scrollWidth") <= 1280
            box = page.locator(".table-scroll").first
            # the table really is wider than the window: its box scrolls instead of the page
            assert box.evaluate("el => el.scrollWidth > el.clientWidth + 1000")
            box.evaluate("el => { el.scrollLeft = el.scrollWidth; }")
            box_left = box.evaluate("el => el.getBoundingClientRect().left")
            for row in range(len(RUNS)):
                cell = page.locator("#summary tbody tr").nth(row).locator("td").first
                rect = cell.evaluate("el => { const r = el.getBoundingClientRect(); "
                                     "return {left: r.left, x: r.left + r.width / 2, y: r.top + r.height / 2}; }")
                assert abs(rect["left"] - box_left) < 2  # stuck at the box's left edge
                # and drawn on top: the point at its centre belongs to it, not to a scrolled-under cell
                assert page.evaluate("([x, y]) => document.elementFromPoint(x, y).textContent",
                                     [rect["x"], rect["y"]]) == RUNS[row]
            header = page.locator("#summary thead th").first
            assert abs(header.evaluate("el => el.getBoundingClientRect().left") - box_left) < 2
            # sorting still works on a scrolled table (click the second metric's column header)
            page.locator("#summary thead th", has_text="metric_01").first.click()
            assert page.locator("#summary tbody tr td").first.inner_text() == RUNS[0]
        finally:
            browser.close()
    assert errors == []
