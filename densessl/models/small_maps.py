"""Convolutions on tiny feature maps as one dense matrix product (CPU).

On a 2x2 map (ResNet-18's C5 at 64 px), oneDNN's convolution runs far below the CPU's matrix
peak: a 512->512 3x3 convolution on a (128, 512, 2, 2) batch took 9 ms forward and 45 ms
forward+backward in bf16 on our 2-core machine, while the same FLOPs on a 4x4 map (256
channels) took 1.6 and 10.8 ms (`python benchmarks/small_map_conv.py`). On such a map every
output position sees every input position, so the layer is one small dense linear operator: a
(C_out*H*W) x (H*W*C_in) matrix gathered from the kernel. Its product with the flattened
channels_last input is a single GEMM that AMX runs at speed, and autograd's backward of the
gather sums the gradient back into the kernel.

`SmallMapConv2d` is an `nn.Conv2d` (same parameters and state_dict keys) that takes this path
on the CPU when the input map has at most `max_positions` (4) positions and the kernel is
larger than 1x1, and the ordinary convolution otherwise (always on a GPU). Measured per layer
shape (`benchmarks/small_map_conv.py`, forward+backward): 5.5x faster in bf16 and 4.6x in fp32
for 3x3 convolutions on 2x2 maps; on 3x3 and 4x4 input maps, or for 1x1 kernels, it is even or
slower, hence the rule.
"""
from __future__ import annotations

import torch
from torch import nn

Tensor = torch.Tensor


def _tap_index(in_hw: tuple[int, int], out_hw: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int],
               padding: tuple[int, int]) -> Tensor:
    """(H_out*W_out * H_in*W_in,) int64, output-position major: the kernel tap (ky*kw + kx)
    linking output position o to input position p, or kh*kw (a zero tap) where the kernel does
    not reach."""
    (hi, wi), (ho, wo), (kh, kw) = in_hw, out_hw, kernel
    oy, ox = torch.meshgrid(torch.arange(ho), torch.arange(wo), indexing="ij")
    py, px = torch.meshgrid(torch.arange(hi), torch.arange(wi), indexing="ij")
    ky = py.reshape(1, -1) - oy.reshape(-1, 1) * stride[0] + padding[0]
    kx = px.reshape(1, -1) - ox.reshape(-1, 1) * stride[1] + padding[1]
    inside = (ky >= 0) & (ky < kh) & (kx >= 0) & (kx < kw)
    return torch.where(inside, ky * kw + kx, torch.full_like(ky, kh * kw)).reshape(-1)


def conv_operator(weight: Tensor, tap_index: Tensor, in_positions: int) -> Tensor:
    """The convolution as a matrix A of shape (C_out*H_out*W_out, H_in*W_in*C_in): rows ordered
    as an NCHW output flattens, columns as a channels_last input flattens, so that
    y.flatten(1) = x_cl_flat @ A.T.

    Built by selecting whole C_in-vectors of the kernel (index_select on the tap dim of the
    (C_out, taps, C_in) view, which is free for a channels_last weight); its backward is an
    index_add of the same vectors, not an element-wise scatter."""
    out_c, in_c, kh, kw = weight.shape
    taps = weight.permute(0, 2, 3, 1).reshape(out_c, kh * kw, in_c)
    taps = torch.cat([taps, taps.new_zeros(out_c, 1, in_c)], dim=1)  # tap kh*kw: the kernel does not reach
    out_positions = tap_index.numel() // in_positions
    return taps.index_select(1, tap_index).view(out_c * out_positions, in_positions * in_c)


def small_map_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int],
                     padding: tuple[int, int], tap_index: Tensor | None = None) -> Tensor:
    """F.conv2d(x, weight, bias, stride, padding) (groups 1, dilation 1, zero padding) as one
    matrix product; the result has x's memory format."""
    b, c, h, w = x.shape
    kh, kw = weight.shape[-2:]
    ho = (h + 2 * padding[0] - kh) // stride[0] + 1
    wo = (w + 2 * padding[1] - kw) // stride[1] + 1
    if tap_index is None:
        tap_index = _tap_index((h, w), (ho, wo), (kh, kw), stride, padding)
    if torch.is_autocast_enabled("cpu"):  # build the operator in the product's dtype: half the bytes
        dtype = torch.get_autocast_dtype("cpu")
        weight, x = weight.to(dtype), x.to(dtype)
    x_flat = x.permute(0, 2, 3, 1).reshape(b, h * w * c)  # free for a channels_last x
    y = (x_flat @ conv_operator(weight, tap_index, h * w).t()).view(b, -1, ho, wo)
    if bias is not None:
        y = y + bias.to(y.dtype).view(1, -1, 1, 1)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        y = y.contiguous(memory_format=torch.channels_last)
    return y


class SmallMapConv2d(nn.Conv2d):
    """nn.Conv2d that runs as one dense matrix product on CPU inputs whose map has at most
    `max_positions` positions and whose kernel is larger than 1x1 (see the module docstring);
    otherwise (1x1 kernels, larger maps, GPUs) the ordinary convolution."""

    max_positions = 4

    def _out_hw(self, h: int, w: int) -> tuple[int, int]:
        return ((h + 2 * self.padding[0] - self.kernel_size[0]) // self.stride[0] + 1,
                (w + 2 * self.padding[1] - self.kernel_size[1]) // self.stride[1] + 1)

    def _dense_ok(self, x: Tensor) -> bool:
        if (x.device.type != "cpu" or x.dim() != 4 or self.kernel_size == (1, 1) or self.groups != 1
                or self.dilation != (1, 1) or self.padding_mode != "zeros" or isinstance(self.padding, str)):
            return False
        return x.shape[-2] * x.shape[-1] <= self.max_positions

    def forward(self, x: Tensor) -> Tensor:
        if not self._dense_ok(x):
            return super().forward(x)
        key = (x.shape[-2], x.shape[-1])
        cache = self.__dict__.setdefault("_tap_indices", {})  # not a buffer: kept out of state_dict
        if key not in cache:
            with torch.inference_mode(False):  # built under an eval's inference_mode, reused by training
                cache[key] = _tap_index(key, self._out_hw(*key), self.kernel_size, self.stride, self.padding)
        return small_map_conv2d(x, self.weight, self.bias, self.stride, self.padding, cache[key])


def use_small_map_convs(module: nn.Module, max_positions: int = 4) -> int:
    """Make every plain nn.Conv2d inside `module` a SmallMapConv2d: same object, parameters and
    state_dict; only forward changes (0 turns the dense path off). Returns how many convs
    `module` now routes this way."""
    count = 0
    for m in module.modules():
        if type(m) is nn.Conv2d:
            m.__class__ = SmallMapConv2d
        if isinstance(m, SmallMapConv2d):
            m.max_positions = max_positions
            count += 1
    return count
