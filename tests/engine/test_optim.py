import math

import torch
from torch import nn

from densessl.config import OptimConfig
from densessl.engine.optim import LARS, build_optimizer, param_groups
from densessl.engine.schedules import warmup_cosine
from densessl.models.backbones import build_backbone


def test_lars_step_hand_computed():
    p = nn.Parameter(torch.tensor([3.0, 4.0]))  # ||p|| = 5
    p.grad = torch.tensor([0.0, 1.0])
    opt = LARS([p], lr=0.1, momentum=0.9, weight_decay=0.1, eta=0.01)
    opt.step()
    # u = g + wd p = (0.3, 1.4); ||u|| = sqrt(0.09 + 1.96); trust = 0.01 * 5 / ||u||
    u = torch.tensor([0.3, 1.4])
    trust = 0.01 * 5 / math.sqrt(2.05)
    expected = torch.tensor([3.0, 4.0]) - 0.1 * trust * u
    assert torch.allclose(p.detach(), expected, atol=1e-7)
    # second step: v = 0.9 v + u' with the new p
    p.grad = torch.tensor([0.0, 1.0])
    v1 = trust * u
    u2 = torch.tensor([0.0, 1.0]) + 0.1 * expected
    v2 = 0.9 * v1 + 0.01 * expected.norm() / u2.norm() * u2
    opt.step()
    assert torch.allclose(p.detach(), expected - 0.1 * v2, atol=1e-7)


def test_lars_excluded_group_is_plain_momentum_sgd():
    p = nn.Parameter(torch.tensor([3.0, 4.0]))
    p.grad = torch.tensor([1.0, -2.0])
    opt = LARS([{"params": [p], "lars_exclude": True, "weight_decay": 0.0}], lr=0.5, eta=0.001)
    opt.step()
    assert torch.allclose(p.detach(), torch.tensor([2.5, 5.0]))


def test_exclusion_by_parameter_kind_catches_downsample_batchnorm():
    backbone = build_backbone("resnet18")
    decay, no_decay = param_groups(backbone, 1e-4)
    excluded = {id(p) for p in no_decay["params"]}
    bn = backbone.layer2[0].downsample[1]  # name has no "bn": name matching would miss it
    assert id(bn.weight) in excluded and id(bn.bias) in excluded
    assert id(backbone.conv1.weight) not in excluded
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(backbone.parameters()))


def test_build_optimizer_kinds():
    m = nn.Linear(3, 3)
    assert isinstance(build_optimizer(OptimConfig(name="lars"), [m], 0.1), LARS)
    assert isinstance(build_optimizer(OptimConfig(name="adamw"), [m], 0.1), torch.optim.AdamW)


def test_warmup_cosine_known_steps():
    assert warmup_cosine(0, 100, 10, 1.0) == 0.0
    assert warmup_cosine(5, 100, 10, 1.0) == 0.5
    assert warmup_cosine(10, 100, 10, 1.0) == 1.0
    assert math.isclose(warmup_cosine(55, 100, 10, 1.0), 0.5)  # half-way through the cosine
    assert math.isclose(warmup_cosine(100, 100, 10, 1.0, final=0.1), 0.1)
    assert math.isclose(warmup_cosine(0, 100, 0, 2.0, final=1.0), 2.0)
