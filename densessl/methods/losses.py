"""The methods' loss functions and collapse statistics: plain functions of tensors.

Each takes embeddings or scores and returns a 0-d tensor (or, for `sinkhorn`, the codes).
Targets (keys, target projections, codes, teacher relations) are detached here, so a caller
cannot leak a gradient into a momentum encoder by forgetting it. The only function that talks
to other processes is `sinkhorn` (its marginals are summed across ranks under DDP).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from densessl.common.distributed import all_reduce_sum, world_size

# ---------------------------------------------------------------- regression (BYOL, SCRL)


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-sample 2 - 2 cos(p, z), with z treated as a constant (stop-gradient)."""
    return 2.0 - 2.0 * (F.normalize(p, dim=-1) * F.normalize(z.detach(), dim=-1)).sum(dim=-1)


def byol_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Symmetric BYOL loss: mean over the batch of l(p1, z2) + l(p2, z1); in [0, 8]."""
    return (regression_loss(p1, z2) + regression_loss(p2, z1)).mean()


# ---------------------------------------------------------------- InfoNCE (MoCo, DenseCL, CGH)


def info_nce_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """[q.k, q.queue] / T, shape (N, 1 + K); q, k (N, d) normalised, queue (d, K)."""
    l_pos = (q * k.detach()).sum(dim=1, keepdim=True)
    l_neg = q @ queue.detach()
    return torch.cat([l_pos, l_neg], dim=1) / temperature


def info_nce_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over the batch of -log softmax(logits)[0]: the positive key is class 0."""
    logits = info_nce_logits(q, k, queue, temperature)
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))


