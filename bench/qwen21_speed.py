r"""Qwen-Image-2.1 step time: editkit's engine against diffusers' `QwenImage21Pipeline` in one run.

Builds the released architecture with random weights straight on the device (editkit.models.qwen_image_21
`PRESETS["full"]`: the 7.0 B single-stream transformer of 32 blocks 4096 wide, Qwen3-VL-8B as the
condition encoder, the 64-channel RGBA VAE; the same FLOPs and bytes as the checkpoint, nothing is
downloaded), then edits one `--size`² image with `--images` source images of that size, on the
same networks and inputs, for each setting of

- the prefix KV cache (`use_kv_cache` on, the pipeline's default, and off), and
- guidance (none, the default, and true CFG `--cfg` against the negative prompt " "),

timing per call (after one warm-up call per setting, the median of `--reps` calls alternating
between the two implementations): the end-to-end seconds (encoding, denoising, decoding), the first
denoising step (it fills the cache), the median of the other steps, the peak GPU memory, and the
largest difference between the two implementations' RGBA images (uint8; bf16 rounding of the same
computation). Neither encodes a negative prompt without CFG. Step times come from
a forward pre-hook on the shared transformer (the step's first call) and the step-end callbacks,
with the device synchronised at both.

On the GPU machine (diffusers from the carried wheels, see docs/benchmarks.md):

  source bench/gpu_setup.sh && python3 bench/qwen21_speed.py              # 1024², 1 source, 10 steps
  python3 bench/qwen21_speed.py --images 3 --steps 10 --attention _native_cudnn

prints one JSON line. CPU smoke test of the same code on the tiny preset (seconds):

  python3 bench/qwen21_speed.py --tiny
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
if str(REPO) not in sys.path:  # `python3 bench/qwen21_speed.py` puts bench/ first, not the repository
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPT = "replace the sky with a warm sunset and keep the buildings, people and text unchanged"
NEGATIVE = " "


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny preset on the CPU (a smoke test)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--size", type=int, default=None, help="output and source side (default 1024; tiny 64)")
    parser.add_argument("--images", type=int, default=1, help="source images per edit (1 to 10)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per call (default 10; tiny 3)")
    parser.add_argument("--cfg", type=float, default=4.0, help="the true-CFG scale of the guided setting")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per setting (default 3; tiny 1)")
    parser.add_argument("--attention", default=None, help="a diffusers attention backend for the transformer")
    args = parser.parse_args(argv)
    args.size = args.size or (64 if args.tiny else 1024)
    args.steps = args.steps or (3 if args.tiny else 10)
    args.reps = args.reps or (1 if args.tiny else 3)
    if not 1 <= args.images <= 10:
        parser.error("--images: 1 to 10")
    return args


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Wall times of each denoising step of one call: from the step's first transformer call to its
    step-end callback (the device synchronised at both)."""

    def __init__(self, transformer, device):
        self.device, self.starts, self.ends = device, [], []
        transformer.register_forward_pre_hook(self._called)

    def reset(self) -> None:
        self.starts, self.ends = [], []

    def _called(self, module, args) -> None:
        if len(self.starts) == len(self.ends):  # a step's first call (CFG runs two per step)
            _sync(self.device)
            self.starts.append(time.perf_counter())

    def step_done(self) -> None:
        _sync(self.device)
        self.ends.append(time.perf_counter())

    def steps(self) -> list[float]:
        return [end - start for start, end in zip(self.starts, self.ends)]


def _source_images(side: int, count: int) -> list:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(4)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(count)]


