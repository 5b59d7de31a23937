"""editkit against diffusers on one GPU, in one process, on the same model and inputs.

Sections (``--sections``, comma-separated, run in this order):
  env    versions, GPU, that editkit imports
  peak   bf16 matmul rate (8192^3) and device-to-device copy bandwidth: the ceilings for MFU
  dit    transformer forward and true-CFG step at 1024x1024 + one 1024x1024 condition + 230 text
         tokens: diffusers eager / regional compile, then editkit's paths (attention backend,
         batched CFG, compile), each with its error against the diffusers eager output
  lossy  FP8 matmuls (torchao) and first-block cache, each with its error against bf16
  train  LoRA r64 step (DiffSynth targets, batch 1, gradient checkpointing, AdamW): plain
         diffusers + PEFT against editkit's settings; s/step, peak memory, loss/grad error
  e2e    a whole 1024x1024 edit with true CFG: QwenImageEditPlusPipeline against editkit's
         engine, with the full-size Qwen2.5-VL-7B text encoder and VAE
  lowmem editkit within 24 GiB (fp8 weights or group offload), speed and peak memory
  scaling true-CFG step time and peak memory at 512²..1536², one and two condition images
  fast   FP8 matmuls + FA3 + compiled fused blocks: the fast mode's step and its error
  lightning  e2e 40-step true-CFG edit against the Lightning 8- and 4-step presets

Usage on the GPU machine (random bf16 weights built on the GPU; nothing is downloaded):
  PYTHONPATH=$PWD:/tmp/site python bench/gpu_bench.py --sections env,peak,dit --out $OUT
CPU smoke test (the tiny preset, no compile): see tests/test_bench_smoke.py.
Results: one JSON (``--out``/bench.json), a profile table per section, and a table on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.fullsize import PRESETS, bench_dtype, build_model, build_transformer, lora_targets  # noqa: E402
from editkit.models import accel  # noqa: E402

GiB = 2**30
CFG_SCALE = 4.0


class Run:
    """Shared state of one benchmark process: arguments, results, timing and memory helpers."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.preset = PRESETS[args.preset]
        self.start = time.time()
        self.results = {"meta": {"argv": sys.argv, "preset": args.preset}, "rows": [], "errors": []}
        self.out = args.out
        if self.out:
            os.makedirs(self.out, exist_ok=True)

    def log(self, msg: str) -> None:
        print(f"[{time.time() - self.start:7.1f}s] {msg}", flush=True)

    def record(self, section: str, name: str, **values) -> dict:
        row = {"section": section, "name": name, **values}
        self.results["rows"].append(row)
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in values.items())
        self.log(f"{section} | {name} | {shown}")
        self.save()
        return row

    def error(self, where: str, exc: BaseException) -> None:
        self.results["errors"].append({"where": where, "error": f"{type(exc).__name__}: {exc}"})
        self.log(f"ERROR in {where}: {type(exc).__name__}: {exc}")
        traceback.print_exc()
        self.save()

    def save(self) -> None:
        if self.out:
            path = os.path.join(self.out, "bench.json")
            with open(path + ".tmp", "w") as f:
                json.dump(self.results, f, indent=1, default=str)
            os.replace(path + ".tmp", path)

    def write(self, name: str, text: str) -> None:
        if self.out:
            with open(os.path.join(self.out, name), "a") as f:
                f.write(text + "\n")

    def out_of_time(self) -> bool:
        return self.args.deadline and time.time() - self.start > self.args.deadline

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn, reps: int | None = None, warmup: int = 1) -> dict:
        """Median seconds of `fn()` over `reps` runs after `warmup` runs (device-synchronised)."""
        reps = reps or self.args.reps
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        times.sort()
        return {"s": times[len(times) // 2], "min_s": times[0], "reps": reps}

    def reset_peak(self) -> None:
        if self.cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / GiB if self.cuda else None

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return v


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float32 (NaN if either has non-finite values)."""
    a, b = a.float(), b.float()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("nan")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ----- ceilings ---------------------------------------------------------------------------------


def section_env(run: Run) -> None:
    import diffusers
    import peft
    import transformers

    import editkit.models.accel  # noqa: F401
    import editkit.models.qwen_image_edit  # noqa: F401

    meta = run.results["meta"]
    meta.update(torch=torch.__version__, diffusers=diffusers.__version__, transformers=transformers.__version__,
                peft=peft.__version__, python=sys.version.split()[0])
    try:
        import torchao

        meta["torchao"] = torchao.__version__
    except ImportError:
        meta["torchao"] = None
    if run.cuda:
        props = torch.cuda.get_device_properties(run.device)
        meta.update(gpu=props.name, gpu_mem_gib=props.total_memory / GiB, sms=props.multi_processor_count,
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    run.log(f"env: {json.dumps(meta, default=str)}")


def section_peak(run: Run) -> None:
    n = 8192 if run.cuda else 512
    a, b = (torch.randn(n, n, device=run.device, dtype=torch.bfloat16) for _ in range(2))
    t = run.time(lambda: a @ b, reps=10, warmup=3)
    tflops = 2 * n**3 / t["s"] / 1e12
    run.results["meta"]["peak_tflops"] = tflops
    run.record("peak", f"bf16 matmul {n}^3", tflops=tflops)
    x = torch.empty(2 * GiB if run.cuda else 2**24, dtype=torch.uint8, device=run.device)
    y = torch.empty_like(x)
    t = run.time(lambda: y.copy_(x), reps=10, warmup=3)
    run.record("peak", "device copy", tb_per_s=2 * x.numel() / t["s"] / 1e12)
    del a, b, x, y


# ----- transformer ------------------------------------------------------------------------------


class DitInputs:
    """Random inputs of one 1024x1024 edit with one 1024x1024 condition image (2x2-packed latents)."""

    def __init__(self, run: Run, text_tokens: int | None = None, neg_tokens: int | None = None):
        p, d = run.preset, run.device
        g = torch.Generator(device=d).manual_seed(1)
        n, dim = p.tokens_per_image(), p.arch.transformer["joint_attention_dim"]
        lt = text_tokens or p.text_tokens

        def randn(*shape):
            return torch.randn(*shape, generator=g, device=d, dtype=bench_dtype(d))

        self.num_target = n
        self.latents = randn(1, n, p.arch.transformer["in_channels"])
        self.cond = randn(1, n, p.arch.transformer["in_channels"])
        self.pos = randn(1, lt, dim)
        self.neg = randn(1, neg_tokens or lt, dim)
        side = p.size // 16
        self.img_shapes = [(1, side, side), (1, side, side)]
        self.sigma, self.sigma_next = 0.7, 0.675


def forward(tr, x: DitInputs, latents, text, mask=None):
    """The transformer's velocity for the target tokens (the pipelines' call)."""
    b = latents.shape[0]
    hidden = torch.cat([latents, x.cond.expand(b, -1, -1)], dim=1)
    t = torch.full((b,), x.sigma, device=latents.device, dtype=latents.dtype)
    out = tr(hidden_states=hidden, timestep=t, encoder_hidden_states=text, encoder_hidden_states_mask=mask,
             img_shapes=[x.img_shapes] * b, return_dict=False)[0]
    return out[:, : x.num_target]


def cfg_combine(cond, uncond, scale=CFG_SCALE):
    """True CFG with the combined prediction rescaled to the conditional one's norm (the pipelines' rule)."""
    comb = uncond + scale * (cond - uncond)
    return comb * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))


def cfg_step_two_pass(tr, x: DitInputs):
    """One denoising step as QwenImageEditPlusPipeline runs it: a conditional and an unconditional pass."""
    cond = forward(tr, x, x.latents, x.pos)
    uncond = forward(tr, x, x.latents, x.neg)
    return x.latents + (x.sigma_next - x.sigma) * cfg_combine(cond, uncond)


def cfg_step_batched(tr, x: DitInputs):
    """editkit's step: both CFG branches in one batch-2 pass (prompts padded + masked when lengths differ)."""
    if x.pos.shape[1] == x.neg.shape[1]:
        text, mask = torch.cat([x.pos, x.neg]), None
    else:
        length = max(x.pos.shape[1], x.neg.shape[1])
        text = torch.zeros(2, length, x.pos.shape[2], device=x.pos.device, dtype=x.pos.dtype)
        mask = torch.zeros(2, length, dtype=torch.bool, device=x.pos.device)
        for i, e in enumerate((x.pos, x.neg)):
            text[i, : e.shape[1]], mask[i, : e.shape[1]] = e[0], True
    cond, uncond = forward(tr, x, x.latents.expand(2, -1, -1), text, mask).chunk(2)
    return x.latents + (x.sigma_next - x.sigma) * cfg_combine(cond, uncond)


