"""The VLM judge's protocol (prompts, score scale, image view) and the parsing of its answers.

Torch-free, so that the CLI can read and check a `--judge-prompts` file before anything loads.

Built-in protocols:
- `viescore`: GEdit-Bench's VIEScore, task "tie" (text-guided image editing): the semantic-consistency
  (SC) prompt sees the source and the edited image and asks for [editing success, overediting], the
  perceptual-quality (PQ) prompt sees the edited image and asks for [naturalness, artifacts], each
  0-10; SC and PQ are the minimum of their list, overall = sqrt(SC * PQ). Images are resized to the
  area of 512x512 keeping their aspect ratio, as GEdit-Bench's evaluation does.
- `editscore`: EditScore's prompts (the `editscore` package, VectorSpaceLab/EditScore): the same
  rules asked on a 0-25 scale with the reasoning first, each image labelled `<imgN>:`, images at
  their own size; scores divided by 2.5, then as VIEScore.

Answers are parsed by `parse_scores` (see there); an answer that gives no score is NaN, never a
guess (VIEScore's code retries and then draws a random score; greedy decoding answers the same
again, so editkit keeps the NaN and the raw answer).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from editkit.errors import UserError

INSTRUCTION = "<instruction>"

# The VIEScore prompt texts, verbatim (a protocol prompt must match to be comparable), from
# TIGER-AI-Lab/VIEScore viescore/vie_prompts.py (MIT licence), as GEdit-Bench (stepfun-ai/Step1X-Edit,
# GEdit-Bench/viescore) and EditScore (VectorSpaceLab/EditScore editscore/vie_prompts.py) use them.
_CONTEXT = """You are a professional digital artist. You will have to evaluate the effectiveness of the AI-generated image(s) based on given rules.
All the input images are AI-generated. All human in the images are AI-generated too. so you need not worry about the privacy confidentials.

You will have to give your output in this way (Keep your reasoning concise and short.):
{
"score" : [...],
"reasoning" : "..."
}"""  # noqa: E501

_CONTEXT_REASONING_FIRST = """You are a professional digital artist. You will have to evaluate the effectiveness of the AI-generated image(s) based on given rules.
All the input images are AI-generated. All human in the images are AI-generated too. so you need not worry about the privacy confidentials.

IMPORTANT: You will have to give your output in this way (Keep your reasoning concise and short.):
{
"reasoning" : "...",
"score" : [...]
}
"""  # noqa: E501

_TWO_IMAGE_EDIT_RULE = """RULES:

Two images will be provided: The first being the original AI-generated image and the second being an edited version of the first.
The objective is to evaluate how successfully the editing instruction has been executed in the second image.

Note that sometimes the two images might look identical due to the failure of image edit.
"""  # noqa: E501

_TIE_RULE_SC = """
From scale 0 to 10: 
A score from 0 to 10 will be given based on the success of the editing. (0 indicates that the scene in the edited image does not follow the editing instruction at all. 10 indicates that the scene in the edited image follow the editing instruction text perfectly.)
A second score from 0 to 10 will rate the degree of overediting in the second image. (0 indicates that the scene in the edited image is completely different from the original. 10 indicates that the edited image can be recognized as a minimal edited yet effective version of original.)
Put the score in a list such that output score = [score1, score2], where 'score1' evaluates the editing success and 'score2' evaluates the degree of overediting.

Editing instruction: <instruction>
"""  # noqa: E501, W291

_RULE_PQ = """RULES:

The image is an AI-generated image.
The objective is to evaluate how successfully the image has been generated.

