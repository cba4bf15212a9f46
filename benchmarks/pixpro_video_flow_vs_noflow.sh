#!/usr/bin/env bash
# PixPro on moving Fashion-Scenes videos: optical-flow positives vs none, at the same budget
# (the same recipe, steps, batch and seed; only the positives differ), then a frozen-backbone
# segmentation probe on the moving scenes' per-frame semantic maps (densessl.eval.segmentation:
# FCN head on frozen C5, mIoU after the last iteration), plus the random-init baseline
# evaluated identically. The fork's claim (specs, PixPro 3.8 / claim C6): multi-frame flow
# positives beat single-frame PixPro by a small margin (+0.4 mIoU on Cityscapes).
#
# Variants (VARIANTS, space-separated):
#   flow    frames t and t+5, positives moved by the exact flow (method.video.flow=gt)
#   dis     the same with OpenCV DIS flow (estimated, cached under $OUT/flowcache)
#   noflow  the same frame pairs, positives from crop geometry only (method.video.flow=none)
#   single  one frame per sample: plain PixPro on video frames (method.video.nframes=1)
#
# Environment (defaults in brackets): EPOCHS [4], NUM_VIDEOS [20000], BATCH [128], SEEDS [0],
# VARIANTS [flow dis noflow single], SEG_ITERS [600], SEG_TRAIN [2000], SEG_VAL [500],
# DEVICE [auto], OUT [runs/pixpro-video-bench], PY [.venv/bin/python], EXTRA (more pretraining
# overrides), SEG_EXTRA (more segmentation overrides, e.g. "head=deeplabv3").
# Progress goes to stderr and the log files; the table of numbers goes to stdout.
#   bash benchmarks/pixpro_video_flow_vs_noflow.sh > results.tsv
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/pixpro-video-bench}
EPOCHS=${EPOCHS:-4}
NUM_VIDEOS=${NUM_VIDEOS:-20000}
BATCH=${BATCH:-128}
SEEDS=${SEEDS:-0}
VARIANTS=${VARIANTS:-"flow dis noflow single"}
SEG_ITERS=${SEG_ITERS:-600}
SEG_TRAIN=${SEG_TRAIN:-2000}
SEG_VAL=${SEG_VAL:-500}
DEVICE=${DEVICE:-auto}
EXTRA=${EXTRA:-}
SEG_EXTRA=${SEG_EXTRA:-}
mkdir -p "$OUT"

for seed in $SEEDS; do
  for v in $VARIANTS; do
    case "$v" in
      flow) opts="method.video.flow=gt" ;;
      dis) opts="method.video.flow=dis method.video.flow_cache=$OUT/flowcache" ;;
      noflow) opts="method.video.flow=none" ;;
      single) opts="method.video.nframes=1" ;;
      *) echo "unknown variant '$v' (flow, dis, noflow, single)" >&2; exit 2 ;;
    esac
    run="$OUT/$v-s$seed"
    echo "== pretraining $v (seed $seed) -> $run" >&2
    # shellcheck disable=SC2086
    "$PY" -m densessl.cli pretrain pixpro-video-scenes $opts train.epochs="$EPOCHS" \
      train.batch_size="$BATCH" data.num_scenes="$NUM_VIDEOS" train.seed="$seed" train.device="$DEVICE" \
      train.progress=false run_dir="$run" $EXTRA > "$run.pretrain.log" 2>&1 \
      || { echo "pretraining $v failed; see $run.pretrain.log" >&2; exit 1; }
  done
done

OUT="$OUT" SEEDS="$SEEDS" VARIANTS="$VARIANTS" SEG_ITERS="$SEG_ITERS" SEG_TRAIN="$SEG_TRAIN" SEG_VAL="$SEG_VAL" \
DEVICE="$DEVICE" SEG_EXTRA="$SEG_EXTRA" "$PY" - <<'PYEOF'
"""Frozen-backbone segmentation on MovingScenes frames for every run, and random init."""
import json
import os
import shlex
import sys
from pathlib import Path

import densessl.eval.segmentation as seg

out = Path(os.environ["OUT"])
overrides = ["preset=scenes", "data.dataset=moving_scenes", "data.seed=1", "freeze_backbone=true",
             f"iterations={os.environ['SEG_ITERS']}", f"data.num_train={os.environ['SEG_TRAIN']}",
             f"data.num_val={os.environ['SEG_VAL']}", f"device={os.environ['DEVICE']}", "log_every=0"]
overrides += shlex.split(os.environ.get("SEG_EXTRA", ""))


def last_train_stats(run: Path) -> dict:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    recs = [r for r in recs if "loss" in r]
    return recs[-1] if recs else {}


rows = []
specs = [("random", "-", "random")]
for seed in os.environ["SEEDS"].split():
    for v in os.environ["VARIANTS"].split():
        specs.append((v, seed, str(out / f"{v}-s{seed}" / "checkpoints" / "last.pt")))
print("variant\tseed\tmIoU\tpixel_acc\tseg_train_loss\tpretrain_loss\tpositives_per_image\tflow_valid_frac")
for variant, seed, spec in specs:
    print(f"== segmentation probe: {variant} {seed}", file=sys.stderr)
    cfg = seg.segmentation_config(overrides)
    res = seg.run_segmentation(spec, cfg, log=lambda m: print(m, file=sys.stderr))
    (out / f"seg-{variant}-{seed}.json").write_text(json.dumps(res, indent=1, default=str))
    r = res["segmentation"]
    st = last_train_stats(Path(spec).parents[1]) if spec != "random" else {}
    fmt = lambda k: f"{st[k]:.4f}" if k in st else "-"
    print(f"{variant}\t{seed}\t{100 * r['mIoU']:.2f}\t{100 * r['pixel_acc']:.2f}\t"
          f"{r['settings']['train_loss_last']:.4f}\t{fmt('loss')}\t{fmt('positives_per_image')}\t"
          f"{fmt('flow_valid_frac')}", flush=True)
print(f"# frozen-backbone FCN on C5, {os.environ['SEG_ITERS']} iterations, MovingScenes frames "
      f"(train {os.environ['SEG_TRAIN']} / val {os.environ['SEG_VAL']}, data seed 1), mIoU after the last "
      f"iteration; pretraining: pixpro-video-scenes, same budget for every variant", flush=True)
PYEOF
