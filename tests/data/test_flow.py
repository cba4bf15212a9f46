"""Optical flow: chaining, forward-backward check, estimation against exact flow, cache."""
import numpy as np
import pytest
import torch

from densessl.data import flow as fl
from densessl.data.moving_scenes import MovingScenes


def const(dx, dy, h=12, w=16):
    return torch.tensor([float(dx), float(dy)]).view(2, 1, 1).expand(2, h, w).clone()


def test_sample_pixels_is_exact_at_whole_pixels_and_matches_grid_sample_between_them():
    torch.manual_seed(0)
    field = torch.randn(2, 3, 7, 40)  # W = 40: 1/W is not a float32 number
    ys, xs = torch.meshgrid(torch.arange(7.0), torch.arange(40.0), indexing="ij")
    whole = torch.stack([xs.flip(1), ys.flip(0)])[None].repeat(2, 1, 1, 1)
    assert torch.equal(fl.sample_pixels(field, whole), field.flip(2, 3))
    assert torch.equal(fl.sample_pixels(field, whole, "nearest"), field.flip(2, 3))
    pos = torch.rand(2, 2, 5, 6) * torch.tensor([46.0, 11.0]).view(1, 2, 1, 1) - 3.0  # some outside: border
    grid = torch.stack([(2 * pos[:, 0] + 1) / 40 - 1, (2 * pos[:, 1] + 1) / 7 - 1], -1)
    ref = torch.nn.functional.grid_sample(field, grid, padding_mode="border", align_corners=False)
    assert torch.allclose(fl.sample_pixels(field, pos), ref, atol=1e-5)
    # a hand value: a quarter of the way from pixel (x=2, y=1) to (x=3, y=1)
    assert torch.allclose(fl.sample_pixels(field[:1], torch.tensor([2.25, 1.0]).view(1, 2, 1, 1))[0, :, 0, 0],
                          0.75 * field[0, :, 1, 2] + 0.25 * field[0, :, 1, 3])


def test_chain_of_two_constant_translations_is_their_sum():
    out = fl.chain_flows([const(1.5, -2.0), const(-0.25, 3.0)])
    assert torch.allclose(out, const(1.25, 1.0))
    batched = fl.chain_flows([const(1, 0)[None].repeat(3, 1, 1, 1), const(0, 2)[None].repeat(3, 1, 1, 1)])
    assert batched.shape == (3, 2, 12, 16) and torch.allclose(batched, const(1, 2)[None])
    assert torch.equal(fl.chain_flows([const(1, 2)]), const(1, 2))


def test_chain_samples_the_next_flow_at_the_advected_position():
    h, w = 10, 20
    ramp = torch.zeros(2, h, w)
    ramp[0] = 0.1 * torch.arange(w).float()  # second flow: dx = 0.1 x
    out = fl.chain_flows([const(2, 1, h, w), ramp])
    xs = torch.arange(w).float()
    expected_dx = 2 + 0.1 * (xs + 2)  # bilinear is exact on a linear field (inside the frame)
    assert torch.allclose(out[0, 2:8, : w - 3], expected_dx[: w - 3].expand(6, -1), atol=1e-5)
    assert torch.allclose(out[1], torch.ones(h, w))
    with pytest.raises(ValueError, match="share a shape"):
        fl.chain_flows([const(1, 1), const(1, 1, 5, 5)])


def test_forward_backward_mask_drops_pixels_that_leave_the_frame():
    h, w, d = 12, 16, 3
    mask = fl.fb_consistency_mask(const(d, 0, h, w), const(-d, 0, h, w))
    expected = torch.zeros(h, w, dtype=torch.bool)
    expected[:, : w - d] = True  # x + 3 <= 15
    assert torch.equal(mask, expected)
    up = fl.fb_consistency_mask(const(0, -2, h, w), const(0, 2, h, w))
    assert not up[:2].any() and up[2:].all()
    # inconsistent backward flow: invalid everywhere
    assert not fl.fb_consistency_mask(const(d, 0, h, w), const(d, 0, h, w)).any()
    # the relative term tolerates an error that grows with the motion: |e|^2 <= 0.01 (|f|^2 + |b|^2) + 0.5
    big = fl.fb_consistency_mask(const(10, 0, 40, 40), const(-11, 0, 40, 40))  # 1 <= 0.01 * 221 + 0.5
    small = fl.fb_consistency_mask(const(1, 0, 40, 40), const(-2, 0, 40, 40))  # 1 > 0.01 * 5 + 0.5
    assert big[:, :29].all() and not small.any()


