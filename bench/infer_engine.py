"""The editing engine on one GPU: batched vs one-by-one throughput, batch parity, LoRA fused vs not.

Full-size Qwen-Image-Edit-2511 components with random bf16 weights (the "full" preset of
editkit.models.presets; nothing is downloaded), rebuilt with the same seed for each size. Requests
are `EditRequest`s with one source image of the output size and true CFG.

Usage on the GPU machine:
  PYTHONPATH=$PWD:/tmp/site python3 bench/infer_engine.py --sizes 256,512 --steps 8 --out $OUT
CPU smoke run: python bench/infer_engine.py --preset tiny --sizes 64 --steps 2 --requests 2
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def build_model(preset_name: str, size: int):
    """The preset's model (seed 0) whose sources and outputs are size x size."""
    from bench import fullsize

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return fullsize.build_model(fullsize.PRESETS[preset_name], device,
                                areas={"vae_image_area": size * size, "output_area": size * size})


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    return out, time.perf_counter() - start, peak


def lora_for(transformer, rank: int):
    """A random LoRA on the DiffSynth default targets (diffusers module names)."""
    from bench.fullsize import lora_targets
    from editkit.models import lora

    g = torch.Generator().manual_seed(0)
    targets = lora_targets()
    modules = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(targets) and "transformer_blocks" in name:
            modules[name] = lora.LoraModule(torch.randn(rank, module.in_features, generator=g) * 0.01,
                                            torch.randn(module.out_features, rank, generator=g) * 0.01,
                                            torch.tensor(float(rank)))
    return lora.build(modules, "diffusers")


def measure(args, size: int, rng) -> dict:
    """One size: one-by-one against batched edits, then with a LoRA unfused, fused and unloaded."""
    from editkit.infer.engine import EditRequest, Engine
    from editkit.models import lora

    model = build_model(args.preset, size)
    engine = Engine(model, model_name=f"random-{args.preset}")
    sources = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(args.requests)]
    requests = [EditRequest(f"edit number {i}: make the sky pink", [src], steps=args.steps, seed=i)
                for i, src in enumerate(sources)]
    engine.edit(requests[:1], max_batch=1)  # warm-up
    one, t_one, peak_one = timed(lambda: [engine.edit([r], max_batch=1)[0] for r in requests])
    batched, t_batch, peak_batch = timed(lambda: engine.edit(requests, max_batch=args.requests))
    diff = max(int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max()) for a, b in zip(one, batched))
    row = {"size": size, "steps": args.steps, "requests": args.requests,
           "one_by_one_img_s": args.requests / t_one, "batched_img_s": args.requests / t_batch,
           "speedup": t_one / t_batch, "peak_gib_one": peak_one, "peak_gib_batched": peak_batch,
           "max_pixel_diff_batched_vs_one": diff}

    sd = lora_for(model.transformer, args.lora_rank)
    lora.add_adapter(model.transformer, sd, "bench")
    _, t_lora, _ = timed(lambda: engine.edit(requests, max_batch=args.requests))
    model.transformer.fuse_lora(adapter_names=["bench"])
    _, t_fused, _ = timed(lambda: engine.edit(requests, max_batch=args.requests))
    lora.unload_loras(model.transformer)
    _, t_base, _ = timed(lambda: engine.edit(requests, max_batch=args.requests))
    row.update(lora_rank=args.lora_rank, lora_unfused_img_s=args.requests / t_lora,
               lora_fused_img_s=args.requests / t_fused, after_unload_img_s=args.requests / t_base)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="full")
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    results = []
    rng = np.random.default_rng(0)
    for size in [int(s) for s in args.sizes.split(",")]:
        results.append(measure(args, size, rng))
        print(json.dumps(results[-1]), flush=True)
        gc.collect()  # one model in memory at a time
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device: {device}, torch {torch.__version__}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "infer_engine.json").write_text(json.dumps({"device": device, "results": results}, indent=2))


if __name__ == "__main__":
    main()
