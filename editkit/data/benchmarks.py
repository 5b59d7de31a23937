"""Readers for standard edit benchmarks: a local copy of GEdit-Bench, ImgEdit, the MagicBrush test split
or PIE-Bench becomes EditRecords (`editkit data convert --from NAME`). Each record keeps its benchmark's
category in `task` and the benchmark's text fields in `metadata`; masks are written as PNGs (white = edit
region, the editkit convention) and images stored inside the benchmark's files are written out.

The layouts (SOURCE is the benchmark's folder, or the file named here):

- `gedit` (stepfun-ai/GEdit-Bench): rows `key, task_type, instruction, instruction_language (en|cn),
  input_image[, input_image_raw, intersection_exist]` in the Hub's `.parquet` / `.arrow` files (reading
  those needs pyarrow) or in `.json` / `.jsonl` exports, where an image is a path (relative to the file)
  or `{"bytes": ..., "path": ...}` (bytes as base64 text in JSON). One record per row, id
  `<key>_<language>`, task = `task_type`; `languages` keeps only some languages.
- `imgedit` (ImgEdit basic suite): `basic_edit.json` = `{key: {"id": "animal/000342021.jpg", "prompt",
  "edit_type"}}`; images under `singleturn/` (or `Basic/`, as in the Hub's Benchmark.tar) beside it or in
  SOURCE. Id = key, task = `edit_type`.
- `magicbrush` (test or dev split): `edit_sessions.json` = `{img_id: [{"input", "mask", "output",
  "instruction"}, ...]}`, images in `images/<img_id>/`, optional `global_descriptions.json` and
  `local_descriptions.json` (`{img_id: {file name: caption}}`). One record per turn, id `<img_id>_<turn>`,
  task `turn-<n>`; a turn's source is the ground truth of the turn before (as `edit_sessions.json`
  says), MagicBrush's independent ("all-turn") setting. Masks follow DALL-E 2's convention, in which the
  annotators made: a mask file with transparency marks the edit region by its *transparent* pixels;
  one without transparency is read by the editkit rule. The CLIP-T caption (`target_caption`) is the
  output's local description (as MagicBrush's evaluation uses), else its global one.
- `piebench` (PIE-Bench): `mapping_file.json` = `{id: {"image_path", "original_prompt", "editing_prompt",
  "editing_instruction", "editing_type_id", "blended_word", "mask"}}`, images under
  `annotation_images/`. The mask is run-length encoded over the row-major pixels: pairs (start, length)
  of edit-region runs; as PIE-Bench's evaluation does, the one-pixel image border is added to the edit
  region ("to avoid annotation errors in boundary"). PIE-Bench has no edited ground truth — its
  background metrics compare the edit with the source — so the record's target *is* the source
  (`metadata.target_is_source`): the `_out` pixel columns of `editkit eval` are the background
  preservation figures. The CLIP-T caption is the editing prompt (brackets removed).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from editkit.data.images import binarize_mask, has_transparency, open_8bit, oriented_size
from editkit.data.records import EditRecord
from editkit.data.tools import plain_name
from editkit.errors import UserError
from editkit.utils.atomic import atomic_path, write_bytes

PIE_TYPES = {"0": "random", "1": "change_object", "2": "add_object", "3": "delete_object",
             "4": "change_attribute_content", "5": "change_attribute_pose", "6": "change_attribute_color",
             "7": "change_attribute_material", "8": "change_background", "9": "change_style"}
GEDIT_LANGUAGES = ("en", "cn")
_GEDIT_FIELDS = ("key", "task_type", "instruction", "instruction_language", "input_image")
_GEDIT_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json")
_DATASETS_INFO_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")  # `datasets` bookkeeping
_IMAGE_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}


class Assets:
    """Where a reader writes the files it makes: masks/<id>.png and images/<id>.<ext>."""

    def __init__(self, root: Path):
        self.root = root

    def mask(self, record_id: str, mask: Image.Image) -> Path:
        dest = self.root / "masks" / f"{plain_name(record_id, 'record id')}.png"
        with atomic_path(dest) as tmp:
            mask.save(tmp, format="PNG")
        return dest

    def image(self, record_id: str, data: bytes, where: str) -> Path:
        """Encoded image bytes written as they are (no re-encoding), named by their format."""
        try:
            with Image.open(io.BytesIO(data)) as img:
                ext = _IMAGE_FORMATS.get(img.format or "", ".png")
        except (UnidentifiedImageError, OSError) as err:
            raise UserError(f"{where}: the image bytes do not decode ({err.__class__.__name__}); "
                            "re-export the benchmark") from None
        dest = self.root / "images" / f"{plain_name(record_id, 'record id')}{ext}"
        write_bytes(dest, data)
        return dest


# ---------------------------------------------------------------- shared helpers

def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({err.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; is it the benchmark's JSON file?") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: invalid JSON ({err.msg}); re-download the file") from None


def _find(root: Path, name: str, benchmark: str, layout: str) -> Path:
    """`root` itself when it is a JSON file (`name`, or a renamed copy), else root/name or one folder
    down (e.g. test/NAME)."""
    if root.is_file() and root.suffix.lower() == ".json":
        return root
    if not root.exists():
        raise UserError(f"{root}: not found; give the {benchmark} folder")
    candidates = [root / name, *sorted(root.glob(f"*/{name}"))] if root.is_dir() else []
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise UserError(f"{root}: no {name} found (looked in it and one folder down); "
                    f"a {benchmark} folder holds {layout}")


def _text(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: field {field!r} must be non-empty text, found {value!r:.60}")
    return value


def _entries(data: Any, path: Path, what: str) -> Iterable[tuple[str, dict]]:
    """(key, entry) pairs of a benchmark's `{key: {...}}` JSON object, each entry checked to be an object."""
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path}: expected a non-empty JSON object of {what} keyed by id, "
                        f"found {type(data).__name__}; is this the right file?")
    for key, entry in data.items():
        if not isinstance(entry, dict):
            raise UserError(f"{path}[{key!r}]: expected an object, found {type(entry).__name__}")
        yield str(key), entry


