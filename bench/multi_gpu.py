r"""Several GPUs (issue #7): dataset-editing throughput and LoRA-training scaling with world size.

Sub-commands (each prints a readable line or table; results are JSON):

  save-model    full-size (or tiny) Qwen-Image-Edit-2511 with seeded random weights, built on the
                GPU and saved as a diffusers-format folder that `editkit.models.load_model` loads
  infer         `editkit.infer.dataset_run.run_dataset` through the real editkit path, one process
                per GPU (torchrun); times the editing only and appends a JSON line to
                OUT/multi_gpu.jsonl; optionally then builds a training cache
  summary       markdown table of a multi_gpu.jsonl: images/s and speed-up of each world size vs 1
  train-config  an editkit training YAML (configs/lora_2511.yaml, changed for timing): LoRA r64 on
                DiffSynth's default targets, batch 1, gradient checkpointing, from a cache folder
  summary-train steps/s and samples/s of editkit training runs (one per world size), speed-up vs 1

On the GPU machine (2 GPUs; wheels in .whl/ as in docs/benchmarks.md; editkit from the working
tree), results straight into $OUT (big outputs stay in /tmp):

  M=/tmp/full2511; W=/tmp/mg; J=$OUT/multi_gpu.jsonl
  python3 bench/multi_gpu.py save-model --preset full --out $M --jsonl $J
  python3 bench/multi_gpu.py infer --model $M --images 8 --size 512 --steps 10 --out $W --jsonl $J
  torchrun --nproc-per-node 2 bench/multi_gpu.py infer --model $M --images 8 --size 512 --steps 10 \
      --out $W --jsonl $J --cache-out /tmp/mgcache --cache-records 8
  python3 bench/multi_gpu.py train-config --model $M --cache /tmp/mgcache --out $W/train.yaml --steps 10
  python3 -m editkit train $W/train.yaml output_dir=$W/train-ws1
  python3 -m accelerate.commands.launch --config_file configs/accelerate/ddp.yaml --num_processes 2 \
      -m editkit train $W/train.yaml output_dir=$W/train-ws2
  python3 bench/multi_gpu.py summary-train $W/train-ws1 $W/train-ws2 --jsonl $J
  python3 bench/multi_gpu.py summary $J          # both tables, speed-ups vs 1 GPU

The infer runs write their edits to a fresh folder per setting (OUT/edits/ws<N>-...), so runs at
several world sizes can share --out. The cache is built after the timed editing on every rank
(sharded), by the model loaded again as the trainer loads it: sources at the folder's VAE view
(1024x1024 for the full preset), not at --size.

CPU test of every sub-command on the tiny preset: tests/test_bench_multi_gpu.py.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `torchrun bench/multi_gpu.py` puts bench/ first, not the repository
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from editkit.errors import UserError  # noqa: E402

JSONL = "multi_gpu.jsonl"
SKIP_STEPS = 2
"""Training steps left out of the timing (allocator warm-up, cuDNN/cuBLAS plans, first all-reduce)."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _gib(n_bytes: float) -> float:
    return round(n_bytes / 2**30, 2)


# ---- save-model -------------------------------------------------------------------------------


