import json
from pathlib import Path

import torch

from densessl.cli import main


def test_bad_key_exits_2_with_the_message(capsys, tmp_path):
    code = main(["pretrain", "byol-scenes", "optim.lrr=1", f"run_dir={tmp_path}"])
    assert code == 2
    assert "unknown key 'optim.lrr'; did you mean 'optim.lr'?" in capsys.readouterr().err


def test_eval_knn_random_writes_metrics(tmp_path, capsys):
    out = tmp_path / "knn.json"
    code = main(["eval", "knn", "random", "model.width=8", "data.size=32", "num_train=60", "num_test=30", "k=5",
                 f"out={out}"])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["backbone"].startswith("random-init resnet18_small")
    assert 0.0 <= result["knn"]["knn_top1"] <= 1.0 and result["knn"]["settings"]["k"] == 5
    assert "knn_top1" in capsys.readouterr().out


def test_eval_of_a_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", "knn", str(tmp_path / "nope.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_random_init_seed_changes_the_baseline_weights_only(tmp_path):
    from densessl.eval.protocols import default_out, eval_config, load_eval_backbone

    def conv1(overrides):
        cfg = eval_config(["model.width=8"] + overrides)
        backbone, desc = load_eval_backbone("random", cfg)
        return backbone.conv1.weight, desc, cfg

    w0, desc0, cfg0 = conv1([])
    w1, desc1, cfg1 = conv1(["random_init_seed=1"])
    w_seed1, _, _ = conv1(["seed=1"])  # without random_init_seed the weights follow `seed`
    assert torch.equal(w1, w_seed1) and not torch.equal(w0, w1)
    assert desc0.endswith("(seed 0)") and desc1.endswith("(seed 1)") and cfg1.seed == 0  # probes keep seed 0
    assert default_out("random", "knn", cfg0) == Path("runs/random-resnet18_small/eval/knn.json")
    assert default_out("random", "knn", cfg1) == Path("runs/random-resnet18_small-seed1/eval/knn.json")
    # the baseline of a `train.seed=1` run is the very backbone that run starts from
    from conftest import TINY
    from densessl.config import build_config
    from densessl.engine.trainer import Trainer

    trainer = Trainer(build_config("byol-scenes", TINY + ["train.seed=1", f"run_dir={tmp_path / 'run'}"]))
    assert torch.equal(trainer.method.backbone.conv1.weight, w1)


def test_eval_frozen_gives_the_numbers_of_the_three_separate_protocols(tmp_path, capsys):
    """One call, features extracted once: the same values as `eval knn`, `eval linear` and
    `eval multilabel` run one by one on the same backbone and data."""
    common = ["random", "model.width=8", "data.size=32", "num_train=60", "num_test=30", "k=5", "epochs=3"]
    assert main(["eval", "frozen", *common, f"out={tmp_path / 'frozen.json'}"]) == 0
    frozen = json.loads((tmp_path / "frozen.json").read_text())
    for protocol, key in [("knn", "knn_top1"), ("linear", "linear_top1"), ("multilabel", "multilabel_mAP")]:
        assert main(["eval", protocol, *common, f"out={tmp_path / protocol}.json"]) == 0
        alone = json.loads((tmp_path / f"{protocol}.json").read_text())
        assert frozen[protocol][key] == alone[protocol][key]
    printed = capsys.readouterr().out
    assert all(k in printed for k in ("knn_top1", "linear_top1", "multilabel_mAP"))
