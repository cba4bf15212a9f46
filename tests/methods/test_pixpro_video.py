"""PixPro with optical-flow positives: masks, the method, and a short training run."""
import math

import pytest
import torch

from conftest import TINY
from densessl.config import ConfigError, build_config
from densessl.data.geometry import pixpro_positive_mask
from densessl.methods.pixpro import PixPro
from densessl.methods.pixpro_core import PixProConfig
from densessl.engine.trainer import Trainer
from densessl.methods.pixpro_video import (PixProVideo, PixProVideoConfig, VideoConfig, video_positive_masks)
from densessl.models.backbones import build_backbone
from fixed_batch import (assert_loss_falls, crop, fit_four_logged_steps, noisy_views, project_optimizer, smooth_images,
                         train_steps)

FULL = torch.tensor([[0.0, 0.0, 1.0, 1.0]])


def const_flow(B, dx, dy, h=32, w=32):
    return torch.tensor([float(dx), float(dy)]).view(1, 2, 1, 1).expand(B, 2, h, w).clone()


def frame_batch(B, box1, box2, fw=None, bw=None, size=(32, 32), flip=None):
    batch = {"box": [box1.expand(B, 4), box2.expand(B, 4)],
             "flip": flip or [torch.zeros(B, dtype=torch.bool), torch.zeros(B, dtype=torch.bool)],
             "source_size": torch.tensor([[float(size[0]), float(size[1])]]).expand(B, 2)}
    if fw is not None:
        batch["flow"], batch["flow_back"] = fw, bw
    return batch


# ----------------------------------------------------------------------------- config


def test_config_sections_and_errors():
    cfg = build_config("pixpro-video-scenes", ["method.video.nframes=2", "method.distance_units=pixels"])
    assert isinstance(cfg.method, PixProVideoConfig) and isinstance(cfg.method.video, VideoConfig)
    assert cfg.method.video.nframes == 2 and cfg.method.distance_units == "pixels"
    with pytest.raises(ConfigError, match="method.distance_units"):
        PixProVideoConfig(distance_units="metres")
    with pytest.raises(ConfigError, match="method.flow_mask_units"):
        PixProVideoConfig(flow_mask_units="cm")
    with pytest.raises(ConfigError, match="method.video.flow"):
        build_config("pixpro-video-scenes", ["method.video.flow=magic"])
    with pytest.raises(ConfigError, match="flow_weights"):
        build_config("pixpro-video-scenes", ["method.video.flow=raft_small"])
    with pytest.raises(ConfigError, match="unknown key 'method.video.nframe'"):
        build_config("pixpro-video-scenes", ["method.video.nframe=3"])
    with pytest.raises(ConfigError, match="nframes"):
        build_config("pixpro-video-scenes", ["method.video.nframes=0"])


# ----------------------------------------------------------------------------- masks


def test_zero_flow_gives_image_pixpro_positives():
    gen = torch.Generator().manual_seed(1)
    B = 8
    b1 = torch.cat([torch.rand(B, 2, generator=gen) * 0.4, 0.6 + torch.rand(B, 2, generator=gen) * 0.4], 1)
    b2 = torch.cat([torch.rand(B, 2, generator=gen) * 0.4, 0.6 + torch.rand(B, 2, generator=gen) * 0.4], 1)
    flips = [torch.rand(B, generator=gen) < 0.5, torch.rand(B, generator=gen) < 0.5]
    ref = pixpro_positive_mask(b1, flips[0], b2, flips[1], (4, 4), (4, 4))
    zero = torch.zeros(B, 2, 32, 32)
    for batch in (frame_batch(B, b1, b2, flip=flips), frame_batch(B, b1, b2, zero, zero, flip=flips)):
        for units in ("normalised", "pixels"):
            m12, m21, _ = video_positive_masks(batch, (4, 4), (4, 4), units=units)
            assert torch.equal(m12, ref) and torch.equal(m21, ref.transpose(1, 2))


