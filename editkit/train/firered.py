"""A FireRed-Image-Edit training command line as an editkit training config.

FireRed (`accelerate launch -m src.sft --train_data_meta_dir=... ...`) reads a meta folder whose
sub-folders are tasks, each holding any number of `.jsonl` files of records
`{instruction, instruction_cn, inverse_instruction, inverse_instruction_cn, edit_image (the
target), source_image (a path, a list, [] or null: text-to-image)}`. It draws each batch's source
count k by `--train_src_img_num_weights` ("0=1,1=1,2=1,3=0"), then a task by
`--train_data_weights` ("dataset_a=0.5,dataset_b=1.2,dataset_c=1.0") among the tasks that have
records with k sources.

`convert_firered_args(argv, out_dir)` takes that command line unchanged (a string or a list) and
writes into `out_dir`: one pairs manifest per (task, source count) under `manifests/`, with paths
made absolute, and `config.yaml`. Splitting by source count reproduces FireRed's law exactly with
editkit's mixing sampler (`editkit.data.mixing`): manifest (t, k) gets weight
`w_k * w_t / sum of w_t' over the tasks t' with k-source records`, so P(k) = w_k / sum w and
P(t | k) is proportional to w_t. Flags with no editkit equivalent are returned as notes (and
written at the top of config.yaml); `editkit train OUT/config.yaml` then trains.

Our readings of the seed workflow's switches: `--enable_inverse` trains on the inverse edit as
often as FireRed's uniform pick among {en, cn, inverse en, inverse cn} does when all four exist
(`data.inverse_probability: 0.5`); `--disable_inverse` is editkit's default (0); `--t2i_mode`
trains on the records without a source image only (source-count weights `0=1`).
"""

from __future__ import annotations

import argparse
import os
import shlex
from collections.abc import Sequence
from pathlib import Path

from editkit.errors import UserError

TARGET_FIELD = "edit_image"
"""FireRed's name for the edited (target) image; editkit's pairs schema reads it via a field override."""
TEXT_DROP = 0.05
"""FireRed's `text_drop_ratio`: the share of samples trained with the empty text."""
INVERSE_SHARE = 0.5
_FLAG_NOTES = {
    "use_8bit_adam": "8-bit Adam: editkit has adamw and prodigy_sf (optim.name)",
    "use_came": "CAME: editkit has adamw and prodigy_sf (optim.name)",
    "scale_lr": "scale_lr: give the scaled optim.lr yourself",
    "allow_tf32": "allow_tf32: not a config setting",
    "trainable_modules_low_learning_rate": "half-lr modules: editkit trains every module at optim.lr",
    "condition_encoder_mode": "condition_encoder_mode: editkit encodes online from manifests, or from "
                              "`editkit cache` folders (data.cache) like FireRed's offline mode",
    "use_fsdp": "use_fsdp: pass an FSDP accelerate config (configs/) to `accelerate launch`",
    "resume_from_checkpoint": "resume_from_checkpoint: use `editkit train CONFIG --resume latest`",
    "lora_path": "lora_path: not carried over (a decompose run has decompose.init_lora)",
    "streaming": "streaming: not needed (manifests are read lazily enough)",
    "report_model_info": "report_model_info: not carried over",
    "abnormal_norm_clip_start": "abnormal-gradient clipping: editkit clips at optim.max_grad_norm",
    "initial_grad_norm_ratio": "abnormal-gradient clipping: editkit clips at optim.max_grad_norm",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UserError(f"FireRed command line: {message}")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="src.sft", add_help=False, allow_abbrev=False)
    add = parser.add_argument
    add("--pretrained_model_name_or_path", required=True)
    add("--transformer_path")
    add("--vae_path")
    add("--output_dir", default="model-finetuned")
    add("--seed", type=int)
    add("--train_data_meta_dir", required=True)
    add("--train_data_weights")
    add("--train_src_img_num_weights", default="0=0,1=10,2=0,3=0")
    add("--num_train_epochs", type=int)
    add("--max_train_steps", type=int)
    add("--train_batch_size", type=int, default=16)
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--learning_rate", type=float, default=1e-4)
    add("--lr_scheduler", default="constant")
    add("--lr_warmup_steps", type=int, default=500)
    add("--adam_beta1", type=float, default=0.9)
    add("--adam_beta2", type=float, default=0.999)
    add("--adam_weight_decay", type=float, default=1e-2)
    add("--adam_epsilon", type=float, default=1e-8)
    add("--max_grad_norm", type=float, default=1.0)
    add("--gradient_checkpointing", action="store_true")
    add("--mixed_precision", choices=["no", "fp16", "bf16"])
    add("--trainable_modules", nargs="+")
    add("--weighting_scheme", default="none")
    add("--logit_mean", type=float, default=0.0)
    add("--logit_std", type=float, default=1.0)
    add("--image_sample_size", type=int, default=512)
    add("--enable_inverse", action="store_true")
    add("--disable_inverse", action="store_true")
    add("--t2i_mode", action="store_true")
    add("--report_to", default="wandb")
    add("--checkpointing_steps", type=int, default=500)
    add("--checkpoints_total_limit", type=int)
    add("--use_peft_lora", action="store_true")
    add("--lora_r", type=int, default=32)
    add("--lora_alpha", type=int, default=32)
    add("--lora_dropout", type=float, default=0.0)
    add("--lora_target_modules", default="to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj,to_out.0,to_add_out,"
                                         "img_mlp.net.2,img_mod.1,txt_mlp.net.2,txt_mod.1")
    for flag in _FLAG_NOTES:
        add(f"--{flag}", nargs="*")
    return parser


