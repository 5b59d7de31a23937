r"""GPU checks of issue 19 (part B) on one H200, one call (< 8 min): streaming loads, FA3, offload.

Sections (each in its own process, so peak host and GPU memory are its own; results are one JSON):

  load       host peak RSS and time of `load_model(folder, device="cuda")` on a full-size random
             2511 folder (written first if absent, as bench/multi_gpu.py save-model writes it):
             "cpu-then-move" is the path before streaming (read on the CPU, then moved), "streamed"
             the new one (safetensors shards read straight onto the GPU); weight digests must match
  offload    peak GPU memory and time of a 1024² true-CFG edit (2 steps) with offload "group" and
             "model", against the same edit with the whole model on the GPU (and their pixel difference)
  attention  FA3 (`fa3-fwd`) against cuDNN attention: one full-size true-CFG transformer step at
             1024² (8422 tokens, bf16), eager, then compiled with the fused block ops; time and
             relative error vs the diffusers eager output; and the kernels alone at (2, 8422, 24, 128)

CFG-parallel and Ulysses need 2 GPUs and are not timed here (their correctness: tests/test_infer_parallel.py).

On the GPU machine (wheels for diffusers, torchao, pydantic and fa3-fwd in .whl/):

  source bench/gpu_setup.sh && python3 bench/gpu_checks.py --out $OUT

writes $OUT/gpu_checks.json (and prints it). Sections past `--budget` seconds are skipped and said
so. CPU smoke test on the tiny preset: tests/test_bench_gpu_checks.py.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python3 bench/gpu_checks.py` puts bench/ first, not the repository
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GiB = 2**30
ROW = "GPU_CHECKS_ROW "
"""Prefix of the one stdout line in which a section's process hands its result back."""
FULL_FOLDER_GIB = 54
"""Disk space the full-size folder takes (53.7 GiB measured)."""


