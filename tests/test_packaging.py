"""Packaging: version, `python -m densessl`, declared dependencies, optional extras."""
import subprocess
import sys
from importlib.metadata import metadata, requires, version

import pytest

import densessl
from densessl.cli import main
from densessl.config import ConfigError, require_extra

from conftest import subprocess_env


def test_version_is_the_installed_distributions():
    assert version("densessl") == densessl.__version__


def test_python_dash_m_densessl_is_the_command():
    res = subprocess.run([sys.executable, "-m", "densessl", "--version"], capture_output=True, text=True,
                         env=subprocess_env())
    assert res.returncode == 0 and res.stdout.strip() == f"densessl {densessl.__version__}"


def test_license_is_an_spdx_expression_and_every_imported_package_is_declared():
    meta = metadata("densessl")
    assert meta["License-Expression"] == "Apache-2.0 AND MIT"
    assert "LICENSE" in meta.get_all("License-File")
    core = {r.split(";")[0].split("=")[0].split(">")[0].strip().lower() for r in requires("densessl") if "extra ==" not in r}
    assert {"pyyaml", "omegaconf", "safetensors", "scipy", "torch", "torchvision"} <= core
    extras = set(meta.get_all("Provides-Extra"))
    assert {"video", "coco", "tensorboard", "photos", "all", "test"} <= extras


def test_a_missing_extra_is_one_line_naming_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools.cocoeval", None)  # import raises ImportError
    with pytest.raises(ConfigError, match=r"COCO-style box AP needs the Python package 'pycocotools'.*densessl\[coco\]"):
        require_extra("pycocotools.cocoeval", "coco", "COCO-style box AP")
    assert require_extra("json", "none", "x").dumps([1]) == "[1]"


def test_detection_without_pycocotools_ends_in_one_line(monkeypatch, capsys):
    from densessl.eval import detection

    monkeypatch.setitem(sys.modules, "pycocotools.cocoeval", None)
    monkeypatch.setattr(detection, "run_detection", lambda *a, **k: detection.coco_box_ap({}, []))
    assert main(["eval", "detection", "random"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("densessl: error: ") and "densessl[coco]" in err[0]


def test_tracker_extras_are_declared_and_kept_out_of_all_and_test():
    import tomllib
    from pathlib import Path

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["wandb"] == ["wandb"] and extras["mlflow"] == ["mlflow"]
    assert not any(n in r for n in ("wandb", "mlflow") for r in extras["all"] + extras["test"])