def test_pixel_units_are_frame_pixels_whatever_the_flow_resolution():
    """A 1/8 flow of a 64 x 64 frame whose forward and backward parts disagree by 0.5 grid px:
    in grid pixels 0.25 <= 0.01 * (4 + 2.25) + 0.5 would pass; in frame pixels (x 8) the check
    is 16 > 0.01 * (256 + 144) + 0.5 = 4.5, and fails, as it does on the upsampled flows."""
    f, b = const(2, 0, 8, 8), const(-1.5, 0, 8, 8)  # 1/8 of a 64 x 64 frame
    frame = torch.tensor([[64.0, 64.0]])
    assert fl.fb_consistency_mask(f, b)[:, :6].all()  # no frame size: the grid is the frame
    assert not fl.fb_consistency_mask(f[None], b[None], frame_size=frame).any()
    # the same decision as the check on the flows upsampled to the frame (values x 8)
    up_f, up_b = fl.resize_flow(f, (64, 64)), fl.resize_flow(b, (64, 64))
    assert not fl.fb_consistency_mask(up_f, up_b).any()
    # and an error small in frame pixels passes at any resolution: 0.05 grid px = 0.4 frame px
    f2, b2 = const(2, 0, 8, 8), const(-1.95, 0, 8, 8)
    assert fl.fb_consistency_mask(f2[None], b2[None], frame_size=frame)[0, :, :6].all()
    assert fl.fb_consistency_mask(fl.resize_flow(f2, (64, 64)), fl.resize_flow(b2, (64, 64)))[:, :48].all()


def test_fork_units_are_more_lenient_on_large_frames():
    h, w = 72, 128
    f, b = const(4, 0, h, w), const(-6, 0, h, w)  # a 2 px disagreement
    assert not fl.fb_consistency_mask(f, b, units="pixels").any()
    fork = fl.fb_consistency_mask(f, b, units="fork")
    assert fork[:, : w - 4].all() and not fork[:, w - 3:].any()
    # the constant uses the frame's size when the flow is at reduced resolution: the same flows
    # as 1/10 of a 1280x720 frame disagree by 20 frame pixels, beyond alpha2 / sqrt(1280^2 + 720^2)
    size = torch.tensor([[1280.0, 720.0]])
    assert not fl.fb_consistency_mask(f[None], b[None], units="fork", frame_size=size).any()
    with pytest.raises(ValueError, match="units"):
        fl.fb_consistency_mask(f, b, units="metres")


def test_resize_warp_and_flow_size():
    f = const(4, 2, 16, 32)
    small = fl.resize_flow(f, (8, 8))
    assert small.shape == (2, 8, 8) and torch.allclose(small, const(1, 1, 8, 8))
    assert fl.flow_size_for(720, 1280, 160) == (90, 160) and fl.flow_size_for(64, 64, None) == (64, 64)
    img = torch.arange(16.0 * 32).view(1, 1, 16, 32)
    assert torch.allclose(fl.warp_back(img, torch.zeros(1, 2, 16, 32)), img)
    moved = fl.warp_back(img, const(1, 0, 16, 32)[None])
    assert torch.allclose(moved[..., :-1], img[..., 1:])


def test_opencv_flow_recovers_a_translation():
    rng = np.random.default_rng(0)
    base = (rng.random((40, 40)) * 255).astype(np.uint8)
    base = np.kron(base, np.ones((2, 2), np.uint8))  # 80x80 texture of 2x2 blocks
    a = torch.from_numpy(np.stack([base] * 3))
    b = torch.roll(a, shifts=(1, 2), dims=(1, 2))  # content moves by dx=2, dy=1
    for method in ("dis", "farneback"):
        f = fl.OpenCVFlow(method)(a, b)
        assert f.shape == (2, 80, 80)
        inner = f[:, 10:-10, 10:-10]
        assert fl.end_point_error(inner, const(2, 1, 60, 60)) < 0.3, method


