"""docs/adding-a-method.md stays true: its method file and recipe, exactly as written there,
register a method, resolve through the recipe bases, and train through the real trainer."""
import re
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY
from densessl.common import registry
from densessl.common.registry import available
from densessl.config import build_config
from densessl.engine.trainer import Trainer

DOC = Path(__file__).resolve().parents[1] / "docs" / "adding-a-method.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.fixture
def unregister_simsiam():
    yield
    registry._REGISTRY.pop("simsiam", None)  # other tests see the package's methods only


def test_the_documented_method_and_recipe_train(tmp_path, unregister_simsiam):
    (code,), (recipe,) = blocks("python"), blocks("yaml")
    namespace = {"__name__": "densessl.methods.simsiam_doc"}
    exec(compile(code, str(DOC), "exec"), namespace)  # registers "simsiam"
    assert "simsiam" in available()
    path = tmp_path / "simsiam-scenes.yaml"
    path.write_text(recipe)  # its bases are named as in densessl/recipes/, where the recipe would live
    overrides = [o for o in TINY if not o.startswith("method.pred")] + [f"run_dir={tmp_path / 'run'}",
                                                                        "train.epochs=1"]
    cfg = build_config(str(path), overrides)
    assert cfg.method.name == "simsiam" and cfg.model.backbone == "resnet18_small"
    assert cfg.views[0].blur_p == 1.0 and cfg.views[1].solarize_p == 0.2  # the BYOL pair came from views/
    assert yaml.safe_load(recipe)["run_dir"] == "runs/simsiam-scenes"
    result = Trainer(cfg).fit()
    state = torch.load(result["checkpoint"], weights_only=True)
    assert state["step"] == 4  # 64 scenes / batch 16, one epoch
