"""Video sources (folders of frames, video files, moving Fashion-Scenes) and frame-pair views."""
import numpy as np
import pytest
import torch
from PIL import Image

from densessl.config import ViewConfig
from densessl.data import flow as fl
from densessl.data.moving_scenes import MovingSceneFrames, MovingScenes, moving_scenes_segmentation
from densessl.data.frame_pairs import FramePairViews, collate_frame_pairs
from densessl.data.precompute_flows import precompute_flows
from densessl.data.video import VideoFrames, VideoReadError

GROUPS = [ViewConfig(size=32, scale=(0.3, 1.0)), ViewConfig(size=32, scale=(0.3, 1.0))]


def write_frames(folder, n, h=12, w=16, names=None):
    folder.mkdir(parents=True)
    names = names or [f"frame{k}.png" for k in range(n)]
    for k, name in enumerate(names):
        Image.fromarray(np.full((h, w, 3), 10 * k, np.uint8)).save(folder / name)


# ----------------------------------------------------------------------------- folders and files


def test_frame_folders_natural_order_resize_and_items_per_video(tmp_path):
    write_frames(tmp_path / "b", 12)  # frame0 .. frame11: frame10 sorts after frame9
    write_frames(tmp_path / "a", 3, h=20, w=10)
    (tmp_path / "notes.txt").write_text("ignored")
    ds = VideoFrames(tmp_path)
    assert [v[0] for v in ds.videos] == ["a", "b"] and len(ds) == 2
    assert ds.num_frames(1) == 12 and ds.video_key(1) == "b"
    clip = ds.read_clip(1, [9, 10, 11])["frames"]
    assert clip.shape == (3, 3, 12, 16) and clip.dtype == torch.uint8
    assert [int(f[0, 0, 0]) for f in clip] == [90, 100, 110]
    small = VideoFrames(tmp_path, size=6, items_per_video=3)
    assert len(small) == 6 and small.num_frames(5) == 12 and small.video_key(0) == "a@6"
    assert small.read_clip(0, [0])["frames"].shape == (1, 3, 12, 6)
    with pytest.raises(IndexError, match="out of range for video 'a'"):
        ds.read_clip(0, [3])


def test_clear_errors_for_missing_empty_and_unreadable_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        VideoFrames(tmp_path / "nowhere")
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(FileNotFoundError, match="no videos under .*empty_root"):
        VideoFrames(tmp_path / "empty_root")
    root = tmp_path / "root"
    write_frames(root / "good", 3)
    (root / "hollow").mkdir()
    (root / "hollow" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="hollow.* holds no frames"):
        VideoFrames(root)
    (root / "hollow" / "frame0.jpg").write_bytes(b"not a jpeg")
    ds = VideoFrames(root)
    with pytest.raises(VideoReadError, match="frame0.jpg"):
        ds.read_clip(1, [0])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "clip.mp4").write_bytes(b"garbage")
    with pytest.raises(VideoReadError, match="clip.mp4"):
        VideoFrames(tmp_path / "bad")
    write_frames(tmp_path / "more" / "x", 2)
    write_frames(tmp_path / "more" / "y", 4)
    with pytest.warns(UserWarning, match="1 videos .* fewer than 3 frames"):
        short = VideoFrames(tmp_path / "more", min_frames=3)
    assert [v[0] for v in short.videos] == ["y"] and short.skipped[0].endswith("x")


def test_video_files_through_opencv(tmp_path):
    cv2 = pytest.importorskip("cv2")
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 24))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write MJPG")
    for k in range(6):
        writer.write(np.full((24, 32, 3), (40 * k, 0, 0), np.uint8))  # BGR: blue channel ramps
    writer.release()
    ds = VideoFrames(tmp_path)
    assert ds.num_frames(0) == 6 and ds.video_key(0) == "clip.avi"
    clip = ds.read_clip(0, [1, 4])["frames"]
    assert clip.shape == (2, 3, 24, 32)
    blue = clip[:, 2].float().mean((1, 2))  # RGB order: channel 2 is blue
    assert abs(float(blue[0]) - 40) < 6 and abs(float(blue[1]) - 160) < 6 and float(clip[:, 0].float().mean()) < 6


