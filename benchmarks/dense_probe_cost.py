"""Minutes per dense probe on this machine: each probe run alone by `densessl eval <probe>`, so
its time includes the feature extraction it needs (the stages it reads, train and val).

    OMP_NUM_THREADS=2 python benchmarks/dense_probe_cost.py [CHECKPOINT|random] [key=value ...]

The default backbone is the random-init resnet18_small (width 32): a checkpoint of the same
architecture costs the same. Prints a markdown table (docs/performance.md, "Dense probes: cost").
"""
from __future__ import annotations

import sys
import time

import torch

from densessl.common.machine import describe_machine
from densessl.eval.dense.config import PROBES, dense_config
from densessl.eval.dense.run import evaluate_dense


def main(argv: list[str]) -> int:
    spec = argv[0] if argv and "=" not in argv[0] else "random"
    overrides = [a for a in argv if "=" in a]
    rows = []
    for probe in PROBES:
        cfg = dense_config([f"probes=[{probe}]", *overrides])
        t0 = time.perf_counter()
        result = evaluate_dense(spec, [probe], cfg, log=lambda *a: None)
        total = time.perf_counter() - t0
        rows.append((probe, result["features"]["seconds"], result[probe]["seconds"], total))
        print(f"{probe}: {total / 60:.2f} min", file=sys.stderr, flush=True)
    cfg = dense_config(overrides)
    print(f"Backbone {spec} ({cfg.model.backbone}, width {cfg.model.width}), preset {cfg.preset}: "
          f"{cfg.num_train} train / {cfg.num_test} val images at {cfg.data.size} px; {describe_machine()}")
    print("\n| probe | feature extraction (s) | probe (s) | total (min) |\n|---|---:|---:|---:|")
    for probe, extract, own, total in rows:
        print(f"| {probe} | {extract:.0f} | {own:.0f} | {total / 60:.1f} |")
    return 0


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main(sys.argv[1:]))
