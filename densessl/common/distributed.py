"""torch.distributed through torchrun: gloo on CPU, NCCL on GPU; batch norm across ranks.

What crosses ranks: gradients (DDP all-reduce, averaged); batch-norm statistics when
train.sync_bn (sum, sum of squares and count, all-reduced); logged metrics (averaged at log
time only). Photometric parameters are not communicated: every rank draws the global batch's
parameters from the same seeded generator and keeps its slice.
"""
from __future__ import annotations

import contextlib
import gc
import os
import re
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from densessl.common.errors import ConfigError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(pref: str) -> torch.device:
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if pref == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda (train.device or the eval's device) but no CUDA device is available; "
                          "use device=auto or device=cpu")
    return torch.device(pref)


def init_distributed(device_pref: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); a plain run is rank 0 of 1.

    A collective that waits more than `timeout_s` for another rank (one that hangs) raises,
    instead of blocking for torch's default 30 minutes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_pref)
    if world == 1:
        return DistInfo(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


class AllReduceBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch on any device (torch's SyncBatchNorm is GPU-only).

    Statistics are all-reduced with autograd (torch.distributed.nn), so gradients are those of
    a single-process batch norm over the concatenated batch.
    """

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {input.dim()}-D")

    def forward(self, x):
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0] + list(range(2, x.dim()))
        xf = x.float()
        count = torch.tensor([x.numel() / x.shape[1]], device=x.device, dtype=torch.float32)
        stats = all_reduce(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
                self.num_batches_tracked.add_(1)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        out = AllReduceBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        out.load_state_dict(module.state_dict())
        out.train(module.training)
        if module.affine:
            out.weight.requires_grad_(module.weight.requires_grad)
            out.bias.requires_grad_(module.bias.requires_grad)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, device))
    return out


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_initialized() else 0


@torch.no_grad()
def concat_all_gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` from every rank along dim 0, in rank order (no gradient).

    Used for queues of keys (MoCo, DenseCL, CGH): every rank enqueues the same global batch.
    """
    if world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks in place (no gradient), e.g. Sinkhorn's marginals in SwAV."""
    if world_size() > 1:
        dist.all_reduce(t)
    return t


def shutdown_distributed() -> None:
    """Barrier, then destroy the process group: tearing gloo down while a peer still talks
    aborts the process ("terminate called without an active exception"). So does a DDP module
    that outlives the process group and is freed at interpreter exit, so callers drop their
    references first and unreachable ones (a finished Trainer's cycles) are collected here."""
    if dist.is_initialized():
        gc.collect()
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


# what gloo and NCCL say when a peer died (its sockets closed) or did not answer in time
_LOST_PEER = re.compile(r"gloo|NCCL|ProcessGroup|Connection (reset|closed) by peer|Broken pipe")


def lost_rank_message(e: BaseException, last_checkpoint: Path) -> str | None:
    """One line for a collective that failed because another rank died or hung; None for any
    other error (or a single-process run)."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or not isinstance(e, RuntimeError):
        return None
    text = str(e).strip()
    if not (isinstance(e, dist.DistError) or _LOST_PEER.search(text)):
        return None
    first = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0] if text else type(e).__name__)
    first = first.split(" This is typically", 1)[0][:200].rstrip(". ")
    return (f"rank {os.environ.get('RANK', '?')}: lost contact with another rank ({first}): a rank died or hung "
            f"(torchrun's report gives every rank's exit); {_resume_hint(last_checkpoint)}")


def _resume_hint(last: Path) -> str:
    return (f"rerun the same command to resume from {last}" if last.exists()
            else "no checkpoint had been written yet, so a rerun starts from the beginning")


@contextlib.contextmanager
def rank_failures_reported(last_checkpoint: Path):
    """Under torchrun, end this rank with one `densessl: error:` line, not a traceback, when
    another rank is lost: a collective that fails or times out, or torchrun's SIGTERM (it stops
    the remaining ranks as soon as one fails, which can come before the collective fails).
    The process then leaves at once: a broken process group can hang or abort at teardown."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        yield
        return

    main_pid = os.getpid()

    def on_sigterm(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if os.getpid() != main_pid:  # a forked DataLoader worker: stop quietly, as by default
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        print(f"densessl: error: rank {os.environ.get('RANK', '?')}: stopped by SIGTERM (torchrun stops the "
              f"other ranks when one fails; its report gives every rank's exit); {_resume_hint(last_checkpoint)}",
              file=sys.stderr, flush=True)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    except Exception as e:
        msg = lost_rank_message(e, last_checkpoint)
        if msg is None:
            raise
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one message, even if torchrun's SIGTERM comes now
        print(f"densessl: error: {msg}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    finally:
        signal.signal(signal.SIGTERM, previous)
