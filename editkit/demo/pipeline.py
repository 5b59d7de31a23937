"""The demo as a script over the product: every stage is an editkit library call.

Stages (each skips when its output is complete, so a re-run resumes):
1. data    `editkit data synth`            -> OUT/data/{train,val,test}.jsonl
2. vae     the packaged demo VAE (editkit/demo/assets/vae), or with --train-vae
           `editkit train OUT/configs/vae.yaml` (stage: vae) -> OUT/vae/final/vae
3. model   a tiny 2511 model folder around the trained VAE     -> OUT/model
4. cache   `editkit cache`                  -> OUT/cache
5. editor  `editkit train OUT/configs/editor.yaml` (full, from scratch) -> OUT/editor/final/transformer
6. infer   `editkit infer` on the test split: a sweep of CFG values (flow matching) or of
           bridge steps (LBM)                                   -> OUT/infer/<setting>/
           plus the copy-the-source baseline                    -> OUT/infer/copy-source/
7. eval    `editkit eval` + `editkit compare` with the baseline -> OUT/eval, OUT/report/report.html
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from editkit.demo.presets import DemoPreset, sweep
from editkit.errors import UserError
from editkit.utils.atomic import write_json, write_text
from editkit.utils.progress import console

BASELINE = "copy-source"
PACKAGED_VAE = Path(__file__).parent / "assets" / "vae"
"""The full preset's VAE, made by its own `vae` stage (seed 0): what real users have, a pretrained VAE."""


@dataclass
class Stage:
    name: str
    command: str  # the equivalent editkit command, shown to the user
    done: Callable[[], bool]
    run: Callable[[], None]