From scale 0 to 10: 
A score from 0 to 10 will be given based on image naturalness. 
(
    0 indicates that the scene in the image does not look natural at all or give a unnatural feeling such as wrong sense of distance, or wrong shadow, or wrong lighting. 
    10 indicates that the image looks natural.
)
A second score from 0 to 10 will rate the image artifacts. 
(
    0 indicates that the image contains a large portion of distortion, or watermark, or scratches, or blurred faces, or unusual body parts, or subjects not harmonized. 
    10 indicates the image has no artifacts.
)
Put the score in a list such that output score = [naturalness, artifacts]
"""  # noqa: E501, W291


@dataclass(frozen=True)
class JudgeProtocol:
    """How the judge is asked and how its answers become 0-10 scores."""

    sc: str
    """Semantic-consistency prompt (source image, edited image); `<instruction>` is replaced by the instruction."""
    pq: str
    """Perceptual-quality prompt (edited image)."""
    scale: float = 10.0
    """The answers' range is [0, scale]; scores are reported as score * 10 / scale."""
    system: str = "You are a helpful assistant."
    """The chat's system message (Qwen2.5-VL's default)."""
    image_label: str = ""
    """Text before each image's vision tokens; `{i}` is the image's number from 1."""
    view_area: int | None = 512 * 512
    """Images are resized to about this many pixels, keeping their aspect ratio (None: as they are)."""
    max_new_tokens: int = 512
    name: str = ""
    """What to call it (a built-in's name, a file's stem); not part of the identity."""

    def sc_prompt(self, instruction: str) -> str:
        return self.sc.replace(INSTRUCTION, instruction)

    def identity(self) -> dict:
        """Everything that changes the scores (the eval folder's fingerprint holds it): all but the name."""
        return {k: v for k, v in asdict(self).items() if k != "name"}


VIESCORE = JudgeProtocol(
    name="viescore",
    sc="\n".join([_CONTEXT, _TWO_IMAGE_EDIT_RULE, _TIE_RULE_SC]),
    pq="\n".join([_CONTEXT, _RULE_PQ]),
)
# EditScore (Apache-2.0; editscore/__init__.py) puts its score range into the rules with str.replace("10", "25").
EDITSCORE = JudgeProtocol(
    name="editscore",
    sc="\n".join([_CONTEXT_REASONING_FIRST, _TWO_IMAGE_EDIT_RULE, _TIE_RULE_SC.replace("10", "25")]),
    pq="\n".join([_CONTEXT_REASONING_FIRST, _RULE_PQ.replace("10", "25")]),
    scale=25.0,
    image_label="<img{i}>: ",
    view_area=None,
)
BUILTIN = {p.name: p for p in (VIESCORE, EDITSCORE)}
FILE_KEYS = ("base", "name", "sc", "pq", "scale", "system", "image_label", "view_area", "max_new_tokens")


def load_protocol(spec: str | Path | None) -> JudgeProtocol:
    """A built-in protocol by name (None: `viescore`), or a JSON / YAML file of prompt templates.

    The file is a mapping of any of: `base` (a built-in protocol whose settings the file changes;
    default viescore), `name`, `sc` (must contain `<instruction>`), `pq`, `scale`, `system`,
    `image_label`, `view_area` (null: images as they are), `max_new_tokens`.
    """
    if spec is None:
        return VIESCORE
    if str(spec) in BUILTIN:
        return BUILTIN[str(spec)]
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"--judge-prompts {spec}: neither a file nor a built-in protocol; use "
                        f"{' or '.join(BUILTIN)}, or a JSON/YAML file with sc and pq prompt templates")
    data = _read_mapping(path)
    unknown = [key for key in data if key not in FILE_KEYS]
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r}; the keys are {', '.join(FILE_KEYS)}")
    base = data.pop("base", "viescore")
    if base not in BUILTIN:
        raise UserError(f"{path}: base {base!r} is not a built-in protocol; use {' or '.join(BUILTIN)}")
    settings = {"name": path.stem, **data}
    for key in ("name", "sc", "pq", "system", "image_label"):
        if key in settings and not isinstance(settings[key], str):
            raise UserError(f"{path}: {key} must be a string")
    for key, low in (("scale", 0), ("view_area", 0), ("max_new_tokens", 0)):
        value = settings.get(key)
        if key in settings and not (value is None and key == "view_area") and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not value > low):
            raise UserError(f"{path}: {key} must be a positive number, not {value!r}")
    if INSTRUCTION not in settings.get("sc", BUILTIN[base].sc):
        raise UserError(f"{path}: the sc prompt must contain {INSTRUCTION} (where the edit instruction goes)")
    for key in ("view_area", "max_new_tokens"):
        if settings.get(key) is not None and key in settings:
            settings[key] = int(settings[key])
    if "scale" in settings:
        settings["scale"] = float(settings["scale"])
    return replace(BUILTIN[base], **settings)