def _emit(row: dict) -> None:
    print(ROW + json.dumps(row, default=str), flush=True)


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, reps: int = 5, warmup: int = 2) -> dict:
    """Median and minimum seconds of `fn()` over `reps` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"s": round(times[len(times) // 2], 4), "min_s": round(times[0], 4), "reps": reps}


def _peak_gpu_gib(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated(device) / GiB, 2) if torch.device(device).type == "cuda" else None


class AnonPeak:
    """The peak of this process's anonymous resident memory (RssAnon: copies of weights, not the
    page cache that mmapped safetensors files map in), sampled every 20 ms."""

    def __init__(self):
        self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    @staticmethod
    def now() -> int:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _watch(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.now())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def weight_digest(model) -> dict:
    """Per component: the number of weight bytes and their sum (exact integers: equal weights give
    equal digests, whichever path loaded them)."""
    import torch

    digest = {}
    for name, module in model.modules().items():
        total, count = 0, 0
        for tensor in [*module.parameters(), *module.buffers()]:
            data = tensor.detach().contiguous().view(-1).view(torch.uint8)
            total += int(data.sum(dtype=torch.int64))
            count += data.numel()
        digest[name] = [count, total]
    return digest


# ----- sections (each runs in its own process) -------------------------------------------------------


def section_load(args) -> dict:
    """One load of the folder; `args.path`: "streamed" (load_model straight to the device) or
    "cpu-then-move" (what load_model did before: read on the CPU, then move)."""
    import torch

    from editkit.models import load_model

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    anon_before = AnonPeak.now()
    with AnonPeak() as anon:
        t0 = time.perf_counter()
        if args.path == "streamed":
            model = load_model(args.folder, dtype=args.dtype, device=args.device)
        else:
            model = load_model(args.folder, dtype=args.dtype, device="cpu")
            model.to(device=args.device, dtype=model.dtype)
        _sync(args.device)
        load_s = time.perf_counter() - t0
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"section": "load", "path": args.path, "load_s": round(load_s, 2),
            "maxrss_gib": round(maxrss / GiB, 2), "maxrss_before_gib": round(rss_before / GiB, 2),
            "peak_anon_gib": round(anon.peak / GiB, 2), "anon_before_gib": round(anon_before / GiB, 2),
            "gpu_gib": round(torch.cuda.memory_allocated(args.device) / GiB, 2) if torch.cuda.is_available() else None,
            "digest": weight_digest(model)}


def _source_image(side: int):
    import torch
    from PIL import Image

    g = torch.Generator().manual_seed(4)
    return Image.fromarray((torch.rand(side, side, 3, generator=g) * 255).to(torch.uint8).numpy())


def section_offload(args) -> dict:
    """Peak GPU memory of one edit with the whole model on the device, then with offload `args.mode`."""
    import numpy as np
    import torch

    from bench.fullsize import PRESETS, build_model
    from editkit.infer.engine import EditRequest, Engine
    from editkit.models import accel, offload

    preset = PRESETS[args.preset]
    side = preset.size
    model = build_model(preset, args.device, areas={"vae_image_area": side * side, "output_area": side * side})
    engine = Engine(model)
    request = EditRequest(prompt="Turn the sky purple and add a small red kite.", images=[_source_image(side)],
                          negative_prompt=" ", true_cfg_scale=4.0, steps=args.steps, seed=0, width=side, height=side)

    def edit() -> tuple[dict, np.ndarray]:
        if torch.device(args.device).type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(args.device)
        t0 = time.perf_counter()
        image = engine.edit([request])[0]
        _sync(args.device)
        return {"s": round(time.perf_counter() - t0, 2), "peak_gib": _peak_gpu_gib(args.device)}, np.asarray(image)

    # the switches apply_accel sets with this offload mode, first without offloading: the pixel
    # difference is then the offload's alone
    accel.apply_accel(model, accel.Accel(compile=False, split_lengths=args.mode != "group"))
    edit()  # warm-up: kernel plans, allocator
    whole, want = edit()
    offload.enable_offload(model, args.mode, args.device)
    first, _ = edit()  # the first edit pays the first moves
    again, got = edit()
    return {"section": "offload", "mode": args.mode, "size": side, "steps": args.steps, "whole_model": whole,
            "first_edit": first, "offloaded": again,
            "pixel_max_diff": int(np.abs(got.astype(np.int16) - want.astype(np.int16)).max())}


def _attention_kernels(device, dtype, backends) -> None:
    """The attention kernels alone at the 2511 CFG batch's shape: TFLOP/s and error vs float32."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from editkit.models import fa3

    shape = (2, 8422, 24, 128) if torch.device(device).type == "cuda" else (2, 64, 2, 16)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=g, device=device, dtype=dtype) for _ in range(3))
    flops = 4 * shape[0] * shape[2] * shape[1] ** 2 * shape[3]
    sub = (slice(0, 1), slice(None), slice(0, 2))  # float32 reference on one sample, two heads
    ref = F.scaled_dot_product_attention(*(t[sub].float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    def kernel(name):
        if name == "fa3":
            flash_attn_func = fa3.load_kernel()
            return lambda: flash_attn_func(q, k, v)
        backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}.get(name)
        return lambda: _sdpa(q, k, v, backend, sdpa_kernel)

    for name in backends:
        try:
            fn = kernel(name)
            out = fn()
            out = out[0] if isinstance(out, tuple) else out  # upstream FA3 betas return (out, lse)
            t = _timed(fn, device, reps=10, warmup=3)
            err = ((out[sub].float() - ref).norm() / ref.norm()).item()
            _emit({"section": "attention", "name": f"kernel {name} {tuple(shape)}", **t,
                   "tflops": round(flops / t["s"] / 1e12, 1) if t["s"] > 0 else None, "err_vs_fp32": round(err, 5)})
        except Exception as exc:  # noqa: BLE001 - one kernel failing must not stop the other
            _emit({"section": "attention", "name": f"kernel {name}", "error": f"{type(exc).__name__}: {exc}"})


def _sdpa(q, k, v, backend, sdpa_kernel):
    import contextlib

    import torch.nn.functional as F

    with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def section_attention(args) -> None:
    """One true-CFG transformer step per attention backend, eager then compiled + fused (compiles
    start only before `args.stop_at`)."""
    import types

    import torch

    from bench.fullsize import PRESETS, bench_dtype, build_transformer
    from bench.gpu_bench import DitInputs, cfg_step_batched, cfg_step_two_pass, rel_err
    from editkit.models import accel

    preset, device = PRESETS[args.preset], torch.device(args.device)
    backends = args.backends.split(",")
    _attention_kernels(device, bench_dtype(device), backends)
    tr = build_transformer(preset, device)
    x = DitInputs(types.SimpleNamespace(preset=preset, device=device))
    with torch.no_grad():
        accel.set_attention(tr, None)
        ref = cfg_step_two_pass(tr, x)  # the diffusers eager output
        base = _timed(lambda: cfg_step_two_pass(tr, x), device, reps=args.reps)
        _emit({"section": "attention", "name": "diffusers eager true-CFG step (2 passes, default attention)", **base})

        def variant(name, step, **extra):
            out = step()
            t = _timed(step, device, reps=args.reps)
            _emit({"section": "attention", "name": name, **t, "err": round(rel_err(out, ref), 5),
                   "speedup": round(base["s"] / t["s"], 3) if t["s"] > 0 else None, **extra})

        for backend in backends:
            try:
                accel.set_attention(tr, backend)
                variant(f"eager true-CFG step, 2 passes, {backend}", lambda: cfg_step_two_pass(tr, x))
                variant(f"eager true-CFG step, batched, {backend}", lambda: cfg_step_batched(tr, x))
            except Exception as exc:  # noqa: BLE001
                _emit({"section": "attention", "name": f"eager {backend}", "error": f"{type(exc).__name__}: {exc}"})
        if not args.compile:
            return
        accel.fuse_block_ops(tr)
        for backend in backends:
            if time.time() > args.stop_at:
                _emit({"section": "attention", "name": f"compiled {backend}", "skipped": "past the budget"})
                continue
            try:
                torch._dynamo.reset()
                accel.set_attention(tr, backend)
                accel.compile_blocks(tr)
                t0 = time.perf_counter()
                cfg_step_batched(tr, x)
                _sync(device)
                compile_s = round(time.perf_counter() - t0, 1)
                variant(f"compiled + fused true-CFG step, batched, {backend}", lambda: cfg_step_batched(tr, x),
                        compile_s=compile_s)
            except Exception as exc:  # noqa: BLE001
                _emit({"section": "attention", "name": f"compiled {backend}", "error": f"{type(exc).__name__}: {exc}"})


SECTIONS = {"load": section_load, "offload": section_offload, "attention": section_attention}


# ----- the whole run ---------------------------------------------------------------------------------


def _env(device) -> dict:
    import diffusers
    import torch
    import transformers

    env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
           "device": str(device)}
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_gib=round(props.total_memory / GiB, 1),
                   capability=torch.cuda.get_device_capability(device))
    try:
        import fa3_fwd_interface  # noqa: F401

        env["fa3_fwd"] = "importable"
    except (ImportError, OSError) as exc:
        env["fa3_fwd"] = f"{type(exc).__name__}: {exc}"
    return env


