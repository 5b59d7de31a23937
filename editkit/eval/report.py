"""A self-contained HTML report: one file, images inlined as base64, a little inline JS to sort tables.

`build_report` is a library function: `editkit compare` fills every part; other jobs (the demo)
can pass only their own sections, e.g.
`build_report(path, title="Demo", extra_sections=[("Headline", "<p>PSNR 31.2 dB</p>")],
extra_images=[("Loss curve", "loss.png")])`.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from editkit.utils.atomic import write_text

THUMB_PX = 160


@dataclass
class GalleryItem:
    """One gallery row: the sources, the ground truth and each run's output (path or None)."""

    id: str
    caption: str
    sources: list[Path] = field(default_factory=list)
    target: Path | None = None
    outputs: dict[str, Path | None] = field(default_factory=dict)
    scores: dict[str, str] = field(default_factory=dict)  # run -> short text under its output


def image_data_uri(image: Image.Image | str | Path, max_px: int = THUMB_PX, format: str = "JPEG") -> str:
    """A thumbnail as a data: URI (JPEG for photos, PNG for plots)."""
    img = Image.open(image) if isinstance(image, (str, Path)) else image
    img = img.convert("RGB")
    if max_px:
        img.thumbnail((max_px, max_px))
    buf = io.BytesIO()
    img.save(buf, format=format, **({"quality": 85} if format == "JPEG" else {}))
    mime = "jpeg" if format == "JPEG" else "png"
    return f"data:image/{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _img(path: Path | str | None, alt: str) -> str:
    if path is None or not Path(path).is_file():
        return f'<div class="missing">{html.escape(alt)}: missing</div>'
    return f'<img src="{image_data_uri(path)}" alt="{html.escape(alt)}" title="{html.escape(str(path))}">'


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return html.escape(str(value))


