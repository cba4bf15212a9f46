import pytest

from densessl.config import ConfigError, build_config, find_recipe, RECIPES_DIR


def test_unknown_key_names_closest_valid_key():
    with pytest.raises(ConfigError) as e:
        build_config("byol-scenes", ["optim.lrr=0.1"])
    assert "unknown key 'optim.lrr'" in str(e.value)
    assert "did you mean 'optim.lr'" in str(e.value)


def test_unknown_key_in_method_section_uses_the_method_schema():
    with pytest.raises(ConfigError, match=r"unknown key 'method.momentum_bsae'; did you mean 'method.momentum_base'"):
        build_config("byol-scenes", ["method.momentum_bsae=0.9"])


def test_wrong_type_names_key_type_and_value():
    with pytest.raises(ConfigError) as e:
        build_config("byol-scenes", ["train.epochs=many"])
    assert str(e.value) == "key 'train.epochs' expects int, got str 'many'"


def test_tuple_length_checked():
    with pytest.raises(ConfigError, match=r"key 'views\[0\].scale' expects 2 values, got 1"):
        build_config("byol-scenes", ["views.0.scale=[0.5]"])


def test_overrides_win_and_index_lists():
    cfg = build_config("byol-scenes", ["views.1.blur_p=0.3", "optim.lr=2", "model.width=16"])
    assert cfg.views[1].blur_p == 0.3 and cfg.views[0].blur_p == 1.0
    assert cfg.optim.lr == 2.0 and isinstance(cfg.optim.lr, float)
    assert cfg.model.width == 16


def test_unknown_method_and_recipe():
    with pytest.raises(ConfigError, match="method.name='byl' is not a known method; did you mean 'byol'"):
        build_config("byol-scenes", ["method.name=byl"])
    with pytest.raises(ConfigError, match="did you mean 'byol-scenes'"):
        find_recipe("byol-scene")


def test_extends_merges_parent(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("extends: byol-scenes\ntrain:\n  epochs: 7\n")
    cfg = build_config(str(child))
    assert cfg.train.epochs == 7 and cfg.method.name == "byol" and cfg.model.backbone == "resnet18_small"


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
def test_every_shipped_recipe_validates(recipe):
    build_config(recipe)
