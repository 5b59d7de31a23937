"""The FireRed-Image-Edit workflow (the seed's train_lora.sh) as is: its meta folder of task
sub-folders, its weight strings and its T2I records train in editkit through
`editkit.train.firered.convert_firered_args`."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from editkit.data import read_manifest
from editkit.data.mixing import MixingSampler
from editkit.errors import UserError
from editkit.train.config import load_config, validate_config
from editkit.train.firered import convert_firered_args, mixture_weights

DATA_WEIGHTS = "dataset_a=0.5,dataset_b=1.2,dataset_c=1.0"
COUNT_WEIGHTS = "0=1,1=1,2=1,3=0"
TARGETS = "to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj,to_out.0,to_add_out,img_mlp.net.2,img_mod.1,txt_mlp.net.2,txt_mod.1"  # noqa: E501
# which source counts each task's records have (dataset_c has no 2-source records)
TASK_COUNTS = {"dataset_a": (0, 1, 2), "dataset_b": (0, 1, 2, 3), "dataset_c": (0, 1)}


def _image(path, rng):
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def meta_dir(tmp_path_factory):
    """FireRed's layout: meta/<task>/*.jsonl, two files per task; T2I records with no source written
    three ways (null, [], absent)."""
    root = tmp_path_factory.mktemp("firered")
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir()
    for task, counts in TASK_COUNTS.items():
        (root / "meta" / task).mkdir(parents=True)
        for part in range(2):
            lines = []
            for k in counts:
                for n in range(2):
                    stem = f"{task}-{part}-{k}-{n}"
                    row = {"instruction": f"edit {stem}", "instruction_cn": f"编辑 {stem}",
                           "inverse_instruction": f"undo {stem}", "inverse_instruction_cn": f"撤销 {stem}",
                           "edit_image": _image(images / f"{stem}-t.png", rng),
                           "edit_image_size": {"width": 32, "height": 32}}
                    sources = [_image(images / f"{stem}-s{i}.png", rng) for i in range(k)]
                    if k or n == 0:
                        row["source_image"] = sources if k != 1 or n else sources[0]
                    if k == 0 and n == 0 and part == 1:
                        row["source_image"] = None
                    lines.append(json.dumps(row, ensure_ascii=False))
            (root / "meta" / task / f"part-{part}.jsonl").write_text("\n".join(lines) + "\n")
    return root / "meta"


def _command(meta_dir, out, *extra):
    """The seed's train_lora.sh with its paths pointed here (and a tiny model)."""
    return f"""accelerate launch --mixed_precision="bf16" --num_processes 8 -m src.sft \\
  --pretrained_model_name_or_path="tiny" \\
  --train_data_meta_dir="{meta_dir}" \\
  --train_data_weights="{DATA_WEIGHTS}" \\
  --train_src_img_num_weights="{COUNT_WEIGHTS}" \\
  --train_batch_size=2 \\
  --image_sample_size=32 \\
  --gradient_accumulation_steps=1 \\
  --num_train_epochs=1 \\
  --max_train_steps=3 \\
  --learning_rate=2e-05 \\
  --lr_scheduler="constant_with_warmup" \\
  --lr_warmup_steps=100 \\
  --checkpointing_steps=100 \\
  --output_dir="{out}" \\
  --gradient_checkpointing \\
  --mixed_precision="no" \\
  --adam_weight_decay=3e-2 \\
  --adam_epsilon=1e-10 \\
  --max_grad_norm=0.05 \\
  --condition_encoder_mode="sync" \\
  --report_to=tensorboard \\
  --use_peft_lora \\
  --lora_r 8 \\
  --lora_alpha 8 \\
  --lora_dropout 0.0 \\
  --lora_target_modules {TARGETS} \\
  {" ".join(extra)}"""