def test_estimated_flow_is_close_to_the_exact_flow_on_moving_scenes():
    """OpenCV DIS on 96-px moving scenes, items moving 1-2 px per frame, background panning
    <= 0.5 px. Measured mean EPE on visible item pixels of 12 val videos: 0.475 px here
    (seed 0; 0.45-0.62 px for seeds 0-3; Farneback 0.38-0.60), against 1.47 px for a zero
    flow (1.31-1.53). Bounds with margin: < 0.8 px and < half the zero-flow error."""
    ms = MovingScenes(split="val", num_videos=16, size=96, num_frames=2, min_speed=1.0, max_speed=2.0, seed=0)
    model = fl.build_flow_model("dis")
    err, zero = [], []
    for i in range(12):
        c = ms.read_clip(i, [0, 1])
        est = model(c["frames"][0], c["frames"][1])
        gt = c["flow_fw"][0]
        sel = (c["semantic"][0] > 0) & c["visible_fw"][0]
        err.append(fl.end_point_error(est, gt, sel))
        zero.append(fl.end_point_error(torch.zeros_like(gt), gt, sel))
    assert np.nanmean(err) < 0.8 and np.nanmean(err) < 0.5 * np.nanmean(zero), (np.nanmean(err), np.nanmean(zero))


def test_forward_backward_check_on_exact_flows_finds_occlusions_and_exits():
    ms = MovingScenes(num_videos=8, size=64, num_frames=4, min_speed=1.0, max_speed=2.0, pan_speed=0.5, seed=3)
    agree, n = 0, 0
    for i in range(8):
        c = ms.read_clip(i, [0, 3])
        f, b = c["flow_fw"][0], c["flow_bw"][0]
        mask = fl.fb_consistency_mask(f, b)
        assert not (mask & ~fl.inside_frame(f)).any()
        agree += int((mask == c["visible_fw"][0]).sum())
        n += mask.numel()
    assert agree / n > 0.97


class CountingFlow(fl.FlowModel):
    """A FlowModel (the interface a learned model implements): constant flow, counts calls."""
    name = "counting"

    def __init__(self):
        self.calls = 0

    def __call__(self, a, b):
        self.calls += 1
        return const(1.0, -1.0, *a.shape[-2:])


def test_pairwise_flows_are_computed_once_and_cached(tmp_path):
    frames = torch.randint(0, 255, (3, 3, 16, 24), dtype=torch.uint8)
    cache = fl.FlowCache(tmp_path / "flows")
    model = CountingFlow()
    fw, bw = fl.pairwise_flows(frames, [4, 5, 6], "video one", model, cache)
    assert model.calls == 4 and len(fw) == len(bw) == 2 and fw[0].shape == (2, 16, 24)
    fw2, bw2 = fl.pairwise_flows(frames, [4, 5, 6], "video one", model, cache)
    assert model.calls == 4 and all(torch.equal(x, y) for x, y in zip(fw + bw, fw2 + bw2))
    files = sorted(p.name for p in (tmp_path / "flows").rglob("*"))
    assert "4__5.npy" in files and "6__5.npy" in files and not any(f.endswith(".tmp") for f in files)
    # a reduced-resolution request is a different cache entry, resized before caching
    small, _ = fl.pairwise_flows(frames, [4, 5, 6], "video one", model, cache, size=(8, 12))
    assert model.calls == 8 and torch.allclose(small[0], const(0.5, -0.5, 8, 12))
    # a corrupt file is recomputed
    p = cache.path("counting", "video one", 4, 5)
    p.write_bytes(b"not a numpy file")
    fl.pairwise_flows(frames, [4, 5, 6], "video one", model, cache)
    assert model.calls == 9 and cache.get("counting", "video one", 4, 5) is not None
    half = fl.FlowCache(tmp_path / "f16", dtype="float16")
    half.put("m", "v", 0, 1, const(0.5, 2.0))
    assert np.load(half.path("m", "v", 0, 1)).dtype == np.float16
    assert torch.equal(half.get("m", "v", 0, 1), const(0.5, 2.0))
    assert half.get("m", "v", 0, 1, shape=(3, 3)) is None


