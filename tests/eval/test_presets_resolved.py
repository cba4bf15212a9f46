"""The evaluation presets, now YAML files in densessl/eval/presets/, resolve to exactly the configs
the Python dicts gave (tests/golden/resolved_eval_configs.json, recorded before the move), and a
preset file is checked by the recipes' typed loader."""
import json
from pathlib import Path

import pytest

from densessl.config import ConfigError, to_dict
from densessl.eval import transfer
from densessl.eval.dense.config import dense_config
from densessl.eval.detection import DetectionConfig, detection_config
from densessl.eval.multilabel_transfer import multilabel_transfer_config
from densessl.eval.protocols import eval_config
from densessl.eval.segmentation import segmentation_config

GOLDEN = json.loads((Path(__file__).parents[1] / "golden" / "resolved_eval_configs.json").read_text())
BUILD = {"detection": detection_config, "segmentation": segmentation_config, "dense": dense_config,
         "multilabel": lambda o: multilabel_transfer_config([f"data.dataset={o[0].partition('=')[2]}"]),
         "frozen": eval_config}


def overrides(key: str) -> list[str]:
    name = key.split("/")[1]
    return [] if name == "default" else [f"preset={name}"]


@pytest.mark.parametrize("key", sorted(GOLDEN))
def test_preset_resolves_to_the_recorded_config(key):
    protocol = key.split("/")[0]
    assert to_dict(BUILD[protocol](overrides(key))) == GOLDEN[key]


def test_every_preset_file_is_recorded():
    recorded = {k for k in GOLDEN if not k.endswith("/default")}
    files = {f"{p.stem.split('-', 1)[0]}/{p.stem.split('-', 1)[1]}" for p in transfer.PRESETS_DIR.glob("*.yaml")}
    assert files == recorded


def test_a_preset_with_an_unknown_key_is_refused_naming_the_file(tmp_path, monkeypatch):
    (tmp_path / "detection-bad.yaml").write_text("iterations: 10\nanchor_size: [1, 2]\n")
    monkeypatch.setattr(transfer, "PRESETS_DIR", tmp_path)
    with pytest.raises(ConfigError, match=r"detection-bad.yaml: unknown key 'anchor_size'; did you mean 'anchor_sizes'"):
        detection_config(["preset=bad"])
    (tmp_path / "detection-typo.yaml").write_text("iterations: ten\n")
    with pytest.raises(ConfigError, match=r"detection-typo.yaml: key 'iterations' expects int, got str 'ten'"):
        transfer.load_preset(DetectionConfig, "detection", "typo")
    with pytest.raises(ConfigError, match=r"unknown preset 'nope'; expected one of bad, typo \(preset=NAME\)"):
        detection_config(["preset=nope"])


def test_user_overrides_win_over_the_preset():
    cfg = detection_config(["preset=voc0712", "iterations=5", "data.num_workers=0"])
    assert cfg.iterations == 5 and cfg.data.num_workers == 0 and cfg.lr == 0.02 and cfg.preset == "voc0712"
    cfg = multilabel_transfer_config(["data.dataset=coco", "lr=0.5"])
    assert cfg.lr == 0.5 and cfg.batch_size == 128 and cfg.data.train_split == "train2014"
