"""The page's Decompose tab (Gradio components and wiring only): shown when the served model
decomposes images into layers (`AppController.decomposer`).

Upload an image, choose the layer count, steps, CFG and seed (and optionally describe the image),
press **Decompose**: the layers appear as a gallery (bottom first) beside their recomposite, with
downloads of the layers as a ZIP (PNGs + PSD) and as the PSD alone. The handlers call
`editkit.app.decompose`; like the edit tab's, a check runs first outside the GPU queue and the
decomposition waits in the "gpu" concurrency group (one job at a time, shared with editing).
"""

from __future__ import annotations

import random

import gradio as gr

from editkit.app.actions import MAX_SEED, MAX_STEPS, AppController
from editkit.app.decompose import MAX_LAYERS, DecomposeRequest, decompose_upload
from editkit.app.limits import ACCEPTED_SUFFIXES


def build_decompose_tab(controller: AppController) -> None:
    """The tab's components and events, inside the page's `gr.Blocks`."""
    from editkit.app.layout import _errors_as_popups

    model, defaults, limits = controller.decomposer, controller.defaults, controller.limits
    gr.Markdown(f"## editkit — image to layers\nModel: `{controller.model_name}`.")
    with gr.Tab("Decompose", elem_id="decompose-tab"):
        gr.Markdown("Upload an image and press **Decompose**: the model splits it into RGBA layers, bottom "
                    "(background) first. Download them as PNGs + PSD (ZIP) or as a PSD.")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.File(label="Image to decompose", file_types=list(ACCEPTED_SUFFIXES),
                                elem_id="decompose-image", height=120)
                prompt = gr.Textbox(label="Description of the image (optional; empty: the model writes one)",
                                    lines=2, elem_id="decompose-prompt")
                with gr.Row():
                    layers = gr.Slider(1, MAX_LAYERS, value=model.family.layers, step=1, label="Layers",
                                       elem_id="decompose-layers")
                    steps = gr.Slider(1, MAX_STEPS, value=defaults.steps, step=1, label="Steps",
                                      elem_id="decompose-steps")
                with gr.Row():
                    cfg = gr.Slider(1.0, max(10.0, defaults.true_cfg_scale), value=defaults.true_cfg_scale, step=0.5,
                                    label="CFG (guidance scale; 1 = off)", elem_id="decompose-cfg")
                    seed = gr.Number(value=defaults.seed, precision=0, minimum=0, maximum=MAX_SEED, label="Seed",
                                     elem_id="decompose-seed")
                    dice = gr.Button("Random seed", elem_id="decompose-random-seed", scale=0)
                run = gr.Button("Decompose", variant="primary", elem_id="decompose-run")
            with gr.Column(scale=1):
                gallery = gr.Gallery(label="Layers (bottom first)", columns=4, height=300, object_fit="contain",
                                     format="png", interactive=False, elem_id="decompose-gallery")
                recomposed = gr.Image(label="Recomposite (the layers over each other)", type="filepath",
                                      interactive=False, format="png", height=300, elem_id="decompose-recomposite")
                with gr.Row():
                    zip_button = gr.DownloadButton("⬇ Layers (ZIP: PNGs + PSD)", value=None, interactive=False,
                                                   elem_id="decompose-zip")
                    psd_button = gr.DownloadButton("⬇ PSD", value=None, interactive=False, elem_id="decompose-psd")
                status = gr.Markdown(elem_id="decompose-status")

    inputs = [image, layers, steps, seed, cfg, prompt]

    def request_of(path, n_layers, n_steps, seed_value, cfg_value, text) -> DecomposeRequest:
        return DecomposeRequest(image=path, layers=n_layers, steps=n_steps, seed=seed_value, cfg=cfg_value,
                                prompt=text)

    @_errors_as_popups
    def check(*values) -> None:
        request_of(*values).checked(limits)

    @_errors_as_popups
    def on_decompose(*values, progress=gr.Progress()):
        view = decompose_upload(model, request_of(*values), limits, controller.output_dir,
                                progress=lambda done, total: progress((done, total), desc="Denoising",
                                                                      unit="steps"))
        return (view.layers, view.recomposite, gr.DownloadButton(value=view.zip_path, interactive=True),
                gr.DownloadButton(value=view.psd_path, interactive=True), view.status)

    run.click(check, inputs, None, concurrency_limit=None, show_progress="hidden").success(
        on_decompose, inputs, [gallery, recomposed, zip_button, psd_button, status], concurrency_id="gpu",
        concurrency_limit=1, show_progress_on=gallery)
    dice.click(lambda: random.randint(0, MAX_SEED), None, seed, concurrency_limit=None)
