"""The VLM judge: a local Qwen2.5-VL scores each edit under a judge protocol (default: GEdit-Bench's VIEScore).

- `judge_sc`: semantic consistency (instruction following, 0-10): the judge sees the first source, the
  prediction and the record's instruction.
- `judge_pq`: perceptual quality (0-10): the judge sees the prediction alone.
- `judge_overall` = sqrt(judge_sc * judge_pq), as VIEScore computes it.

The prompts, the score scale and the image view are the protocol's (editkit.eval.metrics.judge_protocol,
`--judge-prompts`). Generation is greedy (`do_sample=False`, no repetition penalty; the checkpoint's
generation_config.json is not used), one `generate` call per batch for both questions of every sample,
prompts left-padded. The judge's raw answers come back beside the scores as the text columns
`judge_sc_answer` and `judge_pq_answer`, so an answer that gave no usable score (NaN) can be read.

Weights (`--weights judge=DIR`): a transformers Qwen2.5-VL folder (Qwen2_5_VLForConditionalGeneration
config + safetensors, tokenizer files and preprocessor_config.json in one folder), or the root of a
Qwen-Image-Edit diffusers folder, whose `text_encoder/`, `tokenizer/` and `processor/` are that model
(Qwen2.5-VL-7B-Instruct).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image

from editkit.errors import UserError
from editkit.eval.metrics.base import FeatureMetric
from editkit.eval.metrics.judge_protocol import JudgeProtocol, load_protocol, overall, score
from editkit.eval.sample import Sample

VISION_TOKENS = "<|vision_start|><|image_pad|><|vision_end|>"
ANSWER_COLUMNS = ("judge_sc_answer", "judge_pq_answer")
# What each layout must hold, for one line naming the missing files (editkit.models.loading.missing_files).
QWEN_VL_FILES = ("config.json", "*.safetensors*", "tokenizer_config.json", "tokenizer.json|vocab.json",
                 "preprocessor_config.json")
QWEN_IMAGE_EDIT_FILES = {"text_encoder": ("config.json", "*.safetensors*"),
                         "tokenizer": ("tokenizer_config.json", "tokenizer.json|vocab.json"),
                         "processor": ("preprocessor_config.json",)}


def judge_folders(path: Path) -> tuple[Path, Path, Path]:
    """(model, tokenizer, image processor) folders of a Qwen2.5-VL folder or a Qwen-Image-Edit root;
    a UserError names the files that are missing."""
    from editkit.models.loading import missing_files

    if (path / "text_encoder").is_dir():
        missing = missing_files(path, QWEN_IMAGE_EDIT_FILES)
        folders = (path / "text_encoder", path / "tokenizer", path / "processor")
    else:
        missing = missing_files(path.parent, {path.name: QWEN_VL_FILES})
        folders = (path, path, path)
    if missing:
        raise UserError(f"--weights judge={path}: missing {', '.join(missing)}; pass a Qwen2.5-VL folder "
                        "(model, tokenizer and preprocessor_config.json) or a Qwen-Image-Edit folder")
    return folders


def chat_text(protocol: JudgeProtocol, prompt: str, n_images: int) -> str:
    """The Qwen2.5-VL chat of one question: system, user (each image's vision tokens, then the prompt),
    and the opened assistant turn."""
    images = "".join(protocol.image_label.replace("{i}", str(i)) + VISION_TOKENS for i in range(1, n_images + 1))
    system = f"<|im_start|>system\n{protocol.system}<|im_end|>\n" if protocol.system else ""
    return f"{system}<|im_start|>user\n{images}{prompt}<|im_end|>\n<|im_start|>assistant\n"


def judge_view(image: Image.Image, area: int | None) -> Image.Image:
    """The image the judge sees: RGB, resized (bicubic) to about `area` pixels at its aspect ratio, with
    GEdit-Bench's rounding (width = int(sqrt(area * w / h)), height = int(width * h / w)); None: as it is."""
    image = image.convert("RGB")
    if area is None:
        return image
    ratio = image.width / image.height
    width = math.sqrt(area * ratio)
    size = (int(width), int(width / ratio))
    return image if size == image.size else image.resize(size, Image.BICUBIC)


def _protocol(spec) -> JudgeProtocol:
    if isinstance(spec, JudgeProtocol):
        return spec
    return JudgeProtocol(**spec) if isinstance(spec, dict) else load_protocol(spec)


class JudgeMetric(FeatureMetric):
    name = "judge"
    columns = ("judge_sc", "judge_pq", "judge_overall")
    text_columns = ANSWER_COLUMNS
    hint = ("a Qwen2.5-VL folder (e.g. Qwen/Qwen2.5-VL-7B-Instruct) or a Qwen-Image-Edit folder (its "
            "text_encoder/, tokenizer/, processor/)")

    def __init__(self, protocol: JudgeProtocol | dict | str | Path | None = None):
        """`protocol`: a JudgeProtocol, its `identity()` dict, a built-in name or a prompts file (None: viescore)."""
        self.protocol = _protocol(protocol)

    @classmethod
    def settings(cls, protocol=None) -> dict:
        """The protocol (prompts, scale, image view, decoding length) is part of the eval folder's fingerprint."""
        return _protocol(protocol).identity()

    def load(self, path, device):
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        path = self.require_weights(path)
        model_dir, tokenizer_dir, processor_dir = judge_folders(path)
        device = torch.device(device)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        placed = {"device_map": str(device)} if device.type == "cuda" else {}
        try:
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=dtype, local_files_only=True,
                                                                       **placed)
            tokenizer = Qwen2Tokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
            image_processor = Qwen2VLImageProcessorPil.from_pretrained(processor_dir, local_files_only=True)
        except Exception as err:  # transformers raises many types for a bad folder
            first = str(err).splitlines()[0] if str(err) else ""
            raise UserError(f"--weights judge={path}: cannot load the Qwen2.5-VL judge from it "
                            f"({err.__class__.__name__}: {first})") from err
        self.attach(model, tokenizer, image_processor, device)

    def attach(self, model, tokenizer, image_processor, device) -> None:
        """Judge with these parts (`load` reads them from a folder; benchmarks build them in code)."""
        from transformers import GenerationConfig

        from editkit.models.qwen_image_edit import _make_processor

        self.device = torch.device(device)
        tokenizer.padding_side = "left"  # batched generation continues every prompt at the same position
        self.model = model.eval().to(self.device)
        self.processor = _make_processor(image_processor, tokenizer)
        stop = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        # the protocol's decoding, whatever the checkpoint's generation_config.json says
        self.model.generation_config = GenerationConfig(
            do_sample=False, num_beams=1, max_new_tokens=self.protocol.max_new_tokens, repetition_penalty=1.0,
            eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)

    def ask(self, questions: list[tuple[str, list[Image.Image]]]) -> list[str]:
        """The judge's answers to (prompt, images) questions, in one batched greedy generation."""
        texts = [chat_text(self.protocol, prompt, len(images)) for prompt, images in questions]
        images = [judge_view(img, self.protocol.view_area) for _, imgs in questions for img in imgs]
        inputs = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt").to(self.device)
        with torch.no_grad():
            out = self.model.generate(**inputs)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [a.strip() for a in self.processor.batch_decode(new, skip_special_tokens=True,
                                                               clean_up_tokenization_spaces=False)]

    def compute(self, samples: list[Sample]) -> list[dict]:
        protocol = self.protocol
        questions, slots = [], []
        for i, s in enumerate(samples):
            if s.sources:  # SC needs the image that was edited
                questions.append((protocol.sc_prompt(s.instruction), [s.sources[0], s.pred]))
                slots.append((i, "sc"))
            questions.append((protocol.pq, [s.pred]))
            slots.append((i, "pq"))
        answers = {"sc": [""] * len(samples), "pq": [""] * len(samples)}
        for (i, kind), answer in zip(slots, self.ask(questions)):
            answers[kind][i] = answer
        rows = []
        for sc_answer, pq_answer in zip(answers["sc"], answers["pq"]):
            sc = score(sc_answer, protocol.scale)  # no SC question: "", NaN
            pq = score(pq_answer, protocol.scale)
            rows.append({"judge_sc": sc, "judge_pq": pq, "judge_overall": overall(sc, pq),
                         "judge_sc_answer": sc_answer, "judge_pq_answer": pq_answer})
        return rows
