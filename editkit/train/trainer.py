"""The training loop shared by every stage: accelerate, accumulation, clipping, checkpoints, logs.

A stage is an editkit.train.task.Task: the trained module, its batches, loss, validation,
previews and exports. `_train` reads top to bottom: check the output folder and the checkpoint
to resume, build the task, prepare the optimiser with accelerate (restoring a checkpoint), then
step (`train_step`), log, validate / preview, save (`CheckpointWriter`), and finish (final/).
The loop runs under `accelerate launch` / torchrun as well as alone.

One step = one optimiser update = `loop.grad_accum` micro-batches. Randomness: the task draws
timesteps, noise and dropout from a CPU generator seeded by (seed, rank); the checkpoint keeps
it, the global RNGs of every rank and the sampler position, so a resumed run repeats an
uninterrupted one step for step.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from editkit.errors import UserError
from editkit.train import checkpoint as ckpt
from editkit.train import sharded as shard
from editkit.train.config import TrainConfig, max_steps_resumable, trajectory_settings
from editkit.train.optim import build_optimizer, build_schedule, clips_gradients, eval_mode, train_mode
from editkit.train.task import Task
from editkit.train.trainable import load_trainable_state_dict, trainable_state_dict
from editkit.utils.fingerprint import FILE_NAME as FINGERPRINT
from editkit.utils.fingerprint import claim_folder, digest, folder_stamp

if TYPE_CHECKING:
    from accelerate import Accelerator

MEMORY_HINT = ("lower memory with train.gradient_checkpointing=true, a smaller data.batch_size (raise "
               "loop.grad_accum to keep the effective batch), a smaller data.area or train.lora.rank, "
               "loop.mixed_precision=bf16, train.mode=lora, or launch with configs/accelerate/fsdp2.yaml "
               "or deepspeed_zero3.yaml to shard the model over several GPUs")


class NonFiniteLoss(UserError):
    pass


def _mixed_precision(cfg: TrainConfig) -> str:
    mp = cfg.loop.mixed_precision
    if mp == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return mp


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # The unused last-block text modules are frozen (editkit.train.trainable), so DDP needs no
    # find_unused_parameters.
    # cpu=True lets accelerate form a gloo process group from torchrun's variables without a GPU
    return Accelerator(mixed_precision=_mixed_precision(cfg), cpu=not torch.cuda.is_available(),
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])


STAGES = {
    "edit": ("editkit.train.edit_task", "EditTask"),
    "vae": ("editkit.train.vae_stage", "VaeTask"),
    "rgba_vae": ("editkit.train.rgba_vae_stage", "RgbaVaeTask"),
    "decompose": ("editkit.train.decompose_task", "DecomposeTask"),
}
"""Training stage name (`stage:` in a config) -> the module and class of its Task."""


def task_class(stage: str) -> type[Task]:
    module, name = STAGES[stage]
    return getattr(importlib.import_module(module), name)


def build_task(cfg: TrainConfig, accelerator) -> Task:
    return task_class(cfg.stage)(cfg, accelerator.device, accelerator.process_index, accelerator.num_processes)


@contextlib.contextmanager
def _plain_model_init(accelerator):
    """Build the models unpartitioned under DeepSpeed unless zero3_init_flag asks otherwise.

    accelerate registers its DeepSpeed config with transformers whatever zero3_init_flag says, and
    under ZeRO-3 transformers then builds every model inside deepspeed.zero.Init (parameters
    partitioned at construction), which breaks the frozen VLM. DeepSpeed partitions the trained
    transformer when accelerate prepares it.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or plugin.zero3_init_flag:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def run_fingerprint(cfg: TrainConfig) -> dict:
    """What decides the trained weights (editkit.utils.fingerprint): the settings a resume may not
    change (editkit.train.config.trajectory_settings), with the model, caches and manifests by
    identity (file stamps, shard checksums, record stamps) instead of by path."""
    from editkit.train.edit_task import open_cache

    inputs = trajectory_settings(cfg)
    inputs["model"] = folder_stamp(cfg.model)
    inputs["transformer"] = folder_stamp(cfg.transformer) if cfg.transformer else None
    for key in ("vae_folder", "text_encoder_folder"):  # by content, as the transformer
        inputs[key] = folder_stamp(getattr(cfg, key)) if getattr(cfg, key) else None
    inputs["data.cache"] = [_cache_identity(open_cache(c, cfg.data)) for c in cfg.data.cache]
    inputs.update(task_class(cfg.stage).data_identity(cfg))
    return inputs


