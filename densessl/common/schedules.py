"""Per-step schedules: learning rate, weight decay and EMA momentum."""
from __future__ import annotations

import math


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, base: float, final: float = 0.0,
                  start: float = 0.0) -> float:
    """Linear warmup from `start` to `base` over `warmup_steps`, then cosine from `base` to `final`."""
    if step < warmup_steps:
        if start == 0.0:
            return base * step / warmup_steps
        return start + (base - start) * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """BYOL's EMA momentum: m(k) = final - (final - base) * (cos(pi k / K) + 1) / 2, from base to
    final (BYOL's 1 by default)."""
    progress = min(1.0, step / max(1, total_steps))
    return final - (final - base) * (math.cos(math.pi * progress) + 1.0) / 2.0
