"""`editkit cache` trusts only what it made: the fingerprint, verify and --repair, damaged indexes,
bad records (stop or --skip-bad), --field and --device."""

from __future__ import annotations

import json
import shlex

import pytest
import torch

from editkit.errors import UserError
from tests.cli_run import run_cli

AREA, MULTIPLE = 64 * 64, 16


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from editkit.data.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("synth") / "data", n=6, size=64, seed=3, val_fraction=0.0,
                      test_fraction=0.0, progress=False)


@pytest.fixture(scope="module")
def model():
    from editkit.models import load_model

    return load_model("tiny", dtype="fp32", device="cpu")


def _build(model, manifest, out, area=AREA, **options):
    from editkit.train.cache import build_cache

    options = {"dtype": "fp32", "device": "cpu", "shard_records": 2, "progress": False, "model": model, **options}
    return build_cache("tiny", manifest, out, area, MULTIPLE, **options)


def _cache_args(manifest, out, *more):
    return ["cache", "--model", "tiny", "--data", manifest, "--out", out, "--area", AREA, "--multiple", MULTIPLE,
            "--dtype", "fp32", "--device", "cpu", "--shard-records", 2, *more]


def _assert_same_cache(a, b) -> None:
    assert a.ids == b.ids
    for rid in a.ids:
        x, y = a.get(rid), b.get(rid)
        assert sorted(x) == sorted(y), rid
        for name in x:
            torch.testing.assert_close(x[name], y[name], atol=1e-5, rtol=1e-5, msg=f"{rid} {name}")
    assert sorted(a.white) == sorted(b.white)
    for name in a.white:
        bucket = tuple(map(int, name.split("x")))
        torch.testing.assert_close(a.white_latents(bucket), b.white_latents(bucket), atol=1e-5, rtol=1e-5)


def _held(out, shard: str) -> list[str]:
    index = json.loads((out / "index-r0.json").read_text())
    return sorted(rid for rid, meta in index["records"].items() if meta["shard"] == shard)


def _count_encoded(monkeypatch) -> list[str]:
    import editkit.train.samples as samples

    encoded, original = [], samples.encode_records

    def counting(model, records, bucket):
        encoded.extend(r.id for r in records)
        return original(model, records, bucket)

    monkeypatch.setattr(samples, "encode_records", counting)
    return encoded


def test_other_data_or_area_is_refused_and_overwrite_rebuilds(synth, model, tmp_path):
    from editkit.data.synth import synthesize
    from editkit.train.cache import CacheReader

    other = synthesize(tmp_path / "other", n=3, size=64, seed=9, val_fraction=0.0, test_fraction=0.0, progress=False)
    out = tmp_path / "c"
    _build(model, synth["train"], out)
    with pytest.raises(UserError, match="differs in: records") as err:
        _build(model, other["train"], out)
    assert "--overwrite" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="differs in: area"):
        _build(model, synth["train"], out, area=32 * 32)
    reader = CacheReader(out)
    assert len(reader.ids) == 6 and reader.manifest["config"]["area"] == AREA  # untouched by the refused runs
    rebuilt = _build(model, synth["train"], out, area=32 * 32, overwrite=True)
    assert rebuilt["records"] == 6 and rebuilt["skipped"] == 0
    reader = CacheReader(out)
    assert reader.manifest["config"]["area"] == 32 * 32
    assert reader.get(reader.ids[0])["target"].shape[-2:] == (4, 4)
    assert reader.verify()["white"] == ["32x32"] and reader.verify()["records"] == 6
    # a cache without a fingerprint (an older editkit's) is not trusted either
    (out / "fingerprint.json").unlink()
    with pytest.raises(UserError, match="without fingerprint.json"):
        _build(model, synth["train"], out, area=32 * 32)


