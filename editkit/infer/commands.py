"""`editkit edit`, `editkit chat` and `editkit infer` (thin wrappers)."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from editkit.infer.defaults import NEGATIVE_PROMPT, STEPS, TRUE_CFG_SCALE
from editkit.infer.speed import (
    AttentionOpt,
    CacheThresholdOpt,
    Fp8Opt,
    OffloadOpt,
    SpeedOpt,
    SpeedOptions,
    apply_speed,
    run_settings,
)

ModelOpt = Annotated[str, typer.Option("--model", help="A diffusers-format model folder, or tiny / tiny:<family>.")]
FamilyOpt = Annotated[Optional[str], typer.Option("--family", help="Model family, when the folder does not say.")]
TransformerOpt = Annotated[Optional[Path], typer.Option("--transformer", help="Take the transformer from this folder.")]
VaeOpt = Annotated[Optional[Path], typer.Option("--vae", help="Take the VAE from this folder (a vae/ folder, or a model folder holding one).")]
TextEncoderOpt = Annotated[Optional[Path], typer.Option("--text-encoder", help="Take the text encoder from this folder (a text_encoder/ folder, or a model folder holding one).")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or fp32.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cuda, cuda:1, cpu (default: cuda if available).")]
LoraOpt = Annotated[Optional[list[str]], typer.Option("--lora", help="LoRA file, PATH or PATH:SCALE (repeatable; any key layout).")]
FuseOpt = Annotated[bool, typer.Option("--fuse-lora", help="Merge the LoRAs into the weights (faster sampling).")]
StepsOpt = Annotated[Optional[int], typer.Option("--steps", help=f"Sampling steps (default {STEPS}, or the --preset's).")]
CfgOpt = Annotated[Optional[float], typer.Option("--cfg", help=f"Guidance scale, 1 turns it off: true CFG for Qwen (default {TRUE_CFG_SCALE:g}), embedded guidance for Flux Fill / ACE++ (30), text guidance for InstructPix2Pix (7.5); or the --preset's.")]
ImageCfgOpt = Annotated[Optional[float], typer.Option("--image-cfg", help="Image guidance scale of families that have one (InstructPix2Pix / MagicBrush: default 1.5).")]
PresetOpt = Annotated[str, typer.Option("--preset", help="auto (the Lightning preset a --lora file names, if any), none, lightning-8step or lightning-4step: its steps, CFG 1 and scheduler (give its LoRA with --lora).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Noise seed.")]
NegativeOpt = Annotated[str, typer.Option("--negative", help="Negative prompt for true CFG.")]
SamplerOpt = Annotated[str, typer.Option("--sampler", help="flow (flow matching, true CFG) or bridge (LBM-trained models).")]
FusionOpt = Annotated[str, typer.Option("--fusion", help="off, pixel-mask, latent-mask or latent+pixel-mask (needs a mask; white = edit).")]
FeatherOpt = Annotated[int, typer.Option("--feather", help="Pixel-mask seam width in pixels (0 to 256).")]
WidthOpt = Annotated[Optional[int], typer.Option("--width", help="Output width, a multiple of the model's size multiple (16) up to 4096 (default: the family's area at the source's aspect).")]
ParallelOpt = Annotated[str, typer.Option("--parallel", help="none, cfg (the conditional and negative passes on 2 processes) or ulysses (context parallel over all processes): one edit shared by the processes of a torchrun launch, for latency.")]
HeightOpt = Annotated[Optional[int], typer.Option("--height", help="Output height (as --width).")]
MaskOpt = Annotated[Optional[Path], typer.Option("--mask", help="Mask image, white = edit region (the first source's size).")]
AdapterOpt = Annotated[Optional[Path], typer.Option("--adapter", help="Adapter bundle (adapter.safetensors of a training run with train.extra_modules): its LoRA and extra modules (e.g. the STE).")]
WithoutOpt = Annotated[Optional[list[str]], typer.Option("--without", help="Leave this extra module of the --adapter bundle off, e.g. ste: the ablation from the same bundle (repeatable).")]
RopeFramesOpt = Annotated[Optional[str], typer.Option("--rope-frames", help="own (each condition image at its own RoPE frame, as released) or shared (all at the target's frame); default: the --adapter bundle's, else own.")]


def _loras_and_preset(lora, preset: str, sampler: str = "flow"):
    """The checked `--lora` specs and the sampling preset (`editkit.models.lightning`); a preset
    detected from a LoRA is announced on stderr."""
    from editkit.models.lightning import resolve_preset
    from editkit.models.lora import LoraSpec

    specs = [LoraSpec.parse(s) for s in lora or []]
    chosen, note = resolve_preset(preset, [s.path for s in specs], sampler)
    if note:
        typer.echo(note, err=True)
    return specs, chosen


def _or_preset(value, preset, field: str, default):
    """A sampling setting as given, else the preset's, else the default."""
    if value is not None:
        return value
    return getattr(preset, field) if preset is not None else default


