"""train.tracker: the trainer sends metrics.jsonl's records to TensorBoard, W&B or MLflow (rank 0 only).

W&B and MLflow are not installed for the tests: fake modules stand in for them (sys.modules),
recording what the trainer calls."""
import dataclasses
import json
import sys
import types

import pytest

from conftest import TINY
from densessl.cli import main
from densessl.config import ConfigError, build_config, config_from_dict, to_dict
from densessl.engine.trackers import TensorBoardTracker, open_tracker
from densessl.engine.trainer import Trainer


def fake_wandb(calls):
    class Run:
        def log(self, metrics, step):
            calls.append(("log", dict(metrics), step))

        def finish(self):
            calls.append(("finish",))

    def init(**kw):
        calls.append(("init", kw))
        return Run()

    return types.SimpleNamespace(init=init)


def fake_mlflow(calls):
    def record(name):
        return lambda *a, **kw: calls.append((name, a, kw))

    def log_metrics(metrics, step):
        calls.append(("log", dict(metrics), step))

    return types.SimpleNamespace(set_tracking_uri=record("uri"), set_experiment=record("experiment"),
                                 start_run=record("init"), log_params=record("params"), log_metrics=log_metrics,
                                 end_run=lambda: calls.append(("finish",)))


FAKES = {"wandb": fake_wandb, "mlflow": fake_mlflow}


def tiny(tmp_path, tracker, *extra):
    return build_config("byol-scenes", TINY + ["train.epochs=1", f"train.tracker={tracker}",
                                               f"run_dir={tmp_path / 'run'}", *extra])


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_the_tracker_gets_the_records_of_metrics_jsonl(tracker, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, tracker, FAKES[tracker](calls))
    cfg = tiny(tmp_path, tracker)
    Trainer(cfg).fit()
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) >= 4  # 4 steps, logged every step, plus the probe's epoch record
    sent = [(c[1], c[2]) for c in calls if c[0] == "log"]
    assert sent == [({k: v for k, v in r.items() if k != "step"}, r["step"]) for r in records]
    assert calls[-1] == ("finish",) and [c[0] for c in calls].count("init") == 1
    init = next(c for c in calls if c[0] == "init")
    if tracker == "wandb":
        assert init[1]["config"] == to_dict(cfg) and init[1]["dir"] == str(tmp_path / "run")
    else:  # the file store in the run folder, and the config as parameters
        uri = next(c for c in calls if c[0] == "uri")[1][0]
        assert uri == (tmp_path / "run" / "mlruns").resolve().as_uri()
        params = next(c for c in calls if c[0] == "params")[1][0]
        assert params["train.tracker"] == "mlflow" and params["optim.lr"] == str(cfg.optim.lr)


def test_only_rank_0_opens_a_tracker(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(calls))
    trainer = Trainer(tiny(tmp_path, "wandb"))
    # rank 1 of 2 without a process group: it trains its half of each batch and logs nothing
    trainer.dist = dataclasses.replace(trainer.dist, rank=1, world_size=2)
    trainer.fit()
    assert calls == [] and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_unknown_tracker_is_one_line_naming_the_key_and_the_choices(tmp_path, capsys):
    with pytest.raises(ConfigError, match="train.tracker"):
        tiny(tmp_path, "comet")
    assert main(["pretrain", "byol-scenes", "train.tracker=comet", f"run_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "densessl: error: key 'train.tracker' expects one of tensorboard, wandb, mlflow, none, got 'comet'"]


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_missing_tracker_package_names_its_extra(tracker, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, tracker, None)  # import fails, installed or not
    assert main(["pretrain", "byol-scenes", *TINY, f"train.tracker={tracker}", f"run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("densessl: error: train.tracker=") and \
        f"pip install 'densessl[{tracker}]'" in err[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before training


def test_tensorboard_stays_the_default_and_tracker_none_switches_it_off(tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    cfg = build_config("byol-scenes", [f"run_dir={tmp_path}"])
    assert cfg.train.tracker == "tensorboard"
    tb = open_tracker(cfg, tmp_path)
    assert isinstance(tb, TensorBoardTracker)
    tb.log({"step": 3, "loss": 1.5, "nan": float("nan")})
    tb.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert open_tracker(build_config("byol-scenes", ["train.tracker=none"]), tmp_path) is None


def test_the_retired_tensorboard_switch_maps_onto_train_tracker():
    # older run folders' config.yaml and users' commands still carry train.tensorboard
    assert build_config("byol-scenes", ["train.tensorboard=false"]).train.tracker == "none"
    assert build_config("byol-scenes", ["train.tensorboard=true"]).train.tracker == "tensorboard"
    # it never overrides a tracker chosen by name
    assert build_config("byol-scenes", ["train.tensorboard=false", "train.tracker=wandb"]).train.tracker == "wandb"
    saved = to_dict(build_config("byol-scenes"))
    saved["train"]["tensorboard"] = False
    assert config_from_dict(saved).train.tracker == "none"
