"""Corruption: flip one byte of, or truncate, a file editkit writes or reads, then run the command that reads it.

Passing outcomes: the command exits 0 with the same result as on the clean copy ("correct"), or
exits 2 with one `editkit: error:` line ("refused"), or — `data validate` only — exits 2 with its
problem report on stdout ("reported"). For files editkit protects with a checksum
(cache shards), exit 0 with another result is a failure ("silently wrong"); for files without one
(a flipped weight, a flipped digit in a JSON value) it is counted apart as "changed" — the file
was valid, editkit could not know. A traceback, another exit code or a hang always fails.
Each case's clean copy is run first; if that fails, the case is blocked with its command.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path

from bench.reliability import compare as cmp
from bench.reliability.core import (
    EDITKIT,
    TRACEBACK,
    FixtureError,
    Result,
    Trial,
    blocked,
    round_robin,
    run,
    say,
    trial_rng,
    verdict,
)
from bench.reliability.jobs import JOBS, RUN_MANIFESTS, SIZE, TINY, Workspace

CATEGORY = "corrupt"
NOTE = ("outcomes: correct / refused (exit 2, one line) / reported (validate) / changed (no checksum covers it; "
        "'changed, reported' when the output names the file) pass; the rest fail")
EDIT = ["--prompt", "make it blue", "--steps", "2", "--cfg", "1", "--width", str(SIZE), "--height", str(SIZE), *TINY]


@dataclasses.dataclass
class Setup:
    """A prepared trial folder: the file to damage, the reading command, what its result is."""

    target: Path
    argv: list
    outputs: tuple[str, ...] = ()  # files / folders (relative to the trial folder) whose content is the result
    stdout: bool = True  # stdout is part of the result too
    reports: bool = False  # `data validate`: exit 2 with its problem report on stdout is an answer


@dataclasses.dataclass
class Case:
    name: str
    prepare: Callable[[Workspace, Path], Setup]
    checksummed: bool = False  # editkit verifies a checksum of this file: a changed result is a failure
    safetensors: bool = False  # mutations: header flip, data flip, truncation


def _copy(src: Path, dest: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dest, symlinks=True)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)
    return dest


def _first_record(manifest: Path) -> dict:
    rec = json.loads(manifest.read_text().splitlines()[0])
    return {k: manifest.parent / v for k, v in rec.items() if k in ("source_image", "target_image", "mask")} | {
        "id": rec["id"]}


# ---- the cases --------------------------------------------------------------------------------

def _validate(name: str) -> Callable:
    def prepare(ws, t):
        if name in ("json", "csv"):
            ws.manifest_as(name)  # written into the data fixture, then copied with it
        data = _copy(ws.data(), t / "data")
        first = _first_record(data / "train.jsonl")
        manifest = {"json": data / "train-diffsynth.json", "csv": data / "train-diffsynth.csv"}.get(
            name, data / "train.jsonl")
        target = {"image": first["source_image"], "mask": first["mask"]}.get(name, manifest)
        return Setup(target, [*EDITKIT, "data", "validate", manifest, "--workers", "1"], reports=True)

    return prepare


def _image_build(ws, t):
    data = _copy(ws.data(), t / "data")
    return Setup(_first_record(data / "train.jsonl")["source_image"],
                 [*EDITKIT, "data", "build", data / "train.jsonl", "--out", t / "built", "--workers", "1"], ("built",))


def _built(name: str) -> Callable:
    def prepare(ws, t):
        out = _copy(ws.reference("build-small"), t / "built")
        argv = {"fingerprint.json": JOBS["build-small"].argv(ws, out),
                "manifest.jsonl": [*EDITKIT, "data", "validate", out / "manifest.jsonl", "--workers", "1"]}[name]
        return Setup(out / name, argv, ("built",), reports=name == "manifest.jsonl")

    return prepare


def _model(rel: str) -> Callable:
    def prepare(ws, t):
        model = _copy(ws.model(), t / "model")
        src = _first_record(ws.data() / "train.jsonl")["source_image"]
        return Setup(model / rel, [*EDITKIT, "edit", "--model", model, "--image", src, "--out", t / "o.png", *EDIT],
                     ("o.png",), stdout=False)

    return prepare


def _cache(rel: str, reader: str = "verify") -> Callable:
    def prepare(ws, t):
        cache = _copy(ws.reference("cache"), t / "cache")
        if reader == "verify":
            argv = [*EDITKIT, "cache", "verify", cache]
        elif reader == "rerun":
            argv = JOBS["cache"].argv(ws, cache)
        else:
            argv = [*EDITKIT, "train", ws.train_config(t / "run", max_steps=2, cache=cache)]
        outputs = ("run/final", "run/metrics.csv") if reader == "train" else ()
        return Setup(cache / rel, argv, outputs, stdout=reader != "train")

    return prepare


def _checkpoint(rel: str) -> Callable:
    def prepare(ws, t):
        run_dir = _copy(ws.reference("train"), t / "run")
        last = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
        target = run_dir / rel if rel == "metrics.csv" else last / rel
        cfg = ws.train_config(run_dir, max_steps=8)
        return Setup(target, [*EDITKIT, "train", cfg, "--resume", "latest"], ("run/final", "run/metrics.csv"),
                     stdout=False)

    return prepare


def _train_yaml(ws, t):
    cfg = ws.train_config(t / "run", max_steps=2)
    return Setup(cfg, [*EDITKIT, "train", cfg], ("run/final", "run/metrics.csv"), stdout=False)


def _lora(reader: str) -> Callable:
    def prepare(ws, t):
        lora = _copy(ws.lora(), t / "lora.safetensors")
        if reader == "inspect":
            return Setup(lora, [*EDITKIT, "lora", "inspect", lora])
        src = _first_record(ws.data() / "train.jsonl")["source_image"]
        return Setup(lora, [*EDITKIT, "edit", "--model", ws.model(), "--image", src, "--lora", lora,
                            "--out", t / "o.png", *EDIT], ("o.png",), stdout=False)

    return prepare


def _preds(rel: str) -> Callable:
    def prepare(ws, t):
        preds = _copy(ws.reference("infer"), t / "preds")
        first = sorted((preds / "cfg-1.0").glob("*.png"))[0]
        target = first if rel == "png" else preds / "cfg-1.0" / rel
        if rel == "png":
            argv = [*EDITKIT, "eval", "--pred", preds / "cfg-1.0", "--data", ws.data_mid() / "train.jsonl",
                    "--out", t / "ev", "--metrics", "pixel", "--device", "cpu"]
            return Setup(target, argv, ("ev/per_sample.csv", "ev/summary.json"), stdout=False)
        argv = [*EDITKIT, "infer", "--model", ws.model(), "--data", ws.data_mid() / "train.jsonl", "--out", preds,
                "--steps", "2", "--cfg", "1,4", "--batch-size", "1", "--width", str(SIZE), "--height", str(SIZE), *TINY]
        return Setup(target, argv, ("preds",), stdout=False)

    return prepare


def _eval(rel: str) -> Callable:
    def prepare(ws, t):
        ev = _copy(ws.reference("eval"), t / "ev")
        if rel == "entry":
            target = sorted((ev / "cache" / "cfg-1.0").glob("*.json"))[0]
            preds = ws.reference("infer")
            argv = [*EDITKIT, "eval", "--pred", preds / "cfg-1.0", "--pred", preds / "cfg-4.0", "--data",
                    ws.data_mid() / "train.jsonl", "--out", ev, "--device", "cpu"]
            return Setup(target, argv, ("ev/per_sample.csv", "ev/summary.json"), stdout=False)
        return Setup(ev / rel, [*EDITKIT, "compare", ev, "--out", t / "cmp", "--n-boot", "100"],
                     ("cmp/compare.csv", "cmp/compare.json"))

    return prepare


CASES = {c.name: c for c in (
    Case("manifest-jsonl", _validate("jsonl")),
    Case("manifest-json", _validate("json")),
    Case("manifest-csv", _validate("csv")),
    Case("image", _validate("image")),
    Case("mask", _validate("mask")),
    Case("image-build", _image_build),
    Case("build-fingerprint", _built("fingerprint.json")),
    Case("build-manifest", _built("manifest.jsonl")),
    Case("model-transformer", _model("transformer/diffusion_pytorch_model.safetensors"), safetensors=True),
    Case("model-vae", _model("vae/diffusion_pytorch_model.safetensors"), safetensors=True),
    Case("model-text-encoder", _model("text_encoder/model.safetensors"), safetensors=True),
    Case("model-config", _model("transformer/config.json")),
    Case("model-index", _model("model_index.json")),
    Case("model-tokenizer", _model("tokenizer/tokenizer.json")),
    Case("cache-shard", _cache("shards/r0-00000.safetensors"), checksummed=True, safetensors=True),
    Case("cache-shard-train", _cache("shards/r0-00000.safetensors", "train"), checksummed=True, safetensors=True),
    Case("cache-index", _cache("index-r0.json")),
    Case("cache-json", _cache("cache.json")),
    Case("cache-fingerprint", _cache("fingerprint.json", "rerun")),
    Case("train-config", _train_yaml),
    Case("checkpoint-trainable", _checkpoint("trainable.safetensors"), safetensors=True),
    Case("checkpoint-optimizer", _checkpoint("optimizer.pt")),
    Case("checkpoint-scheduler", _checkpoint("scheduler.pt")),
    Case("checkpoint-rng", _checkpoint("rng.pt")),
    Case("checkpoint-state", _checkpoint("state.json")),
    Case("train-metrics", _checkpoint("metrics.csv")),
    Case("lora-inspect", _lora("inspect"), safetensors=True),
    Case("lora-edit", _lora("edit"), safetensors=True),
    Case("pred-png", _preds("png")),
    Case("infer-fingerprint", _preds("fingerprint.json")),
    Case("infer-run-json", _preds("run.json")),
    Case("eval-entry", _eval("entry")),
    Case("eval-summary", _eval("summary.json")),
    Case("eval-per-sample", _eval("per_sample.csv")),
)}


# ---- damage -------------------------------------------------------------------------------------

def mutations(case: Case) -> tuple[str, ...]:
    return ("flip-header", "flip-data", "truncate") if case.safetensors else ("flip", "truncate")


def damage(path: Path, how: str, rng) -> str:
    """Flip one byte (XOR with a random non-zero mask) or truncate; returns what was done."""
    data = bytearray(path.read_bytes())
    if how == "truncate":
        keep = rng.randrange(0, max(1, len(data)))
        path.write_bytes(bytes(data[:keep]))
        return f"truncated {path.name} from {len(data)} to {keep} bytes"
    if how == "flip-header" and len(data) >= 8:
        header = 8 + struct.unpack("<Q", bytes(data[:8]))[0]
        offset = rng.randrange(0, min(header, len(data)))
    elif how == "flip-data" and len(data) >= 8:
        header = 8 + struct.unpack("<Q", bytes(data[:8]))[0]
        offset = rng.randrange(min(header, len(data) - 1), len(data))
    else:
        offset = rng.randrange(0, len(data))
    mask = rng.randrange(1, 256)
    data[offset] ^= mask
    path.write_bytes(bytes(data))
    return f"flipped byte {offset} of {path.name} ({len(data)} bytes) with XOR 0x{mask:02x}"


# ---- results ------------------------------------------------------------------------------------

def _digest(path: Path, tdir: Path):
    """What a result file says: pixels and tensors as digests, JSON and CSV as values (compared within
    a tolerance: a recomputed metric may differ in its last bits)."""
    if path.suffix == ".png":
        import numpy as np
        from PIL import Image

        try:
            return hashlib.sha256(np.asarray(Image.open(path)).tobytes()).hexdigest()
        except Exception as err:  # an output PNG that does not decode is a result too
            return f"undecodable: {err}"
    if path.suffix == ".safetensors":
        return tensors_digest(path)
    data = path.read_bytes()
    if path.suffix in (".json", ".csv", ".jsonl", ".txt", ".yaml"):
        data = data.replace(str(tdir).encode(), b"<T>")
    if path.suffix == ".json":
        try:
            return ("values", _without_volatile(json.loads(data)))
        except ValueError:
            pass
    if path.suffix == ".csv":
        rows = cmp.read_csv_text(data.decode(errors="replace"))
        return ("values", [{k: cmp._cell(v) for k, v in r.items() if "seconds" not in (k or "")} for r in rows])
    return hashlib.sha256(data).hexdigest()


VOLATILE = ("computed", "seconds", "time")  # how much a run did, not what it found


def _without_volatile(value):
    if isinstance(value, dict):
        return {k: _without_volatile(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_without_volatile(v) for v in value]
    return value


def tensors_digest(path: Path) -> str:
    """A digest of a safetensors file's tensors and metadata (its header's key order is not stable)."""
    from safetensors import safe_open

    h = hashlib.sha256()
    try:
        with safe_open(str(path), framework="pt") as f:
            h.update(json.dumps(sorted((f.metadata() or {}).items())).encode())
            for name in sorted(f.keys()):
                h.update(name.encode())
                h.update(f.get_tensor(name).contiguous().view(-1).view(torch_uint8()).numpy().tobytes())
    except Exception as err:  # an output that does not load is a result too
        return f"unreadable: {err}"
    return h.hexdigest()


def torch_uint8():
    import torch

    return torch.uint8


def result_of(res: Result, setup: Setup, tdir: Path) -> dict:
    out = {"stdout": res.stdout.replace(str(tdir), "<T>")} if setup.stdout else {}
    for rel in setup.outputs:
        p = tdir / rel
        found = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else []
        for f in found:
            name = f.relative_to(tdir).as_posix()
            if f.name in (*RUN_MANIFESTS, "fingerprint.json") or f.name.startswith(".tmp-") or f.suffix == ".pt":
                continue
            out[name] = _digest(f, tdir)
        if not found:
            out[rel] = "missing"
    return out


def _last(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _differs(x, y) -> bool:
    if isinstance(x, tuple) and isinstance(y, tuple):
        return bool(cmp.values(x[1], y[1], rtol=1e-6, atol=1e-9))
    return x != y


def _changed(a: dict, b: dict) -> str:
    """The result files (and stdout) that differ; empty when the results are the same."""
    keys = sorted(k for k in set(a) | set(b) if _differs(a.get(k), b.get(k)))
    return ", ".join(keys[:4]) + (" ..." if len(keys) > 4 else "")


class Baselines:
    """Each case's reading command on a clean copy (run once; it must exit 0)."""

    def __init__(self, ws: Workspace, root: Path):
        self.ws, self.root, self.done = ws, root, {}

    def get(self, case: Case) -> dict:
        if case.name not in self.done:
            tdir = self.root / f"{case.name}-clean"
            shutil.rmtree(tdir, ignore_errors=True)
            tdir.mkdir(parents=True)
            try:
                setup = case.prepare(self.ws, tdir)
                res = run(setup.argv, tdir, tdir / "logs" / "clean", timeout=600)
                if res.rc != 0:
                    raise FixtureError(f"the clean copy's command fails ({verdict(res.rc, res.stderr)[0]})", res)
                self.done[case.name] = result_of(res, setup, tdir)
            except FixtureError as err:
                self.done[case.name] = err
        value = self.done[case.name]
        if isinstance(value, FixtureError):
            raise value
        return value