def test_verify_lists_every_bad_shard_and_its_command_repairs_exactly_those(synth, tmp_path, capsys, monkeypatch):
    from editkit.train.cache import CacheReader

    out, clean = tmp_path / "c", tmp_path / "clean"
    assert run_cli(capsys, *_cache_args(synth["train"], out))[0] == 0
    assert run_cli(capsys, *_cache_args(synth["train"], clean, "--batch-size", 1))[0] == 0
    first, second = sorted((out / "shards").iterdir())[:2]
    lost = _held(out, first.name) + _held(out, second.name)
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF
    first.write_bytes(bytes(data))
    second.unlink()

    code, _, err = run_cli(capsys, "cache", "verify", out)
    assert code == 2
    assert f"{first.name}: checksum mismatch" in err and f"{second.name}: missing" in err
    assert f"2 bad shard(s) holding {len(lost)} record(s)" in err
    command = shlex.split(err.strip().splitlines()[-1].split("`")[1])
    assert command[:2] == ["editkit", "cache"] and command[-1] == "--repair"

    encoded = _count_encoded(monkeypatch)
    code, printed, _ = run_cli(capsys, *command[1:])
    assert code == 0 and f"cached {len(lost)} records" in printed and "checksum mismatch" in printed
    assert sorted(encoded) == sorted(lost)  # exactly the records of the bad shards
    assert run_cli(capsys, "cache", "verify", out)[0] == 0
    _assert_same_cache(CacheReader(out), CacheReader(clean))


def test_unreadable_shards_and_missing_tensors_are_found_and_repaired(synth, model, tmp_path, monkeypatch):
    from editkit.train.cache import CacheReader, sha256

    out = tmp_path / "c"
    _build(model, synth["train"], out)
    index_path = out / "index-r0.json"
    index = json.loads(index_path.read_text())
    first, second = sorted(index["shards"])[:2]
    (out / "shards" / first).write_bytes(b"not a safetensors file")
    index["shards"][first] = sha256(out / "shards" / first)  # the checksum agrees: only reading finds it
    index["records"][_held(out, second)[0]]["tensors"].append("embeds.nope")
    index_path.write_text(json.dumps(index))
    found = {p["shard"]: p["reason"] for p in CacheReader(out).problems()}
    assert found[first].startswith("unreadable") and "embeds.nope" in found[second]
    with pytest.raises(UserError, match=r"unreadable.*\(and 1 more bad shard\(s\)\).*--repair"):
        CacheReader(out).verify()
    encoded = _count_encoded(monkeypatch)
    result = _build(model, synth["train"], out, repair=True)
    assert sorted(result["repaired"]) == [first, second] and result["records"] == 4 == len(encoded)
    assert CacheReader(out).verify()["records"] == 6


def test_a_damaged_index_is_one_line_and_repair_rebuilds_its_records(synth, model, tmp_path, capsys):
    from editkit.train.cache import CacheReader

    out = tmp_path / "c"
    _build(model, synth["train"], out)
    (out / "index-r0.json").write_text('{"rank": 0, "shards": {"r0-0000')  # truncated
    with pytest.raises(UserError) as err:
        _build(model, synth["train"], out)
    message = str(err.value)
    assert "index-r0.json: damaged cache index" in message and "--repair" in message and "--overwrite" in message
    assert "\n" not in message
    with pytest.raises(UserError, match="index-r0.json: damaged cache index"):
        CacheReader(out)
    code, _, stderr = run_cli(capsys, "cache", "verify", out)
    assert code == 2 and "damaged cache index" in stderr and "Traceback" not in stderr
    result = _build(model, synth["train"], out, repair=True)
    assert result["records"] == 6 and result["repaired"] == {"index-r0.json": "damaged index"}
    assert CacheReader(out).verify()["records"] == 6


