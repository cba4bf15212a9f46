"""Optimisers: one LARS, plus SGD and AdamW, with parameter groups chosen by parameter kind.

Biases and normalisation parameters (every parameter with ndim <= 1) are excluded from weight
decay (`optim.wd_exclude_1d`) and from the LARS trust ratio (`optim.lars_exclude_1d`). The
exclusion is by kind, not by name: name matching on "bn"/"bias" misses torchvision's
`downsample.1` BatchNorms (see specs, LARS section). Setting a key to false reproduces code
that treats every parameter alike: official MoCo's SGD decays all parameters; SwAV's LARC
decays and adapts all parameters.
"""
from __future__ import annotations

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (BYOL's official variant).

    For an adapted parameter p with gradient g:
        u = g + wd * p
        u = u * eta * ||p|| / ||u||      (trust ratio; 1 when either norm is 0)
        v = momentum * v + u
        p = p - lr * v
    Groups with `lars_exclude=True` skip the trust ratio (`param_groups` sets each group's wd).
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 1e-3):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """One update with multi-tensor (foreach) kernels.

        The gradients are consumed: weight decay and the trust ratio are applied to `p.grad`
        in place (no copies of every gradient; the trainer clears them before the next step).
        """
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            wd = group["weight_decay"]
            if wd != 0:
                torch._foreach_add_(grads, params, alpha=wd)
            if not group["lars_exclude"]:
                p_norm = torch.stack(torch._foreach_norm(params))
                u_norm = torch.stack(torch._foreach_norm(grads))
                trust = torch.where((p_norm > 0) & (u_norm > 0), group["eta"] * p_norm / u_norm, torch.ones_like(p_norm))
                torch._foreach_mul_(grads, list(trust.unbind()))
            states = [self.state[p] for p in params]
            # per parameter: a parameter's first update sets v = u (one whose first gradient
            # comes late, e.g. prototypes after a freeze, must not reset the others' momentum)
            bufs, buf_grads = [], []
            for st, g in zip(states, grads):
                if "momentum_buffer" in st:
                    bufs.append(st["momentum_buffer"])
                    buf_grads.append(g)
                else:
                    st["momentum_buffer"] = torch.clone(g).detach()
            if bufs:
                torch._foreach_mul_(bufs, group["momentum"])
                torch._foreach_add_(bufs, buf_grads)
            torch._foreach_add_(params, [st["momentum_buffer"] for st in states], alpha=-group["lr"])
        return loss


def param_groups(modules: list[nn.Module] | nn.Module, weight_decay: float, wd_exclude_1d: bool = True,
                 lars_exclude_1d: bool = True) -> list[dict]:
    """Two groups: weights (decayed, LARS-adapted) and biases/norm parameters (ndim <= 1: decayed
    unless `wd_exclude_1d`, LARS-adapted unless `lars_exclude_1d`)."""
    modules = modules if isinstance(modules, (list, tuple)) else [modules]
    decay, no_decay = [], []
    for m in modules:
        for p in m.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lars_exclude": False, "wd_scale": 1.0},
        {"params": no_decay, "weight_decay": 0.0 if wd_exclude_1d else weight_decay, "lars_exclude": lars_exclude_1d,
         "wd_scale": 0.0 if wd_exclude_1d else 1.0},
    ]


def build_optimizer(cfg, modules, lr: float) -> torch.optim.Optimizer:
    """`cfg` is an OptimConfig; `lr` the batch-scaled peak learning rate."""
    groups = param_groups(modules, cfg.weight_decay, cfg.wd_exclude_1d, cfg.lars_exclude_1d)
    if cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, eta=cfg.eta)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=True)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay, foreach=True)
    raise ValueError(f"optim.name={cfg.name!r}; expected one of lars, sgd, adamw")
