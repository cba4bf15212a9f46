"""The benchmark's two view pipelines produce the same slots (so their images/s compare like
for like), and the interleaving helper reports a per-contender median."""
import pytest
import torch

from densessl import bench, bench_views


def test_seed_style_and_densessl_views_match_slot_for_slot(tmp_path):
    paths = bench_views.write_jpegs(tmp_path, n=2, size=128)
    for crops, pyramid, n_slots in ((bench_views.BYOL_VIEWS, (), 2), (bench_views.MULTICROP, (), 8),
                                    (bench_views.MULTICROP, bench_views.PYRAMID, 34)):
        seed = bench_views.seed_style_views(paths, crops, pyramid)()
        ours = bench_views.densessl_views(paths, crops, pyramid)()
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
        for m, recipe in bench.STEP_RECIPES[scale].items():
            assert recipe.startswith(m + "-") and build_config(bench.step_recipe(m, scale), []).method.name == \
                {"pixcontrast": "pixpro", "pixpro-video": "pixpro_video"}.get(m, m)
    assert list(bench.STEP_RECIPES["small"]) == list(bench.STEP_METHODS)  # every method at the small scale


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


TINY = ["model.backbone=resnet18_small", "model.width=8", "method.proj_hidden_dim=32", "method.proj_dim=16",
        "data.size=32", "views.0.size=32", "views.1.size=32"]
TINY_HEADS = {"byol": ["method.pred_hidden_dim=32"], "pixpro": ["method.pred_hidden_dim=32"],
              "swav": ["method.num_prototypes=16", "views.1.size=16"]}


def test_compiled_methods_report_every_method_or_a_failure_line(monkeypatch):
    """`bench methods --compile`'s runner: one row per method, eager beside compiled; a method
    whose compilation fails keeps its eager rate and gets the error's first line, and the run
    goes on. torch.compile itself is stood in for (identity, or an error for two methods) so
    that every method runs in seconds; the real compile is the next test."""
    def fake_compile(run, backend="inductor", mode=None):
        if run.trainer.cfg.method.name in ("mocov2", "swav"):
            raise RuntimeError("backend failed\nsecond line")
        return run.trainer.model

    monkeypatch.setattr(bench, "compile_step", fake_compile)
    res = bench.bench_methods_compiled(methods=bench.STEP_METHODS, batch=8, rounds=1, warmup=1,
                                       overrides={m: TINY + TINY_HEADS.get(m, []) for m in bench.STEP_METHODS})
    assert list(res) == list(bench.STEP_METHODS)
    for m, r in res.items():
        assert r.eager is not None and r.eager.images_per_s > 0 and len(r.eager.samples) == 1
        if m in ("mocov2", "swav"):
            assert r.compiled is None and r.error == "RuntimeError: backend failed" and r.ratio is None
        else:
            assert r.error is None and r.compiled.images_per_s > 0 and r.ratio > 0 and r.compile_s > 0
    table = bench.format_compiled(res).splitlines()
    assert len(table) == 2 + len(bench.STEP_METHODS)
    assert "| mocov2 (mocov2-scenes) |" in table[3] and "failed: RuntimeError: backend failed |" in table[3]


def test_bench_methods_compile_command_runs_tiny(capsys):
    """The command line, really compiled (dynamo with the 'eager' backend: the graph capture
    without inductor's code generation, seconds instead of minutes), for one tiny method."""
    assert bench.main(["methods", "--compile", "--compile-backend", "eager", "--methods", "byol", "--batch", "8",
                       "--rounds", "1"] + [a for o in TINY + TINY_HEADS["byol"] for a in ("--set", o)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| byol (byol-scenes) |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[1]) > 0 and float(cells[2]) > 0 and cells[3].endswith("x") and int(cells[5]) >= 1


def test_step_bench_has_lightly_at_its_best_settings_when_importable(monkeypatch):
    """`bench step` adds lightly in bf16 + channels_last beside lightly's fp32 example when
    lightly imports; without it, the densessl contenders alone (the settings are passed on)."""
    calls = []

    def fake_lightly(size, batch, backbone="resnet18", device="cpu", precision="fp32", channels_last=False):
        calls.append((precision, channels_last))
        return lambda: None

    monkeypatch.setattr(bench, "lightly_byol_step", fake_lightly)
    monkeypatch.setattr(bench, "densessl_byol_step", lambda *a, **k: (lambda: None))
    names = [r.name for r in bench.bench_step(rounds=1)]
    assert calls == [("fp32", False), ("bf16", True)]
    assert names[:2] == ["lightly BYOL (fp32)", "lightly BYOL (bf16, channels_last)"] and len(names) == 7

    def missing(*a, **k):
        raise ImportError("no lightly")

    monkeypatch.setattr(bench, "lightly_byol_step", missing)
    assert not any(r.name.startswith("lightly") for r in bench.bench_step(rounds=1))


def test_profile_step_buckets_a_tiny_step():
    """benchmarks/profile_step.py's classification on a tiny profiled step: every bucket's time
    adds up to the profiled total, and the convolutions, batch norm and optimiser are found."""
    import importlib.util
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_step.py"
    spec = importlib.util.spec_from_file_location("profile_step", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    run = bench.densessl_byol_step("resnet18_small", 8, 16, 4, "bf16", True)
    mod.wrap(run.optimizer, "step", "bucket:optimizer")
    run()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    buckets, convs, ops, total = mod.classify(prof.events())
    assert set(buckets) <= set(mod.BUCKET_ORDER)
    assert sum(buckets.values()) == pytest.approx(total, rel=1e-6)
    assert all(buckets[b] > 0 for b in ("convolutions", "batch norm", "optimiser (LARS)"))
    assert any(k.startswith("3 -> 8, 3x3") or k.startswith("3 -> 8,") for k in convs), list(convs)


def test_a_method_without_a_recipe_at_the_scale_is_one_line(capsys):
    from densessl.cli import main

    assert main(["bench", "methods", "--scale", "paper", "--methods", "pixcontrast"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("densessl: error: bench methods: pixcontrast has no paper-scale recipe") and \
        "ssprl, gaelle" in err and err.count("\n") == 1