def _read_mapping(path: Path) -> dict:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as err:
        first = str(err).splitlines()[0] if str(err) else err.__class__.__name__
        raise UserError(f"{path}: not a readable JSON/YAML file ({first})") from err
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of prompt settings (sc, pq, ...), got {type(data).__name__}")
    return data


# ----- answers -----------------------------------------------------------------------------------

_NUMBER = r"-?\d+(?:\.\d+)?"
_SCORE_KEY = re.compile(r"""["']?score["']?\s*[:=]\s*(\[[^\]]*\]|"?""" + _NUMBER + ")", re.IGNORECASE)
_LIST = re.compile(r"\[\s*(" + _NUMBER + r"(?:\s*,\s*" + _NUMBER + r")*)\s*\]")
_FRACTION = re.compile(r"(" + _NUMBER + r")\s*/\s*(\d+(?:\.\d+)?)")
_NAMED = re.compile(r"\bscore\s*\d*\s*[:=]\s*(" + _NUMBER + ")", re.IGNORECASE)


def parse_scores(answer: str, scale: float = 10.0) -> list[float] | None:
    """The scores an answer gives, on the judge's scale [0, scale], or None when it gives none.

    Tried in order, the first that yields numbers wins:
    1. the JSON object from the first `{` to the last `}` (code fences and text around it allowed),
       its `score` a list of numbers, a number or a numeric string;
    2. a `"score": [...]` or `"score": N` inside malformed JSON (e.g. unescaped quotes in the reasoning);
    3. a list of numbers `[7, 8]` anywhere;
    4. fractions `7/10` (rescaled from their denominator to `scale`);
    5. `score: 7`, `score1 = 7, score2 = 8`;
    6. the answer being one bare number (`7`, `7.`).
    Any score outside [0, scale] makes the answer unusable (None): clipping would hide that the judge
    answered on another scale.
    """
    text = answer.strip()
    scores = (_from_json(text) or _from_score_key(text) or _from_list(text) or _from_fraction(text, scale)
              or _from_named(text) or _bare(text))
    if not scores or any(not math.isfinite(s) or s < 0 or s > scale for s in scores):
        return None
    return scores


def score(answer: str, scale: float = 10.0) -> float:
    """VIEScore's reduction: the minimum of the answer's scores, on 0-10 (NaN when it gives none)."""
    scores = parse_scores(answer, scale)
    return math.nan if scores is None else min(scores) * 10.0 / scale


def overall(sc: float, pq: float) -> float:
    """sqrt(SC * PQ) (VIEScore's overall); NaN when either is NaN."""
    return math.sqrt(sc * pq) if math.isfinite(sc) and math.isfinite(pq) else math.nan


def _numbers(value) -> list[float] | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, str) and re.fullmatch(r"\s*" + _NUMBER + r"\s*", value):
        return [float(value)]
    if isinstance(value, list) and value:
        out = [_numbers(v) for v in value]
        return [v[0] for v in out] if all(v is not None and len(v) == 1 for v in out) else None
    return None


def _from_json(text: str) -> list[float] | None:
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        return None
    try:
        data = json.loads(text[start:end + 1])
    except ValueError:
        return None
    return _numbers(data.get("score")) if isinstance(data, dict) else None


def _from_score_key(text: str) -> list[float] | None:
    match = _SCORE_KEY.search(text)
    if not match:
        return None
    value = match.group(1).strip('"')
    if value.startswith("["):
        return _from_list(value)
    return [float(value)]


def _from_list(text: str) -> list[float] | None:
    match = _LIST.search(text)
    return [float(v) for v in match.group(1).split(",")] if match else None


def _from_fraction(text: str, scale: float) -> list[float] | None:
    found = [(float(n), float(d)) for n, d in _FRACTION.findall(text)]
    if not found or any(d <= 0 for _, d in found):
        return None
    return [n / d * scale for n, d in found]


def _from_named(text: str) -> list[float] | None:
    found = _NAMED.findall(text)
    return [float(v) for v in found] if found else None


def _bare(text: str) -> list[float] | None:
    match = re.fullmatch(r"(" + _NUMBER + r")\.?", text)
    return [float(match.group(1))] if match else None
