#!/usr/bin/env bash
# Every method's small Fashion-Scenes recipe at one budget, then the same frozen-feature
# evaluation for each checkpoint and for the random-init backbone (as initialised, and with BN
# statistics recomputed on training scenes: the same untrained weights, data-derived
# normalisation like every pretrained backbone carries). The random init is also evaluated at
# more weight seeds (RANDOM_SEEDS), because its kNN varies by several points from seed to seed.
#
# Per method: densessl pretrain <method>-scenes train.epochs=$EPOCHS train.knn_every=$KNN_EVERY
# (kNN monitor on 2000/1000 items, step 0 included), then kNN (k=20, T=0.07), linear top-1
# and multi-label mAP exactly as `densessl eval` (5000 train / 2000 val; 100-epoch probes).
# A finished run (its last.pt at the final step) is not retrained.
#
# Environment (defaults in brackets): METHODS [byol mocov2 densecl pixpro scrl cgh swav ssprl gaelle],
# EPOCHS [3], KNN_EVERY [156], OUT [runs/methods-scenes], PY [.venv/bin/python], EXTRA (more
# pretraining overrides for every method), RANDOM_SEEDS [0 1 2 3 4 5] (random-init weight seeds;
# seed 0 is the initial backbone of every run here, whose train.seed is 0).
#   bash benchmarks/methods_scenes.sh > results.tsv
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/methods-scenes}
EPOCHS=${EPOCHS:-3}
KNN_EVERY=${KNN_EVERY:-156}
METHODS=${METHODS:-"byol mocov2 densecl pixpro scrl cgh swav ssprl gaelle"}
RANDOM_SEEDS=${RANDOM_SEEDS:-"0 1 2 3 4 5"}
EXTRA=${EXTRA:-}
mkdir -p "$OUT"

for m in $METHODS; do
  run="$OUT/$m"
  if [ -f "$run/done" ]; then echo "== $m: finished run found, not retrained" >&2; continue; fi
  echo "== pretraining $m -> $run ($(date +%T))" >&2
  start=$(date +%s)
  # shellcheck disable=SC2086
  "$PY" -m densessl.cli pretrain "$m-scenes" train.epochs="$EPOCHS" train.knn_every="$KNN_EVERY" \
    train.progress=false run_dir="$run" $EXTRA > "$run.pretrain.log" 2>&1 \
    || { echo "pretraining $m failed; see $run.pretrain.log" >&2; exit 1; }
  echo $(( $(date +%s) - start )) > "$run/done"
done

OUT="$OUT" METHODS="$METHODS" RANDOM_SEEDS="$RANDOM_SEEDS" "$PY" - <<'PYEOF'
"""Evaluate every run and the random-init baseline with the protocols of `densessl eval`."""
import json
import os
import sys
from pathlib import Path

from densessl.engine.trainer import read_metrics
from densessl.eval.protocols import eval_config, evaluate

out = Path(os.environ["OUT"])
COLLAPSE = ("usage_entropy", "z_std", "pos_sim")  # the first one a method logs is shown


def train_stats(run: Path) -> dict:
    recs = read_metrics(run / "metrics.jsonl")
    losses = [r for r in recs if "loss" in r]
    knn = [(r["step"], r["knn_top1"]) for r in recs if "knn_top1" in r]
    key = next((k for k in COLLAPSE if k in losses[-1]), None)
    return {"first_loss": losses[0]["loss"], "last_loss": losses[-1]["loss"], "steps": losses[-1]["step"],
            "collapse_key": key, "collapse_first": losses[0].get(key), "collapse_last": losses[-1].get(key),
            "knn_monitor": knn, "pretrain_s": int((run / "done").read_text())}


seeds = os.environ["RANDOM_SEEDS"].split()
# (row name, checkpoint or "random", eval overrides, JSON tag)
rows = [(f"random init seed {s} (BN as initialised)", "random", [f"random_init_seed={s}"], f"random-seed{s}")
        for s in seeds]
rows += [("random init seed 0 (BN statistics from scenes)", "random", ["random_init_seed=0", "bn_stats=data"],
          "random-seed0-bn-data")]
rows += [(m, str(out / m / "checkpoints" / "last.pt"), [], m) for m in os.environ["METHODS"].split()]
print("backbone\tkNN\tlinear\tmAP\tloss first->last\tcollapse stat first->last\tkNN monitor\tpretrain min")
for name, spec, extra, tag in rows:
    print(f"== evaluating {name}", file=sys.stderr)
    res = evaluate(spec, ["knn", "linear", "multilabel"], eval_config(extra))
    (out / f"eval-{tag}.json").write_text(json.dumps(res, indent=1, default=str))
    cols = [f"{100 * res['knn']['knn_top1']:.1f}", f"{100 * res['linear']['linear_top1']:.1f}",
            f"{100 * res['multilabel']['multilabel_mAP']:.1f}"]
    if spec == "random":
        cols += ["-", "-", "-", "-"]
    else:
        s = train_stats(out / name)
        col = (f"{s['collapse_key']} {s['collapse_first']:.3f}->{s['collapse_last']:.3f}"
               if s["collapse_key"] else "-")
        cols += [f"{s['first_loss']:.3f}->{s['last_loss']:.3f}", col,
                 " ".join(f"{100 * v:.1f}" for _, v in s["knn_monitor"]), f"{s['pretrain_s'] / 60:.1f}"]
    print("\t".join([name] + cols), flush=True)
PYEOF
