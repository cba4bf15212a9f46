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


def test_extends_takes_a_list_merged_in_order_and_views_replace_whole(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("extends: [_base/scenes, views/mocov2-aug-plus-64, views/byol-pair-64]\n"
                     "method: {name: byol}\ntrain: {batch_size: 64}\n")
    cfg = build_config(str(child))
    assert (cfg.model.backbone, cfg.model.width, cfg.data.num_workers) == ("resnet18_small", 32, 2)
    assert cfg.train.batch_size == 64 and cfg.train.ckpt_every == 50  # own key wins; the base's others stay
    # the later view set replaces the earlier one entirely: BYOL's pair, no MoCo saturation 0.4 left over
    assert [v.solarize_p for v in cfg.views] == [0.0, 0.2] and [v.saturation for v in cfg.views] == [0.2, 0.2]
    child.write_text("extends: [views/byol-pair-64]\nviews:\n  - {size: 32}\n")
    assert [v.size for v in build_config(str(child)).views] == [32]


def test_bases_and_view_sets_are_not_recipes(tmp_path):
    from densessl.config import recipe_names

    assert "byol-scenes" in recipe_names() and not any("/" in n or n.startswith("_") for n in recipe_names())
    with pytest.raises(ConfigError, match=r"'_base/scenes' is a part that recipes extend .* not a recipe"):
        find_recipe("_base/scenes")
    with pytest.raises(ConfigError) as e:
        find_recipe("scenes")
    assert "_base" not in str(e.value) and "views/" not in str(e.value)
    child = tmp_path / "child.yaml"
    child.write_text("extends: [_base/scene]\n")
    with pytest.raises(ConfigError, match=r"child.yaml: extends '_base/scene', which does not exist \(parts: .*_base/scenes"):
        build_config(str(child))
    child.write_text("extends: {a: 1}\n")
    with pytest.raises(ConfigError, match=r"child.yaml: extends expects a name or a list of names"):
        build_config(str(child))


def test_the_old_recipe_name_is_the_renamed_recipe():
    assert find_recipe("moco-scenes") == find_recipe("mocov2-scenes") == RECIPES_DIR / "mocov2-scenes.yaml"
    assert build_config("moco-scenes").run_dir == "runs/mocov2-scenes"
