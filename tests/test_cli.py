import json
from pathlib import Path

import torch

from densessl.cli import main


def test_bad_key_exits_2_with_the_message(capsys, tmp_path):
    code = main(["pretrain", "byol-scenes", "optim.lrr=1", f"run_dir={tmp_path}"])
    assert code == 2
    assert "unknown key 'optim.lrr'; did you mean 'optim.lr'?" in capsys.readouterr().err


def test_print_config_prints_the_effective_yaml_and_trains_nothing(capsys, tmp_path):
    import yaml

    from densessl.config import build_config, to_dict

    run = tmp_path / "run"
    # flags may stand before or among the overrides
    assert main(["pretrain", "moco-scenes", "--print-config", "train.epochs=3", f"run_dir={run}"]) == 0
    out, err = capsys.readouterr()
    printed = yaml.safe_load(out)
    assert printed == to_dict(build_config("mocov2-scenes", ["train.epochs=3", f"run_dir={run}"]))
    assert printed["train"]["epochs"] == 3 and printed["model"]["width"] == 32  # the override and the base
    assert printed["views"][0]["saturation"] == 0.4  # the view set views/mocov2-aug-plus-64
    assert err.strip() == "densessl: recipe 'moco-scenes' was renamed to 'mocov2-scenes'"
    assert not run.exists()
    assert main(["pretrain", "byol-scenes", "--print-config"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and yaml.safe_load(out)["method"]["name"] == "byol"


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
    from densessl.eval.backbone import load_backbone
    from densessl.eval.protocols import default_out, eval_config

    def conv1(overrides):
        cfg = eval_config(["model.width=8"] + overrides)
        backbone, desc = load_backbone("random", cfg)
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


# ---------------------------------------------------------------- user errors: one line, no traceback


def _images(folder, names, size=(20, 20)):
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        pixels = np.random.default_rng(k).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
    return folder


def test_unreadable_image_in_a_loader_worker_is_one_line_naming_the_file_and_the_key(tmp_path):
    import subprocess

    from conftest import TINY, cli_command, subprocess_env

    root = _images(tmp_path / "imgs", ["a0.png", "a1.png", "a2.png"])
    (root / "z_bad.png").write_bytes(b"not an image")  # last in sorted order; every batch of 4 holds it
    proc = subprocess.run(cli_command("pretrain", "byol-scenes", *TINY, "data.dataset=imagefolder",
                                      f"data.root={root}", "data.num_workers=1", "train.batch_size=4",
                                      "train.epochs=1", "train.online_probe=false", f"run_dir={tmp_path / 'run'}"),
                          capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("densessl: error: could not decode image ")
    assert str(root / "z_bad.png") in lines[0] and "set data.on_error=skip" in lines[0]


def test_dataset_smaller_than_the_batch_is_one_line_naming_sizes_and_key(tmp_path, capsys):
    from conftest import TINY

    root = _images(tmp_path / "imgs", ["a.png", "b.png", "c.png"])
    code = main(["pretrain", "byol-scenes", *TINY, "data.dataset=imagefolder", f"data.root={root}",
                 "train.batch_size=8", f"run_dir={tmp_path / 'run'}"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"densessl: error: the training data (data.dataset=imagefolder data.root={root}) has 3 samples, "
                   f"fewer than one batch of train.batch_size=8; set train.batch_size=3 or lower"]


def test_error_line_recovers_the_message_of_an_error_raised_in_a_worker():
    from densessl.cli import error_line
    from densessl.data.imagefolder import ImageReadError

    wrapped = ImageReadError("Caught ImageReadError in DataLoader worker process 0.\nOriginal Traceback (most "
                             "recent call last):\n  File \"x.py\", line 1, in f\n    g()\n"
                             "densessl.common.errors.ImageReadError: could not decode image 'a.png' (x)\n")
    assert error_line(wrapped) == "could not decode image 'a.png' (x)"
    assert error_line(ImageReadError("first\n  second")) == "first second"


def test_every_eval_protocol_takes_random_init_seed_with_the_same_weights(tmp_path, monkeypatch):
    """`densessl eval <protocol> random random_init_seed=3` for each protocol: the same key is
    accepted and the random baseline gets the same initial weights (the backbone is captured
    as it is built, and the run stopped there)."""
    import pytest

    import densessl.eval.backbone
    import densessl.models.backbones
    from densessl.data.export import export_voc
    from densessl.data.scenes import FashionScenes

    real = densessl.models.backbones.build_backbone
    built = []

    class Built(Exception):
        pass

    def spy(*args, **kwargs):
        backbone = real(*args, **kwargs)
        built.append({k: v.clone() for k, v in backbone.state_dict().items()})
        raise Built

    monkeypatch.setattr(densessl.models.backbones, "build_backbone", spy)
    monkeypatch.setattr(densessl.eval.backbone, "build_backbone", spy)
    voc = tmp_path / "voc"
    for split in ("trainval", "test"):
        export_voc(FashionScenes("val", num_scenes=2, size=32, seed=1), voc, split, image_ext="png")
    model = ["model.backbone=resnet18_small", "model.width=8"]
    scenes = ["data.num_train=2", "data.num_val=2", "data.size=32"]
    runs = {"knn": [], "linear": [], "multilabel": [], "frozen": [],
            "multilabel-voc": ["data.dataset=voc", f"data.root={voc}"], "detection": scenes, "segmentation": scenes}
    for name, extra in runs.items():
        protocol = name.partition("-")[0]
        with pytest.raises(Built):
            main(["eval", protocol, "random", *model, *extra, "random_init_seed=3", f"out={tmp_path / name}.json"])
    assert len(built) == len(runs)
    for weights in built[1:]:
        assert weights.keys() == built[0].keys() and all(torch.equal(weights[k], built[0][k]) for k in weights)
    with pytest.raises(Built):
        main(["eval", "detection", "random", *model, *scenes, "random_init_seed=4"])
    assert not torch.equal(built[-1]["conv1.weight"], built[0]["conv1.weight"])