def test_translation_gives_identity_both_ways_and_the_backward_term_uses_the_backward_flow():
    B, d = 2, 6
    box1 = torch.tensor([[0.1, 0.2, 0.6, 0.7]])
    box2 = box1 + torch.tensor([d / 32, 0.0, d / 32, 0.0])
    fw, bw = const_flow(B, d, 0), const_flow(B, -d, 0)
    eye = torch.eye(16, dtype=torch.bool).expand(B, -1, -1)
    m12, m21, stats = video_positive_masks(frame_batch(B, box1, box2, fw, bw), (4, 4), (4, 4))
    assert torch.equal(m12, eye) and torch.equal(m21, eye)
    assert float(stats["flow_valid_frac"]) == pytest.approx((32 - d) / 32)
    # a backward flow that does not undo the forward one: the check fails, no positives at all
    m12, m21, _ = video_positive_masks(frame_batch(B, box1, box2, fw, fw), (4, 4), (4, 4))
    assert not m12.any() and not m21.any()
    # ... unless the check is off: then each direction follows its own flow
    m12, m21, _ = video_positive_masks(frame_batch(B, box1, box2, fw, fw), (4, 4), (4, 4), use_mask=False)
    assert torch.equal(m12, eye) and not torch.equal(m21, eye)


def test_cells_whose_points_leave_the_frame_have_no_positives():
    B, d = 1, 12
    fw, bw = const_flow(B, d, 0), const_flow(B, -d, 0)
    m12, _, _ = video_positive_masks(frame_batch(B, FULL, FULL, fw, bw), (4, 4), (4, 4))
    # columns at x = 4, 12, 20, 28 px move to 16, 24, 32, 40: the last two leave the 32-px frame
    # (invalid); 16 and 24 lie 4 px (0.35 cell diagonals) from two view-2 columns each
    expected = torch.zeros(16, 16, dtype=torch.bool)
    for r in range(4):
        for c1, c2 in ((0, 1), (0, 2), (1, 2), (1, 3)):
            expected[4 * r + c1, 4 * r + c2] = True
    assert torch.equal(m12[0], expected)


# ----------------------------------------------------------------------------- the method


def small(**kw):
    torch.manual_seed(0)
    cfg = PixProVideoConfig(proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32, **kw)
    return PixProVideo(cfg, build_backbone("resnet18_small", 8))


def test_with_zero_flow_the_loss_is_image_pixpros():
    video = small()
    torch.manual_seed(0)
    image = PixPro(PixProConfig(proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32), build_backbone("resnet18_small", 8))
    image.load_state_dict(video.state_dict())
    views = [torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64)]
    box2 = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    zero = torch.zeros(4, 2, 16, 16)
    out_v = video(views, frame_batch(4, FULL, box2, zero, zero, size=(16, 16)))
    out_i = image(views, {"box": [FULL.expand(4, 4), box2.expand(4, 4)], "flip": [None, None]})
    assert torch.allclose(out_v["loss"], out_i["loss"], atol=1e-6)
    assert float(out_v["positives_per_image"]) == float(out_i["positives_per_image"]) == 40


def test_forward_backward_statistics_and_no_target_gradient():
    m = small()
    m.total_steps = 10
    views = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)]
    box2 = FULL + torch.tensor([[0.1, 0.0, 0.1, 0.0]])
    out = m(views, frame_batch(2, FULL, box2, const_flow(2, 3.2, 0), const_flow(2, -3.2, 0)))
    assert -4 <= float(out["loss"].detach()) <= 4
    assert {"pixpro", "positives_per_image", "positives_per_image_back", "flow_valid_frac", "flow_magnitude",
            "z_std"} <= set(out)
    assert all(v.ndim == 0 for k, v in out.items() if k != "features") and out["features"].shape == (2, 64)
    out["loss"].backward()
    assert m.backbone.conv1.weight.grad is not None and all(p.grad is None for p in m.target_backbone.parameters())
    # pixcontrast mode and the instance branch go through the same masks
    pc = small(mode="pixcontrast", ins_loss_weight=1.0)
    out = pc(views, frame_batch(2, FULL, box2, const_flow(2, 3.2, 0), const_flow(2, -3.2, 0)))
    assert "pixcontrast" in out and "instance" in out and math.isfinite(float(out["loss"].detach()))


# ----------------------------------------------------------------------------- training


def video_fixed_batch_losses(seed: int = 0, steps: int = 20) -> list[float]:
    """LARS steps on 8 fixed clips whose content moves 4 px right between the frames: both views
    show the same content (frame 1 at box1, frame 2 at box1 moved 4 px), with the constant flows."""
    m = small()
    B, S, d = 8, 32, 4
    box1 = torch.tensor([[0.0, 0.0, 0.75, 0.75]])
    box2 = box1 + torch.tensor([[d / S, 0.0, d / S, 0.0]])
    views = noisy_views(crop(smooth_images(B, seed=seed), box1, S), (S, S), seed=seed + 1)
    batch = frame_batch(B, box1, box2, const_flow(B, d, 0), const_flow(B, -d, 0))
    return train_steps(m, [(views, batch)], project_optimizer(m, "lars", lr=1.0), steps)


