"""GAELLE (Chen and Yeh, ICMR 2024): global context and local attention for multi-label SSL.

Faithful to chunyen5927/GAELLE @ fe2e8fb (specs/methods-swav-ssprl-gaelle.md, section 3):
- global branch: SwAV unchanged (densessl/methods/swav.py) over every crop, with its queue;
- semantic attention, on the C5 maps of the two assignment crops only (the 224-px views):
  the *global* projection head is applied at every spatial position (one call per position, so
  its BN takes per-position batch statistics over both views, as the code's loop does), each
  position's D-vector is L2-normalised, divided by `attn_temperature` (1.0 in the code) and
  softmaxed over the N positions: D attention maps. The D maps and the C channels are split into
  `groups` groups; token j's group-g part is F_g a_{g T + j}: T = D / groups tokens of C channels
  per image and view;
- local head (C -> hidden -> local_dim, L2 norm) and local prototypes (K_l); L_local: for each
  assignment view a, Sinkhorn codes over all B x T tokens of view a; the other view's tokens
  predict them, with the token slots permuted by one random permutation shared by the batch
  (`token_shuffle`, redrawn for each a and step: set-level rather than slot-level consistency);
- cross-view term L_l2g: the normalised mean of a view's token embeddings, through
  `l2g_prototypes` (Linear(local_dim -> K_global), rows normalised), predicts the global codes of
  both views; averaged over codes and views. `cross_view_detach: true` is the code: its input is
  detached, so only `l2g_prototypes` learns from it and the term cannot change the backbone;
  `false` (default) lets it train the backbone, attention and local head as the paper describes;
- L = w_glb L_glb + w_local L_local + w_l2g L_l2g, weights 1/3 each (the code's mean; its
  `--alpha` is never used); the three prototype banks are re-normalised before each forward
  and frozen together for `freeze_prototypes_iters`.

`attn_source` and `l2g_input` default to the code's choices (the global head at every position;
the token embeddings); `own_head` and `scores` are the alternatives the spec asks to expose.

The local queue (`local_queue_length`, 0 in the released command) is scored with the local
prototypes; the code's bug of scoring it with the global prototypes is not reproduced.
The token permutation comes from a generator seeded by (shuffle_seed, step, view), identical
on every rank.

Distributed: as SwAV: Sinkhorn marginals all-reduced (global codes over all ranks' images, local
codes over all ranks' tokens); queues hold the gathered global rows (`concat_all_gather`: the
assignment crops' z for the global queue; every token's local embedding, image-major, for the
local queue), and each rank scores its 1/W share in Sinkhorn.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from densessl.common.distributed import world_size
from densessl.methods import register
from densessl.methods.base import forward_by_resolution
from densessl.methods.losses import (cross_entropy_to_codes, embedding_std, sinkhorn_codes, swapped_prediction_loss,
                                    usage_entropy)
from densessl.methods.prototypes import EmbeddingQueue, PrototypeMethod, device_scalar, prototypes, queue_scores
from densessl.models.heads import mlp


ATTN_SOURCES = ("global_head", "own_head")
L2G_INPUTS = ("embeddings", "scores")


@dataclass
class GAELLEConfig:
    name: str = "gaelle"
    proj_hidden_dim: int = 2048
    proj_dim: int = 128  # D: also the number of attention maps
    num_prototypes: int = 3000
    local_hidden_dim: int = 2048
    local_dim: int = 128
    num_local_prototypes: int = 3000
    groups: int = 4  # G (`nmb_groups_heads`): T = proj_dim / groups tokens per image and view
    attn_temperature: float = 1.0
    token_shuffle: bool = True
    cross_view_detach: bool = False  # true: the code (the cross-view term trains l2g_prototypes only)
    loss_weights: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)  # L_glb, L_local, L_l2g
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iters: int = 3
    crops_for_assign: tuple[int, ...] = (0, 1)
    freeze_prototypes_iters: int = 5005
    queue_length: int = 3840
    local_queue_length: int = 0  # tokens per view; 0: none (the released command)
    epoch_queue_starts: int = 7
    shuffle_seed: int = 0
    # the head run at every position for the attention maps: global_head (the code) | own_head (a
    # separate head of the same shape, so the global head's BN sees no per-position calls)
    attn_source: str = "global_head"
    # the cross-view term's input, per view: the mean of the token embeddings (the code) | scores:
    # the mean of the tokens' cosines to the local prototypes (SS-PRL's correlation learner)
    l2g_input: str = "embeddings"

    def __post_init__(self):
        from densessl.config import ConfigError

        if self.attn_source not in ATTN_SOURCES:
            raise ConfigError(f"key 'method.attn_source' expects one of {', '.join(ATTN_SOURCES)}, "
                              f"got {self.attn_source!r}")
        if self.l2g_input not in L2G_INPUTS:
            raise ConfigError(f"key 'method.l2g_input' expects one of {', '.join(L2G_INPUTS)}, got {self.l2g_input!r}")


# ---------------------------------------------------------------- attention (pure functions)


def head_per_position(head: nn.Module, fmap: torch.Tensor) -> torch.Tensor:
    """Apply `head` at every position of fmap (n, C, h, w), one call per position (its BN takes
    per-position batch statistics over the n maps): (n, h * w, out)."""
    x = fmap.flatten(2)
    return torch.stack([head(x[:, :, p]) for p in range(x.shape[-1])], dim=1)


def attention_maps(proj: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """proj (n, N, D) -> D attention maps over the N positions, (n, N, D), each summing to 1."""
    return torch.softmax(F.normalize(proj.float(), dim=-1) / temperature, dim=1)


def group_tokens(feats: torch.Tensor, attn: torch.Tensor, groups: int) -> torch.Tensor:
    """feats (n, C, N), attn (n, N, D) -> tokens (n, T, C) with T = D / groups: the group-g
    channels of token j are feats_g @ attn[:, :, g T + j]."""
    n, C, N = feats.shape
    D = attn.shape[-1]
    T = D // groups
    fg = feats.reshape(n, groups, C // groups, N)
    ag = attn.to(feats.dtype).reshape(n, N, groups, T)
    return torch.einsum("bgcn,bngt->btgc", fg, ag).reshape(n, T, C)


def attention_entropy(attn: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the attention maps over positions; ln N when uniform."""
    a = attn.detach().float()
    return -torch.special.xlogy(a, a).sum(dim=1).mean()


