"""Reading a run's metrics.jsonl (one JSON record per line, written by the trainer): by the
trainer itself on resume, by report plots, tests and benchmarks."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def read_metrics(metrics_path: Path) -> list[dict]:
    """Every record of a metrics.jsonl; a line cut by a kill mid-write is dropped, with a message."""
    records, torn = [], 0
    for line in Path(metrics_path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            torn += bool(line.strip())
    if torn:
        print(f"{metrics_path}: dropped {torn} unreadable line(s) (cut by a kill?)", file=sys.stderr, flush=True)
    return records


def read_losses(metrics_path: Path) -> list[dict]:
    """The training-step records (those with a loss) of a metrics.jsonl."""
    return [r for r in read_metrics(metrics_path) if "loss" in r]
