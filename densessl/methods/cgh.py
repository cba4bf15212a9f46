"""CGH (Gao et al., WACV 2024): cross-context distillation between global and hypercolumn embeddings.

Follows `zaczgao/Cross-Context_Learning` (specs, section 4):
- student = backbone + global head (GAP -> Linear(D, 4096) -> ReLU -> Linear(4096, 512)) +
  FeatDistiller on the hypercolumn; teacher = EMA copy of all three (m = 0.999 constant,
  updated before the teacher pass, as MoCo: see momentum.py), run with shuffle-BN (see moco.py);
- hypercolumn: the maps of `hyper_stages` (layer3 + layer4 = c4 + c5 by default) resized
  bilinearly (align_corners=False) to `hyper_size` (default: the size of the last listed
  stage, i.e. c4 is downsampled to c5's grid, as the code does) and concatenated on channels;
  FeatDistiller = 1x1 conv (no bias) -> BN -> ReLU -> GAP -> Linear -> ReLU -> Linear, 512-d;
- view 0 (the recipe's first group, the weak view) goes to the teacher, view 1 (strong) to the
  student; one direction only;
- relations (ReSSL-style, no positive): a = e . queue_global, h = e_h . queue_hyper, for the
  student (q, q_h) and the teacher (k, k_h). Two cross-context terms, CE(p, log r) =
  -sum p log r averaged over the batch, teacher detached:
    cl_hyper (global -> hyper): CE(softmax(a_k / 0.04), log_softmax(h_q / 0.08))
    csist    (hyper -> global): CE(softmax(h_k / 0.08), log_softmax(a_q / 0.1))
  The config file of the official code declares 0.08 for teacher and student, but the loss mixes
  those with hard-coded ReSSL values; the defaults are the *effective* pairs of the code
  (`temp_*` keys; set all four to 0.08 for the declared values);
- warm-up: MoCo InfoNCE on both contexts (T = 0.2), faded out over `warmup_loss_epochs` (5):
  with alpha = step / (5 * steps_per_epoch), weights (cl, cl_hyper, csist) = (1 - alpha,
  alpha / 2, alpha / 2), then (0, 0.5, 0.5); the InfoNCE logits are built only while its weight
  is positive;
- two queues (K = 131072 at paper scale) of the teacher's k and k_h, written from the same
  gathered global batch at one shared pointer, so column j is the same image in both.

The online probe's features are the student backbone's pooled C5 of the strong view (view 1):
the student never sees view 0, and an extra pass only for the probe is not worth its cost.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from densessl.common.errors import ConfigError
from densessl.methods import register
from densessl.methods.losses import embedding_std, info_nce_loss, relation_ce
from densessl.methods.momentum import KeyQueue, MomentumContrast, make_target, no_autocast
from densessl.models.backbones import STAGES
from densessl.models.heads import mlp


@dataclass
class CGHConfig:
    name: str = "cgh"
    proj_hidden_dim: int = 4096
    proj_dim: int = 512
    hyper_stages: tuple[str, ...] = ("c4", "c5")
    hyper_size: Optional[int] = None  # side of the hypercolumn grid; None: the last listed stage's size
    distill_dim: Optional[int] = None  # FeatDistiller's 1x1 conv width; None: the backbone's C5 channels
    queue_size: int = 131072
    momentum: float = 0.999
    momentum_schedule: str = "const"  # const | cosine (from `momentum` to `momentum_end`)
    momentum_end: float = 1.0
    temp_teacher_g2h: float = 0.04  # teacher global relation -> student hypercolumn relation
    temp_student_g2h: float = 0.08
    temp_teacher_h2g: float = 0.08  # teacher hypercolumn relation -> student global relation
    temp_student_h2g: float = 0.1
    temp_infonce: float = 0.2  # the warm-up InfoNCE
    warmup_loss_epochs: float = 5.0
    # cross: CGH (each context's student learns the other context's teacher relation); within:
    # the ablation of specs claim C7 (each learns its own context's, i.e. ReSSL on each head)
    relation_targets: str = "cross"
    shuffle_bn: bool = True
    bn_splits: int = 8  # one process: BN groups per batch (see momentum.SplitBatchNorm2d); 1 = off


# ---------------------------------------------------------------- pure functions


def hypercolumn(maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Resize every (B, C_i, h_i, w_i) map bilinearly to `size` and concatenate on channels."""
    out = [m if tuple(m.shape[-2:]) == tuple(size)
           else F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps]
    return torch.cat(out, dim=1)


def cgh_weights(step: int, steps_per_epoch: int, warmup_epochs: float) -> tuple[float, float, float]:
    """Weights of (InfoNCE, cl_hyper, csist) at `step`: the InfoNCE fades out over the warm-up."""
    warm = warmup_epochs * steps_per_epoch
    alpha = 1.0 if step >= warm else step / warm
    return 1.0 - alpha, 0.5 * alpha, 0.5 * alpha


