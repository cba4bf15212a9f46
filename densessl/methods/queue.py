"""A FIFO queue of past keys (MoCo, DenseCL, CGH), with one pointer shared by named queues.

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
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from densessl.engine.distributed import concat_all_gather


class KeyQueue(nn.Module):
    def __init__(self, size: int, dims: dict[str, int]):
        super().__init__()
        if size < 1:
            raise ValueError(f"method.queue_size must be positive, got {size}")
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
            raise ValueError(f"method.queue_size={self.size} must be a multiple of the keys enqueued per step "
                             f"({n}: the global batch, times the key views per image); choose e.g. "
                             f"{max(n, self.size // n * n)}")
        idx = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size
        for name, k in keys.items():
            q = self[name]
            q.index_copy_(1, idx, k.t().to(q.dtype))
        self.ptr.add_(n).remainder_(self.size)
