"""`editkit demo --layers`: the layer-decomposition loop on synthetic layered scenes, every stage an
editkit library call.

Stages (each skips when its output is complete, so a re-run resumes):
1. data     `editkit layers synth` + `layers prep`: training scenes (train + val split) and held-out
            test scenes (seed + 1, another set)             -> OUT/data/{train,test}
2. model    a tiny Qwen-Image-Layered folder: the packaged demo VAE (editkit/demo/assets/vae) widened
            to RGBA (`editkit layers convert-vae`: alpha decodes as opaque), a demo-sized transformer
            with seeded random weights, the tiny text encoder -> OUT/model
3. train    `editkit train OUT/configs/decompose.yaml` (stage decompose, full, from scratch)
                                                            -> OUT/decomposer/final/transformer
4. infer    `editkit layers infer` on the test scenes: the trained decomposer and the same model
            untrained (its random transformer)              -> OUT/infer/{decomposer,untrained}
5. eval     `editkit eval --task layers` + `editkit compare` with the untrained baseline
                                                            -> OUT/eval, OUT/report/report.html

The VAE is the RGB one widened, so every decoded layer is opaque: the LayerD RGB L1 (on the pixels
each ground-truth layer shows) measures what the decomposer learnt; the alpha IoU stays near the
untrained model's until an RGBA VAE is trained (the `rgba_vae` stage; docs/demo.md).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from editkit.demo.pipeline import PACKAGED_VAE, Stage
from editkit.errors import UserError
from editkit.utils.atomic import write_json, write_text
from editkit.utils.progress import console

PROMPT = "a layered design"
"""The one prompt of training and decomposition (the tiny text encoder reads no captions)."""
BASELINE = "untrained"
TRAINED = "decomposer"


@dataclass(frozen=True)
class LayersPreset:
    name: str
    train_scenes: int  # scenes of the train split
    val_scenes: int  # scenes of the val split (validation loss, previews)
    test_scenes: int  # held-out scenes (another seed) that are decomposed and scored
    size: int  # long side of the scenes; the layers are size x size (the model's resolution)
    width: int  # transformer: heads x 32 (x 16 below 64)
    depth: int
    steps: int
    batch: int
    lr: float
    sample_steps: int  # flow-matching steps of each decomposition
    checkpoint_every: int

    def as_dict(self) -> dict:
        return asdict(self)


FULL = LayersPreset(name="layers", train_scenes=400, val_scenes=8, test_scenes=32, size=32, width=128, depth=4,
                    steps=600, batch=16, lr=1e-3, sample_steps=16, checkpoint_every=200)
QUICK = LayersPreset(name="layers-quick", train_scenes=24, val_scenes=2, test_scenes=4, size=32, width=32, depth=2,
                     steps=20, batch=8, lr=1e-3, sample_steps=4, checkpoint_every=10)


def make_layered_model(out: Path, width: int, depth: int, area: int, seed: int = 0) -> Path:
    """A tiny Qwen-Image-Layered folder: the packaged demo VAE widened to RGBA, a `depth`-block,
    `width`-wide transformer (seeded), the tiny preset's text encoder; views and layers at `area` pixels."""
    import torch
    from diffusers import QwenImageTransformer2DModel

    from editkit.layers.rgba_vae import load_rgba_vae
    from editkit.models.families import get_family
    from editkit.models.loading import save_model
    from editkit.models.presets import build_components
    from editkit.models.qwen_image_layered import QwenImageLayeredModel

    family = get_family("qwen-image-layered")
    tiny = build_components("tiny", family, seed=seed)  # its text encoder, tokenizer, processor, scheduler
    vae = load_rgba_vae(PACKAGED_VAE)
    z, head = vae.config.z_dim, 32 if width >= 64 else 16
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=4 * z, out_channels=z, num_layers=depth, attention_head_dim=head,
            num_attention_heads=width // head, joint_attention_dim=tiny.text_encoder.config.text_config.hidden_size,
            axes_dims_rope=(head // 4, 3 * head // 8, 3 * head // 8), **family.transformer_flags)
    model = QwenImageLayeredModel(family, transformer, vae, tiny.text_encoder, tiny.tokenizer, tiny.image_processor,
                                  tiny.scheduler, vlm_image_area=area, vae_image_area=area, output_area=area)
    return save_model(model, out)


class LayersDemo:
    """Paths and stages of one `demo --layers` folder."""

    def __init__(self, out: str | Path, preset: LayersPreset, seed: int = 0):
        self.out = Path(out).absolute()
        self.preset, self.seed = preset, seed
        self.data = self.out / "data"
        self.configs = self.out / "configs"
        self.model = self.out / "model"
        self.run = self.out / "decomposer"
        self.infer = self.out / "infer"
        self.eval = self.out / "eval"
        self.report_dir = self.out / "report"

    @property
    def train_data(self) -> Path:
        return self.data / "train"

    @property
    def test_data(self) -> Path:
        return self.data / "test"

    @property
    def transformer_dir(self) -> Path:
        return self.run / "final" / "transformer"

    @property
    def report(self) -> Path:
        return self.report_dir / "report.html"

    def stages(self) -> list[Stage]:
        p, d = self.preset, self.data
        synth = (f"editkit layers synth --out {d / 'scenes-train'} --n {p.train_scenes + p.val_scenes} --size {p.size} "
                 f"--seed {self.seed} && editkit layers prep --input {d / 'scenes-train'} --out {self.train_data} "
                 f"--train-count {p.train_scenes} --val-count {p.val_scenes} --multiple 8 --max-side {p.size} && "
                 f"(the same for {p.test_scenes} test scenes, seed {self.seed + 1}, into {self.test_data})")
        infer = " ; ".join(f"editkit layers infer --model {self.model}{t} --data {self.test_data} "
                           f"--out {self.infer / name} --steps {p.sample_steps} --cfg 1 --prompt '{PROMPT}' "
                           f"--dtype fp32" for name, t in self.infer_runs())
        return [
            Stage("data", synth, lambda: all((f / "metadata" / "manifest.json").is_file()
                                             for f in (self.train_data, self.test_data)), self.make_data),
            Stage("model", f"(a tiny Qwen-Image-Layered folder around the packaged VAE, widened) -> {self.model}",
                  lambda: (self.model / "model_index.json").is_file(), self.make_model),
            Stage("train", f"editkit train {self.configs / 'decompose.yaml'} --resume latest",
                  lambda: (self.transformer_dir / "config.json").is_file(), self.train),
            Stage("infer", infer, self.infer_done, self.run_infer),
            Stage("eval", f"editkit eval --task layers --pred {self.infer / TRAINED} --pred {self.infer / BASELINE} "
                          f"--data {self.test_data} --out {self.eval} && editkit compare {self.eval} "
                          f"--baseline {BASELINE} --out {self.report_dir}",
                  lambda: self.report.is_file() and (self.out / "headline.json").is_file(), self.run_eval),
        ]

    def infer_runs(self) -> list[tuple[str, str]]:
        """(run name, the `--transformer` part of its command)."""
        return [(TRAINED, f" --transformer {self.transformer_dir}"), (BASELINE, "")]

    # ----- the stages ------------------------------------------------------------------------

    def make_data(self) -> None:
        from editkit.layers.prep import prepare_layers
        from editkit.layers.synth import synthesize_layers

        p = self.preset
        for name, n, seed, train, val, out in (
                ("scenes-train", p.train_scenes + p.val_scenes, self.seed, p.train_scenes, p.val_scenes,
                 self.train_data),
                ("scenes-test", p.test_scenes, self.seed + 1, 0, p.test_scenes, self.test_data)):
            scenes = synthesize_layers(self.data / name, n=n, size=p.size, seed=seed, progress=False)
            prepare_layers(scenes, out, train_count=train, val_count=val, multiple=8, max_side=p.size, workers=1,
                           overwrite=True, progress=False)

    def make_model(self) -> None:
        make_layered_model(self.model, self.preset.width, self.preset.depth, self.preset.size ** 2, self.seed)

    def train_config(self) -> dict:
        p = self.preset
        return {
            "stage": "decompose", "model": str(self.model), "output_dir": str(self.run), "seed": self.seed,
            "data": {"train": [{"manifest": str(self.train_data)}], "batch_size": p.batch},
            "train": {"mode": "full"},
            "decompose": {"prompt": "fixed", "prompt_text": PROMPT},
            "objective": {"timesteps": {"sampling": "logit_normal"}},
            "optim": {"name": "adamw", "lr": p.lr, "schedule": "cosine", "warmup_steps": min(50, p.steps // 10)},
            "loop": {"max_steps": p.steps, "mixed_precision": "no", "checkpoint_every": p.checkpoint_every,
                     "keep_last": 1, "validate_every": p.checkpoint_every, "preview_every": p.steps,
                     "preview_steps": p.sample_steps, "val_samples": min(4, p.val_scenes), "tensorboard": False},
        }

    def train(self) -> None:
        import yaml

        from editkit.train.config import load_config
        from editkit.train.trainer import train

        path = self.configs / "decompose.yaml"
        write_text(path, yaml.safe_dump(self.train_config(), sort_keys=False))
        train(load_config(path), resume="latest")

    def infer_done(self) -> bool:
        from editkit.layers.records import read_prepared

        ids = [e.id for e in read_prepared(self.test_data)]
        return all((self.infer / name / i).is_dir() for name, _ in self.infer_runs() for i in ids)

    def run_infer(self) -> None:
        from editkit.layers.decompose import DecomposeSettings, infer_dataset, load_decomposer

        settings = DecomposeSettings(steps=self.preset.sample_steps, cfg=1.0, seed=self.seed, prompt=PROMPT,
                                     batch_size=8)
        for name, transformer in ((TRAINED, self.transformer_dir), (BASELINE, None)):
            model, identity = load_decomposer(str(self.model), transformer=transformer, dtype="fp32", device="cpu")
            infer_dataset(model, identity, self.test_data, self.infer / name, settings)

    def run_eval(self) -> None:
        from editkit.demo.report import loss_curves
        from editkit.eval.compare import compare_runs
        from editkit.eval.layers_run import evaluate_layers

        summary = evaluate_layers([self.infer / TRAINED, self.infer / BASELINE], self.test_data, self.eval,
                                  n_boot=500)
        numbers = headline(summary)
        curves = loss_curves({"decomposer": self.run / "metrics.csv"}, self.report_dir / "loss_curves.png")
        previews = sorted((self.run / "previews").glob("*.png"))[-1:]
        compare_runs([self.eval], self.report_dir, baseline=BASELINE, n_boot=500, seed=self.seed,
                     title=f"editkit demo --layers ({self.preset.name})",
                     extra_sections=[("Headline", headline_html(numbers))],
                     extra_images=[("Training loss", curves)]
                     + [("Decompositions of validation scenes: input | layers | recomposite, ground truth below", p)
                        for p in previews])
        write_json(self.out / "headline.json", numbers)


def headline(summary: dict) -> dict:
    """LayerD at 0 and 5 merges of the decomposer and of the untrained model, and their ratios."""
    runs = {name: summary["runs"][name]["means"] for name in (TRAINED, BASELINE)}
    numbers = {name: {k: means[k] for k in ("rgb_l1_m0", "alpha_iou_m0", "rgb_l1_m5", "alpha_iou_m5")}
               for name, means in runs.items()}
    numbers["rgb_l1_m0_ratio"] = runs[TRAINED]["rgb_l1_m0"] / runs[BASELINE]["rgb_l1_m0"]
    numbers["test_samples"] = summary["runs"][TRAINED]["n_evaluated"]
    return numbers


def headline_html(numbers: dict) -> str:
    import html

    rows = "".join(f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{numbers[name][k]:.4f}</td>" for k in
                                                                  ("rgb_l1_m0", "alpha_iou_m0", "rgb_l1_m5",
                                                                   "alpha_iou_m5")) + "</tr>"
                   for name in (TRAINED, BASELINE))
    return (f"<p>LayerD on {numbers['test_samples']} held-out synthetic scenes: RGB L1 at 0 merges of the trained "
            f"decomposer / the untrained model = <b>{numbers['rgb_l1_m0_ratio']:.2f}</b>. The demo's VAE decodes "
            "every layer opaque, so alpha IoU does not measure what was learnt.</p>"
            "<table><tr><th>run</th><th>RGB L1 (0 merges)</th><th>alpha IoU (0)</th><th>RGB L1 (5)</th>"
            f"<th>alpha IoU (5)</th></tr>{rows}</table>")


def check_out(out: Path, preset: LayersPreset) -> None:
    """One folder holds one demo: refuse to mix presets or the edit demo into it."""
    marker = out / "demo.json"
    if marker.is_file():
        made = json.loads(marker.read_text()).get("preset", {})
        if made.get("name") != preset.name:
            raise UserError(f"{marker}: this folder holds a {made.get('name')!r} demo; use another --out for "
                            f"{preset.name!r}")
    elif out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: exists and is not a demo folder; choose a new --out folder")
    out.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"preset": preset.as_dict()})