def _adapter_choice(adapter, without, rope_frames, parallel: str = "none"):
    """The checked `--adapter`, `--without` and `--rope-frames` (editkit.models.adapter_bundle.AdapterChoice)."""
    from editkit.errors import UserError
    from editkit.models.adapter_bundle import AdapterChoice

    choice = AdapterChoice.parse(adapter, without, rope_frames)
    if choice.rope_frames == "shared" and parallel == "ulysses":
        raise UserError("--rope-frames shared does not combine with --parallel ulysses; use --parallel cfg or none")
    return choice


def _components(vae, text_encoder) -> dict[str, str]:
    """The --vae / --text-encoder folders given, as `load_model` keywords (also recorded in the outputs' settings)."""
    from editkit.models.loading import component_paths

    return component_paths(vae=vae, text_encoder=text_encoder)


def _mask_image(mask, images):
    """The --mask image (None without one), checked against the first source image's size."""
    from editkit.data.images import load_mask
    from editkit.infer.engine import check_mask_size

    if mask is None:
        return None
    image = load_mask(mask)
    if images:
        check_mask_size(image.size, images[0].size, f"--mask {mask}")
    return image


def _check_mask_use(engine, mask, fusion: str) -> None:
    """A --mask does something only with mask fusion or for a family that fills a mask (Flux Fill)."""
    from editkit.errors import UserError

    if mask is not None and fusion == "off" and not engine.takes_mask():
        raise UserError(f"--mask {mask}: family {engine.model.family.name} uses a mask only for mask fusion; add "
                        "--fusion pixel-mask (or latent-mask, latent+pixel-mask), or leave --mask out")


def _engine(model: str, family, transformer, dtype: str, device, specs, fuse_lora: bool, speed, preset=None,
            parallel: str = "none", single_edit: bool = False, adapter=None, components=None):
    """Load the model into an Engine with the preset's scheduler, the RoPE frame mode, the adapter
    bundle and the LoRAs, then apply the speed switches; device, LoRA, adapter and speed options are
    checked before the slow load. `components` (`_components`) take the VAE / text encoder from other
    folders. Returns the engine and the speed options resolved for its device."""
    from editkit.infer.engine import Engine
    from editkit.models import load_model, rope_frames
    from editkit.models.loading import resolve_dtype
    from editkit.utils import dist

    device = dist.resolve_device(device)
    speed = speed.resolved(device, single_edit)
    dtype = resolve_dtype(dtype, device)
    components = components or {}
    loaded = load_model(model, family=family, transformer=transformer, dtype=dtype, device=device, **components)
    if parallel != "none":
        from editkit.infer.parallel import apply_parallel

        loaded = apply_parallel(loaded, parallel)
    if adapter is not None:
        loaded = rope_frames.view(loaded, adapter.rope_frames)
    engine = Engine(loaded.with_scheduler(preset.scheduler) if preset else loaded,
                    model_name=str(model), transformer_name=str(transformer) if transformer else None,
                    run_settings={**run_settings(speed, preset), **components})
    if adapter is not None and adapter.path:
        engine.load_adapter(adapter.path, adapter.without)
    if specs or (fuse_lora and engine.adapter):
        engine.load_loras(specs, fuse=fuse_lora)
    apply_speed(engine.model, speed)
    return engine, speed


