"""`editkit data preview`: the page's content and escaping, and the page itself in headless chromium
(paging, the task filter, the score filter)."""

from __future__ import annotations

import base64
import io
import os
import re

import numpy as np
import pytest
from PIL import Image

from editkit.data import write_manifest
from editkit.data.preview import mask_overlay, write_preview
from editkit.data.records import EditRecord
from editkit.errors import UserError
from tests.cli_run import run_cli

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
INJECTED = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'


def _images(root):
    root.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (0, 0, 255)).save(root / "src.png")
    Image.new("RGB", (40, 30), (0, 255, 0)).save(root / "tgt.png")
    mask = Image.new("L", (40, 30), 0)
    mask.paste(255, (0, 0, 20, 30))  # left half = edit region
    mask.save(root / "mask.png")
    return root / "src.png", root / "tgt.png", root / "mask.png"


def _records(root, n):
    src, tgt, mask = _images(root)
    return [EditRecord(id=f"r{i:03d}", instruction=f"edit number {i}", sources=[src], target=tgt,
                       mask=mask if i % 2 == 0 else None, task="add" if i % 3 == 0 else "remove",
                       instruction_cn=f"编辑 {i}", inverse_instruction=f"undo {i}",
                       metadata={"score": i, "flag": True, "note": "x" * 400})
            for i in range(n)]


def _data_uris(page: str) -> list[Image.Image]:
    found = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)
    return [Image.open(io.BytesIO(base64.b64decode(m))) for m in found]


def test_mask_overlay_tints_only_the_edit_region(tmp_path):
    src, _, mask = _images(tmp_path)
    shown = np.asarray(mask_overlay(Image.open(src).convert("RGB"), mask)).astype(int)
    assert (shown[:, 20:] == (0, 0, 255)).all()  # outside: the source
    assert (shown[:, :20, 0] > 100).all() and (shown[:, :20, 2] < 200).all()  # inside: red over blue


def test_page_holds_every_record_escaped_with_capped_thumbnails(tmp_path):
    records = _records(tmp_path / "img", 3)
    records[1].instruction = INJECTED
    records[1].metadata["evil"] = INJECTED
    records[2].target = tmp_path / "img" / "gone.png"
    out = write_preview(records, tmp_path / "p.html", "t <b>x</b>", thumb_px=24, progress=False)
    page = out.read_text()
    assert page.count('<article class="card"') == 3
    assert "window.__pwned" in page and "<script>window.__pwned" not in page and 'onerror="' not in page
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in page
    assert "<title>t &lt;b&gt;x&lt;/b&gt;</title>" in page
    assert "编辑 0" in page and "undo 0" in page and "x" * 400 not in page  # long metadata shortened
    assert "gone.png" in page and "file not found" in page  # a missing file is a note, not a failure
    thumbs = _data_uris(page)
    # r000: source, target, mask overlay; r001: source, target; r002: source, mask overlay (target missing)
    assert len(thumbs) == 7 and all(max(t.size) <= 24 for t in thumbs)
    assert 'data-scores="{&quot;score&quot;: 0.0}"' in page  # numbers only: the bool flag is no score


def test_limit_and_bad_options(tmp_path):
    records = _records(tmp_path / "img", 5)
    page = write_preview(records, tmp_path / "p.html", limit=2, progress=False).read_text()
    assert page.count('<article class="card"') == 2 and "5 records; showing the first 2 (--limit)" in page
    for kwargs, message in (({"page_size": 0}, "--page-size"), ({"thumb_px": 4096}, "--thumb must be 16..512"),
                            ({"limit": 0}, "--limit")):
        with pytest.raises(UserError, match=message):
            write_preview(records, tmp_path / "q.html", progress=False, **kwargs)
    with pytest.raises(UserError, match="is a folder"):
        write_preview(records, tmp_path, progress=False)


def test_cli_writes_the_page(capsys, tmp_path):
    manifest = tmp_path / "m.jsonl"
    write_manifest(_records(tmp_path / "img", 4), manifest)
    code, stdout, stderr = run_cli(capsys, "data", "preview", manifest, "--out", tmp_path / "p.html",
                                   "--workers", "1", "--page-size", "2")
    assert code == 0, stderr
    assert stdout.strip() == f"wrote {tmp_path / 'p.html'} (4 of 4 records)"
    assert "var PAGE_SIZE = 2;" in (tmp_path / "p.html").read_text()
    code, _, stderr = run_cli(capsys, "data", "preview", tmp_path / "none.jsonl", "--out", tmp_path / "x.html")
    assert code == 2 and len(stderr.strip().splitlines()) == 1


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed at /usr/bin/chromium")
def test_preview_pages_and_filters_in_headless_chromium(tmp_path):
    from playwright.sync_api import sync_playwright

    records = _records(tmp_path / "img", 120)
    records[7].instruction = INJECTED
    out = write_preview(records, tmp_path / "preview.html", progress=False)
    errors = []

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("requestfailed", lambda req: errors.append(f"request failed: {req.url}"))
            page.goto(out.as_uri())
            page.wait_for_load_state("load")

            def visible_ids():
                return page.locator(".card:not([hidden]) .rid").all_inner_texts()

            label = page.locator("#page-label")
            assert visible_ids() == [f"r{i:03d}" for i in range(50)]
            assert label.inner_text() == "page 1 of 3 · 120 of 120 records"
            assert page.locator("#prev").is_disabled()
            page.click("#next")
            assert visible_ids() == [f"r{i:03d}" for i in range(50, 100)]
            page.click("#next")
            assert visible_ids() == [f"r{i:03d}" for i in range(100, 120)]
            assert page.locator("#next").is_disabled() and label.inner_text().startswith("page 3 of 3")

            # the task filter hides the other task's records and starts again at page 1
            page.select_option("#task", "add")
            assert visible_ids() == [f"r{i:03d}" for i in range(0, 120, 3)][:50]
            assert label.inner_text() == "page 1 of 1 · 40 of 120 records"
            assert all(t == "add" for t in page.locator(".card:not([hidden]) .task").all_inner_texts())

            # the score filter: a range on the chosen metadata field
            page.select_option("#task", "*")
            page.select_option("#score-field", "score")
            assert page.locator("#score-range").is_visible()
            page.evaluate("""() => { const lo = document.getElementById('score-min');
                                     lo.value = 100; lo.dispatchEvent(new Event('input')); }""")
            assert visible_ids() == [f"r{i:03d}" for i in range(100, 120)]
            assert label.inner_text() == "page 1 of 1 · 20 of 120 records"

            # the injected instruction is shown as text and ran nothing
            page.select_option("#score-field", "")
            card = page.locator(".card", has=page.locator(".rid", has_text="r007"))
            assert INJECTED in card.locator("dd").first.inner_text()
            assert page.evaluate("() => window.__pwned") is None

            images = page.locator(".card:not([hidden]) img")
            assert images.count() == 50 * 2 + 25  # source + target each, the mask overlay on even ids
            images.first.scroll_into_view_if_needed()
            assert images.first.evaluate("img => img.complete && img.naturalWidth > 0")
        finally:
            browser.close()
    assert errors == []