def _cache_identity(reader) -> str:
    """A cache by content: its shards' sha256 and its record index."""
    return digest({"shards": reader.shards, "records": reader.records})


def _check_output(out: Path, fingerprint: dict, resume: str | None, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder (every rank, before anything is written)."""
    if overwrite:
        if resume is not None:
            raise UserError("give --resume (continue the run in output_dir) or --overwrite (delete it and start "
                            "again), not both")
        return
    earlier = ckpt.earlier_outputs(out)
    if not earlier:
        return
    if resume is None:
        raise UserError(f"{out}: holds an earlier run ({', '.join(earlier[:3])}); pass --resume latest to continue "
                        "it, --overwrite to delete its outputs and start again, or choose another output_dir")
    if not (out / FINGERPRINT).is_file():
        raise UserError(f"{out}: holds a run without {FINGERPRINT} (an older editkit), so its settings cannot be "
                        "checked; pass --overwrite to start again, or choose another output_dir")
    claim_folder(out, "train", fingerprint, write=False)


def _check_checkpoint(cfg: TrainConfig, path: Path, saved: dict, run_digest: str) -> None:
    """A checkpoint (maybe from another folder) resumes only a run of the same fingerprint."""
    if saved.get("fingerprint") != run_digest:
        raise UserError(f"{path}: made by a run with other settings or inputs (or by an older editkit) than this "
                        "config; resume a checkpoint of this run, or train into a new output_dir without --resume")
    if saved["step"] > cfg.loop.max_steps:
        raise UserError(f"{path}: is at step {saved['step']}, past loop.max_steps={cfg.loop.max_steps}; "
                        f"give loop.max_steps={saved['step']} or more")


def _finished(cfg: TrainConfig, out: Path, path: Path, step: int, final: Path) -> dict:
    """The summary of resuming a run that has already reached loop.max_steps: nothing to do."""
    more = ("raise loop.max_steps to train further" if max_steps_resumable(cfg) else
            f"its {cfg.optim.schedule} schedule depends on loop.max_steps, so train longer in a new output_dir")
    return {"steps": step, "resumed_from": str(path), "seconds": 0.0, "steps_run": 0, "output_dir": str(out),
            "final": str(final),
            "note": f"{out}: already trained to loop.max_steps={step} (weights in {final}); nothing to do ({more})"}


def _prepare_output(cfg: TrainConfig, accelerator, out: Path, fingerprint: dict, overwrite: bool) -> None:
    """Record the fingerprint (clearing old outputs with --overwrite), drop what a killed run left
    half-written, write the resolved config: on the main process, once every rank has checked."""
    import yaml

    from editkit.utils.atomic import write_text

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        claim_folder(out, "train", fingerprint, overwrite=overwrite, clear=lambda: ckpt.clear_outputs(out))
        ckpt.remove_stale_temp(out)
        write_text(out / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    accelerator.wait_for_everyone()


def train(cfg: TrainConfig, resume: str | None = None, stop_after: int | None = None,
          progress: bool = True, overwrite: bool = False) -> dict:
    """Run (or resume) a training job; returns a summary. `stop_after` ends early (tests a kill).

    A folder holding an earlier run is refused unless `resume` ("latest" or a checkpoint folder)
    continues it, with the same fingerprint, or `overwrite` deletes its outputs first.
    """
    cfg.loop.mixed_precision = _mixed_precision(cfg)
    accelerator = make_accelerator(cfg)
    try:
        return _train(cfg, accelerator, resume, overwrite, stop_after, progress)
    except torch.OutOfMemoryError:
        raise UserError(f"out of memory on {accelerator.device}; {MEMORY_HINT}") from None


def _train(cfg: TrainConfig, accelerator, resume, overwrite, stop_after, progress) -> dict:
    """Set up (or resume) the run, then step until loop.max_steps (or `stop_after`)."""
    from accelerate.utils import set_seed

    set_seed(cfg.seed)  # identical model init on every rank
    out = Path(cfg.output_dir)
    ckpt_root = out / "checkpoints"
    fingerprint = run_fingerprint(cfg)
    run_digest = digest(fingerprint)
    _check_output(out, fingerprint, resume, overwrite)
    resume_path = ckpt.resolve_resume(resume, ckpt_root)
    if resume_path is not None:
        done = _check_resume(cfg, accelerator, out, resume_path, run_digest)
        if done is not None:
            return done
    _prepare_output(cfg, accelerator, out, fingerprint, overwrite)
    with _plain_model_init(accelerator):
        task = build_task(cfg, accelerator)
    saved = ckpt.load_checkpoint(resume_path) if resume_path is not None else None
    run = _prepare_training(cfg, accelerator, task, saved, resume_path)
    step = _restore(run, saved, resume_path) if saved is not None else 0
    logger = _start_logging(cfg, run, out, resume_path, step)
    writer = CheckpointWriter(ckpt_root, cfg.stage, run_digest, cfg.loop.keep_last, cfg.loop.export_lora)

    # imported only here, as always: importing it (rich) draws from `random`, whose state checkpoints keep
    from editkit.utils.progress import make_progress

    bar = make_progress("steps", disable=not (progress and accelerator.is_main_process))
    start, t0 = step, time.time()
    step_start = time.perf_counter()
    with bar:
        bar_task = bar.add_task("train", total=cfg.loop.max_steps, completed=step, status="")
        while step < cfg.loop.max_steps:
            result = train_step(cfg, run, step, ckpt_root)
            step += 1
            step_seconds = time.perf_counter() - step_start  # train_step's last gather waited for every rank
            row = _metrics_row(cfg, run, step, result, step_seconds)
            bar.update(bar_task, completed=step, status=f"loss {result.loss:.4f}")
            row.update(validation_columns(_periodic(cfg, run, logger, out, step)))
            if logger is not None and row:
                logger.log(step, row)  # one row per step, validation included
            if step % cfg.loop.checkpoint_every == 0 or step == cfg.loop.max_steps:
                writer.save(run, step)
            if stop_after is not None and step >= stop_after:
                break
            step_start = time.perf_counter()
    final = _finish(cfg, run, out, ckpt_root, step)
    if logger is not None:
        logger.close()
    return {"steps": step, "resumed_from": str(resume_path) if resume_path else None,
            "seconds": time.time() - t0, "steps_run": step - start, "output_dir": str(out),
            "final": str(final) if final else None}


# ----- setup -------------------------------------------------------------------------------------

def _check_resume(cfg: TrainConfig, accelerator, out: Path, path: Path, run_digest: str) -> dict | None:
    """Check the checkpoint a resume starts from; the summary when the run has nothing left to do
    (at loop.max_steps with final/ written, or a sharded run, whose last checkpoint is its result)."""
    saved = ckpt.read_state(path)
    _check_checkpoint(cfg, path, saved, run_digest)
    sharded_run = shard.kind(accelerator) is not None
    if saved["step"] == cfg.loop.max_steps and ((out / "final").is_dir() or sharded_run):
        return _finished(cfg, out, path, saved["step"], path if sharded_run else out / "final")
    return None


@dataclass
class Training:
    """The prepared pieces the loop steps: the task, its module as accelerate wrapped it, the
    optimiser and schedule, the trainable parameters and this rank's CPU generator."""

    accelerator: Accelerator
    task: Task
    wrapped: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    params: list[torch.nn.Parameter]
    generator: torch.Generator
    sharded: str | None
    """"fsdp" / "deepspeed" when each rank holds a shard of the optimiser state, else None."""


def _prepare_training(cfg: TrainConfig, accelerator, task: Task, saved: dict | None,
                      resume_path: Path | None) -> Training:
    """The optimiser and schedule over the task's trainable parameters, all prepared by accelerate;
    a resumed run's weights go in first (before accelerate wraps, and under FSDP shards, the module)."""
    module = task.module
    if saved is not None:
        load_trainable_state_dict(module, saved["trainable"], str(resume_path))
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.optim)
    schedule = build_schedule(optimizer, cfg.optim, cfg.loop.max_steps)
    module.train()
    sharded = _configure_sharding(cfg, accelerator)
    wrapped, optimizer = accelerator.prepare(module, optimizer)
    params = [p for p in wrapped.parameters() if p.requires_grad]  # FSDP2 swaps in sharded parameters
    task.set_module(wrapped)
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + accelerator.process_index)
    return Training(accelerator, task, wrapped, optimizer, schedule, params, generator, sharded)