def dit_flops(run: Run, batch: int = 1) -> float:
    """Matmul + attention FLOPs of one forward (the modulation linears are negligible)."""
    p = run.preset.arch.transformer
    d = p["attention_head_dim"] * p["num_attention_heads"]
    n = run.preset.total_tokens()
    per_token = (4 * d * d + 2 * d * 4 * d) * 2  # qkv + out, MLP (4x), as multiply-adds x2
    attention = 4 * n * n * d
    return batch * p["num_layers"] * (n * per_token + attention)


def mfu(run: Run, seconds: float, flops: float) -> float | None:
    peak = run.results["meta"].get("peak_tflops")
    return flops / seconds / 1e12 / peak if peak else None


def profile_table(run: Run, fn, title: str, rows: int = 25) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.cuda else [])
    fn()
    run.sync()
    with profile(activities=activities) as prof:
        fn()
        run.sync()
    key = "self_cuda_time_total" if run.cuda else "self_cpu_time_total"
    run.write("profile.txt", f"===== {title}\n" + prof.key_averages().table(sort_by=key, row_limit=rows,
                                                                           max_name_column_width=90))


def check_gelu_epilogue(run: Run) -> None:
    """cuBLASLt's GELU epilogue (`_addmm_activation`) against tanh-GELU after the matmul, on this GPU."""
    d = run.device
    x = torch.randn(4096, 3072, device=d, dtype=torch.bfloat16)
    w = torch.randn(12288, 3072, device=d, dtype=torch.bfloat16) / 3072**0.5
    b = torch.randn(12288, device=d, dtype=torch.bfloat16)
    fused = torch._addmm_activation(b, x, w.t(), use_gelu=True)
    ref64 = F.gelu(F.linear(x.double(), w.double(), b.double()), approximate="tanh")
    unfused = F.gelu(F.linear(x, w, b), approximate="tanh")
    run.record("dit", "check: GELU epilogue vs tanh-GELU (float64 ref)", err=rel_err(fused, ref64),
               unfused_err=rel_err(unfused, ref64),
               erf_gelu_err=rel_err(F.gelu(F.linear(x.double(), w.double(), b.double())), ref64))


