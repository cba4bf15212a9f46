import json
import math

import pytest
import torch

from densessl.cli import main
from densessl.config import ConfigError, Config, to_dict
from densessl.eval.dense.config import dense_config
from densessl.eval.dense.run import evaluate_dense

# seconds on one core: 32-px scenes, an 8-wide backbone (C3 8x8, C4 4x4, C5 2x2), few images and epochs
TINY = ["model.width=8", "data.size=32", "data.num_workers=0", "num_train=24", "num_test=8", "seg.epochs=2",
        "seg.lr_grid=[0.01,0.1]", "seg.stages=[c4,c3+c4+c5]", "cluster.seeds=2", "retrieval.stages=[c4,c3+c4]",
        "retrieval.memory_size=256", "region.stages=[c4,c3+c4+c5]", "epochs=3", "k=5"]


def _unit(v):
    return isinstance(v, float) and (math.isnan(v) or 0.0 <= v <= 1.0)


def test_eval_dense_random_writes_one_json_with_every_probe_and_its_settings(tmp_path, capsys):
    out = tmp_path / "dense.json"
    assert main(["eval", "dense", "random", *TINY, f"out={out}"]) == 0
    r = json.loads(out.read_text())
    assert r["backbone"].startswith("random-init resnet18_small") and r["preset"] == "scenes"
    assert r["features"]["stages"] == {"c3": [16, 8, 8], "c4": [32, 4, 4], "c5": [64, 2, 2]}
    assert r["features"]["train_images"] == 24 and r["features"]["val_images"] == 8
    assert set(r["retrieval"]["mIoU"]) == {"c4", "c3+c4"}
    assert set(r["retrieval"]["mIoU"]["c4"]) == {"1/16", "1/4", "1"}
    assert all(_unit(v) for row in r["retrieval"]["mIoU"].values() for v in row.values())
    assert r["retrieval"]["settings"]["k"] == 30 and r["retrieval"]["settings"]["temperature"] == 0.02
    for name in ("c4", "c3+c4+c5"):
        seg = r["linear_seg"]["results"][name]
        assert _unit(seg["mIoU"]) and _unit(seg["fg_mIoU"]) and seg["lr"] in (0.01, 0.1)
        assert set(seg["holdout_mIoU"]) == {"0.01", "0.1"} and len(seg["iou_per_class"]) == 11
        reg = r["region"]["results"][name]
        assert _unit(reg["linear"]["acc"]) and _unit(reg["knn"]["acc"])
        assert set(reg["linear"]["acc_by_size"]) == {"small", "medium", "large"}
    for name in ("c4", "c3"):
        oc = r["overcluster"]["results"][name]
        assert oc["hungarian"]["K"] == 11 and oc["many_to_one"]["K"] == 22  # 8 x 16 points / 2300 < 2 x 11
        assert len(oc["hungarian"]["mIoU"]["per_seed"]) == 2 and _unit(oc["many_to_one"]["mIoU"]["mean"])
    assert r["linear_seg"]["settings"]["epochs"] == 2 and r["region"]["settings"]["knn"]["k"] == 5
    assert all(r[p]["seconds"] >= 0 for p in ("retrieval", "linear_seg", "overcluster", "region"))
    printed = capsys.readouterr().out
    assert "retrieval" in printed and "linear-seg" in printed and f"wrote {out}" in printed


def test_a_checkpoint_of_the_random_init_backbone_gives_identical_metrics(tmp_path):
    """`random` is not a special case: the same weights saved as a checkpoint score the same."""
    from densessl.common.checkpoint import FORMAT, save_atomic
    from densessl.eval.backbone import load_backbone

    cfg = dense_config(TINY + ["random_init_seed=3", "probes=[retrieval,linear_seg,overcluster,region]"])
    backbone, _ = load_backbone("random", cfg)
    train_cfg = Config()
    train_cfg.model.width = 8
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    save_atomic({"format": FORMAT, "config": to_dict(train_cfg),
                 "method": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}}, path)
    torch.manual_seed(12345)  # the global RNG state differs between the two runs: probes must not use it
    a = evaluate_dense("random", list(cfg.probes), dense_config(TINY + ["random_init_seed=3"]), log=lambda *a: None)
    b = evaluate_dense(str(path), list(cfg.probes), dense_config(TINY), log=lambda *a: None)

    def metrics(r):
        return json.dumps({p: {k: v for k, v in r[p].items() if k != "seconds"} for p in cfg.probes}, sort_keys=True)

    assert a["backbone"] != b["backbone"] and metrics(a) == metrics(b)


