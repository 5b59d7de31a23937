"""Markdown tables from gpu_bench JSON results (the figures in docs/benchmarks.md come from here).

  python bench/report.py bench/results/run2.json [more.json ...]
"""

from __future__ import annotations

import json
import sys

COLUMNS = (
    ("s", "s"), ("per_step_s", "s/step"), ("fixed_s", "fixed s"), ("speedup", "speed-up"), ("err", "rel. err"),
    ("grad_err", "grad err"), ("pixel_err", "pixel err"), ("peak_gib", "peak GiB"), ("mfu", "MFU"),
    ("tflops", "TFLOP/s"), ("tb_per_s", "TB/s"), ("compile_s", "compile s"),
)


def fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value != value:
            return "nan"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def table(rows: list[dict]) -> str:
    used = [(k, label) for k, label in COLUMNS if any(k in r for r in rows)]
    lines = ["| section | measurement | " + " | ".join(label for _, label in used) + " |",
             "|---|---|" + "---|" * len(used)]
    for r in rows:
        lines.append(f"| {r['section']} | {r['name']} | " + " | ".join(fmt(r.get(k)) for k, _ in used) + " |")
    return "\n".join(lines)


def main(paths: list[str]) -> None:
    for path in paths:
        with open(path) as f:
            results = json.load(f)
        meta = results["meta"]
        print(f"### {path}\n")
        print(f"{meta.get('gpu')}, torch {meta.get('torch')}, CUDA {meta.get('cuda')}, cuDNN {meta.get('cudnn')}, "
              f"diffusers {meta.get('diffusers')}, transformers {meta.get('transformers')}, peft {meta.get('peft')}, "
              f"torchao {meta.get('torchao')}\n")
        print(table(results["rows"]))
        for err in results.get("errors", []):
            print(f"\n- error in {err['where']}: `{err['error'][:300]}`")
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