def section_dit(run: Run) -> None:
    tr = build_transformer(run.preset, run.device)
    x = DitInputs(run)
    xm = DitInputs(run, neg_tokens=run.preset.text_tokens * 3 // 4)
    flops = dit_flops(run)

    def variant(name, fn, ref_out, baseline=None, flops_=None):
        out = fn()
        t = run.time(fn)
        row = dict(**t, err=rel_err(out, ref_out))
        if baseline:
            row["speedup"] = baseline / t["s"]
        if flops_:
            row["mfu"] = mfu(run, t["s"], flops_)
        return run.record("dit", name, **row)

    with torch.no_grad():
        ref = forward(tr, x, x.latents, x.pos)
        ref_step = cfg_step_two_pass(tr, x)
        ref_m = cfg_step_two_pass(tr, xm)
        t = run.time(lambda: forward(tr, x, x.latents, x.pos))
        run.record("dit", "diffusers eager forward", **t, mfu=mfu(run, t["s"], flops), tokens=run.preset.total_tokens(),
                   attention_default=str(torch.backends.cuda.cudnn_sdp_enabled()) if run.cuda else None)
        base = run.time(lambda: cfg_step_two_pass(tr, x))
        run.record("dit", "diffusers eager true-CFG step (2 passes)", **base)
        base = run.results["meta"]["dit_baseline_step_s"] = base["s"]
        profile_table(run, lambda: cfg_step_two_pass(tr, x), "dit: diffusers eager CFG step")
        if run.cuda:
            check_gelu_epilogue(run)
        backends = ["_native_cudnn", "_native_flash", "_native_efficient"] if run.cuda else ["_native_math"]
        if run.args.quick_dit:
            backends = []
        for backend in backends:
            try:
                accel.set_attention(tr, backend)
                variant(f"eager forward, attention {backend}", lambda: forward(tr, x, x.latents, x.pos), ref)
            except Exception as exc:  # noqa: BLE001 - one backend failing must not stop the others
                run.error(f"dit attention {backend}", exc)
        best = accel.set_attention(tr, "auto")
        variant(f"editkit eager true-CFG step (batched, attention {best})", lambda: cfg_step_batched(tr, x),
                ref_step, base)
        variant(f"editkit eager true-CFG step (batched, padded+masked, {best})", lambda: cfg_step_batched(tr, xm),
                ref_m)

        if run.args.compile and not run.args.quick_dit:
            try:
                accel.set_attention(tr, None)
                accel.compile_blocks(tr)
                t0 = time.time()
                forward(tr, x, x.latents, x.pos)
                run.sync()
                run.record("dit", "diffusers regional compile: compile time", compile_s=time.time() - t0)
                variant("diffusers regional compile forward", lambda: forward(tr, x, x.latents, x.pos), ref,
                        flops_=flops)
                variant("diffusers regional compile true-CFG step (2 passes)", lambda: cfg_step_two_pass(tr, x),
                        ref_step, base)
            except Exception as exc:  # noqa: BLE001
                run.error("dit diffusers compile", exc)
        if run.args.compile:
            for fused in (True,) if run.args.quick_dit else (False, True):
                label = "editkit compiled" + (" + fused ops" if fused else "")
                try:
                    torch._dynamo.reset()
                    if fused:
                        accel.fuse_block_ops(tr)
                    accel.set_attention(tr, "auto")
                    accel.compile_blocks(tr, mode=run.args.compile_mode)
                    if run.args.compile_mode:
                        label += f" [{run.args.compile_mode}]"
                    variant(f"{label} forward ({best})", lambda: forward(tr, x, x.latents, x.pos), ref,
                            flops_=flops)
                    if not run.args.compile_mode:
                        variant(f"{label} true-CFG step, 2 passes", lambda: cfg_step_two_pass(tr, x), ref_step, base)
                    variant(f"{label} true-CFG step, batched", lambda: cfg_step_batched(tr, x), ref_step, base,
                            2 * flops)
                    if not run.args.compile_mode:  # each new shape is another (long) autotuned compile
                        variant(f"{label} true-CFG step, batched padded+masked", lambda: cfg_step_batched(tr, xm),
                                ref_m, base)
                        variant(f"{label} true-CFG step, 2 passes, unequal prompts",
                                lambda: cfg_step_two_pass(tr, xm), ref_m, base)
                    profile_table(run, lambda: cfg_step_batched(tr, x), f"dit: {label} batched CFG step", rows=40)
                except Exception as exc:  # noqa: BLE001
                    run.error(f"dit {label}", exc)
    del tr
    torch._dynamo.reset()
    run.free()


def denoise_loop(tr, x: DitInputs, steps: int):
    """`steps` Euler steps with batched true CFG from x.latents (sigmas linspace(1, 1/steps)); returns latents."""
    saved = x.latents, x.sigma, x.sigma_next
    sigmas = torch.linspace(1.0, 1.0 / steps, steps).tolist() + [0.0]
    try:
        for i in range(steps):
            x.sigma, x.sigma_next = sigmas[i], sigmas[i + 1]
            with tr.cache_context("cfg"):
                x.latents = cfg_step_batched(tr, x)
        return x.latents
    finally:
        x.latents, x.sigma, x.sigma_next = saved


def section_lossy(run: Run) -> None:
    tr = build_transformer(run.preset, run.device)
    x = DitInputs(run)
    steps = run.args.cache_steps
    with torch.no_grad():
        accel.set_attention(tr, "auto")
        ref = forward(tr, x, x.latents, x.pos)
        ref_step = cfg_step_batched(tr, x)
        t0 = time.time()
        ref_loop = denoise_loop(tr, x, steps)
        run.sync()
        loop_s = time.time() - t0
        run.record("lossy", f"bf16 eager {steps}-step loop (batched CFG)", s=loop_s, per_step_s=loop_s / steps)
        for threshold in run.args.cache_thresholds:
            try:
                accel.enable_first_block_cache(tr, threshold)
                t0 = time.time()
                out = denoise_loop(tr, x, steps)
                run.sync()
                s = time.time() - t0
                run.record("lossy", f"first-block cache {threshold} {steps}-step loop (eager)", s=s,
                           per_step_s=s / steps, speedup=loop_s / s, err=rel_err(out, ref_loop))
                tr.disable_cache()
            except Exception as exc:  # noqa: BLE001
                run.error(f"lossy first-block cache {threshold}", exc)
        if run.cuda:
            try:
                accel.apply_fp8(tr, "matmul")
                run.free()
                out = forward(tr, x, x.latents, x.pos)
                t = run.time(lambda: forward(tr, x, x.latents, x.pos))
                run.record("lossy", "fp8 matmul eager forward", **t, err=rel_err(out, ref))
                if run.args.compile:
                    accel.compile_blocks(tr)
                    out = forward(tr, x, x.latents, x.pos)
                    t = run.time(lambda: forward(tr, x, x.latents, x.pos))
                    run.record("lossy", "fp8 matmul compiled forward", **t, err=rel_err(out, ref))
                step = cfg_step_batched(tr, x)
                t = run.time(lambda: cfg_step_batched(tr, x))
                run.record("lossy", "fp8 matmul true-CFG step (batched)", **t, err=rel_err(step, ref_step),
                           speedup=run.results["meta"].get("dit_baseline_step_s", float("nan")) / t["s"])
                profile_table(run, lambda: cfg_step_batched(tr, x), "lossy: fp8 batched CFG step")
            except Exception as exc:  # noqa: BLE001
                run.error("lossy fp8", exc)
    del tr
    torch._dynamo.reset()
    run.free()


# ----- training ---------------------------------------------------------------------------------


def add_lora(tr, rank: int = 64):
    """PEFT LoRA on DiffSynth's default targets; B gets small random values so every grad is non-zero."""
    from peft import LoraConfig

    tr.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(lora_targets()), init_lora_weights=True))
    g = torch.Generator(device="cpu").manual_seed(2)
    params = []
    for name, p in tr.named_parameters():
        if "lora_" in name:
            if "lora_B" in name:
                p.data.copy_(torch.randn(p.shape, generator=g).mul_(1e-3).to(p.dtype))
            params.append(p)
    return params


