"""Momentum (EMA) target encoders and what goes with them: the momentum schedule, the one
place where the EMA update runs, shuffle-BN, split BN, and MoCo's key queue.

The EMA update runs in `MomentumMethod.after_step`, after the optimiser step, for every
method with a target (BYOL, SCRL, MoCo, DenseCL, CGH, PixPro). Two placements exist in the
official code bases, and both are reproduced exactly:
- BYOL, SCRL: after step t, with m(t) (`update_for_next_step = False`);
- MoCo, DenseCL, CGH, PixPro: at the start of step t + 1, before the key / target pass, with
  m(t + 1). Nothing changes the online parameters between the optimiser step of t and that
  update, so running it after step t with m(t + 1) gives the same target (same op, same
  operands). The update the official code makes at step 0 is skipped: the target is then an
  exact copy of the online network, and lerp between equal tensors returns them unchanged.
  After the last step there is no next step, so no update (as in the official code).
Parameters only: buffers (BN running statistics) are not averaged; the targets run in train
mode on batch statistics.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from densessl.common.errors import ConfigError
from densessl.common.distributed import AllReduceBatchNorm, concat_all_gather, rank, world_size
from densessl.common.ema import ema_update_, make_target  # noqa: F401  (make_target: the methods build targets with it)
from densessl.common.schedules import cosine_momentum
from densessl.methods.base import Method

# ---------------------------------------------------------------- schedule


def momentum_at(step: int, total_steps: int, base: float, schedule: str, final: float = 1.0) -> float:
    """The EMA momentum at `step`: `base` throughout ("const") or BYOL's cosine from `base` to `final`."""
    if schedule == "const":
        return base
    if schedule == "cosine":
        return cosine_momentum(step, total_steps, base, final)
    raise ConfigError(f"method.momentum_schedule={schedule!r}; expected 'const' or 'cosine'")


@dataclass(frozen=True)
class MomentumSchedule:
    base: float
    final: float = 1.0
    kind: str = "cosine"  # const | cosine

    def __post_init__(self):
        momentum_at(0, 1, self.base, self.kind, self.final)  # an unknown kind fails here, at construction

    def at(self, step: int, total_steps: int) -> float:
        return momentum_at(step, total_steps, self.base, self.kind, self.final)


# ---------------------------------------------------------------- the EMA update


class MomentumMethod(Method):
    """A method with EMA targets: subclasses list (target, online) pairs in `momentum_pairs`."""

    def __init__(self, cfg, backbone: nn.Module, schedule: MomentumSchedule, update_for_next_step: bool):
        super().__init__(cfg, backbone)
        self.momentum_schedule = schedule
        self.update_for_next_step = update_for_next_step
        self.momentum = schedule.base
        self._ema_params = None  # (target params, online params) of every pair, flat: one lerp per step

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        self.momentum = self.momentum_schedule.at(step, total_steps)  # m of the step just taken (logged)
        m = self.momentum
        if self.update_for_next_step:
            if step + 1 >= total_steps:
                return
            m = self.momentum_schedule.at(step + 1, total_steps)
        if self._ema_params is None:  # the modules are final by the first step (device, DDP, compile keep them)
            pairs = [(list(t.parameters()), list(o.parameters())) for t, o in self.momentum_pairs()]
            if any(len(t) != len(o) for t, o in pairs):
                raise ValueError(f"{type(self).__name__}: a momentum target and its online module differ in "
                                 f"parameters ({[(len(t), len(o)) for t, o in pairs]})")
            self._ema_params = [p for t, _ in pairs for p in t], [p for _, o in pairs for p in o]
        targets, onlines = self._ema_params
        torch._foreach_lerp_(targets, onlines, 1.0 - m)  # ema_update_ over every pair in one pass


# ---------------------------------------------------------------- shuffle-BN


def shuffle_permutation(n_global: int, step: int, device) -> torch.Tensor:
    """A permutation of the global batch that every rank derives alike from the step index."""
    g = torch.Generator(device=device)
    g.manual_seed((step * 2654435761 + 97) % (2 ** 62))
    return torch.randperm(n_global, generator=g, device=device)


