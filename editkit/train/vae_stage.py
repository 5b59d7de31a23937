"""The `vae` stage: an AutoencoderKLQwenImage trained from scratch on the images of manifests.

Loss: reconstruction (L1 or MSE on [-1, 1] pixels) + kl_weight x KL to a unit Gaussian. The
reconstruction is `decode(z).sample`, which diffusers clamps to [-1, 1]: a pixel decoded past the
range gets no gradient, so the decoder is free to overshoot on white and saturated colours. On
the demo's data that learns faster than the loss on the unclamped output (held-out 32.4 vs
29.2 dB after 1200 steps, docs/demo.md). The causal 3D convolutions run as 2D ones on the
single-frame images (`single_frame_convs`: same results, half the step time on a CPU). Every
export measures the latents' per-channel mean and std over the first images (no randomness) and
stores them in the VAE config (`latents_mean`, `latents_std`) before `save_pretrained`, so the
EditModel facade normalises the new latents correctly.
"""

from __future__ import annotations

import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from editkit.errors import UserError
from editkit.train.config import TrainConfig
from editkit.train.objectives import LossOutput


class VaeForTraining(nn.Module):
    """Encode, sample, decode in one forward, so DDP sees a single call."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor, eps: torch.Tensor):
        posterior = self.vae.encode(pixels).latent_dist
        z = posterior.mean + posterior.std * eps
        return self.vae.decode(z).sample, posterior.mean, posterior.logvar


def _causal_conv_forward(conv, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
    """QwenImageCausalConv3d.forward, as a 2D convolution when the input is one frame without a cache.

    The causal conv pads time with kernel_t - 1 zero frames in front, so on a single frame only the
    kernel's last time slice meets data: the output (and every gradient) is that of a conv2d with
    `weight[:, :, -1]`, at half the CPU time of the whole training step (conv3d runs a 3x larger
    kernel over the zeros). Anything else (videos, cached chunks) takes diffusers' path.
    """
    if (cache_x is None and x.shape[2] == 1 and conv.stride[0] == 1
            and conv._padding[4] == conv.kernel_size[0] - 1 and conv._padding[5] == 0):
        return F.conv2d(x[:, :, 0], conv.weight[:, :, -1], conv.bias, conv.stride[1:],
                        (conv._padding[2], conv._padding[0]), conv.dilation[1:], conv.groups).unsqueeze(2)
    return type(conv).forward(conv, x, cache_x)


def single_frame_convs(vae):
    """Make `vae`'s causal 3D convolutions run as 2D ones on single frames (images); same results.

    Sets an instance `forward` on each QwenImageCausalConv3d (the weights, `state_dict` and the
    saved model are unchanged). Returns `vae`.
    """
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d

    for module in vae.modules():
        if isinstance(module, QwenImageCausalConv3d):
            module.forward = types.MethodType(_causal_conv_forward, module)
    return vae


def build_vae(cfg: TrainConfig):
    from diffusers import AutoencoderKLQwenImage

    v = cfg.vae
    down = v.temperal_downsample or [False] + [True] * (len(v.dim_mult) - 2)
    if len(down) != len(v.dim_mult) - 1:
        raise UserError(f"vae.temperal_downsample: give {len(v.dim_mult) - 1} values (one per downsampling)")
    if v.size % 2 ** len(down):
        raise UserError(f"vae.size={v.size}: must be a multiple of {2 ** len(down)} (the VAE's downsampling)")
    return AutoencoderKLQwenImage(base_dim=v.base_dim, z_dim=v.z_dim, dim_mult=list(v.dim_mult),
                                  num_res_blocks=v.num_res_blocks, temperal_downsample=list(down),
                                  input_channels=v.input_channels,
                                  latents_mean=[0.0] * v.z_dim, latents_std=[1.0] * v.z_dim)


def image_paths(manifests: list[str], fields: dict[str, str] | None = None) -> list[Path]:
    """Every target and source image of the manifests, once each, in a stable order."""
    from editkit.train.edit_task import read_records

    seen: dict[str, Path] = {}
    for m in manifests:
        for r in read_records(m, fields):
            for p in [*r.sources, *([r.target] if r.target is not None else [])]:
                seen.setdefault(str(Path(p).resolve()), Path(p))
    if not seen:
        raise UserError(f"{manifests[0]}: no images found in the manifests")
    return [seen[k] for k in sorted(seen)]


class VaeTask:
    """Model, data and loss of the vae stage (an editkit.train.task.Task)."""

    @staticmethod
    def data_identity(cfg: TrainConfig) -> dict:
        from editkit.train.edit_task import manifest_identity

        return manifest_identity(cfg)

    def __init__(self, cfg: TrainConfig, device, rank: int = 0, world: int = 1):
        self.cfg = cfg
        self.device = device
        self.paths = image_paths([d.manifest for d in cfg.data.train], cfg.data.fields)
        self.vae = single_frame_convs(build_vae(cfg).to(device))
        self.module = VaeForTraining(self.vae)
        from editkit.data.mixing import BucketBatchSampler
        from editkit.data.records import EditRecord

        records = [EditRecord(id=str(i), instruction="", target=p) for i, p in enumerate(self.paths)]
        self.sampler = BucketBatchSampler(records, cfg.data.batch_size, cfg.seed, rank, world)
        self.info = {"images": len(self.paths), "vae_params": sum(p.numel() for p in self.vae.parameters())}

    def set_module(self, module) -> None:
        self.module = module

    def pixels(self, indices: list[int]) -> torch.Tensor:
        """(B, C, 1, S, S) in [-1, 1]: images resized to cover S x S and centre-cropped."""
        import numpy as np

        from editkit.data.images import load_image, resize_to_bucket

        mode = "RGBA" if self.cfg.vae.input_channels == 4 else "RGB"
        size = (self.cfg.vae.size, self.cfg.vae.size)
        arrays = [np.asarray(resize_to_bucket(load_image(self.paths[i], mode), size)) for i in indices]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return x.unsqueeze(2)

    def next_batch(self, generator: torch.Generator) -> torch.Tensor:
        return self.pixels(self.sampler.next_batch())

    def loss(self, pixels: torch.Tensor, generator: torch.Generator) -> LossOutput:
        v = self.cfg.vae
        pixels = pixels.to(self.device)
        down = 2 ** (len(v.dim_mult) - 1)
        shape = (pixels.shape[0], v.z_dim, 1, pixels.shape[-2] // down, pixels.shape[-1] // down)
        eps = torch.randn(shape, generator=generator).to(self.device)
        rec, mean, logvar = self.module(pixels, eps)
        err = rec.float() - pixels
        recon = err.abs().mean() if v.loss == "l1" else (err ** 2).mean()
        kl = 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1 - logvar.float()).mean()
        loss = recon + v.kl_weight * kl
        return LossOutput(loss, {"recon": recon.item(), "kl": kl.item()})

    @torch.no_grad()
    def validation_loss(self, seed: int) -> float | None:
        return None

    def preview(self, path: Path, steps: int, cfg_scale: float) -> Path | None:
        """Originals (top) and reconstructions (bottom) of the first images."""
        from PIL import Image

        from editkit.utils.atomic import atomic_path

        vae = self.vae
        n = min(self.cfg.loop.val_samples, len(self.paths))
        x = self.pixels(list(range(n))).to(self.device)
        with torch.no_grad():
            rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
        both = torch.cat([x, rec.float()])[:, :3, 0].clamp(-1, 1)
        tiles = ((both + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        s = self.cfg.vae.size
        grid = Image.new("RGB", (n * s, 2 * s), "white")
        for i, t in enumerate(tiles):
            grid.paste(Image.fromarray(t), ((i % n) * s, (i // n) * s))
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            grid.save(tmp, format="PNG")
        return path

    @torch.no_grad()
    def latent_stats(self, vae) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the latents (posterior mode) of the first images."""
        bs = self.cfg.data.batch_size
        n = min(len(self.paths), self.cfg.vae.stats_batches * bs)
        zs = [vae.encode(self.pixels(list(range(i, min(i + bs, n)))).to(self.device)).latent_dist.mode().float()
              for i in range(0, n, bs)]
        z = torch.cat(zs).transpose(0, 1).reshape(self.cfg.vae.z_dim, -1)
        return z.mean(1).tolist(), z.std(1).clamp_min(1e-6).tolist()

    def export(self, module, folder: Path, step: int) -> list[Path]:
        vae = module.vae
        was_training = vae.training
        vae.eval()
        mean, std = self.latent_stats(vae)
        vae.register_to_config(latents_mean=mean, latents_std=std)
        vae.save_pretrained(folder / "vae")
        vae.train(was_training)
        return [folder / "vae"]

    def export_gathered(self, trainable: dict[str, torch.Tensor], folder: Path, step: int) -> list[Path] | None:
        """None: the latent statistics of an export need the whole module; a sharded run's
        checkpoint (trainable.safetensors) holds the VAE's weights."""
        return None