class TrainBatch:
    def __init__(self, run: Run):
        self.x = DitInputs(run)
        g = torch.Generator(device=run.device).manual_seed(3)
        self.target = torch.randn(self.x.latents.shape, generator=g, device=run.device, dtype=torch.float32)


def train_step(tr, opt, batch: TrainBatch, autocast: bool, grads: list | None = None):
    """One LoRA step: forward with grad, MSE to a velocity target, backward, optimizer step."""
    x = batch.x
    # Autocast only matters for bf16 weights (GPU): it runs fp32 LoRA weights' matmuls in bf16.
    use = autocast and x.latents.dtype == torch.bfloat16
    ctx = torch.autocast(x.latents.device.type, dtype=torch.bfloat16) if use else contextlib.nullcontext()
    with ctx:
        pred = forward(tr, x, x.latents, x.pos)
    loss = F.mse_loss(pred.float(), batch.target)
    loss.backward()
    if grads is not None:
        with_grad = [p.grad for p in opt.param_groups[0]["params"] if p.grad is not None]
        grads.append(torch.cat([g.float().flatten() for g in with_grad[:48]]))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def section_train(run: Run) -> None:
    tr = build_transformer(run.preset, run.device)
    params = add_lora(tr)
    tr.train()
    batch = TrainBatch(run)
    n_params = sum(p.numel() for p in params)
    run.results["meta"]["lora_params"] = n_params
    flops = 3 * dit_flops(run) + dit_flops(run)  # fwd + recompute + bwd (input grads ~ 2x fwd for frozen weights)

    def measure(name, autocast, fused, checkpointing, compile_, reference=None):
        if checkpointing == "full":
            tr.enable_gradient_checkpointing()
        elif checkpointing == "selective":
            accel.enable_checkpointing(tr, selective=True)
        else:
            tr.disable_gradient_checkpointing()
        if compile_:
            torch._dynamo.reset()
            accel.compile_blocks(tr)
        # lr=0: every variant sees the same weights, so losses and grads are comparable.
        opt = torch.optim.AdamW(params, lr=0.0, fused=True) if fused else torch.optim.AdamW(params, lr=0.0)
        grads = []
        t0 = time.time()
        loss = train_step(tr, opt, batch, autocast, grads).item()
        first_s = time.time() - t0
        train_step(tr, opt, batch, autocast)
        run.reset_peak()
        t = run.time(lambda: train_step(tr, opt, batch, autocast), warmup=0)
        peak = run.peak_gib()
        row = dict(**t, peak_gib=peak, loss=loss, first_step_s=first_s, mfu=mfu(run, t["s"], flops))
        if reference is not None:
            row.update(speedup=reference["s"] / t["s"], grad_err=rel_err(grads[0], reference["grads"]),
                       loss_err=abs(loss - reference["loss"]) / abs(reference["loss"]))
            if peak is not None and reference["peak_gib"] is not None:
                row["mem_ratio"] = peak / reference["peak_gib"]
        run.record("train", name, **row)
        del opt
        run.free()
        return dict(row, grads=grads[0])

    try:
        base = measure("diffusers+PEFT LoRA step (bf16 LoRA, eager, full ckpt, AdamW foreach)", False, False, "full",
                       False)
        run.results["meta"]["train_baseline_s"] = base["s"]
        if run.args.compile:
            accel.fuse_block_ops(tr)
            try:
                measure("editkit compiled + fused ops (bf16 LoRA as baseline, full ckpt, fused AdamW)", False, True,
                        "full", True, base)
            except Exception as exc:  # noqa: BLE001
                run.error("train compiled bf16", exc)
                run.free()
        for p in params:  # editkit's trainer keeps LoRA weights in float32 and runs them under bf16 autocast
            p.data = p.data.float()
        if not run.args.quick_train:
            measure("editkit trainer settings (fp32 LoRA + bf16 autocast, fused AdamW, full ckpt, eager)", True, True,
                    "full", False, base)
        if run.args.compile:
            ckpts = ("full",) if run.args.quick_train else ("full", "selective")
            for ckpt in ckpts:
                try:
                    measure(f"editkit compiled + fused ops ({ckpt} ckpt, fp32 LoRA + autocast, fused AdamW)", True,
                            True, ckpt, True, base)
                except Exception as exc:  # noqa: BLE001
                    run.error(f"train compiled {ckpt}", exc)
                    run.free()
        else:
            measure("editkit eager selective ckpt", True, True, "selective", False, base)
    except Exception as exc:  # noqa: BLE001
        run.error("train", exc)
    del tr, params
    torch._dynamo.reset()
    run.free()


