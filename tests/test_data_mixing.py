import json
from collections import Counter

import pytest
from PIL import Image
from scipy.stats import chisquare

from editkit.data import write_manifest
from editkit.data.images import make_buckets
from editkit.data.mixing import (
    BucketBatchSampler,
    MixingSampler,
    bucket_by_image_size,
    discover_datasets,
    load_datasets,
    parse_dataset_weights,
    parse_source_weights,
    preview_mixture,
)
from editkit.data.records import EditRecord
from editkit.errors import UserError


def _dataset(name, n, max_sources=3):
    return [EditRecord(f"{name}{i}", "x", sources=[f"{name}{i}_{j}.png" for j in range(i % (max_sources + 1))])
            for i in range(n)]


DATASETS = {"a": _dataset("a", 300), "b": _dataset("b", 120), "c": _dataset("c", 50)}


def test_dataset_frequencies_match_weights():
    sampler = MixingSampler(DATASETS, batch_size=2, dataset_weights=parse_dataset_weights("a=3,b=1"), seed=0,
                            rank=0, world_size=1)
    counts = Counter(sampler.dataset_of(sampler.next_batch()[0]) for _ in range(4000))
    assert set(counts) == {"a", "b"}  # c is not listed: excluded
    observed = [counts["a"], counts["b"]]
    assert chisquare(observed, [3000, 1000]).pvalue > 1e-3


def test_source_count_weights():
    sampler = MixingSampler(DATASETS, batch_size=1, source_weights=parse_source_weights("0=1,1=1,2=2,3=0"), seed=1,
                            rank=0, world_size=1)
    counts = Counter(len(sampler.records[sampler.next_batch()[0]].sources) for _ in range(4000))
    assert counts[3] == 0
    assert chisquare([counts[0], counts[1], counts[2]], [1000, 1000, 2000]).pvalue > 1e-3


def test_default_source_law_keeps_dataset_weights_exact():
    skewed = {"a": _dataset("a", 200, max_sources=0), "b": _dataset("b", 200, max_sources=3)}
    sampler = MixingSampler(skewed, batch_size=1, dataset_weights={"a": 1, "b": 1}, seed=2, rank=0, world_size=1)
    counts = Counter(sampler.dataset_of(sampler.next_batch()[0]) for _ in range(4000))
    assert chisquare([counts["a"], counts["b"]], [2000, 2000]).pvalue > 1e-3


def test_preview_mixture_counts_the_drawn_batches():
    def make():
        return MixingSampler(DATASETS, batch_size=2, dataset_weights={"a": 3, "b": 1, "c": 0},
                             source_weights={0: 1, 1: 1, 2: 2}, seed=4, rank=0, world_size=1)

    preview = preview_mixture(make(), 2000)
    reference = make()
    firsts = [reference.next_batch()[0] for _ in range(2000)]
    datasets = Counter(reference.dataset_of(i) for i in firsts)
    counts = Counter(len(reference.records[i].sources) for i in firsts)
    assert preview.steps == 2000 and preview.records == 420  # a and b; c has weight 0
    assert preview.dataset_shares == {"a": datasets["a"] / 2000, "b": datasets["b"] / 2000}
    assert preview.count_shares == {0: counts[0] / 2000, 1: counts[1] / 2000, 2: counts[2] / 2000}
    assert preview.dataset_weights == pytest.approx({"a": 0.75, "b": 0.25})
    assert sum(preview.count_shares.values()) == pytest.approx(1.0)
    assert preview.count_shares[2] == pytest.approx(0.5, abs=0.05)
    with pytest.raises(ValueError):
        preview_mixture(make(), 0)


def test_ranks_share_the_source_count_and_batches_stack():
    samplers = [MixingSampler(DATASETS, batch_size=4, seed=5, rank=r, world_size=4) for r in range(4)]
    different_items = 0
    for _ in range(200):
        batches = [s.next_batch() for s in samplers]
        ks = {len(s.records[i].sources) for s, b in zip(samplers, batches) for i in b}
        assert len(ks) == 1
        for s, b in zip(samplers, batches):
            assert len({s.dataset_of(i) for i in b}) == 1
        different_items += len({tuple(b) for b in batches}) > 1
    assert different_items > 150  # ranks do not all draw the same records