def table_html(rows: Sequence[dict], columns: Sequence[str], table_id: str, sortable: bool = True) -> str:
    """An HTML table; numeric cells carry data-v so the inline JS sorts them as numbers."""
    tip = ' title="click to sort"' if sortable else ""
    head = "".join(f'<th data-col="{i}"{tip}>{html.escape(c)}</th>' for i, c in enumerate(columns))
    body = []
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c, "")
            number = isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value))
            attr = f' data-v="{value}"' if number else ""
            cells.append(f"<td{attr}>{_cell(value)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    cls = ' class="sortable"' if sortable else ""
    return f'<table id="{table_id}"{cls}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def scroll_box(table: str) -> str:
    """A table inside a box that scrolls sideways, its first column sticky: a wide table (many metrics,
    many runs) stays readable without making the page wider than the window."""
    return f'<div class="table-scroll">{table}</div>'


def gallery_html(items: Sequence[GalleryItem], runs: Sequence[str]) -> str:
    head = "<th>id</th><th>sources</th><th>ground truth</th>" + "".join(
        f'<th class="run">{html.escape(r)}</th>' for r in runs)
    rows = []
    for item in items:
        sources = "".join(_img(p, "source") for p in item.sources) or '<div class="missing">none</div>'
        outputs = "".join(
            f'<td>{_img(item.outputs.get(r), r)}<div class="score">{html.escape(item.scores.get(r, ""))}</div></td>'
            for r in runs)
        rows.append(f'<tr><td class="id"><b>{html.escape(item.id)}</b><br><small>{html.escape(item.caption)}'
                    f'</small></td><td>{sources}</td><td>{_img(item.target, "ground truth")}</td>{outputs}</tr>')
    return f'<table id="gallery"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:separate;border-spacing:0;margin:.5em 0 1.5em}
td,th{border:1px solid #ccc;border-width:0 1px 1px 0;padding:3px 6px;font-size:13px;background:#fff}
tr>:first-child{border-left-width:1px}thead tr:first-child>*{border-top-width:1px}
th{background:#f3f3f3}table.sortable th{cursor:pointer}th.asc:after{content:" \\25B2"}th.desc:after{content:" \\25BC"}
.table-scroll{overflow-x:auto;max-width:100%;margin:.5em 0 1.5em}.table-scroll>table{margin:0}
.table-scroll td:first-child,.table-scroll th:first-child{position:sticky;left:0;z-index:1}
.table-scroll td{white-space:nowrap}.table-scroll #gallery td{white-space:normal}
#gallery img{width:160px;height:auto;display:block}#gallery td{vertical-align:top}
.missing{color:#a00;font-size:12px}.score{font-size:11px;color:#555}.plots img{max-width:640px;margin:4px}
.note{color:#555;font-size:13px;overflow-wrap:anywhere}
"""

_SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th) {
    th.addEventListener('click', function () {
      var col = Number(th.dataset.col);
      var asc = !th.classList.contains('asc');
      table.querySelectorAll('th').forEach(function (h) { h.classList.remove('asc', 'desc'); });
      th.classList.add(asc ? 'asc' : 'desc');
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col], y = b.cells[col];
        var xv = x.dataset.v, yv = y.dataset.v, r;
        if (xv !== undefined && yv !== undefined) { r = Number(xv) - Number(yv); }
        else if (xv !== undefined) { r = -1; } else if (yv !== undefined) { r = 1; }
        else { r = x.textContent.localeCompare(y.textContent); }
        return asc ? r : -r;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def build_report(path: str | Path, title: str = "editkit report", *, notes: Sequence[str] = (),
                 summary_rows: Sequence[dict] = (), summary_columns: Sequence[str] = (),
                 tables: Sequence[tuple[str, Sequence[dict], Sequence[str]]] = (),
                 table_rows: Sequence[dict] = (), table_columns: Sequence[str] = (),
                 gallery: Sequence[GalleryItem] = (), runs: Sequence[str] = (),
                 plots: Sequence[str | Path] = (),
                 extra_sections: Sequence[tuple[str, str]] = (),
                 extra_images: Sequence[tuple[str, str | Path | Image.Image]] = ()) -> Path:
    """Write the report (atomically) and return its path.

    extra_sections: (heading, HTML body) pairs placed first — the caller's trusted HTML.
    extra_images: (caption, image path or PIL image) pairs, inlined as PNG.
    tables: (heading, rows, columns) tables placed after the summary (not sortable).
    table_rows: per-sample rows, shown sortable in the given order (put the worst first).
    """
    parts = [f"<h1>{html.escape(title)}</h1>"]
    parts += [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    for heading, body in extra_sections:
        parts.append(f"<section><h2>{html.escape(heading)}</h2>{body}</section>")
    if extra_images:
        figures = "".join(f'<figure><img src="{image_data_uri(img, 0, "PNG")}" alt="{html.escape(cap)}">'
                          f"<figcaption>{html.escape(cap)}</figcaption></figure>" for cap, img in extra_images)
        parts.append(f'<section class="plots">{figures}</section>')
    if summary_rows:
        parts.append("<h2>Summary</h2>" + scroll_box(table_html(summary_rows, summary_columns, "summary")))
    for i, (heading, rows, columns) in enumerate(tables):
        parts.append(f"<h2>{html.escape(heading)}</h2>"
                     + scroll_box(table_html(rows, columns, f"table-{i}", sortable=False)))
    if plots:
        figures = "".join(f'<img src="{image_data_uri(p, 0, "PNG")}" alt="{html.escape(Path(p).stem)}">'
                          for p in plots)
        parts.append(f'<h2>Plots</h2><div class="plots">{figures}</div>')
    if gallery:
        parts.append("<h2>Gallery (worst first)</h2>" + scroll_box(gallery_html(gallery, runs)))
    if table_rows:
        parts.append("<h2>Per sample (click a column to sort)</h2>"
                     + scroll_box(table_html(table_rows, table_columns, "samples")))
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<link rel="icon" href="data:,"><style>{_STYLE}</style></head><body>{"".join(parts)}'
            f"<script>{_SCRIPT}</script></body></html>")
    path = Path(path)
    write_text(path, page)
    return path