def save_model(preset_name: str, out: str | Path, device: str | None = None, seed: int = 0,
               force: bool = False) -> dict:
    """Build `preset_name`'s model with random weights on `device` and save it as a model folder.

    `editkit.models.presets` builds it (bf16 on a GPU, float32 on the CPU) and
    `editkit.models.loading.save_model` writes it, as `save_tiny` does, with the preset and seed
    in model_index.json: a folder this command wrote for the same preset and seed is kept
    unless `force`.
    """
    import torch

    from bench.fullsize import PRESETS, bench_dtype, build_model
    from editkit.models.loading import inspect_folder
    from editkit.models.loading import save_model as write_model

    if preset_name not in PRESETS:
        raise UserError(f"--preset {preset_name!r}: use one of {', '.join(PRESETS)}")
    preset = PRESETS[preset_name]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if preset.name == "full" and not str(device).startswith("cuda"):
        raise UserError("--preset full builds 28 B parameters: it needs a GPU (use --preset tiny on the CPU)")
    out = Path(out)
    index_path = out / "model_index.json"
    if index_path.is_file() and not force:
        index = json.loads(index_path.read_text())
        if index.get("_editkit_bench_preset") == preset.name and index.get("_editkit_bench_seed") == seed:
            inspect_folder(out, None, None)
            row = {"kind": "save-model", "preset": preset.name, "out": str(out), "reused": True,
                   "gib_on_disk": _gib(_folder_bytes(out))}
            print(f"save-model: {out} already holds preset {preset.name} (seed {seed}); kept (--force rewrites)")
            return row
    dtype = bench_dtype(device)

    t0 = time.perf_counter()
    model = build_model(preset, device, seed)
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    params = {name: sum(p.numel() for p in module.parameters()) for name, module in model.modules().items()}

    t1 = time.perf_counter()
    write_model(model, out, extra={"bench_preset": preset.name, "bench_seed": seed})
    save_s = time.perf_counter() - t1
    inspect_folder(out, None, None)  # what load_model checks first
    size = _folder_bytes(out)
    row = {"kind": "save-model", "preset": preset.name, "out": str(out), "device": str(device), "dtype": str(dtype),
           "parameters": params, "build_s": round(build_s, 2), "save_s": round(save_s, 2),
           "gib_on_disk": _gib(size), "write_gb_s": round(size / 1e9 / save_s, 2) if save_s > 0 else None}
    print(f"save-model: {preset.name} preset ({sum(params.values()) / 1e6:,.1f} M parameters, "
          f"{row['gib_on_disk']} GiB) built in {build_s:.1f} s, saved to {out} in {save_s:.1f} s "
          f"({row['write_gb_s']} GB/s)")
    print(json.dumps(row))
    return row


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ---- infer ------------------------------------------------------------------------------------


class _World:
    """This process's place in a torchrun job, and the collectives the benchmark needs."""

    def __init__(self, device: str | None, timeout_s: float):
        import torch

        from editkit.utils import dist

        self.rank, self.size, self.local_rank = dist.rank(), dist.world_size(), dist.local_rank()
        cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
        if device is None or device == "cuda":
            device = f"cuda:{self.local_rank}" if cuda else "cpu"
        self.device = device
        self.cuda = device.startswith("cuda")
        if self.cuda:
            if torch.device(device).index is not None and torch.device(device).index >= torch.cuda.device_count():
                raise UserError(f"rank {self.rank}: {device} does not exist ({torch.cuda.device_count()} GPU(s) "
                                "visible); start at most one process per GPU")
            torch.cuda.set_device(torch.device(device))
        self.group = None
        if self.size > 1:
            import torch.distributed as tdist

            tdist.init_process_group("nccl" if self.cuda else "gloo",
                                     timeout=_dt.timedelta(seconds=timeout_s))
            self.group = tdist

    def barrier(self) -> None:
        if self.group is None:
            return
        if self.cuda:
            import torch

            self.group.barrier(device_ids=[torch.device(self.device).index])
        else:
            self.group.barrier()

    def gather(self, obj) -> list:
        if self.group is None:
            return [obj]
        out = [None] * self.size
        self.group.all_gather_object(out, obj)
        return out

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        if self.group is not None:
            self.group.destroy_process_group()


def _synth_manifest(folder: Path, n: int, size: int) -> Path:
    """The synthetic shapes set (editkit data synth), all in train.jsonl; reused when it exists."""
    from editkit.data.synth import synthesize

    manifest = folder / "train.jsonl"
    if manifest.is_file() and sum(1 for line in manifest.read_text().splitlines() if line.strip()) == n:
        return manifest
    return synthesize(folder, n=n, size=size, seed=0, val_fraction=0.0, test_fraction=0.0, progress=False)["train"]


