"""The Gradio Blocks page: components, their wiring, and nothing else.

Every handler here is a thin adapter: it calls a plain function of `editkit.app.actions`
(testable without a browser), turns exceptions into short `gr.Error` pop-ups, and maps the
returned `View` onto the components. Only the edit event touches the GPU; it runs in the
queue's "gpu" concurrency group with limit 1, so jobs run one at a time and waiting users see
their queue position.
"""

from __future__ import annotations

import functools
import logging
import random
import uuid
from collections.abc import Callable
from typing import Any

import gradio as gr

from editkit.app.actions import MAX_SEED, AppController, EditSettings, View
from editkit.app.limits import ACCEPTED_SUFFIXES, load_sources
from editkit.errors import UserError
from editkit.infer.fusion import FUSION_MODES

SESSION_TTL_S = 2 * 3600  # an idle browser tab's turns are freed after this long

log = logging.getLogger(__name__)


def _errors_as_popups(fn: Callable) -> Callable:
    """Show a `UserError`'s line as a pop-up (it is written for users); any other exception is
    logged here with a short error id, and the browser gets only that id — never internal text."""

    @functools.wraps(fn)  # keeps the signature (and its gr.Progress default) visible to Gradio
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            raise gr.Error(str(err), print_exception=False) from None
        except Exception:
            error_id = uuid.uuid4().hex[:8]
            log.exception("error id %s in %s", error_id, fn.__name__)
            raise gr.Error(f"something went wrong (error id {error_id}); the server log has the details",
                           print_exception=False) from None

    return wrapped


