"""Is a resumed (or re-run) job's output the same as an uninterrupted run's?

Each function returns a list of differences (empty: equal), written for the report. Strings are
compared after the two output folders' own paths are replaced by `<OUT>`; numbers within a
relative/absolute tolerance (results go through BLAS); PNGs of inference byte for byte.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from bench.reliability.core import TEMP_PREFIXES

RTOL, ATOL = 1e-5, 1e-6


def files(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, Path]:
    """Relative path -> file under folder, without temporary files and the names (or folders) in skip."""
    found = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if not p.is_file() or any(part.startswith(TEMP_PREFIXES) for part in rel.parts):
            continue
        if any(part in skip for part in rel.parts) or rel.name in skip:
            continue
        found[rel.as_posix()] = p
    return found


def same_names(a: dict, b: dict, what: str) -> list[str]:
    out = []
    if missing := sorted(set(a) - set(b)):
        out.append(f"{what}: missing after resume: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    if extra := sorted(set(b) - set(a)):
        out.append(f"{what}: not in the uninterrupted run: {', '.join(extra[:5])}" + (" ..." if len(extra) > 5 else ""))
    return out


def _close(a: float, b: float, rtol: float, atol: float) -> bool:
    if math.isnan(a) and math.isnan(b):
        return True
    return math.isclose(a, b, rel_tol=rtol, abs_tol=atol)


def values(a, b, where: str = "", rtol: float = RTOL, atol: float = ATOL, ignore: tuple[str, ...] = (),
           paths: tuple[str, ...] = ()) -> list[str]:
    """Differences between two JSON-like values (numbers within tolerance; paths normalised)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k in ignore:
                continue
            if k not in a or k not in b:
                out.append(f"{where}.{k}: only in {'the uninterrupted run' if k in a else 'the resumed run'}")
            else:
                out += values(a[k], b[k], f"{where}.{k}", rtol, atol, ignore, paths)
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} items vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b))
                for d in values(x, y, f"{where}[{i}]", rtol, atol, ignore, paths)]
    if isinstance(a, bool) or isinstance(b, bool) or not all(isinstance(v, (int, float)) for v in (a, b)):
        if isinstance(a, str) and isinstance(b, str):
            a, b = normalise(a, paths), normalise(b, paths)
        return [] if a == b else [f"{where}: {str(a)[:60]!r} vs {str(b)[:60]!r}"]
    return [] if _close(float(a), float(b), rtol, atol) else [f"{where}: {a} vs {b}"]


def normalise(text: str, paths: tuple[str, ...]) -> str:
    for p in sorted(paths, key=len, reverse=True):
        text = text.replace(p, "<OUT>")
    return text


def json_file(a: Path, b: Path, rel: str, paths=(), ignore=(), rtol=RTOL, atol=ATOL) -> list[str]:
    try:
        va, vb = json.loads(a.read_text()), json.loads(b.read_text())
    except ValueError as err:
        return [f"{rel}: not JSON ({err})"]
    return values(va, vb, rel, rtol, atol, ignore, paths)


def jsonl_file(a: Path, b: Path, rel: str, paths=()) -> list[str]:
    try:
        la = [json.loads(ln) for ln in a.read_text().splitlines() if ln.strip()]
        lb = [json.loads(ln) for ln in b.read_text().splitlines() if ln.strip()]
    except ValueError as err:
        return [f"{rel}: not JSON lines ({err})"]
    return values(la, lb, rel, paths=paths)


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _cell(v: str):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def csv_file(a: Path, b: Path, rel: str, key: tuple[str, ...] | None = None, paths=(), rtol=RTOL, atol=ATOL,
             ignore=()) -> list[str]:
    """Rows equal (numbers within tolerance); with key, rows are matched by those columns, not order."""
    ra, rb = csv_rows(a), csv_rows(b)
    if key:
        ra = sorted(ra, key=lambda r: tuple(r.get(k, "") for k in key))
        rb = sorted(rb, key=lambda r: tuple(r.get(k, "") for k in key))
    ca = [{k: _cell(v) for k, v in r.items() if v not in ("", None)} for r in ra]
    cb = [{k: _cell(v) for k, v in r.items() if v not in ("", None)} for r in rb]
    return values(ca, cb, rel, rtol, atol, ignore, paths)


def bytes_equal(a: Path, b: Path, rel: str) -> list[str]:
    if a.read_bytes() == b.read_bytes():
        return []
    note = ""
    if rel.endswith(".png"):
        note = pixel_note(a, b)
    return [f"{rel}: bytes differ{note}"]


def pixel_note(a: Path, b: Path) -> str:
    try:
        import numpy as np
        from PIL import Image

        x, y = (np.asarray(Image.open(p)).astype(int) for p in (a, b))
        if x.shape != y.shape:
            return f" (shapes {x.shape} vs {y.shape})"
        return f" (max pixel difference {int(np.abs(x - y).max())})"
    except Exception as err:  # the report says why the pixels could not be compared
        return f" (cannot decode: {err})"


def pixels_close(a: Path, b: Path, rel: str, tol: int = 1) -> list[str]:
    import numpy as np
    from PIL import Image

    x, y = (np.asarray(Image.open(p)).astype(int) for p in (a, b))
    if x.shape != y.shape:
        return [f"{rel}: shapes {x.shape} vs {y.shape}"]
    diff = int(np.abs(x - y).max())
    return [] if diff <= tol else [f"{rel}: max pixel difference {diff} > {tol}"]


def tensors(a: Path, b: Path, rel: str, rtol=1e-4, atol=1e-6) -> list[str]:
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    out = same_names(ta, tb, rel)
    for k in sorted(set(ta) & set(tb)):
        x, y = ta[k].float(), tb[k].float()
        if x.shape != y.shape:
            out.append(f"{rel}:{k}: shapes {tuple(x.shape)} vs {tuple(y.shape)}")
        elif not bool((x - y).abs().le(atol + rtol * y.abs()).all()):
            out.append(f"{rel}:{k}: max difference {float((x - y).abs().max()):.3g}")
    return out


def tree(ref: Path, got: Path, rules: dict[str, str], skip: tuple[str, ...] = (), default: str = "bytes",
         csv_keys: dict[str, tuple] | None = None, json_ignore: tuple[str, ...] = ()) -> list[str]:
    """Compare two output folders file by file; rules map a suffix to bytes/json/jsonl/csv/tensors/pixels/exists."""
    fa, fb = files(ref, skip), files(got, skip)
    out = same_names(fa, fb, got.name)
    paths = (str(ref), str(got), str(ref.resolve()), str(got.resolve()))
    for rel in sorted(set(fa) & set(fb)):
        kind = next((v for k, v in rules.items() if rel.endswith(k)), default)
        a, b = fa[rel], fb[rel]
        if kind == "bytes":
            out += bytes_equal(a, b, rel)
        elif kind == "json":
            out += json_file(a, b, rel, paths, json_ignore)
        elif kind == "jsonl":
            out += jsonl_file(a, b, rel, paths)
        elif kind == "csv":
            out += csv_file(a, b, rel, (csv_keys or {}).get(Path(rel).name), paths)
        elif kind == "tensors":
            out += tensors(a, b, rel)
        elif kind == "pixels":
            out += pixels_close(a, b, rel)
        elif kind != "exists":
            raise ValueError(kind)
    return out


def read_csv_text(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))