def _child(args, section: str, *extra: str, timeout: float) -> list[dict]:
    """Run one section in a fresh process; the rows it handed back (kept also when it ends early),
    and its error, if it ended with one."""
    cmd = [sys.executable, str(Path(__file__).resolve()), section, "--preset", args.preset, "--device", args.device,
           "--dtype", args.dtype, "--steps", str(args.steps), "--reps", str(args.reps), "--backends", args.backends,
           "--stop-at", str(args.stop_at), *(() if args.compile else ("--no-compile",)), *extra]
    t0 = time.perf_counter()
    error = None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 10), cwd=REPO)
        stdout, stderr = proc.stdout, proc.stderr
        if proc.returncode:
            error = f"exit {proc.returncode}: {stderr[-1500:]}"
    except subprocess.TimeoutExpired as exc:
        stdout, stderr = (x.decode() if isinstance(x, bytes) else x or "" for x in (exc.stdout, exc.stderr))
        error = f"timed out after {timeout:.0f} s"
    sys.stderr.write(stderr[-4000:])
    rows = [json.loads(line[len(ROW):]) for line in stdout.splitlines() if line.startswith(ROW)]
    if error or not rows:
        rows.append({"section": section, "args": list(extra), "error": error or "no result"})
    rows[-1]["process_s"] = round(time.perf_counter() - t0, 1)
    return rows


