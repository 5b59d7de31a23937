"""Feature similarities from transformers models in HF-format folders on the user's disk.

- clip: CLIP-I = cosine(CLIP image embedding of prediction, of ground truth); CLIP-T = cosine(image
  embedding of prediction, text embedding of the target caption) — MagicBrush's definitions
  (ViT-B/32 there; any CLIPModel folder works); CLIP-T-in (`clip_t_in`) = CLIP-T of the prediction
  with the outside of the mask zero-filled (black), PIE-Bench's edited-region CLIP (which reports
  100·max(cos, 0) with ViT-L/14). Preprocessing from the folder's preprocessor_config.json, else
  CLIP's (shortest edge, centre crop, CLIP mean/std).
- dino: MagicBrush's DINO score — ViT-S/16 (`ViTModel`, e.g. facebook/dino-vits16), resize 256
  bicubic, centre crop 224, ImageNet mean/std, cosine of the CLS tokens (after the final norm).
- dinov3: `DINOv3ViTModel`, cosine of pooler_output (the normed CLS token).
- siglip2: `Siglip2Model`, cosine of the image embeddings (NaFlex patches, mean/std 0.5).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from editkit.errors import UserError
from editkit.eval.metrics import preprocess as pp
from editkit.eval.metrics.base import FeatureMetric, cosine, pooled
from editkit.eval.sample import Sample


def _load(cls, path: Path, name: str, device: torch.device):
    try:
        model = cls.from_pretrained(str(path))
    except Exception as err:  # transformers raises many types for a bad folder
        raise UserError(f"--weights {name}={path}: cannot load a {cls.__name__} from it ({err.__class__.__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); pass an HF-format folder") from err
    return model.eval().to(device)


def _split(samples: list[Sample]):
    """Indices of samples with a ground truth."""
    return [i for i, s in enumerate(samples) if s.target is not None]


class _ImagePairMetric(FeatureMetric):
    """Cosine similarity between the prediction's and the ground truth's embeddings."""

    model_class = ""
    column = ""

    def embed(self, images) -> torch.Tensor:
        raise NotImplementedError

    def compute(self, samples: list[Sample]) -> list[dict[str, float]]:
        out = [{c: math.nan for c in self.columns} for _ in samples]
        idx = _split(samples)
        if idx:
            with torch.no_grad():
                pred = self.embed([samples[i].pred for i in idx])
                target = self.embed([samples[i].target for i in idx])
            for i, value in zip(idx, cosine(pred, target)):
                out[i][self.column] = value
        return out


class ClipMetric(_ImagePairMetric):
    name = "clip"
    columns = ("clip_i", "clip_t", "clip_t_in")
    column = "clip_i"
    hint = "an HF CLIPModel folder, e.g. openai/clip-vit-base-patch32 (MagicBrush uses ViT-B/32)"

    def load(self, path, device):
        import transformers

        path = self.require_weights(path)
        self.device = device
        self.model = _load(transformers.CLIPModel, path, self.name, device)
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
        except Exception as err:
            raise UserError(f"--weights clip={path}: no usable tokenizer files ({err.__class__.__name__}); "
                            "the folder needs the CLIP tokenizer (vocab.json, merges.txt)") from err
        self.processor = pp.clip(path, self.model.config.vision_config.image_size)

    def embed(self, images):
        pixels = pp.pixel_values(self.processor, images).to(self.device)
        return pooled(self.model.get_image_features(pixel_values=pixels))

    def embed_text(self, texts: list[str]) -> torch.Tensor:
        max_len = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        return pooled(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                   attention_mask=tokens["attention_mask"].to(self.device)))

    def compute(self, samples):
        out = super().compute(samples)
        inside = [i for i, s in enumerate(samples) if s.mask is not None and s.mask.any()]
        with torch.no_grad():
            texts = self.embed_text([s.text for s in samples])
            sims = cosine(self.embed([s.pred for s in samples]), texts)
            if inside:
                masked = self.embed([pp.zero_filled(samples[i].pred, ~samples[i].mask) for i in inside])
                for i, value in zip(inside, cosine(masked, texts[inside])):
                    out[i]["clip_t_in"] = value
        for row, value in zip(out, sims):
            row["clip_t"] = value
        return out


class DinoMetric(_ImagePairMetric):
    name = "dino"
    columns = ("dino",)
    column = "dino"
    hint = "an HF ViTModel folder of DINO ViT-S/16, e.g. facebook/dino-vits16"

    def load(self, path, device):
        import transformers

        path = self.require_weights(path)
        self.device = device
        self.model = _load(transformers.ViTModel, path, self.name, device)
        self.processor = pp.dino(self.model.config.image_size)

    def embed(self, images):
        pixels = pp.pixel_values(self.processor, images).to(self.device)
        return self.model(pixel_values=pixels).last_hidden_state[:, 0]


class Dinov3Metric(_ImagePairMetric):
    name = "dinov3"
    columns = ("dinov3",)
    column = "dinov3"
    hint = "an HF DINOv3ViTModel folder, e.g. facebook/dinov3-vits16-pretrain-lvd1689m"

    def load(self, path, device):
        import transformers

        path = self.require_weights(path)
        self.device = device
        self.model = _load(transformers.DINOv3ViTModel, path, self.name, device)
        self.processor = pp.dinov3(path, self.model.config.image_size)

    def embed(self, images):
        return self.model(pixel_values=pp.pixel_values(self.processor, images).to(self.device)).pooler_output


class Siglip2Metric(_ImagePairMetric):
    name = "siglip2"
    columns = ("siglip2",)
    column = "siglip2"
    hint = "an HF Siglip2Model folder, e.g. google/siglip2-base-patch16-naflex"

    def load(self, path, device):
        import transformers

        path = self.require_weights(path)
        self.device = device
        self.model = _load(transformers.Siglip2Model, path, self.name, device)
        vision = self.model.config.vision_config
        self.processor = pp.siglip2(vision.patch_size, vision.num_patches)

    def embed(self, images):
        inputs = pp.inputs(self.processor, images)
        return pooled(self.model.get_image_features(**{k: v.to(self.device) for k, v in inputs.items()}))