class Demo:
    """Paths and stages of one demo folder."""

    def __init__(self, out: str | Path, preset: DemoPreset, seed: int = 0):
        self.out = Path(out).absolute()  # its configs name absolute paths (YAML paths are relative to the YAML)
        self.preset = preset
        self.seed = seed
        self.data = self.out / "data"
        self.configs = self.out / "configs"
        self.vae_run = self.out / "vae"
        self.model = self.out / "model"
        self.cache = self.out / "cache"
        self.editor_run = self.out / "editor"
        self.infer = self.out / "infer"
        self.eval = self.out / "eval"
        self.report_dir = self.out / "report"

    # ----- paths of the products ---------------------------------------------------------------

    @property
    def vae_dir(self) -> Path:
        return self.vae_run / "final" / "vae"

    @property
    def transformer_dir(self) -> Path:
        return self.editor_run / "final" / "transformer"

    @property
    def report(self) -> Path:
        return self.report_dir / "report.html"

    def manifest(self, split: str) -> Path:
        return self.data / f"{split}.jsonl"

    def prediction_dirs(self) -> list[Path]:
        return [self.infer / s.name for s in sweep(self.preset)] + [self.infer / BASELINE]

    # ----- the stages --------------------------------------------------------------------------

    def stages(self) -> list[Stage]:
        p = self.preset
        return [
            Stage("data", f"editkit data synth --out {self.data} --n {p.samples} --size {p.image_size} "
                          f"--seed {self.seed}",
                  lambda: (self.data / "synth.json").is_file(), self.make_data),
            Stage("vae", f"(the packaged demo VAE {PACKAGED_VAE}; --train-vae trains it) -> {self.vae_dir}"
                  if p.packaged_vae else f"editkit train {self.configs / 'vae.yaml'} --resume latest",
                  lambda: (self.vae_dir / "config.json").is_file(),
                  self.copy_vae if p.packaged_vae else self.train_vae),
            Stage("model", f"(tiny 2511 model folder with the trained VAE) -> {self.model}",
                  lambda: (self.model / "model_index.json").is_file(), self.make_model),
            Stage("cache", f"editkit cache --model {self.model} --data {self.manifest('train')} --out {self.cache} "
                           f"--area {p.image_size ** 2} --multiple {self.multiple} --dtype fp32",
                  self.cache_done, self.make_cache),
            Stage("editor", f"editkit train {self.configs / 'editor.yaml'} --resume latest",
                  lambda: (self.transformer_dir / "config.json").is_file(), self.train_editor),
            Stage("infer", " ; ".join(
                      f"editkit infer --model {self.model} --transformer {self.transformer_dir} "
                      f"--data {self.manifest('test')} --out {self.infer / 'runs' / f'steps-{n}'} --cfg {cfgs} "
                      f"--sampler {self.sampler} --steps {n} --dtype fp32" for n, cfgs in self.infer_jobs().items()),
                  self.infer_done, self.run_infer),
            Stage("eval", f"editkit eval --pred '{self.infer}/*' --data {self.manifest('test')} --out {self.eval} "
                          f"--metrics pixel && editkit compare {self.eval} --baseline {BASELINE} "
                          f"--out {self.report_dir}",
                  lambda: self.report.is_file() and (self.out / "headline.json").is_file(), self.run_eval),
        ]

    @property
    def multiple(self) -> int:
        """Image sides are multiples of this: the VAE's downsampling x the 2x2 packing."""
        return 2 ** (len(self.preset.vae["dim_mult"]) - 1) * 2

    @property
    def sampler(self) -> str:
        return "bridge" if self.preset.objective == "lbm" else "flow"

    def infer_jobs(self) -> dict[int, str]:
        """Sampling steps -> the CFG values run with them (one `editkit infer` each)."""
        jobs: dict[int, list[float]] = {}
        for s in sweep(self.preset):
            jobs.setdefault(s.steps, []).append(s.cfg)
        return {n: ",".join(str(c) for c in cfgs) for n, cfgs in jobs.items()}

    def make_data(self) -> None:
        from editkit.data.synth import synthesize

        synthesize(self.data, n=self.preset.samples, size=self.preset.image_size, seed=self.seed)

    def _write_config(self, name: str, config: dict):
        import yaml

        from editkit.train.config import load_config

        path = self.configs / name
        write_text(path, yaml.safe_dump(config, sort_keys=False))
        return load_config(path)

    def vae_config(self) -> dict:
        p = self.preset
        return {
            "stage": "vae", "output_dir": str(self.vae_run), "seed": self.seed,
            "data": {"train": [{"manifest": str(self.manifest("train"))}], "batch_size": p.vae_batch},
            "vae": {**p.vae, "size": p.image_size, "temperal_downsample": [False] * (len(p.vae["dim_mult"]) - 1)},
            "optim": {"name": "adamw", "lr": p.vae_lr, "betas": list(p.vae_betas), "schedule": "cosine",
                      "warmup_steps": 20},
            "loop": {"max_steps": p.vae_steps, "mixed_precision": "no", "checkpoint_every": p.checkpoint_every,
                     "keep_last": 1, "preview_every": p.vae_steps, "val_samples": 8, "tensorboard": False},
        }

    def train_vae(self) -> None:
        from editkit.train.trainer import train

        train(self._write_config("vae.yaml", self.vae_config()), resume="latest")

    def copy_vae(self) -> None:
        """Put the packaged VAE where the `vae` stage writes its own (the folder appears whole or not at all)."""
        import shutil

        staging = self.vae_dir.with_name(".tmp-vae")
        staging.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(PACKAGED_VAE, staging)
        staging.rename(self.vae_dir)

    def make_model(self) -> None:
        """The tiny 2511 preset with the trained VAE, a demo-sized editor and views at the demo size."""
        import torch
        from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

        from editkit.models.families import get_family
        from editkit.models.loading import save_model
        from editkit.models.presets import build_components
        from editkit.models.qwen_image_edit import QwenImageEditModel

        family = get_family("qwen-image-edit-2511")
        tiny = build_components("tiny", family, seed=self.seed)  # its text encoder, tokenizer, processor, scheduler
        vae = AutoencoderKLQwenImage.from_pretrained(self.vae_dir)
        z, head = vae.config.z_dim, 32
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            transformer = QwenImageTransformer2DModel(
                patch_size=2, in_channels=4 * z, out_channels=z, num_layers=self.preset.depth,
                attention_head_dim=head, num_attention_heads=self.preset.width // head,
                joint_attention_dim=tiny.text_encoder.config.text_config.hidden_size,
                axes_dims_rope=(head // 4, 3 * head // 8, 3 * head // 8), **family.transformer_flags)
        area = self.preset.image_size ** 2
        model = QwenImageEditModel(family, transformer, vae, tiny.text_encoder, tiny.tokenizer, tiny.image_processor,
                                   tiny.scheduler, vlm_image_area=area, vae_image_area=area, output_area=area)
        save_model(model, self.model)

    def cache_done(self) -> bool:
        from editkit.data import read_manifest

        indexes = list(self.cache.glob("index-r*.json"))
        done = {rid for f in indexes for rid in json.loads(f.read_text())["records"]}
        return {r.id for r in read_manifest(self.manifest("train"))} <= done

    def make_cache(self) -> None:
        from editkit.train.cache import build_cache

        build_cache(str(self.model), self.manifest("train"), self.cache, area=self.preset.image_size ** 2,
                    multiple=self.multiple, dtype="fp32", device="cpu")

    def editor_config(self) -> dict:
        p = self.preset
        timesteps = ({"sampling": "discrete", "values": [0.25, 0.5, 0.75, 1.0]} if p.objective == "lbm"
                     else {"sampling": "logit_normal"})
        return {
            "stage": "edit", "model": str(self.model), "output_dir": str(self.editor_run), "seed": self.seed,
            "data": {"cache": [str(self.cache)], "val": str(self.manifest("val")), "area": p.image_size ** 2,
                     "multiple": self.multiple, "batch_size": p.edit_batch},
            "train": {"mode": "full"},
            "objective": {"kind": p.objective, "timesteps": timesteps, "text_dropout": p.text_dropout},
            "optim": {"name": "adamw", "lr": p.edit_lr, "schedule": "cosine", "warmup_steps": 50},
            "loop": {"max_steps": p.edit_steps, "mixed_precision": "no", "checkpoint_every": p.checkpoint_every,
                     "keep_last": 1, "validate_every": p.checkpoint_every, "preview_every": p.edit_steps,
                     "preview_steps": p.sample_steps, "val_samples": 8, "tensorboard": False,
                     "export_lora": False},
        }

    def train_editor(self) -> None:
        from editkit.train.trainer import train

        train(self._write_config("editor.yaml", self.editor_config()), resume="latest")

    def infer_done(self) -> bool:
        from editkit.data import read_manifest

        ids = [r.id for r in read_manifest(self.manifest("test"))]
        return all((d / f"{i}.png").is_file() for d in self.prediction_dirs() for i in ids)

    def run_infer(self) -> None:
        from editkit.data import read_manifest
        from editkit.infer.dataset_run import DatasetRunConfig, cfg_folder, run_dataset
        from editkit.infer.engine import Engine
        from editkit.models import load_model

        records = read_manifest(self.manifest("test"))
        model = load_model(str(self.model), transformer=self.transformer_dir, dtype="fp32", device="cpu")
        engine = Engine(model, model_name=str(self.model), transformer_name=str(self.transformer_dir))
        for setting in sweep(self.preset):
            job = self.infer / "runs" / f"steps-{setting.steps}"
            config = DatasetRunConfig(cfgs=[setting.cfg], steps=setting.steps, seed=self.seed,
                                      sampler=self.sampler, batch_size=32)
            run_dataset(engine, records, job, config)
            link = self.infer / setting.name  # one folder name per run, as `editkit eval` names runs
            if not link.exists():
                link.symlink_to(cfg_folder(job, setting.cfg).relative_to(self.infer), target_is_directory=True)
        copy_sources(records, self.infer / BASELINE)

    def run_eval(self) -> None:
        from editkit.data import read_manifest
        from editkit.demo.report import headline_html, loss_curves
        from editkit.eval.compare import compare_runs
        from editkit.eval.runner import evaluate

        records = read_manifest(self.manifest("test"))
        evaluate(self.prediction_dirs(), records, self.eval, ["pixel"], manifest=self.manifest("test"))
        numbers = headline(self.eval / "summary.json", [s.name for s in sweep(self.preset)])
        runs = {"VAE stage": self.vae_run / "metrics.csv"} if not self.preset.packaged_vae else {}
        curves = loss_curves({**runs, "editor": self.editor_run / "metrics.csv"}, self.report_dir / "loss_curves.png")
        previews = sorted((self.editor_run / "previews").glob("*.png"))[-1:]
        compare_runs([self.eval], self.report_dir, baseline=BASELINE, n_boot=500, seed=self.seed,
                     title=f"editkit demo ({self.preset.name})",
                     extra_sections=[("Headline", headline_html(numbers, self.preset.objective))],
                     extra_images=[("Training loss", curves)]
                     + [("Editor preview on validation records: source | target | edit", p) for p in previews])
        write_json(self.out / "headline.json", numbers)


def copy_sources(records, folder: Path) -> None:
    """The copy-the-source baseline: each record's first source image as its prediction."""
    from PIL import Image

    from editkit.infer.dataset_run import output_path
    from editkit.utils.atomic import atomic_path

    for record in records:
        dest = output_path(folder, record.id)
        if not dest.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(dest, suffix=".png") as tmp:
                Image.open(record.sources[0]).convert("RGB").save(tmp, format="PNG")


def headline(summary_path: Path, names: list[str]) -> dict:
    """Edit-region MSE of the best sweep setting vs the copy-the-source baseline, and its background PSNR."""
    runs = json.loads(summary_path.read_text())["runs"]
    base = runs[BASELINE]["means"]
    edits = {name: runs[name]["means"] for name in names}
    best = min(edits, key=lambda name: edits[name]["mse_in"])
    m = edits[best]
    return {"best_run": best, "edit_mse": m["mse_in"], "baseline_edit_mse": base["mse_in"],
            "edit_mse_ratio": m["mse_in"] / base["mse_in"], "background_psnr": m["psnr_out"],
            "per_run": {name: {"edit_mse": e["mse_in"], "background_psnr": e["psnr_out"]} for name, e in edits.items()}}


def check_out(out: Path, preset: DemoPreset) -> None:
    """One demo folder holds one preset: refuse to mix a quick run into a full one (or back)."""
    marker = out / "demo.json"
    if marker.is_file():
        made = json.loads(marker.read_text()).get("preset", {})
        if made.get("name") != preset.name:
            raise UserError(f"{marker}: this folder holds a {made.get('name')!r} demo; use another --out for "
                            f"{preset.name!r}")
        if made.get("packaged_vae", False) != preset.packaged_vae:
            how = "the packaged VAE" if made.get("packaged_vae", False) else "a VAE trained by --train-vae"
            raise UserError(f"{marker}: this folder's demo uses {how}; use another --out (or the same --train-vae "
                            "choice)")
    elif out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: exists and is not a demo folder; choose a new --out folder")
    out.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"preset": preset.as_dict()})


def run_demo(out: str | Path, preset: DemoPreset, seed: int = 0, log: Callable[[str], None] = console.print) -> dict:
    """Run (or resume) every stage; returns the headline numbers, the report path and stage times."""
    demo = Demo(out, preset, seed)
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
