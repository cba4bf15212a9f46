"""The main job: pretrain on Fashion-Scenes, then compare with a random-init backbone.

Both backbones go through exactly the same protocols (densessl.eval.protocols); the random one
is the run's own initial weights (`random_init_seed` = the run's `train.seed`). The table and a
figure (loss curve, metric bars) are written to the run folder. Overrides go to the recipe,
except `eval.<key>=value`, which go to the evaluation (e.g. eval.num_train=1000).
"""
from __future__ import annotations

import time
from pathlib import Path

from densessl.common.metrics_jsonl import read_losses
from densessl.config import build_config
from densessl.engine.trainer import Trainer
from densessl.eval.protocols import eval_config, evaluate, write_metrics
from densessl.report import draw_losses, plot_losses

RECIPE = "pixpro-scenes"  # a seed system that beats the random init on every protocol in ~10 CPU-minutes
PROTOCOLS = ["knn", "linear", "multilabel"]
METRICS = [("knn", "knn_top1", "kNN top-1"), ("linear", "linear_top1", "linear top-1"),
           ("multilabel", "multilabel_mAP", "multi-label mAP")]


def run_demo(overrides: list[str], recipe: str = RECIPE) -> int:
    t0 = time.perf_counter()
    eval_overrides = [o[len("eval."):] for o in overrides if o.startswith("eval.")]
    cfg = build_config(recipe, ["run_dir=runs/demo", *(o for o in overrides if not o.startswith("eval."))])
    Trainer(cfg).fit()
    t_pre = time.perf_counter() - t0
    run_dir = Path(cfg.run_dir)
    plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
    ecfg = eval_config([f"random_init_seed={cfg.train.seed}", *eval_overrides])
    ecfg.data, ecfg.model = cfg.data, cfg.model
    results = {}
    for spec in [str(run_dir / "checkpoints" / "last.pt"), "random"]:
        results["pretrained" if spec != "random" else "random"] = evaluate(spec, PROTOCOLS, ecfg)
    total = time.perf_counter() - t0
    table = format_table(results, cfg, recipe, t_pre, total)
    print(table)
    (run_dir / "report.md").write_text(table + "\n")
    write_metrics(results, run_dir / "eval" / "demo.json")
    plot_report(run_dir, results, recipe)
    print(f"wrote {run_dir / 'report.md'}, {run_dir / 'report.png'}, {run_dir / 'eval' / 'demo.json'}")
    return 0


def format_table(results: dict, cfg, recipe: str, t_pre: float, total: float) -> str:
    rows = ["| backbone | " + " | ".join(label for _, _, label in METRICS) + " |",
            "|---|" + "---:|" * len(METRICS)]
    for name, res in results.items():
        rows.append(f"| {name} | " + " | ".join(f"{100 * res[p][k]:.1f}" for p, k, _ in METRICS) + " |")
    s = results["pretrained"]
    knn, lin, ml = s["knn"]["settings"], s["linear"]["settings"]["settings"], s["multilabel"]["settings"]["settings"]
    rows += ["",
             f"{recipe}: {cfg.method.name} on {cfg.model.backbone} (width {cfg.model.width}), {cfg.train.epochs} epochs x "
             f"{cfg.data.num_scenes} Fashion-Scenes at {cfg.data.size} px, batch {cfg.train.batch_size}, seed "
             f"{cfg.train.seed}; pretraining {t_pre / 60:.1f} min, whole job {total / 60:.1f} min.",
             f"kNN: k={knn['k']}, T={knn['temperature']}, {knn['train']} train / {knn['test']} val single items. "
             f"Linear probes (last epoch): {lin['epochs']} epochs, SGD lr {lin['lr']}, standardised features; "
             f"single-label on {lin['n_train']}/{lin['n_test']} items, multi-label (BCE, mAP) on "
             f"{ml['n_train']}/{ml['n_test']} scenes. Random = same architecture, random init, same protocol."]
    return "\n".join(rows)


def plot_report(run_dir: Path, results: dict, recipe: str = RECIPE) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    draw_losses(a, read_losses(run_dir / "metrics.jsonl"))
    a.set_title(f"{recipe} training")
    width = 0.38
    for i, (name, res) in enumerate(results.items()):
        vals = [100 * res[p][k] for p, k, _ in METRICS]
        xs = [j + (i - 0.5) * width for j in range(len(METRICS))]
        bars = b.bar(xs, vals, width, label=name)
        b.bar_label(bars, fmt="%.1f", fontsize=8)
    b.set_xticks(range(len(METRICS)), [label for _, _, label in METRICS])
    b.set_ylabel("%")
    b.set_title("pretrained vs random init")
    b.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "report.png", dpi=100)
    plt.close(fig)
