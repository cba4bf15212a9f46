import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from densessl.config import ViewConfig
from densessl.data import augment as A


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 20, 24, generator=g)
    x[0] = x[0].mean(0, keepdim=True)  # a gray image (hue undefined)
    x[1, :, :4] = 0  # black pixels
    return x


def per_sample(fn, x, values):
    return torch.stack([fn(x[i], float(values[i])) for i in range(x.shape[0])])


@pytest.mark.parametrize("ours,theirs", [
    (A.adjust_brightness, TF.adjust_brightness),
    (A.adjust_contrast, TF.adjust_contrast),
    (A.adjust_saturation, TF.adjust_saturation),
])
def test_colour_factors_match_torchvision(images, ours, theirs):
    f = torch.tensor([0.6, 1.0, 1.4, 0.8, 1.2, 0.0])
    assert torch.allclose(ours(images.clone(), f), per_sample(theirs, images, f), atol=1e-5)


def test_hue_matches_torchvision(images):
    shift = torch.tensor([0.1, -0.1, 0.5, -0.5, 0.25, 0.0])
    assert torch.allclose(A.adjust_hue(images, shift), per_sample(TF.adjust_hue, images, shift), atol=1e-5)


def test_gray_blur_solarize_match_torchvision(images):
    assert torch.allclose(A.rgb_to_gray(images).expand_as(images), TF.rgb_to_grayscale(images, 3), atol=1e-6)
    sigma = torch.tensor([0.5, 1.0, 2.0, 0.1, 1.5, 0.7])
    ours = A.gaussian_blur(images, sigma, 5)
    theirs = torch.stack([TF.gaussian_blur(images[i], [5, 5], [float(sigma[i])] * 2) for i in range(6)])
    assert torch.allclose(ours, theirs, atol=1e-5)
    on = torch.tensor([True, False, True, False, True, True])
    sol = A.solarize(images, on)
    assert torch.equal(sol[1], images[1])
    assert torch.allclose(sol[0], TF.solarize(images[0], 0.5))


def test_params_for_a_rank_are_its_slice_of_the_global_batch():
    cfg = ViewConfig(blur_p=0.5, solarize_p=0.5)
    views = [torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)]
    whole = A.augment_batch(views, [cfg], seed=1, step=3, device="cpu", channels_last=False)[0]
    halves = [A.augment_batch([views[0][r * 4:(r + 1) * 4]], [cfg], 1, 3, "cpu", rank=r, world_size=2,
                              channels_last=False)[0] for r in range(2)]
    assert torch.allclose(torch.cat(halves), whole, atol=1e-6)
    other_step = A.augment_batch(views, [cfg], seed=1, step=4, device="cpu", channels_last=False)[0]
    assert not torch.allclose(other_step, whole)


def test_disabled_ops_leave_images_unchanged_up_to_normalisation():
    cfg = ViewConfig(jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)
    views = [torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)]
    out = A.augment_batch(views, [cfg], seed=0, step=0, device="cpu", channels_last=False)[0]
    assert torch.allclose(out, A.normalize(views[0]), atol=1e-6)
