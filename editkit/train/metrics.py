"""Where training numbers go: metrics.csv always, TensorBoard by default, WandB (offline) on request.

Only the main process logs. A resumed run keeps the rows up to its resume step and continues the
same metrics.csv (and purges later TensorBoard events), so no step appears twice.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from editkit.errors import UserError


class MetricsLogger:
    def __init__(self, out_dir: str | Path, tensorboard: bool = True, wandb: bool = False,
                 run_name: str | None = None, config: dict | None = None, resume_step: int = 0):
        self.out_dir = Path(out_dir)
        self.csv_path = self.out_dir / "metrics.csv"
        self.columns, self.rows = _read_rows(self.csv_path, resume_step)
        if self.rows or self.csv_path.exists():
            self._rewrite()
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out_dir / "tensorboard"),
                                    purge_step=resume_step + 1 if resume_step else None)
        self.wandb = None
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError:
                raise UserError("loop.wandb=true needs the wandb package: pip install wandb "
                                "(or set loop.wandb=false; TensorBoard and metrics.csv still log)") from None
            os.environ.setdefault("WANDB_MODE", "offline")
            self.wandb = wandb_lib.init(project="editkit", name=run_name, dir=str(self.out_dir),
                                        config=config, resume="allow")

    def log(self, step: int, values: dict[str, float]) -> None:
        row = {"step": step, **{k: float(v) for k, v in values.items()}}
        new = [k for k in row if k not in self.columns]
        self.rows.append(row)
        if new:
            self.columns += new
            self._rewrite()
        else:
            with open(self.csv_path, "a", newline="") as f:
                csv.DictWriter(f, self.columns).writerow(row)
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def image(self, tag: str, path: Path, step: int) -> None:
        if self.tb is not None:
            import numpy as np
            from PIL import Image

            self.tb.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
        if self.wandb is not None:
            import wandb as wandb_lib

            self.wandb.log({tag: wandb_lib.Image(str(path))}, step=step)

    def _rewrite(self) -> None:
        from editkit.utils.atomic import atomic_path

        with atomic_path(self.csv_path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, self.columns)
            w.writeheader()
            w.writerows(self.rows)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _read_rows(path: Path, keep_until: int) -> tuple[list[str], list[dict]]:
    """The columns (the file's header: every column any row has) and the rows up to step keep_until."""
    if not path.is_file() or keep_until <= 0:
        return ["step"], []
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = [{k: float(v) if k != "step" else int(v) for k, v in r.items() if v not in ("", None)}
                    for r in reader if int(r["step"]) <= keep_until]
            return list(reader.fieldnames or ["step"]), rows
    except (ValueError, TypeError, KeyError, csv.Error):  # a cell that is no number, a row cut short
        raise UserError(f"{path}: damaged training log (line {reader.line_num}); restore it, or start again "
                        "with --overwrite") from None
