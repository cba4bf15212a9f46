"""Where one densessl BYOL training step spends its CPU time, by kind of work.

    python benchmarks/profile_step.py                  # `densessl bench step`'s BYOL: resnet18, 64 px, batch 64
    python benchmarks/profile_step.py --setting recipe  # byol-scenes' Trainer.train_step (resnet18_small,
                                                        # batch 128, device augmentation included)

Both in densessl's defaults (bf16 autocast, channels_last, small-map GEMMs). torch.profiler
records `--steps` steps after `--warmup`; every op's *self* CPU time goes to one bucket:

- augmentation (device), optimiser (LARS), EMA / after-step: everything inside those calls
  (wrapped in `record_function` regions here, nothing changes in densessl);
- small-map GEMMs: ops inside `small_map_conv2d` and, in the backward, the autograd nodes
  created there (matched by autograd sequence number);
- convolutions (oneDNN forward and `convolution_backward`), listed by shape as well;
- batch norm (forward and backward), other GEMMs (the heads' linear layers, losses);
- autograd overhead: the engine's own time in its nodes (`evaluate_function`, AccumulateGrad);
- elementwise, pooling, copies: every other aten op (ReLU, max-pool, adds, casts, reductions); other: the rest.

Prints the buckets with their share of the profiled time, the convolutions by shape, and the
top ops by self CPU time. The profiler adds overhead (record_shapes), so the step's wall time
without it is measured as well.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from densessl import bench  # noqa: E402
from densessl.common.machine import describe_machine  # noqa: E402

REGIONS = {"bucket:augmentation": "augmentation (device)", "bucket:optimizer": "optimiser (LARS)",
           "bucket:after_step": "EMA / after-step", "bucket:small_map": "small-map GEMMs"}
BUCKET_ORDER = ["convolutions", "batch norm", "small-map GEMMs", "other GEMMs (heads, loss)",
                "elementwise, pooling, copies", "autograd overhead", "optimiser (LARS)", "EMA / after-step",
                "augmentation (device)", "other"]
GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
            "aten::_addmm_activation", "mkldnn::_linear_pointwise"}


def wrap(obj, attr: str, label: str) -> None:
    fn = getattr(obj, attr)

    def wrapped(*a, **k):
        with record_function(label):
            return fn(*a, **k)

    setattr(obj, attr, wrapped)


def instrument(setting: str, batch: int | None):
    """The step closure, with record_function regions around the buckets defined by calls."""
    import densessl.engine.trainer as trainer_mod
    import densessl.models.small_maps as small_maps

    wrap(small_maps, "small_map_conv2d", "bucket:small_map")
    if setting == "step":
        batch = batch or 64
        run = bench.densessl_byol_step("resnet18", None, 64, batch, "bf16", True)
        method, opt = run.method, run.optimizer
    else:
        batch = batch or 128
        wrap(trainer_mod, "augment_batch", "bucket:augmentation")
        run = bench.recipe_step("byol", "small", batch, "bf16", True, True)
        method, opt = run.trainer.method, run.trainer.optimizer
    wrap(opt, "step", "bucket:optimizer")
    wrap(method, "after_step", "bucket:after_step")
    return run, batch


def ancestors(ev):
    p = ev.cpu_parent
    while p is not None:
        yield p
        p = p.cpu_parent


def conv_key(ev) -> str | None:
    shapes = ev.input_shapes or []
    if ev.name == "aten::convolution_backward":  # (grad_output, input, weight, ...)
        x, w = (shapes[1], shapes[2]) if len(shapes) > 2 else (None, None)
    else:  # (input, weight, ...)
        x, w = (shapes[0], shapes[1]) if len(shapes) > 1 else (None, None)
    if not x or not w or len(x) != 4 or len(w) != 4:
        return None
    return f"{w[1]} -> {w[0]}, {w[2]}x{w[3]}, on {x[2]}x{x[3]}"


def classify(events):
    """bucket -> us, conv shape -> [fwd, bwd] us, (op name, bucket) -> us."""
    small_map_seq = set()
    for ev in events:
        if ev.sequence_nr is not None and ev.sequence_nr >= 0 and any(a.name == "bucket:small_map" for a in ancestors(ev)):
            small_map_seq.add(ev.sequence_nr)
    buckets, convs, ops = defaultdict(float), defaultdict(lambda: [0.0, 0.0]), defaultdict(float)
    total = 0.0
    for ev in events:
        t = ev.self_cpu_time_total
        if t <= 0 or ev.name.startswith("bucket:") or ev.name.startswith("ProfilerStep") or ev.name == "step":
            total += max(t, 0.0)
            if ev.name.startswith("bucket:"):
                buckets[REGIONS[ev.name]] += t
            elif t > 0:
                buckets["other"] += t
            continue
        total += t
        anc = list(ancestors(ev))
        region = next((REGIONS[a.name] for a in anc if a.name in REGIONS), None)
        node = next((a for a in [ev] + anc if a.name.startswith("autograd::engine::evaluate_function")), None)
        in_bwd = node is not None
        name = ev.name
        if region == "small-map GEMMs" or (node is not None and node.sequence_nr in small_map_seq
                                             and region is None):
            b = "small-map GEMMs"
        elif region is not None:
            b = region
        elif name.startswith("autograd::engine::evaluate_function") or "AccumulateGrad" in name \
                or name.endswith("Backward0") or name.endswith("Backward1"):
            b = "autograd overhead"
        elif "convolution" in name or name in ("aten::conv2d", "aten::mkldnn_convolution"):
            b = "convolutions"
            key = conv_key(ev)
            if key is not None:
                convs[key][1 if in_bwd else 0] += t
        elif "batch_norm" in name:
            b = "batch norm"
        elif name in GEMM_OPS:
            b = "other GEMMs (heads, loss)"
        elif name.startswith("aten::"):
            b = "elementwise, pooling, copies"
        else:
            b = "other"
        buckets[b] += t
        ops[(name, b)] += t
    return buckets, convs, ops, total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=("step", "recipe"), default="step")
    p.add_argument("--batch", type=int, default=None, help="default 64 (step), 128 (recipe)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    run, batch = instrument(args.setting, args.batch)
    for _ in range(args.warmup):
        run()
    walls = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        run()
        walls.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(args.steps):
            with record_function("step"):
                run()
    buckets, convs, ops, total = classify(prof.events())
    n = args.steps
    wall = statistics.median(walls)
    print(f"BYOL step ({args.setting}: " + ("resnet18, 64 px" if args.setting == "step" else
                                           "byol-scenes, resnet18_small, 64 px, device augmentation")
          + f", batch {batch}, bf16 autocast, channels_last); {describe_machine()}")
    print(f"wall time without the profiler {wall * 1e3:.0f} ms/step ({batch / wall:.1f} images/s, median of {n}); "
          f"profiled self CPU time {total / n / 1e3:.0f} ms/step\n")
    print("| bucket | ms/step | share |\n|---|---:|---:|")
    for b in BUCKET_ORDER:
        if buckets.get(b):
            print(f"| {b} | {buckets[b] / n / 1e3:.1f} | {100 * buckets[b] / total:.1f}% |")
    print("\n| convolution (C_in -> C_out, kernel, input map) | fwd ms/step | bwd ms/step | share |\n|---|---:|---:|---:|")
    for key, (f, b) in sorted(convs.items(), key=lambda kv: -sum(kv[1])):
        print(f"| {key} | {f / n / 1e3:.1f} | {b / n / 1e3:.1f} | {100 * (f + b) / total:.1f}% |")
    print(f"\n| op (top {args.top} by self CPU time) | bucket | ms/step | share |\n|---|---|---:|---:|")
    for (name, b), t in sorted(ops.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"| `{name}` | {b} | {t / n / 1e3:.1f} | {100 * t / total:.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