def test_resume_continues_identical_sequence():
    def make():
        return MixingSampler(DATASETS, batch_size=3, dataset_weights={"a": 2, "b": 1, "c": 1},
                             source_weights={0: 1, 1: 1, 2: 1, 3: 1}, seed=9, rank=1, world_size=2)

    reference = make()
    expected = [reference.next_batch() for _ in range(300)]
    first = make()
    for _ in range(137):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(163)] == expected[137:]
    replayed = make()
    replayed.load_state_dict({"step": 137})
    assert [replayed.next_batch() for _ in range(163)] == expected[137:]


def test_bucket_sampler_groups_by_size_and_covers_each_pass(tmp_path):
    records = []
    for i, size in enumerate([(64, 64), (96, 48), (64, 64), (48, 96), (96, 48), (64, 64)] * 4):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", size).save(path)
        records.append(EditRecord(str(i), "x", sources=[path], target=path))
    bucket_of = bucket_by_image_size(make_buckets(64 * 64, 16))
    sampler = BucketBatchSampler(records, batch_size=2, seed=0, rank=0, world_size=1, bucket_of=bucket_of)
    seen = Counter()
    for _ in range(200):
        batch = sampler.next_batch()
        assert len({Image.open(records[i].target).size for i in batch}) == 1
        seen.update(batch)
    assert len(seen) == len(records) and max(seen.values()) - min(seen.values()) <= 12
    assert len(sampler) == 12


def test_discover_and_load_datasets(tmp_path):
    for name in ("web", "synth", "other"):
        (tmp_path / name).mkdir()
        write_manifest(_dataset(name, 5), tmp_path / name / "train.jsonl", "pairs")
    (tmp_path / "empty").mkdir()
    (tmp_path / "built").mkdir()
    write_manifest(_dataset("built", 3), tmp_path / "built" / "manifest.jsonl", "pairs")
    (tmp_path / "built" / "build.json").write_text("{}")
    found = discover_datasets(tmp_path)
    assert sorted(found) == ["built", "other", "synth", "web"]
    datasets, weights = load_datasets(found, parse_dataset_weights("web=1,synth=3,other=0"))
    assert sorted(datasets) == ["synth", "web"] and weights == {"web": 1.0, "synth": 3.0}
    with pytest.raises(UserError, match="nope"):
        load_datasets(found, {"nope": 1})


@pytest.mark.parametrize("bad", ["a", "a=x", "a=-1", "a=0", "=1", "a=1,a=2"])
def test_bad_weight_specs(bad):
    with pytest.raises(UserError):
        parse_dataset_weights(bad)


def test_bad_sampler_setups():
    with pytest.raises(UserError):
        parse_source_weights("one=1")
    with pytest.raises(UserError):
        MixingSampler(DATASETS, batch_size=1, source_weights={7: 1}, rank=0, world_size=1)
    with pytest.raises(UserError):
        MixingSampler(DATASETS, batch_size=1, dataset_weights={"zzz": 1}, rank=0, world_size=1)
    with pytest.raises(UserError):
        MixingSampler({"a": []}, batch_size=1, rank=0, world_size=1)


def test_open_mixture_and_mix_command(tmp_path):
    from typer.testing import CliRunner

    from editkit.cli import app
    from editkit.data.mixing import open_mixture

    for name, n in (("web", 30), ("synth", 10)):
        (tmp_path / name).mkdir()
        write_manifest(_dataset(name, n), tmp_path / name / "train.jsonl", "pairs")
    sampler = open_mixture(tmp_path, 2, "web=1", "1=1,2=1", seed=0, rank=0, world_size=1)
    assert sampler.names == ["web"] and sampler.counts == [1, 2]
    result = CliRunner().invoke(app, ["data", "mix", str(tmp_path), "--weights", "web=1,synth=1", "--steps", "200"])
    assert result.exit_code == 0, result.output
    assert "dataset synth: " in result.output and "dataset web: " in result.output