def _script_args(argv: str | Sequence[str]) -> list[str]:
    """The arguments of the training script: a shell line's words after `-m src.sft` (or `sft.py`)."""
    words = shlex.split(argv.replace("\\\n", " ")) if isinstance(argv, str) else list(argv)
    for i, word in enumerate(words):
        if word in ("src.sft", "-msrc.sft") or word.endswith("sft.py"):
            return words[i + 1:]
    return words


def parse_firered_args(argv: str | Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """The FireRed flags, and the words no FireRed flag takes; a UserError for a missing or bad value."""
    return _parser().parse_known_args(_script_args(argv))


def _count_weights(text: str) -> dict[int, float]:
    """'0=1,1=1,2=1,3=0' -> {0: 1.0, 1: 1.0, 2: 1.0, 3: 0.0}."""
    from editkit.data.tools import parse_weights

    weights = parse_weights(text, "--train_src_img_num_weights")
    bad = [key for key in weights if not key.isdigit()]
    if bad:
        raise UserError(f"--train_src_img_num_weights {text!r}: {bad[0]!r} is not a number of source images")
    return {int(key): value for key, value in weights.items()}


def _task_records(folder: Path) -> list:
    """Every record of a task folder's .jsonl files (sorted), ids made unique across the files."""
    from editkit.data.manifest import read_manifest

    records, seen = [], set()
    for file in sorted(p for p in folder.glob("*.jsonl") if not p.name.startswith(".")):
        for record in read_manifest(file, format="pairs", fields={"target_image": TARGET_FIELD}):
            base, n = (record.id if record.id not in seen else f"{file.stem}-{record.id}"), 1
            record.id = base
            while record.id in seen:
                n += 1
                record.id = f"{base}-{n}"
            seen.add(record.id)
            records.append(record)
    return records


def _tasks(meta_dir: Path) -> dict[str, list]:
    if not meta_dir.is_dir():
        raise UserError(f"--train_data_meta_dir {meta_dir}: not a folder; give the folder whose sub-folders are tasks")
    tasks = {sub.name: _task_records(sub) for sub in sorted(meta_dir.iterdir())
             if sub.is_dir() and not sub.name.startswith(".")}
    tasks = {name: records for name, records in tasks.items() if records}
    if not tasks:
        raise UserError(f"--train_data_meta_dir {meta_dir}: no sub-folder holds .jsonl records")
    return tasks


def mixture_weights(task_weights: dict[str, float], count_weights: dict[int, float],
                    counts: dict[str, set[int]]) -> dict[tuple[str, int], float]:
    """Weight of each (task, source count) manifest so that editkit's mixing draws like FireRed:
    P(k) = w_k / sum w, P(task | k) proportional to w_task among the tasks with k-source records."""
    out = {}
    for k, w_k in count_weights.items():
        having = {t: w for t, w in task_weights.items() if w > 0 and k in counts.get(t, set())}
        for task, w_t in having.items():
            if w_k > 0:
                out[(task, k)] = w_k * w_t / sum(having.values())
    return out


def convert_firered_args(argv: str | Sequence[str], out_dir: str | os.PathLike) -> tuple[dict, list[str]]:
    """The editkit config (a dict `validate_config` takes) of a FireRed command line, with its
    manifests and config.yaml written into `out_dir`; and the notes on what was not carried over."""
    import yaml

    from editkit.data.manifest import write_manifest
    from editkit.data.tools import parse_weights, plain_name

    args, extra = parse_firered_args(argv)
    notes = [f"unknown word(s) left out: {' '.join(extra)}"] if extra else []
    notes += [_FLAG_NOTES[flag] for flag in _FLAG_NOTES if getattr(args, flag) is not None]
    if args.enable_inverse and args.disable_inverse:
        raise UserError("FireRed command line: --enable_inverse and --disable_inverse contradict; give one")
    out = Path(out_dir)
    tasks = _tasks(Path(args.train_data_meta_dir))
    task_weights = ({name: 1.0 for name in tasks} if not args.train_data_weights
                    else parse_weights(args.train_data_weights, "--train_data_weights"))
    unknown = sorted(set(task_weights) - set(tasks))
    if unknown:
        notes.append(f"--train_data_weights names {', '.join(unknown)}, not sub-folders of the meta folder: left out")
    unweighted = sorted(set(tasks) - set(task_weights))
    if unweighted:
        notes.append(f"tasks without a weight are not trained on (as in FireRed): {', '.join(unweighted)}")
    count_weights = {0: 1.0} if args.t2i_mode else _count_weights(args.train_src_img_num_weights)
    counts = {name: {len(r.sources) for r in records} for name, records in tasks.items()}
    weights = mixture_weights({t: w for t, w in task_weights.items() if t in tasks}, count_weights, counts)
    drawn = {k for _, k in weights}
    idle = sorted(k for k, w in count_weights.items() if w > 0 and k not in drawn)
    if idle:
        notes.append(f"no task has records with {idle} source image(s): those counts are not drawn")
    if not weights:
        raise UserError(f"FireRed command line: no task has records with a source count of positive weight "
                        f"({args.train_src_img_num_weights}); check the weights and the meta folder")
    train = []
    for (task, k), weight in sorted(weights.items()):
        name = plain_name(f"{task}-k{k}", "task folder")
        path = write_manifest([r for r in tasks[task] if len(r.sources) == k], out / "manifests" / f"{name}.jsonl")
        train.append({"manifest": str(path.absolute()), "weight": weight, "name": name})
    every = [r for records in tasks.values() for r in records]
    config = {
        "model": args.pretrained_model_name_or_path,
        **({"transformer": args.transformer_path} if args.transformer_path else {}),
        **({"vae_folder": args.vae_path} if args.vae_path else {}),
        "output_dir": args.output_dir,
        "seed": args.seed or 0,
        "data": {"train": train, "batch_size": args.train_batch_size, "area": args.image_sample_size ** 2,
                 "instruction": "mixed" if all(r.instruction_cn for r in every) else "en",
                 "inverse_probability": INVERSE_SHARE if args.enable_inverse else 0.0},
        "train": {"mode": "lora" if args.use_peft_lora else "full",
                  "lora": {"rank": args.lora_r, "alpha": float(args.lora_alpha), "dropout": args.lora_dropout,
                           "targets": [t.strip() for t in args.lora_target_modules.split(",") if t.strip()]},
                  "unfreeze": list(args.trainable_modules or []),
                  "gradient_checkpointing": args.gradient_checkpointing},
        "objective": {"text_dropout": TEXT_DROP},
        "optim": {"lr": args.learning_rate, "weight_decay": args.adam_weight_decay,
                  "betas": [args.adam_beta1, args.adam_beta2], "eps": args.adam_epsilon,
                  "max_grad_norm": args.max_grad_norm, "schedule": args.lr_scheduler,
                  "warmup_steps": args.lr_warmup_steps},
        "loop": {"grad_accum": args.gradient_accumulation_steps, "checkpoint_every": args.checkpointing_steps,
                 "mixed_precision": args.mixed_precision or "auto",
                 "wandb": args.report_to in ("wandb", "all"), "tensorboard": args.report_to in ("tensorboard", "all"),
                 **({"max_steps": args.max_train_steps} if args.max_train_steps else {}),
                 **({"keep_last": args.checkpoints_total_limit} if args.checkpoints_total_limit else {})},
    }
    if args.weighting_scheme == "logit_normal":
        config["objective"]["timesteps"] = {"sampling": "logit_normal", "mean": args.logit_mean, "std": args.logit_std}
    elif args.weighting_scheme != "none":
        notes.append(f"--weighting_scheme {args.weighting_scheme}: editkit's timestep sampling is "
                     "objective.timesteps (uniform, logit_normal, shifted, discrete)")
    if not args.max_train_steps:
        notes.append("--max_train_steps not given: set loop.max_steps (editkit counts steps, not epochs)")
    if args.image_sample_size:
        notes.append(f"--image_sample_size {args.image_sample_size}: editkit trains at aspect-ratio buckets of "
                     f"about {args.image_sample_size}² pixels (data.area) instead of square crops")
    header = "".join(f"# {line}\n" for line in ["editkit config converted from a FireRed command line", *notes])
    from editkit.utils.atomic import write_text

    write_text(out / "config.yaml", header + yaml.safe_dump(config, sort_keys=False))
    return config, notes