def test_model_factory_and_learned_model_adapter(tmp_path):
    with pytest.raises(ValueError, match="weights"):
        fl.build_flow_model("raft_small")
    with pytest.raises(ValueError, match="unknown flow model"):
        fl.build_flow_model("magic")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        fl.load_state_dict_file(tmp_path / "missing.pth")
    assert fl.build_flow_model("dis").name != fl.build_flow_model("farneback").name

    class Shift(torch.nn.Module):  # a "learned" model: its output is a list of refinements
        def forward(self, a, b):
            n, _, h, w = a.shape
            return [torch.zeros(n, 2, h, w), torch.ones(n, 2, h, w)]

    model = fl.TorchFlow(Shift(), name="shift")
    out = model(torch.zeros(3, 13, 21, dtype=torch.uint8), torch.zeros(3, 13, 21, dtype=torch.uint8))
    assert out.shape == (2, 13, 21) and torch.equal(out, torch.ones(2, 13, 21))  # padded to 16x24, cropped back
    with pytest.raises(ValueError, match="uint8"):
        model(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))


def test_torchvision_raft_with_user_weights(tmp_path):
    from torchvision.models.optical_flow import raft_small

    torch.manual_seed(0)
    path = tmp_path / "raft_small.pth"
    torch.save(raft_small(weights=None).state_dict(), path)
    model = fl.build_flow_model("raft_small", str(path))
    out = model(torch.randint(0, 255, (3, 130, 132), dtype=torch.uint8), torch.randint(0, 255, (3, 130, 132), dtype=torch.uint8))
    assert out.shape == (2, 130, 132) and torch.isfinite(out).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_raft_runs_on_the_device_asked_for_with_the_users_weights(tmp_path, device):
    """A randomly initialised torchvision RAFT saved to a file stands in for the user's weights."""
    import pickle

    from torchvision.models.optical_flow import raft_small

    torch.manual_seed(1)
    net = raft_small(weights=None).eval()
    path = tmp_path / "raft_small.pth"
    torch.save(net.state_dict(), path)
    a, b = (torch.randint(0, 255, (3, 128, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(k))
            for k in (0, 1))
    model = fl.build_flow_model("raft_small", str(path), device=device)
    assert model.device == torch.device(device)
    out = model(a, b)
    params = {p.device.type for p in model.module.parameters()}
    assert params == {device} and out.device.type == "cpu"  # computed there, returned on the CPU like OpenCV's
    with torch.no_grad():  # the file's weights, not a fresh initialisation
        ref = net(a[None].float() / 127.5 - 1, b[None].float() / 127.5 - 1, num_flow_updates=12)[-1][0]
    assert torch.allclose(out, ref, atol=1e-3 if device == "cuda" else 1e-5)
    # to(): moves on the next call; a pickled copy (a data-loader worker's) carries CPU weights
    model.to("cpu")
    model(a, b)
    assert {p.device.type for p in model.module.parameters()} == {"cpu"}
    copy = pickle.loads(pickle.dumps(model.to(device)))
    assert {p.device.type for p in copy.module.parameters()} == {"cpu"} and copy.device == torch.device(device)
    assert torch.allclose(copy(a, b), out, atol=1e-3 if device == "cuda" else 1e-5)
    assert {p.device.type for p in copy.module.parameters()} == {device}
    # OpenCV's models stay on the CPU whatever the device
    assert fl.build_flow_model("dis", device=device).device == torch.device("cpu")


def test_raft_device_argument_is_honoured_without_a_gpu(tmp_path):
    # "meta" stands in for a second device on a CPU-only machine: the weights must go there on the
    # first call (where computing then fails: meta tensors have no values), not stay on the CPU
    from torchvision.models.optical_flow import raft_small

    path = tmp_path / "raft_small.pth"
    torch.save(raft_small(weights=None).state_dict(), path)
    model = fl.build_flow_model("raft_small", str(path), device="meta")
    frame = torch.zeros(3, 128, 128, dtype=torch.uint8)
    with pytest.raises((NotImplementedError, RuntimeError)):
        model(frame, frame)
    assert {p.device.type for p in model.module.parameters()} == {"meta"}
