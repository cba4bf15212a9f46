"""Flow-warped PixPro positives (densessl.data.geometry.flow_positive_mask)."""
import pytest
import torch

from densessl.data.geometry import (cell_centres, flow_positive_mask, flow_warp_centres, pixpro_positive_mask,
                                    sample_at_centres)


def random_boxes(B, gen):
    xy = torch.rand(B, 2, generator=gen) * 0.5
    wh = 0.2 + torch.rand(B, 2, generator=gen) * 0.5
    return torch.cat([xy, (xy + wh).clamp(max=1.0)], dim=1)


def test_zero_flow_gives_image_pixpro_positives_in_both_units():
    gen = torch.Generator().manual_seed(0)
    B = 16
    b1, b2 = random_boxes(B, gen), random_boxes(B, gen)
    f1, f2 = torch.rand(B, generator=gen) < 0.5, torch.rand(B, generator=gen) < 0.5
    ref = pixpro_positive_mask(b1, f1, b2, f2, (7, 7), (5, 5))
    assert ref.any()
    zero = torch.zeros(B, 2, 12, 12)
    square = torch.tensor([[96.0, 96.0]]).expand(B, 2)
    for units in ("normalised", "pixels"):
        for flow in (None, zero):
            got = flow_positive_mask(b1, f1, b2, f2, (7, 7), (5, 5), flow, units=units, source_size=square)
            assert torch.equal(got, ref), units
    # with every cell valid the validity mask changes nothing
    valid = torch.ones(B, 12, 12, dtype=torch.bool)
    assert torch.equal(flow_positive_mask(b1, f1, b2, f2, (7, 7), (5, 5), zero, valid), ref)


def test_constant_translation_with_shifted_crop_gives_identity():
    """View 2 = view 1's crop shifted by the flow: each cell corresponds to itself."""
    W = H = 80
    dx, dy = 7.0, -3.0
    b1 = torch.tensor([[0.2, 0.3, 0.6, 0.7], [0.1, 0.2, 0.5, 0.6]])
    b2 = b1 + torch.tensor([dx / W, dy / H, dx / W, dy / H])
    flow = torch.tensor([dx, dy]).view(1, 2, 1, 1).expand(2, 2, H, W).clone()
    size = torch.tensor([[W, H]], dtype=torch.float32).expand(2, 2)
    eye = torch.eye(49, dtype=torch.bool).expand(2, -1, -1)
    for flip in (None, torch.tensor([True, False])):
        for units in ("normalised", "pixels"):
            mask = flow_positive_mask(b1, flip, b2, flip, 7, 7, flow, units=units, source_size=size)
            assert torch.equal(mask, eye), (flip, units)
    # a non-square frame: the same correspondence as identical crops, in either unit
    W2, H2 = 120, 60
    b2 = b1 + torch.tensor([dx / W2, dy / H2, dx / W2, dy / H2])
    flow = torch.tensor([dx, dy]).view(1, 2, 1, 1).expand(2, 2, H2, W2)
    size = torch.tensor([[W2, H2]], dtype=torch.float32).expand(2, 2)
    for units in ("normalised", "pixels"):
        same = flow_positive_mask(b1, None, b1, None, 7, 7, None, units=units, source_size=size)
        assert torch.equal(flow_positive_mask(b1, None, b2, None, 7, 7, flow, units=units, source_size=size), same)
        assert same[:, range(49), range(49)].all()
    # without the flow the shift (about 1.1 cell diagonals) leaves no identity
    b2 = b1 + torch.tensor([dx / W, dy / H, dx / W, dy / H])
    assert not torch.equal(pixpro_positive_mask(b1, None, b2, None, 7, 7), eye)


def test_flow_at_reduced_resolution_gives_the_same_mask():
    W = H = 64
    b1 = torch.tensor([[0.1, 0.1, 0.7, 0.7]])
    b2 = b1 + torch.tensor([[0.1, 0.05, 0.1, 0.05]])
    full = torch.tensor([6.4, 3.2]).view(1, 2, 1, 1).expand(1, 2, H, W)
    small = torch.tensor([0.8, 0.4]).view(1, 2, 1, 1).expand(1, 2, 8, 8)  # the same motion on an 8x8 grid
    m_full = flow_positive_mask(b1, None, b2, None, 4, 4, full)
    assert torch.equal(m_full, torch.eye(16, dtype=torch.bool)[None])
    assert torch.equal(flow_positive_mask(b1, None, b2, None, 4, 4, small), m_full)


def test_pixel_units_differ_from_normalised_on_non_square_frames():
    """A 200x100 frame, full crop, 4x4 map: cells are 0.25 x 0.25 normalised (square) but
    50 x 25 px: vertical neighbours are 25 / 55.9 = 0.45 diagonals apart in pixels."""
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    size = torch.tensor([[200.0, 100.0]])
    norm = flow_positive_mask(box, None, box, None, 4, 4, None, units="normalised")
    pix = flow_positive_mask(box, None, box, None, 4, 4, None, units="pixels", source_size=size)
    assert torch.equal(norm[0], torch.eye(16, dtype=torch.bool))
    assert int(pix.sum()) == 16 + 2 * 4 * 3  # itself + the vertical neighbours (3 pairs per column, both ways)
    assert pix[0, 0, 4] and not pix[0, 0, 1]
    with pytest.raises(ValueError, match="source_size"):
        flow_positive_mask(box, None, box, None, 4, 4, None, units="pixels")
    with pytest.raises(ValueError, match="units"):
        flow_positive_mask(box, None, box, None, 4, 4, None, units="metres")


def test_invalid_cells_have_no_positives_and_validity_is_read_at_unmoved_centres():
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    valid[0, :, :2] = False  # the left half of frame a
    right = torch.zeros(1, 2, 4, 4)
    right[:, 0] = 2.0  # half the frame to the right (4-px flow grid)
    # left cells would land on the right cells, but they are invalid; right cells leave the frame
    assert not flow_positive_mask(box, None, box, None, 2, 2, right, valid).any()
    left = -right  # right cells (valid) land on the left cells
    expected = torch.zeros(1, 4, 4, dtype=torch.bool)
    expected[0, 1, 0] = expected[0, 3, 2] = True
    assert torch.equal(flow_positive_mask(box, None, box, None, 2, 2, left, valid), expected)
    zero = flow_positive_mask(box, None, box, None, 2, 2, torch.zeros_like(right), valid)
    assert torch.equal(zero[0], torch.diag(torch.tensor([False, True, False, True])))


def test_sample_at_centres_reads_pixel_centres():
    # a field equal to its own pixel-centre x coordinate (k + 0.5) / w in normalised units
    w = 8
    field = ((torch.arange(w) + 0.5) / w).view(1, 1, 1, w).expand(1, 1, 3, w)
    pts = torch.tensor([[[0.5 / w, 0.5], [0.3, 0.2], [0.77, 0.9], [-0.2, 0.5]]])
    got = sample_at_centres(field, pts)[0, :, 0]
    assert torch.allclose(got[:3], pts[0, :3, 0], atol=1e-6)
    assert torch.isclose(got[3], torch.tensor(0.5 / w))  # outside: the border value
    # flow_warp_centres converts pixels of the flow grid to normalised units
    flow = torch.tensor([2.0, -1.0]).view(1, 2, 1, 1).expand(1, 2, 10, 20)
    c = cell_centres(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), None, 2)
    assert torch.allclose(flow_warp_centres(c, flow), c + torch.tensor([2.0 / 20, -1.0 / 10]))