def test_loss_falls_on_a_fixed_batch():
    assert_loss_falls(video_fixed_batch_losses(), drop=0.4)  # falls by 0.86-1.10 (seeds 0-7; -1.7 -> -2.6..-2.8)


@pytest.mark.parametrize("extra", [["method.video.nframes=3"], ["method.video.nframes=1"]])
def test_trains_four_steps_through_the_trainer(extra, tmp_path):
    cfg = build_config("pixpro-video-scenes", TINY + ["train.epochs=1", "method.video.length=6",
                                                      f"run_dir={tmp_path / 'run'}"] + extra)
    trainer, recs = fit_four_logged_steps(cfg)
    assert trainer.method.momentum > cfg.method.momentum_base
    flows = [r["flow_magnitude"] for r in recs]
    assert (min(flows) > 0) == (cfg.method.video.nframes > 1)


def test_trainer_with_estimated_flow_and_cache(tmp_path):
    cache = tmp_path / "flows"
    cfg = build_config("pixpro-video-scenes", TINY + [
        "train.epochs=1", "train.steps_per_epoch=2", "method.video.nframes=2", "method.video.length=4",
        "method.video.flow=dis", f"method.video.flow_cache={cache}", f"run_dir={tmp_path / 'run'}"])
    assert Trainer(cfg).fit()["step"] == 2
    assert len(list(cache.rglob("*.npy"))) == 2 * 2 * 16  # 2 steps x 16 clips, forward and backward
    with pytest.raises(ValueError, match="video"):
        Trainer(build_config("pixpro-scenes", TINY + ["data.dataset=moving_scenes", f"run_dir={tmp_path / 'other'}"]))


# ----------------------------------------------------------------------------- real video: frame folders


