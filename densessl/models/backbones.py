"""Backbones with every stage's feature map (C2..C5).

All backbones are torchvision ResNets, so their state_dicts use torchvision's key names
(conv1, bn1, layer1..layer4) and export without renaming. `resnet18_small` keeps spatial
resolution on small images: a 3x3 stride-2 stem and no max-pool give an overall stride of 16
(C5 is 4x4 on a 64-px image instead of 2x2), and `width` scales every stage's channels
(width 32 costs about a quarter of width 64). Convolutions are `SmallMapConv2d` (an nn.Conv2d
that runs 3x3 convolutions on 2x2 maps as one matrix product on the CPU; see small_maps.py).
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.resnet import BasicBlock, Bottleneck

from densessl.models.small_maps import use_small_map_convs

STAGES = ("c2", "c3", "c4", "c5")


class Backbone(nn.Module):
    """A torchvision ResNet without its classifier.

    forward(x) returns {"c2": ..., "c5": ...} for the requested stages (all by default);
    pool(x) returns the global-average-pooled C5 feature, shape (B, out_dim).
    """

    def __init__(self, net: resnet.ResNet, name: str):
        super().__init__()
        self.name = name
        # Keep torchvision's attribute names so state_dict keys match torchvision exactly.
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.channels = {f"c{i + 2}": _stage_channels(getattr(self, f"layer{i + 1}")) for i in range(4)}
        self.out_dim = self.channels["c5"]

    def forward(self, x: torch.Tensor, stages: tuple[str, ...] = STAGES) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = {}
        last = max(int(s[1]) for s in stages)
        for i in range(2, last + 1):
            x = getattr(self, f"layer{i - 1}")(x)
            if f"c{i}" in stages:
                out[f"c{i}"] = x
        return out

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x, stages=("c5",))["c5"].mean(dim=(2, 3))


def _stage_channels(layer: nn.Sequential) -> int:
    block = layer[-1]
    return block.bn3.num_features if isinstance(block, Bottleneck) else block.bn2.num_features


def _small_resnet(block, layers: list[int], width: int) -> resnet.ResNet:
    net = resnet.ResNet(block, layers)
    # Rebuild the stages at the requested width (torchvision fixes 64/128/256/512).
    net.inplanes = width
    net.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=2, padding=1, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    net.maxpool = nn.Identity()
    net.layer1 = net._make_layer(block, width, layers[0])
    net.layer2 = net._make_layer(block, width * 2, layers[1], stride=2)
    net.layer3 = net._make_layer(block, width * 4, layers[2], stride=2)
    net.layer4 = net._make_layer(block, width * 8, layers[3], stride=2)
    for m in net.modules():  # torchvision's init, re-applied to the rebuilt layers
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return net


BACKBONES = {
    "resnet18": lambda width: resnet.resnet18(),
    "resnet50": lambda width: resnet.resnet50(),
    "resnet18_small": lambda width: _small_resnet(BasicBlock, [2, 2, 2, 2], width or 32),
}


def zero_init_residual_(net: nn.Module) -> None:
    """Set the last BN gamma of every residual block to 0 (torchvision's `zero_init_residual`):
    each block starts as the identity. PixPro's code does this; the init of everything else and
    the random draws are unchanged."""
    for m in net.modules():
        if isinstance(m, Bottleneck):
            nn.init.zeros_(m.bn3.weight)
        elif isinstance(m, BasicBlock):
            nn.init.zeros_(m.bn2.weight)


def build_backbone(name: str, width: int | None = None, zero_init_residual: bool = False) -> Backbone:
    """Build a backbone by name; `width` applies to the *_small variants only."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(BACKBONES)}")
    if width is not None and not name.endswith("_small") and width != 64:
        raise ValueError(f"backbone {name!r} has torchvision's fixed widths; 'width' applies to *_small only")
    net = BACKBONES[name](width)
    if zero_init_residual:
        zero_init_residual_(net)
    backbone = Backbone(net, name)
    use_small_map_convs(backbone)  # CPU: 3x3 convs on 2x2 maps as one GEMM (same weights, same math)
    return backbone
