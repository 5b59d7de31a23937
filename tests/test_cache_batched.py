"""`editkit cache` batches records of one shape key; the tensors equal the one-record-at-a-time path."""

import dataclasses
import subprocess
import sys

import pytest
import torch

from editkit.errors import UserError

AREA, MULTIPLE = 64 * 64, 16


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from editkit.data.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("synth") / "data", n=7, size=64, seed=3, val_fraction=0.0,
                      test_fraction=0.0, progress=False)


@pytest.fixture(scope="module")
def model():
    from editkit.models import load_model

    return load_model("tiny", dtype="fp32", device="cpu")


def _records(synth):
    from editkit.data import read_manifest

    records = read_manifest(synth["train"])
    # texts differ between records: one without Chinese / inverse instructions, one without a mask
    records[1] = dataclasses.replace(records[1], instruction_cn=None, inverse_instruction_cn=None)
    records[2] = dataclasses.replace(records[2], inverse_instruction=None, inverse_instruction_cn=None, mask=None)
    return records


def _assert_same(a: dict, b: dict, where: str) -> None:
    assert sorted(a) == sorted(b), where
    for name in a:
        assert a[name].shape == b[name].shape and a[name].dtype == b[name].dtype, f"{where} {name}"
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-5, msg=f"{where} {name}")


def test_encode_records_equals_encode_record(synth, model):
    from editkit.data.images import make_buckets
    from editkit.train.samples import encode_record, encode_records, sample_key

    records = _records(synth)
    buckets = make_buckets(AREA, MULTIPLE, 4.0)
    keys = {sample_key(model, r, buckets) for r in records}
    assert len(keys) == 1
    bucket = keys.pop()[0]
    batched = encode_records(model, records, bucket)
    assert len(batched) == len(records)
    for r, b in zip(records, batched):
        _assert_same(encode_record(model, r, bucket), b, r.id)
    assert "embeds.cn" not in batched[1] and "embeds.inverse" in batched[1]
    assert "embeds.inverse" not in batched[2] and "mask" not in batched[2]
    assert encode_records(model, [], bucket) == []


def test_batched_cache_equals_one_by_one_and_resumes(synth, model, tmp_path):
    from editkit.data import write_manifest
    from editkit.train.cache import CacheReader, build_cache

    manifest = tmp_path / "train.jsonl"
    write_manifest(_records(synth), manifest)
    one = build_cache("tiny", manifest, tmp_path / "one", AREA, MULTIPLE, dtype="fp32", device="cpu",
                      shard_records=3, progress=False, batch_size=1, model=model)
    many = build_cache("tiny", manifest, tmp_path / "many", AREA, MULTIPLE, dtype="fp32", device="cpu",
                       shard_records=3, progress=False, batch_size=4, model=model)
    assert one["records"] == many["records"] == 7
    a, b = CacheReader(tmp_path / "one"), CacheReader(tmp_path / "many")
    assert a.verify()["records"] == b.verify()["records"] == 7 and b.verify()["shards"] == 3
    assert a.ids == b.ids
    for rid in a.ids:
        assert a.key(rid) == b.key(rid)
        _assert_same(a.get(rid), b.get(rid), rid)
    torch.testing.assert_close(a.white_latents((64, 64)), b.white_latents((64, 64)), atol=1e-5, rtol=1e-5)
    # a rerun with another batch size skips everything
    again = build_cache("tiny", manifest, tmp_path / "many", AREA, MULTIPLE, dtype="fp32", device="cpu",
                        progress=False, batch_size=2, model=model)
    assert again["records"] == 0 and again["skipped"] == 7


def test_batched_cache_resumes_after_a_lost_shard(synth, model, tmp_path):
    import json

    from editkit.data import write_manifest
    from editkit.train.cache import CacheReader, build_cache

    manifest = tmp_path / "train.jsonl"
    write_manifest(_records(synth), manifest)
    out = tmp_path / "c"
    build_cache("tiny", manifest, out, AREA, MULTIPLE, dtype="fp32", device="cpu", shard_records=3,
                progress=False, batch_size=4, model=model)
    # as if killed before the last shard was written: drop it and its index entries
    index_path = out / "index-r0.json"
    index = json.loads(index_path.read_text())
    last = sorted(index["shards"])[-1]
    lost = [rid for rid, meta in index["records"].items() if meta["shard"] == last]
    (out / "shards" / last).unlink()
    del index["shards"][last]
    index["records"] = {rid: m for rid, m in index["records"].items() if m["shard"] != last}
    index["white"] = {k: v for k, v in index["white"].items() if v != last}
    index_path.write_text(json.dumps(index))
    again = build_cache("tiny", manifest, out, AREA, MULTIPLE, dtype="fp32", device="cpu", shard_records=3,
                        progress=False, batch_size=4, model=model)
    assert again["records"] == len(lost) >= 1
    reader = CacheReader(out)
    assert reader.verify()["records"] == 7 and reader.white_latents((64, 64)) is not None


def test_batch_size_must_be_positive(synth, tmp_path):
    from editkit.train.cache import build_cache

    with pytest.raises(UserError, match="--batch-size"):
        build_cache("tiny", synth["train"], tmp_path / "c", AREA, MULTIPLE, dtype="fp32", device="cpu",
                    progress=False, batch_size=0)
    proc = subprocess.run([sys.executable, "-m", "editkit", "cache", "--model", "tiny", "--data", str(synth["train"]),
                           "--out", str(tmp_path / "c"), "--batch-size", "0"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--batch-size" in proc.stderr
