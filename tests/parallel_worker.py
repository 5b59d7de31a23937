"""Run by tests/test_infer_parallel.py, under torchrun (`parallel_worker.py MODE OUT`) or in-process
(`edits(model)`): the tiny model's true-CFG edits, with `--parallel MODE` under torchrun. Each rank
saves its sampled latents and edited images to OUT/rank<r>.pt."""

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

STEPS = 3


def tiny_model():
    from editkit.models import accel
    from editkit.models.families import get_family

    model = get_family("qwen-image-edit-2511").build_tiny(seed=0)
    accel.apply_accel(model, accel.Accel(compile=False))  # the default fast path (prompt-length split), CPU
    return model


def edits(model) -> dict:
    """Latents of two true-CFG samples (negative shorter than the prompt), images through the
    engine (one with latent-mask fusion: a velocity hook on the whole CFG batch), and the work of
    this process's last transformer block (image tokens x samples, summed over its calls)."""
    from editkit.infer import sampler
    from editkit.infer.engine import EditRequest, Engine

    work = []

    def count(block, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        work.append(hidden.shape[0] * hidden.shape[1])

    model.transformer.transformer_blocks[-1].register_forward_pre_hook(count, with_kwargs=True)

    image = Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8"))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    with torch.no_grad():
        inputs = model.prepare(["make it red", "add a small hat on the left"], [[image], [image]],
                               negative_prompts=[" ", "blurry"])
        latents = sampler.sample(model, inputs, STEPS, 4.0, seeds=[3, 4])
    requests = [EditRequest("make it red", [image], negative_prompt=" ", steps=STEPS, seed=5),
                EditRequest("make it blue", [image], negative_prompt=" ", steps=STEPS, seed=6, mask=mask,
                            fusion="latent-mask")]
    images = Engine(model).edit(requests)
    return {"latents": latents, "images": [torch.from_numpy(np.asarray(img).copy()) for img in images],
            "work": sum(work)}


def main(mode: str, out: str) -> None:
    from editkit.infer import parallel
    from editkit.utils import dist

    if mode == "ulysses" and not torch.cuda.is_available():
        # diffusers' enable_parallelism puts rank r on accelerator r % device_count(), 0 on a CPU-only machine
        torch.accelerator.device_count = lambda: 1
    model = parallel.apply_parallel(tiny_model(), mode)
    result = edits(model)
    torch.save(result, Path(out) / f"rank{dist.rank()}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
