"""The main job end to end on tiny settings: the table holds the pretrained backbone and the
run's own initial weights, evaluated by the same protocols."""
import json

import pytest

from conftest import TINY
from densessl.cli import main
from densessl.eval.protocols import eval_config, evaluate

EVAL = ["eval.num_train=40", "eval.num_test=20", "eval.epochs=2", "eval.k=5"]


@pytest.mark.slow
def test_demo_compares_the_run_with_its_own_initial_weights(tmp_path, capsys):
    run = tmp_path / "demo"
    overrides = [o for o in TINY if not o.startswith("method.pred")] + [
        "train.epochs=1", "train.seed=3", "train.knn_every=0", f"run_dir={run}"]
    assert main(["demo", "--recipe", "pixpro-scenes", *overrides, *EVAL]) == 0
    report = (run / "report.md").read_text()
    assert report.startswith("| backbone |") and "pixpro-scenes: pixpro" in report
    assert (run / "report.png").stat().st_size > 0
    results = json.loads((run / "eval" / "demo.json").read_text())
    assert results["random"]["backbone"] == "random-init resnet18_small (seed 3)"  # train.seed=3's start
    # the random row is what `densessl eval ... random random_init_seed=3` gives with the same settings
    cfg = eval_config(["random_init_seed=3", "num_train=40", "num_test=20", "epochs=2", "k=5", "model.width=8",
                       "data.size=32", "data.num_scenes=64"])
    alone = evaluate("random", ["knn", "multilabel"], cfg)
    assert results["random"]["knn"]["knn_top1"] == alone["knn"]["knn_top1"]
    assert results["random"]["multilabel"]["multilabel_mAP"] == alone["multilabel"]["multilabel_mAP"]
    assert "pretrained" in capsys.readouterr().out
