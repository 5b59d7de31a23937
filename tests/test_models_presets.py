"""editkit.models.presets: one table of Qwen-Image-Edit sizes, built with seeded random weights."""

import hashlib

import pytest
import torch

from editkit.errors import UserError
from editkit.models.families import get_family
from editkit.models.presets import PRESETS, build_components, build_transformer, get_preset

FAMILY = "qwen-image-edit-2511"

TINY_SEED_0 = {"transformer": "a7600b2a9b707b41", "vae": "5310860724dbc2d3", "text_encoder": "12fedfe75cdeef61"}
"""sha256 (first 16 hex digits) of each network's state dict, from the tiny builders as they were
before the presets table (the hard-coded widths of the former editkit/models/tiny.py); same for all three families."""


def _digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        for part in (name, str(tensor.dtype), str(tuple(tensor.shape))):
            h.update(part.encode())
        h.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("family", ["qwen-image-edit", FAMILY])
def test_tiny_weights_are_bit_identical_to_the_tiny_builders_before_the_table(family):
    model = get_family(family).build_tiny(seed=0)
    assert {name: _digest(module) for name, module in model.modules().items()} == TINY_SEED_0
    assert model.vlm_image_area == model.vae_image_area == model.output_area == 64 * 64
    assert len(model.tokenizer) == 264 and model.latent_channels == 4


def test_full_preset_has_the_released_2511_sizes():
    parts = build_components("full", FAMILY, device="meta")  # no memory: sizes and configs only
    counts = {name: sum(p.numel() for p in getattr(parts, name).parameters())
              for name in ("transformer", "vae", "text_encoder")}
    assert counts == {"transformer": 20_430_401_088, "vae": 126_892_531, "text_encoder": 8_292_166_656}
    assert parts.transformer.config.zero_cond_t  # the family's flag, not the preset's
    assert parts.text_encoder.config.text_config.vocab_size == 152064
    assert not build_transformer("full", "qwen-image-edit-2509", device="meta").config.zero_cond_t
    model = get_family(FAMILY).build_preset("full", device="meta")
    assert (model.vlm_image_area, model.vae_image_area) == (384 * 384, 1024 * 1024)  # the family's views


def test_building_on_a_dtype_leaves_the_defaults_and_the_rng_alone():
    rng, default = torch.random.get_rng_state(), torch.get_default_dtype()
    parts = build_components("tiny", FAMILY, seed=3, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for name in ("transformer", "vae", "text_encoder") for p in getattr(parts, name).parameters()} \
        == {torch.bfloat16}
    assert torch.get_default_dtype() == default and torch.equal(torch.random.get_rng_state(), rng)
    again = build_transformer("tiny", FAMILY, seed=3)
    assert _digest(again) == _digest(build_transformer("tiny", FAMILY, seed=3)) != _digest(
        build_transformer("tiny", FAMILY, seed=4))
    model = get_family(FAMILY).build_preset("tiny", seed=3, areas={"vae_image_area": 32 * 32})
    assert (model.vlm_image_area, model.vae_image_area) == (64 * 64, 32 * 32)


def test_unknown_presets_are_user_errors():
    assert set(PRESETS) == {"tiny", "full"}
    with pytest.raises(UserError, match="unknown model preset 'huge'; use one of tiny, full"):
        get_preset("huge")
    with pytest.raises(UserError, match="unknown model preset"):
        get_family(FAMILY).build_preset("huge")
