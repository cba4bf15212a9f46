#!/usr/bin/env bash
# Detection AP and segmentation mIoU on Fashion-Scenes: a pretrained checkpoint against the
# random-init baseline, each through exactly the same protocol (the presets' defaults).
#   bash benchmarks/transfer_scenes.sh runs/demo/checkpoints/last.pt > transfer.txt
set -euo pipefail
CKPT=${1:-runs/demo/checkpoints/last.pt}
BIN=${BIN:-.venv/bin}
for spec in "$CKPT" random; do
  echo "== segmentation (frozen backbone), $spec"
  "$BIN/densessl" eval segmentation "$spec" freeze_backbone=true
  echo "== detection (Faster R-CNN FPN, fine-tuned), $spec"
  "$BIN/densessl" eval detection "$spec"
done
