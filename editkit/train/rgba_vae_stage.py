"""The `rgba_vae` stage: an RGBA AutoencoderKLQwenImage fine-tuned on layered data (Qwen-Image-Layered §3.1).

Model: `rgba_vae.rgb_checkpoint` through `editkit.layers.rgba_vae.load_rgba_vae`, so a VAE written
by `editkit layers convert-vae` is used as it is and an RGB VAE is widened in memory the same
way. Its latents_mean/std are kept (the RGB and RGBA VAEs share one latent space), so an export
is the fine-tuned VAE as `save_pretrained` writes it. The 3D convolutions run as 2D ones on the
single-frame images (editkit.train.vae_stage.single_frame_convs).

Data: the train split of the `editkit layers prep` folder `data.train[0].manifest`, one bucket per
batch (editkit.layers.dataset: every component, and with `include_composites` every composite),
drawn with the sampler's `next_batch`, whose state the checkpoints keep (exact resume).

Loss, in [0, 1] units: L1 on RGB (premultiplied by alpha, or straight with `rgb_loss: straight`)
+ `alpha_weight` x L1 on alpha + `kl_weight` x KL + `lpips_weight` x LPIPS of the composites over
black and over white (AlphaVAE's perceptual loss). The RGB and perceptual terms see the decoder
output clamped to [-1, 1], as the `vae` stage's loss does; the alpha term sees it unclamped
(`UnclampedVaeForTraining` says why). Unclamped RGB as well was less stable (tiny VAE, 24 scenes
at 32 px, lr 2e-3, alpha_weight 1): the 9-background val PSNR fell from 13.5 to 9.2 dB between
steps 200 and 300, against 13.8 -> 15.2 dB with the RGB term clamped.

Validation (every loop.validate_every steps): the components (and composites) of the first
loop.val_samples samples of the val split reconstructed from the posterior mode; the values
logged are the loss (val_loss) and the means of editkit.eval.metrics.rgba's columns
(val_rgba_psnr_white, val_rgba_psnr, val_rgba_ssim, val_rgba_l1, val_alpha_iou); a grid of the
first `grid_items` (targets and reconstructions over a checkerboard, then their alphas) goes to
<output_dir>/outputs/val/val_recon_step_{step}.png. Previews (loop.preview_every) are the same grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from editkit.errors import UserError
from editkit.layers.rgba_vae import BACKGROUNDS, load_rgba_vae, over_background, reconstruct, to_pil, unit_range
from editkit.train.config import TrainConfig
from editkit.train.objectives import LossOutput
from editkit.train.vae_stage import VaeForTraining, single_frame_convs


def recon_losses(rec: torch.Tensor, target: torch.Tensor, rgb_loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(RGB L1, alpha L1) of (B, 4, H, W) decoder outputs against targets in [-1, 1], in [0, 1] units.

    The RGB term sees the output clamped to [-1, 1] (as a decoded image is); the alpha term the
    output as it is, so an alpha decoded past the range still gets a gradient."""
    p, t = unit_range(rec.float().clamp(-1, 1)), unit_range(target.float())
    if rgb_loss == "premultiplied":
        rgb = (p[:, :3] * p[:, 3:] - t[:, :3] * t[:, 3:]).abs().mean()
    else:
        rgb = (p[:, :3] - t[:, :3]).abs().mean()
    return rgb, (unit_range(rec[:, 3].float()) - t[:, 3]).abs().mean()


def _to_hwc(x: torch.Tensor) -> np.ndarray:
    """(4, H, W) in [-1, 1] as (H, W, 4) float64 in [0, 1], as an 8-bit PNG of it would read back
    (what `editkit eval` scores)."""
    return np.asarray(to_pil(x), dtype=np.float64) / 255.0


