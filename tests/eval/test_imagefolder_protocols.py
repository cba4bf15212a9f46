"""kNN and linear on a user's labelled image folder: the folder's own train/val sub-folders, or a
seeded split of one folder; the classes come from the folder (not the built-in 10)."""
import json

import numpy as np
from PIL import Image

from densessl.cli import main
from densessl.eval.protocols import eval_config, evaluate, labelled_split

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
SMALL = ["model.width=8", "data.size=32", "epochs=30", "k=3", "lr=0.1"]


def write_folder(root, per_class: int, seed: int = 0):
    """Constant-colour images with a little noise: three classes any backbone tells apart."""
    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 8, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_knn_and_linear_on_train_val_sub_folders_separate_three_colour_classes(tmp_path):
    write_folder(tmp_path / "train", 8)
    write_folder(tmp_path / "val", 4, seed=1)
    cfg = eval_config(["data.dataset=imagefolder", f"data.root={tmp_path}", *SMALL])
    result = evaluate("random", ["knn", "linear"], cfg)
    assert result["knn"]["knn_top1"] == 1.0 and result["linear"]["linear_top1"] == 1.0
    assert result["knn"]["settings"]["train"] == 24 and result["knn"]["settings"]["test"] == 12


def test_one_folder_is_split_by_a_seeded_permutation_and_caps_draw_from_every_class(tmp_path):
    write_folder(tmp_path, 10)
    cfg = eval_config(["data.dataset=imagefolder", f"data.root={tmp_path}", "val_fraction=0.2", "data.size=32"])
    train, val = labelled_split(cfg, "train", None), labelled_split(cfg, "val", None)
    assert len(train) == 24 and len(val) == 6 and not set(train.indices) & set(val.indices)
    assert train.classes == ["blue", "green", "red"]
    capped = labelled_split(cfg, "train", 9)
    assert len(capped) == 9 and len({capped.dataset.samples[i][1] for i in capped.indices}) > 1
    again = labelled_split(cfg, "val", None)
    assert again.indices == val.indices  # the same split every time (data.seed)


def test_multilabel_on_an_image_folder_is_one_clear_error(tmp_path, capsys):
    write_folder(tmp_path, 2)
    code = main(["eval", "frozen", "random", "data.dataset=imagefolder", f"data.root={tmp_path}", *SMALL,
                 f"out={tmp_path / 'm.json'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("densessl: error: data.dataset=imagefolder: multilabel read fashion_scenes")
    assert err.count("\n") == 1


def test_the_cli_writes_knn_for_a_folder(tmp_path, capsys):
    write_folder(tmp_path / "train", 6)
    write_folder(tmp_path / "val", 3, seed=2)
    out = tmp_path / "knn.json"
    assert main(["eval", "knn", "random", "data.dataset=imagefolder", f"data.root={tmp_path}", *SMALL,
                 f"out={out}"]) == 0
    assert json.loads(out.read_text())["knn"]["knn_top1"] == 1.0
