"""Every scenes recipe's first 20 losses on a fixed seed equal the values recorded before the
redesign (tests/golden/first_losses.json, written by tests/golden_losses.py): bitwise on the
machine that recorded them, within a relative 1e-3 elsewhere (another CPU's kernels round
differently; a changed loss term, schedule or augmentation moves the losses by far more)."""
import json
import math

import pytest

from golden_losses import GOLDEN, STEPS, first_losses, machine, recipes

RECORDED = json.loads(GOLDEN.read_text())
SCENES = [r for r in recipes() if r.endswith("-scenes")]


@pytest.mark.parametrize("recipe", SCENES)
def test_first_losses_equal_the_recorded_ones(recipe, tmp_path):
    expected = RECORDED["losses"][recipe]
    got = first_losses(recipe, str(tmp_path))
    assert len(got) == STEPS
    if RECORDED["machine"] == machine():
        assert got == expected
    else:
        for step, (g, e) in enumerate(zip(got, expected)):
            g, e = float.fromhex(g), float.fromhex(e)
            assert math.isclose(g, e, rel_tol=1e-3, abs_tol=1e-6), f"{recipe} step {step}: {g} != {e}"
