"""End-to-end behaviour of the trainer on tiny runs: resume, kill, NaN, distributed."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY, cli_command, subprocess_env
from densessl.cli import main
from densessl.common.checkpoint import load_checkpoint
from densessl.config import ConfigError, build_config
from densessl.engine.trainer import NonFiniteLossError, Trainer


def weights(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["method"]


def losses(run_dir: Path) -> dict:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def test_short_run_writes_checkpoint_config_metrics_and_plot(tiny_overrides, tmp_path):
    cfg = build_config("byol-scenes", tiny_overrides)
    result = Trainer(cfg).fit()
    run = tmp_path / "run"
    assert result["step"] == 8  # 2 epochs x 64 scenes / 16
    # the trainer draws no plots; `densessl pretrain` does (here it resumes the finished run at once)
    assert not (run / "loss.png").exists()
    assert main(["pretrain", "byol-scenes", *tiny_overrides]) == 0
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["step"] == 8 and ckpt["config"]["train"]["batch_size"] == 16
    assert (run / "config.yaml").exists() and (run / "loss.png").stat().st_size > 1000
    assert sorted(losses(run)) == list(range(1, 9))
    # the target network moved by EMA, not by gradients: it differs from the online one
    assert not torch.equal(ckpt["method"]["backbone.conv1.weight"], ckpt["method"]["target_backbone.conv1.weight"])


def test_knn_monitor_logs_the_untrained_backbone_at_step_0(tiny_overrides, tmp_path):
    """knn_every: a record at step 0 (the random-init reference), every knn_every steps and at the
    end; the step-0 value is the kNN of the freshly built backbone, computed independently."""
    from densessl.data.build import build_dataset
    from densessl.eval.features import extract_features
    from densessl.eval.knn import knn_accuracy

    cfg = build_config("byol-scenes", tiny_overrides + ["train.knn_every=3"])
    trainer = Trainer(cfg)
    fresh = {k: v.clone() for k, v in trainer.method.backbone.state_dict().items()}
    trainer.fit()
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    knn = {r["step"]: r["knn_top1"] for r in recs if "knn_top1" in r}
    assert sorted(knn) == [0, 3, 6, 8]

    trainer.method.backbone.load_state_dict(fresh)
    feats = [extract_features(trainer.method.backbone, build_dataset(cfg.data, split=s, single_item=True, num=n),
                              target_key="label") for s, n in (("train", 2000), ("val", 1000))]
    assert knn[0] == pytest.approx(knn_accuracy(*feats[0], *feats[1], num_classes=10), abs=2e-3)
    assert knn[8] != knn[0]


def test_rerun_of_finished_run_resumes_and_does_nothing(tiny_overrides, tmp_path):
    cfg = build_config("byol-scenes", tiny_overrides)
    Trainer(cfg).fit()
    before = weights(tmp_path / "run")
    Trainer(build_config("byol-scenes", tiny_overrides)).fit()
    after = weights(tmp_path / "run")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_with_a_different_config_is_refused(tiny_overrides):
    Trainer(build_config("byol-scenes", tiny_overrides)).fit()
    with pytest.raises(ValueError, match=r"optim.lr: 1.0 -> 2.0"):
        Trainer(build_config("byol-scenes", tiny_overrides + ["optim.lr=2.0"])).fit()


def test_a_key_added_after_the_run_began_resumes_at_its_default(tiny_overrides, tmp_path):
    """A checkpoint written before data.min_side existed ran with its default: it resumes; a
    value other than the default is a changed config and is refused."""
    from densessl.common.checkpoint import save_atomic

    Trainer(build_config("byol-scenes", tiny_overrides)).fit()
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    del state["config"]["data"]["min_side"]
    save_atomic(state, last)
    assert Trainer(build_config("byol-scenes", tiny_overrides)).fit()["step"] == 8
    save_atomic(state, last)
    with pytest.raises(ConfigError, match=r"data.min_side: 16 -> 8.*run_dir="):
        Trainer(build_config("byol-scenes", tiny_overrides + ["data.min_side=8"])).fit()


def test_a_key_added_inside_each_view_resumes_at_its_default_but_a_new_view_is_a_change(tiny_overrides, tmp_path):
    """views are a list: a key added to every view since (views.N.blur_kind) ran at its default; a
    view the run did not have is a changed config, even when all its values are defaults."""
    from densessl.common.checkpoint import save_atomic

    Trainer(build_config("byol-scenes", tiny_overrides)).fit()
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    for view in state["config"]["views"]:
        del view["blur_kind"]
    save_atomic(state, last)
    assert Trainer(build_config("byol-scenes", tiny_overrides)).fit()["step"] == 8
    state["config"]["views"] = state["config"]["views"][:1]
    save_atomic(state, last)
    with pytest.raises(ConfigError, match=r"views\.1\."):
        Trainer(build_config("byol-scenes", tiny_overrides)).fit()


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    args = TINY + ["train.epochs=3", "data.num_scenes=160", "train.ckpt_every=3"]  # 10 steps an epoch
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    env = subprocess_env()
    subprocess.run(cli_command("pretrain", "byol-scenes", *args, f"run_dir={ref}"), check=True, env=env,
                   capture_output=True)
    proc = subprocess.Popen(cli_command("pretrain", "byol-scenes", *args, f"run_dir={killed}"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and not (last.exists() and load_checkpoint(last)["step"] >= 12):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_at_kill = load_checkpoint(last)["step"]
    assert 12 <= step_at_kill < 30 and step_at_kill % 10 != 0, "the kill must land mid-run and mid-epoch"
    subprocess.run(cli_command("pretrain", "byol-scenes", *args, f"run_dir={killed}"), check=True, env=env,
                   capture_output=True)
    a, b = weights(ref), weights(killed)
    assert load_checkpoint(last)["step"] == 30
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the metrics log was truncated to the checkpoint and redone: one record per step, equal values
    assert losses(ref) == losses(killed)


def test_nan_loss_stops_run_and_keeps_last_good_checkpoint(tiny_overrides, tmp_path, monkeypatch):
    cfg = build_config("byol-scenes", tiny_overrides)
    trainer = Trainer(cfg)
    forward = trainer.method.forward

    def poisoned(views, batch):
        out = forward(views, batch)
        if trainer.step >= 5:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(trainer.method, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match="at or before step 6.*last good checkpoint"):
        trainer.fit()
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["method"].values() if v.is_floating_point())


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    """Two processes (batch 8 each, synchronised BN) follow the one-process run (batch 16) up to
    float noise. The two runs sum in different orders, so they agree only up to rounding, and
    training amplifies rounding differences (a 1e-6 loss difference became 1e-4 within one step
    here). The tolerance is therefore measured, not guessed: a third run, the one-process run
    with two intra-op threads, differs from it by summation order alone; the two-process run
    must stay within a few times that noise (plus a floor of ~30 float32 ulps). Without
    synchronised BN, or with ranks reading overlapping samples, the loss differs by ~1e-1 at
    step 1 while the noise is ~1e-6."""
    args = TINY + ["train.ckpt_every=100", "optim.lr=0.05"]
    one, one_t2, two = tmp_path / "one", tmp_path / "one_t2", tmp_path / "two"
    env = subprocess_env()
    for run_dir, threads in ((one, "1"), (one_t2, "2")):
        subprocess.run(cli_command("pretrain", "byol-scenes", *args, f"run_dir={run_dir}"), check=True,
                       env={**env, "OMP_NUM_THREADS": threads}, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                "-m", "densessl.cli", "pretrain", "byol-scenes", *args, f"run_dir={two}", "train.sync_bn=true"]
    res = subprocess.run(torchrun, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    l1, noise_run, l2 = losses(one), losses(one_t2), losses(two)
    assert sorted(l1) == sorted(l2) == sorted(noise_run) == list(range(1, 9))
    for step in l1:
        noise = abs(l1[step] - noise_run[step])
        assert abs(l1[step] - l2[step]) <= 4 * noise + 4e-6 * abs(l1[step]), (step, l1[step], l2[step], noise)
    w1, w_noise, w2 = weights(one), weights(one_t2), weights(two)
    for k in w1:
        if w1[k].is_floating_point():
            noise = (w1[k] - w_noise[k]).norm()
            assert (w1[k] - w2[k]).norm() <= 4 * noise + 4e-6 * w1[k].norm() + 1e-12, k


def test_online_probe_takes_its_classes_from_a_labelled_image_folder(tmp_path):
    from PIL import Image

    for c in ("ant", "bee", "cat"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (40, 40), (40 * i, 80, 120)).save(tmp_path / "imgs" / c / f"{i}.png")
    overrides = [o for o in TINY if not o.startswith("data.num_scenes")] + [
        "data.dataset=imagefolder", f"data.root={tmp_path / 'imgs'}", f"run_dir={tmp_path / 'run'}",
        "train.epochs=1"]
    trainer = Trainer(build_config("byol-scenes", overrides))
    assert trainer.step_module.probe.out_features == 3
    assert trainer.fit()["step"] == 1  # 18 images // batch 16


@pytest.mark.parametrize("amx, avx512_bf16, expected", [
    (True, False, torch.bfloat16), (False, True, torch.bfloat16), (False, False, None)])
def test_auto_precision_uses_bf16_on_cpus_with_bf16_units(monkeypatch, amx, avx512_bf16, expected):
    """auto -> bf16 with AMX (Intel) or AVX512-BF16 (AMD Zen 4+, Intel Cooper Lake); explicit
    settings win over the hardware."""
    from densessl.engine.trainer import resolve_precision

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) is expected
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16


def test_data_wait_share_is_logged_per_interval(tiny_overrides, tmp_path, monkeypatch):
    """metrics.jsonl's data_wait_frac: the share of each log interval spent waiting in next() on
    the loader, in [0, 1]. A loader slowed by 30 ms an item (16 items a batch, 0.48 s a step, the
    step itself some ms) makes it most of every interval."""
    from densessl.data.views import ViewDataset

    slow = ViewDataset.__getitem__

    def getitem(self, key):
        time.sleep(0.03)
        return slow(self, key)

    monkeypatch.setattr(ViewDataset, "__getitem__", getitem)
    Trainer(build_config("byol-scenes", tiny_overrides + ["train.epochs=1"])).fit()
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    shares = [r["data_wait_frac"] for r in recs if "loss" in r]
    assert len(shares) == 4 and all(0.0 <= s <= 1.0 for s in shares)
    assert min(shares) > 0.5


def test_the_view_dataset_is_built_once_per_run_not_per_epoch(tiny_overrides, monkeypatch):
    """The video variant's frame pairs hold a flow model and cache: rebuilding them every epoch
    re-loaded RAFT each time. The trainer builds the view dataset on first use and keeps it."""
    from densessl.methods.byol import BYOL

    calls = []
    original = BYOL.view_dataset
    monkeypatch.setattr(BYOL, "view_dataset", lambda self, *a: calls.append(1) or original(self, *a))
    trainer = Trainer(build_config("byol-scenes", tiny_overrides + ["train.epochs=3"]))
    assert trainer.fit()["step"] == 12 and len(calls) == 1