def _existing(path: Path, where: str, field: str) -> Path:
    if not path.is_file():
        raise UserError(f"{where}: field {field!r}: image {path} not found; is the benchmark copy complete?")
    return path


# ---------------------------------------------------------------- GEdit-Bench

def _gedit_rows(root: Path) -> Iterable[tuple[str, Path, dict]]:
    """(where, folder that relative paths resolve against, row) for every row of the data files."""
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _GEDIT_SUFFIXES
                       and p.name not in _DATASETS_INFO_FILES)
    else:
        raise UserError(f"{root}: not found; give the GEdit-Bench folder or one of its data files")
    if not files:
        raise UserError(f"{root}: no GEdit-Bench data files (.parquet, .arrow, .jsonl or .json) found")
    for path in files:
        if path.suffix in (".parquet", ".arrow"):
            rows: Iterable[dict] = _arrow_rows(path)
        elif path.suffix == ".jsonl":
            rows = _jsonl_rows(path)
        elif path.suffix == ".json":
            data = _load_json(path)
            if not isinstance(data, list):
                raise UserError(f"{path}: expected a JSON list of GEdit-Bench rows, found {type(data).__name__}")
            rows = data
        else:
            raise UserError(f"{path}: not a GEdit-Bench data file; give a .parquet, .arrow, .jsonl or .json file")
        for i, row in enumerate(rows):
            yield f"{path}[{i}]", path.parent, row


def _jsonl_rows(path: Path) -> Iterable[dict]:
    try:
        lines = path.read_text(encoding="utf-8-sig").split("\n")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read it as UTF-8 text ({err.__class__.__name__})") from None
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{lineno}: invalid JSON ({err.msg}); fix or re-export the file") from None


