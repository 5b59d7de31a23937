"""`editkit data preview`: one self-contained HTML page to look at a dataset.

Per record: its sources, target and mask overlaid on the first source (red tint over the edit region) as
embedded JPEG thumbnails (longest side `thumb_px`, at most `MAX_THUMB_PX`), its instructions (EN, CN,
inverse EN/CN), task, where it was read and its metadata. Inline JS filters by task and by a numeric
metadata field (a range on its values) and pages through the matches, `page_size` cards a page. The
page needs no network and no files beside it. Every text is HTML-escaped: instructions and metadata
are user data.

Images are read by the image policy (`editkit.data.images`: EXIF applied, transparency over white,
masks by the mask rule); a file that is missing or does not decode shows as a one-line note in its
card, so a preview of a broken dataset still opens (`editkit data validate` lists the problems).
"""

from __future__ import annotations

import html
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

from editkit.data.images import load_image, load_mask
from editkit.data.records import EditRecord
from editkit.errors import UserError
from editkit.eval.report import image_data_uri
from editkit.utils.atomic import write_text
from editkit.utils.progress import parallel_map

PAGE_SIZE = 50
THUMB_PX = 192
MAX_THUMB_PX = 512
DEFAULT_LIMIT = 2000
OVERLAY_RGB = (255, 0, 0)
OVERLAY_OPACITY = 0.5
_META_CHARS = 300  # longest metadata value shown


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _figure(img: Image.Image | str, caption: str, title: str, thumb_px: int) -> str:
    """A thumbnail with its caption, or the note (a str) saying why there is none."""
    if isinstance(img, str):
        return f'<figure class="missing"><div>{_esc(img)}</div><figcaption>{_esc(caption)}</figcaption></figure>'
    uri = image_data_uri(img, thumb_px, "JPEG")
    return (f'<figure><img src="{uri}" alt="{_esc(caption)}" title="{_esc(title)}" loading="lazy">'
            f'<figcaption>{_esc(caption)}</figcaption></figure>')


def _open(path: Path) -> Image.Image | str:
    try:
        return load_image(path)
    except UserError as err:
        return str(err)


def mask_overlay(base: Image.Image, mask_path: Path) -> Image.Image:
    """`base` with the mask's edit region tinted red (the mask resized to it, nearest)."""
    mask = load_mask(mask_path, size=base.size)
    tinted = Image.blend(base, Image.new("RGB", base.size, OVERLAY_RGB), OVERLAY_OPACITY)
    return Image.composite(tinted, base, mask)


def numeric_scores(metadata: dict) -> dict[str, float]:
    """The record's top-level metadata fields holding a finite number (the score filter's fields)."""
    return {str(k): float(v) for k, v in metadata.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _meta_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= _META_CHARS else text[:_META_CHARS] + "…"


def card_html(item: tuple[EditRecord, int]) -> str:
    """One record's card (a top-level function: the process pool pickles it)."""
    record, thumb_px = item
    figures = []
    opened = [(_open(p), p) for p in record.sources]
    for k, (img, path) in enumerate(opened, 1):
        label = "source" if len(opened) == 1 else f"source {k}"
        figures.append(_figure(img, label, str(path), thumb_px))
    target = _open(record.target) if record.target is not None else None
    if target is not None:
        figures.append(_figure(target, "target", str(record.target), thumb_px))
    if record.mask is not None:
        bases = [(img, "source") for img, _ in opened] + [(target, "target")]
        base, under = next(((img, what) for img, what in bases if isinstance(img, Image.Image)), (None, ""))
        try:
            shown = mask_overlay(base, record.mask) if base is not None else load_mask(record.mask).convert("RGB")
            figures.append(_figure(shown, f"mask over {under}" if base is not None else "mask", str(record.mask),
                                   thumb_px))
        except UserError as err:
            figures.append(_figure(str(err), "mask", str(record.mask), thumb_px))
    texts = [(label, value) for label, value in (
        ("instruction", record.instruction), ("instruction (CN)", record.instruction_cn),
        ("inverse", record.inverse_instruction), ("inverse (CN)", record.inverse_instruction_cn)) if value]
    texts_html = "".join(f"<dt>{_esc(label)}</dt><dd>{_esc(value)}</dd>" for label, value in texts)
    meta_html = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(_meta_value(v))}</td></tr>"
                        for k, v in record.metadata.items())
    scores = _esc(json.dumps(numeric_scores(record.metadata)))
    task = record.task or ""
    return (f'<article class="card" data-task="{_esc(task)}" data-scores="{scores}">'
            f'<header><b class="rid">{_esc(record.id)}</b>'
            + (f' <span class="task">{_esc(task)}</span>' if task else "")
            + f' <small>{_esc(record.origin)}</small></header>'
            f'<div class="images">{"".join(figures) or "<p class=note>no images</p>"}</div>'
            f'<dl class="texts">{texts_html}</dl>'
            + (f'<table class="meta">{meta_html}</table>' if meta_html else "")
            + "</article>")


