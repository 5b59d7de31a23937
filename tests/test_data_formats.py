import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from editkit.data import parse_field_overrides, read_manifest, write_manifest
from editkit.data.records import EditRecord
from editkit.errors import UserError


@pytest.fixture
def images(tmp_path):
    for name in ("a", "b", "c", "m"):
        Image.new("RGB", (8, 8), "red").save(tmp_path / f"{name}.png")
    return tmp_path


def _records(root: Path) -> list[EditRecord]:
    return [
        EditRecord(id="r1", instruction="make the red circle blue", sources=[root / "a.png"], target=root / "b.png",
                   mask=root / "m.png", instruction_cn="把红色圆形变成蓝色",
                   inverse_instruction="make the blue circle red", task="recolor",
                   metadata={"score": 0.9, "shape": "circle", "prompt": "clash", "flag": True,
                             "n": "12", "empty": "", "none": None, "nested": {"a": [1, 2]}}),
        EditRecord(id="r2", instruction="combine", sources=[root / "a.png", root / "c.png"], target=root / "b.png",
                   ref_gt=root / "c.png"),
        EditRecord(id="r3", instruction="a text-to-image prompt, with comma", target=root / "c.png"),
        EditRecord(id="r4", instruction="inference only", sources=[root / "a.png"]),
    ]


@pytest.mark.parametrize("fmt", ["pairs", "diffsynth"])
@pytest.mark.parametrize("ext", [".json", ".jsonl", ".csv"])
def test_round_trip_tables(images, fmt, ext):
    records = _records(images)
    path = images / "sub" / f"m{ext}"
    write_manifest(records, path, fmt)
    assert read_manifest(path) == records
    assert read_manifest(path, format=fmt) == records
    if fmt == "pairs" and ext == ".jsonl":
        first = json.loads(path.read_text().splitlines()[0])
        assert first["source_image"] == str(images / "a.png")  # outside the manifest folder: absolute


def test_round_trip_across_all_formats(images):
    records = _records(images)
    chain = [("pairs", "a.jsonl"), ("diffsynth", "b.csv"), ("folder", "c"), ("diffsynth", "d.json"), ("pairs", "e.csv")]
    current = records
    for fmt, name in chain:
        write_manifest(current, images / name, fmt)
        current = read_manifest(images / name)
    def strip(rs):
        return [(r.id, r.instruction, r.instruction_cn, r.inverse_instruction, r.task, r.metadata,
                 len(r.sources), r.target is None, r.mask is None, r.ref_gt is None) for r in rs]

    assert strip(current) == strip(records)
    for a, b in zip(current, records):
        for pa, pb in zip([*a.sources, a.target, a.mask], [*b.sources, b.target, b.mask]):
            assert (pa is None) == (pb is None)
            if pa is not None:
                assert pa.read_bytes() == pb.read_bytes()


def test_paths_written_relative_inside_folder(images):
    write_manifest(_records(images), images / "m.jsonl", "pairs")
    row = json.loads((images / "m.jsonl").read_text().splitlines()[0])
    assert row["source_image"] == "a.png" and row["target_image"] == "b.png"


def test_diffsynth_json_and_field_overrides(images):
    (images / "m.json").write_text(json.dumps([
        {"caption": "make it blue", "image": "b.png", "edit_image": ["a.png", "c.png"], "aesthetic": 5.5},
        {"caption": "again", "image": "b.png", "edit_image": "a.png", "back_mask": "m.png"},
    ]))
    with pytest.raises(UserError, match=r"m.json\[0\]: field 'prompt': is missing.*--field"):
        read_manifest(images / "m.json")
    records = read_manifest(images / "m.json", fields=parse_field_overrides(["prompt=caption"]))
    assert [r.instruction for r in records] == ["make it blue", "again"]
    assert records[0].sources == [images / "a.png", images / "c.png"] and records[0].target == images / "b.png"
    assert records[1].mask == images / "m.png" and records[0].metadata == {"aesthetic": 5.5}
    assert [r.id for r in records] == ["b", "b-000001"]  # derived ids: target stem, made unique
    assert [r.id for r in read_manifest(images / "m.json", fields={"instruction": "caption"})] == ["b", "b-000001"]


def test_pairs_jsonl_null_sources_and_ids(images):
    (images / "m.jsonl").write_text(
        '{"source_image": null, "target_image": "a.png", "instruction": "draw"}\n\n'
        '{"source_image": ["a.png"], "target_image": "b.png", "instruction": "x", "id": 5}\n')
    records = read_manifest(images / "m.jsonl")
    assert records[0].sources == [] and records[0].id == "a" and records[1].id == "5"


def test_folder_layout_txt_prompts(images):
    root = images / "ds"
    for sub in ("sources", "targets", "masks"):
        (root / sub).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "sources" / "x.png")
    Image.new("RGB", (8, 8)).save(root / "targets" / "x.png")
    Image.new("L", (8, 8)).save(root / "masks" / "x.png")
    (root / "sources" / "y").mkdir()
    Image.new("RGB", (8, 8)).save(root / "sources" / "y" / "1.png")
    Image.new("RGB", (8, 8)).save(root / "sources" / "y" / "0.jpg")
    (root / "prompts.txt").write_text("x\tmake it blue\ny\tcombine them\n")
    x, y = read_manifest(root)
    assert x.id == "x" and x.mask == root / "masks" / "x.png" and x.target == root / "targets" / "x.png"
    assert y.sources == [root / "sources" / "y" / "0.jpg", root / "sources" / "y" / "1.png"] and y.target is None
    (root / "prompts.txt").write_text("x\tmake it blue\n")
    with pytest.raises(UserError, match="no prompts entry for id 'y'"):
        read_manifest(root)


