import json

import pytest

from editkit.errors import UserError
from editkit.utils.fingerprint import FILE_NAME, claim_folder, file_stamp, folder_stamp


def test_same_inputs_resume_other_inputs_are_refused(tmp_path):
    assert claim_folder(tmp_path, "infer", {"steps": 4, "model": "tiny"}) is False
    assert claim_folder(tmp_path, "infer", {"model": "tiny", "steps": 4}) is True
    with pytest.raises(UserError, match="differs in: steps.*--overwrite"):
        claim_folder(tmp_path, "infer", {"steps": 8, "model": "tiny"})
    assert json.loads((tmp_path / FILE_NAME).read_text())["inputs"]["steps"] == 4


def test_overwrite_clears_then_records_the_new_fingerprint(tmp_path):
    claim_folder(tmp_path, "cache", {"area": 64})
    (tmp_path / "old.bin").write_bytes(b"x")
    cleared = []
    assert claim_folder(tmp_path, "cache", {"area": 128}, overwrite=True,
                        clear=lambda: cleared.append((tmp_path / "old.bin").unlink())) is False
    assert cleared and not (tmp_path / "old.bin").exists()
    assert claim_folder(tmp_path, "cache", {"area": 128}) is True


def test_another_job_in_the_folder_is_refused(tmp_path):
    claim_folder(tmp_path, "cache", {"a": 1})
    with pytest.raises(UserError, match="holds cache outputs"):
        claim_folder(tmp_path, "infer", {"a": 1})


def test_a_damaged_fingerprint_is_refused_not_trusted(tmp_path):
    (tmp_path / FILE_NAME).write_text("{not json")
    with pytest.raises(UserError, match="--overwrite"):
        claim_folder(tmp_path, "eval", {"a": 1})


def test_stamps_change_with_the_file(tmp_path):
    f = tmp_path / "m" / "w.safetensors"
    f.parent.mkdir()
    f.write_bytes(b"abc")
    before, folder_before = file_stamp(f), folder_stamp(f.parent)
    f.write_bytes(b"abcd")
    assert file_stamp(f) != before and folder_stamp(f.parent) != folder_before
    assert file_stamp(tmp_path / "nope") == ["missing"]
    assert folder_stamp("tiny") == "tiny"