def _controls(records: list[EditRecord]) -> str:
    tasks = Counter(r.task or "" for r in records)
    options = [f'<option value="*">all tasks ({len(records)})</option>'] + [
        f'<option value="{_esc(t)}">{_esc(t or "(no task)")} ({n})</option>' for t, n in sorted(tasks.items())]
    ranges: dict[str, list[float]] = {}
    for r in records:
        for k, v in numeric_scores(r.metadata).items():
            lo_hi = ranges.setdefault(k, [v, v])
            lo_hi[0], lo_hi[1] = min(lo_hi[0], v), max(lo_hi[1], v)
    fields = ['<option value="">no score filter</option>'] + [
        f'<option value="{_esc(k)}" data-min="{lo}" data-max="{hi}">{_esc(k)}</option>'
        for k, (lo, hi) in sorted(ranges.items())]
    return (f'<div id="controls"><label>task <select id="task">{"".join(options)}</select></label> '
            f'<label>score <select id="score-field">{"".join(fields)}</select></label> '
            '<span id="score-range" hidden><label>from <input type="range" id="score-min" step="any"> '
            '<output id="score-min-value"></output></label> <label>to <input type="range" id="score-max" '
            'step="any"> <output id="score-max-value"></output></label></span> '
            '<button id="prev" type="button">&larr; previous</button> <span id="page-label"></span> '
            '<button id="next" type="button">next &rarr;</button></div>')


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1em;color:#222}
#controls{position:sticky;top:0;background:#fff;padding:.5em 0;border-bottom:1px solid #ccc;z-index:2}
#controls label{margin-right:.8em}.note{color:#555;font-size:13px}
#cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,__CARD__px),1fr));gap:.8em;margin-top:.8em}
.card{border:1px solid #ccc;border-radius:4px;padding:.4em;overflow-wrap:anywhere;min-width:0}
.card header{margin-bottom:.4em}.task{background:#e8eefc;border-radius:3px;padding:0 .4em;font-size:13px}
.card small{color:#777}.images{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0;max-width:__PX__px}figure img{display:block;max-width:__PX__px;max-height:__PX__px}
figcaption{font-size:12px;color:#555}figure.missing div{color:#a00;font-size:12px;max-width:__PX__px}
dl.texts{display:grid;grid-template-columns:max-content 1fr;gap:2px 10px;margin:.5em 0}
dt{color:#555;font-size:13px}dd{margin:0}
table.meta{border-collapse:collapse;font-size:12px}table.meta th,table.meta td{border:1px solid #ddd;
padding:1px 5px;text-align:left;vertical-align:top}table.meta th{background:#f6f6f6;font-weight:normal;
white-space:nowrap}
"""

_SCRIPT = """
(function () {
  var PAGE_SIZE = __PAGE_SIZE__;
  var cards = Array.prototype.slice.call(document.querySelectorAll('.card'));
  var scores = cards.map(function (c) { return JSON.parse(c.dataset.scores); });
  var task = document.getElementById('task'), field = document.getElementById('score-field');
  var lo = document.getElementById('score-min'), hi = document.getElementById('score-max');
  var range = document.getElementById('score-range'), label = document.getElementById('page-label');
  var prev = document.getElementById('prev'), next = document.getElementById('next');
  var page = 0, matches = cards;

  function filter() {
    var t = task.value, f = field.value, a = Number(lo.value), b = Number(hi.value);
    matches = cards.filter(function (card, i) {
      if (t !== '*' && card.dataset.task !== t) { return false; }
      if (!f) { return true; }
      var v = scores[i][f];
      return v !== undefined && v >= a && v <= b;
    });
    document.getElementById('score-min-value').textContent = f ? lo.value : '';
    document.getElementById('score-max-value').textContent = f ? hi.value : '';
  }
  function render() {
    var pages = Math.max(1, Math.ceil(matches.length / PAGE_SIZE));
    page = Math.min(page, pages - 1);
    var first = page * PAGE_SIZE, last = first + PAGE_SIZE, shown = new Set(matches.slice(first, last));
    cards.forEach(function (card) { card.hidden = !shown.has(card); });
    label.textContent = 'page ' + (page + 1) + ' of ' + pages + ' \\u00b7 ' + matches.length + ' of ' +
      cards.length + ' records';
    prev.disabled = page === 0;
    next.disabled = page >= pages - 1;
  }
  function update() { filter(); page = 0; render(); }
  field.addEventListener('change', function () {
    var option = field.selectedOptions[0];
    range.hidden = !field.value;
    if (field.value) {
      [lo, hi].forEach(function (input) { input.min = option.dataset.min; input.max = option.dataset.max; });
      lo.value = option.dataset.min;
      hi.value = option.dataset.max;
    }
    update();
  });
  [task, lo, hi].forEach(function (el) { el.addEventListener('input', update); });
  task.addEventListener('change', update);
  prev.addEventListener('click', function () { page -= 1; render(); window.scrollTo(0, 0); });
  next.addEventListener('click', function () { page += 1; render(); window.scrollTo(0, 0); });
  update();
})();
"""


def write_preview(records: list[EditRecord], out: str | Path, title: str = "editkit dataset preview", *,
                  page_size: int = PAGE_SIZE, thumb_px: int = THUMB_PX, limit: int = DEFAULT_LIMIT,
                  workers: int = 1, progress: bool = True) -> Path:
    """Write the preview page of (the first `limit` of) `records` to `out`, atomically."""
    if page_size < 1:
        raise UserError(f"--page-size must be at least 1, got {page_size}")
    if not 16 <= thumb_px <= MAX_THUMB_PX:
        raise UserError(f"--thumb must be 16..{MAX_THUMB_PX} pixels, got {thumb_px} (the page embeds every thumbnail)")
    if limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out}: is a folder; give the page's file name, e.g. {out / 'preview.html'}")
    shown = records[:limit]
    cards = parallel_map(card_html, [(r, thumb_px) for r in shown], "preview", unit="record",
                         workers=workers, disable=not progress)
    style = _STYLE.replace("__PX__", str(thumb_px)).replace("__CARD__", str(3 * thumb_px + 40))
    note = f"{len(records)} records" + (f"; showing the first {limit} (--limit)" if len(records) > limit else "")
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f'<link rel="icon" href="data:,"><style>{style}</style></head><body>'
            f'<h1>{_esc(title)}</h1><p class="note">{_esc(note)}</p>' + _controls(shown)
            + f'<main id="cards">{"".join(cards)}</main>'
            f'<script>{_SCRIPT.replace("__PAGE_SIZE__", str(page_size))}</script></body></html>')
    write_text(out, page)
    return out
