import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from editkit.data import read_manifest, write_manifest
from editkit.data.build import build_dataset, records_from_folders
from editkit.data.records import EditRecord
from editkit.data.tools import parse_weights, select_top, split_records
from editkit.data.validate import validate_manifest
from editkit.errors import UserError


def _cli(*args):
    code = "import sys; from editkit.cli import main; main(sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)


@pytest.fixture
def bad_manifest(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    Image.new("L", (8, 8)).save(tmp_path / "m.png")
    (tmp_path / "broken.png").write_bytes(b"xx")
    (tmp_path / "m.jsonl").write_text("\n".join([
        '{"instruction": "ok", "source_image": "a.png", "target_image": "a.png"}',
        '{"instruction": "  ", "source_image": "missing.png", "target_image": "a.png", "mask": "m.png"}',
        '{"instruction": "x", "source_image": ["a.png", "broken.png"], "target_image": "a.png"}',
        '{"instruction": "x", "source_image": "a.png", "target_image": "http://x/y.png"}',
        'not json',
    ]) + "\n")
    return tmp_path / "m.jsonl"


def test_validate_finds_every_problem(bad_manifest):
    report = validate_manifest(bad_manifest, progress=False)
    assert report.records == 5
    assert report.counts() == {"empty-instruction": 1, "missing-file": 1, "mask-size": 1, "undecodable": 1,
                               "url": 1, "bad-json": 1}
    lines = [p.line() for p in report.problems]
    assert lines[0].startswith(f"{bad_manifest}:2: field 'instruction'")
    assert any(line.startswith(f"{bad_manifest}:3: field 'source_image[1]'") for line in lines)
    assert any(line.startswith(f"{bad_manifest}:2: field 'mask': mask is 8x8 but the target is 16x16")
               for line in lines)


def test_cli_validate_exit_2_and_one_line_per_problem(bad_manifest):
    proc = _cli("data", "validate", bad_manifest, "--workers", "1")
    assert proc.returncode == 2
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 8 and lines[-1].endswith(
        "6 problems (bad-json: 1, empty-instruction: 1, mask-size: 1, "
        "missing-file: 1, undecodable: 1, url: 1); 1 warning (empty-mask: 1)")
    assert f"{bad_manifest}:2: field 'mask': warning: is all black" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_cli_convert_bad_manifest_is_one_line_exit_2(bad_manifest, tmp_path):
    proc = _cli("data", "convert", bad_manifest, tmp_path / "out.csv")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"editkit: error: {bad_manifest}:4: field 'target_image': is a URL")
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out.csv").exists()


def test_cli_in_process_validate_ok(tmp_path):
    from typer.testing import CliRunner

    from editkit.cli import app

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    write_manifest([EditRecord("r", "do it", [tmp_path / "a.png"], tmp_path / "a.png")],
                   tmp_path / "m.csv", "diffsynth")
    result = CliRunner().invoke(app, ["data", "validate", str(tmp_path / "m.csv"), "--workers", "1"])
    assert result.exit_code == 0 and "1 records, no problems" in result.output
    result = CliRunner().invoke(app, ["data", "validate", str(tmp_path / "nope.csv")])
    assert result.exit_code != 0 and isinstance(result.exception, UserError)


_fuzz = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_cells = st.none() | st.text(max_size=6) | st.sampled_from(["a.png", "m.png", "broken.png", "http://x", "", "a.png "]) \
    | st.lists(st.sampled_from(["a.png", "broken.png", "", "z.png"]), max_size=3) | st.integers()


@_fuzz
@given(rows=st.lists(st.fixed_dictionaries({}, optional={
    "instruction": _cells, "source_image": _cells, "target_image": _cells, "mask": _cells, "id": _cells,
    "ref_gt": _cells}), max_size=5))
def test_fuzz_validate_never_crashes(bad_manifest, rows):
    path = bad_manifest.parent / "fuzz.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    try:
        report = validate_manifest(path, progress=False)
    except UserError as err:
        assert "\n" not in str(err)
        return
    assert all(p.line().startswith(str(path)) and "\n" not in p.line() for p in report.problems)


