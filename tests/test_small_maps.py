import pytest
import torch
import torch.nn.functional as F
from torch import nn

from densessl.models.backbones import build_backbone
from densessl.models.small_maps import SmallMapConv2d, small_map_conv2d, use_small_map_convs


@pytest.mark.parametrize("shape,kernel,stride,padding", [
    ((3, 5, 2, 2), 3, 1, 1),  # ResNet C5 at 64 px
    ((2, 4, 4, 4), 3, 2, 1),  # stride 2 into a 2x2 map (zero taps where the kernel does not reach)
    ((2, 3, 3, 2), 3, 1, 1),  # non-square
    ((2, 3, 3, 3), (3, 1), 1, (1, 0)),  # non-square kernel
    ((2, 4, 2, 2), 1, 1, 0),
    ((1, 2, 5, 5), 3, 2, 0),  # no padding
])
@pytest.mark.parametrize("channels_last", [False, True])
def test_dense_form_equals_conv2d_forward_and_backward(shape, kernel, stride, padding, channels_last):
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    conv = nn.Conv2d(shape[1], 6, kernel, stride=stride, padding=padding, bias=True).double().to(memory_format=fmt)
    x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    ref = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
    out = small_map_conv2d(x2, conv.weight, conv.bias, conv.stride, conv.padding)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-12)
    assert out.is_contiguous(memory_format=fmt)
    g = torch.randn_like(ref)
    gx, gw, gb = torch.autograd.grad(ref, (x, conv.weight, conv.bias), g)
    gx2, gw2, gb2 = torch.autograd.grad(out, (x2, conv.weight, conv.bias), g)
    assert torch.allclose(gx2, gx, atol=1e-12) and torch.allclose(gw2, gw, atol=1e-12)
    assert torch.allclose(gb2, gb, atol=1e-12)


def test_hand_computed_2x2_map():
    """1 channel, 3x3 kernel 1..9, 2x2 input [[a, b], [c, d]]: output (0, 0) sees the kernel's
    centre on a, right of centre on b, below on c, diagonal on d."""
    w = torch.arange(1.0, 10.0).view(1, 1, 3, 3)
    x = torch.tensor([[1.0, 10.0], [100.0, 1000.0]]).view(1, 1, 2, 2)
    y = small_map_conv2d(x, w, None, (1, 1), (1, 1))
    # y[0,0] = 5a + 6b + 8c + 9d; y[0,1] = 4a + 5b + 7c + 8d; y[1,0] = 2a + 3b + 5c + 6d; y[1,1] = 1a + 2b + 4c + 5d
    assert y.view(2, 2).tolist() == [[9865.0, 8754.0], [6532.0, 5421.0]]


def test_module_takes_the_dense_path_only_where_it_pays_and_keeps_state_dict():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
    keys = list(conv.state_dict())
    assert use_small_map_convs(nn.Sequential(conv, nn.ReLU())) == 1
    assert type(conv) is SmallMapConv2d and list(conv.state_dict()) == keys
    calls = []
    orig = nn.Conv2d._conv_forward
    conv._conv_forward = lambda *a: calls.append(1) or orig(conv, *a)
    conv(torch.randn(2, 4, 2, 2))
    assert calls == []  # 2x2 map: one matrix product, no convolution call
    conv(torch.randn(2, 4, 3, 3))
    assert calls == [1]  # 3x3 map: the ordinary convolution
    one = nn.Conv2d(4, 4, 1)
    use_small_map_convs(one)
    assert not one._dense_ok(torch.randn(2, 4, 2, 2))  # 1x1 kernels never
    assert use_small_map_convs(nn.Sequential(conv), max_positions=0) == 1
    assert not conv._dense_ok(torch.randn(2, 4, 2, 2))  # 0 turns the path off


def test_backbone_uses_it_and_matches_plain_convolutions():
    """A ResNet-18 (C5 2x2 at 64 px) gives the same features and gradients with the dense path."""
    torch.manual_seed(0)
    bb = build_backbone("resnet18").double().eval()
    assert any(isinstance(m, SmallMapConv2d) for m in bb.modules())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    out = bb.pool(x)
    use_small_map_convs(bb, max_positions=0)
    ref = bb.pool(x)
    assert torch.allclose(out, ref, atol=1e-10)


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)
    x = torch.randn(8, 64, 2, 2)
    ref = F.conv2d(x, conv.weight, None, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = small_map_conv2d(x, conv.weight, None, (1, 1), (1, 1))
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.02 * ref.abs().max()


def test_first_call_under_inference_mode_does_not_break_training():
    """The kNN monitor's first forward runs under inference_mode; the cached tap index it builds
    must still be usable by a later training forward/backward."""
    conv = nn.Conv2d(4, 4, 3, padding=1)
    use_small_map_convs(conv)
    with torch.inference_mode():
        conv(torch.randn(2, 4, 2, 2))
    conv(torch.randn(2, 4, 2, 2)).sum().backward()
    assert conv.weight.grad is not None
