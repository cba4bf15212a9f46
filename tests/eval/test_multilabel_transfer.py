import json
import math

import pytest
import torch

from densessl.eval.multilabel_transfer import (multilabel_transfer_config, probe_loss, random_resized_crop_params,
                                               run_multilabel_transfer)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
TINY = ["model.backbone=resnet18_small", "model.width=8", "epochs=2", "batch_size=4", "crop_size=32",
        "resize_size=36", "feature_batch_size=8"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from densessl.data.export import export_coco, export_voc
    from densessl.data.scenes import FashionScenes

    root = tmp_path_factory.mktemp("ml")
    train, val = FashionScenes("train", num_scenes=8, size=40, seed=3), FashionScenes("val", num_scenes=6, size=40, seed=3)
    export_voc(train, root / "voc", "trainval", image_ext="png")
    export_voc(val, root / "voc", "test", image_ext="png")
    # mark the first object of the first test image difficult: its class becomes "ignore" there
    xml = root / "voc" / "Annotations" / "test_000000.xml"
    xml.write_text(xml.read_text().replace("<difficult>0</difficult>", "<difficult>1</difficult>", 1))
    export_coco(train, root / "coco", "train2014", image_ext="png")
    export_coco(val, root / "coco", "val2014", image_ext="png")
    return root


def test_probe_loss_sums_classes_over_kept_entries_per_image():
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ignore = torch.tensor([[False, True], [False, False]])
    bce = lambda z, y: -(y * math.log(1 / (1 + math.exp(-z))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-z))))
    want = (bce(0.0, 1) + bce(1.0, 0) + bce(-1.0, 1)) / 2
    assert float(probe_loss(logits, labels, ignore)) == pytest.approx(want)


def test_random_resized_crop_params_in_bounds_and_seeded():
    for seed in range(50):
        t, l, h, w = random_resized_crop_params(30, 50, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(seed))
        assert 0 <= t and 0 <= l and t + h <= 30 and l + w <= 50 and h > 0 and w > 0
    a = random_resized_crop_params(30, 50, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(1))
    assert a == random_resized_crop_params(30, 50, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(1))


def test_dataset_defaults_follow_ssprl():
    voc = multilabel_transfer_config(["data.dataset=voc"])
    assert (voc.data.train_split, voc.data.val_split, voc.batch_size, voc.lr) == ("trainval", "test", 32, 0.03)
    coco = multilabel_transfer_config(["data.dataset=coco"])
    assert (coco.data.train_split, coco.data.val_split, coco.batch_size, coco.lr) == ("train2014", "val2014", 128, 0.1)
    assert coco.epochs == 100 and coco.weight_decay == 1e-6 and coco.seed == 777


@pytest.mark.parametrize("mode", ["augment", "cached"])
def test_voc07_end_to_end_ignores_difficult(folders, mode):
    cfg = multilabel_transfer_config(TINY + ["data.dataset=voc", f"data.root={folders / 'voc'}", f"mode={mode}"])
    r = run_multilabel_transfer("random", cfg, log=lambda *a: None)["multilabel"]
    assert 0.0 <= r["mAP"] <= 1.0 and 0.0 <= r["best_epoch_mAP"] <= 1.0
    assert r["best_epoch_mAP"] >= r["mAP"] and [h["epoch"] for h in r["history"]] == [1, 2]
    assert r["history"][-1]["mAP"] == r["mAP"]
    s = r["settings"]
    assert s["train_images"] == 8 and s["test_images"] == 6 and s["ignored_test_entries"] >= 1
    assert "selected on the test split" in r["best_epoch_note"]


def test_coco_via_cli(folders, tmp_path):
    from densessl.cli import main

    out = tmp_path / "ml.json"
    assert main(["eval", "multilabel", "random", *TINY, "data.dataset=coco", f"data.root={folders / 'coco'}",
                 "mode=cached", f"out={out}"]) == 0
    r = json.loads(out.read_text())["multilabel"]
    assert r["settings"]["num_classes"] == 10 and 0.0 <= r["mAP"] <= 1.0


def test_bad_inputs_give_clear_cli_errors(folders, tmp_path, capsys):
    import shutil

    from densessl.cli import main

    assert main(["eval", "multilabel", "random", "data.dataset=voc"]) == 2
    assert "data.dataset=voc needs data.root" in capsys.readouterr().err
    root = tmp_path / "voc"
    shutil.copytree(folders / "voc", root)
    xml = root / "Annotations" / "trainval_000002.xml"
    xml.write_text(xml.read_text().replace("<xmin>", "<xmin>x", 1))
    assert main(["eval", "multilabel", "random", *TINY, "data.dataset=voc", f"data.root={root}"]) == 2
    err = capsys.readouterr().err
    assert "densessl: error:" in err and "trainval_000002.xml" in err and "<bndbox>/<xmin> is not a number" in err