def _step_bar():
    """A progress callback drawing a rich bar over sampling steps."""
    from editkit.utils.progress import make_progress

    progress = make_progress("step")
    state = {}

    def callback(step: int, total: int) -> None:
        if "task" not in state:
            progress.start()
            state["task"] = progress.add_task("edit", total=total, status="")
        progress.update(state["task"], completed=step)
        if step >= total:
            progress.stop()
            state.clear()

    return callback


def edit_command(
    image: Annotated[list[Path], typer.Option("--image", help="Source image (repeat for several).")],
    prompt: Annotated[str, typer.Option("--prompt", help="The edit instruction.")],
    out: Annotated[Path, typer.Option("--out", help="Output image: .png (settings in its text chunk), .jpg/.jpeg/.webp (settings in <out>.json).")],
    model: ModelOpt,
    negative: NegativeOpt = NEGATIVE_PROMPT,
    cfg: CfgOpt = None,
    steps: StepsOpt = None,
    image_cfg: ImageCfgOpt = None,
    preset: PresetOpt = "auto",
    seed: SeedOpt = 0,
    width: WidthOpt = None,
    height: HeightOpt = None,
    mask: MaskOpt = None,
    fusion: FusionOpt = "off",
    feather: FeatherOpt = 8,
    sampler: SamplerOpt = "flow",
    lora: LoraOpt = None,
    fuse_lora: FuseOpt = False,
    adapter: AdapterOpt = None,
    without: WithoutOpt = None,
    rope_frames: RopeFramesOpt = None,
    family: FamilyOpt = None,
    transformer: TransformerOpt = None,
    vae: VaeOpt = None,
    text_encoder: TextEncoderOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
    speed: SpeedOpt = "auto",
    attention: AttentionOpt = "auto",
    fp8: Fp8Opt = "off",
    offload: OffloadOpt = "none",
    cache_threshold: CacheThresholdOpt = None,
    parallel: ParallelOpt = "none",
) -> None:
    """Edit one image (or several source images) with an instruction."""
    from editkit.data.images import load_image
    from editkit.errors import UserError
    from editkit.infer.engine import EditRequest
    from editkit.infer.outputs import check_output_file, save_image

    check_output_file(out)
    speed_options = SpeedOptions(speed, attention, fp8, offload, cache_threshold)
    specs, chosen = _loras_and_preset(lora, preset, sampler)
    images = [load_image(p, "keep") for p in image]  # the engine gives them the model's mode
    mask_image = _mask_image(mask, images)
    request = EditRequest(prompt=prompt, images=images, negative_prompt=negative,
                          true_cfg_scale=_or_preset(cfg, chosen, "true_cfg_scale", None),
                          steps=_or_preset(steps, chosen, "steps", None), seed=seed, width=width, height=height,
                          mask=mask_image, fusion=fusion, feather=feather, sampler=sampler, image_cfg=image_cfg).check()
    if parallel not in ("none", "cfg", "ulysses"):
        raise UserError(f"--parallel {parallel!r}: use none, cfg or ulysses")
    choice = _adapter_choice(adapter, without, rope_frames, parallel)
    engine, speed_options = _engine(model, family, transformer, dtype, device, specs, fuse_lora, speed_options,
                                    chosen, parallel, single_edit=True, adapter=choice,
                                    components=_components(vae, text_encoder))
    _check_mask_use(engine, mask, fusion)
    request = engine.resolve(request)
    result = engine.edit([request], progress=_step_bar())[0]
    from editkit.utils import dist

    if dist.rank() == 0:  # under --parallel every process holds the same image
        save_image(out, result, engine.settings(request))
        typer.echo(f"wrote {out} ({result.width}x{result.height})")


