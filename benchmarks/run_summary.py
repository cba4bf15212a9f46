"""What docs/studies/2026-11-results-notebook.md quotes from a run folder's metrics.jsonl: the loss at the first and last
logged step, each collapse statistic the method logs (first -> last, and its minimum), the kNN
monitor, the online probe's mAP, the median images/s, and the wall time from the run's
config.yaml to its last checkpoint (file times, so a resumed run counts its pause).

python benchmarks/run_summary.py runs/<run> [runs/<run> ...]
"""
import os
import statistics
import sys

from densessl.common.metrics_jsonl import read_metrics

STATISTICS = ("z_std", "dense_z_std", "pos_sim", "neg_sim", "teacher_entropy", "usage_entropy",
              "positives_per_image", "global", "dense")

if __name__ == "__main__":
    for run in sys.argv[1:]:
        records = read_metrics(os.path.join(run, "metrics.jsonl"))
        steps = [r for r in records if "loss" in r]
        first, last = steps[0], steps[-1]
        stats = " ".join(f"{k} {first[k]:.3f} -> {last[k]:.3f} (min {min(r[k] for r in steps if k in r):.3f})"
                         for k in STATISTICS if k in last and k in first)
        print(f"{run}: step {last['step']}, loss {first['loss']:.3f} -> {last['loss']:.3f}; {stats}")
        print("  kNN monitor:", " ".join(f"{100 * r['knn_top1']:.1f}" for r in records if "knn_top1" in r))
        probe = [r for r in records if "online_probe_mAP" in r]
        if probe:
            print("  online probe mAP:", " ".join(f"{100 * r['online_probe_mAP']:.1f}" for r in probe))
        wall = os.path.getmtime(os.path.join(run, "checkpoints", "last.pt")) - os.path.getmtime(
            os.path.join(run, "config.yaml"))
        print(f"  median images/s {statistics.median(r['images_per_s'] for r in steps):.0f}; wall {wall / 60:.1f} min")
