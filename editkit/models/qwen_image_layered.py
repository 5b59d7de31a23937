"""The Qwen-Image-Layered family: image-to-layers decomposition (I2L) with its `EditModel` facade.

Reproduces diffusers' `QwenImageLayeredPipeline` on batches. The architecture is Qwen-Image-Edit's
(one QwenImage transformer, a Qwen VAE, a Qwen2.5-VL text encoder), so the family and the facade
subclass `editkit.models.qwen_image_edit`'s and reuse its prompt encoding, latent normalisation,
2x2 packing and transformer call. What differs:

- the transformer has `use_layer3d_rope=True` (RoPE frames: layer 0..N, the input image at -1) and
  `use_additional_t_cond=True` (an embedding added to the timestep's: 0 = RGBA layers, 1 = an RGB
  image, the text-to-RGB stage of the paper's curriculum; decomposition always passes 0);
- the VAE is an RGBA VAE (`AutoencoderKLQwenImage(input_channels=4)`, editkit.layers.rgba_vae):
  images are encoded and decoded with their alpha (straight alpha in [-1, 1]);
- the target is `layers + 1` frames of the input's size, packed frame by frame and concatenated:
  frame 0 is the model's re-generation of the whole image (discarded), frames 1..N the layers,
  **bottom (background) first** — the paper's composition `C_i = a_i RGB_i + (1 - a_i) C_{i-1}` and
  the official app's export order; the input image's latents follow as the condition;
- the text prompt is a description of the image (no image tokens; template of the pipeline,
  `drop_idx` as for the edit families); without one, the VLM writes it first (`caption`, the
  pipeline's auto-caption: greedy `generate` of up to 512 tokens with the pipeline's instruction);
- sizes: the `resolution` bucket (640 or 1024 for the released model; any side here) sets the area
  of both the layers and the condition, at the input's aspect (multiples of 32);
- sampling: sigmas `linspace(1, 0, N + 1)[:-1]`, mu = sqrt(condition tokens / 256), true CFG against
  the negative prompt " " with an optional rescale to the conditional prediction's norm
  (`cfg_normalize`, on in the model card and the official app, off in the pipeline's signature).

The edit engine does not run this family (`prepare` is a UserError pointing to `editkit layers
decompose`): an edit returns one image, a decomposition a list of layers. `decompose` is the entry
point (the CLI, the app and dataset runs call it); `prepare_layers` / `sample_layers` /
`decode_layers` are its parts, and `predict` is the differentiable flow-matching velocity a
decomposition training stage steps (latents `pack_layers(...)`, `img_shapes` from `layer_shapes`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from editkit.data.images import as_mode, fit_area
from editkit.errors import UserError
from editkit.models.family import EditInputs, SamplingDefaults
from editkit.models.qwen_image_edit import (
    PROMPT_SUFFIX,
    QWEN_IMAGE_SCHEDULER,
    QwenImageEditFamily,
    QwenImageEditModel,
    _trim,
)
from editkit.utils.lazy import LazyModule

if TYPE_CHECKING:
    import torch
    from PIL import Image
else:
    torch = LazyModule("torch")  # `editkit model info` reads a family's facts without torch

SYSTEM_PROMPT = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
)
"""Everything before the description (the pipeline's `prompt_template_encode`); its tokens are dropped."""

MAX_PROMPT_TOKENS = 512
"""Prompt embeddings are cut to this many tokens (the pipeline's `max_sequence_length`)."""
MAX_CAPTION_TOKENS = 512
"""The auto-caption's `max_new_tokens` (the pipeline's)."""
NEGATIVE_PROMPT = " "
"""The model card's negative prompt (true CFG needs one)."""

# The pipeline's auto-caption instructions (`image_caption_prompt_en` / `_cn`), byte for byte.
CAPTION_PROMPT_EN = (
    '<|im_start|>system\n'
    'You are a helpful assistant.<|im_end|>\n'
    '<|im_start|>user\n'
    '# Image Annotator\n'
    'You are a professional\n'
    'image annotator. Please write an image caption based on the input image:\n'
    '1. Write the caption using natural,\n'
    'descriptive language without structured formats or rich text.\n'
    '2. Enrich caption details by including: \n'
    ' - Object\n'
    'attributes, such as quantity, color, shape, size, material, state, position, actions, and so on\n'
    ' - Vision Relations\n'
    'between objects, such as spatial relations, functional relations, possessive relations, '
    'attachment relations, action\n'
    'relations, comparative relations, causal relations, and so on\n'
    ' - Environmental details, such as weather, lighting,\n'
    'colors, textures, atmosphere, and so on\n'
    ' - Identify the text clearly visible in the image, without translation or\n'
    'explanation, and highlight it in the caption with quotation marks\n'
    '3. Maintain authenticity and accuracy:\n'
    ' - Avoid\n'
    'generalizations\n'
    ' - Describe all visible information in the image, while do not add information not explicitly shown in\n'
    'the image\n'
    '<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n'
    '<|im_start|>assistant\n'
)
CAPTION_PROMPT_CN = (
    '<|im_start|>system\n'
    'You are a helpful assistant.<|im_end|>\n'
    '<|im_start|>user\n'
    '# 图像标注器\n'
    '你是一个专业的图像标注器。请基于输入图像，撰写图注:\n'
    '1.\n'
    '使用自然、描述性的语言撰写图注，不要使用结构化形式或富文本形式。\n'
    '2. 通过加入以下内容，丰富图注细节：\n'
    ' - 对象的属性：如数量、颜色、形状、大小、位置、材质、状态、动作等\n'
    ' -\n'
    '对象间的视觉关系：如空间关系、功能关系、动作关系、从属关系、比较关系、因果关系等\n'
    ' - 环境细节：例如天气、光照、颜色、纹理、气氛等\n'
    ' - 文字内容：识别图像中清晰可见的文字，不做翻译和解释，用引号在图注中强调\n'
    '3.\n'
    '保持真实性与准确性：\n'
    ' - 不要使用笼统的描述\n'
    ' -\n'
    '描述图像中所有可见的信息，但不要加入没有在图像中出现的内容\n'
    '<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n'
    '<|im_start|>assistant\n'
)
CAPTION_PROMPTS = {"en": CAPTION_PROMPT_EN, "cn": CAPTION_PROMPT_CN}

MAX_LAYERS = 64
"""More layers than this is a typo (the released model was shown with 3 to 8)."""


def _layered_presets() -> dict:
    """editkit.models.presets' Qwen architectures with the RGBA VAE (`input_channels=4`).

    The tiny one has 8 latent channels, not the edit preset's 4: the pipeline takes an input with as
    many channels as the latents for latents already, so a 4-channel RGBA image would skip its VAE.
    """
    from editkit.models.presets import FULL, TINY

    tiny = dataclasses.replace(
        TINY, name="tiny-layered", transformer={**TINY.transformer, "in_channels": 32, "out_channels": 8},
        vae={**TINY.vae, "input_channels": 4, "z_dim": 8,
             "latents_mean": [0.1, -0.2, 0.3, 0.0, -0.1, 0.2, 0.05, -0.3],
             "latents_std": [1.5, 0.8, 1.2, 2.0, 1.1, 0.9, 1.3, 1.7]})
    full = dataclasses.replace(FULL, name="full-layered", vae={**FULL.vae, "input_channels": 4})
    return {"tiny": tiny, "full": full}


@dataclass(frozen=True)
class QwenImageLayeredFamily(QwenImageEditFamily):
    """Qwen-Image-Layered: the Qwen-Image-Edit code with the layered transformer and the RGBA VAE."""

    layers: int = 4
    """Layers per decomposition when the user gives none (the pipeline's default)."""
    scheduler: dict = field(default_factory=lambda: dict(QWEN_IMAGE_SCHEDULER))
    """Assumed equal to Qwen-Image's (a loaded folder's own scheduler_config.json is what runs)."""

    @property
    def model_class(self) -> type:
        return QwenImageLayeredModel

    def detect(self, model_index: dict, transformer_config: dict) -> bool:
        """The pipeline class, or a transformer with the layer RoPE."""
        return (model_index.get("_class_name") == self.pipeline_class
                or bool(transformer_config.get("use_layer3d_rope")))

    def build_preset(self, preset: str = "tiny", seed: int = 0, areas: dict[str, int] | None = None, device=None,
                     dtype=None):
        """A model of an architecture preset ("tiny", "full": editkit.models.presets) with the RGBA VAE."""
        presets = _layered_presets()
        if preset not in presets:
            raise UserError(f"unknown model preset {preset!r}; use one of {', '.join(presets)}")
        return super().build_preset(presets[preset], seed=seed, areas=areas, device=device, dtype=dtype)

    def load_folder(self, root: Path, transformer_dir: Path, torch_dtype, areas: dict[str, int], device=None):
        """A snapshot as a facade (see QwenImageEditFamily.load_folder); its VAE must be an RGBA one."""
        model = super().load_folder(root, transformer_dir, torch_dtype, areas, device=device)
        channels = int(model.vae.config.get("input_channels", 3))
        if channels != 4:
            raise UserError(f"{root / 'vae'}: an AutoencoderKLQwenImage with input_channels={channels}; "
                            "Qwen-Image-Layered needs an RGBA VAE (widen one with `editkit layers convert-vae`)")
        return model


FAMILIES = (
    QwenImageLayeredFamily(
        name="qwen-image-layered",
        pipeline_class="QwenImageLayeredPipeline",
        description="Qwen-Image-Layered: decomposes an image into N RGBA layers (editkit layers decompose)",
        image_prompt="",
        max_images=1,
        size_reference="first",
        vlm_image_area=640 * 640,
        vae_image_area=640 * 640,
        output_area=640 * 640,
        transformer_flags={"use_layer3d_rope": True, "use_additional_t_cond": True},
        system_prompt=SYSTEM_PROMPT,
        prompt_suffix=PROMPT_SUFFIX,
        sampling=SamplingDefaults(steps=50, cfg=4.0),
    ),
)
"""Registered in editkit.models.families. Defaults of the model card: 4 layers, the 640 bucket
(`output_area`), true CFG 4 against " ", 50 steps."""


class QwenImageLayeredModel(QwenImageEditModel):
    """Transformer + RGBA VAE + Qwen2.5-VL of Qwen-Image-Layered; `decompose` is its main method.

    Shapes: a decomposition into N layers of a (width, height) image has latents `(B, N + 1, C, h, w)`
    (`layer_latents`), packed frame by frame into `(B, (N + 1) * h/2 * w/2, 4C)` (`pack_layers`).
    """

    # ----- the transformer -------------------------------------------------------------------

    def _transformer_inputs(self, batch: int, device) -> dict:
        """`additional_t_cond`: 0 for every sample (the layers are RGBA)."""
        return {"additional_t_cond": torch.zeros(batch, dtype=torch.long, device=device)}

    def prepare(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]], width: int | None = None,
                height: int | None = None, negative_prompts: Sequence[str | None] | None = None,
                masks: Sequence[Image.Image | None] | None = None) -> EditInputs:
        """Not an edit model: the engine (`editkit edit / infer / serve`) gets one clear line."""
        raise UserError(f"{self.family.name} decomposes images into layers and does not edit; use `editkit layers "
                        "decompose --model MODEL --image IMG` (or `editkit layers infer` for a dataset)")

    # ----- sizes and packing -----------------------------------------------------------------

    def layer_size(self, image: Image.Image, resolution: int | None = None) -> tuple[int, int]:
        """(width, height) of the layers (and of the condition) for `image`: about `resolution`²
        pixels (default: the model's output area) at its aspect, multiples of 32 (the pipeline's
        `calculate_dimensions`), then of `size_multiple`."""
        area = self.output_area if resolution is None else int(resolution) ** 2
        width, height = fit_area(area, image.width / image.height)
        m = self.size_multiple
        return width // m * m, height // m * m

    def layer_shapes(self, width: int, height: int, layers: int) -> list[tuple[int, int, int]]:
        """RoPE frames of one sample: `layers + 1` target frames (layer indices 0..N), then the
        condition (the transformer gives the last entry the layer index -1)."""
        unit = self.size_multiple
        frame = (1, height // unit, width // unit)
        return [frame] * (layers + 1) + [frame]

    def pack_layers(self, latents: torch.Tensor) -> torch.Tensor:
        """`(B, F, C, h, w)` frame latents to `(B, F * h/2 * w/2, 4C)` tokens (each frame packed 2x2)."""
        b, f, c, h, w = latents.shape
        return self.pack(latents.reshape(b * f, c, h, w)).reshape(b, f * (h // 2) * (w // 2), c * 4)

    def unpack_layers(self, packed: torch.Tensor, frames: int, latent_height: int, latent_width: int) -> torch.Tensor:
        """`(B, F * N, 4C)` tokens back to `(B, F, C, h, w)` frame latents."""
        b, _, channels = packed.shape
        per_frame = packed.reshape(b * frames, -1, channels)
        return self.unpack(per_frame, latent_height, latent_width).reshape(
            b, frames, channels // 4, latent_height, latent_width)

    # ----- images ----------------------------------------------------------------------------

    def preprocess(self, images: Sequence[Image.Image], width: int, height: int) -> torch.Tensor:
        """Images resized to (width, height) as a (B, 4, H, W) straight-alpha RGBA tensor in [-1, 1]
        (an image without alpha is opaque)."""
        return torch.cat([self.image_processor.preprocess(as_mode(img, "RGBA"), height, width) for img in images])

    def layer_view(self, image: Image.Image, resolution: int | None = None) -> Image.Image:
        """`image` as RGBA at its layer size, resized as the pipeline resizes it: what the VAE and the
        auto-caption see, and what a recomposition is compared with."""
        width, height = self.layer_size(image, resolution)
        return self.image_processor.resize(as_mode(image, "RGBA"), height, width)

    def decode_layers(self, packed: torch.Tensor, width: int, height: int, layers: int) -> torch.Tensor:
        """RGBA pixels `(B, layers, 4, H, W)` in about [-1, 1] of sampled packed latents (frame 0,
        the re-generated input, is dropped), bottom layer first."""
        frames = self.unpack_layers(packed, layers + 1, *self.latent_size(width, height))
        b, _, c, h, w = frames.shape
        pixels = self.decode_latents(frames[:, 1:].reshape(b * layers, c, h, w))
        return pixels.reshape(b, layers, *pixels.shape[1:])

    def layer_images(self, pixels: torch.Tensor) -> list[list[Image.Image]]:
        """RGBA PIL images of `decode_layers` pixels, one list (bottom first) per sample."""
        return [self.to_pil(sample.float()) for sample in pixels]

    # ----- the prompt ------------------------------------------------------------------------

    def caption(self, images: Sequence[Image.Image], language: str = "en", resolution: int | None = None) -> list[str]:
        """The pipeline's auto-caption of each image: the VLM describes the image (as resized for the
        decomposition) after the pipeline's instruction, greedy, up to 512 tokens; one image at a time
        (as the pipeline, whose generation pads nothing)."""
        if language not in CAPTION_PROMPTS:
            raise UserError(f"caption language {language!r}: use one of {', '.join(CAPTION_PROMPTS)}")
        captions = []
        with torch.no_grad():
            for image in images:
                inputs = self.processor(text=CAPTION_PROMPTS[language], images=self.layer_view(image, resolution),
                                        padding=True, return_tensors="pt").to(self.device)
                generated = self.text_encoder.generate(**inputs, max_new_tokens=MAX_CAPTION_TOKENS)
                new_tokens = [out[len(ids):] for ids, out in zip(inputs["input_ids"], generated)]
                text = self.processor.batch_decode(new_tokens, skip_special_tokens=True,
                                                   clean_up_tokenization_spaces=False)[0]
                captions.append(text.strip())
        return captions

    def encode_descriptions(self, prompts: Sequence[str]):
        """Text embeddings `(embeds (B, L, D), mask (B, L))` of image descriptions (no image tokens),
        cut to the pipeline's 512 tokens."""
        embeds, mask = self.encode_prompt(prompts)
        return embeds[:, :MAX_PROMPT_TOKENS], mask[:, :MAX_PROMPT_TOKENS]

    # ----- decomposition ---------------------------------------------------------------------

    def prepare_layers(self, prompts: Sequence[str], images: Sequence[Image.Image], layers: int,
                       negative_prompts: Sequence[str | None] | None = None,
                       resolution: int | None = None) -> EditInputs:
        """Encode one batch to decompose into `layers` layers: images of one layer size (group them
        so), their descriptions, and optional negative prompts (None: no true CFG for that sample).
        `cond_latents` are the images' packed RGBA latents; `extra["layers"]` is the layer count."""
        if not images or len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
        check_layers(layers)
        sizes = {self.layer_size(image, resolution) for image in images}
        if len(sizes) > 1:
            raise ValueError("a batch needs images of one layer size; group them by size")
        (width, height), = sizes
        with torch.no_grad():
            has_negative = [n is not None for n in negative_prompts] if negative_prompts else [False] * len(prompts)
            neg_embeds = neg_mask = None
            if any(has_negative):  # one VLM pass for prompts and negatives
                negatives = [n if n is not None else "" for n in negative_prompts]
                both, both_mask = self.encode_descriptions([*prompts, *negatives])
                embeds, mask = _trim(both[: len(prompts)], both_mask[: len(prompts)])
                neg_embeds, neg_mask = _trim(both[len(prompts):], both_mask[len(prompts):])
            else:
                embeds, mask = self.encode_descriptions(prompts)
            cond = self.pack(self.encode_images(images, width, height)).to(embeds.dtype)
        return EditInputs(prompt_embeds=embeds, prompt_mask=mask, cond_latents=cond,
                          img_shapes=[self.layer_shapes(width, height, layers)] * len(images), width=width,
                          height=height, negative_embeds=neg_embeds, negative_mask=neg_mask,
                          has_negative=has_negative, extra={"layers": layers})

    def layer_noise(self, width: int, height: int, layers: int, seeds: Sequence[int],
                    dtype: torch.dtype | None = None) -> torch.Tensor:
        """Packed Gaussian noise of `layers + 1` frames, sample i drawn from a CPU generator seeded
        `seeds[i]` exactly as the pipeline draws it (`randn_tensor((1, N + 1, C, h, w))`)."""
        from diffusers.utils.torch_utils import randn_tensor

        shape = (1, layers + 1, self.latent_channels, *self.latent_size(width, height))
        noise = [randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(int(seed)), device=self.device,
                              dtype=dtype) for seed in seeds]
        return self.pack_layers(torch.cat(noise))

    def layer_scheduler(self, steps: int, condition_tokens: int):
        """A fresh copy of the scheduler set as the pipeline sets it: sigmas `linspace(1, 0, N + 1)[:-1]`,
        mu = sqrt(condition tokens / 256)."""
        import numpy as np
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 0, steps + 1)[:-1], device=self.device,
                                mu=math.sqrt(condition_tokens / 256))
        scheduler.set_begin_index(0)
        return scheduler

    def sample_layers(self, inputs: EditInputs, steps: int, cfg: float, seeds: Sequence[int],
                      latents: torch.Tensor | None = None, cfg_normalize: bool = True,
                      callback: Callable[[int, int], None] | None = None,
                      attention_kwargs: dict | None = None) -> torch.Tensor:
        """Denoise one `prepare_layers` batch; returns packed latents of the `layers + 1` frames.

        True CFG runs when `cfg > 1` and every sample has a negative prompt (the conditional and
        negative passes as one batch): `neg + cfg (cond - neg)`, rescaled to the conditional
        prediction's norm per token when `cfg_normalize`.
        """
        from editkit.infer.sampler import guided

        check_steps(steps)
        layers, batch = inputs.extra["layers"], inputs.batch_size
        if len(seeds) != batch:
            raise ValueError(f"{len(seeds)} seeds for a batch of {batch}")
        if latents is None:
            latents = self.layer_noise(inputs.width, inputs.height, layers, seeds, inputs.prompt_embeds.dtype)
        use_cfg = cfg > 1 and bool(inputs.has_negative) and all(inputs.has_negative)
        if use_cfg:
            embeds, mask = _stack_padded(inputs.prompt_embeds, inputs.negative_embeds, inputs.prompt_mask,
                                         inputs.negative_mask)
            cond, shapes = torch.cat([inputs.cond_latents] * 2), inputs.img_shapes * 2
        else:
            embeds, mask, cond = inputs.prompt_embeds, inputs.prompt_mask, inputs.cond_latents
            shapes = inputs.img_shapes
        if mask is not None and bool(mask.all()):
            mask = None  # no padding: no attention mask (as the pipeline)
        scheduler = self.layer_scheduler(steps, inputs.cond_latents.shape[1])
        with torch.no_grad(), self.denoising():
            for i, t in enumerate(scheduler.timesteps):
                timestep = t.expand(batch).to(latents.dtype) / 1000
                model_in = torch.cat([latents] * 2) if use_cfg else latents
                step_t = torch.cat([timestep] * 2) if use_cfg else timestep
                pred = self.predict(model_in, step_t, embeds, mask, shapes, cond, attention_kwargs)
                if use_cfg:
                    cond_pred, neg_pred = pred.chunk(2)
                    pred = (guided(cond_pred, neg_pred, cfg) if cfg_normalize
                            else neg_pred + cfg * (cond_pred - neg_pred))
                latents = scheduler.step(pred, t, latents, return_dict=False)[0]
                if callback is not None:
                    callback(i + 1, steps)
        return latents

    def decompose(self, images: Sequence[Image.Image], layers: int | Sequence[int] | None = None,
                  steps: int | None = None, cfg: float | None = None, seeds: Sequence[int] | int = 0,
                  prompts: Sequence[str | None] | None = None, negative_prompt: str | None = NEGATIVE_PROMPT,
                  cfg_normalize: bool = True, resolution: int | None = None, caption_language: str = "en",
                  max_batch: int = 4, callback: Callable[[int, int], None] | None = None) -> list[list[Image.Image]]:
        """Decompose images into RGBA layers (bottom first), one list per image, in order.

        `layers`: one count for all or one per image (default: the family's 4); `steps` / `cfg`:
        default the family's (50, 4); `seeds`: one per image (an int s: s, s + 1, ...); `prompts`:
        each image's description, None / "" / " " for the auto-caption (`caption`); `negative_prompt`
        None turns true CFG off. Images of one layer size and count run together, `max_batch` at a
        time; `callback(steps_done, total_steps)` follows all of them.
        """
        count = len(images)
        counts = _per_image(self.family.layers if layers is None else layers, count, "layer counts")
        seed_list = [int(seeds) + i for i in range(count)] if isinstance(seeds, int) else [int(s) for s in seeds]
        texts = list(prompts) if prompts is not None else [None] * count
        if len(seed_list) != count or len(texts) != count:
            raise ValueError(f"{count} images need {count} seeds and prompts")
        steps = self.family.sampling.steps if steps is None else steps
        cfg = self.family.sampling.cfg if cfg is None else cfg
        check_steps(steps)
        for n in counts:
            check_layers(n)
        missing = [i for i, text in enumerate(texts) if text is None or text in ("", " ")]
        for i, text in zip(missing, self.caption([images[i] for i in missing], caption_language, resolution)):
            texts[i] = text
        groups: dict[tuple, list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault((self.layer_size(image, resolution), counts[i]), []).append(i)
        batches = [idx[k:k + max_batch] for idx in groups.values() for k in range(0, len(idx), max(1, max_batch))]
        out: list[list[Image.Image] | None] = [None] * count
        for done, batch in enumerate(batches):
            def step(i, _n, offset=done * steps):
                if callback is not None:
                    callback(offset + i, len(batches) * steps)

            inputs = self.prepare_layers([texts[i] for i in batch], [images[i] for i in batch], counts[batch[0]],
                                         [negative_prompt] * len(batch) if negative_prompt is not None else None,
                                         resolution)
            packed = self.sample_layers(inputs, steps, cfg, [seed_list[i] for i in batch], cfg_normalize=cfg_normalize,
                                        callback=step)
            with torch.no_grad():
                pixels = self.decode_layers(packed, inputs.width, inputs.height, counts[batch[0]])
            for i, sample in zip(batch, self.layer_images(pixels)):
                out[i] = sample
        return out


def check_layers(layers) -> int:
    """A layer count (1..MAX_LAYERS); a UserError otherwise."""
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= MAX_LAYERS:
        raise UserError(f"--layers {layers!r}: give a whole number of layers from 1 to {MAX_LAYERS}")
    return layers


def check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
        raise UserError(f"--steps {steps!r}: give a whole number of steps from 1 to 1000")
    return steps


def _per_image(value, count: int, what: str) -> list:
    values = [value] * count if isinstance(value, int) else list(value)
    if len(values) != count:
        raise ValueError(f"{len(values)} {what} for {count} images")
    return values


def _stack_padded(embeds, negative, mask, negative_mask):
    """Conditional and negative prompt embeddings (and masks) as one batch, right-padded to one length."""
    length = max(embeds.shape[1], negative.shape[1])

    def pad(x):
        return torch.cat([x, x.new_zeros(x.shape[0], length - x.shape[1], *x.shape[2:])], dim=1)

    return torch.cat([pad(embeds), pad(negative)]), torch.cat([pad(mask), pad(negative_mask)])