def _restore(run: Training, saved: dict, path: Path) -> int:
    """Put a checkpoint's optimiser, schedule, RNG and sampler states back; returns its step."""
    accelerator = run.accelerator
    ranks = saved["rng"]
    if len(ranks) != accelerator.num_processes:
        raise UserError(f"{path}: saved by {len(ranks)} processes, resumed with "
                        f"{accelerator.num_processes}; resume with the same number of processes")
    saved_by = saved["state"].get("sharding")
    if saved_by != run.sharded:
        raise UserError(f"{path}: saved by a {saved_by or 'unsharded'} run, resumed as "
                        f"{run.sharded or 'unsharded'}; resume with the launch config the run was started with")
    if run.sharded:
        shard.load_optimizer(accelerator, run.wrapped, run.optimizer, path / shard.FOLDER)
    elif saved["optimizer"]:
        run.optimizer.load_state_dict(saved["optimizer"])
    run.schedule.load_state_dict(saved["scheduler"])
    ckpt.restore_rng(ranks[accelerator.process_index], run.generator)
    run.task.sampler.load_state_dict(saved["state"]["sampler"][accelerator.process_index])
    return saved["state"]["step"]


def _start_logging(cfg: TrainConfig, run: Training, out: Path, resume_path: Path | None, step: int):
    """run.json, and the metrics logger (continuing metrics.csv after `step`): on the main process;
    returns the logger, None on the other ranks."""
    accelerator = run.accelerator
    if not accelerator.is_main_process:
        return None
    from editkit.train.metrics import MetricsLogger
    from editkit.utils.runinfo import write_run_manifest

    write_run_manifest(out, f"train ({cfg.stage})", cfg.model_dump(mode="json"), seed=cfg.seed,
                       resumed_from=str(resume_path) if resume_path else None,
                       world_size=accelerator.num_processes, **run.task.info)
    return MetricsLogger(out, cfg.loop.tensorboard, cfg.loop.wandb, run_name=out.name,
                         config=cfg.model_dump(mode="json"), resume_step=step)