def infer(args) -> dict | None:
    """One rank of the dataset-editing benchmark; rank 0 returns (and appends) the result row."""
    import shutil

    import torch

    from editkit.data import read_manifest
    from editkit.data.images import load_image
    from editkit.infer.dataset_run import DatasetRunConfig, run_dataset
    from editkit.infer.engine import EditRequest, Engine
    from editkit.models import load_model

    if args.images < 1:
        raise UserError(f"--images must be at least 1, got {args.images}")
    if args.size < 32 or args.size % 32:
        raise UserError(f"--size {args.size}: use a multiple of 32 (e.g. 512 or 1024)")
    if args.steps < 2:
        raise UserError(f"--steps must be at least 2 (flow sampler), got {args.steps}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not str(args.model).startswith("tiny"):
        from editkit.models.loading import inspect_folder

        inspect_folder(Path(args.model), None, None)  # a bad folder fails before any work
    out = Path(args.out)
    jsonl = Path(args.jsonl) if args.jsonl else out / JSONL
    world = _World(args.device, args.dist_timeout)
    try:
        cuda = world.cuda
        dtype = args.dtype if args.dtype != "auto" else ("bf16" if cuda else "fp32")
        tag = f"ws{world.size}-n{args.images}-s{args.size}-t{args.steps}" + ("-accel" if args.accel else "")
        edits = out / "edits" / tag
        synth = out / "data" / f"n{args.images}-s{args.size}"
        manifest = Path(args.data) if args.data else synth / "train.jsonl"
        if world.rank == 0:  # a fresh output folder, so no edit is skipped as already done
            out.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(edits, ignore_errors=True)
            if not args.data:
                _synth_manifest(synth, args.images, args.size)
        world.barrier()
        records = read_manifest(manifest)[:args.images]
        if len(records) < args.images:
            raise UserError(f"{manifest}: {len(records)} record(s), --images asks for {args.images}")
        if len(records) < world.size:
            raise UserError(f"--images {args.images} is fewer than the {world.size} processes; give each GPU work")

        t0 = time.perf_counter()
        model = load_model(args.model, dtype=dtype, device=world.device, vae_image_size=args.size)
        if args.accel:
            from editkit.models import accel

            accel.apply_accel(model)
        world.sync()
        load_s = time.perf_counter() - t0
        engine = Engine(model, model_name=str(args.model), max_batch=args.batch_size)
        negative = " " if args.cfg > 1 else None
        config = DatasetRunConfig(cfgs=(args.cfg,), steps=args.steps, seed=0, negative_prompt=negative,
                                  width=args.size, height=args.size, batch_size=args.batch_size)

        # warm-up: one batch shaped as this rank's first timed batch, a few steps, not saved
        from editkit.utils import dist

        mine = dist.shard(records)
        warm = [EditRequest(prompt=r.instruction, images=[load_image(p) for p in r.sources], negative_prompt=negative,
                            true_cfg_scale=args.cfg, steps=args.warmup_steps, seed=0, width=args.size,
                            height=args.size) for r in mine[:min(args.batch_size, len(mine))]]
        t1 = time.perf_counter()
        if warm and args.warmup_steps > 0:
            engine.edit(warm, max_batch=args.batch_size)
        world.sync()
        warmup_s = time.perf_counter() - t1

        world.barrier()
        if cuda:
            torch.cuda.reset_peak_memory_stats(world.device)
        world.sync()
        t2 = time.perf_counter()
        result = run_dataset(engine, records, edits, config, show_progress=world.rank == 0 and not args.quiet)
        world.sync()
        rank_s = time.perf_counter() - t2
        world.barrier()
        wall_s = time.perf_counter() - t2  # after the barrier: the slowest rank's time
        if result.skipped:
            raise UserError(f"{edits}: {result.skipped} edit(s) existed and were skipped; remove the folder")
        mine_row = {
            "rank": world.rank, "device": world.device,
            "device_name": torch.cuda.get_device_name(world.device) if cuda else platform.processor() or "cpu",
            "images": len(result.written), "edit_s": round(rank_s, 3), "load_s": round(load_s, 2),
            "warmup_s": round(warmup_s, 2),
            "peak_gib": _gib(torch.cuda.max_memory_allocated(world.device)) if cuda else None,
            "reserved_gib": _gib(torch.cuda.max_memory_reserved(world.device)) if cuda else None,
        }
        ranks = world.gather(mine_row)
        walls = world.gather(wall_s)
        row = None
        if world.rank == 0:
            images = sum(r["images"] for r in ranks)
            wall = max(walls)
            peaks = [r["peak_gib"] for r in ranks if r["peak_gib"] is not None]
            row = {
                "kind": "infer", "time": _now(), "world_size": world.size, "model": str(args.model),
                "device_name": ranks[0]["device_name"], "host": platform.node(), "torch": torch.__version__,
                "images": images, "size": args.size, "steps": args.steps, "batch_size": args.batch_size,
                "cfg": args.cfg, "true_cfg": negative is not None, "accel": bool(args.accel), "dtype": dtype,
                "warmup_steps": args.warmup_steps,
                "edit_s": round(wall, 3), "images_per_s": round(images / wall, 4),
                "s_per_image": round(wall / images, 3), "gpu_s_per_image": round(wall * world.size / images, 3),
                "load_s": max(r["load_s"] for r in ranks), "warmup_s": max(r["warmup_s"] for r in ranks),
                "peak_gib": max(peaks) if peaks else None, "per_rank": ranks, "outputs": str(edits),
            }
            _append_jsonl(jsonl, row)
            peak = f"peak {row['peak_gib']} GiB/rank" if peaks else "CPU"
            print(f"multi_gpu infer: world {world.size}, {images} images {args.size}x{args.size} x {args.steps} steps "
                  f"(cfg {args.cfg}, {'accel' if args.accel else 'eager'}, batch {args.batch_size}): "
                  f"{wall:.2f} s, {row['images_per_s']:.3f} img/s, {row['s_per_image']:.2f} s/img; "
                  f"load {row['load_s']:.1f} s, warm-up {row['warmup_s']:.1f} s; {peak} -> {jsonl}", flush=True)
        if args.cache_out:
            del engine, model  # the cache gets its own model (other views); one in memory at a time
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            cache_row = _build_cache(args, dtype, world, out, jsonl)
            if row is not None:
                row["cache"] = cache_row
        return row
    finally:
        world.close()


def _build_cache(args, dtype: str, world: _World, out: Path, jsonl: Path) -> dict | None:
    """An `editkit cache` of synthetic records (sharded by rank) with the model loaded as the trainer
    loads it: sources at the folder's VAE view, where the editing saw them at --size."""
    from editkit.models import load_model
    from editkit.train.cache import build_cache

    t0 = time.perf_counter()
    model = load_model(args.model, dtype=dtype, device=world.device)
    world.sync()
    load_s = time.perf_counter() - t0
    side = math.isqrt(args.cache_area)
    folder = out / "data" / f"train-n{args.cache_records}-s{side}"
    if world.rank == 0:
        _synth_manifest(folder, args.cache_records, side)
    world.barrier()
    t0 = time.perf_counter()
    result = build_cache(str(args.model), folder / "train.jsonl", args.cache_out, args.cache_area, args.cache_multiple,
                         progress=world.rank == 0 and not args.quiet, model=model)
    world.sync()
    world.barrier()
    seconds = time.perf_counter() - t0
    counts = world.gather(result["records"] + result["skipped"])
    if world.rank != 0:
        return None
    row = {"kind": "cache", "time": _now(), "world_size": world.size, "records": sum(counts),
           "area": args.cache_area, "multiple": args.cache_multiple, "out": str(args.cache_out),
           "seconds": round(seconds, 2), "load_s": round(load_s, 2)}
    _append_jsonl(jsonl, row)
    print(f"multi_gpu cache: {sum(counts)} records at {side}x{side} into {args.cache_out} in {seconds:.1f} s "
          f"({world.size} process(es))", flush=True)
    return row


def _append_jsonl(path: Path, row: dict) -> None:
    from editkit.utils.atomic import write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.is_file() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    write_text(path, old + json.dumps(row) + "\n")


# ---- summary ----------------------------------------------------------------------------------


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: not found; give the multi_gpu.jsonl that `infer` wrote under its --out")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{i}: not a JSON line ({err}); remove the line") from None
    return rows