def test_the_command_line_becomes_a_valid_config(meta_dir, tmp_path):
    config, notes = convert_firered_args(_command(meta_dir, tmp_path / "run", "--disable_inverse"), tmp_path / "c")
    cfg = load_config(tmp_path / "c" / "config.yaml")
    assert cfg == validate_config(config)
    assert cfg.train.mode == "lora" and cfg.train.lora.rank == 8 and cfg.train.lora.targets[-1] == "txt_mod.1"
    assert cfg.optim.lr == 2e-5 and cfg.optim.eps == 1e-10 and cfg.optim.max_grad_norm == 0.05
    assert cfg.optim.schedule == "constant_with_warmup" and cfg.loop.max_steps == 3 and cfg.data.area == 32 * 32
    assert cfg.data.inverse_probability == 0.0 and cfg.data.instruction == "mixed"
    assert cfg.objective.text_dropout == 0.05 and cfg.train.gradient_checkpointing
    assert any("condition_encoder_mode" in n for n in notes)
    names = sorted(d.name for d in cfg.data.train)
    assert names == ["dataset_a-k0", "dataset_a-k1", "dataset_a-k2", "dataset_b-k0", "dataset_b-k1",
                     "dataset_b-k2", "dataset_c-k0", "dataset_c-k1"]  # 3=0: dataset_b's 3-source records left out
    t2i = read_manifest(next(d.manifest for d in cfg.data.train if d.name == "dataset_a-k0"))
    assert len(t2i) == 4 and all(not r.sources and r.target is not None for r in t2i)
    two = read_manifest(next(d.manifest for d in cfg.data.train if d.name == "dataset_b-k2"))
    assert all(len(r.sources) == 2 and r.target.name.endswith("-t.png") for r in two)
    assert "FireRed" in (tmp_path / "c" / "config.yaml").read_text().splitlines()[0]


def test_the_mixture_draws_as_firered_does(meta_dir, tmp_path):
    """P(k) from the count weights; P(task | k) proportional to the task weight among the tasks with k."""
    config, _ = convert_firered_args(_command(meta_dir, tmp_path / "run"), tmp_path / "c")
    cfg = validate_config(config)
    sampler = MixingSampler({d.name: read_manifest(d.manifest) for d in cfg.data.train}, 1,
                            {d.name: d.weight for d in cfg.data.train}, seed=0, rank=0, world_size=1)
    draws = Counter()
    n = 6000
    for _ in range(n):
        draws[sampler.dataset_of(sampler.next_batch()[0])] += 1
    weights = {"dataset_a": 0.5, "dataset_b": 1.2, "dataset_c": 1.0}
    for name, count in draws.items():
        task, k = name.rsplit("-k", 1)
        having = [t for t, counts in TASK_COUNTS.items() if int(k) in counts]
        expected = (1 / 3) * weights[task] / sum(weights[t] for t in having)
        assert abs(count / n - expected) < 0.025, (name, count / n, expected)
    assert mixture_weights({"a": 1.0}, {0: 1.0, 1: 0.0}, {"a": {0, 1}}) == {("a", 0): 1.0}


def test_inverse_and_t2i_switches(meta_dir, tmp_path):
    config, _ = convert_firered_args(_command(meta_dir, tmp_path / "r", "--enable_inverse"), tmp_path / "inv")
    assert validate_config(config).data.inverse_probability == 0.5
    config, _ = convert_firered_args(_command(meta_dir, tmp_path / "r", "--t2i_mode"), tmp_path / "t2i")
    assert sorted(d["name"] for d in config["data"]["train"]) == ["dataset_a-k0", "dataset_b-k0", "dataset_c-k0"]
    with pytest.raises(UserError, match="contradict"):
        convert_firered_args(_command(meta_dir, tmp_path / "r", "--enable_inverse --disable_inverse"), tmp_path / "x")
    with pytest.raises(UserError, match="--train_src_img_num_weights '0=1,x=2'"):
        convert_firered_args(_command(meta_dir, tmp_path / "r").replace(COUNT_WEIGHTS, "0=1,x=2"), tmp_path / "y")
    with pytest.raises(UserError, match="required: --train_data_meta_dir"):
        convert_firered_args("-m src.sft --pretrained_model_name_or_path=tiny", tmp_path / "z")


@pytest.mark.parametrize("switch", ["--enable_inverse", "--t2i_mode"])
def test_the_converted_config_trains(meta_dir, tmp_path, switch):
    """The whole mixture (inverse edits on), and T2I records only (no source image at all)."""
    from editkit.train.trainer import train

    convert_firered_args(_command(meta_dir, tmp_path / "run", switch), tmp_path / "c")
    summary = train(load_config(tmp_path / "c" / "config.yaml"), progress=False)
    assert summary["steps"] == 3 and (tmp_path / "run" / "final").is_dir()