def chat_command(
    image: Annotated[list[Path], typer.Option("--image", help="Image to edit (more: reference images kept every turn).")],
    model: ModelOpt,
    save: Annotated[Optional[Path], typer.Option("--save", help="Session folder (default chat-<time>); rewritten after every turn.")] = None,
    negative: NegativeOpt = NEGATIVE_PROMPT,
    cfg: CfgOpt = None,
    steps: StepsOpt = None,
    image_cfg: ImageCfgOpt = None,
    preset: PresetOpt = "auto",
    seed: SeedOpt = 0,
    width: WidthOpt = None,
    height: HeightOpt = None,
    mask: MaskOpt = None,
    fusion: FusionOpt = "off",
    feather: FeatherOpt = 8,
    sampler: SamplerOpt = "flow",
    lora: LoraOpt = None,
    fuse_lora: FuseOpt = False,
    adapter: AdapterOpt = None,
    without: WithoutOpt = None,
    rope_frames: RopeFramesOpt = None,
    family: FamilyOpt = None,
    transformer: TransformerOpt = None,
    vae: VaeOpt = None,
    text_encoder: TextEncoderOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
    speed: SpeedOpt = "auto",
    attention: AttentionOpt = "auto",
    fp8: Fp8Opt = "off",
    offload: OffloadOpt = "none",
    cache_threshold: CacheThresholdOpt = None,
) -> None:
    """Multi-turn editing: each line is an instruction that edits the last result.

    Commands: /undo (drop the last turn), /save DIR (write the session there too), /quit.
    The session (sources, one PNG per turn, history.json) is saved after every turn. The sampling
    options mean what they mean for `editkit edit`; --mask (drawn on the first source) applies to
    every turn, resized to the image the turn edits.
    """
    from editkit.data.images import load_image
    from editkit.infer.chat import USAGE, run_chat
    from editkit.infer.engine import EditRequest
    from editkit.infer.session import EditSession

    speed_options = SpeedOptions(speed, attention, fp8, offload, cache_threshold)
    specs, chosen = _loras_and_preset(lora, preset, sampler)
    images = [load_image(p, "keep") for p in image]  # the engine gives them the model's mode
    mask_image = _mask_image(mask, images)
    settings = dict(negative_prompt=negative, true_cfg_scale=_or_preset(cfg, chosen, "true_cfg_scale", None),
                    steps=_or_preset(steps, chosen, "steps", None), seed=seed, width=width, height=height,
                    fusion=fusion, feather=feather, sampler=sampler, image_cfg=image_cfg)
    EditRequest(prompt="(each turn's)", images=images, mask=mask_image, **settings).check()  # before the load
    save = save or Path(f"chat-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    choice = _adapter_choice(adapter, without, rope_frames)
    engine, _ = _engine(model, family, transformer, dtype, device, specs, fuse_lora, speed_options, chosen,
                        adapter=choice, components=_components(vae, text_encoder))
    engine.check_size(width, height)
    _check_mask_use(engine, mask, fusion)
    session = EditSession(engine, images, **settings)
    typer.echo(USAGE, err=True)
    run_chat(session, _stdin_lines(session), save, typer.echo, new_progress=_step_bar, mask=mask_image)


def _stdin_lines(session):
    """Lines of stdin, each asked for with a turn prompt when stdin is a terminal."""
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            typer.echo(f"[turn {len(session.history) + 1}]> ", nl=False, err=True)
        line = sys.stdin.readline()
        if not line:
            return
        yield line


def infer_command(
    data: Annotated[Path, typer.Option("--data", help="Manifest (.json/.jsonl/.csv) or dataset folder.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder: cfg-<value>/<id>.png per CFG value.")],
    model: ModelOpt,
    cfg: Annotated[Optional[str], typer.Option("--cfg", help=f"CFG values, comma-separated: one output folder each (default {TRUE_CFG_SCALE:g}, or the --preset's).")]
    = None,
    steps: StepsOpt = None,
    image_cfg: ImageCfgOpt = None,
    preset: PresetOpt = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Base noise seed: each record samples with a seed hashed from it and the record's id.")] = 0,
    same_seed: Annotated[bool, typer.Option("--same-seed", help="Sample every record with --seed itself (the rule before per-record seeds).")] = False,
    negative: NegativeOpt = NEGATIVE_PROMPT,
    lora: LoraOpt = None,
    fuse_lora: FuseOpt = False,
    adapter: AdapterOpt = None,
    without: WithoutOpt = None,
    rope_frames: RopeFramesOpt = None,
    fusion: FusionOpt = "off",
    feather: FeatherOpt = 8,
    sampler: SamplerOpt = "flow",
    width: WidthOpt = None,
    height: HeightOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Requests per batch (CFG doubles the transformer batch).")] = 4,
    format: Annotated[Optional[str], typer.Option("--format", help="Manifest format (detected when left out).")] = None,
    field: Annotated[Optional[list[str]], typer.Option("--field", help="NAME=COLUMN when the manifest names a field differently, e.g. prompt=caption (repeatable).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Remove the images already in the CFG folders and make them again (needed when settings, model, LoRAs or data changed).")] = False,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Leave out records whose images or masks cannot be used, report them at the end (and in run.json), and go on.")] = False,
    family: FamilyOpt = None,
    transformer: TransformerOpt = None,
    vae: VaeOpt = None,
    text_encoder: TextEncoderOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
    speed: SpeedOpt = "auto",
    attention: AttentionOpt = "auto",
    fp8: Fp8Opt = "off",
    offload: OffloadOpt = "none",
    cache_threshold: CacheThresholdOpt = None,
) -> None:
    """Edit a whole dataset; sharded across processes (torchrun / accelerate launch), resumable."""
    from editkit.data import read_manifest
    from editkit.data.bad_records import bad_summary
    from editkit.data.manifest import parse_field_overrides
    from editkit.infer.dataset_run import DatasetRunConfig, check_out_folder, parse_cfgs, run_dataset
    from editkit.utils import dist

    check_out_folder(out)
    speed_options = SpeedOptions(speed, attention, fp8, offload, cache_threshold)
    specs, chosen = _loras_and_preset(lora, preset, sampler)
    cfgs = parse_cfgs(cfg) if cfg is not None else _or_preset(None, chosen, "true_cfg_scale", None)
    config = DatasetRunConfig(cfgs=[cfgs] if isinstance(cfgs, float) else cfgs,
                              steps=_or_preset(steps, chosen, "steps", None), seed=seed, same_seed=same_seed,
                              image_cfg=image_cfg, components=_components(vae, text_encoder),
                              negative_prompt=negative, fusion=fusion, feather=feather, sampler=sampler, width=width,
                              height=height, batch_size=batch_size, preset=chosen.name if chosen else None).check()
    choice = _adapter_choice(adapter, without, rope_frames)
    records = read_manifest(data, format=format, fields=parse_field_overrides(field))
    engine, speed_options = _engine(model, family, transformer, dtype, device, specs, fuse_lora, speed_options,
                                    chosen, adapter=choice, components=config.components)
    config = dataclasses.replace(config, speed=speed_options.settings())
    result = run_dataset(engine, records, out, config, overwrite=overwrite, skip_bad=skip_bad)
    typer.echo(f"rank {dist.rank()}: wrote {len(result.written)} image(s), skipped {result.skipped} finished, "
               f"into {out}")
    if result.bad:
        typer.echo(f"rank {dist.rank()}: {bad_summary(result.bad)} (all listed in the run manifests)", err=True)


def register(app: typer.Typer) -> None:
    """Add this area's commands to the editkit app."""
    app.command("edit")(edit_command)
    app.command("chat")(chat_command)
    app.command("infer")(infer_command)