def _setting(row: dict) -> tuple:
    return (row["model"], row["images"], row["size"], row["steps"], row["batch_size"], row["cfg"], row["accel"])


def summarize_infer(rows: list[dict]) -> list[dict]:
    """Each infer row with its speed-up against the latest world-size-1 row of the same setting."""
    infer_rows = [r for r in rows if r.get("kind") == "infer"]
    base = {}
    for r in infer_rows:
        if r["world_size"] == 1:
            base[_setting(r)] = r
    out = []
    for r in infer_rows:
        b = base.get(_setting(r))
        speedup = r["images_per_s"] / b["images_per_s"] if b else None
        out.append({**r, "speedup": None if speedup is None else round(speedup, 3),
                    "efficiency": None if speedup is None else round(speedup / r["world_size"], 3)})
    return out


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def infer_table(rows: list[dict]) -> str:
    lines = ["| GPUs | images | size | steps | mode | edit s | img/s | s/img | GPU·s/img | speed-up vs 1 | "
             "efficiency | load s | peak GiB/rank | device |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summarize_infer(rows):
        mode = ("accel" if r["accel"] else "eager") + (f", cfg {r['cfg']}" if r.get("true_cfg", True) else ", no CFG")
        lines.append(f"| {r['world_size']} | {r['images']} | {r['size']}² | {r['steps']} | {mode} | "
                     f"{_fmt(r['edit_s'])} | {_fmt(r['images_per_s'], 3)} | {_fmt(r['s_per_image'])} | "
                     f"{_fmt(r['gpu_s_per_image'])} | {_fmt(r['speedup'])}{'x' if r['speedup'] is not None else ''} | "
                     f"{_fmt(r['efficiency'])} | {_fmt(r['load_s'], 1)} | {_fmt(r['peak_gib'])} | "
                     f"{r.get('device_name', '')} |")
    notes = [f"- save-model: {r['preset']} preset, {r['gib_on_disk']} GiB, built in {r.get('build_s', '—')} s, "
             f"saved in {r.get('save_s', '—')} s" + (" (reused)" if r.get("reused") else "")
             for r in rows if r.get("kind") == "save-model"]
    notes += [f"- cache: {r['records']} records, area {r['area']}, {r['world_size']} process(es): {r['seconds']} s"
              for r in rows if r.get("kind") == "cache"]
    train = [r for r in rows if r.get("kind") == "train"]
    return "\n".join(lines + ([""] + notes if notes else []) + (["", train_table(train)] if train else []))


# ---- train-config -----------------------------------------------------------------------------


TRAIN_BASE = REPO / "configs" / "lora_2511.yaml"
"""The shipped LoRA recipe the scaling runs start from."""


def train_config(model: str, cache: str, out: str | Path, steps: int = 10, rank: int = 64, area: int = 1024 * 1024,
                 multiple: int = 32, output_dir: str = "runs/multi-gpu-train",
                 overrides: list[str] | None = None) -> dict:
    """Write (and validate) the training YAML of the scaling runs: TRAIN_BASE with what the timing
    needs changed (one cache, no validation or previews, a constant lr, no accumulation), then
    `overrides`; returns the raw config."""
    import yaml

    from editkit.train.config import absolute_paths, apply_overrides, validate_config
    from editkit.utils.atomic import write_text

    if steps <= SKIP_STEPS:
        raise UserError(f"--steps {steps}: the first {SKIP_STEPS} steps are not timed; use at least {SKIP_STEPS + 2}")
    timing = {
        "model": str(model), "output_dir": str(output_dir),
        "data.cache": [str(cache)], "data.val": None, "data.area": area, "data.multiple": multiple,
        "data.instruction": "en",
        "train.lora.rank": rank, "train.lora.alpha": rank, "train.lora.targets": "default",
        "objective.mask_weight": 0.0, "objective.text_dropout": 0.0,
        "optim.weight_decay": 0.0, "optim.schedule": "constant", "optim.warmup_steps": 0,
        "loop.max_steps": steps, "loop.grad_accum": 1, "loop.mixed_precision": "auto", "loop.checkpoint_every": steps,
        "loop.keep_last": 1, "loop.validate_every": 0, "loop.preview_every": 0, "loop.tensorboard": False,
        "loop.export_lora": False,
    }
    raw = absolute_paths(yaml.safe_load(TRAIN_BASE.read_text()), TRAIN_BASE.parent)
    # JSON values are YAML scalars of exactly their type (a folder named 2511 stays a string)
    raw = apply_overrides(raw, [f"{key}={json.dumps(value)}" for key, value in timing.items()])
    raw = apply_overrides(raw, overrides or [])  # e.g. train.compile=true on a trainer that has it
    validate_config(raw, str(out))
    header = ("# bench/multi_gpu.py train-config: {base} changed for timing: LoRA r{rank} on DiffSynth's\n"
              "# default targets, batch 1, gradient checkpointing, {steps} steps from {cache}. One run per world\n"
              "# size (give each its own output_dir):\n"
              "#   python3 -m editkit train {out} output_dir=RUN-ws1\n"
              "#   python3 -m accelerate.commands.launch --config_file configs/accelerate/ddp.yaml \\\n"
              "#       --num_processes 2 -m editkit train {out} output_dir=RUN-ws2\n"
              "#   python3 bench/multi_gpu.py summary-train RUN-ws1 RUN-ws2\n").format(
        base=TRAIN_BASE.relative_to(REPO), rank=rank, steps=steps, cache=cache, out=out)
    write_text(out, header + yaml.safe_dump(raw, sort_keys=False))
    print(f"train-config: wrote {out} (LoRA r{rank}, {steps} steps, area {area})")
    return raw


# ---- summary-train ----------------------------------------------------------------------------


def train_run_timing(run: str | Path, skip: int = SKIP_STEPS) -> dict:
    """Steps/s and samples/s of one editkit training run folder (run.json + metrics.csv)."""
    run = Path(run)
    info_path, metrics = run / "run.json", run / "metrics.csv"
    if not info_path.is_file() or not metrics.is_file():
        raise UserError(f"{run}: not an editkit training run (needs run.json and metrics.csv); "
                        "give the output_dir of `editkit train`")
    info = json.loads(info_path.read_text())
    cfg = info.get("config", {})
    world = int(info.get("world_size", 1))
    batch = int(cfg.get("data", {}).get("batch_size", 1))
    accum = int(cfg.get("loop", {}).get("grad_accum", 1))
    with open(metrics, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and "step_seconds" not in rows[0]:
        raise UserError(f"{metrics}: no step_seconds column (an older editkit wrote this run); "
                        "rerun the training with this editkit, which logs each step's wall time")
    timed = [float(r["step_seconds"]) for r in rows if int(r["step"]) > skip]
    if not timed:
        raise UserError(f"{metrics}: {len(rows)} logged step(s), the first {skip} of which are warm-up; "
                        f"train at least {skip + 1} steps")
    s_per_step = sum(timed) / len(timed)
    out = {"run": str(run), "world_size": world, "batch_size": batch, "grad_accum": accum, "steps": len(rows),
           "skipped_steps": skip, "timed_steps": len(timed), "s_per_step": s_per_step,
           "steps_per_s": 1 / s_per_step}
    out["samples_per_s"] = out["steps_per_s"] * batch * accum * world
    return out


def train_table(timings: list[dict]) -> str:
    base = next((t for t in timings if t["world_size"] == 1), None)
    lines = ["| run | GPUs | timed steps | s/step | steps/s | samples/s | speed-up vs 1 | efficiency |",
             "|---|---|---|---|---|---|---|---|"]
    for t in timings:
        speedup = t["samples_per_s"] / base["samples_per_s"] if base else None
        t["speedup"] = speedup
        t["efficiency"] = speedup / t["world_size"] if speedup else None
        lines.append(f"| {Path(t['run']).name} | {t['world_size']} | {t['timed_steps']} | {_fmt(t['s_per_step'], 3)} | "
                     f"{_fmt(t['steps_per_s'], 3)} | {_fmt(t['samples_per_s'], 3)} | "
                     f"{_fmt(speedup)}{'x' if speedup else ''} | {_fmt(t['efficiency'])} |")
    return "\n".join(lines)


# ---- CLI --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/multi_gpu.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("save-model", help="Random-weight 2511 model folder (full size on a GPU, or tiny).")
    s.add_argument("--preset", default="full", help="full (20.4 B transformer + 8.3 B text encoder) or tiny")
    s.add_argument("--out", required=True)
    s.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="rewrite a folder this command already wrote")
    s.add_argument("--jsonl", default=None, help="also append the result row to this JSON-lines file")

    s = sub.add_parser("infer", help="Dataset editing throughput (run under torchrun for several GPUs).")
    s.add_argument("--model", required=True, help="model folder (save-model's --out)")
    s.add_argument("--images", type=int, default=8, help="records edited (all ranks together)")
    s.add_argument("--size", type=int, default=512, help="output side and VAE view of the source, pixels")
    s.add_argument("--steps", type=int, default=10)
    s.add_argument("--cfg", type=float, default=4.0, help="true CFG scale (negative prompt ' '); <= 1 turns CFG off")
    s.add_argument("--batch-size", type=int, default=4, help="requests per engine batch")
    s.add_argument("--warmup-steps", type=int, default=2, help="steps of the untimed warm-up batch (0: none)")
    s.add_argument("--accel", action="store_true", help="editkit.models.accel.apply_accel (compiles: slow first edits)")
    s.add_argument("--data", default=None, help="a manifest to edit instead of synthetic shapes")
    s.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    s.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK, or cpu without a GPU")
    s.add_argument("--out", required=True, help="results folder: multi_gpu.jsonl, edits/, data/")
    s.add_argument("--jsonl", default=None, help="append the result rows here instead of OUT/multi_gpu.jsonl")
    s.add_argument("--cache-out", default=None, help="afterwards, build a training cache here with the loaded model")
    s.add_argument("--cache-records", type=int, default=8)
    s.add_argument("--cache-area", type=int, default=1024 * 1024)
    s.add_argument("--cache-multiple", type=int, default=32)
    s.add_argument("--dist-timeout", type=float, default=300, help="seconds a collective may wait")
    s.add_argument("--quiet", action="store_true", help="no progress bars")

    s = sub.add_parser("summary", help="Markdown table of a multi_gpu.jsonl with speed-ups vs 1 GPU.")
    s.add_argument("jsonl")
    s.add_argument("--json", action="store_true", help="also print the rows as JSON")

    s = sub.add_parser("train-config", help="Training YAML for the LoRA scaling runs.")
    s.add_argument("--model", required=True)
    s.add_argument("--cache", required=True, help="cache folder (infer --cache-out, or editkit cache)")
    s.add_argument("--out", required=True)
    s.add_argument("--steps", type=int, default=10)
    s.add_argument("--rank", type=int, default=64)
    s.add_argument("--area", type=int, default=1024 * 1024, help="the cache's --area")
    s.add_argument("--multiple", type=int, default=32, help="the cache's --multiple")
    s.add_argument("--output-dir", default="runs/multi-gpu-train", help="default run folder (override per run)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra dotted config setting, e.g. train.compile=true (repeatable)")

    s = sub.add_parser("summary-train", help="steps/s and samples/s of training runs, speed-up vs 1 GPU.")
    s.add_argument("runs", nargs="+")
    s.add_argument("--skip", type=int, default=SKIP_STEPS, help="first steps left out of the timing")
    s.add_argument("--json", action="store_true")
    s.add_argument("--jsonl", default=None, help="also append one 'train' row per run to this JSON-lines file")
    return p


def main(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    if args.command == "save-model":
        row = save_model(args.preset, args.out, args.device, args.seed, args.force)
        if args.jsonl:
            _append_jsonl(Path(args.jsonl), {**row, "time": _now()})
        return row
    if args.command == "infer":
        return infer(args)
    if args.command == "summary":
        rows = read_jsonl(args.jsonl)
        print(infer_table(rows))
        if args.json:
            print(json.dumps(summarize_infer(rows), indent=2))
        return rows
    if args.command == "train-config":
        return train_config(args.model, args.cache, args.out, args.steps, args.rank, args.area, args.multiple,
                            args.output_dir, args.set)
    if args.command == "summary-train":
        timings = [train_run_timing(r, args.skip) for r in args.runs]
        print(train_table(timings))
        if args.json:
            print(json.dumps(timings, indent=2))
        if args.jsonl:
            for t in timings:
                _append_jsonl(Path(args.jsonl), {"kind": "train", "time": _now(), **t})
        return timings
    raise AssertionError(args.command)


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        print(f"multi_gpu: error: {err}", file=sys.stderr)
        sys.exit(UserError.exit_code)
