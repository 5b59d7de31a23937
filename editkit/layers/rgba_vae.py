"""The RGBA-VAE (Qwen-Image-Layered §3.1, after AlphaVAE): widening a Qwen-Image VAE to RGBA,
loading one, and compositing RGBA images over solid backgrounds.

Widening (`widen_to_rgba`): the encoder's first convolution gets a 4th (alpha) input channel
with zero weights and the decoder's last convolution a 4th output channel with zero weights and
bias 1, every other weight copied. An RGB image given alpha = 1 everywhere (the value 1 in the
VAE's [-1, 1] pixel range) then has exactly the RGB VAE's latents and RGB reconstruction, and
its decoded alpha is 1 (opaque): RGB and RGBA images share one latent space.

Pixel conventions: the VAE sees straight (non-premultiplied) RGBA in [-1, 1]; the compositing
helpers take straight RGBA in [0, 1] (`unit_range` converts).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from editkit.errors import UserError

VAE_CLASS = "AutoencoderKLQwenImage"

# The 9 solid backgrounds of AlphaVAE's benchmark (its validation_pipeline/scripts/blend_rgba.py),
# RGB in [0, 1]; grey is 128/255 as there.
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.0, 0.0, 0.0),
    "white": (1.0, 1.0, 1.0),
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "grey": (128 / 255, 128 / 255, 128 / 255),
}


def unit_range(pixels):
    """VAE pixels in [-1, 1] as values in [0, 1] (numpy array or torch tensor)."""
    return (pixels + 1) / 2


def over_background(rgba, colour: tuple[float, float, float], channel_dim: int = -1):
    """The RGB of straight-alpha `rgba` (values in [0, 1]; a numpy array or a torch tensor, channels
    R, G, B, A along `channel_dim`) composited over a solid `colour`: rgb·a + colour·(1 − a)."""
    dim = channel_dim % rgba.ndim

    def channels(start: int, stop: int):
        index = [slice(None)] * rgba.ndim
        index[dim] = slice(start, stop)
        return rgba[tuple(index)]

    shape = [1] * rgba.ndim
    shape[dim] = 3
    if isinstance(rgba, np.ndarray):
        bg = np.asarray(colour, dtype=rgba.dtype).reshape(shape)
    else:
        bg = rgba.new_tensor(colour).reshape(shape)
    alpha = channels(3, 4)
    return channels(0, 3) * alpha + bg * (1 - alpha)


# ----- VAE folders --------------------------------------------------------------------------------

def find_vae_folder(path: str | Path) -> Path:
    """The AutoencoderKLQwenImage folder at `path`: the folder itself, or the `vae/` of a model folder."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: not a folder; give a Qwen-Image VAE folder (config.json + weights) or a model "
                        "folder holding vae/")
    for folder in (path, path / "vae"):
        config = folder / "config.json"
        if not config.is_file():
            continue
        try:
            name = json.loads(config.read_text(encoding="utf-8")).get("_class_name")
        except (OSError, ValueError, AttributeError):
            raise UserError(f"{config}: cannot be read as a JSON config; restore the VAE folder") from None
        if name == VAE_CLASS:
            return folder
        if folder == path and name is not None and not (path / "vae").is_dir():
            raise UserError(f"{config}: a {name}, not an {VAE_CLASS}; give a Qwen-Image VAE folder")
    raise UserError(f"{path}: no {VAE_CLASS} config.json here or in {path / 'vae'}; give a Qwen-Image VAE folder "
                    "or a model folder holding vae/")


def load_vae(path: str | Path):
    """The AutoencoderKLQwenImage of `path` (see `find_vae_folder`), float32, in eval mode."""
    from diffusers import AutoencoderKLQwenImage

    folder = find_vae_folder(path)
    try:
        vae = AutoencoderKLQwenImage.from_pretrained(folder)
    except Exception as err:  # a damaged file surfaces as OSError, ValueError, SafetensorError, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        raise UserError(f"{folder}: the VAE cannot be loaded ({err.__class__.__name__}: {first}); "
                        "restore or re-download its files") from None
    return vae.eval()


def input_channels(vae) -> int:
    return int(vae.config.get("input_channels", 3))


def widen_to_rgba(vae):
    """A 4-channel (RGBA) copy of the 3-channel AutoencoderKLQwenImage `vae` (see the module docstring)."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLQwenImage

    if input_channels(vae) != 3:
        raise ValueError(f"widen_to_rgba needs a 3-channel VAE, this one has {input_channels(vae)}")
    state = dict(vae.state_dict())
    enc_w = state["encoder.conv_in.weight"]  # (out, 3, t, h, w)
    state["encoder.conv_in.weight"] = torch.cat([enc_w, torch.zeros_like(enc_w[:, :1])], dim=1)
    dec_w, dec_b = state["decoder.conv_out.weight"], state["decoder.conv_out.bias"]  # (3, in, t, h, w), (3,)
    state["decoder.conv_out.weight"] = torch.cat([dec_w, torch.zeros_like(dec_w[:1])], dim=0)
    state["decoder.conv_out.bias"] = torch.cat([dec_b, torch.ones_like(dec_b[:1])])
    config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    with init_empty_weights():
        wide = AutoencoderKLQwenImage.from_config({**config, "input_channels": 4})
    wide.load_state_dict(state, strict=True, assign=True)
    return wide.eval()


def load_rgba_vae(path: str | Path):
    """The VAE of `path` as an RGBA VAE: a 4-channel one as it is, a 3-channel one widened in memory."""
    vae = load_vae(path)
    channels = input_channels(vae)
    if channels == 3:
        return widen_to_rgba(vae)
    if channels != 4:
        raise UserError(f"{find_vae_folder(path)}: a VAE with input_channels={channels}; give an RGB (3) or RGBA (4) "
                        "Qwen-Image VAE")
    return vae


def convert_vae(src: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the RGBA widening of the RGB VAE at `src` to `out` (diffusers format, float32), atomically."""
    from editkit.utils.atomic import atomic_dir

    out = Path(out)
    folder = find_vae_folder(src)
    if out.resolve() in (folder.resolve(), Path(src).resolve()):
        raise UserError(f"{out}: is the source folder; write the RGBA VAE to another folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"{out}: exists and is not empty; choose a new folder or pass --overwrite to replace it")
    vae = load_vae(folder)
    if input_channels(vae) != 3:
        raise UserError(f"{folder}: already has input_channels={input_channels(vae)} (not an RGB VAE); "
                        "it needs no conversion")
    wide = widen_to_rgba(vae)
    with atomic_dir(out) as tmp:
        wide.save_pretrained(tmp)
    return out


def reconstruct(vae, pixels):
    """(B, 4, H, W) RGBA in [-1, 1] through `vae` (posterior mode, no sampling): (B, 4, H, W) float32."""
    posterior = vae.encode(pixels.unsqueeze(2).to(vae.dtype)).latent_dist
    return vae.decode(posterior.mode()).sample[:, :, 0].float()


def to_pil(pixels):
    """(4, H, W) RGBA in [-1, 1] (a torch tensor) as an 8-bit RGBA PIL image (rounded)."""
    from PIL import Image

    values = (unit_range(pixels.detach().float().clamp(-1, 1)) * 255).round().byte()
    return Image.fromarray(values.permute(1, 2, 0).cpu().numpy(), "RGBA")