def _arrow_rows(path: Path) -> list[dict]:
    """Rows of a Hub .parquet file or a `datasets` .arrow file (an Arrow IPC stream), via pyarrow."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise UserError(f"{path}: reading {path.suffix} files needs pyarrow (pip install pyarrow), or export the "
                        "dataset as JSONL with `datasets` (Dataset.to_json) and convert that") from None
    try:
        if path.suffix == ".parquet":
            table = pyarrow.parquet.read_table(path)
        else:
            with pyarrow.memory_map(str(path)) as source:
                table = pyarrow.ipc.open_stream(source).read_all()
    except (pyarrow.ArrowException, OSError) as err:
        raise UserError(f"{path}: cannot read it ({err}); re-download the file") from None
    return table.to_pylist()


def _gedit_image(value: Any, base: Path, where: str, record_id: str, assets: Assets) -> Path:
    """A row's input image: a path, or a `datasets` Image value {"bytes", "path"} (bytes written out)."""
    if isinstance(value, str) and value:
        return _existing(base / value, where, "input_image")
    if isinstance(value, dict):
        data = value.get("bytes")
        if isinstance(data, str):
            try:
                data = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise UserError(f"{where}: field 'input_image': 'bytes' is text but not base64") from None
        if isinstance(data, (bytes, bytearray)) and data:
            return assets.image(record_id, bytes(data), f"{where}: field 'input_image'")
        if isinstance(value.get("path"), str) and value["path"]:
            return _existing(base / value["path"], where, "input_image")
    raise UserError(f"{where}: field 'input_image' must be a path or an image value with 'bytes' or 'path', "
                    f"found {type(value).__name__}")


def read_gedit(root: Path, assets: Assets, languages: Iterable[str] | None = None) -> list[EditRecord]:
    wanted = set(GEDIT_LANGUAGES if languages is None else languages)
    unknown = wanted - set(GEDIT_LANGUAGES)
    if unknown or not wanted:
        raise UserError(f"--lang {','.join(sorted(wanted))}: GEdit-Bench's languages are "
                        f"{', '.join(GEDIT_LANGUAGES)}")
    records = []
    for where, base, row in _gedit_rows(root):
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected an object with fields, found {type(row).__name__}")
        missing = [f for f in _GEDIT_FIELDS if f not in row]
        if missing:
            raise UserError(f"{where}: missing field(s) {', '.join(missing)}; a GEdit-Bench row has "
                            f"{', '.join(_GEDIT_FIELDS)}")
        language = _text(row["instruction_language"], where, "instruction_language").lower()
        if language not in GEDIT_LANGUAGES:
            raise UserError(f"{where}: field 'instruction_language' is {language!r}; expected en or cn")
        if language not in wanted:
            continue
        key = str(row["key"]) if isinstance(row["key"], int) else _text(row["key"], where, "key")
        record_id = f"{key}_{language}"
        metadata = {"benchmark": "gedit", "key": key, "instruction_language": language}
        if "intersection_exist" in row:
            metadata["intersection_exist"] = bool(row["intersection_exist"])
        records.append(EditRecord(
            id=record_id, instruction=_text(row["instruction"], where, "instruction"),
            sources=[_gedit_image(row["input_image"], base, where, record_id, assets)],
            task=_text(row["task_type"], where, "task_type"), metadata=metadata, origin=where))
    return records


# ---------------------------------------------------------------- ImgEdit

_IMGEDIT_IMAGE_DIRS = ("singleturn", "Benchmark/singleturn", "Basic", "Benchmark/Basic", ".")


def read_imgedit(root: Path, assets: Assets) -> list[EditRecord]:
    path = _find(root, "basic_edit.json", "ImgEdit", "basic_edit.json and its images (singleturn/)")
    bases = [base / sub for base in dict.fromkeys([root if root.is_dir() else path.parent, path.parent])
             for sub in _IMGEDIT_IMAGE_DIRS]
    records = []
    for key, entry in _entries(_load_json(path), path, "edits"):
        where = f"{path}[{key!r}]"
        relative = _text(entry.get("id"), where, "id")
        image = next((b / relative for b in bases if (b / relative).is_file()), None)
        if image is None:
            raise UserError(f"{where}: image {relative} not found under {', '.join(str(b) for b in bases[:3])}, ...; "
                            "unpack the benchmark images (Benchmark.tar) next to basic_edit.json")
        records.append(EditRecord(
            id=key, instruction=_text(entry.get("prompt"), where, "prompt"), sources=[image],
            task=_text(entry.get("edit_type"), where, "edit_type"),
            metadata={"benchmark": "imgedit", "image_id": relative}, origin=where))
    return records


