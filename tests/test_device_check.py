"""benchmarks/device_check.py, the GPU check, on the CPU at tiny sizes: every stage writes its
figures (or a recorded error) into the one JSON file; a failing compile or method loses nothing
else; the time budget stops new stages; the shell wrapper runs from the repository root."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def load_device_check():
    spec = importlib.util.spec_from_file_location("device_check", REPO / "benchmarks" / "device_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


SIZE_KEYS = ("batch", "size", "small_size", "warmup", "steps", "pretrain_seconds", "pretrain_steps", "jpegs",
             "jpeg_min_side", "jpeg_max_side", "workers", "log_every", "budget_s", "precision", "channels_last",
             "compile", "compile_methods", "methods", "stages", "pretrain_recipe", "device", "tiny", "out")


@pytest.mark.slow
def test_tiny_run_writes_every_stage(tmp_path):
    out = tmp_path / "device_check.json"
    assert load_device_check().main(["--tiny", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["schema"] == "densessl.device_check/1" and positive(d["elapsed_s"])
    assert all(k in d["settings"] for k in SIZE_KEYS) and d["settings"]["tiny"] is True
    env = d["stages"]["environment"]
    assert env["status"] == "ok" and env["torch"] == torch.__version__ and env["device_name"]
    assert env["cuda_available"] is torch.cuda.is_available() and "lightly" in env

    steps = d["stages"]["steps"]
    assert steps["status"] == "ok"
    for m in ("byol", "pixpro", "swav"):
        r = steps["results"][m]
        assert r["status"] == "ok" and r["backbone"] == "resnet18_small" and r["batch"] == 4
        assert r["timed_steps"] == 2 and len(r["step_times_s"]) == 2
        for k in ("images_per_s", "step_time_median_s", "images_per_s_unsynced", "first_step_s", "build_s"):
            assert positive(r[k]), (m, k, r[k])
        assert r["images_per_s"] == pytest.approx(4 / r["step_time_median_s"])
        assert r["precision"] == "bf16" and r["channels_last"] is True
        assert (r["peak_memory_bytes"] is None) if not torch.cuda.is_available() else positive(r["peak_memory_bytes"])
    assert steps["results"]["swav"]["views"] == [[32, 2], [16, 6]]  # multi-crop: 2 large + 6 small
    assert steps["results"]["byol"]["views"] == [[32, 1], [32, 1]]
    for name in ("lightly_byol_fp32", "lightly_byol_bf16_channels_last"):
        r = steps["results"][name]  # lightly is absent from the test environment: a recorded error
        assert (r["status"] == "ok" and positive(r["images_per_s"])) or \
            (r["status"] == "error" and "lightly" in r["error"])

    pre = d["stages"]["pretrain"]
    assert pre["status"] == "ok" and pre["ended"] == "completed" and pre["steps"] == 4, pre.get("log_tail")
    assert pre["jpegs"] == 16 and positive(pre["jpeg_mean_bytes"]) and " pretrain byol-imagenet " in pre["command"]
    assert positive(pre["images_per_s"]) and 0.0 <= pre["data_wait_frac"] <= 1.0
    assert [r["step"] for r in pre["records"]] == [1, 2, 3, 4]
    assert all(0.0 <= r["data_wait_frac"] <= 1.0 and positive(r["images_per_s"]) for r in pre["records"])
    dev = d["stages"]["pretrain_device_decode"]  # data.decode_on=device: on this CPU, the workers' losses
    assert dev["status"] == "ok" and dev["steps"] == 4 and "data.decode_on=device" in dev["command"], dev.get("log_tail")
    assert [r["loss"] for r in dev["records"]] == [r["loss"] for r in pre["records"]]

    compiled = d["stages"]["compiled"]  # --compile auto: on with CUDA only
    assert compiled["status"] == ("skipped" if not torch.cuda.is_available() else "ok")
    assert d["summary"]["steps.byol.images_per_s"] > 0 and 0 <= d["summary"]["pretrain.data_wait_frac"] <= 1


def test_compile_failure_and_a_failing_method_lose_nothing_else(tmp_path, monkeypatch):
    """A compile that fails at its first step is recorded and the step measured eagerly; a method
    whose build fails is recorded as an error and the next one still runs."""
    dc = load_device_check()

    def failing_compile(module, *a, **k):
        def call(*args, **kwargs):
            raise RuntimeError("inductor: no compiler on this machine")
        return call

    real_recipe_step = dc.bench.recipe_step

    def recipe_step(method, *a, **k):
        if method == "pixpro":
            raise ValueError("pixpro cannot be built here")
        return real_recipe_step(method, *a, **k)

    monkeypatch.setattr(torch, "compile", failing_compile)
    monkeypatch.setattr(dc.bench, "recipe_step", recipe_step)
    out = tmp_path / "dc.json"
    dc.main(["--tiny", str(out), "--stages", "compiled", "--compile", "on", "--methods", "pixpro", "byol",
             "--compile-methods", "pixpro", "byol", "--no-lightly"])
    d = json.loads(out.read_text())
    stage = d["stages"]["compiled"]
    assert stage["status"] == "ok" and stage["failed"] == ["pixpro"]
    assert stage["results"]["pixpro"] == {**stage["results"]["pixpro"], "status": "error",
                                          "error": "ValueError: pixpro cannot be built here"}
    byol = stage["results"]["byol"]
    assert byol["status"] == "ok" and byol["compiled"] is False and byol["fallback"] == "eager"
    assert byol["compile_error"] == "RuntimeError: inductor: no compiler on this machine"
    assert positive(byol["images_per_s"]) and positive(byol["step_time_median_s"])
    assert "steps" not in d["stages"] and "pretrain" not in d["stages"]


@pytest.mark.slow  # a fresh interpreter importing torch: 4-9 s on the loaded 2-core machine
def test_wrapper_runs_from_the_repo_root_and_the_budget_stops_new_stages(tmp_path):
    """bash benchmarks/device_check.sh: with no time budget left only the environment is recorded,
    each other stage as skipped with its reason, in the JSON named on the command line."""
    out = tmp_path / "budget.json"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", "benchmarks/device_check.sh", "--tiny", str(out), "--budget-s", "0"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(out.read_text())
    assert d["stages"]["environment"]["status"] == "ok"
    for name in ("steps", "pretrain", "pretrain_device_decode", "compiled"):
        assert d["stages"][name]["status"] == "skipped" and "time budget" in d["stages"][name]["reason"]
    assert d["settings"]["budget_s"] == 0 and d["finished"]
