r"""Seconds per image of the baseline families, editkit's engine against the diffusers pipeline in one run.

One function per family (`BENCHES`), each building the family's full-size architecture with random
weights straight on the device (the same FLOPs and bytes as the released checkpoints; nothing is
downloaded), then timing, on the same networks and inputs:

- the diffusers pipeline, one edit per call (batch 1) and `--batch` edits per call;
- editkit's `Engine.edit`, one request, and `--batch` requests (one batch, a seed each);

each after one warm-up call, the median of `--reps` calls alternating between the two, the peak GPU
memory of the batch-1 calls, and the largest pixel difference between the two implementations'
batch-1 images (uint8; bf16 rounding of the same computation). `--compile` adds editkit with the
network under `torch.compile(mode="reduce-overhead")` (CUDA graphs; its compile time apart), which
editkit's `--speed` switches do not apply to these families yet.

  instruct-pix2pix  InstructPix2Pix / MagicBrush: SD 1.5 UNet with 8 input channels, CLIP ViT-L/14
                    text encoder, SD VAE (editkit.models.instruct_pix2pix.FULL), 512x512, 50 steps,
                    text guidance 7.5, image guidance 1.5 (the 3-way guidance batch), EulerAncestral
  flux-fill         FLUX.1-Fill-dev: transformer of 19 double + 38 single blocks, 3072 wide, 384 input
                    channels, guidance embedded; T5-XXL and CLIP-L text encoders; the FLUX VAE
                    (editkit.models.flux_fill.FULL), 1024x1024, 50 steps, guidance 30, a centred
                    square mask; batch figures only with --batch > 1 (each call is ~15 s); on CUDA
                    also editkit with the transformer's repeated blocks compiled (after the eager
                    figures, so the pipeline's are eager)

On the GPU machine (diffusers from the carried wheels, see docs/benchmarks.md):

  source bench/gpu_setup.sh && python3 bench/baselines_speed.py --family instruct-pix2pix

prints one JSON line. CPU smoke test of the same code on the tiny preset (seconds):

  python3 bench/baselines_speed.py --family instruct-pix2pix --tiny
  python3 bench/baselines_speed.py --family flux-fill --tiny
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python3 bench/baselines_speed.py` puts bench/ first, not the repository
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPT = "turn the sky into a sunset and keep everything else unchanged"


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_alternating(fns: dict, device, reps: int) -> tuple[dict, dict]:
    """Median seconds of each `fns[name]()` over `reps` calls after one warm-up call each, the calls
    alternating between the functions (so that drifting clocks or a busy host affect all alike), and
    each function's last result."""
    for fn in fns.values():
        fn()
    times, results = {name: [] for name in fns}, {}
    for _ in range(reps):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            results[name] = fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, results


def _peak_gib(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def _source_images(side: int, count: int) -> list:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(4)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(count)]