def write_ffv1(path, frames):
    """A lossless FFV1 .avi of `frames` (RGB uint8 (T, H, W, 3)); skips where OpenCV cannot write it."""
    cv2 = pytest.importorskip("cv2")
    T, H, W, _ = frames.shape
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), 10, (W, H))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write FFV1")
    for f in frames:
        writer.write(np.ascontiguousarray(f[:, :, ::-1]))  # OpenCV writes BGR
    writer.release()
    return cv2


def test_video_file_frames_read_by_index_equal_the_frames_written(tmp_path, monkeypatch):
    # FFV1 is lossless: what is read back must be bit-identical to what was written, so a frame
    # off by one index (or a colour-order slip) fails. Random noise frames: no two alike.
    frames = np.random.default_rng(0).integers(0, 256, (40, 24, 32, 3), dtype=np.uint8)
    cv2 = write_ffv1(tmp_path / "noise.avi", frames)
    ds = VideoFrames(tmp_path)
    assert ds.num_frames(0) == 40
    decoded = []
    capture = cv2.VideoCapture

    class CountingCapture:  # counts frames decoded (grab) and converted (read); wraps, as cv2's class
        def __init__(self, path):  # does not take Python subclasses well
            self.cap = capture(path)

        def __getattr__(self, name):
            return getattr(self.cap, name)

        def grab(self):
            decoded.append("grab")
            return self.cap.grab()

        def read(self):
            decoded.append("read")
            return self.cap.read()

    monkeypatch.setattr(cv2, "VideoCapture", CountingCapture)
    ids = [38, 12, 15, 27, 15]  # any order, a repeat, far apart (seeks) and close (grabs)
    clip = ds.read_clip(0, ids)["frames"]
    assert torch.equal(clip, torch.from_numpy(frames[ids]).permute(0, 3, 1, 2))
    # one conversion per distinct frame; seeks to 12, 27 and 38 (more than SEEK_GAP = 8 ahead);
    # 12 -> 15 grabs 13 and 14; nothing before 12, between 15 and 27 or 27 and 38, or past 38
    assert decoded == ["read", "grab", "grab", "read", "read", "read"]


def test_frame_pairs_read_only_the_frames_they_need(tmp_path):
    root = tmp_path / "videos"
    write_frames(root / "v", 10, h=16, w=24)

    class CountingSource:  # records the frame ids of every read
        def __init__(self, source):
            self.source, self.reads = source, []
            self.has_gt_flow = getattr(source, "has_gt_flow", False)

        def __len__(self):
            return len(self.source)

        def num_frames(self, i):
            return self.source.num_frames(i)

        def video_key(self, i):
            return self.source.video_key(i)

        def read_clip(self, i, ids):
            self.reads.append(list(ids))
            return self.source.read_clip(i, ids)

    src = CountingSource(VideoFrames(root))
    cache = fl.FlowCache(tmp_path / "cache")
    ds = FramePairViews(src, GROUPS, seed=0, nframes=4, stride=2, flow=ShiftFlow(), cache=cache)
    t = ds.frame_ids(np.random.default_rng([0, 0, 0]), 0)[0]
    ShiftFlow.calls = 0
    first = ds[(0, 0)]  # nothing cached: the views' frames, then the two frames between for the flows
    assert src.reads == [[t, t + 6], [t + 2, t + 4]] and ShiftFlow.calls == 6
    src.reads.clear()
    again = ds[(0, 0)]  # all six flows cached: only the views' two frames
    assert src.reads == [[t, t + 6]] and ShiftFlow.calls == 6
    assert all(torch.equal(a, b) for a, b in zip(first["views"], again["views"]))
    assert torch.equal(first["flow"], again["flow"]) and torch.equal(first["flow_back"], again["flow_back"])
    src.reads.clear()
    cache.path("shift", "v", t + 4, t + 2).unlink()  # one backward flow missing: its two frames are read
    ds[(0, 0)]
    assert src.reads == [[t, t + 6], [t + 2, t + 4]] and ShiftFlow.calls == 7
    src.reads.clear()
    cache.path("shift", "v", t + 2, t).unlink()  # a pair with a view frame: only the other one is read
    ds[(0, 0)]
    assert src.reads == [[t, t + 6], [t + 2]] and ShiftFlow.calls == 8
    for nframes in (4, 1):  # no flow: the first and last frames (one frame for nframes=1)
        src.reads.clear()
        plain = FramePairViews(src, GROUPS, seed=0, nframes=nframes, stride=2, flow="none")
        plain[(0, 0)]
        ids = plain.frame_ids(np.random.default_rng([0, 0, 0]), 0)
        assert src.reads == [sorted({ids[0], ids[-1]})] and len(src.reads[0]) == min(nframes, 2)
    # exact flows come from every frame of the chain
    ms = CountingSource(MovingScenes(num_videos=2, size=32, num_frames=10))
    gt = FramePairViews(ms, GROUPS, seed=0, nframes=4, stride=2, flow="gt")
    gt[(0, 1)]
    assert ms.reads == [gt.frame_ids(np.random.default_rng([0, 0, 1]), 1)]


