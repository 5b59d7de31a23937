"""The long jobs under test, the tiny inputs they run on, and their uninterrupted reference runs.

`Workspace` builds each input once per campaign (a saved tiny model, synthetic datasets, a cache,
a training run, predictions, an evaluation) under `<out>/work/fixtures/`; every input is itself a
reference run of a `Job`, timed, so the kill category draws its kill moments from that duration
and compares a resumed run's outputs with it. A fixture that fails blocks the trials that need it
(reported with its command), it does not stop the campaign.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from bench.reliability import compare as cmp
from bench.reliability.core import EDITKIT, FixtureError, Result, run, torchrun

SIZE = 32  # image side of the synthetic sets: a trial takes seconds on a CPU
TINY = ["--dtype", "fp32", "--device", "cpu"]
RUN_MANIFESTS = ("run.json", "build.json", "cache.json", "synth.json")  # time and argv inside
# fingerprint.json is what a job compares with itself on a re-run; it is not compared between runs


@dataclasses.dataclass
class Job:
    """A resumable job: how to start it into `out`, how to re-run it, how to judge its outputs."""

    name: str
    argv: Callable[["Workspace", Path], list]
    compare: Callable[[Path, Path], list[str]]
    units: tuple[str, ...] = ()  # globs (under out) of finished pieces a re-run must keep, not redo
    resume_args: tuple[str, ...] = ()  # added for the re-run (train: --resume latest)
    timeout: float = 900
    unit: Callable[[str], str] = lambda rel: rel  # the piece a file belongs to (finished: all its files exist)

    def resume(self, ws: "Workspace", out: Path) -> list:
        return [*self.argv(ws, out), *self.resume_args]


# ---- how outputs are compared ---------------------------------------------------------------

def compare_build(ref: Path, got: Path) -> list[str]:
    return cmp.tree(ref, got, {".png": "bytes", ".jsonl": "jsonl", ".json": "json"},
                    skip=(*RUN_MANIFESTS, "fingerprint.json"))


def compare_infer(ref: Path, got: Path) -> list[str]:
    skip = (*RUN_MANIFESTS, *[f"run-rank{r}.json" for r in range(8)])
    return cmp.tree(ref, got, {".png": "bytes", ".json": "json"}, skip=(*skip, "fingerprint.json"))


def compare_cache(ref: Path, got: Path) -> list[str]:
    """Same records with the same tensors (shard layout may differ after a kill), and a clean verify."""
    from editkit.errors import UserError
    from editkit.train.cache import CacheReader

    try:
        a, b = CacheReader(ref), CacheReader(got)
        b.verify()
    except UserError as err:
        return [f"cache verify: {err}"]
    out = cmp.same_names(dict.fromkeys(a.ids), dict.fromkeys(b.ids), "records")
    for rid in sorted(set(a.ids) & set(b.ids)):
        ta, tb = a.get(rid), b.get(rid)
        out += cmp.same_names(ta, tb, rid)
        for name in sorted(set(ta) & set(tb)):
            x, y = ta[name].float(), tb[name].float()
            if x.shape != y.shape or not bool((x - y).abs().le(1e-6 + 1e-4 * y.abs()).all()):
                out.append(f"{rid}/{name}: tensors differ")
    for bucket in sorted(set(a.white) | set(b.white)):
        if bucket not in a.white or bucket not in b.white:
            out.append(f"white/{bucket}: in one cache only")
    return out


def compare_train(ref: Path, got: Path) -> list[str]:
    out = []
    if not (got / "metrics.csv").is_file():
        return ["metrics.csv missing"]
    rows_a, rows_b = cmp.csv_rows(ref / "metrics.csv"), cmp.csv_rows(got / "metrics.csv")
    steps_b = [r["step"] for r in rows_b]
    if len(steps_b) != len(set(steps_b)):
        out.append(f"metrics.csv: steps logged twice: {steps_b}")
    out += cmp.values([{k: cmp._cell(v) for k, v in r.items() if v and k != "step_seconds"} for r in rows_a],
                      [{k: cmp._cell(v) for k, v in r.items() if v and k != "step_seconds"} for r in rows_b],
                      "metrics.csv")
    out += cmp.tree(ref, got, {".safetensors": "tensors", ".png": "pixels", ".yaml": "exists", ".json": "exists"},
                    skip=(*RUN_MANIFESTS, "tensorboard", "optimizer.pt", "scheduler.pt", "rng.pt", "metrics.csv",
                          "fingerprint.json"))
    return out


def compare_eval(ref: Path, got: Path) -> list[str]:
    out = cmp.same_names(cmp.files(ref, ("cache", "parts")), cmp.files(got, ("cache", "parts")), got.name)
    for name in ("per_sample.csv", "summary.json", "missing.txt"):
        a, b = ref / name, got / name
        if not (a.is_file() and b.is_file()):
            continue
        if name.endswith(".csv"):
            out += cmp.csv_file(a, b, name, key=("run", "id"), rtol=1e-4, atol=1e-5)
        elif name.endswith(".json"):
            out += cmp.json_file(a, b, name, (str(ref), str(got)), ignore=("computed", "seconds", "time"), rtol=1e-4,
                                 atol=1e-5)
        else:
            out += cmp.bytes_equal(a, b, name)
    return out


def compare_compare(ref: Path, got: Path) -> list[str]:
    return cmp.tree(ref, got, {".csv": "csv", ".json": "json", ".png": "exists", ".html": "exists"})


# ---- the jobs -------------------------------------------------------------------------------

def _build(ws, out):
    return [*EDITKIT, "data", "build", ws.data_big() / "train.jsonl", "--out", out, "--area", "1024",
            "--multiple", "32", "--workers", "1"]


def _build_small(ws, out):
    return [*EDITKIT, "data", "build", ws.data() / "train.jsonl", "--out", out, "--workers", "1"]


def _cache(ws, out):
    return [*EDITKIT, "cache", "--model", ws.model(), "--data", ws.data_mid() / "train.jsonl", "--out", out,
            "--area", "1024", "--multiple", "16", "--dtype", "fp32", "--shard-records", "1", "--batch-size", "1"]


def _train(variant: str, nproc: int = 1):
    def argv(ws, out):
        launcher = torchrun(nproc) if nproc > 1 else EDITKIT
        return [*launcher, "train", ws.train_config(out, validation=variant == "val")]

    return argv


def _infer(nproc: int):
    def argv(ws, out):
        launcher = torchrun(nproc) if nproc > 1 else EDITKIT
        return [*launcher, "infer", "--model", ws.model(), "--data", ws.data_mid() / "train.jsonl", "--out", out,
                "--steps", "2", "--cfg", "1,4", "--batch-size", "1", "--width", str(SIZE), "--height", str(SIZE), *TINY]

    return argv


def _eval(ws, out):
    preds = ws.reference("infer")
    return [*EDITKIT, "eval", "--pred", preds / "cfg-1.0", "--pred", preds / "cfg-4.0", "--data",
            ws.data_mid() / "train.jsonl", "--out", out, "--device", "cpu"]


def _compare(ws, out):
    return [*EDITKIT, "compare", ws.reference("eval"), "--out", out, "--n-boot", "200", "--seed", "0"]


TRAIN_UNITS = ("checkpoints/step-*/trainable.safetensors",)
JOBS = {job.name: job for job in (
    Job("build", _build, compare_build, units=("images/*/*.png",), unit=lambda rel: rel.rsplit("/", 1)[0]),
    Job("build-small", _build_small, compare_build, units=("images/*/*.png",), unit=lambda rel: rel.rsplit("/", 1)[0]),
    Job("cache", _cache, compare_cache, units=("shards/*.safetensors",)),
    Job("train", _train("plain"), compare_train, TRAIN_UNITS, ("--resume", "latest")),
    Job("train-val", _train("val"), compare_train, TRAIN_UNITS, ("--resume", "latest")),
    Job("train-ddp", _train("plain", 2), compare_train, TRAIN_UNITS, ("--resume", "latest")),
    Job("infer", _infer(1), compare_infer, units=("cfg-*/*.png",)),
    Job("infer-ddp", _infer(2), compare_infer, units=("cfg-*/*.png",)),
    Job("eval", _eval, compare_eval, units=("cache/*/*.json",)),
    Job("compare", _compare, compare_compare),
)}


def first_piece(out: Path, units: tuple[str, ...]) -> float:
    """The modification time of the earliest finished piece under out (any file when units is empty)."""
    found = [p for pattern in (units or ("**/*",)) for p in out.glob(pattern) if p.is_file()]
    return min((p.stat().st_mtime for p in found), default=time.time())


# ---- the workspace --------------------------------------------------------------------------

class Workspace:
    """Inputs built once per campaign; each method returns a path or raises FixtureError (remembered)."""

    def __init__(self, root: Path):
        self.root = root
        self.fixtures = root / "fixtures"
        self._done: dict[str, object] = {}
        self.seconds: dict[str, float] = {}
        self.work_starts: dict[str, float] = {}  # job -> seconds from its start to its first finished piece

    def _once(self, name: str, make: Callable[[], object]):
        if name not in self._done:
            try:
                self._done[name] = make()
            except FixtureError as err:
                self._done[name] = err
        value = self._done[name]
        if isinstance(value, FixtureError):
            raise value
        return value

    def _run(self, name: str, argv: list, cwd: Path | None = None, timeout: float = 900) -> Result:
        cwd = cwd or self.fixtures
        res = run(argv, cwd, self.fixtures / "logs" / name, timeout=timeout)
        if res.rc != 0:
            raise FixtureError(f"fixture {name} failed ({'timeout' if res.rc is None else f'exit {res.rc}'})", res)
        self.seconds[name] = res.seconds
        return res

    def model(self) -> Path:
        def make():
            path = self.fixtures / "model"
            shutil.rmtree(path, ignore_errors=True)
            self._run("model", [*EDITKIT, "model", "save-tiny", path])
            return path

        return self._once("model", make)

    def _synth(self, name: str, n: int, size: int) -> Path:
        def make():
            path = self.fixtures / name
            shutil.rmtree(path, ignore_errors=True)
            self._run(name, [*EDITKIT, "data", "synth", "--out", path, "--n", str(n), "--size", str(size),
                             "--workers", "1"])
            return path

        return self._once(name, make)

    def data(self) -> Path:
        """8 synthetic records of 32 px: train (6), val and test."""
        return self._synth("data", 8, SIZE)

    def data_mid(self) -> Path:
        """30 records of 32 px, for cache, infer and eval (24 in train: 48 images at two CFG values)."""
        return self._synth("data-mid", 30, SIZE)

    def data_big(self) -> Path:
        """1500 records of 64 px, for `data build` (long enough to be killed while it works)."""
        return self._synth("data-big", 1500, 64)

    def manifest_as(self, ext: str) -> Path:
        """data/train.jsonl converted to the DiffSynth schema as .json or .csv."""
        def make():
            path = self.data() / f"train-diffsynth.{ext}"
            self._run(f"convert-{ext}", [*EDITKIT, "data", "convert", self.data() / "train.jsonl", path,
                                         "--to", "diffsynth"])
            return path

        return self._once(f"manifest-{ext}", make)

    def train_config(self, out: Path, validation: bool = False, max_steps: int = 6, cache: Path | None = None) -> Path:
        """A tiny LoRA run on the cache (or another copy of it): 6 steps, checkpoints every 2; with
        validation and previews when asked."""
        cfg = {"stage": "edit", "model": str(self.model()), "output_dir": str(out), "seed": 0,
               "data": {"cache": [str(cache or self.reference("cache"))], "area": SIZE * SIZE, "multiple": 16,
                        "batch_size": 2},
               "train": {"mode": "lora", "lora": {"rank": 4}},
               "optim": {"name": "adamw", "lr": 1e-3, "schedule": "constant", "warmup_steps": 0},
               "loop": {"max_steps": max_steps, "checkpoint_every": 2, "keep_last": 2, "tensorboard": False,
                        "mixed_precision": "no"}}
        if validation:
            cfg["data"]["val"] = str(self.data() / "val.jsonl")
            cfg["loop"].update(validate_every=2, val_samples=1, preview_every=3, preview_steps=2)
        path = out.parent / f"{out.name}-{'val' if validation else 'plain'}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    def reference(self, job_name: str) -> Path:
        """The job's uninterrupted run (its output folder); its duration is in self.seconds[job_name]."""
        def make():
            job = JOBS[job_name]
            out = self.fixtures / f"ref-{job_name}" / "out"
            shutil.rmtree(out.parent, ignore_errors=True)
            out.parent.mkdir(parents=True)
            argv = job.argv(self, out)  # builds the inputs it needs first: they are not part of the run
            started = time.time()
            self._run(job_name, argv, cwd=out.parent, timeout=job.timeout)
            self.work_starts[job_name] = first_piece(out, job.units) - started
            return out

        return self._once(f"ref-{job_name}", make)

    def mix_root(self) -> Path:
        """A folder of two datasets (copies of data/) for `editkit data mix`."""
        def make():
            root = self.fixtures / "mix"
            shutil.rmtree(root, ignore_errors=True)
            for name in ("a", "b"):
                shutil.copytree(self.data(), root / name)
            return root

        return self._once("mix", make)

    def lora(self) -> Path:
        return self.reference("train") / "final" / "pytorch_lora_weights.safetensors"

    def blocked_by(self) -> dict[str, str]:
        return {k: str(v) for k, v in self._done.items() if isinstance(v, FixtureError)}