def _configure_sharding(cfg: TrainConfig, accelerator) -> str | None:
    """DeepSpeed needs batch size, accumulation and clipping in its own config.

    Returns "fsdp" / "deepspeed" when each rank holds a shard of the optimiser state (checkpoints
    then go through editkit.train.sharded), else None.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
        ds["gradient_accumulation_steps"] = cfg.loop.grad_accum
        ds["train_batch_size"] = cfg.data.batch_size * cfg.loop.grad_accum * accelerator.num_processes
        ds["gradient_clipping"] = cfg.optim.max_grad_norm if clips_gradients(cfg.optim) else 0.0
    return shard.kind(accelerator)


# ----- one step ----------------------------------------------------------------------------------

@dataclass
class StepResult:
    loss: float
    """The step's loss: the mean over its micro-batches and over the ranks."""
    parts: dict[str, float]
    """The loss parts (task-defined) of this rank, averaged over the micro-batches."""
    grad_norm: torch.Tensor | float | None
    """The gradient norm before clipping; None without clipping."""


def train_step(cfg: TrainConfig, run: Training, step: int, ckpt_root: Path) -> StepResult:
    """One optimiser update from `loop.grad_accum` micro-batches (DDP syncs on the last); stops
    every rank with NonFiniteLoss when any rank's loss is not finite. `step` is the count done."""
    from accelerate.utils import DistributedType

    accelerator, task, accum = run.accelerator, run.task, cfg.loop.grad_accum
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    train_mode(run.optimizer)
    parts: dict[str, float] = {}
    total = 0.0
    for micro in range(accum):
        batch = task.next_batch(run.generator)
        sync = micro == accum - 1
        with accelerator.no_sync(run.wrapped) if not sync else contextlib.nullcontext():
            with accelerator.autocast():
                out_loss = task.loss(batch, run.generator)
            loss = out_loss.loss if deepspeed else out_loss.loss / accum  # DeepSpeed divides by its own accumulation
            _check_finite(loss, accelerator, step, ckpt_root)
            accelerator.backward(loss)
        total += out_loss.loss.item() / accum
        for k, v in out_loss.parts.items():
            parts[k] = parts.get(k, 0.0) + v / accum
    grad_norm = None
    if clips_gradients(cfg.optim):
        grad_norm = accelerator.clip_grad_norm_(run.params, cfg.optim.max_grad_norm)
    run.optimizer.step()
    run.schedule.step()
    run.optimizer.zero_grad(set_to_none=True)
    total = accelerator.gather(torch.tensor([total], device=accelerator.device)).mean().item()  # all ranks
    return StepResult(total, parts, grad_norm)