def rgba_grid(targets: list[torch.Tensor], recons: list[torch.Tensor]):
    """A PIL image, one column per item: target and reconstruction over a checkerboard, then their alphas."""
    from PIL import Image

    width, height = max(t.shape[-1] for t in targets), max(t.shape[-2] for t in targets)
    grid = Image.new("RGB", (len(targets) * width, 4 * height), (128, 128, 128))
    for col, (target, rec) in enumerate(zip(targets, recons)):
        h, w = target.shape[-2:]
        yy, xx = np.mgrid[:h, :w]
        checker = np.where((yy // 8 + xx // 8) % 2, 0.9, 0.7)[..., None]
        for row, image in enumerate((target, rec)):
            rgba = _to_hwc(image)
            shown = rgba[..., :3] * rgba[..., 3:] + checker * (1 - rgba[..., 3:])
            grid.paste(Image.fromarray(np.rint(shown * 255).astype(np.uint8)), (col * width, row * height))
            alpha = np.rint(rgba[..., 3] * 255).astype(np.uint8)
            grid.paste(Image.fromarray(alpha).convert("RGB"), (col * width, (row + 2) * height))
    return grid


class UnclampedVaeForTraining(VaeForTraining):
    """VaeForTraining whose reconstruction is the decoder's raw output, not clamped to [-1, 1]
    (`decode(z).sample` is that output clamped; one frame); `recon_losses` clamps what it needs.

    With a clamped alpha, an alpha decoded past -1 gets no gradient, and with the premultiplied RGB
    loss neither does its colour: from the converted VAE (alpha exactly 1) the first steps push
    alpha down everywhere, past -1, and learning stops. Measured on the tiny VAE, 24 synthetic
    scenes at 32 px, lr 2e-3, 150 steps: 4.9 dB 9-background val PSNR with the clamp (gradient norm
    0.002), 15.5 dB without.
    """

    def forward(self, pixels: torch.Tensor, eps: torch.Tensor):
        posterior = self.vae.encode(pixels).latent_dist
        z = posterior.mean + posterior.std * eps
        return self.vae.decoder(self.vae.post_quant_conv(z)), posterior.mean, posterior.logvar


class RgbaVaeTask:
    """Model, data and loss of the rgba_vae stage (an editkit.train.task.Task)."""

    @staticmethod
    def data_identity(cfg: TrainConfig) -> dict:
        """data.train names a `layers prep` folder and the start VAE is a folder: both by file stamps."""
        from editkit.utils.fingerprint import folder_stamp

        return {"data.train": [folder_stamp(d.manifest) for d in cfg.data.train],
                "rgba_vae.rgb_checkpoint": folder_stamp(cfg.rgba_vae.rgb_checkpoint)}

    def __init__(self, cfg: TrainConfig, device, rank: int = 0, world: int = 1):
        from editkit.layers.dataset import component_dataloader
        from editkit.layers.records import read_prepared

        self.cfg, self.device, self.stage = cfg, device, cfg.rgba_vae
        self.root = Path(cfg.data.train[0].manifest)
        loader = component_dataloader(self.root, "train", cfg.data.batch_size, shuffle=True, seed=cfg.seed,
                                      include_composites=self.stage.include_composites, rank=rank,
                                      world_size=world)
        self.data, self.sampler = loader.dataset, loader.batch_sampler
        self.has_val = any(e.split == "val" for e in read_prepared(self.root))
        if cfg.loop.validate_every and not self.has_val:
            raise UserError(f"loop.validate_every: {self.root} has no val split; prepare one with `editkit layers "
                            "prep --val-count N`, or set loop.validate_every=0")
        self.vae = single_frame_convs(load_rgba_vae(self.stage.rgb_checkpoint).to(device))
        self.module = UnclampedVaeForTraining(self.vae)
        self.perceptual = self._perceptual() if self.stage.lpips_weight > 0 else None
        self._val: list[dict] | None = None
        self.info = {"items": len(self.data), "vae_params": sum(p.numel() for p in self.vae.parameters())}

    def _perceptual(self):
        """The LPIPS network of `editkit eval`'s lpips metric (frozen; differentiable in its inputs)."""
        from editkit.eval.metrics.lpips_net import load_lpips

        return load_lpips(Path(self.stage.lpips_weights), self.device, "rgba_vae.lpips_weights")

    def set_module(self, module) -> None:
        self.module = module

    def next_batch(self, generator: torch.Generator) -> torch.Tensor:
        from editkit.layers.dataset import collate

        return collate([self.data[i] for i in self.sampler.next_batch()])["component"]

    def loss(self, pixels: torch.Tensor, generator: torch.Generator) -> LossOutput:
        s = self.stage
        pixels = pixels.to(self.device)
        down = self.vae.spatial_compression_ratio
        shape = (pixels.shape[0], self.vae.config.z_dim, 1, pixels.shape[-2] // down, pixels.shape[-1] // down)
        eps = torch.randn(shape, generator=generator).to(self.device)
        rec, mean, logvar = self.module(pixels.unsqueeze(2), eps)
        rec = rec[:, :, 0]
        rgb, alpha = recon_losses(rec, pixels, s.rgb_loss)
        kl = 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1 - logvar.float()).mean()
        loss = rgb + s.alpha_weight * alpha + s.kl_weight * kl
        parts = {"recon_rgb": rgb.item(), "recon_alpha": alpha.item(), "kl": kl.item()}
        if self.perceptual is not None:
            lpips = self._lpips(rec, pixels)
            loss = loss + s.lpips_weight * lpips
            parts["lpips"] = lpips.item()
        return LossOutput(loss, parts)

    def _lpips(self, rec: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p, t = unit_range(rec.float().clamp(-1, 1)), unit_range(target.float())
        pairs = [(over_background(p, BACKGROUNDS[c], 1), over_background(t, BACKGROUNDS[c], 1))
                 for c in ("black", "white")]
        return sum(self.perceptual(2 * a - 1, 2 * b - 1).mean() for a, b in pairs) / len(pairs)  # LPIPS takes [-1, 1]

    # ----- validation and previews ----------------------------------------------------------------

    def _val_items(self) -> list[dict]:
        """The val items (components, and composites with include_composites) of the first loop.val_samples samples."""
        if self._val is None:
            from editkit.layers.dataset import ComponentDataset

            data = ComponentDataset(self.root, "val", self.stage.include_composites)
            first = {e.id for e in data.entries[:self.cfg.loop.val_samples]}
            self._val = [data[i] for i in range(len(data)) if data.entries[data.items[i][0]].id in first]
        return self._val

    def _steps_done(self) -> int:
        """Optimiser steps taken so far, from the sampler's position (every step draws loop.grad_accum
        batches; the checkpoints keep the position, so this holds after a resume too)."""
        state = self.sampler.state_dict()
        return (state["epoch"] * len(self.sampler) + state["position"]) // self.cfg.loop.grad_accum

    def _reconstruct(self, items: list[dict]) -> list[torch.Tensor]:
        with torch.no_grad():
            return [reconstruct(self.vae, it["component"][None].to(self.device))[0].cpu() for it in items]

    @torch.no_grad()
    def validation_loss(self, seed: int) -> dict[str, float] | None:
        """The loss and the RGBA metrics on the val items (posterior mode: no noise; `seed` is unused)."""
        from editkit.eval.metrics.rgba import COLUMNS, rgba_metrics

        items = self._val_items()
        recons = self._reconstruct(items)
        losses, rows = [], []
        for it, rec in zip(items, recons):
            rgb, alpha = recon_losses(rec[None], it["component"][None], self.stage.rgb_loss)
            losses.append(float(rgb + self.stage.alpha_weight * alpha))
            rows.append(rgba_metrics(_to_hwc(rec), _to_hwc(it["component"])))
        out = {"loss": float(np.mean(losses))}
        out.update({c: float(np.nanmean([r[c] for r in rows])) for c in COLUMNS})
        folder = Path(self.cfg.output_dir) / "outputs" / "val"
        self._write_grid(items, recons, folder / f"val_recon_step_{self._steps_done()}.png")
        return out

    def _write_grid(self, items: list[dict], recons: list[torch.Tensor], path: Path) -> Path:
        from editkit.utils.atomic import atomic_path

        n = self.stage.grid_items
        grid = rgba_grid([it["component"] for it in items[:n]], recons[:n])
        with atomic_path(path) as tmp:
            grid.save(tmp, format="PNG")
        return path

    def preview(self, path: Path, steps: int, cfg_scale: float) -> Path | None:
        """The validation grid (the first train items when the folder has no val split)."""
        n = self.stage.grid_items
        items = self._val_items()[:n] if self.has_val else [self.data[i] for i in range(min(n, len(self.data)))]
        return self._write_grid(items, self._reconstruct(items), path)

    # ----- export ---------------------------------------------------------------------------------

    def export(self, module, folder: Path, step: int) -> list[Path]:
        module.vae.save_pretrained(folder / "vae")
        return [folder / "vae"]

    def export_gathered(self, trainable: dict[str, torch.Tensor], folder: Path, step: int) -> list[Path] | None:
        """The VAE rebuilt from a sharded run's gathered weights (every VAE weight is trained)."""
        from accelerate import init_empty_weights
        from diffusers import AutoencoderKLQwenImage

        with init_empty_weights():
            vae = AutoencoderKLQwenImage.from_config(self.vae.config)
        vae.load_state_dict({k.removeprefix("vae."): v for k, v in trainable.items()}, strict=True, assign=True)
        vae.save_pretrained(folder / "vae")
        return [folder / "vae"]