# ---------------------------------------------------------------- MagicBrush

def magicbrush_mask(path: Path) -> Image.Image:
    """A MagicBrush mask as "L" 0/255, white = edit region: its transparent pixels when it has
    transparency (DALL-E 2's convention), else the editkit rule (bright = edit region)."""
    img, _ = open_8bit(path, "mask")
    if has_transparency(img):
        alpha = img.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            return alpha.point(lambda v: 255 if v < 128 else 0)
    return binarize_mask(img)


def _captions(folder: Path, name: str) -> dict:
    path = folder / name
    if not path.is_file():
        return {}
    data = _load_json(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object {{img_id: {{file: caption}}}}, found {type(data).__name__}")
    return data


def _caption(captions: dict, session: str, name: str) -> str | None:
    value = captions.get(session, {})
    value = value.get(name) if isinstance(value, dict) else None
    return value if isinstance(value, str) and value.strip() else None


def read_magicbrush(root: Path, assets: Assets) -> list[EditRecord]:
    path = _find(root, "edit_sessions.json", "MagicBrush",
                 "edit_sessions.json and images/<img_id>/ (the test split unpacked)")
    folder = path.parent
    global_captions = _captions(folder, "global_descriptions.json")
    local_captions = _captions(folder, "local_descriptions.json")
    records = []
    for session, turns in _sessions(_load_json(path), path):
        for turn, entry in enumerate(turns, 1):
            where = f"{path}[{session!r}][{turn - 1}]"
            if not isinstance(entry, dict):
                raise UserError(f"{where}: expected an object, found {type(entry).__name__}")
            files = {field: _existing(folder / "images" / session / _text(entry.get(field), where, field), where, field)
                     for field in ("input", "output", "mask")}
            record_id = f"{session}_{turn}"
            output = files["output"].name
            metadata = {"benchmark": "magicbrush", "session": session, "turn": turn, "turns": len(turns)}
            for key, value in (("target_caption", _caption(local_captions, session, output)
                                or _caption(global_captions, session, output)),
                               ("local_description", _caption(local_captions, session, output)),
                               ("global_description", _caption(global_captions, session, output)),
                               ("source_caption", _caption(global_captions, session, files["input"].name))):
                if value is not None:
                    metadata[key] = value
            records.append(EditRecord(
                id=record_id, instruction=_text(entry.get("instruction"), where, "instruction"),
                sources=[files["input"]], target=files["output"],
                mask=assets.mask(record_id, magicbrush_mask(files["mask"])),
                task=f"turn-{turn}", metadata=metadata, origin=where))
    return records


def _sessions(data: Any, path: Path) -> Iterable[tuple[str, list]]:
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path}: expected a non-empty JSON object of edit sessions keyed by image id, "
                        f"found {type(data).__name__}; is this the right file?")
    for session, turns in data.items():
        if not isinstance(turns, list) or not turns:
            raise UserError(f"{path}[{session!r}]: expected a non-empty list of turns")
        yield plain_name(str(session), f"{path}: session id"), turns


# ---------------------------------------------------------------- PIE-Bench

def decode_pie_mask(rle: Any, width: int, height: int, where: str = "mask") -> np.ndarray:
    """PIE-Bench's run-length mask as a bool (height, width) array, True = edit region.

    `rle` is a flat list [start, length, start, length, ...] over the row-major pixels; runs are
    clipped at the image's end (as PIE-Bench's `mask_decode` does). The one-pixel border is then set,
    as PIE-Bench's evaluation does.
    """
    if not isinstance(rle, list) or len(rle) % 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in rle):
        raise UserError(f"{where}: expected a run-length list [start, length, ...] of non-negative integers "
                        f"with an even count, found {str(rle)[:60]}")
    flat = np.zeros(width * height, dtype=bool)
    for start, length in zip(rle[0::2], rle[1::2]):
        flat[start:start + length] = True
    mask = flat.reshape(height, width)
    mask[0, :] = mask[-1, :] = True
    mask[:, 0] = mask[:, -1] = True
    return mask


