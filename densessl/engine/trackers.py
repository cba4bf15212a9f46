"""Experiment trackers: where rank 0 sends the records it writes to metrics.jsonl (`train.tracker`).

- `tensorboard` (default): scalars `train/<key>` under run_dir/tensorboard. Without the
  tensorboard package it prints a note and logs nothing more: metrics.jsonl holds the same records.
- `wandb`: a W&B run named after run_dir, project $WANDB_PROJECT (default "densessl"), its files
  under run_dir, the resolved config as the run's config. WANDB_MODE=offline needs no network
  (`wandb sync` uploads later).
- `mlflow`: an MLflow run in experiment $MLFLOW_EXPERIMENT_NAME (default "densessl"), at
  $MLFLOW_TRACKING_URI or, without it, the file store run_dir/mlruns (no server, no network;
  `mlflow ui --backend-store-uri run_dir/mlruns`). The flattened config as parameters.
- `none`: metrics.jsonl only.

W&B and MLflow are imported only when chosen, through require_extra (extras [wandb], [mlflow]).
Every tracker gets the record's finite numbers at the record's `step`, under the record's key
names (TensorBoard's under `train/` as before).
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from densessl.config import Config, require_extra, to_dict


def _scalars(record: dict) -> dict:
    """The record's finite numbers but `step` (the tracker's x axis)."""
    return {k: v for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and v is not None and math.isfinite(v)}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class TensorBoardTracker:
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, record: dict) -> None:
        for k, v in _scalars(record).items():
            self.writer.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, wandb, cfg: Config, run_dir: Path):
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "densessl"), name=run_dir.name,
                              dir=str(run_dir), config=to_dict(cfg))

    def log(self, record: dict) -> None:
        self.run.log(_scalars(record), step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(self, mlflow, cfg: Config, run_dir: Path):
        self.mlflow = mlflow
        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri())
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "densessl"))
        mlflow.start_run(run_name=run_dir.name)
        mlflow.log_params({k: str(v) for k, v in _flatten(to_dict(cfg)).items()})

    def log(self, record: dict) -> None:
        self.mlflow.log_metrics(_scalars(record), step=int(record["step"]))

    def close(self) -> None:
        self.mlflow.end_run()


def tracker_module(cfg: Config):
    """Import the chosen tracker's package (W&B, MLflow), or fail with one line naming its extra.
    Called on every rank before training, so a missing package stops all ranks at once."""
    name = cfg.train.tracker
    if name in ("wandb", "mlflow"):
        return require_extra(name, name, f"train.tracker={name}")
    return None


def open_tracker(cfg: Config, run_dir: Path):
    """The tracker of `train.tracker` (rank 0 only), or None: an object with log(record), close()."""
    name = cfg.train.tracker
    if name == "tensorboard":
        try:
            return TensorBoardTracker(run_dir)
        except ImportError:  # the default tracker: a note, not an error (metrics.jsonl holds the same records)
            print("densessl: note: tensorboard is not installed, so no TensorBoard logs "
                  "(pip install 'densessl[tensorboard]', or train.tracker=none to silence this)", file=sys.stderr)
            return None
    if name == "wandb":
        return WandbTracker(tracker_module(cfg), cfg, run_dir)
    if name == "mlflow":
        return MlflowTracker(tracker_module(cfg), cfg, run_dir)
    return None