FOLDER_PLACES = ("/tmp/full2511", "/dev/shm/full2511")
"""Where the full-size folder goes without --folder: the first place that holds one already or has
the space (the single H200 has a 64 GiB disk; /dev/shm is host memory)."""


def _pick_folder(args) -> tuple[Path | None, str]:
    if args.folder:
        return Path(args.folder), ""
    places = [Path(p) for p in FOLDER_PLACES] if args.preset == "full" else [Path("/tmp/gpu-checks-tiny")]
    for place in places:
        if (place / "model_index.json").is_file():
            return place, ""
    free = {}
    for place in places:
        try:
            place.parent.mkdir(parents=True, exist_ok=True)
            free[str(place)] = round(shutil.disk_usage(place.parent).free / GiB, 1)
        except OSError:
            continue
        if args.preset != "full" or free[str(place)] >= FULL_FOLDER_GIB + 2:
            return place, ""
    return None, f"no place with {FULL_FOLDER_GIB + 2} GiB free for the full folder (free GiB: {free}); pass --folder"


def _ensure_folder(args) -> dict:
    from bench import multi_gpu

    folder, problem = _pick_folder(args)
    if folder is None:
        return {"section": "folder", "error": problem}
    args.folder = str(folder)
    row = {"section": "folder", **multi_gpu.save_model(args.preset, folder, device=args.device)}
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the sections' processes need the GPU's memory
    return row


def run_all(args) -> dict:
    start = time.time()
    args.stop_at = start + args.budget
    results = {"env": _env(args.device), "budget_s": args.budget, "rows": []}

    def left() -> float:
        return args.stop_at - time.time()

    def add(row: dict) -> None:
        results["rows"].append(row)
        shown = {k: v for k, v in row.items() if k != "digest"}
        print(json.dumps(shown, default=str), flush=True)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            tmp = Path(args.out) / "gpu_checks.json.tmp"
            tmp.write_text(json.dumps(results, indent=1, default=str))
            tmp.replace(Path(args.out) / "gpu_checks.json")

    sections = args.sections.split(",")
    if "load" in sections:
        folder = _ensure_folder(args)
        add(folder)
        if "error" not in folder:
            loads = []
            for path in ("cpu-then-move", "streamed"):
                loads += _child(args, "load", "--folder", args.folder, "--path", path, timeout=left())
                add(loads[-1])
            digests = [row.get("digest") for row in loads]
            add({"section": "load", "name": "same weights both ways",
                 "equal": None if None in digests else digests[0] == digests[1]})
    for mode in ("group", "model") if "offload" in sections else ():
        if left() < 45:
            add({"section": "offload", "mode": mode, "skipped": "past the budget"})
            continue
        for row in _child(args, "offload", "--mode", mode, timeout=left() + 30):
            add(row)
    if "attention" in sections:
        if left() < 60:
            add({"section": "attention", "skipped": "past the budget"})
        else:  # a compile started just before the budget may finish
            for row in _child(args, "attention", timeout=left() + 120):
                add(row)
    results["total_s"] = round(time.time() - start, 1)
    add({"section": "done", "total_s": results["total_s"]})
    return results


def parse_args(argv=None):
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("section", nargs="?", default="all", choices=["all", *SECTIONS])
    ap.add_argument("--sections", default="load,offload,attention", help="which sections `all` runs")
    ap.add_argument("--preset", default="full", choices=["full", "tiny"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", help="load dtype of the load section")
    ap.add_argument("--folder", default=None, help="the random full-size folder (written if absent; default: "
                    f"the first of {', '.join(FOLDER_PLACES)} with the space)")
    ap.add_argument("--path", choices=["streamed", "cpu-then-move"], default="streamed")
    ap.add_argument("--mode", choices=["group", "model"], default="group")
    ap.add_argument("--steps", type=int, default=2, help="denoising steps of the offload edits")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--backends", default="cudnn,fa3", help="attention backends (editkit names) to compare")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--budget", type=float, default=420, help="seconds after which no section or compile starts")
    ap.add_argument("--stop-at", type=float, default=float("inf"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.section == "all":
        return run_all(args)
    row = SECTIONS[args.section](args)
    if row is not None:
        _emit(row)
    return row


if __name__ == "__main__":
    main()
