"""The training loop shared by every stage: accelerate, accumulation, clipping, checkpoints, logs.

A stage ("task") gives the trained module, `next_batch(generator)`, `loss(batch, generator)`,
optional `validation_loss` / `preview`, `export(module, folder, step)` and a `sampler` with
state_dict. The loop runs under `accelerate launch` / torchrun as well as alone.

One step = one optimiser update = `loop.grad_accum` micro-batches. Randomness: the task draws
timesteps, noise and dropout from a CPU generator seeded by (seed, rank); the checkpoint keeps
it, the global RNGs of every rank and the sampler position, so a resumed run repeats an
uninterrupted one step for step.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path

import torch

from editkit.errors import UserError
from editkit.train import checkpoint as ckpt
from editkit.train import sharded as shard
from editkit.train.config import TrainConfig, max_steps_resumable, trajectory_settings
from editkit.train.optim import build_optimizer, build_schedule, clips_gradients, eval_mode, train_mode
from editkit.train.trainable import load_trainable_state_dict, trainable_state_dict
from editkit.utils.fingerprint import FILE_NAME as FINGERPRINT
from editkit.utils.fingerprint import claim_folder, digest, folder_stamp, records_stamp

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


def build_task(cfg: TrainConfig, accelerator):
    if cfg.stage == "vae":
        from editkit.train.vae_stage import VaeTask

        return VaeTask(cfg, accelerator.device, accelerator.process_index, accelerator.num_processes)
    from editkit.train.edit_task import EditTask

    return EditTask(cfg, accelerator.device, accelerator.process_index, accelerator.num_processes)


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
    from editkit.train.edit_task import open_cache, read_records

    inputs = trajectory_settings(cfg)
    inputs["model"] = folder_stamp(cfg.model)
    inputs["transformer"] = folder_stamp(cfg.transformer) if cfg.transformer else None
    inputs["data.cache"] = [_cache_identity(open_cache(c, cfg.data)) for c in cfg.data.cache]
    inputs["data.train"] = [{**d.model_dump(), "manifest": records_stamp(read_records(d.manifest, cfg.data.fields))}
                            for d in cfg.data.train]
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
    from accelerate.utils import DistributedType, gather_object, set_seed

    from editkit.utils.runinfo import write_run_manifest

    set_seed(cfg.seed)  # identical model init on every rank
    out = Path(cfg.output_dir)
    ckpt_root = out / "checkpoints"
    fingerprint = run_fingerprint(cfg)
    run_digest = digest(fingerprint)
    _check_output(out, fingerprint, resume, overwrite)
    resume_path = ckpt.resolve_resume(resume, ckpt_root)
    if resume_path is not None:
        saved = ckpt.read_state(resume_path)
        _check_checkpoint(cfg, resume_path, saved, run_digest)
        sharded_run = shard.kind(accelerator) is not None
        if saved["step"] == cfg.loop.max_steps and ((out / "final").is_dir() or sharded_run):
            return _finished(cfg, out, resume_path, saved["step"], resume_path if sharded_run else out / "final")
    _prepare_output(cfg, accelerator, out, fingerprint, overwrite)
    with _plain_model_init(accelerator):
        task = build_task(cfg, accelerator)
    module = task.module
    state = ckpt.load_checkpoint(resume_path) if resume_path is not None else None
    if state is not None:  # weights go in before accelerate wraps (and, under FSDP, shards) the module
        load_trainable_state_dict(module, state["trainable"], str(resume_path))
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.optim)
    schedule = build_schedule(optimizer, cfg.optim, cfg.loop.max_steps)
    module.train()
    sharded = _configure_sharding(cfg, accelerator)
    wrapped, optimizer = accelerator.prepare(module, optimizer)
    params = [p for p in wrapped.parameters() if p.requires_grad]  # FSDP2 swaps in sharded parameters
    task.set_module(wrapped)
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + accelerator.process_index)
    step = 0
    if state is not None:
        ranks = state["rng"]
        if len(ranks) != accelerator.num_processes:
            raise UserError(f"{resume_path}: saved by {len(ranks)} processes, resumed with "
                            f"{accelerator.num_processes}; resume with the same number of processes")
        saved_by = state["state"].get("sharding")
        if saved_by != sharded:
            raise UserError(f"{resume_path}: saved by a {saved_by or 'unsharded'} run, resumed as "
                            f"{sharded or 'unsharded'}; resume with the launch config the run was started with")
        if sharded:
            shard.load_optimizer(accelerator, wrapped, optimizer, resume_path / shard.FOLDER)
        elif state["optimizer"]:
            optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["scheduler"])
        ckpt.restore_rng(ranks[accelerator.process_index], generator)
        task.sampler.load_state_dict(state["state"]["sampler"][accelerator.process_index])
        step = state["state"]["step"]
    if accelerator.is_main_process:
        write_run_manifest(out, f"train ({cfg.stage})", cfg.model_dump(mode="json"), seed=cfg.seed,
                           resumed_from=str(resume_path) if resume_path else None,
                           world_size=accelerator.num_processes, **getattr(task, "info", {}))
    logger = None
    if accelerator.is_main_process:
        from editkit.train.metrics import MetricsLogger

        logger = MetricsLogger(out, cfg.loop.tensorboard, cfg.loop.wandb, run_name=out.name,
                               config=cfg.model_dump(mode="json"), resume_step=step)

    def save(at_step: int) -> None:
        eval_mode(optimizer)
        rng = [_from_bytes(b) for b in gather_object([_to_bytes(ckpt.capture_rng(generator))])]
        samplers = gather_object([task.sampler.state_dict()])
        staging = None
        if sharded:  # every rank writes its optimiser shard; the main process gathers the trainable weights
            staging = ckpt.staging_dir(ckpt_root, at_step)
            if accelerator.is_main_process:
                ckpt.empty_dir(staging)
            accelerator.wait_for_everyone()
            shard.save_optimizer(accelerator, wrapped, optimizer, staging / shard.FOLDER)
            trainable = shard.trainable_state(accelerator, wrapped)
            exporter = getattr(task, "export_gathered", None)
            export = (lambda folder: exporter(trainable, folder, at_step)) if exporter else None
        else:
            unwrapped = accelerator.unwrap_model(wrapped)
            trainable = trainable_state_dict(unwrapped)
            export = lambda folder: task.export(unwrapped, folder, at_step)  # noqa: E731
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            ckpt.save_checkpoint(
                ckpt_root, at_step, trainable, {} if sharded else optimizer.state_dict(), schedule.state_dict(), rng,
                {"sampler": samplers, "stage": cfg.stage, "sharding": sharded, "fingerprint": run_digest},
                cfg.loop.keep_last,
                extra_files={"export": export} if cfg.loop.export_lora and export else None, staging=staging)
        accelerator.wait_for_everyone()
        train_mode(optimizer)

    from editkit.utils.progress import make_progress

    bar = make_progress("steps", disable=not (progress and accelerator.is_main_process))
    clip = clips_gradients(cfg.optim)
    start, t0 = step, time.time()
    step_start = time.perf_counter()
    with bar:
        task_id = bar.add_task("train", total=cfg.loop.max_steps, completed=step, status="")
        while step < cfg.loop.max_steps:
            train_mode(optimizer)
            parts: dict[str, float] = {}
            total = 0.0
            for micro in range(cfg.loop.grad_accum):
                batch = task.next_batch(generator)
                sync = micro == cfg.loop.grad_accum - 1
                with accelerator.no_sync(wrapped) if not sync else contextlib.nullcontext():
                    with accelerator.autocast():
                        out_loss = task.loss(batch, generator)
                    # DeepSpeed divides by its own gradient_accumulation_steps
                    loss = out_loss.loss if accelerator.distributed_type == DistributedType.DEEPSPEED \
                        else out_loss.loss / cfg.loop.grad_accum
                    finite = torch.tensor([1.0 if math.isfinite(loss.item()) else 0.0], device=accelerator.device)
                    if accelerator.gather(finite).min().item() == 0:
                        raise NonFiniteLoss(
                            f"step {step + 1}: the loss is {loss.item()} (not finite); the run stopped. "
                            f"Last good checkpoint: {ckpt.latest_checkpoint(ckpt_root) or 'none'}. "
                            "Lower optim.lr, use loop.mixed_precision=bf16 instead of fp16, or check the data")
                    accelerator.backward(loss)
                total += out_loss.loss.item() / cfg.loop.grad_accum
                for k, v in out_loss.parts.items():
                    parts[k] = parts.get(k, 0.0) + v / cfg.loop.grad_accum
            grad_norm = None
            if clip:
                grad_norm = accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            lr = schedule.get_last_lr()[0]
            total = accelerator.gather(torch.tensor([total], device=accelerator.device)).mean().item()  # all ranks
            step_seconds = time.perf_counter() - step_start  # the gather above waited for every rank's step
            row = {}
            if step % cfg.loop.log_every == 0:
                row = {"loss": total, "lr": lr, "step_seconds": step_seconds, **parts}
                if grad_norm is not None:
                    row["grad_norm"] = float(grad_norm)
            bar.update(task_id, completed=step, status=f"loss {total:.4f}")
            val_loss = _periodic(cfg, task, optimizer, accelerator, logger, out, step)
            if val_loss is not None:
                row["val_loss"] = val_loss
            if logger is not None and row:
                logger.log(step, row)  # one row per step, validation included
            if step % cfg.loop.checkpoint_every == 0 or step == cfg.loop.max_steps:
                save(step)
            if stop_after is not None and step >= stop_after:
                break
            step_start = time.perf_counter()
    final = None
    if sharded and step == cfg.loop.max_steps and accelerator.is_main_process:
        final = ckpt.latest_checkpoint(ckpt_root)
        what = "export/ (LoRA files) and trainable.safetensors" if cfg.train.mode == "lora" and cfg.stage == "edit" \
            else "trainable.safetensors"
        print(f"sharded run: the trained weights are in {final}: {what}", file=sys.stderr)
    elif step == cfg.loop.max_steps and accelerator.is_main_process:
        eval_mode(optimizer)
        final = out / "final"
        from editkit.utils.atomic import atomic_dir

        with atomic_dir(final) as tmp:
            task.export(accelerator.unwrap_model(wrapped), tmp, step)
    accelerator.wait_for_everyone()
    if logger is not None:
        logger.close()
    return {"steps": step, "resumed_from": str(resume_path) if resume_path else None,
            "seconds": time.time() - t0, "steps_run": step - start, "output_dir": str(out),
            "final": str(final) if final else None}


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


def _periodic(cfg: TrainConfig, task, optimizer, accelerator, logger, out: Path, step: int) -> float | None:
    """Previews and (returned) the validation loss, on the main process, with schedule-free weights
    in eval mode."""
    do_val = cfg.loop.validate_every and step % cfg.loop.validate_every == 0
    do_preview = cfg.loop.preview_every and step % cfg.loop.preview_every == 0
    if not (do_val or do_preview):
        return None
    value = None
    eval_mode(optimizer)
    module = accelerator.unwrap_model(task.module)
    wrapped = task.module
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
    task.set_module(wrapped)
    accelerator.wait_for_everyone()
    train_mode(optimizer)
    return value


def _to_bytes(obj) -> bytes:
    """Tensors travel between ranks as torch.save bytes (pickled tensors do not unpickle under gloo)."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(data: bytes):
    import io

    return torch.load(io.BytesIO(data), weights_only=True)
