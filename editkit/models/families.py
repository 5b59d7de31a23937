"""The registry of model families: what differs between Qwen-Image-Edit releases.

A family states how the VLM prompt is built (system prompt, where image tokens go), the image
sizes the VLM and the VAE see, the scheduler settings and the transformer flags. Everything
else (the facade, the sampler) reads these facts instead of branching on release names.
Sizes are pixel areas, as in the diffusers pipelines (`CONDITION_IMAGE_SIZE = 384 * 384`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from editkit.errors import UserError

SYSTEM_PROMPT = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n"
)
"""Everything before the user's turn; its tokens are dropped from the prompt embeddings."""

PROMPT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
IMAGE_TOKENS = "<|vision_start|><|image_pad|><|vision_end|>"

QWEN_IMAGE_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "invert_sigmas": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "stochastic_sampling": False,
}
"""`FlowMatchEulerDiscreteScheduler` config of the released Qwen-Image(-Edit) snapshots."""


@dataclass(frozen=True)
class Family:
    """Facts about one model family (one diffusers pipeline class and its checkpoints)."""

    name: str
    pipeline_class: str
    description: str
    image_prompt: str
    """Per-image text placed before the instruction; `{}` is the 1-based image number."""
    max_images: int | None
    """How many source images the prompt template takes (None: any number)."""
    size_reference: str
    """Which source image sets the default output size: "first" or "last" (as the pipelines do)."""
    vlm_image_area: int = 384 * 384
    vae_image_area: int = 1024 * 1024
    output_area: int = 1024 * 1024
    scheduler: dict = field(default_factory=lambda: dict(QWEN_IMAGE_SCHEDULER))
    transformer_flags: dict = field(default_factory=dict)
    system_prompt: str = SYSTEM_PROMPT
    prompt_suffix: str = PROMPT_SUFFIX

    def prompt(self, instruction: str, num_images: int) -> str:
        """The full VLM text for one instruction with `num_images` source images."""
        if self.max_images is not None and num_images > self.max_images:
            raise UserError(
                f"family {self.name} takes at most {self.max_images} source image(s), got {num_images}; "
                "pass fewer images or use an Edit-Plus family (qwen-image-edit-2509/2511)"
            )
        images = "".join(self.image_prompt.format(i + 1) for i in range(num_images))
        return f"{self.system_prompt}{images}{instruction}{self.prompt_suffix}"


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            name="qwen-image-edit",
            pipeline_class="QwenImageEditPipeline",
            description="Qwen-Image-Edit (first release): one source image, seen by the VLM at the VAE's size",
            image_prompt=IMAGE_TOKENS,
            max_images=1,
            size_reference="first",
            vlm_image_area=1024 * 1024,
        ),
        Family(
            name="qwen-image-edit-2509",
            pipeline_class="QwenImageEditPlusPipeline",
            description="Qwen-Image-Edit-2509 (Edit-Plus): several source images, 'Picture i:' template",
            image_prompt=f"Picture {{}}: {IMAGE_TOKENS}",
            max_images=None,
            size_reference="last",
        ),
        Family(
            name="qwen-image-edit-2511",
            pipeline_class="QwenImageEditPlusPipeline",
            description="Qwen-Image-Edit-2511: Edit-Plus with condition tokens modulated at t=0 (zero_cond_t)",
            image_prompt=f"Picture {{}}: {IMAGE_TOKENS}",
            max_images=None,
            size_reference="last",
            transformer_flags={"zero_cond_t": True},
        ),
    )
}

DEFAULT_FAMILY = "qwen-image-edit-2511"


def get_family(name: str) -> Family:
    """The family called `name`; a UserError lists the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise UserError(f"unknown model family {name!r}; known families: {', '.join(FAMILIES)}") from None


def detect_family(model_index: dict, transformer_config: dict) -> str | None:
    """Infer the family from a diffusers folder's model_index.json and transformer config.

    editkit-written folders name it (`_editkit_family`); released snapshots are told apart by
    pipeline class, and 2509 from 2511 by the transformer's `zero_cond_t` flag.
    """
    if model_index.get("_editkit_family") in FAMILIES:
        return model_index["_editkit_family"]
    pipeline = model_index.get("_class_name")
    if pipeline == "QwenImageEditPipeline":
        return "qwen-image-edit"
    if pipeline == "QwenImageEditPlusPipeline" or transformer_config.get("zero_cond_t"):
        return "qwen-image-edit-2511" if transformer_config.get("zero_cond_t") else "qwen-image-edit-2509"
    return None
