"""The trainer's collapse warning: thresholds from measured runs, and its wiring into the log."""
import json
from pathlib import Path

from densessl.config import build_config
from densessl.engine.trainer import Trainer, collapse_warning


def test_collapse_warning_separates_the_measured_runs():
    assert collapse_warning(0.065, 0.008) is not None  # SwAV stuck at ln K (old swav-scenes, 1 epoch)
    assert collapse_warning(0.065, 0.031) is not None  # old swav-scenes, 3 epochs (ratio 0.48)
    assert collapse_warning(0.067, 0.052) is None  # swav-scenes after the recipe change (0.78)
    assert collapse_warning(0.069, 0.054) is None  # SCRL, 12 epochs (0.78)
    assert collapse_warning(0.0, 0.0) is None  # nothing logged yet
    msg = collapse_warning(0.065, 0.008)
    assert "0.0650" in msg and "0.0080" in msg and "z_std" in msg
    # it points at the section that says what the warning has meant, for every method that logs z_std
    assert "docs/reliability.md, 'The collapse warning'" in msg
    assert "## The collapse warning" in (Path(__file__).parents[2] / "docs" / "reliability.md").read_text()


def test_trainer_warns_once_when_z_std_falls(tmp_path, capsys):
    cfg = build_config("byol-scenes", ["data.num_scenes=16", "train.epochs=1", "train.batch_size=8",
                                       f"run_dir={tmp_path / 'run'}", "data.num_workers=0", "train.progress=false"])
    trainer = Trainer(cfg)
    trainer.run_dir.mkdir(parents=True, exist_ok=True)
    trainer._open_logs()
    for step, z in [(10, 0.068), (20, 0.06), (30, 0.03), (40, 0.01)]:
        trainer._log({"step": step, "loss": 1.0, "z_std": z})
    err = capsys.readouterr().err
    assert err.count("z_std fell") == 1 and "step 30" in err and "0.0680" in err
    logged = [json.loads(x)["z_std"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [0.068, 0.06, 0.03, 0.01]


def test_resumed_run_compares_with_its_first_z_std_and_drops_a_torn_line(tmp_path, capsys):
    cfg = build_config("byol-scenes", ["data.num_scenes=16", "train.epochs=1", "train.batch_size=8",
                                       f"run_dir={tmp_path / 'run'}", "data.num_workers=0", "train.progress=false"])
    trainer = Trainer(cfg)
    trainer.run_dir.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "run" / "metrics.jsonl"
    path.write_text('{"step": 10, "z_std": 0.07}\n{"step": 20, "z_std": 0.05}\n{"step": 30, "z_std": 0.0\n')
    trainer.step = 20  # resumed from the step-20 checkpoint; the step-30 line was cut by the kill
    trainer._open_logs()
    assert "dropped 1 unreadable line" in capsys.readouterr().err
    trainer._log({"step": 30, "loss": 1.0, "z_std": 0.04})  # 0.04 < 0.6 x 0.07, but not < 0.6 x 0.05
    assert "from 0.0700 to 0.0400" in capsys.readouterr().err
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [10, 20, 30]