@pytest.mark.parametrize("content,match", [
    ('{"instruction": "x", "source_image": "https://a.com/x.png"}\n', r"m.jsonl:1: field 'source_image': is a URL"),
    ('{"instruction": "x"}\n{"instruction": 3, "source_image": "a.png"}\n',
     r"m.jsonl:2: field 'instruction': must be text"),
    ('{"instruction": "x"}\n{oops\n', r"m.jsonl:2: invalid JSON"),
    ('{"source_image": "a.png", "target_image": "b.png"}\n', r"m.jsonl:1: field 'instruction': is missing"),
    ('{"instruction": "x", "id": "a", "target_image": "a.png"}\n'
     '{"instruction": "y", "id": "a", "target_image": "a.png"}\n',
     r"m.jsonl:2: field 'id': id 'a' already used at .*m.jsonl:1"),
    ('[1, 2]\n', r"m.jsonl:1: expected an object"),
])
def test_errors_name_file_line_field(images, content, match):
    (images / "m.jsonl").write_text(content)
    with pytest.raises(UserError, match=match):
        read_manifest(images / "m.jsonl")


def test_bad_field_override_and_format(images):
    with pytest.raises(UserError):
        parse_field_overrides(["prompt"])
    with pytest.raises(UserError):
        parse_field_overrides(["nonsense=x"])
    with pytest.raises(UserError):
        read_manifest(images / "a.png")
    with pytest.raises(UserError):
        read_manifest(images / "m.jsonl", format="webdataset")


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
_field_names = st.sampled_from(["prompt", "image", "edit_image", "back_mask", "ref_gt", "instruction", "source_image",
                                "target_image", "id", "task", "metadata", "instruction_cn", "x"]) | st.text(max_size=5)
_rows = st.lists(st.dictionaries(_field_names, _json_values, max_size=6) | _json_values, max_size=4)


def _check_only_user_errors(path: Path, fmt=None):
    try:
        records = read_manifest(path, format=fmt)
    except UserError as err:
        message = str(err)
        assert message and "\n" not in message.strip()
        return
    assert all(isinstance(r, EditRecord) and isinstance(r.instruction, str) and r.id for r in records)


_fuzz = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_fuzz
@given(rows=_rows, fmt=st.sampled_from([None, "pairs", "diffsynth"]))
def test_fuzz_jsonl_and_json(rows, fmt):
    with tempfile.TemporaryDirectory() as d:
        jsonl, js = Path(d) / "m.jsonl", Path(d) / "m.json"
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
        js.write_text(json.dumps(rows))
        _check_only_user_errors(jsonl, fmt)
        _check_only_user_errors(js, fmt)


@_fuzz
@given(text=st.text(max_size=200), ext=st.sampled_from([".csv", ".jsonl", ".json"]))
def test_fuzz_arbitrary_text(text, ext):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"m{ext}"
        path.write_text(text)
        _check_only_user_errors(path)


@_fuzz
@given(data=st.binary(max_size=100))
def test_fuzz_arbitrary_bytes_csv(data):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.csv"
        path.write_bytes(b"prompt,image,edit_image\n" + data)
        _check_only_user_errors(path)


_prompt_lines = st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20), max_size=5)


@_fuzz
@given(lines=_prompt_lines, jsonl=_rows, which=st.sampled_from(["prompts.txt", "prompts.jsonl", "prompts.csv"]))
def test_fuzz_folder_layout(lines, jsonl, which):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "targets").mkdir()
        Image.new("RGB", (4, 4)).save(root / "targets" / "x.png")
        if which == "prompts.jsonl":
            (root / which).write_text("".join(json.dumps(r) + "\n" for r in jsonl))
        else:
            (root / which).write_text("\n".join(lines))
        _check_only_user_errors(root)


def test_write_folder_refuses_non_empty_folder(images):
    (images / "out").mkdir()
    (images / "out" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not an empty folder"):
        write_manifest(_records(images), images / "out", "folder")
    assert (images / "out" / "keep.txt").read_text() == "x"


_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1,
                max_size=12)
_name = st.text(alphabet="abcdefghij_-[] .0123", min_size=1, max_size=8).filter(lambda s: s.strip(" .") == s and s)
_meta_value = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=6)


@st.composite
def _record_lists(draw, root: Path):
    n = draw(st.integers(1, 4))
    ids = draw(st.lists(_text, min_size=n, max_size=n, unique=True))
    records = []
    for rid in ids:
        def path():
            return draw(st.none() | _name.map(lambda s: root / "imgs" / f"{s}.png"))

        records.append(EditRecord(
            id=rid, instruction=draw(_text), sources=draw(st.lists(_name.map(lambda s: root / f"{s}.png"), max_size=3)),
            target=path(), mask=path(), ref_gt=path(), instruction_cn=draw(st.none() | _text),
            inverse_instruction=draw(st.none() | _text), inverse_instruction_cn=draw(st.none() | _text),
            task=draw(st.none() | _text),
            metadata=draw(st.dictionaries(
                st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=6),
                _meta_value, max_size=4))))
    return records


_ROOT = Path(tempfile.gettempdir()) / "editkit-roundtrip"


@_fuzz
@given(records=_record_lists(_ROOT), fmt=st.sampled_from(["pairs", "diffsynth"]),
       ext=st.sampled_from([".json", ".jsonl", ".csv"]))
def test_property_round_trip_any_record(records, fmt, ext):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"m{ext}"
        write_manifest(records, path, fmt)
        assert read_manifest(path) == records


def test_csv_refuses_nul(tmp_path):
    with pytest.raises(UserError, match="NUL"):
        write_manifest([EditRecord("a", "x\x00y")], tmp_path / "m.csv", "pairs")
    assert not (tmp_path / "m.csv").exists()