def shuffled_token_loss(codes: torch.Tensor, pred: torch.Tensor, perm: torch.Tensor | None,
                        temperature: float) -> torch.Tensor:
    """codes (B, T, K) of view a; pred (B, T, K) scores of view b: token j's code is predicted by
    token perm[j] of the same image (perm None: slot to slot)."""
    if perm is not None:
        pred = pred[:, perm]
    K = codes.shape[-1]
    return cross_entropy_to_codes(codes.reshape(-1, K), pred.reshape(-1, K), temperature)


def cross_view_loss(token_z: torch.Tensor, learner: nn.Linear, global_codes: list[torch.Tensor],
                    temperature: float, detach: bool) -> torch.Tensor:
    """L_l2g: token_z (V, B, T, d) per-token inputs (unit embeddings, or local-prototype scores
    with `l2g_input: scores`); each view's normalised token mean, through the learner, predicts
    every global code; averaged over codes and views."""
    u = F.normalize(token_z.mean(dim=2), dim=-1)
    if detach:
        u = u.detach()
    total = token_z.new_zeros((), dtype=torch.float32)
    for v in range(u.shape[0]):
        logits = learner(u[v])
        for q in global_codes:
            total = total + cross_entropy_to_codes(q, logits, temperature)
    return total / (u.shape[0] * len(global_codes))