def bench(args, device, dtype) -> dict:
    import numpy as np
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline

    from editkit.infer.engine import EditRequest, Engine
    from editkit.models.families import get_family
    from editkit.models.loading import set_attention_backend

    family = get_family("qwen-image-2.1")
    side = args.size
    start = time.perf_counter()
    areas = {key: side * side for key in ("vlm_image_area", "vae_image_area", "output_area")}
    model = family.build_preset("tiny" if args.tiny else "full", seed=0, areas=areas, device=device, dtype=dtype)
    model.to(device=device, dtype=dtype)
    for module in model.modules().values():
        module.eval().requires_grad_(False)
    build_s = time.perf_counter() - start
    if args.attention:
        set_attention_backend(model.transformer, args.attention)
    pipe = QwenImage21Pipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler.config),
                               vae=model.vae, text_encoder=model.text_encoder, processor=model.processor,
                               transformer=model.transformer)
    pipe.set_progress_bar_config(disable=True)
    clock = StepClock(model.transformer, device)
    images = _source_images(side, args.images)

    def run_pipe(kv: bool, cfg: float):
        def step_end(pipeline, i, t, tensors):
            clock.step_done()
            return tensors

        return pipe(image=images, prompt=PROMPT, negative_prompt=NEGATIVE if cfg > 1 else None, true_cfg_scale=cfg,
                    num_inference_steps=args.steps, output_resolution=side, use_kv_cache=kv,
                    generator=torch.Generator("cpu").manual_seed(0), callback_on_step_end=step_end).images[0]

    def run_engine(kv: bool, cfg: float):
        request = EditRequest(PROMPT, images, negative_prompt=NEGATIVE if cfg > 1 else None, true_cfg_scale=cfg,
                              steps=args.steps, seed=0)
        return Engine(model.with_kv_cache(kv)).edit([request], progress=lambda done, total: clock.step_done())[0]

    rows = []
    with torch.no_grad():
        for kv in (True, False):
            for cfg in (1.0, args.cfg):
                fns = {"diffusers": lambda kv=kv, cfg=cfg: run_pipe(kv, cfg),
                       "editkit": lambda kv=kv, cfg=cfg: run_engine(kv, cfg)}
                timed, outputs, peaks = _timed_alternating(fns, clock, device, args.reps)
                diff = int(np.abs(np.asarray(outputs["editkit"], dtype=np.int16)
                                  - np.asarray(outputs["diffusers"], dtype=np.int16)).max())
                for name in fns:
                    rows.append({"impl": name, "kv_cache": kv, "cfg": cfg, **timed[name], "peak_gib": peaks[name],
                                 "max_pixel_diff": diff})
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # kept if the run is cut short
    tokens = _sequence_tokens(model, images, side)
    return {
        "size": side,
        "images": args.images,
        "steps": args.steps,
        "attention": args.attention,
        "tokens": tokens,
        "build_s": round(build_s, 2),
        "parameters_b": {name: round(sum(p.numel() for p in m.parameters()) / 1e9, 3)
                         for name, m in model.modules().items()},
        "rows": rows,
        "speedup": {f"kv={r['kv_cache']},cfg={r['cfg']:g}": round(d["e2e_s"] / r["e2e_s"], 3)
                    for d, r in zip(rows[0::2], rows[1::2])},
    }


def _timed_alternating(fns: dict, clock: StepClock, device, reps: int):
    """Per function: median end-to-end seconds, first-step seconds and median later-step seconds over
    `reps` calls after one warm-up call each, the calls alternating; its last output and peak memory."""
    import torch

    for fn in fns.values():
        fn()
    samples = {name: {"e2e": [], "first": [], "rest": []} for name in fns}
    outputs, peaks = {}, {}
    for _ in range(reps):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            clock.reset()
            _sync(device)
            start = time.perf_counter()
            outputs[name] = fn()
            _sync(device)
            samples[name]["e2e"].append(time.perf_counter() - start)
            steps = clock.steps()
            samples[name]["first"].append(steps[0])
            samples[name]["rest"].extend(steps[1:])
            peaks[name] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
    timed = {name: {"e2e_s": round(statistics.median(s["e2e"]), 4),
                    "first_step_s": round(statistics.median(s["first"]), 4),
                    "step_s": round(statistics.median(s["rest"]), 4) if s["rest"] else None}
             for name, s in samples.items()}
    return timed, outputs, peaks


def _sequence_tokens(model, images, side: int) -> dict:
    """Prompt, condition and target tokens of the joint sequence (the condition tokens replace their
    VLM image tokens, 4 latent tokens each)."""
    embeds, _ = model.encode_prompt([PROMPT], [images])
    shapes = model.img_shapes(side, side, [model.vae_size(img) for img in images])
    cond = sum(h * w for _, h, w in shapes[:-1])
    text = embeds.shape[1] - cond // 4
    target = shapes[-1][1] * shapes[-1][2]
    return {"text": text, "condition": cond, "target": target, "total": text + cond + target}


def main(argv=None) -> dict:
    import torch

    args = parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    dtype = dtype if device.type == "cuda" else torch.float32
    result = {
        "family": "qwen-image-2.1",
        "preset": "tiny" if args.tiny else "full",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "reps": args.reps,
        **bench(args, device, dtype),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