def batch_shuffle(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """This rank's slice of the gathered global batch, permuted by `perm` (no gradient)."""
    x_all = concat_all_gather(x)
    return x_all[perm.view(world_size(), -1)[rank()]]


def batch_unshuffle(y: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Inverse of batch_shuffle: gather the outputs and take back this rank's original samples."""
    y_all = concat_all_gather(y)
    return y_all[torch.argsort(perm).view(world_size(), -1)[rank()]]


@torch.no_grad()
def shuffled_forward(fn, x: torch.Tensor, step: int):
    """fn on the batch shuffled across ranks (within the batch on one process); outputs unshuffled.

    `fn` returns a tensor or a tuple of tensors, each with the batch on dim 0.
    """
    perm = shuffle_permutation(x.shape[0] * world_size(), step, x.device)
    out = fn(batch_shuffle(x, perm))
    if isinstance(out, tuple):
        return tuple(batch_unshuffle(o, perm) for o in out)
    return batch_unshuffle(out, perm)


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, training on one process, normalises the batch in `num_splits` groups.

    Group g holds samples g, g + G, g + 2G, ... (one call: the batch is folded into channels).
    Running statistics are the mean over groups. Under DDP, or in eval mode, it is plain BN
    (state_dict keys are BatchNorm2d's, so exports and evaluation are unaffected).
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        G = self.num_splits
        if not self.training or G == 1 or world_size() > 1:
            return super().forward(x)
        N, C, H, W = x.shape
        if N % G:
            raise ConfigError(f"method.bn_splits={G} must divide the per-process batch ({N} samples); "
                             f"change train.batch_size or method.bn_splits")
        if self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked + 1)
        else:
            factor = self.momentum
        rm, rv = self.running_mean.repeat(G), self.running_var.repeat(G)
        w = self.weight.repeat(G) if self.affine else None
        b = self.bias.repeat(G) if self.affine else None
        y = F.batch_norm(x.reshape(N // G, C * G, H, W), rm, rv, w, b, True, factor, self.eps)
        with torch.no_grad():
            self.running_mean.copy_(rm.view(G, C).mean(0))
            self.running_var.copy_(rv.view(G, C).mean(0))
            self.num_batches_tracked.add_(1)
        return y.reshape(N, C, H, W)


def convert_split_bn(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every BatchNorm2d in `module` (in place, recursively) by a SplitBatchNorm2d."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = SplitBatchNorm2d(child.num_features, num_splits, eps=child.eps, momentum=child.momentum,
                                   affine=child.affine, track_running_stats=child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_split_bn(child, num_splits)
    return module


def check_per_rank_bn(module: nn.Module, method: str) -> None:
    """Shuffle-BN needs per-rank batch norm: refuse BN synchronised across ranks."""
    if world_size() > 1 and any(isinstance(m, (AllReduceBatchNorm, nn.SyncBatchNorm)) for m in module.modules()):
        raise ConfigError(f"{method} uses shuffle-BN, which needs per-rank batch norm, but batch norm is "
                         f"synchronised across ranks: set train.sync_bn=false (the recipes do), or "
                         f"method.shuffle_bn=false")


class MomentumContrast(MomentumMethod):
    """MoCo, DenseCL and CGH: a key encoder updated for the next step (MoCo's placement), keys
    computed with shuffle-BN. The config has momentum, momentum_schedule, momentum_end,
    shuffle_bn and bn_splits."""

    def __init__(self, cfg, backbone: nn.Module):
        super().__init__(cfg, backbone, MomentumSchedule(cfg.momentum, cfg.momentum_end, cfg.momentum_schedule),
                         update_for_next_step=True)
        if cfg.shuffle_bn and cfg.bn_splits > 1:
            convert_split_bn(backbone, cfg.bn_splits)  # before the key encoder is copied from it
        self._bn_checked = False

    def key_forward(self, fn, x: torch.Tensor):
        """fn (the key encoder) on x without gradient, with shuffle-BN when configured."""
        if not self._bn_checked:  # the first forward: the trainer has converted BN by now
            if self.cfg.shuffle_bn:
                check_per_rank_bn(self, self.cfg.name)
            self._bn_checked = True
        if self.cfg.shuffle_bn:
            return shuffled_forward(fn, x, self.current_step)
        with torch.no_grad():
            return fn(x)


def no_autocast(device: torch.device):
    """Autocast off: the contrastive losses run in fp32 (bf16 logits / 0.2 would round to ~0.03)."""
    return torch.autocast(device.type, enabled=False)


# ---------------------------------------------------------------- key queue


class KeyQueue(nn.Module):
    """A FIFO of past keys (MoCo, DenseCL, CGH), with one pointer shared by named queues.

    Each named queue is a (dim, K) buffer whose columns are L2-normalised keys, randomly
    initialised (normalised Gaussian columns) as in the official MoCo code. `enqueue` writes the
    keys of the *global* batch: under DDP every rank gathers its peers' keys with
    `concat_all_gather` (rank order, no gradient), so every rank holds the same queue, and the
    columns written are the global batch in the order a single process with that batch would use.

    Several queues share one pointer and are written from the same gathered batch: column j of
    every queue refers to the same image (CGH's cross-context relations rely on it; DenseCL's two
    queues advance together too). The pointer is a device tensor and the write is an
    `index_copy_` at (ptr + arange(n)) mod K, so no step reads a value back to the host.
    As in the official code, K must be a multiple of the global number of keys per step
    (checked, with an error that names `method.queue_size`).
    """

    def __init__(self, size: int, dims: dict[str, int]):
        super().__init__()
        if size < 1:
            raise ConfigError(f"method.queue_size must be positive, got {size}")
        self.size = size
        self.names = tuple(dims)
        for name, dim in dims.items():
            self.register_buffer(f"queue_{name}", F.normalize(torch.randn(dim, size), dim=0))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def __getitem__(self, name: str) -> torch.Tensor:
        """The (dim, K) queue `name` (a buffer: treat it as read-only, it is a constant)."""
        return getattr(self, f"queue_{name}")

    @torch.no_grad()
    def enqueue(self, **keys: torch.Tensor) -> None:
        """Gather each (B, dim) tensor of local keys across ranks and write it at the pointer."""
        self.enqueue_gathered(**{name: concat_all_gather(k.detach()) for name, k in keys.items()})

    @torch.no_grad()
    def enqueue_gathered(self, **keys: torch.Tensor) -> None:
        """Write (N, dim) keys that already hold the global batch; advance the pointer by N."""
        if set(keys) != set(self.names):
            raise ValueError(f"enqueue expects keys for every queue {list(self.names)}, got {sorted(keys)}")
        n = {k.shape[0] for k in keys.values()}
        if len(n) != 1:
            raise ValueError(f"the queues share a pointer: every enqueue needs the same number of keys, got {n}")
        n = n.pop()
        if self.size % n:
            raise ConfigError(f"method.queue_size={self.size} must be a multiple of the keys enqueued per step "
                             f"({n}: the global batch, times the key views per image); choose e.g. "
                             f"{max(n, self.size // n * n)}")
        idx = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size
        for name, k in keys.items():
            q = self[name]
            q.index_copy_(1, idx, k.t().to(q.dtype))
        self.ptr.add_(n).remainder_(self.size)