def write_moving_frames(root, videos=4, frames=6, h=32, w=40):
    """Folders of PNG frames: a random texture that moves 1 px right per frame."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for v in range(videos):
        texture = rng.integers(0, 256, (h, w + frames, 3), dtype=np.uint8)
        (root / f"clip{v}").mkdir(parents=True)
        for k in range(frames):
            Image.fromarray(texture[:, frames - k:frames - k + w]).save(root / f"clip{v}" / f"{k:04d}.png")


def test_pretrain_on_frame_folders_through_the_cli(tmp_path):
    import json

    import numpy as np

    from densessl.cli import main
    from densessl.data.flow import FlowCache
    from densessl.data.frame_pairs import FramePairViews

    root, cache, run = tmp_path / "frames", tmp_path / "flows", tmp_path / "run"
    write_moving_frames(root)
    video = ["method.video.nframes=3", "method.video.flow=dis", f"method.video.flow_cache={cache}",
             "method.video.items_per_video=4"]  # 4 videos x 4 items: 16 items, 2 batches of 8 per epoch
    code = main(["pretrain", "pixpro-video-scenes", *TINY, "data.dataset=video_frames", f"data.root={root}",
                 "train.batch_size=8", *video, f"run_dir={run}"])
    assert code == 0 and (run / "checkpoints" / "last.pt").is_file()
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in steps)
    assert all(r["flow_magnitude"] > 0.5 for r in steps)  # the texture moves 2 px between frames t and t+2
    # the cache holds exactly the flows of the frame pairs drawn: both epochs use all 16 items
    cfg = build_config("pixpro-video-scenes", TINY + ["data.dataset=video_frames", f"data.root={root}", *video])
    views = FramePairViews(Trainer(cfg).dataset, cfg.views, cfg.train.seed, nframes=3, flow="none")
    files, want = FlowCache(cache), set()
    for epoch in range(2):
        for i in range(16):
            ids = views.frame_ids(np.random.default_rng([cfg.train.seed, epoch, i]), i)
            key = views.source.video_key(i)
            assert key == f"clip{i // 4}@32"  # frames' shorter side resized to data.size
            for a, b in zip(ids, ids[1:]):
                want |= {files.path("opencv-dis-medium", key, a, b), files.path("opencv-dis-medium", key, b, a)}
    assert set(cache.rglob("*.npy")) == want and len(want) > 8


def test_learned_flow_runs_on_the_training_device(tmp_path):
    from torchvision.models.optical_flow import raft_small

    weights = tmp_path / "raft_small.pth"
    torch.save(raft_small(weights=None).state_dict(), weights)
    root = tmp_path / "frames"
    write_moving_frames(root, videos=2)
    cfg = build_config("pixpro-video-scenes", TINY + [
        "data.dataset=video_frames", f"data.root={root}", "method.video.items_per_video=8", "data.num_workers=1",
        "train.device=cpu", "method.video.flow=raft_small", f"method.video.flow_weights={weights}",
        f"run_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg)
    loader = trainer.loader(0)
    assert loader.dataset.flow.device == trainer.dist.device == torch.device("cpu")
    assert loader.multiprocessing_context is None  # CPU flows: the default (fork) workers
    loader.dataset.use_device("cuda")  # nothing touches CUDA until a flow is computed
    assert loader.dataset.flow.device == torch.device("cuda") and loader.dataset.worker_start_method == "spawn"


def test_pretrain_on_shards_of_frames_logs_the_frame_folders_losses(tmp_path, capsys):
    """data.dataset=shards of video frames (`densessl data shard --kind video_frames`): the clips are
    read from the shards by the video table; written in the source's order, a run logs the
    losses of the frame folders themselves."""
    import json

    pytest.importorskip("litdata")
    from densessl.cli import main
    from densessl.data.shards import ShardVideoFrames
    from densessl.data.video import VideoFrames

    root = tmp_path / "frames"
    write_moving_frames(root)
    assert main(["data", "shard", str(root), str(tmp_path / "sh"), "--kind", "video_frames", "--shard-size", "5",
                 "--order", "source"]) == 0
    shards, folders = ShardVideoFrames(tmp_path / "sh", size=32), VideoFrames(root, size=32)
    assert len(shards) == len(folders) == 4 and shards.counts == folders.counts
    assert shards.video_key(2) == folders.video_key(2) == "clip2@32"
    assert torch.equal(shards.read_clip(3, [0, 4, 2])["frames"], folders.read_clip(3, [0, 4, 2])["frames"])
    # the default order shuffles whole videos: each is still itself, frame for frame
    assert main(["data", "shard", str(root), str(tmp_path / "shuf"), "--kind", "video_frames", "--shard-size", "5"]) == 0
    shuffled = ShardVideoFrames(tmp_path / "shuf", size=32)
    names = [shuffled.video_name(i) for i in range(4)]
    assert sorted(names) == [folders.video_name(i) for i in range(4)] and names != sorted(names)
    for i, name in enumerate(names):
        j = [folders.video_name(k) for k in range(4)].index(name)
        assert torch.equal(shuffled.read_clip(i, [1, 3])["frames"], folders.read_clip(j, [1, 3])["frames"])
    with pytest.warns(UserWarning, match="fewer than 99 frames"):
        with pytest.raises(ConfigError, match="min_frames=99"):
            ShardVideoFrames(tmp_path / "shuf", min_frames=99)
    video = ["method.video.nframes=3", "method.video.items_per_video=4", "train.batch_size=8", "method.video.flow=dis"]
    losses = {}
    for name, data in (("folders", ["data.dataset=video_frames", f"data.root={root}"]),
                       ("shards", ["data.dataset=shards", f"data.root={tmp_path / 'sh'}"])):
        assert main(["pretrain", "pixpro-video-scenes", *TINY, *data, *video, f"run_dir={tmp_path / name}"]) == 0
        recs = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in recs if "loss" in r]
    assert len(losses["folders"]) == 4 and losses["shards"] == losses["folders"]
    # shards of images are not clips: one line naming the folder and the command that writes video shards
    assert main(["data", "shard", str(root / "clip0"), str(tmp_path / "img")]) == 0
    assert main(["pretrain", "pixpro-video-scenes", *TINY, "data.dataset=shards", f"data.root={tmp_path / 'img'}",
                 *video, f"run_dir={tmp_path / 'bad'}"]) == 2
    assert "holds imagefolder samples" in capsys.readouterr().err
    # frames without ground-truth flow and the default flow=gt: one line naming the key and the estimators
    assert main(["pretrain", "pixpro-video-scenes", *TINY, "data.dataset=video_frames", f"data.root={root}",
                 *video[:3], f"run_dir={tmp_path / 'gt'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("densessl: error: method.video.flow=gt needs") and err.count("\n") == 1, err