# ----------------------------------------------------------------------------- moving scenes


def test_moving_scenes_are_deterministic_and_consistent_across_frame_lists():
    a = MovingScenes(num_videos=4, size=32, num_frames=6, seed=5)
    b = MovingScenes(num_videos=4, size=32, num_frames=6, seed=5)
    full, again = a[1], b[1]
    assert all(torch.equal(full[k], again[k]) for k in full)
    assert not torch.equal(a[0]["frames"], full["frames"])
    assert not torch.equal(MovingScenes(num_videos=4, size=32, num_frames=6, seed=6)[1]["frames"], full["frames"])
    part = a.read_clip(1, [1, 4])
    assert torch.equal(part["frames"], full["frames"][[1, 4]]) and torch.equal(part["semantic"], full["semantic"][[1, 4]])
    assert full["frames"].shape == (6, 3, 32, 32) and full["flow_fw"].shape == (5, 2, 32, 32)
    assert full["semantic"].max() <= 10 and set(full["semantic"].unique().tolist()) <= {0} | set((full["classes"] + 1).tolist())
    assert torch.equal(full["labels"].nonzero()[:, 0].unique(), full["classes"].unique())
    assert a.read_clip(0, [2])["flow_fw"].shape == (0, 2, 32, 32)


def test_moving_scenes_flow_is_exact():
    ms = MovingScenes(num_videos=6, size=48, num_frames=8, min_speed=1.0, max_speed=2.0, pan_speed=1.0, pan_p=1.0,
                      seed=1)
    bg_close = bg_total = close = shifted_close = total = 0
    for i in range(6):
        c = ms.read_clip(i, [0, 3, 4])
        for k in range(2):
            f, b, vis = c["flow_fw"][k], c["flow_bw"][k], c["visible_fw"][k]
            assert torch.equal(f, f.round())  # whole pixels
            ys, xs = torch.nonzero(vis, as_tuple=True)
            xb, yb = xs + f[0, ys, xs].long(), ys + f[1, ys, xs].long()
            # the point is there in the next frame, with the same label, and the backward flow returns it
            assert torch.equal(c["semantic"][k + 1][yb, xb], c["semantic"][k][ys, xs])
            assert torch.equal(b[:, yb, xb], -f[:, ys, xs])
            a, nxt = c["frames"][k].int(), c["frames"][k + 1].int()
            diff = (nxt[:, yb, xb] - a[:, ys, xs]).abs().amax(0)
            off = (nxt[:, yb, (xb + 1).clamp(max=47)] - a[:, ys, xs]).abs().amax(0)  # one pixel off
            bg = c["semantic"][k][ys, xs] == 0
            bg_close += int((diff[bg] <= 2).sum())
            bg_total += int(bg.sum())
            close += int((diff <= 2).sum())
            shifted_close += int((off <= 2).sum())
            total += diff.numel()
            # background pixels all move with the pan
            if bg.any():
                assert (f[:, ys[bg], xs[bg]] == f[:, ys[bg][:1], xs[bg][:1]]).all()
    # colours move with the flow: the background (but the soft halo of items) exactly, items except
    # where they are semi-transparent (intensity < 1/1.6) over a background that changes under them
    assert bg_close / bg_total > 0.9 and close / total > 0.8
    assert shifted_close / total < 0.5 * close / total


