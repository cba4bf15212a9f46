"""The benchmark's two view pipelines produce the same slots (so their images/s compare like
for like), and the interleaving helper reports a per-contender median."""
import pytest
import torch

from densessl import bench


def test_seed_style_and_densessl_views_match_slot_for_slot(tmp_path):
    paths = bench.write_jpegs(tmp_path, n=2, size=128)
    for crops, pyramid, n_slots in ((bench.BYOL_VIEWS, (), 2), (bench.MULTICROP, (), 8),
                                    (bench.MULTICROP, bench.PYRAMID, 34)):
        seed = bench.seed_style_views(paths, crops, pyramid)()
        ours = bench.densessl_views(paths, crops, pyramid)()
        assert len(seed) == len(ours) == n_slots
        assert [x.shape for x in seed] == [x.shape for x in ours]
        assert all(x.dtype == torch.float32 and x.shape[0] == 2 for x in ours)
    # SS-PRL's order: 2x224, 6x96, then level 2x2 (2 views x 4 cells of 112), level 3x3 (2 x 9 of 96)
    assert [x.shape[-1] for x in ours] == [224] * 2 + [96] * 6 + [112] * 8 + [96] * 18


def test_interleaved_reports_median_rate():
    calls = []
    res = bench.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, batch=10,
                            warmup=1)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up, then alternating rounds
    assert [r.name for r in res] == ["a", "b"] and all(len(r.samples) == 3 and r.images_per_s > 0 for r in res)


def test_method_step_contenders_are_configured_as_labelled():
    """The plain-PyTorch contender really runs fp32, contiguous, without small-map GEMMs; the
    defaults contender runs bf16 and channels_last; each call is one real optimisation step."""
    from densessl.models.small_maps import SmallMapConv2d

    plain = bench.recipe_step("pixpro", "small", 4, "fp32", False, False)
    fast = bench.recipe_step("pixpro", "small", 4, "bf16", True, True)
    tp, tf = plain.trainer, fast.trainer
    assert tp.amp_dtype is None and tf.amp_dtype == torch.bfloat16
    w_plain, w_fast = tp.method.backbone.conv1.weight, tf.method.backbone.conv1.weight
    assert w_plain.is_contiguous() and w_fast.is_contiguous(memory_format=torch.channels_last)
    convs = [m for m in tp.method.modules() if isinstance(m, SmallMapConv2d)]
    assert convs and all(m.max_positions == 0 for m in convs)
    assert all(m.max_positions == 4 for m in tf.method.modules() if isinstance(m, SmallMapConv2d))
    before = w_plain.detach().clone()
    plain(), plain()  # the warm-up's first lr is 0
    assert tp.step == 2 and not torch.equal(before, w_plain)


def test_every_step_method_has_a_recipe_at_both_scales():
    from densessl.config import build_config

    for scale in bench.STEP_SCALES:
        for m in bench.STEP_METHODS:
            assert build_config(bench.step_recipe(m, scale), []).method.name == m


def test_colour_shortcut_measures_on_hand_made_images():
    """benchmarks/knn_colour_shortcut.py: a pure red image fills bin (3, 0, 0) = 48 of the 4x4x4
    histogram; half red, half black splits it with bin 0; intersections and luminance by hand."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "knn_colour_shortcut.py"
    spec = importlib.util.spec_from_file_location("knn_colour_shortcut", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    red = torch.zeros(3, 4, 4, dtype=torch.uint8)
    red[0] = 255
    half = red.clone()
    half[:, :2] = 0
    items = [{"image": red, "label": torch.tensor(0)}, {"image": half, "label": torch.tensor(1)}]
    hist = mod.colour_histograms(items)
    assert hist[0, 48] == 1 and hist[1, 48] == 0.5 and hist[1, 0] == 0.5 and torch.allclose(hist.sum(1), torch.ones(2))
    assert torch.allclose(mod.intersection(hist, hist), torch.tensor([[1.0, 0.5], [0.5, 1.0]]))
    assert mod.grayscale(items)[0]["image"][:, 0, 0].tolist() == [76, 76, 76]  # round(0.2989 * 255)
    # the colour similarity of the k feature-nearest columns: row 0's nearest is column 1 (0.7)
    assert mod.mean_topk_colour(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.2, 0.7]]), k=1) == pytest.approx(0.7)