def _max_pixel_diff(a, b) -> int:
    import numpy as np

    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def bench_instruct_pix2pix(args, device, dtype) -> dict:
    """InstructPix2Pix at 512x512 (tiny: 64x64): the pipeline vs editkit's engine on one model's networks."""
    import torch
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from editkit.infer.engine import EditRequest, Engine
    from editkit.models.families import get_family

    family = get_family("instruct-pix2pix")
    side = 64 if args.tiny else (args.size or 512)
    steps, cfg, image_cfg = args.steps, family.sampling.cfg, family.sampling.image_cfg
    model = family.build_preset("tiny" if args.tiny else "full", seed=0, device=device, dtype=dtype)
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        scheduler=type(model.scheduler).from_config(model.scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    engine = Engine(model, max_batch=args.batch)
    images = _source_images(side, args.batch)

    def run_pipe(count):
        return pipe([PROMPT] * count, image=images[:count], num_inference_steps=steps, guidance_scale=cfg,
                    image_guidance_scale=image_cfg, generator=torch.Generator("cpu").manual_seed(0)).images

    def run_engine(count):
        return engine.edit([EditRequest(PROMPT, [images[i]], steps=steps, seed=i) for i in range(count)])

    with torch.no_grad():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        single, images_out = _timed_alternating({"diffusers": lambda: run_pipe(1), "editkit": lambda: run_engine(1)},
                                                device, args.reps)
        peak = _peak_gib(device)
        batched, _ = _timed_alternating({"diffusers": lambda: run_pipe(args.batch),
                                         "editkit": lambda: run_engine(args.batch)}, device, args.reps)
        if args.compile:  # the UNet under torch.compile with CUDA graphs: not yet an editkit speed switch
            compiled = Engine(model.with_transformer(torch.compile(model.unet, mode="reduce-overhead")))
            start = time.perf_counter()
            compiled.edit([EditRequest(PROMPT, [images[0]], steps=steps, seed=0)])  # compiles
            compile_s = time.perf_counter() - start
            times, out = _timed_alternating({"compiled": lambda: compiled.edit([EditRequest(
                PROMPT, [images[0]], steps=steps, seed=0)])}, device, args.reps)
    rows = {}
    for name in ("diffusers", "editkit"):
        rows[f"{name}_s_per_image"] = single[name]
        rows[f"{name}_batch{args.batch}_s_per_image"] = batched[name] / args.batch
    if args.compile:
        rows.update(editkit_compiled_s_per_image=times["compiled"], compile_s=compile_s,
                    compiled_max_pixel_diff=_max_pixel_diff(out["compiled"][0], images_out["editkit"][0]))
    return {
        "size": side,
        "steps": steps,
        "cfg": cfg,
        "image_cfg": image_cfg,
        "scheduler": type(model.scheduler).__name__,
        "parameters_m": {name: round(sum(p.numel() for p in m.parameters()) / 1e6, 1)
                         for name, m in model.modules().items()},
        **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows.items()},
        "speedup": round(rows["diffusers_s_per_image"] / rows["editkit_s_per_image"], 3),
        f"speedup_batch{args.batch}": round(rows[f"diffusers_batch{args.batch}_s_per_image"]
                                            / rows[f"editkit_batch{args.batch}_s_per_image"], 3),
        "peak_gib": peak,
        "max_pixel_diff": _max_pixel_diff(images_out["editkit"][0], images_out["diffusers"][0]),
    }