@register("gaelle", GAELLEConfig)
class GAELLE(PrototypeMethod):
    def __init__(self, cfg: GAELLEConfig, backbone):
        super().__init__(cfg, backbone)
        C = backbone.out_dim
        if cfg.groups < 1 or cfg.proj_dim % cfg.groups or C % cfg.groups:
            raise ValueError(f"method.groups={cfg.groups} must divide method.proj_dim={cfg.proj_dim} (attention maps) "
                             f"and the backbone's {C} channels")
        if len(cfg.crops_for_assign) != 2:
            raise ValueError(f"method.crops_for_assign={list(cfg.crops_for_assign)}: GAELLE pairs the tokens of "
                             f"exactly two views")
        self.projector = mlp(C, cfg.proj_hidden_dim, cfg.proj_dim)
        self.prototypes = prototypes(cfg.proj_dim, cfg.num_prototypes)
        self.local_head = mlp(C, cfg.local_hidden_dim, cfg.local_dim)
        self.local_prototypes = prototypes(cfg.local_dim, cfg.num_local_prototypes)
        l2g_in = cfg.local_dim if cfg.l2g_input == "embeddings" else cfg.num_local_prototypes
        self.l2g_prototypes = prototypes(l2g_in, cfg.num_prototypes)
        self.queue = EmbeddingQueue(2, cfg.queue_length, cfg.proj_dim) if cfg.queue_length > 0 else None
        self.local_queue = EmbeddingQueue(2, cfg.local_queue_length, cfg.local_dim) \
            if cfg.local_queue_length > 0 else None
        # built last, so the default's modules draw the same random init as before
        self.attn_head = mlp(C, cfg.proj_hidden_dim, cfg.proj_dim) if cfg.attn_source == "own_head" else None

    @property
    def tokens(self) -> int:
        return self.cfg.proj_dim // self.cfg.groups

    def prototype_layers(self):
        return [self.prototypes, self.local_prototypes, self.l2g_prototypes]

    def _c5(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x, stages=("c5",))["c5"]

    def _perm(self, a: int, device) -> torch.Tensor | None:
        if not self.cfg.token_shuffle:
            return None
        gen = torch.Generator(device=device)
        gen.manual_seed((self.cfg.shuffle_seed * 1_000_003 + self.current_step) * 2 + a)
        return torch.randperm(self.tokens, generator=gen, device=device)

    def _queue_len(self, queue, B: int, key: str, value: int) -> int:
        if queue is None or not self.queue_started():
            return 0
        L = queue.usable_length(B * world_size())
        if L == 0:
            raise ValueError(f"method.{key}={value} is shorter than the global batch {B * world_size()}: "
                             f"the queue would never be used; raise it or set it to 0")
        return L

    def terms(self, views: list[torch.Tensor]) -> dict:
        """Loss terms (with their graphs) and statistics; `forward` weighs and detaches them."""
        cfg = self.cfg
        self.check_views(views, len(views), "GAELLE")
        self.normalize_prototypes_()
        B = views[0].shape[0]
        maps = forward_by_resolution(self._c5, views)
        pooled = [m.mean(dim=(2, 3)) for m in maps]

        # global branch: SwAV over every crop
        z = self.embed(self.projector, torch.cat(pooled))
        scores = self.prototypes(z).float().split(B)
        zs = z.split(B)
        L_glob = self._queue_len(self.queue, B, "queue_length", cfg.queue_length)
        codes, used = [], False
        for i, a in enumerate(cfg.crops_for_assign):
            extra = None
            if self.queue is not None and self.queue.is_full(i, L_glob):
                extra, used = queue_scores(self.queue, i, L_glob, self.prototypes), True
            codes.append(sinkhorn_codes(scores[a], extra, cfg.epsilon, cfg.sinkhorn_iters))
        if L_glob:
            for i, a in enumerate(cfg.crops_for_assign):
                self.queue.push(i, zs[a], L_glob)

        # semantic attention on the two assignment views -> T tokens each
        fmap = torch.cat([maps[a] for a in cfg.crops_for_assign])  # (2B, C, h, w)
        attn_head = self.projector if cfg.attn_source == "global_head" else self.attn_head
        attn = attention_maps(head_per_position(attn_head, fmap), cfg.attn_temperature)
        tok = group_tokens(fmap.flatten(2), attn, cfg.groups)  # (2B, T, C)
        T = tok.shape[1]
        zl = self.embed(self.local_head, tok.reshape(2 * B * T, -1))
        sl = self.local_prototypes(zl).float().view(2, B, T, -1)
        zl = zl.view(2, B, T, -1)

        L_loc = self._queue_len(self.local_queue, B, "local_queue_length", cfg.local_queue_length)
        local = sl.new_zeros((), dtype=torch.float32)
        for a in range(2):
            extra = None
            if self.local_queue is not None and self.local_queue.is_full(a, L_loc):
                extra = queue_scores(self.local_queue, a, L_loc, self.local_prototypes)
            q = sinkhorn_codes(sl[a].reshape(B * T, -1), extra, cfg.epsilon, cfg.sinkhorn_iters).view(B, T, -1)
            local = local + shuffled_token_loss(q, sl[1 - a], self._perm(a, sl.device), cfg.temperature)
        if L_loc:
            for a in range(2):
                self.local_queue.push(a, zl[a].reshape(B * T, -1), L_loc)

        return {
            "glb": swapped_prediction_loss(codes, list(scores), cfg.crops_for_assign, cfg.temperature),
            "local": local / 2,
            "l2g": cross_view_loss(zl if cfg.l2g_input == "embeddings" else sl, self.l2g_prototypes, codes,
                                   cfg.temperature, cfg.cross_view_detach),
            "usage_entropy": usage_entropy(scores[cfg.crops_for_assign[0]]),
            "usage_entropy_local": usage_entropy(sl[0].reshape(B * T, -1)),
            "attn_entropy": attention_entropy(attn),
            "z_std": embedding_std(zs[0]),
            "queue_used": device_scalar(used, z),
            "features": pooled[0],
        }

    def forward(self, views, batch):
        w = self.cfg.loss_weights
        t = self.terms(views)
        out = {k: v.detach() for k, v in t.items()}
        out["loss"] = w[0] * t["glb"] + w[1] * t["local"] + w[2] * t["l2g"]
        return out