def cgh_losses(q, q_h, k, k_h, queue_g, queue_h, cfg: CGHConfig, w_cl: float) -> dict:
    """The three terms from normalised student (q, q_h) and teacher (k, k_h) embeddings.

    cl_hyper trains the hypercolumn student, csist the global one; each term keeps its
    temperatures when `relation_targets="within"` swaps the teacher relations."""
    a_q, a_k = q @ queue_g, k.detach() @ queue_g
    h_q, h_k = q_h @ queue_h, k_h.detach() @ queue_h
    target_h, target_g = (a_k, h_k) if cfg.relation_targets == "cross" else (h_k, a_k)
    out = {
        "cl_hyper": relation_ce(target_h, h_q, cfg.temp_teacher_g2h, cfg.temp_student_g2h),
        "csist": relation_ce(target_g, a_q, cfg.temp_teacher_h2g, cfg.temp_student_h2g),
    }
    with torch.no_grad():  # collapse statistic: entropy = CE of the teacher relation with itself, ln K at worst
        out["teacher_entropy"] = relation_ce(a_k, a_k, cfg.temp_teacher_g2h, cfg.temp_teacher_g2h)
    if w_cl > 0:
        out["cl"] = (info_nce_loss(q, k, queue_g, cfg.temp_infonce)
                     + info_nce_loss(q_h, k_h, queue_h, cfg.temp_infonce))
    return out


class FeatDistiller(nn.Module):
    """Hypercolumn -> embedding: 1x1 conv (no bias) -> BN -> ReLU -> GAP -> Linear -> ReLU -> Linear."""

    def __init__(self, in_dim: int, distill_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_dim, distill_dim, 1, bias=False), nn.BatchNorm2d(distill_dim),
                                    nn.ReLU(inplace=True))
        self.mlp = mlp(distill_dim, hidden_dim, out_dim, batch_norm=False)

    def forward(self, x):
        return self.mlp(self.reduce(x).mean(dim=(2, 3)))


@register("cgh", CGHConfig)
class CGH(MomentumContrast):
    def __init__(self, cfg: CGHConfig, backbone):
        if cfg.relation_targets not in ("cross", "within"):
            raise ConfigError(f"method.relation_targets={cfg.relation_targets!r}: expected 'cross' (CGH) or 'within' "
                             f"(each context distils its own relation, the ablation of the cross-context design)")
        bad = [s for s in cfg.hyper_stages if s not in STAGES]
        if not cfg.hyper_stages or bad:
            raise ConfigError(f"method.hyper_stages={list(cfg.hyper_stages)}: expected a non-empty list of {list(STAGES)}")
        super().__init__(cfg, backbone)
        self.stages = tuple(sorted(set(cfg.hyper_stages) | {"c5"}))
        in_dim = sum(backbone.channels[s] for s in cfg.hyper_stages)
        self.head = mlp(backbone.out_dim, cfg.proj_hidden_dim, cfg.proj_dim, batch_norm=False)
        self.distiller = FeatDistiller(in_dim, cfg.distill_dim or backbone.out_dim, cfg.proj_hidden_dim, cfg.proj_dim)
        self.key_backbone = make_target(backbone)
        self.key_head = make_target(self.head)
        self.key_distiller = make_target(self.distiller)
        self.queue = KeyQueue(cfg.queue_size, {"global": cfg.proj_dim, "hyper": cfg.proj_dim})

    def momentum_pairs(self):
        return [(self.key_backbone, self.backbone), (self.key_head, self.head), (self.key_distiller, self.distiller)]

    def _hyper_size(self, feats: dict) -> tuple[int, int]:
        if self.cfg.hyper_size is not None:
            return (self.cfg.hyper_size, self.cfg.hyper_size)
        return tuple(feats[self.cfg.hyper_stages[-1]].shape[-2:])

    def embed(self, backbone, head, distiller, x):
        """(pooled C5, global embedding, hypercolumn embedding), the embeddings L2-normalised."""
        feats = backbone(x, stages=self.stages)
        h = feats["c5"].mean(dim=(2, 3))
        hyper = hypercolumn([feats[s] for s in self.cfg.hyper_stages], self._hyper_size(feats))
        return h, F.normalize(head(h), dim=1), F.normalize(distiller(hyper), dim=1)

    def _teacher(self, x):
        _, k, k_h = self.embed(self.key_backbone, self.key_head, self.key_distiller, x)
        return k, k_h

    def forward(self, views, batch):
        if len(views) != 2:
            raise ConfigError(f"CGH takes exactly 2 views (weak for the teacher, strong for the student), "
                             f"the recipe gives {len(views)}")
        weak, strong = views
        h, q, q_h = self.embed(self.backbone, self.head, self.distiller, strong)
        k, k_h = self.key_forward(self._teacher, weak)
        w_cl, w_hyper, w_csist = cgh_weights(self.current_step, self.steps_per_epoch, self.cfg.warmup_loss_epochs)
        queue_g, queue_h = self.queue["global"].clone(), self.queue["hyper"].clone()  # enqueue writes in place
        with no_autocast(q.device):
            terms = cgh_losses(q.float(), q_h.float(), k.float(), k_h.float(), queue_g, queue_h, self.cfg, w_cl)
            loss = w_hyper * terms["cl_hyper"] + w_csist * terms["csist"]
            if "cl" in terms:
                loss = loss + w_cl * terms["cl"]
        self.queue.enqueue(**{"global": k, "hyper": k_h})
        out = {"loss": loss, "features": h.detach()}
        out.update({name: v.detach() for name, v in terms.items()})
        out["w_cl"] = loss.detach().new_full((), w_cl)
        out["z_std"] = embedding_std(q.detach())  # collapse statistic: 0 when collapsed
        return out