def run_layers_demo(out: str | Path, preset: LayersPreset, seed: int = 0,
                    log: Callable[[str], None] = console.print) -> dict:
    """Run (or resume) every stage; returns the headline numbers, the report path and stage times."""
    demo = LayersDemo(out, preset, seed)
    check_out(demo.out, preset)
    stages = demo.stages()
    times: dict[str, float] = {}
    start = time.time()
    for i, stage in enumerate(stages, 1):
        if stage.done():
            log(f"[bold][{i}/{len(stages)}] {stage.name}[/]: done before, skipped")
            continue
        log(f"[bold][{i}/{len(stages)}] {stage.name}[/]: {stage.command}")
        t0 = time.time()
        stage.run()
        times[stage.name] = round(time.time() - t0, 1)
        log(f"    {stage.name} took {times[stage.name]:.1f} s")
    result = json.loads((demo.out / "headline.json").read_text())
    result.update(report=str(demo.report), seconds=round(time.time() - start, 1), stage_seconds=times)
    write_json(demo.out / "timings.json", {"seconds": result["seconds"], "stage_seconds": times})
    return result


def demo_layers(out: Path, quick: bool, seed: int, train_vae: bool, echo: Callable[[str], None]) -> dict:
    """`editkit demo --layers [--quick]`: run it and print the headline."""
    if train_vae:
        raise UserError("--train-vae: the --layers demo uses the packaged VAE widened to RGBA; leave --train-vae out")
    result = run_layers_demo(out, QUICK if quick else FULL, seed=seed)
    echo(f"report: {result['report']}")
    for name in (TRAINED, BASELINE):
        r = result[name]
        echo(f"{name}: LayerD RGB L1 {r['rgb_l1_m0']:.4f} / alpha IoU {r['alpha_iou_m0']:.4f} at 0 merges, "
             f"{r['rgb_l1_m5']:.4f} / {r['alpha_iou_m5']:.4f} at 5")
    echo(f"RGB L1 ratio decomposer / untrained {result['rgb_l1_m0_ratio']:.2f} on {result['test_samples']} held-out "
         "scenes")
    echo(f"wall time {result['seconds']:.0f} s")
    return result
