"""Sizes of the demo: the full run (a few minutes on 2 CPU cores) and `--quick` (toy size).

The full sizes come from the experiments recorded in docs/demo.md: 32x32 images, a 4x VAE
(8x8 latents, 16 tokens per image after 2x2 packing) and a 4-layer, 128-wide editor trained
with latent bridge matching are what learns within the time budget on a CPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class DemoPreset:
    name: str
    samples: int  # synthetic samples, split 80/10/10 into train/val/test
    image_size: int  # side of the square images (pixels)
    vae: dict = field(default_factory=dict)  # the `vae` stage's architecture and loss (editkit.train.config.VaeStage)
    vae_steps: int = 1000
    vae_batch: int = 16
    vae_lr: float = 2e-3  # held-out 33.9 dB after 1000 steps, 1e-3: 28.5 dB (docs/demo.md)
    vae_betas: tuple[float, float] = (0.9, 0.99)  # a short beta2 memory leaves the colour plateau sooner
    width: int = 128  # editor transformer: heads x 32
    depth: int = 4
    objective: str = "lbm"  # lbm | flow_matching
    edit_steps: int = 900
    edit_batch: int = 32
    edit_lr: float = 1e-3
    text_dropout: float = 0.1
    sample_steps: int = 8  # flow-matching steps at inference (each CFG value of the sweep)
    cfgs: tuple[float, ...] = (1.0, 2.5, 4.0)  # the sweep of a flow-matching editor
    bridge_steps: tuple[int, ...] = (1, 2, 4)  # the sweep of an LBM editor (its bridge sampler has no CFG)
    checkpoint_every: int = 200
    packaged_vae: bool = False
    """Use the VAE shipped in `editkit/demo/assets/vae` (this preset's `vae` stage, seed 0: see
    docs/demo.md) instead of training one; `editkit demo --train-vae` turns it off."""

    def as_dict(self) -> dict:
        return asdict(self)


_VAE = {"base_dim": 16, "z_dim": 8, "dim_mult": [1, 2, 2], "num_res_blocks": 1, "loss": "mse", "kl_weight": 1e-6}

FULL = DemoPreset(name="full", samples=1000, image_size=32, vae=_VAE, packaged_vae=True)

QUICK = DemoPreset(
    name="quick", samples=40, image_size=32,
    vae={**_VAE, "base_dim": 8, "stats_batches": 2},
    vae_steps=15, vae_batch=8, vae_lr=1e-3, width=64, depth=2, edit_steps=40, edit_batch=8, edit_lr=2e-3,
    bridge_steps=(1, 2), checkpoint_every=20,
)


@dataclass(frozen=True)
class InferSetting:
    """One point of the inference sweep: its run (folder) name, CFG scale and sampling steps."""

    name: str
    cfg: float
    steps: int


def sweep(preset: DemoPreset) -> list[InferSetting]:
    """Bridge steps for an LBM editor, CFG values for a flow-matching one."""
    if preset.objective == "lbm":
        return [InferSetting(f"bridge-{n}-steps", 1.0, n) for n in preset.bridge_steps]
    return [InferSetting(f"cfg-{float(c)}", float(c), preset.sample_steps) for c in preset.cfgs]
