import os
import sys
import time
from pathlib import Path

import pytest
import torch

# Tests use tiny models, where a second thread costs more than it gives (and on a loaded 2-core
# machine, far more).
torch.set_num_threads(1)

# A run small enough for seconds on 2 CPU cores: 8-wide small ResNet, 32-px scenes.
TINY = [
    "model.width=8", "method.proj_hidden_dim=32", "method.proj_dim=16", "method.pred_hidden_dim=32",
    "data.num_scenes=64", "data.size=32", "data.num_workers=0", "views.0.size=32", "views.1.size=32",
    "train.batch_size=16", "train.epochs=2", "train.progress=false", "train.tracker=none",
    "train.log_every=1", "train.ckpt_every=2", "train.precision=fp32", "optim.warmup_epochs=0.5",
    "train.knn_every=0",  # recipes that set a kNN monitor keep it off in tests (they ask for it by name)
]


@pytest.fixture
def tiny_overrides(tmp_path):
    return TINY + [f"run_dir={tmp_path / 'run'}"]


def _export_scenes(tmp_path_factory, layout: str, seed: int):
    """(scenes, folder): 8 validation scenes of `seed` written as lossless PNGs in `layout`
    (voc | coco) under the split name "val"."""
    from densessl.data.export import export_scenes
    from densessl.data.scenes import FashionScenes

    scenes = FashionScenes("val", num_scenes=8, seed=seed)
    root = tmp_path_factory.mktemp(layout)
    export_scenes(scenes, root, split_name="val", image_ext="png", layout=layout)
    return scenes, root


@pytest.fixture(scope="session")
def voc_export(tmp_path_factory):  # tests/data/test_voc.py
    return _export_scenes(tmp_path_factory, "voc", seed=3)


@pytest.fixture(scope="session")
def coco_export(tmp_path_factory):  # tests/data/test_coco.py
    return _export_scenes(tmp_path_factory, "coco", seed=5)


def cli_command(*args) -> list[str]:
    return [sys.executable, "-m", "densessl.cli", *args]


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def wait_for_marker(proc, marker: Path, timeout_s: float) -> bool:
    """Poll until the subprocess `proc` writes `marker` (it then sleeps, to be killed where the test
    wants it) or exits, or `timeout_s` passes; whether the marker is there."""
    deadline = time.time() + timeout_s
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    return marker.exists()


def assert_momentum_end_moves_target_halfway(method) -> None:
    """For a method built with momentum_base = momentum_end = 0.5: after_step at the last step
    still moves the target half-way to the online backbone (the default end, 1, freezes it)."""
    with torch.no_grad():
        method.backbone.conv1.weight.add_(1.0)
    old = method.target_backbone.conv1.weight.clone()
    method.after_step(10, 10)
    assert method.momentum == 0.5
    assert torch.allclose(method.target_backbone.conv1.weight, 0.5 * old + 0.5 * method.backbone.conv1.weight)


def pytest_report_header(config):
    from densessl.data.fashion_mnist import load_fashion_mnist

    data = load_fashion_mnist()
    return f"Fashion-MNIST: {data.source} ({len(data)} items)"