def bench_flux_fill(args, device, dtype) -> dict:
    """FLUX.1 Fill at 1024x1024 (tiny: 64x64): the pipeline vs editkit's engine on one model's networks.

    The pipeline gets editkit's initial noise (`latents=`) and each sample's generator past it (from
    which both draw the masked image's VAE sample), so the two compute the same images.
    """
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxFillPipeline
    from diffusers.utils.torch_utils import randn_tensor
    from PIL import Image

    from editkit.infer.engine import EditRequest, Engine
    from editkit.infer.sampler import initial_noise
    from editkit.models.families import get_family

    family = get_family("flux-fill")
    side = 64 if args.tiny else (args.size or 1024)
    steps, cfg = args.steps, family.sampling.cfg
    start = time.perf_counter()
    model = family.build_preset("tiny" if args.tiny else "full", seed=0, device=device, dtype=dtype)
    build_s = time.perf_counter() - start
    pipe = FluxFillPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler.config), vae=model.vae,
        text_encoder=model.text_encoder, tokenizer=model.tokenizer, text_encoder_2=model.text_encoder_2,
        tokenizer_2=model.tokenizer_2, transformer=model.transformer)
    pipe.set_progress_bar_config(disable=True)
    engine = Engine(model, max_batch=args.batch)
    images = _source_images(side, args.batch)
    mask = Image.new("L", (side, side), 0)
    mask.paste(255, (side // 4, side // 4, 3 * side // 4, 3 * side // 4))
    latent_shape = (1, model.latent_channels, *model.latent_size(side, side))

    def run_pipe(count):
        generators = [torch.Generator("cpu").manual_seed(i) for i in range(count)]
        for generator in generators:  # past the initial noise, as editkit's sampler draws it
            randn_tensor(latent_shape, generator=generator, dtype=dtype)
        return pipe([PROMPT] * count, image=images[:count], mask_image=[mask] * count, height=side, width=side,
                    num_inference_steps=steps, guidance_scale=cfg, max_sequence_length=family.max_sequence_length,
                    latents=initial_noise(model, side, side, list(range(count)), dtype),
                    generator=generators if count > 1 else generators[0]).images

    def run_engine(count):
        return engine.edit([EditRequest(PROMPT, [images[i]], steps=steps, seed=i, mask=mask, width=side, height=side)
                            for i in range(count)])

    rows = {}
    with torch.no_grad():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        single, images_out = _timed_alternating({"diffusers": lambda: run_pipe(1), "editkit": lambda: run_engine(1)},
                                                device, args.reps)
        peak = _peak_gib(device)
        for name in ("diffusers", "editkit"):
            rows[f"{name}_s_per_image"] = single[name]
        if args.batch > 1:
            batched, _ = _timed_alternating({"diffusers": lambda: run_pipe(args.batch),
                                             "editkit": lambda: run_engine(args.batch)}, device, args.reps)
            for name in ("diffusers", "editkit"):
                rows[f"{name}_batch{args.batch}_s_per_image"] = batched[name] / args.batch
        if device.type == "cuda":
            from editkit.models import accel

            accel.compile_blocks(model)
            compiled, _ = _timed_alternating({"editkit": lambda: run_engine(1)}, device, args.reps)
            rows["editkit_compiled_s_per_image"] = compiled["editkit"]
    result = {
        "size": side,
        "steps": steps,
        "guidance": cfg,
        "build_s": round(build_s, 1),
        "parameters_m": {name: round(sum(p.numel() for p in m.parameters()) / 1e6, 1)
                         for name, m in model.modules().items()},
        **{k: round(v, 4) for k, v in rows.items()},
        "speedup": round(rows["diffusers_s_per_image"] / rows["editkit_s_per_image"], 3),
        "peak_gib": peak,
        "max_pixel_diff": _max_pixel_diff(images_out["editkit"][0], images_out["diffusers"][0]),
    }
    if args.batch > 1:
        result[f"speedup_batch{args.batch}"] = round(rows[f"diffusers_batch{args.batch}_s_per_image"]
                                                     / rows[f"editkit_batch{args.batch}_s_per_image"], 3)
    if "editkit_compiled_s_per_image" in rows:
        result["speedup_compiled"] = round(rows["diffusers_s_per_image"] / rows["editkit_compiled_s_per_image"], 3)
    return result


BENCHES = {"instruct-pix2pix": bench_instruct_pix2pix, "flux-fill": bench_flux_fill}
"""Family name -> its benchmark function `(args, device, dtype) -> dict`."""


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", required=True, choices=sorted(BENCHES))
    ap.add_argument("--tiny", action="store_true", help="the tiny preset at 64x64 on the CPU in float32 (smoke test)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu (--tiny: cpu)")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="on CUDA (the CPU: fp32)")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (full preset; default: the "
                                                            "family's, instruct-pix2pix 512, flux-fill 1024)")
    ap.add_argument("--steps", type=int, default=None, help="default 50 (--tiny: 3)")
    ap.add_argument("--batch", type=int, default=4, help="edits per call for the batched figures")
    ap.add_argument("--compile", action="store_true", help="also time editkit with the UNet compiled (CUDA graphs)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per figure, after one warm-up (default 5; "
                                                           "--tiny: 1)")
    args = ap.parse_args(argv)
    args.steps = args.steps or (3 if args.tiny else 50)
    args.reps = args.reps or (1 if args.tiny else 5)
    return args


def main(argv=None) -> dict:
    import torch

    args = parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    dtype = dtype if device.type == "cuda" else torch.float32
    result = {
        "family": args.family,
        "preset": "tiny" if args.tiny else "full",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "batch": args.batch,
        "reps": args.reps,
        **BENCHES[args.family](args, device, dtype),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