def test_moving_scenes_chained_flow_equals_the_direct_flow_where_visible():
    ms = MovingScenes(num_videos=4, size=40, num_frames=5, min_speed=1.0, max_speed=2.0, seed=2)
    for i in range(4):
        c = ms.read_clip(i, [0, 2, 4])
        direct = ms.read_clip(i, [0, 4])
        chained = fl.chain_flows(list(c["flow_fw"]))
        # visible through both steps
        vis1 = c["visible_fw"][0]
        f1 = c["flow_fw"][0]
        ys, xs = torch.nonzero(vis1, as_tuple=True)
        ok = c["visible_fw"][1][ys + f1[1, ys, xs].long(), xs + f1[0, ys, xs].long()]
        ys, xs = ys[ok], xs[ok]
        # whole-pixel flows sampled at whole pixels: the chain is exact, not approximately equal
        assert len(ys) > 500 and torch.equal(chained[:, ys, xs], direct["flow_fw"][0][:, ys, xs])


def test_moving_scene_frames_for_segmentation():
    frames = MovingSceneFrames(MovingScenes(split="val", num_videos=3, size=32, num_frames=8), frames_per_video=2)
    assert len(frames) == 6
    s = frames[3]
    assert s["image"].shape == (3, 32, 32) and s["semantic"].shape == (32, 32)
    assert torch.equal(s["image"], frames.videos.read_clip(1, [4])["frames"][0])


# ----------------------------------------------------------------------------- frame-pair views


def test_frame_pairs_from_exact_flow_and_collate():
    ms = MovingScenes(num_videos=8, size=32, num_frames=10)
    ds = FramePairViews(ms, GROUPS, seed=3, nframes=4, stride=2)
    s = ds[(0, 5)]
    again = ds[(0, 5)]
    assert all(torch.equal(x, y) for x, y in zip(s["views"], again["views"])) and torch.equal(s["flow"], again["flow"])
    assert not torch.equal(ds[(1, 5)]["views"][0], s["views"][0])  # another epoch, another clip and crops
    rng = np.random.default_rng([3, 0, 5])
    ids = ds.frame_ids(rng, 5)
    assert ids[-1] - ids[0] == 6 and ids[-1] < 10
    clip = ms.read_clip(5, ids)
    assert torch.allclose(s["flow"], fl.chain_flows(list(clip["flow_fw"])))
    assert torch.allclose(s["flow_back"], fl.chain_flows(list(clip["flow_bw"])[::-1]))
    assert s["views"][0].shape == (3, 32, 32) and len(s["geometry"]) == 2
    assert torch.equal(s["source_size"], torch.tensor([32.0, 32.0])) and "labels" in s
    batch = collate_frame_pairs([ds[(0, i)] for i in range(4)])
    assert batch["flow"].shape == (4, 2, 32, 32) and batch["flow_back"].shape == (4, 2, 32, 32)
    assert batch["box"][1].shape == (4, 4) and batch["source_size"].shape == (4, 2) and batch["labels"].shape == (4, 10)
    # flows at reduced size
    small = FramePairViews(ms, GROUPS, seed=3, nframes=4, stride=2, flow_size=16)[(0, 5)]
    assert small["flow"].shape == (2, 16, 16) and torch.allclose(small["flow"], fl.resize_flow(s["flow"], (16, 16)))


def test_single_frame_and_no_flow_variants():
    ms = MovingScenes(num_videos=4, size=32, num_frames=6)
    single = FramePairViews(ms, GROUPS, seed=0, nframes=1)
    one = single[(0, 2)]
    assert one["flow"].shape == (2, 1, 1) and not one["flow"].any()
    assert len(single.frame_ids(np.random.default_rng(0), 2)) == 1  # both views crop the same frame
    none = FramePairViews(ms, GROUPS, seed=0, nframes=3, flow="none")[(0, 2)]
    assert not none["flow"].any() and not none["flow_back"].any()