def dense_info_nce(q_grid: torch.Tensor, k_matched: torch.Tensor, queue: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """InfoNCE over all N * S query positions; q_grid, k_matched (N, D, S) normalised, queue (D, K)."""
    q = q_grid.permute(0, 2, 1).reshape(-1, q_grid.shape[1])
    k = k_matched.permute(0, 2, 1).reshape(-1, k_matched.shape[1])
    return info_nce_loss(q, k, queue, temperature)


# ---------------------------------------------------------------- relations (CGH)


def relation(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """An instance relation: softmax over the queue entries of similarity / T (rows sum to 1)."""
    return F.softmax(logits / temperature, dim=1)


def relation_ce(teacher_logits: torch.Tensor, student_logits: torch.Tensor, t_teacher: float,
                t_student: float) -> torch.Tensor:
    """Mean over the batch of -sum_j p_j log r_j, p = teacher relation (constant), r = student's."""
    p = relation(teacher_logits.detach(), t_teacher)
    return -(p * F.log_softmax(student_logits / t_student, dim=1)).sum(dim=1).mean()


# ---------------------------------------------------------------- swapped prediction (SwAV family)


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iters: int = 3) -> torch.Tensor:
    """SwAV's distributed Sinkhorn-Knopp: soft codes (B_loc, K) of scores (B_loc, K).

    fp32 with autocast off. Prototype marginals are summed across ranks, so the rows of all
    ranks form one transport problem with B = B_loc * world size samples. Each returned row sums
    to exactly 1 (the last step normalises per sample); the prototype marginals approach 1/K of
    the mass as `iters` grows. A global shift of the scores (and a per-prototype one) leaves the
    result unchanged; the global max is subtracted first so exp cannot overflow.
    """
    with torch.autocast(scores.device.type, enabled=False):
        s = scores.detach().float()
        shift = s.max()
        if world_size() > 1:
            dist.all_reduce(shift, op=dist.ReduceOp.MAX)
        Q = torch.exp((s - shift) / epsilon).t()  # K x B_loc
        K, n = Q.shape
        B = n * world_size()
        tiny = torch.finfo(Q.dtype).tiny
        Q /= all_reduce_sum(Q.sum()).clamp_min(tiny)
        for _ in range(iters):
            Q /= all_reduce_sum(Q.sum(dim=1, keepdim=True)).clamp_min(tiny)  # per-prototype mass
            Q /= K
            Q /= Q.sum(dim=0, keepdim=True).clamp_min(tiny)  # per-sample mass (local)
            Q /= B
        return (Q * B).t()


def sinkhorn_codes(scores: torch.Tensor, queue_scores: torch.Tensor | None = None, epsilon: float = 0.05,
                   iters: int = 3) -> torch.Tensor:
    """Codes of `scores`' rows; `queue_scores` rows join the transport problem and are dropped."""
    s = scores if queue_scores is None else torch.cat([queue_scores.to(scores.dtype), scores])
    return sinkhorn(s, epsilon, iters)[-scores.shape[0]:]


def cross_entropy_to_codes(codes: torch.Tensor, scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """-mean_rows sum_k q[k] log softmax(scores / T)[k], in fp32; codes are constants."""
    return -(codes.detach() * F.log_softmax(scores.float() / temperature, dim=-1)).sum(dim=-1).mean()


def swapped_prediction_loss(codes: list[torch.Tensor], scores: list[torch.Tensor], assign: tuple[int, ...],
                            temperature: float) -> torch.Tensor:
    """SwAV's loss: codes[i] is the code of crop assign[i]; scores[v] the cosines of crop v.

    L = mean_i (1 / (V - 1)) sum_{v != assign[i]} CE(codes[i], softmax(scores[v] / T)).
    """
    V = len(scores)
    total = scores[0].new_zeros((), dtype=torch.float32)
    for q, a in zip(codes, assign):
        sub = sum(cross_entropy_to_codes(q, scores[v], temperature) for v in range(V) if v != a)
        total = total + sub / (V - 1)
    return total / len(assign)


# ---------------------------------------------------------------- pixel consistency (PixPro, PixContrast)


def pixel_consistency(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """-2 * mean over images of the mean cosine over positive pairs; 0 for an image without any.

    q: (B, C, N1) online pixels (normalised), k: (B, C, N2) target pixels (normalised, treated
    as constants), mask: (B, N1, N2) positives.
    """
    cos = torch.bmm(q.transpose(1, 2).float(), k.detach().float())  # (B, N1, N2)
    m = mask.float()
    per_image = (cos * m).sum((1, 2)) / (m.sum((1, 2)) + 1e-6)
    return -2.0 * per_image.mean()


def pixpro_loss(q1, q2, k1, k2, mask12, mask21=None) -> torch.Tensor:
    """Symmetric PixPro loss L_12 + L_21 in [-4, 4]; mask12 (B, N1, N2) view-1 x view-2 positives,
    mask21 the reverse ones (default: mask12 transposed; the video variant's differ)."""
    mask21 = mask12.transpose(1, 2) if mask21 is None else mask21
    return pixel_consistency(q1, k2, mask12) + pixel_consistency(q2, k1, mask21)


def pixcontrast_loss(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, tau: float,
                     negatives: str = "batch") -> torch.Tensor:
    """Pixel-level InfoNCE of view a's pixels against view b's, one direction.

    q: (B, C, N1) online pixels, k: (B, C, N2) target pixels (both normalised; k constant),
    mask: (B, N1, N2) positives. For pixel i of image b with at least one positive:
        l(i) = -log( sum_{j in Pos(i)} e^{<q_i,k_j>/tau} / sum_{j in Pos(i) or Neg(i)} e^{<q_i,k_j>/tau} )
    negatives="image": Neg(i) = the non-positive pixels of the other view of the same image
    (the paper's definition as the spec reads it); "batch": those plus every pixel of the other
    images' other views in the (local) batch. Pixels without positives are left out; the loss
    is the mean over an image's counted pixels (0 if none), then the mean over images.
    """
    B, _, N1 = q.shape
    N2 = k.shape[2]
    qf, kf = q.float(), k.detach().float()
    if negatives == "image":
        logits = torch.bmm(qf.transpose(1, 2), kf) / tau  # (B, N1, N2)
        pos = mask.bool()
    elif negatives == "batch":
        logits = torch.einsum("bci,dcj->bidj", qf, kf).reshape(B, N1, B * N2) / tau
        same = torch.eye(B, dtype=torch.bool, device=q.device)
        pos = (mask.bool()[:, :, None, :] & same[:, None, :, None]).reshape(B, N1, B * N2)
    else:
        raise ValueError(f"negatives must be 'batch' or 'image', got {negatives!r}")
    has_pos = pos.any(-1)  # (B, N1)
    # a large finite fill keeps the backward finite for rows without positives
    lse_pos = torch.logsumexp(logits.masked_fill(~pos, -1e4), dim=-1)
    lse_all = torch.logsumexp(logits, dim=-1)
    per_pixel = torch.where(has_pos, lse_all - lse_pos, torch.zeros_like(lse_all))
    per_image = per_pixel.sum(1) / (has_pos.sum(1) + 1e-6)
    return per_image.mean()


def instance_regression(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """-2 * mean cos(p, sg(z)) over the batch (PixPro's instance loss, one direction)."""
    return -2.0 * (F.normalize(p.float(), dim=1) * F.normalize(z.detach().float(), dim=1)).sum(1).mean()


# ---------------------------------------------------------------- collapse statistics (no gradient)


def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std of unit-norm embeddings (1/sqrt(d) when spread, 0 at collapse)."""
    return F.normalize(z.detach().float(), dim=-1).std(dim=0).mean()


def usage_entropy(scores: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the hard prototype usage argmax_k scores over the rows: 0 when every
    sample picks one prototype (collapse); at most ln min(rows, K). No host sync."""
    idx = scores.detach().argmax(dim=-1)
    counts = torch.zeros(scores.shape[-1], device=scores.device).scatter_add_(
        0, idx, torch.ones_like(idx, dtype=torch.float32))
    p = counts / idx.numel()
    return -torch.special.xlogy(p, p).sum()