@pytest.fixture
def custom_voc(tmp_path):
    """A VOC folder with its own class names and no labels.txt (as LabelImg and CVAT write it)."""
    import numpy as np
    from PIL import Image

    root = tmp_path / "cvat"
    for d in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / d).mkdir(parents=True)
    objects = {"t0": ["worker", "pallet"], "t1": ["pallet"], "t2": ["forklift"], "t3": ["worker"],
               "v0": ["pallet", "forklift"], "v1": ["worker"], "v2": ["forklift"]}
    for k, (sid, names) in enumerate(objects.items()):
        pixels = np.random.default_rng(k).integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "JPEGImages" / f"{sid}.png")
        boxes = "".join(f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>2</xmin><ymin>2</ymin>"
                        f"<xmax>30</xmax><ymax>30</ymax></bndbox></object>" for n in names)
        (root / "Annotations" / f"{sid}.xml").write_text(f"<annotation><filename>{sid}.png</filename>{boxes}"
                                                         f"</annotation>")
    (root / "ImageSets/Main/trainval.txt").write_text("t0\nt1\nt2\nt3\n")
    (root / "ImageSets/Main/test.txt").write_text("v0\nv1\nv2\n")
    return root


def test_voc_with_its_own_class_names_infers_them_sorted_prints_and_saves_them(custom_voc, tmp_path, capsys):
    from densessl.cli import main

    args = ["eval", "multilabel", "random", *TINY, "epochs=1", "mode=cached", "data.dataset=voc",
            f"data.root={custom_voc}"]
    assert main([*args, f"out={tmp_path / 'inferred.json'}"]) == 0
    assert "classes (3, from the names in 7 annotation files of " in capsys.readouterr().out
    r = json.loads((tmp_path / "inferred.json").read_text())["multilabel"]
    assert r["settings"]["classes"] == list(r["ap_per_class"]) == ["forklift", "pallet", "worker"]
    # data.classes gives them explicitly (any order, extra names allowed)
    assert main([*args, "data.classes=[worker,pallet,forklift,crate]", f"out={tmp_path / 'given.json'}"]) == 0
    s = json.loads((tmp_path / "given.json").read_text())["multilabel"]["settings"]
    assert s["classes"] == ["worker", "pallet", "forklift", "crate"] and s["classes_source"] == "data.classes"
    capsys.readouterr()
    # a name that data.classes lacks: one line naming the XML file and the name
    assert main([*args, "data.classes=[worker,pallet]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("densessl: error: ")
    assert str(custom_voc / "Annotations" / "t2.xml") in err[0] and "unknown class name 'forklift'" in err[0]
    assert "data.classes" in err[0]


def test_a_study_protocol_reaches_the_voc_transfer_and_gets_the_cli_number(folders, tmp_path):
    """The study and the command line evaluate through one table (eval/commands.py)."""
    import yaml

    from densessl.cli import main
    from densessl.study import load_study, read_table, run_study

    over = [*TINY, "data.dataset=voc", f"data.root={folders / 'voc'}", "mode=cached"]
    assert main(["eval", "multilabel", "random", *over, "random_init_seed=1", f"out={tmp_path / 'cli.json'}"]) == 0
    cli = json.loads((tmp_path / "cli.json").read_text())["multilabel"]
    study = {"name": "voc", "seeds": [0], "random": {"seeds": [1], "overrides": []}, "runs": [],
             "protocols": [{"name": "voc07", "eval": "multilabel", "overrides": over}],
             "report": [{"protocol": "voc07", "metric": "mAP", "label": "VOC mAP"}]}
    (tmp_path / "voc.yaml").write_text(yaml.safe_dump(study))
    table = tmp_path / "t.jsonl"
    run_study(load_study(str(tmp_path / "voc.yaml")), table, tmp_path / "runs", log=lambda *a: None)
    (row,) = read_table(table)
    assert row["metrics"]["mAP"] == cli["mAP"] and row["metrics"]["best_epoch_mAP"] == cli["best_epoch_mAP"]
    assert (tmp_path / "runs" / "random" / "seed1" / "eval" / "voc07.json").exists()


def test_every_eval_command_is_a_cli_subcommand_and_a_study_eval():
    from densessl.cli import build_parser
    from densessl.eval.commands import EVAL_COMMANDS

    parser = build_parser()
    for command in EVAL_COMMANDS:
        assert parser.parse_args(["eval", command, "random"]).protocol == command