# ----- end to end -------------------------------------------------------------------------------


def source_image(run: Run):
    from PIL import Image

    g = torch.Generator().manual_seed(4)
    side = run.preset.size
    pixels = (torch.rand(side, side, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def section_e2e(run: Run) -> None:
    from diffusers import QwenImageEditPlusPipeline

    image = source_image(run)
    side, steps = run.preset.size, run.args.steps
    # the pipeline and editkit's engine share the networks of one model; sources at the output size
    model = build_model(run.preset, run.device, areas={"vae_image_area": side * side, "output_area": side * side})
    prompt = "Replace the red car in the picture with a blue bicycle and keep the background unchanged."
    negative = " "
    pipe = QwenImageEditPlusPipeline(
        scheduler=model.scheduler, vae=model.vae, text_encoder=model.text_encoder,
        tokenizer=model.tokenizer, processor=model.processor, transformer=model.transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    if run.preset.name != "full":
        import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus

        plus.CONDITION_IMAGE_SIZE, plus.VAE_IMAGE_SIZE = model.vlm_image_area, model.vae_image_area

    def run_pipe(n):
        return pipe(image=[image], prompt=prompt, negative_prompt=negative, true_cfg_scale=CFG_SCALE,
                    num_inference_steps=n, height=side, width=side, output_type="pt",
                    generator=torch.Generator("cpu").manual_seed(0)).images

    # The in-memory byte-level tokenizer spells the system prompt in more than the real tokenizer's
    # 64 tokens; drop exactly that prompt in the pipeline too, so both see the same text tokens.
    pipe.prompt_template_encode_start_idx = model.drop_idx

    def timed_pair(name, fn):
        """Seconds for `steps` and for 2 steps: per-step cost and fixed (encode + decode) cost."""
        fn(2)  # warm-up (and compilation)
        run.reset_peak()
        t0 = time.perf_counter()
        images = fn(steps)
        run.sync()
        full = time.perf_counter() - t0
        peak = run.peak_gib()
        t0 = time.perf_counter()
        fn(2)
        run.sync()
        short = time.perf_counter() - t0
        per_step = (full - short) / (steps - 2)
        return images, dict(s=full, per_step_s=per_step, fixed_s=full - steps * per_step, peak_gib=peak)

    with torch.no_grad():
        ref, row = timed_pair("diffusers", run_pipe)
        run.record("e2e", f"diffusers QwenImageEditPlusPipeline {steps} steps", **row)
        base_s = row["s"]
        from editkit.infer.engine import EditRequest, Engine

        accel.apply_accel(model, accel.Accel(compile=run.args.compile))
        engine = Engine(model)

        def run_engine(n):
            request = EditRequest(prompt=prompt, images=[image], negative_prompt=negative, true_cfg_scale=CFG_SCALE,
                                  steps=n, seed=0, width=side, height=side)
            return engine.edit([request])

        out, row = timed_pair("editkit", run_engine)
        profile_table(run, lambda: run_engine(2), "e2e: editkit Engine.edit, 2 steps", rows=40)
        import numpy as np

        got = torch.from_numpy(np.asarray(out[0], dtype=np.float32) / 255).permute(2, 0, 1)
        run.record("e2e", f"editkit Engine.edit {steps} steps", **row, speedup=base_s / row["s"],
                   pixel_err=rel_err(got, ref[0].float().cpu()))
    del pipe, model, engine
    torch._dynamo.reset()
    run.free()


def section_lowmem(run: Run) -> None:
    """editkit's low-memory mode (group offload, lossless) under a 24 GiB cap on the same GPU."""
    from editkit.infer.engine import EditRequest, Engine

    side, steps = run.preset.size, run.args.lowmem_steps
    model = build_model(run.preset, run.device, areas={"vae_image_area": side * side, "output_area": side * side})
    accel.apply_accel(model, accel.Accel(compile=False, offload="group"))
    run.free()
    cap = run.args.lowmem_gib
    if run.cuda:
        total = torch.cuda.get_device_properties(run.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * GiB / total), run.device.index or 0)
    engine = Engine(model)
    image = source_image(run)

    def edit(n):
        request = EditRequest(prompt="Turn the sky purple and add a small red kite.", images=[image],
                              negative_prompt=" ", true_cfg_scale=CFG_SCALE, steps=n, seed=0, width=side, height=side)
        engine.edit([request])
        run.sync()

    try:
        for tiling in (False, True):
            try:
                if tiling:
                    model.vae.enable_tiling()
                edit(2)
                run.reset_peak()
                t0 = time.perf_counter()
                edit(steps)
                full = time.perf_counter() - t0
                peak = run.peak_gib()
                t0 = time.perf_counter()
                edit(2)
                short = time.perf_counter() - t0
                per_step = (full - short) / (steps - 2)
                fixed = full - steps * per_step
                run.record("lowmem", f"editkit group offload (cap {cap} GiB{', VAE tiling' if tiling else ''})",
                           s=full, per_step_s=per_step, fixed_s=fixed, peak_gib=peak,
                           est_40_steps_s=fixed + 40 * per_step)
                break
            except torch.OutOfMemoryError as exc:
                run.error(f"lowmem (tiling={tiling})", exc)
                run.free()
    finally:
        if run.cuda:
            torch.cuda.set_per_process_memory_fraction(1.0, run.device.index or 0)
        del engine, model
        run.free()


# ----- how cost grows, the fast mode, Lightning ----------------------------------------------


def shaped_inputs(run: Run, side: int, conds: int) -> DitInputs:
    """DitInputs of a side x side edit with `conds` condition images of the same side."""
    x = DitInputs(run)
    g = torch.Generator(device=run.device).manual_seed(2)
    n, channels = (side // 16) ** 2, run.preset.arch.transformer["in_channels"]
    x.num_target = n
    x.latents = torch.randn(1, n, channels, generator=g, device=run.device, dtype=x.latents.dtype)
    x.cond = torch.randn(1, n * conds, channels, generator=g, device=run.device, dtype=x.latents.dtype)
    x.img_shapes = [(1, side // 16, side // 16)] * (1 + conds)
    return x


def section_scaling(run: Run) -> None:
    """True-CFG step time and peak memory from 512² to 1536², one and two condition images: the
    diffusers pipeline's two eager passes against editkit's batched step (eager; and compiled +
    fused for one condition image when time allows), so users see where attention dominates."""
    tr = build_transformer(run.preset, run.device)
    sides = [int(s) for s in run.args.scaling_sides.split(",")]
    rows = []
    with torch.no_grad():
        best = accel.set_attention(tr, "auto")
        for conds in (1, 2):
            for side in sides:
                if run.out_of_time():
                    run.log("scaling: past the deadline")
                    break
                x = shaped_inputs(run, side, conds)
                tokens = (1 + conds) * x.num_target + x.pos.shape[1]
                try:
                    accel.set_attention(tr, None)
                    ref = cfg_step_two_pass(tr, x)
                    run.reset_peak()
                    base = run.time(lambda: cfg_step_two_pass(tr, x))
                    base_peak = run.peak_gib()
                    accel.set_attention(tr, best)
                    out = cfg_step_batched(tr, x)
                    run.reset_peak()
                    ours = run.time(lambda: cfg_step_batched(tr, x))
                    name = f"{side}² + {conds} cond ({tokens} tokens)"
                    rows.append(run.record(
                        "scaling", name, side=side, conds=conds, tokens=tokens, diffusers_s=base["s"],
                        diffusers_peak_gib=base_peak, s=ours["s"], peak_gib=run.peak_gib(),
                        speedup=base["s"] / ours["s"], err=rel_err(out, ref), attention=best))
                except torch.OutOfMemoryError as exc:
                    run.error(f"scaling {side} {conds}", exc)
                run.free()
        if run.args.compile and not run.out_of_time():
            accel.fuse_block_ops(tr)
            accel.set_attention(tr, "auto")
            accel.compile_blocks(tr)
            for row in [r for r in rows if r["conds"] == 1]:
                if run.out_of_time():
                    break
                x = shaped_inputs(run, row["side"], 1)
                try:
                    cfg_step_batched(tr, x)  # compile for this shape
                    run.reset_peak()
                    t = run.time(lambda: cfg_step_batched(tr, x))
                    run.record("scaling", f"{row['side']}² + 1 cond compiled + fused", side=row["side"], conds=1,
                               s=t["s"], peak_gib=run.peak_gib(), speedup=row["diffusers_s"] / t["s"])
                except Exception as exc:  # noqa: BLE001
                    run.error(f"scaling compiled {row['side']}", exc)
    del tr
    torch._dynamo.reset()
    run.free()


def section_fast(run: Run) -> None:
    """The fast mode: FP8 matmuls + FA3 attention + compiled fused blocks, batched true-CFG step at
    1024², against the diffusers eager two-pass step, with its error against bf16."""
    tr = build_transformer(run.preset, run.device)
    x = DitInputs(run)
    with torch.no_grad():
        accel.set_attention(tr, None)
        ref_step = cfg_step_two_pass(tr, x)
        base = run.time(lambda: cfg_step_two_pass(tr, x))
        run.record("fast", "diffusers eager true-CFG step (2 passes)", **base)
        for attention in ("fa3", "auto"):
            try:
                torch._dynamo.reset()
                accel.apply_accel(tr, accel.Accel(attention=attention, compile=run.args.compile, fp8="matmul"))
                out = cfg_step_batched(tr, x)
                t = run.time(lambda: cfg_step_batched(tr, x))
                run.record("fast", f"fp8 matmul + {attention} attention + compiled fused, batched", **t,
                           speedup=base["s"] / t["s"], err=rel_err(out, ref_step))
                break
            except Exception as exc:  # noqa: BLE001 - without the fa3 wheel, the cuDNN row still runs
                run.error(f"fast {attention}", exc)
                del tr
                run.free()
                tr = build_transformer(run.preset, run.device)
    del tr
    torch._dynamo.reset()
    run.free()


def section_lightning(run: Run) -> None:
    """End to end: the 40-step true-CFG edit against the Lightning 8- and 4-step presets (CFG 1, the
    lightx2v scheduler; a random LoRA fused into the weights costs nothing per step), one engine."""
    from editkit.infer.engine import EditRequest, Engine
    from editkit.models.lightning import PRESETS as SAMPLING_PRESETS

    image = source_image(run)
    side = run.preset.size
    model = build_model(run.preset, run.device, areas={"vae_image_area": side * side, "output_area": side * side})
    accel.apply_accel(model, accel.Accel(compile=run.args.compile))
    prompt = "Replace the red car in the picture with a blue bicycle and keep the background unchanged."

    def edit(engine, steps, cfg):
        request = EditRequest(prompt=prompt, images=[image], negative_prompt=" ", true_cfg_scale=cfg, steps=steps,
                              seed=0, width=side, height=side)
        return engine.edit([request])

    with torch.no_grad():
        default = Engine(model)
        edit(default, 2, CFG_SCALE)  # compile
        t = run.time(lambda: edit(default, run.args.steps, CFG_SCALE), reps=1)
        run.record("lightning", f"{run.args.steps}-step true-CFG edit (lossless)", **t)
        base = t["s"]
        for name in ("lightning-8step", "lightning-4step"):
            preset = SAMPLING_PRESETS[name]
            engine = Engine(model.with_scheduler(preset.scheduler))
            edit(engine, preset.steps, preset.true_cfg_scale)
            t = run.time(lambda: edit(engine, preset.steps, preset.true_cfg_scale), reps=2)
            run.record("lightning", f"{name} edit (CFG {preset.true_cfg_scale:g}, lossless)", **t,
                       speedup=base / t["s"])
    del model
    torch._dynamo.reset()
    run.free()


# ----- main -------------------------------------------------------------------------------------

SECTIONS = {
    "env": section_env, "peak": section_peak, "dit": section_dit, "lossy": section_lossy,
    "train": section_train, "e2e": section_e2e, "lowmem": section_lowmem, "scaling": section_scaling,
    "fast": section_fast, "lightning": section_lightning,
}


def print_table(run: Run) -> None:
    meta = run.results["meta"]
    print("\n" + "=" * 100)
    print(f"{meta.get('gpu', run.device)} | torch {meta.get('torch')} | diffusers {meta.get('diffusers')} | "
          f"peak {_fmt(meta.get('peak_tflops'))} TFLOP/s | preset {meta['preset']}")
    keys = ("s", "speedup", "err", "grad_err", "pixel_err", "peak_gib", "mfu", "compile_s")
    print(f"{'section':7} {'name':70} " + " ".join(f"{k:>9}" for k in keys))
    for row in run.results["rows"]:
        vals = " ".join(f"{_fmt(row[k]) if k in row and row[k] is not None else '':>9}" for k in keys)
        print(f"{row['section']:7} {row['name'][:70]:70} {vals}")
    for err in run.results["errors"]:
        print(f"ERROR {err['where']}: {err['error'][:200]}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="full", choices=sorted(PRESETS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sections", default="env,peak,dit,lossy,train")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40, help="denoising steps of the end-to-end edit")
    ap.add_argument("--cache-steps", type=int, default=20, help="steps of the first-block cache loop")
    ap.add_argument("--cache-thresholds", type=float, nargs="*", default=[0.05, 0.1])
    ap.add_argument("--lowmem-steps", type=int, default=4, help="steps of the timed low-memory edit")
    ap.add_argument("--lowmem-gib", type=float, default=24.0, help="GPU memory cap of the low-memory mode")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode of editkit's dit blocks")
    ap.add_argument("--quick-train", action="store_true", help="train: baseline and the compiled editkit steps only")
    ap.add_argument("--quick-dit", action="store_true",
                    help="dit: only the diffusers eager baseline and editkit's fastest lossless path")
    ap.add_argument("--scaling-sides", default="512,768,1024,1536", help="scaling: image sides, comma-separated")
    ap.add_argument("--deadline", type=float, default=0, help="skip sections started after this many seconds")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    run = Run(args)
    for name in args.sections.split(","):
        if run.out_of_time():
            run.log(f"skipping {name}: past the deadline")
            continue
        run.log(f"=== {name}")
        try:
            SECTIONS[name](run)
        except Exception as exc:  # noqa: BLE001 - later sections still run and the JSON is kept
            run.error(name, exc)
        run.free()
    print_table(run)
    run.save()
    return run.results


if __name__ == "__main__":
    main()