def corrupt_trial(ws: Workspace, baselines: Baselines, case: Case, how: str, index: int, seed: int,
                  root: Path) -> Trial:
    label = f"{case.name}/{how}#{index}"
    try:
        clean = baselines.get(case)
        tdir = root / f"{case.name}-{how}-{index}"
        shutil.rmtree(tdir, ignore_errors=True)
        tdir.mkdir(parents=True)
        setup = case.prepare(ws, tdir)
    except FixtureError as err:
        return blocked(CATEGORY, label, err)
    what = damage(setup.target, how, trial_rng(seed, CATEGORY, case.name, how, index))
    res = run(setup.argv, tdir, tdir / "logs" / "damaged", timeout=600)
    status, acceptable = verdict(res.rc, res.stderr)
    outcome, passed = status, acceptable
    if status == "ok":
        got = result_of(res, setup, tdir)
        if not _changed(clean, got):
            outcome = "correct"
        elif case.checksummed:
            outcome, passed = "silently wrong", False
        elif setup.target.name in res.stdout + res.stderr:
            outcome = "changed, reported"  # e.g. data build skips the damaged record and names it
        else:
            outcome = "changed"
        detail = f"{what}: exit 0, {outcome}" + (f" ({_changed(clean, got)})" if outcome != "correct" else "")
    elif status == "user-error":
        outcome = "refused"
        detail = f"{what}: exit 2: {res.stderr.strip().splitlines()[-1][:200]}"
    elif setup.reports and res.rc == 2 and TRACEBACK not in res.stderr and "problem" in _last(res.stdout):
        outcome, passed = "reported", True
        detail = f"{what}: exit 2, validate reported: {_last(res.stdout)[:200]}"
    else:
        detail = f"{what}: {status}"
    return Trial(CATEGORY, label, passed, detail, [f"# {what}", res.line], res.tail(8) if not passed else "",
                 res.seconds, {"outcome": outcome})


def run_category(ws: Workspace, n: int, seed: int, deadline: float, root: Path, names: list[str]) -> list[Trial]:
    baselines = Baselines(ws, root)
    plan = round_robin({name: [(CASES[name], mutations(CASES[name])[i % len(mutations(CASES[name]))], i)
                               for i in range(n)] for name in names})
    trials = []
    for case, how, i in plan:
        if time.monotonic() > deadline:
            trials.append(Trial(CATEGORY, f"{case.name}/{how}#{i}", None, "not run: time budget spent"))
            continue
        trials.append(say(corrupt_trial(ws, baselines, case, how, i, seed, root)))
    return trials