def test_split_is_deterministic_and_complete():
    records = [EditRecord(str(i), "x") for i in range(101)]
    a = split_records(records, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=1)
    b = split_records(records, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=1)
    c = split_records(records, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=2)
    assert a == b and a != c
    assert [len(v) for v in a.values()] == [81, 10, 10]
    assert sorted(r.id for v in a.values() for r in v) == sorted(r.id for r in records)
    with pytest.raises(UserError):
        parse_weights("train=0.9,val")
    with pytest.raises(UserError):
        parse_weights("a=-1")


def test_select_top_by_metadata_score():
    records = [EditRecord(str(i), "x", metadata={"s": {"v": i % 7}}) for i in range(20)]
    top = select_top(records, 3, "s.v")
    assert [r.metadata["s"]["v"] for r in top] == [6, 6, 5] and [r.id for r in top[:2]] == ["13", "6"]
    assert [r.metadata["s"]["v"] for r in select_top(records, 2, "s.v", ascending=True)] == [0, 0]
    with pytest.raises(UserError, match="no field 'q'"):
        select_top(records, 3, "q")
    records.append(EditRecord("x", "x"))
    assert len(select_top(records, 100, "s.v", skip_missing=True)) == 20


def test_build_from_folders_normalises_and_resumes(tmp_path):
    for sub in ("src", "tgt", "msk"):
        (tmp_path / sub).mkdir()
    img = Image.new("RGB", (60, 40), "blue")
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "src" / "p1.jpg", exif=exif)
    Image.new("RGBA", (40, 60), (255, 0, 0, 255)).save(tmp_path / "tgt" / "p1.png")
    Image.fromarray(np.full((30, 20), 200, np.uint8)).save(tmp_path / "msk" / "p1.png")
    Image.new("RGB", (40, 60)).save(tmp_path / "src" / "p2.png")
    (tmp_path / "prompts.txt").write_text("p1\tmake it red\np2\tmake it green\n")
    records = records_from_folders(tmp_path / "src", tmp_path / "tgt", tmp_path / "msk",
                                   prompts=tmp_path / "prompts.txt")
    out = tmp_path / "out"
    manifest = build_dataset(records, out, area=32 * 48, multiple=16, workers=1, progress=False)
    built = {r.id: r for r in read_manifest(manifest)}
    p1 = built["p1"]
    assert Image.open(p1.sources[0]).size == (32, 48)  # EXIF rotation applied, then resized
    assert Image.open(p1.target).mode == "RGB" and Image.open(p1.target).size == (32, 48)
    mask = np.asarray(Image.open(p1.mask))
    assert mask.shape == (48, 32) and set(np.unique(mask)) == {255}
    assert built["p2"].target is None
    stamp = p1.target.stat().st_mtime_ns
    build_dataset(records, out, area=32 * 48, multiple=16, workers=1, progress=False)
    assert p1.target.stat().st_mtime_ns == stamp  # resumed: finished records are kept
    with pytest.raises(UserError):
        records_from_folders(tmp_path / "nope", prompts=tmp_path / "prompts.txt")


@pytest.mark.parametrize("args", [
    ["data", "build", "{m}", "--out", "{d}/b", "--multiple", "7"],
    ["data", "build", "--out", "{d}/b"],
    ["data", "split", "{m}", "--out", "{d}/s", "--to", "folder"],
    ["data", "split", "{m}", "--out", "{d}/s", "--fractions", "a"],
    ["data", "select", "{m}", "--out", "{d}/s.jsonl", "--top", "3", "--by", "missing"],
    ["data", "synth", "{d}/keep", "--n", "3"],
    ["data", "synth", "--out", "{d}/keep", "--n", "3"],
    ["data", "convert", "{m}", "{d}/c.xml"],
    ["data", "validate", "{m}", "--field", "zzz=1"],
    ["data", "mix", "{d}", "--weights", "nope=1"],
])
def test_cli_bad_invocations_exit_2_with_one_line(tmp_path, capsys, args):
    from editkit.cli import main

    m = tmp_path / "m.jsonl"
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    write_manifest([EditRecord("r", "x", [tmp_path / "a.png"], tmp_path / "a.png", metadata={"s": 1})], m, "pairs")
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "precious.txt").write_text("x")
    (tmp_path / "ds").mkdir()
    write_manifest([EditRecord("r", "x")], tmp_path / "ds" / "train.jsonl", "pairs")
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(m=m, d=tmp_path) for a in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    assert (tmp_path / "keep" / "precious.txt").read_text() == "x"
