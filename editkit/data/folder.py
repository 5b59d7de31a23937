"""The folder layout: images in sub-folders named by record id, instructions in a prompts file.

```
DIR/
  prompts.jsonl | prompts.csv | prompts.txt   one entry per id ("id<TAB>instruction" lines in .txt)
  sources/<id>.png        one source image, or sources/<id>/<any>.png for several (name order)
  targets/<id>.png        the edited image (optional: inference-only sets)
  masks/<id>.png          optional edit-region mask (white = edit region)
  ref_gt/<id>.png         optional reference ground truth
```

Entries of prompts.jsonl/.csv use the "pairs" field names (`instruction`, `instruction_cn`,
`task`, ...; other fields become metadata) and may name their images explicitly, which wins
over the sub-folders.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from editkit.data.formats import Row, RowError, assign_ids, read_rows, record_to_row, row_to_record, split_lines
from editkit.data.records import EditRecord
from editkit.data.tools import plain_name, where
from editkit.errors import UserError
from editkit.utils.atomic import atomic_dir, write_text

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
PROMPT_FILES = ("prompts.jsonl", "prompts.csv", "prompts.txt")
IMAGE_DIRS = {"sources": "sources", "targets": "target", "masks": "mask", "ref_gt": "ref_gt"}


def is_folder_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in (*IMAGE_DIRS, *PROMPT_FILES))


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _index_images(folder: Path, problems: list[RowError], allow_dirs: bool) -> dict[str, list[Path]]:
    """id -> image paths found in one sub-folder (a sub-sub-folder per id holds several, if allowed)."""
    found: dict[str, list[Path]] = {}
    if not folder.is_dir():
        return found
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if allow_dirs and entry.is_dir():
            images = sorted(p for p in entry.iterdir() if _is_image(p))
            if images:
                found[entry.name] = images
        elif _is_image(entry):
            if entry.stem in found:
                problems.append(RowError(str(entry), folder.name, "duplicate-id",
                                         f"two images for id {entry.stem!r} ({found[entry.stem][0].name}); keep one"))
                continue
            found[entry.stem] = [entry]
    return found


def find_prompts_file(folder: Path) -> Path:
    present = [folder / n for n in PROMPT_FILES if (folder / n).is_file()]
    if len(present) > 1:
        raise UserError(f"{folder}: several prompts files ({', '.join(p.name for p in present)}); keep one")
    if not present:
        raise UserError(f"{folder}: no prompts file; add prompts.jsonl, prompts.csv or prompts.txt "
                        "(one instruction per record id)")
    return present[0]


def _prompt_rows(path: Path) -> list[Row]:
    if not path.is_file():
        raise UserError(f"{path}: prompts file not found; check the path")
    if path.suffix.lower() != ".txt":
        return list(read_rows(path))
    rows = []
    try:
        lines = split_lines(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        if "\t" not in line:
            rows.append(Row(where, None, error=RowError(where, None, "bad-row",
                                                        "expected 'id<TAB>instruction'; fix the line")))
            continue
        key, instruction = line.split("\t", 1)
        rows.append(Row(where, {"id": key.strip(), "instruction": instruction.strip()}))
    return rows


def parse_folder(folder: Path, fields: dict[str, str] | None = None,
                 ) -> tuple[list[tuple[str, EditRecord]], list[RowError]]:
    """(where, record) for every good record of a folder dataset and a RowError for every bad one."""
    return parse_layout({name: folder / name for name in IMAGE_DIRS}, find_prompts_file(folder), fields)


def parse_layout(dirs: dict[str, Path | None], prompts: Path, fields: dict[str, str] | None = None,
                 ) -> tuple[list[tuple[str, EditRecord]], list[RowError]]:
    """Like parse_folder, with each image folder ("sources", "targets", "masks", "ref_gt") given apart."""
    for name, path in dirs.items():
        if path is not None and path.exists() and not path.is_dir():
            raise UserError(f"{path}: the {name} folder is a file; give a folder of images")
    problems: list[RowError] = []
    images = {name: _index_images(path, problems, allow_dirs=name == "sources") if path else {}
              for name, path in ((n, dirs.get(n)) for n in IMAGE_DIRS)}
    good: list[tuple[str, EditRecord]] = []
    seen: dict[str, str] = {}
    for row in _prompt_rows(prompts):
        try:
            record = row_to_record(row, "pairs", prompts.parent, fields)
        except RowError as err:
            problems.append(err)
            continue
        if not record.id:
            problems.append(RowError(row.where, "id", "missing-id",
                                     "is missing; the folder layout matches images by id"))
            continue
        if record.id in seen:
            problems.append(RowError(row.where, "id", "duplicate-id",
                                     f"id {record.id!r} already used at {seen[record.id]}; ids must be unique"))
            continue
        seen[record.id] = row.where
        if not record.sources:
            record.sources = list(images["sources"].get(record.id, []))
        for name in ("targets", "masks", "ref_gt"):
            attr = IMAGE_DIRS[name]
            if getattr(record, attr) is None and record.id in images[name]:
                setattr(record, attr, images[name][record.id][0])
        good.append((row.where, record))
    for name in ("sources", "targets"):
        for key, paths in images[name].items():
            if key not in seen:
                problems.append(RowError(str(paths[0]), "instruction", "missing-instruction",
                                         f"no prompts entry for id {key!r}; add one"))
    assign_ids([r for _, r in good])
    return good, problems


def _place(src: Path, dest: Path) -> None:
    """Hard-link when possible (same disk, no copy), else copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)




def write_folder(records: list[EditRecord], out: Path) -> None:
    """Lay records out as a folder dataset (images hard-linked or copied); the folder appears whole."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not an empty folder; choose a new output folder")
    for record in records:
        for path in [*record.sources, record.target, record.mask, record.ref_gt]:
            if path is not None and not Path(path).is_file():
                raise UserError(f"{where(record)}: image {path} not found; cannot copy it into {out}")
    with atomic_dir(out) as tmp:
        lines = []
        for record in records:
            name = plain_name(record.id, f"{where(record)}: id")
            placed = EditRecord(**{**record.__dict__, "sources": [], "metadata": dict(record.metadata)})
            if len(record.sources) == 1:
                placed.sources = [tmp / "sources" / f"{name}{record.sources[0].suffix.lower()}"]
            else:
                placed.sources = [tmp / "sources" / name / f"{k:02d}{p.suffix.lower()}"
                                  for k, p in enumerate(record.sources)]
            for src, dest in zip(record.sources, placed.sources):
                _place(Path(src), dest)
            for sub, attr in (("targets", "target"), ("masks", "mask"), ("ref_gt", "ref_gt")):
                src = getattr(record, attr)
                if src is not None:
                    dest = tmp / sub / f"{name}{Path(src).suffix.lower()}"
                    _place(Path(src), dest)
                    setattr(placed, attr, dest)
            lines.append(record_to_row(placed, "pairs", tmp))
        write_text(tmp / "prompts.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))

