import math

import torch
from torch import nn

from densessl.config import OptimConfig
from densessl.engine.optim import LARS, build_optimizer, param_groups
from densessl.common.schedules import warmup_cosine
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


def _lars_u(p, g, wd, eta):
    """LARS' adapted update u for parameter value p and gradient g (the class docstring)."""
    u = g + wd * p
    return eta * p.norm() / u.norm() * u


def test_lars_late_first_gradient_keeps_the_others_momentum():
    """The prototypes get no gradient for the first two steps (SwAV's freeze, grad set to None)
    and share the trunk's group: their first update must not reset the trunk's momentum."""
    model = nn.ModuleDict({"trunk": nn.Linear(2, 1, bias=False), "prototypes": nn.Linear(2, 1, bias=False)})
    with torch.no_grad():
        model["trunk"].weight.copy_(torch.tensor([[3.0, 4.0]]))
        model["prototypes"].weight.copy_(torch.tensor([[1.0, 0.0]]))
    cfg = OptimConfig(name="lars", momentum=0.9, weight_decay=0.1, eta=0.01)
    opt = build_optimizer(cfg, [model], lr=0.5)
    assert len(opt.param_groups[0]["params"]) == 2  # one group: the bug's precondition
    g_trunk, g_proto = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 1.0]])
    p, v = torch.tensor([[3.0, 4.0]]), None
    q, w = torch.tensor([[1.0, 0.0]]), None
    for step in range(4):
        model["trunk"].weight.grad = g_trunk.clone()
        model["prototypes"].weight.grad = g_proto.clone() if step >= 2 else None
        opt.step()
        u = _lars_u(p, g_trunk, 0.1, 0.01)
        v = u if v is None else 0.9 * v + u  # by hand: v = u once, then momentum, whatever else happens
        p = p - 0.5 * v
        if step >= 2:
            u = _lars_u(q, g_proto, 0.1, 0.01)
            w = u if w is None else 0.9 * w + u
            q = q - 0.5 * w
        assert torch.allclose(model["trunk"].weight.detach(), p, atol=1e-7), step
        assert torch.allclose(model["prototypes"].weight.detach(), q, atol=1e-7), step


def test_lars_matches_timm_where_their_definitions_agree():
    """timm's Lars divides by ||g|| + wd ||p|| (a bound on ||g + wd p||) and adapts only with wd
    or always_adapt; with weight_decay = 0, always_adapt and eps = 0 it is the same update as ours,
    including a parameter whose first gradient comes late."""
    from timm.optim import Lars

    torch.manual_seed(0)
    ours = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(5))]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    opt_ours = LARS(ours, lr=0.3, momentum=0.9, weight_decay=0.0, eta=0.02)
    opt_theirs = Lars(theirs, lr=0.3, momentum=0.9, weight_decay=0.0, trust_coeff=0.02, eps=0.0, always_adapt=True)
    for step in range(5):
        grads = [torch.randn_like(p) for p in ours]
        for a, b, g in zip(ours, theirs, grads):
            late = a.ndim == 1 and step < 2
            a.grad = None if late else g.clone()
            b.grad = None if late else g.clone()
        opt_ours.step()
        opt_theirs.step()
        for a, b in zip(ours, theirs):
            assert torch.allclose(a, b, atol=1e-6), step
