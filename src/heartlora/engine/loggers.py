"""``--log-to``: where a run logs each epoch, beside train.log, metrics.json and the plots.

- ``csv`` (the default): ``metrics.csv`` in the run folder, one row per epoch (loss, accuracy, learning rate,
  attention heads on), rewritten atomically at every epoch's end; a resumed run keeps the rows up to its checkpoint.
- ``tensorboard``: event files in ``DIR/tensorboard`` (the same scalars by epoch, and at the end of warmup the
  heads' responsiveness as a histogram and as a layers × heads image); a resumed run purges the steps after its
  checkpoint, and a run started afresh in the folder (``--overwrite``) every step of the earlier run. Needs the
  tensorboard package.
- ``wandb`` / ``mlflow``: the same scalars (and for wandb the score histogram) in the user's own set-up
  (``WANDB_PROJECT``, default ``heartlora``; ``MLFLOW_TRACKING_URI``), the run named after its folder; a resumed
  run continues the same wandb / mlflow run (found by the run's id). Need their package.

Only rank 0 logs. A logger whose package is missing is refused before the run starts, in one line naming it.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import time
from pathlib import Path
from typing import Any

import torch

from heartlora._paths import atomic_path
from heartlora.errors import ConfigError

CSV_NAME = "metrics.csv"
TB_DIR = "tensorboard"
CHOICES = ("csv", "tensorboard", "wandb", "mlflow")
# logger → (the module that must import, the package to install)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
CSV_COLUMNS = ("epoch", "train_loss", "train_acc", "eval_acc", "eval_split", "lr", "heads_on", "heads_total",
               "time_s", "images_per_s")


def parse_log_to(value: str | None) -> tuple[str, ...]:
    """``--log-to`` as a tuple of loggers (comma-separated; default csv). Unknown names and missing packages are
    refused in one line."""
    names = tuple(dict.fromkeys(n.strip().lower() for n in (value or "csv").split(",") if n.strip()))
    unknown = [n for n in names if n not in CHOICES]
    if unknown or not names:
        raise ConfigError(f"--log-to {value!r}: {', '.join(unknown) or 'nothing'} is not a logger; choose from "
                          f"{', '.join(CHOICES)} (several: comma-separated, e.g. csv,tensorboard)")
    for name in names:
        module, package = PACKAGES.get(name, (None, None))
        if module is not None and importlib.util.find_spec(module) is None:
            raise ConfigError(f"--log-to {name} needs the {package} package, which is not installed: pip install "
                              f"{package}, or leave {name} out of --log-to")
    return names


def heads_image(scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """Layers × heads responsiveness, each score ÷ the largest, as a (1, layers, heads) image in [0, 1]; layers with
    fewer heads (Swin stages) are padded with zeros."""
    rows = [torch.as_tensor(v, dtype=torch.float32).flatten() for v in scores.values()]
    width = max((len(r) for r in rows), default=0)
    img = torch.zeros(1, len(rows), width)
    for i, r in enumerate(rows):
        img[0, i, :len(r)] = r
    top = float(img.max()) if img.numel() else 0.0
    return img / top if top > 0 else img


class RunLoggers:
    """The loggers of one run (rank 0): ``epoch`` after every epoch, ``head_scores`` at the end of warmup,
    ``close`` at the end (also after an error or a stop)."""

    def __init__(self, names: tuple[str, ...], out: Path, settings: dict[str, Any], start_epoch: int,
                 resumed: bool = False, run_id: str | None = None,
                 restarted: dict[str, torch.Tensor] | None = None) -> None:
        self.names, self.out = names, Path(out)
        self.rows: dict[int, dict[str, Any]] = {}
        self.tb = self.wandb = self.mlflow = None
        if "csv" in names and start_epoch > 0 and (self.out / CSV_NAME).is_file():
            self.rows = {row["epoch"]: row for row in _read_csv(self.out / CSV_NAME) if row["epoch"] <= start_epoch}
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            # TensorBoard hides the folder's earlier events from this step on: a resumed run's steps after its
            # checkpoint (one at epoch 0, after a --score-restart probe, keeps what it logged), and every step of
            # an earlier run the folder held when this run starts afresh (--overwrite, or a run killed before its
            # first checkpoint), so one run's curves never mix with another's
            # (``restarted``: resumed from the checkpoint a --score-restart saved, with the probe's scores: as restart)
            purge = 1 if restarted else start_epoch + 1 if start_epoch else (None if resumed else 0)
            _past_earlier_events(self.out / TB_DIR)
            self.tb = SummaryWriter(str(self.out / TB_DIR), purge_step=purge)
            if restarted:
                self._tb_scores(restarted, 1)
        if "wandb" in names:
            import wandb

            # the run's id (kept in its checkpoint) is the wandb run's: a --resume continues the same wandb run
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "heartlora"), name=self.out.name,
                                    dir=str(self.out), config=settings, resume="allow",
                                    **({"id": f"heartlora-{run_id}"} if run_id else {}))
        if "mlflow" in names:
            import mlflow

            self.mlflow = mlflow
            # a --resume continues the mlflow run tagged with this run's id, in the active experiment
            earlier = mlflow.search_runs(filter_string=f"tags.heartlora_run_id = '{run_id}'", output_format="list",
                                         max_results=1) if run_id and resumed else []
            if earlier:
                mlflow.start_run(run_id=earlier[0].info.run_id)
            else:
                mlflow.start_run(run_name=self.out.name, tags={"heartlora_run_id": run_id} if run_id else None)
                mlflow.log_params({k: v for k, v in settings.items() if v is not None})

    def epoch(self, record: dict[str, Any], heads_on: int | None, heads_total: int | None) -> None:
        row = {k: record.get(k) for k in CSV_COLUMNS}
        row.update(heads_on=heads_on, heads_total=heads_total)
        step = int(record["epoch"])
        scalars = {"train/loss": record["train_loss"], "train/accuracy": record["train_acc"], "lr": record["lr"]}
        if record.get("eval_acc") is not None:
            scalars[f"{record.get('eval_split') or 'eval'}/accuracy"] = record["eval_acc"]
        if heads_on is not None:
            scalars["heads_on"] = heads_on
        if "csv" in self.names:
            self.rows = {e: r for e, r in self.rows.items() if e < step}  # --score-restart begins again at 1
            self.rows[step] = row
            _write_csv(self.out / CSV_NAME, [self.rows[e] for e in sorted(self.rows)])
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({**scalars, "epoch": step})
        if self.mlflow is not None:
            self.mlflow.log_metrics({k.replace("/", "_"): float(v) for k, v in scalars.items()}, step=step)

    def restart(self, scores: dict[str, torch.Tensor]) -> None:
        """--score-restart: training begins again at epoch 1. The csv's rows of the probe's epochs are replaced as the
        new ones come; TensorBoard's writer opens again purging from step 1 (else the probe's epochs would stay
        beside the new ones), and the heads' scores the probe measured are logged again at step 1."""
        if self.tb is None:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.tb.close()
        _past_earlier_events(self.out / TB_DIR)
        self.tb = SummaryWriter(str(self.out / TB_DIR), purge_step=1)
        if scores:
            self._tb_scores(scores, 1)
        self.tb.flush()

    def _tb_scores(self, scores: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        """Every head's responsiveness into TensorBoard at ``step``: a histogram and a layers × heads image; returns
        the flat scores."""
        flat = torch.cat([torch.as_tensor(v, dtype=torch.float64).flatten() for v in scores.values()])
        if self.tb is not None:
            self.tb.add_histogram("heads/responsiveness", flat, step)
            self.tb.add_image("heads/responsiveness_layers_x_heads", heads_image(scores), step, dataformats="CHW")
            self.tb.flush()
        return flat

    def head_scores(self, scores: dict[str, torch.Tensor], step: int) -> None:
        """The warmup's responsiveness of every head: a histogram and a layers × heads image (TensorBoard), a
        histogram (wandb)."""
        if not scores:
            return
        flat = self._tb_scores(scores, step)
        if self.wandb is not None:
            import wandb

            self.wandb.log({"heads/responsiveness": wandb.Histogram(flat.numpy())})

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        if self.mlflow is not None:
            self.mlflow.end_run()
            self.mlflow = None


def _past_earlier_events(folder: Path) -> None:
    """Wait, when needed, until the clock is past the second of the folder's newest event file. TensorBoard reads a
    folder's files in name order, and a name is ``events.out.tfevents.<second>.<host>.<pid>.<counter>``: a writer
    opened within the same second as an earlier one (a quick restart or resume) could sort before it (counter 10
    before 9, or another pid), and the purge that hides the earlier run's later steps would come first, hiding
    nothing. Costs at most a second, only then."""
    stamps = [int(part) for p in folder.glob("events.out.tfevents.*")
              if (part := p.name.split(".")[3]).isascii() and part.isdigit()]
    while stamps and time.time() < max(stamps) + 1:
        time.sleep(0.05)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in CSV_COLUMNS})
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")


def _read_csv(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.csv this module wrote (epoch as int, the rest as written); unreadable rows skipped."""
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            try:
                row["epoch"] = int(row["epoch"])
            except (KeyError, TypeError, ValueError):
                continue
            rows.append(row)
    return rows