def test_a_bad_record_stops_naming_it_and_skip_bad_goes_on(synth, tmp_path, capsys):
    from editkit.data import read_manifest, write_manifest
    from editkit.train.cache import CacheReader

    records = read_manifest(synth["train"])
    broken = tmp_path / "broken.png"
    broken.write_bytes(records[2].mask.read_bytes()[:60])  # a truncated mask: found while encoding
    records[2].mask = broken
    manifest = write_manifest(records, tmp_path / "train.jsonl")
    out = tmp_path / "c"
    code, _, err = run_cli(capsys, *_cache_args(manifest, out, "--batch-size", 4))
    assert code == 2 and "train.jsonl:3" in err and "broken.png" in err and "--skip-bad" in err
    assert err.strip().splitlines()[-1].startswith("editkit: error: record ") and "Traceback" not in err
    kept = CacheReader(out).ids
    assert kept == sorted(r.id for r in records[:2])  # encoded before the bad one: kept
    code, printed, err = run_cli(capsys, *_cache_args(manifest, out, "--batch-size", 4, "--skip-bad"))
    assert code == 0 and "cached 3 records (2 already done)" in printed
    assert "skipped 1 bad record(s)" in err and "train.jsonl:3" in err
    assert CacheReader(out).verify()["records"] == 5

    records[2].target = tmp_path / "absent.png"  # a missing file: found before anything is encoded
    code, _, err = run_cli(capsys, *_cache_args(write_manifest(records, tmp_path / "m2.jsonl"), tmp_path / "c2"))
    assert code == 2 and "m2.jsonl:3" in err and "absent.png" in err


def test_field_overrides_and_devices(synth, tmp_path, capsys):
    from editkit.train.cache import CacheReader

    rows = [json.loads(line) for line in synth["train"].read_text().splitlines()][:3]
    renamed = synth["train"].parent / "renamed.jsonl"  # beside train.jsonl: its relative image paths hold
    renamed.write_text("".join(json.dumps({("caption" if k == "instruction" else k): v for k, v in row.items()}) + "\n"
                               for row in rows))
    code, printed, _ = run_cli(capsys, *_cache_args(renamed, tmp_path / "c", "--field", "instruction=caption"))
    assert code == 0 and "cached 3 records" in printed
    assert CacheReader(tmp_path / "c").manifest["config"]["fields"] == {"instruction": "caption"}
    for device, expected in (("bogus", "--device 'bogus'"), ("cuda", "--device cuda")):
        if device == "cuda" and torch.cuda.is_available():
            continue
        code, _, err = run_cli(capsys, "cache", "--model", "tiny", "--data", synth["train"], "--out", tmp_path / "d",
                            "--device", device)
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1


def test_one_process_repairs_a_cache_built_by_two(synth, model, tmp_path, monkeypatch):
    from editkit.train.cache import CacheReader

    out = tmp_path / "c"
    for rank in (1, 0):  # as two torchrun processes would
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        _build(model, synth["train"], out)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    index = json.loads((out / "index-r1.json").read_text())
    shard = index["white"]["64x64"]  # rank 1's last shard, with its white latents
    lost = sorted(rid for rid, meta in index["records"].items() if meta["shard"] == shard)
    (out / "shards" / shard).unlink()
    encoded = _count_encoded(monkeypatch)
    result = _build(model, synth["train"], out, repair=True)
    assert lost and result["repaired"] == {shard: "missing"} and sorted(encoded) == lost
    reader = CacheReader(out)
    assert reader.verify()["records"] == 6 and reader.white_latents((64, 64)) is not None


def test_a_full_disk_while_writing_a_shard_is_one_line(monkeypatch, capsys, synth, tmp_path):
    """safetensors' writer reports a full disk as a SafetensorError; the atomic layer turns it into
    OSError(ENOSPC), which the CLI reports in one line (it was a traceback; found by bench/reliability)."""
    import editkit.train.cache as cache_module

    def full(tensors, path):
        raise cache_module.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                           'message: "No space left on device" })')

    monkeypatch.setattr(cache_module, "save_file", full)
    code, _, err = run_cli(capsys, *_cache_args(synth["train"], tmp_path / "c"))
    assert code == 2 and err.strip().splitlines()[-1].startswith("editkit: error: the disk is full while writing")
    assert not list((tmp_path / "c").rglob(".tmp-*"))