def _check_finite(loss: torch.Tensor, accelerator, step: int, ckpt_root: Path) -> None:
    """Raise NonFiniteLoss on every rank when the loss of any rank is NaN or infinite."""
    finite = torch.tensor([1.0 if math.isfinite(loss.item()) else 0.0], device=accelerator.device)
    if accelerator.gather(finite).min().item() == 0:
        raise NonFiniteLoss(
            f"step {step + 1}: the loss is {loss.item()} (not finite); the run stopped. "
            f"Last good checkpoint: {ckpt.latest_checkpoint(ckpt_root) or 'none'}. "
            "Lower optim.lr, use loop.mixed_precision=bf16 instead of fp16, or check the data")


# ----- logging, validation, previews -------------------------------------------------------------

def _metrics_row(cfg: TrainConfig, run: Training, step: int, result: StepResult, step_seconds: float) -> dict:
    """The metrics.csv row of a step (empty between loop.log_every steps)."""
    if step % cfg.loop.log_every:
        return {}
    row = {"loss": result.loss, "lr": run.schedule.get_last_lr()[0], "step_seconds": step_seconds, **result.parts}
    if result.grad_norm is not None:
        row["grad_norm"] = float(result.grad_norm)
    return row


def validation_columns(value: float | dict[str, float] | None) -> dict[str, float]:
    """metrics.csv columns of what `Task.validation_loss` returned: val_loss, or val_<name> for each named value."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return {f"val_{name}": v for name, v in value.items()}
    return {"val_loss": value}


def _periodic(cfg: TrainConfig, run: Training, logger, out: Path, step: int) -> float | dict[str, float] | None:
    """Previews and (returned) the validation loss or metrics, on the main process, with
    schedule-free weights in eval mode."""
    do_val = cfg.loop.validate_every and step % cfg.loop.validate_every == 0
    do_preview = cfg.loop.preview_every and step % cfg.loop.preview_every == 0
    if not (do_val or do_preview):
        return None
    accelerator, task = run.accelerator, run.task
    value = None
    eval_mode(run.optimizer)
    module = accelerator.unwrap_model(run.wrapped)
    was_training = module.training
    module.eval()
    task.set_module(module)  # no DDP collectives while only the main process runs the model
    if accelerator.is_main_process:
        if do_val:
            with accelerator.autocast():
                value = task.validation_loss(cfg.seed)
        if do_preview:
            path = task.preview(out / "previews" / f"step-{step:06d}.png", cfg.loop.preview_steps,
                                cfg.loop.preview_cfg)
            if path is not None:
                logger.image("preview", path, step)
    module.train(was_training)
    task.set_module(run.wrapped)
    accelerator.wait_for_everyone()
    train_mode(run.optimizer)
    return value


# ----- checkpoints and the end -------------------------------------------------------------------

@dataclass(frozen=True)
class CheckpointWriter:
    """Writes a run's checkpoints (editkit.train.checkpoint); `save` runs on every rank.

    The RNG and sampler states are gathered from every rank. Unsharded, the main process writes
    the module's trainable weights and optimiser state; sharded (FSDP2 / DeepSpeed), every rank
    writes its optimiser shard into a staging folder and the trainable weights are gathered.
    `export` adds the task's deployable files (`export/`) to every checkpoint.
    """

    root: Path
    stage: str
    run_digest: str
    keep_last: int
    export: bool

    def save(self, run: Training, step: int) -> None:
        from accelerate.utils import gather_object

        accelerator, task = run.accelerator, run.task
        eval_mode(run.optimizer)
        rng = [_from_bytes(b) for b in gather_object([_to_bytes(ckpt.capture_rng(run.generator))])]
        samplers = gather_object([task.sampler.state_dict()])
        staging = None
        if run.sharded:
            staging = ckpt.staging_dir(self.root, step)
            if accelerator.is_main_process:
                ckpt.empty_dir(staging)
            accelerator.wait_for_everyone()
            shard.save_optimizer(accelerator, run.wrapped, run.optimizer, staging / shard.FOLDER)
            trainable = shard.trainable_state(accelerator, run.wrapped)
            export = lambda folder: task.export_gathered(trainable, folder, step)  # noqa: E731
        else:
            unwrapped = accelerator.unwrap_model(run.wrapped)
            trainable = trainable_state_dict(unwrapped)
            export = lambda folder: task.export(unwrapped, folder, step)  # noqa: E731
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {"sampler": samplers, "stage": self.stage, "sharding": run.sharded, "fingerprint": self.run_digest}
            ckpt.save_checkpoint(self.root, step, trainable, {} if run.sharded else run.optimizer.state_dict(),
                                 run.schedule.state_dict(), rng, state, self.keep_last,
                                 extra_files={"export": export} if self.export else None, staging=staging)
        accelerator.wait_for_everyone()
        train_mode(run.optimizer)


def _finish(cfg: TrainConfig, run: Training, out: Path, ckpt_root: Path, step: int) -> Path | None:
    """Where the trained weights are once the run reached loop.max_steps: final/ (written here,
    atomically), or for a sharded run its last checkpoint; None before loop.max_steps."""
    accelerator = run.accelerator
    final = None
    if step == cfg.loop.max_steps and accelerator.is_main_process:
        if run.sharded:
            final = ckpt.latest_checkpoint(ckpt_root)
            what = "export/ (LoRA files) and trainable.safetensors" \
                if cfg.train.mode == "lora" and cfg.stage == "edit" else "trainable.safetensors"
            print(f"sharded run: the trained weights are in {final}: {what}", file=sys.stderr)
        else:
            from editkit.utils.atomic import atomic_dir

            eval_mode(run.optimizer)
            final = out / "final"
            with atomic_dir(final) as tmp:
                run.task.export(accelerator.unwrap_model(run.wrapped), tmp, step)
    accelerator.wait_for_everyone()
    return final


def _to_bytes(obj) -> bytes:
    """Tensors travel between ranks as torch.save bytes (pickled tensors do not unpickle under gloo)."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(data: bytes):
    import io

    return torch.load(io.BytesIO(data), weights_only=True)