def test_single_probe_command_and_presets(tmp_path):
    out = tmp_path / "oc.json"
    assert main(["eval", "overcluster", "random", *TINY, f"out={out}"]) == 0
    r = json.loads(out.read_text())
    assert "overcluster" in r and "retrieval" not in r and r["features"]["train_images"] == 0
    paper = dense_config(["preset=paper"])
    assert paper.preset == "paper" and paper.data.size == 448 and paper.model.backbone == "resnet50"
    assert paper.cluster.overcluster_k == 500 and paper.retrieval.k == 30 and paper.num_train is None
    with pytest.raises(ConfigError, match="did you mean 'retrieval'"):
        dense_config(["retrieva.k=3"])
    with pytest.raises(ConfigError, match="stage set"):
        dense_config(["seg.stages=[c4+c9]"])


@pytest.mark.parametrize("override, message", [
    ("retrieval.k=0", "retrieval.k=0: expected >= 1"),
    ("retrieval.fractions=[0.5,1.5]", "retrieval.fractions=[0.5, 1.5]: expected fractions in (0, 1]"),
    ("seg.holdout=1.0", "seg.holdout=1.0: expected a fraction in (0, 1)"),
    ("cluster.pca_dim=0", "cluster.pca_dim=0: expected >= 1"),
    ("data.dataset=imagefolder", "data.dataset='imagefolder': expected fashion_scenes, moving_scenes, voc or coco"),
])
def test_a_refused_dense_setting_names_its_key_the_value_given_and_the_rule(override, message):
    with pytest.raises(ConfigError) as e:
        dense_config([override])
    assert str(e.value).startswith(message)


def test_evaluation_refuses_the_pretraining_only_decode_on_key(capsys):
    # ignoring it would let a user believe the GPU decoded their evaluation images
    from densessl.eval.protocols import eval_config

    for build in (dense_config, eval_config):
        with pytest.raises(ConfigError, match="data.decode_on='device': evaluation decodes"):
            build(["data.decode_on=device"])
        build(["data.decode_on=workers"])
    assert main(["eval", "retrieval", "random", "data.decode_on=device"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("densessl: error: data.decode_on='device'")


@pytest.mark.parametrize("fmt", ["voc", "coco"])
def test_voc_and_coco_folders_are_read_resized_with_their_masks_and_boxes(tmp_path, fmt):
    """Exported 40-px scenes read back at data.size=32: images and masks resized, boxes scaled."""
    from densessl.data import export
    from densessl.data.scenes import FashionScenes
    from densessl.eval.dense.data import dense_dataset

    root = tmp_path / fmt
    for split, n in (("train", 12), ("val", 6)):
        getattr(export, f"export_{fmt}")(FashionScenes(split, num_scenes=n, size=40, seed=1), root, split,
                                         image_ext="png")
    overrides = [*TINY, f"data.dataset={fmt}", f"data.root={root}", "num_train=null", "num_test=4"]
    ds, classes = dense_dataset(dense_config(overrides), "train")
    ref = FashionScenes("train", num_scenes=12, size=40, seed=1)[3]
    item = ds[3]
    assert len(ds) == 12 and classes[:2] == ("background", "T-shirt/top")
    assert item["image"].shape == (3, 32, 32) and item["label"].shape == (32, 32)
    assert item["classes"].tolist() == ref["classes"].tolist()
    torch.testing.assert_close(item["boxes"], ref["boxes"] * 0.8)
    assert set(item["label"].unique().tolist()) <= set([0] + (ref["classes"] + 1).tolist())
    out = tmp_path / "dense.json"
    assert main(["eval", "dense", "random", *overrides, "probes=[retrieval,region]", f"out={out}"]) == 0
    r = json.loads(out.read_text())
    assert r["features"]["train_images"] == 12 and r["features"]["val_images"] == 4
    assert r["region"]["settings"]["train_boxes"] == sum(len(FashionScenes("train", num_scenes=12, size=40, seed=1)[i]
                                                              ["classes"]) for i in range(12))
    assert 0 <= r["retrieval"]["mIoU"]["c4"]["1"] <= 1