def _no_brackets(text: str) -> str:
    return text.replace("[", "").replace("]", "")


def read_piebench(root: Path, assets: Assets) -> list[EditRecord]:
    path = _find(root, "mapping_file.json", "PIE-Bench", "mapping_file.json and annotation_images/")
    images = path.parent / "annotation_images"
    records = []
    for key, entry in _entries(_load_json(path), path, "edits"):
        where = f"{path}[{key!r}]"
        image = _existing(images / _text(entry.get("image_path"), where, "image_path"), where, "image_path")
        width, height = oriented_size(image)  # as every editkit job reads the image
        mask = decode_pie_mask(entry.get("mask"), width, height, f"{where}: field 'mask'")
        type_id = str(entry.get("editing_type_id", ""))
        editing_prompt = _no_brackets(_text(entry.get("editing_prompt"), where, "editing_prompt"))
        metadata = {"benchmark": "piebench", "editing_type_id": type_id, "image_path": entry["image_path"],
                    "original_prompt": _no_brackets(str(entry.get("original_prompt", ""))),
                    "editing_prompt": editing_prompt, "target_caption": editing_prompt,
                    "blended_word": entry.get("blended_word", ""), "target_is_source": True}
        records.append(EditRecord(
            id=key, instruction=_text(entry.get("editing_instruction"), where, "editing_instruction"),
            sources=[image], target=image,
            mask=assets.mask(key, Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), "L")),
            task=PIE_TYPES.get(type_id, f"type-{type_id}"), metadata=metadata, origin=where))
    return records


# ---------------------------------------------------------------- the registry and conversion

Reader = Callable[..., list[EditRecord]]
BENCHMARKS: dict[str, Reader] = {"gedit": read_gedit, "imgedit": read_imgedit, "magicbrush": read_magicbrush,
                                 "piebench": read_piebench}


def read_benchmark(name: str, root: str | Path, assets_dir: str | Path,
                   languages: Iterable[str] | None = None) -> list[EditRecord]:
    """The records of a local benchmark copy; masks and embedded images are written under assets_dir."""
    reader = BENCHMARKS.get(name.lower())
    if reader is None:
        raise UserError(f"--from {name!r}: unknown benchmark; use one of {', '.join(BENCHMARKS)}")
    if languages is not None and reader is not read_gedit:
        raise UserError("--lang applies to --from gedit only (the other benchmarks have one language)")
    options = {} if languages is None else {"languages": languages}
    records = reader(Path(root), Assets(Path(assets_dir)), **options)
    if not records:
        raise UserError(f"{root}: the {name} copy holds no records (after --lang); check the folder")
    seen: dict[str, str] = {}
    for record in records:
        plain_name(record.id, f"{record.origin}: id")  # ids name the prediction files (<id>.png)
        if record.id in seen:
            raise UserError(f"{record.origin}: id {record.id!r} is used twice (first at {seen[record.id]})")
        seen[record.id] = record.origin
    return records


def assets_dir_for(out: Path) -> Path:
    """Where the files a conversion makes go, for a manifest `out`: OUT_DIR/<stem>_files/."""
    return out.parent / f"{out.stem}_files"


def convert_benchmark(name: str, root: str | Path, out: str | Path, format: str = "pairs",
                      languages: Iterable[str] | None = None) -> list[EditRecord]:
    """Read a benchmark and write it as a manifest (`format` pairs/diffsynth, container by extension,
    made files in OUT_DIR/<stem>_files/) or as a folder dataset (`format` "folder": made files are
    placed inside it). Returns the records read."""
    from editkit.data.manifest import normalize_format, write_manifest

    out = Path(out)
    if normalize_format(format) == "folder":
        out.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-files.", dir=out.parent))
        try:
            records = read_benchmark(name, root, scratch, languages)
            write_manifest(records, out, "folder")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return records
    records = read_benchmark(name, root, assets_dir_for(out), languages)
    write_manifest(records, out, format)
    return records


def parse_languages(text: str | None) -> list[str] | None:
    """The CLI's --lang 'en,cn' as a list (None when not given)."""
    if text is None:
        return None
    return [part.strip().lower() for part in text.split(",") if part.strip()]

