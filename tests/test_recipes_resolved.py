"""Every shipped recipe resolves to exactly the config it had before the recipes were built on
shared bases (recipes/_base/) and view sets (recipes/views/).

tests/golden/resolved_recipes.json holds `to_dict(build_config(name))` of each recipe, recorded
from the code before that change. The one value allowed to differ is `run_dir` of a renamed
recipe (moco-scenes -> mocov2-scenes), which follows the new name.
"""
import json
from pathlib import Path

import pytest

from densessl.config import RENAMED_RECIPES, build_config, recipe_names, to_dict

GOLDEN = json.loads((Path(__file__).parent / "golden" / "resolved_recipes.json").read_text())


def test_the_golden_file_covers_every_recipe_and_only_those():
    assert sorted(RENAMED_RECIPES.get(n, n) for n in GOLDEN) == recipe_names()


@pytest.mark.parametrize("old_name", sorted(GOLDEN))
def test_recipe_resolves_to_the_recorded_config(old_name):
    name = RENAMED_RECIPES.get(old_name, old_name)
    want = dict(GOLDEN[old_name])
    if name != old_name:
        assert want["run_dir"] == f"runs/{old_name}"
        want["run_dir"] = f"runs/{name}"  # a renamed recipe's run folder follows its new name
    assert to_dict(build_config(name)) == want
    assert to_dict(build_config(old_name)) == want  # the old name is still accepted
