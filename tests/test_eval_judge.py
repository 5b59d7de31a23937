"""The VLM judge: answers parsed into 0-10 scores (many hand-written answers), the built-in and custom
protocols, and the plumbing with the tiny Qwen2.5-VL of editkit's presets saved in both layouts the metric
loads (a Qwen2.5-VL folder; a Qwen-Image-Edit folder's text_encoder/tokenizer/processor). The tiny model's
answers are garbage, so the end-to-end tests check that scores are what the stored raw answers give."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from editkit.errors import UserError
from editkit.eval.metrics import FEATURE_METRICS
from editkit.eval.metrics.judge import JudgeMetric, chat_text, judge_view
from editkit.eval.metrics.judge_protocol import EDITSCORE, VIESCORE, load_protocol, overall, parse_scores, score
from editkit.eval.runner import evaluate
from editkit.eval.sample import Sample
from tests.cli_run import run_cli
from tests.eval_fixtures import make_dataset, make_predictions

SHORT = {"max_new_tokens": 6}  # the tiny judge's garbage answers, kept short


# ----- parsing --------------------------------------------------------------------------------------

@pytest.mark.parametrize("answer, scores", [
    ('{"score": [7, 8], "reasoning": "fine"}', [7, 8]),
    ('{\n"score" : [7],\n"reasoning" : "..."\n}', [7]),
    ('{"reasoning": "the hat is there", "score": [6, 9]}', [6, 9]),
    ('```json\n{"score": [5, 10], "reasoning": "ok"}\n```', [5, 10]),
    ('Here is my evaluation:\n{"score": [3, 4], "reasoning": "blurry"} Thanks.', [3, 4]),
    ('{"score": 7, "reasoning": "x"}', [7]),
    ('{"score": "8", "reasoning": "x"}', [8]),
    ('{"score": [7.5, 9], "reasoning": "x"}', [7.5, 9]),
    ('{"score": [6, 7], "reasoning": "it says "good" twice"}', [6, 7]),  # broken JSON, score still readable
    ("{'score': [4, 5], 'reasoning': 'single quotes'}", [4, 5]),
    ("[6, 0]", [6, 0]),
    ("The scores are [9, 8].", [9, 8]),
    ("7/10", [7]),
    ("Editing success: 8/10, overediting: 9/10", [8, 9]),
    ("12.5/25", [5]),  # rescaled from its denominator to the protocol's scale
    ("score: 7", [7]),
    ("score1 = 6, score2 = 9", [6, 9]),
    ("7", [7]),
    ("  7.  ", [7]),
    ("0", [0]),
    ("10", [10]),
])
def test_answers_give_their_scores(answer, scores):
    assert parse_scores(answer) == pytest.approx(scores)


@pytest.mark.parametrize("answer", [
    "", "I'm sorry, but I can't assist with that request.", "garbage \x00\x01 ¤¤", '{"reasoning": "no score"}',
    '{"score": [], "reasoning": "empty"}', '{"score": "high"}', "[]", "{not json at all",
    '{"score": [11, 8]}', '{"score": [-1, 5]}', "85", "15/10", '{"score": [true, 5]}',
])
def test_answers_without_a_usable_score_are_none_and_nan(answer):
    assert parse_scores(answer) is None
    assert math.isnan(score(answer))


def test_scores_are_the_minimum_on_zero_to_ten_and_overall_is_the_geometric_mean():
    assert score('{"score": [7, 4]}') == 4
    assert score('{"score": [20, 25]}', scale=25) == pytest.approx(8.0)
    assert math.isnan(score('{"score": [26]}', scale=25))
    assert score('{"score": [11]}', scale=25) == pytest.approx(4.4)  # in range on a 0-25 scale
    assert overall(4.0, 9.0) == pytest.approx(6.0)
    assert math.isnan(overall(math.nan, 9.0)) and math.isnan(overall(4.0, math.nan))
    assert overall(0.0, 9.0) == 0.0


# ----- protocols ------------------------------------------------------------------------------------

def test_builtin_protocols():
    assert load_protocol(None) is VIESCORE and load_protocol("editscore") is EDITSCORE
    sc = VIESCORE.sc_prompt("add a hat")
    assert "Editing instruction: add a hat" in sc and "<instruction>" not in sc
    assert "score1" in sc and "[naturalness, artifacts]" in VIESCORE.pq
    assert VIESCORE.scale == 10 and VIESCORE.view_area == 512 * 512
    assert "From scale 0 to 25" in EDITSCORE.sc and "0 to 10" not in EDITSCORE.pq and EDITSCORE.scale == 25
    assert EDITSCORE.sc.index('"reasoning"') < EDITSCORE.sc.index('"score"')  # EditScore asks reasoning first
    assert VIESCORE.identity() != EDITSCORE.identity()


def test_chat_text_is_qwen_chat_with_one_vision_block_per_image():
    vision = "<|vision_start|><|image_pad|><|vision_end|>"
    assert chat_text(VIESCORE, "PROMPT", 2) == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                                                f"<|im_start|>user\n{vision}{vision}PROMPT<|im_end|>\n"
                                                "<|im_start|>assistant\n")
    # EditScore's own template labels the images
    assert f"user\n<img1>: {vision}<img2>: {vision}P<|im_end|>" in chat_text(EDITSCORE, "P", 2)


def test_judge_view_keeps_the_aspect_at_gedits_area():
    assert judge_view(Image.new("RGB", (1024, 768)), 512 * 512).size == (591, 443)
    assert judge_view(Image.new("RGB", (512, 512)), 512 * 512).size == (512, 512)
    assert judge_view(Image.new("RGBA", (100, 30)), None).size == (100, 30)
    assert judge_view(Image.new("RGBA", (100, 30)), None).mode == "RGB"


def test_a_prompts_file_changes_the_protocol(tmp_path):
    path = tmp_path / "strict.yaml"
    path.write_text("sc: |\n  Judge the edit <instruction>. Answer {\"score\": [N]}.\nscale: 5\nmax_new_tokens: 64\n")
    protocol = load_protocol(path)
    assert protocol.name == "strict" and protocol.sc_prompt("add a hat").startswith("Judge the edit add a hat.")
    assert protocol.pq == VIESCORE.pq and protocol.scale == 5.0 and protocol.max_new_tokens == 64
    assert protocol.identity() != VIESCORE.identity()
    assert JudgeMetric.settings(protocol=str(path)) == protocol.identity()
    based = tmp_path / "es.json"
    based.write_text(json.dumps({"base": "editscore", "system": ""}))
    assert load_protocol(based).scale == 25 and "<|im_start|>system" not in chat_text(load_protocol(based), "p", 1)


@pytest.mark.parametrize("text, message", [
    ("sc: no placeholder\n", "must contain <instruction>"),
    ("prompt: x\n", "unknown key 'prompt'"),
    ("- a\n- b\n", "expected a mapping"),
    ("scale: 0\n", "scale must be a positive number"),
    ("max_new_tokens: many\n", "max_new_tokens must be a positive number"),
    ("base: gpt\n", "not a built-in protocol"),
    ("sc: [unclosed\n", "not a readable JSON/YAML file"),
])
def test_bad_prompts_files_are_one_line(tmp_path, text, message):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message) as err:
        load_protocol(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="neither a file nor a built-in"):
        load_protocol(tmp_path / "missing.yaml")


# ----- the tiny judge -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def judges(tmp_path_factory):
    """The tiny Qwen2.5-VL in a Qwen2.5-VL folder, and in the Qwen-Image-Edit folder editkit writes."""
    from editkit.models.families import get_family

    family = get_family("qwen-image-edit-2511")
    model = family.build_tiny(seed=0)
    root = tmp_path_factory.mktemp("judges")
    family.write_folder(model, root / "qwen-image-edit")
    vl = root / "qwen2.5-vl"
    model.text_encoder.save_pretrained(vl)
    model.tokenizer.save_pretrained(vl)
    model.processor.image_processor.save_pretrained(vl)
    return {"vl": vl, "edit": root / "qwen-image-edit"}


def _samples():
    a = Image.new("RGB", (40, 32), (200, 30, 30))
    b = Image.new("RGB", (40, 32), (30, 30, 200))
    return [Sample("1", pred=b, sources=[a], instruction="make it blue"),
            Sample("2", pred=a, sources=[b], instruction="make it red and much larger than before"),
            Sample("3", pred=a, instruction="no source")]


@pytest.mark.parametrize("layout", ["vl", "edit"])
def test_the_tiny_judge_scores_what_its_raw_answers_say(judges, layout):
    metric = JudgeMetric({**VIESCORE.identity(), **SHORT})
    metric.load(judges[layout], torch.device("cpu"))
    rows = metric.compute(_samples())
    assert len(rows) == 3
    for row in rows:
        assert set(row) == {"judge_sc", "judge_pq", "judge_overall", "judge_sc_answer", "judge_pq_answer"}
        assert isinstance(row["judge_pq_answer"], str) and len(row["judge_pq_answer"]) <= 6  # max_new_tokens
        for kind in ("sc", "pq"):
            expected = score(row[f"judge_{kind}_answer"]) if row[f"judge_{kind}_answer"] else math.nan
            assert row[f"judge_{kind}"] == pytest.approx(expected, nan_ok=True)
        assert row["judge_overall"] == pytest.approx(overall(row["judge_sc"], row["judge_pq"]), nan_ok=True)
    assert rows[2]["judge_sc_answer"] == "" and math.isnan(rows[2]["judge_sc"])  # no source: no SC question


def test_each_sample_asks_sc_with_source_and_prediction_and_pq_with_the_prediction(monkeypatch):
    asked = []

    def ask(self, questions):
        asked.extend(questions)
        return ['{"score": [9, 3]}' if "Editing instruction" in p else '{"score": [5, 6]}' for p, _ in questions]

    monkeypatch.setattr(JudgeMetric, "ask", ask)
    samples = _samples()
    rows = JudgeMetric().compute(samples)
    assert [(p == VIESCORE.pq, len(images)) for p, images in asked] == [(False, 2), (True, 1), (False, 2),
                                                                         (True, 1), (True, 1)]
    assert "Editing instruction: make it blue" in asked[0][0] and asked[0][1] == [samples[0].sources[0],
                                                                                    samples[0].pred]
    assert asked[1][1] == [samples[0].pred]
    assert [r["judge_sc"] for r in rows[:2]] == [3, 3] and math.isnan(rows[2]["judge_sc"])
    assert all(r["judge_pq"] == 5 for r in rows) and rows[0]["judge_overall"] == pytest.approx(math.sqrt(15))


def test_batched_answers_equal_one_at_a_time(judges):
    metric = JudgeMetric({**VIESCORE.identity(), **SHORT})
    metric.load(judges["vl"], torch.device("cpu"))
    samples = _samples()
    together = metric.compute(samples)
    alone = [metric.compute([s])[0] for s in samples]
    for a, b in zip(together, alone):
        assert (a["judge_sc_answer"], a["judge_pq_answer"]) == (b["judge_sc_answer"], b["judge_pq_answer"])


def test_missing_or_incomplete_judge_folders_are_one_line(judges, tmp_path, capsys):
    assert FEATURE_METRICS["judge"] is JudgeMetric
    assert JudgeMetric.unavailable_reason(None).startswith("judge: no weights; pass --weights judge=PATH")
    with pytest.raises(UserError, match="not found"):
        JudgeMetric().load(tmp_path / "nope", torch.device("cpu"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="missing .*config.json.*preprocessor_config.json") as err:
        JudgeMetric().load(tmp_path / "empty", torch.device("cpu"))
    assert "\n" not in str(err.value)
    manifest, records = make_dataset(tmp_path / "data", n=2, size=32)
    preds = make_predictions(tmp_path / "preds", records, noise=0.05)
    code, out, err = run_cli(capsys, "eval", "--pred", preds, "--data", manifest, "--out", tmp_path / "e",
                             "--metrics", "judge", "--weights", f"judge={tmp_path / 'nope'}")
    errors = [line for line in err.splitlines() if line.startswith("editkit: error:")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1
    assert "--weights judge=" in errors[0] and "not found" in errors[0]


# ----- through `editkit eval` -----------------------------------------------------------------------

@pytest.fixture
def dataset(tmp_path):
    manifest, records = make_dataset(tmp_path / "data", n=3, size=32)
    return manifest, records, make_predictions(tmp_path / "preds", records, noise=0.05)


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_keeps_raw_answers_and_nan_scores_and_resumes(dataset, judges, tmp_path, monkeypatch):
    manifest, records, preds = dataset
    out = tmp_path / "out"
    answers = {"good": '{"score": [8, 6], "reasoning": "ok"}', "bad": "I cannot tell."}
    calls = []

    def ask(self, questions):  # the judge's answers, by hand: SC readable, PQ garbage
        calls.append(len(questions))
        return [answers["good"] if "Editing instruction" in prompt else answers["bad"] for prompt, _ in questions]

    monkeypatch.setattr(JudgeMetric, "ask", ask)
    summary = evaluate([preds], records, out, ["judge"], weights={"judge": judges["vl"]}, show_progress=False)
    means = summary["runs"]["preds"]["means"]
    assert means["judge_sc"] == pytest.approx(6.0) and means["judge_pq"] is None and means["judge_overall"] is None
    lines = _jsonl(out / "per_sample_texts.jsonl")
    assert [line["id"] for line in lines] == [r.id for r in records]
    assert all(line["judge_sc_answer"] == answers["good"] and line["judge_pq_answer"] == answers["bad"]
               for line in lines)
    entry = json.loads(next((out / "cache" / "preds").glob("*.json")).read_text())
    assert entry["values"]["judge_pq"] is None and entry["texts"]["judge_pq_answer"] == answers["bad"]
    again = evaluate([preds], records, out, ["judge"], weights={"judge": judges["vl"]}, show_progress=False)
    assert again["computed"] == 0 and calls == [6]  # NaN is a result too: nothing asked again


def test_eval_with_the_tiny_judge_end_to_end(dataset, judges, tmp_path, capsys):
    manifest, records, preds = dataset
    prompts = tmp_path / "short.json"
    prompts.write_text(json.dumps(SHORT))
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "eval", "--pred", preds, "--data", manifest, "--out", out,
                                "--metrics", "judge", "--weights", f"judge={judges['edit']}", "--judge-prompts",
                                prompts, "--batch-size", 2)
    assert code == 0, err
    lines = _jsonl(out / "per_sample_texts.jsonl")
    assert len(lines) == 3 and all(isinstance(line["judge_sc_answer"], str) for line in lines)
    header = (out / "per_sample.csv").read_text().splitlines()[0].split(",")
    assert {"judge_sc", "judge_pq", "judge_overall"} <= set(header)
    fingerprint = json.loads((out / "fingerprint.json").read_text())
    assert fingerprint["inputs"]["metric_settings"]["judge"]["max_new_tokens"] == 6
    assert fingerprint["inputs"]["metric_settings"]["judge"]["sc"] == VIESCORE.sc


def test_other_judge_prompts_are_refused_until_overwrite(dataset, judges, tmp_path, capsys, monkeypatch):
    manifest, records, preds = dataset
    monkeypatch.setattr(JudgeMetric, "ask", lambda self, questions: ["7"] * len(questions))
    out = tmp_path / "out"
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("max_new_tokens: 8\n")
    second.write_text("max_new_tokens: 8\npq: Rate the image from 0 to 10.\n")
    base = ["eval", "--pred", preds, "--data", manifest, "--out", out, "--metrics", "judge",
            "--weights", f"judge={judges['vl']}"]
    assert run_cli(capsys, *base, "--judge-prompts", first)[0] == 0
    assert run_cli(capsys, *base, "--judge-prompts", first)[0] == 0  # same protocol: resumes
    code, _, err = run_cli(capsys, *base, "--judge-prompts", second)
    assert code == 2 and "differs in: metric_settings" in err and len(err.strip().splitlines()) == 1
    assert run_cli(capsys, *base)[0] == 2  # the default protocol is another protocol too
    assert run_cli(capsys, *base, "--judge-prompts", second, "--overwrite")[0] == 0
    settings = json.loads((out / "fingerprint.json").read_text())["inputs"]["metric_settings"]["judge"]
    assert settings["pq"] == "Rate the image from 0 to 10."
    code, _, err = run_cli(capsys, *base, "--judge-prompts", tmp_path / "none.yaml")
    assert code == 2 and "neither a file nor a built-in protocol" in err