def test_frame_pair_errors(tmp_path):
    write_frames(tmp_path / "v", 3)
    write_frames(tmp_path / "w", 8)
    vf = VideoFrames(tmp_path)
    with pytest.raises(ValueError, match="ground-truth flow"):
        FramePairViews(vf, GROUPS, seed=0, nframes=2, flow="gt")
    with pytest.raises(ValueError, match="1 videos have fewer than nframes=3 frames at stride=2 .* 'v'"):
        FramePairViews(vf, GROUPS, seed=0, nframes=3, stride=2, flow="none")
    with pytest.raises(ValueError, match="exactly 2 plain view slots"):
        FramePairViews(vf, [ViewConfig(size=16, count=3)], seed=0, flow="none")
    with pytest.raises(ValueError, match="flow must be"):
        FramePairViews(vf, GROUPS, seed=0, flow="magic")


class ShiftFlow(fl.FlowModel):
    name = "shift"
    calls = 0

    def __call__(self, a, b):
        ShiftFlow.calls += 1
        return torch.ones(2, *a.shape[-2:])


def test_estimated_flow_is_cached_and_precomputed(tmp_path):
    root = tmp_path / "videos"
    write_frames(root / "v", 5, h=16, w=24)
    vf = VideoFrames(root)
    cache = fl.FlowCache(tmp_path / "cache")
    ShiftFlow.calls = 0
    n = precompute_flows(vf, ShiftFlow(), cache, stride=2, flow_size=12, log=None)
    assert n == 2 * 3 and ShiftFlow.calls == 6  # pairs (0,2) (2,4) (1,3), both directions
    ds = FramePairViews(vf, GROUPS, seed=0, nframes=3, stride=2, flow=ShiftFlow(), cache=cache, flow_size=12)
    s = ds[(0, 0)]
    assert ShiftFlow.calls == 6  # everything came from the cache
    assert s["flow"].shape == (2, 8, 12) and torch.allclose(s["flow"], torch.full((2, 8, 12), 1.0))  # 2 x 0.5
    assert torch.allclose(s["flow_back"], torch.full((2, 8, 12), 1.0))
    reads = []
    original = vf.read_clip
    vf.read_clip = lambda i, ids: reads.append(list(ids)) or original(i, ids)
    assert precompute_flows(vf, ShiftFlow(), cache, stride=2, flow_size=12, log=None) == 6  # found, not computed
    assert ShiftFlow.calls == 6 and reads == [[0]]  # a rerun decodes one frame (the size), not the video
    cache.path("shift@8x12", vf.video_key(0), 1, 3).unlink()
    reads.clear()
    precompute_flows(vf, ShiftFlow(), cache, stride=2, flow_size=12, log=None)
    assert ShiftFlow.calls == 7 and reads == [[0], [1, 3]]  # only the frames of the missing pair


def test_segmentation_items_from_moving_scenes():

    items, classes = moving_scenes_segmentation("val", 5, size=32, frames_per_video=2, num_frames=4)
    assert len(items) == 5 and classes[0] == "background" and len(classes) == 11
    assert items[0]["image"].shape == (3, 32, 32) and items[0]["mask"].dtype == torch.int64
    assert int(max(int(it["mask"].max()) for it in items)) <= 10


def test_densessl_data_flows_fills_the_cache_training_reads(tmp_path, capsys):
    from densessl.cli import main

    root = tmp_path / "videos"
    write_frames(root / "a", 3, h=16, w=24)
    write_frames(root / "b", 4, h=16, w=24)
    assert main(["data", "flows", str(root), "--cache", str(tmp_path / "cache"), "--flow", "farneback"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"{2 * (2 + 3)} flows in {tmp_path / 'cache'}")  # pairs x 2 ways
    assert len([p for p in (tmp_path / "cache").rglob("*") if p.is_file()]) == 2 * (2 + 3)  # one file per flow
    assert main(["data", "flows", str(root), "--cache", str(tmp_path / "c2"), "--shard", "2/2"]) == 2
    assert "--shard '2/2': expected 0 <= k < n" in capsys.readouterr().err