def build_blocks(controller: AppController) -> gr.Blocks:
    """The app page for `controller` (call `.queue(...)` and `.launch(...)` on the result)."""
    defaults = controller.defaults
    limits = controller.limits
    with gr.Blocks(title="editkit", analytics_enabled=False) as blocks:
        session = gr.State(None, time_to_live=SESSION_TTL_S, delete_callback=controller.close)
        decomposes = controller.decomposer is not None  # a layer decomposer gets the Decompose tab instead
        gr.Markdown(f"## editkit — instruction-based image editing\nModel: `{controller.model_name}`. "
                    "Upload a photo, paint the region to change (optional), describe the edit, press **Edit**. "
                    "Each result becomes the next turn's source.", visible=not decomposes)
        with gr.Row(visible=not decomposes):
            with gr.Column(scale=1):
                sources = gr.File(
                    label=f"Source images (up to {limits.max_sources}; the first is edited)",
                    file_count="multiple", file_types=list(ACCEPTED_SUFFIXES), elem_id="sources", height=120,
                )
                editor = gr.ImageEditor(
                    label="Current source — paint the edit region with the brush (optional)",
                    type="pil", image_mode="RGBA", sources=(), transforms=(), layers=False, format="png",
                    brush=gr.Brush(colors=["rgba(255, 40, 90, 0.8)"], color_mode="fixed"),
                    elem_id="editor", height=420,
                )
                with gr.Accordion("…or upload a mask instead", open=False):
                    mask_file = gr.File(label="Mask (white = edit region; wins over the painted one)",
                                        file_types=list(ACCEPTED_SUFFIXES), elem_id="mask-file", height=120)
                instruction = gr.Textbox(label="Instruction (English or 中文)", lines=2, elem_id="instruction",
                                         placeholder="e.g. make the sky a sunset / 把天空变成晚霞")
                negative = gr.Textbox(label="Negative prompt (optional)", elem_id="negative")
                with gr.Accordion("Settings", open=True):
                    with gr.Row():
                        cfg = gr.Slider(1.0, max(10.0, defaults.true_cfg_scale), value=defaults.true_cfg_scale,
                                        step=0.5, label="CFG (guidance scale; 1 = off)", elem_id="cfg")
                        steps = gr.Slider(1, 100, value=defaults.steps, step=1, label="Steps", elem_id="steps")
                    with gr.Row():
                        seed = gr.Number(value=defaults.seed, precision=0, minimum=0, maximum=MAX_SEED,
                                         label="Seed", elem_id="seed")
                        dice = gr.Button("Random seed", elem_id="random-seed", scale=0)
                    with gr.Row():
                        width = gr.Number(value=0, precision=0, minimum=0, maximum=limits.max_image_side,
                                          label="Output width (0 = from the source)", elem_id="width")
                        height = gr.Number(value=0, precision=0, minimum=0, maximum=limits.max_image_side,
                                           label="Output height (0 = from the source)", elem_id="height")
                    fusion = gr.Radio(list(FUSION_MODES), value="off", elem_id="fusion",
                                      label="Mask fusion (needs a mask): pixel-mask keeps the source's pixels "
                                            "outside the mask; latent-mask keeps them during sampling")
                    lora_sliders = [
                        gr.Slider(0.0, 2.0, value=lora.scale, step=0.05, label=f"LoRA {lora.name} scale (0 = off)",
                                  elem_id=f"lora-{i}")
                        for i, lora in enumerate(controller.loras)
                    ]
                    extras = gr.CheckboxGroup(
                        controller.extras, value=controller.extras_on, elem_id="adapter-extras",
                        label="Adapter extras (the bundle's modules beside its LoRA; off = the ablation without it)",
                    ) if controller.extras else None
                run = gr.Button("Edit", variant="primary", elem_id="run")
            with gr.Column(scale=1):
                result = gr.Image(label="Result", type="pil", interactive=False, format="png", elem_id="result",
                                  height=420)
                with gr.Row():
                    undo = gr.Button("↶ Undo last turn", elem_id="undo")
                    download = gr.DownloadButton("⬇ Download PNG (with settings)", value=None, interactive=False,
                                                 elem_id="download")
                history = gr.Gallery(label="History (turn 0 = source)", columns=6, fit_columns=False, height=180,
                                     object_fit="contain", type="pil", format="png", elem_id="history",
                                     interactive=False)
                status = gr.Markdown(elem_id="status")

        view_outputs = [session, editor, result, history, download, status]

        def show(view: View) -> list[Any]:
            return [
                view.session,
                view.editor_value,
                view.result,
                view.history,
                gr.DownloadButton(value=view.download_path, interactive=view.download_path is not None),
                view.status,
            ]

        @_errors_as_popups
        def on_sources(paths):
            return show(controller.start(paths))

        edit_inputs = {session, editor, mask_file, instruction, negative, cfg, steps, seed, width, height, fusion,
                       *lora_sliders, *([extras] if extras is not None else [])}

        def settings_of(values: dict) -> EditSettings:
            return EditSettings(
                instruction=values[instruction], negative_prompt=values[negative], true_cfg_scale=values[cfg],
                steps=values[steps], seed=values[seed], width=values[width], height=values[height],
                fusion=values[fusion], lora_scales=[values[s] for s in lora_sliders],
                extras=values[extras] if extras is not None else None,
            )

        @_errors_as_popups
        def check_edit(values: dict) -> None:
            controller.check(values[session], settings_of(values), values[editor], values[mask_file])

        @_errors_as_popups
        def on_edit(values: dict, progress=gr.Progress()):
            view = controller.edit(
                values[session], settings_of(values), editor_value=values[editor], mask_path=values[mask_file],
                progress=lambda step, total: progress((step, total), desc="Denoising", unit="steps"),
            )
            return show(view)

        @_errors_as_popups
        def check_sources(paths) -> None:
            if paths:
                load_sources(paths, limits)

        @_errors_as_popups
        def on_undo(current):
            view = controller.undo(current)
            if view.warning:
                gr.Warning(view.warning)
            return show(view)

        # Checks run first with no outputs, outside the GPU queue: a mistake shows one pop-up at once
        # and leaves the page as it was; only checked edits wait for the GPU.
        for trigger in (run.click, instruction.submit):
            trigger(check_edit, edit_inputs, None, concurrency_limit=None, show_progress="hidden").success(
                on_edit, edit_inputs, view_outputs, concurrency_id="gpu", concurrency_limit=1, show_progress_on=result)
        for trigger in (sources.upload, sources.clear):
            trigger(check_sources, sources, None, concurrency_limit=None, show_progress="hidden").success(
                on_sources, sources, view_outputs, concurrency_limit=None)
        undo.click(on_undo, session, view_outputs, concurrency_limit=None)
        dice.click(lambda: random.randint(0, MAX_SEED), None, seed, concurrency_limit=None)
        if decomposes:
            from editkit.app.decompose_tab import build_decompose_tab

            build_decompose_tab(controller)
    return blocks
