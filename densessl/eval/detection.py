"""Object-detection transfer: torchvision Faster R-CNN + FPN on the backbone, COCO AP.

``densessl eval detection CHECKPOINT|random [preset=NAME] [key=value ...]``

Model: the backbone's C2..C5 (torchvision key names; :class:`FPNBackbone` passes them to
torchvision's ``FeaturePyramidNetwork`` with a max-pool level on top, five levels), an RPN
with one anchor size per level (``anchor_sizes``) and three aspect ratios, ``MultiScaleRoIAlign``
(7x7, sampling ratio 2) over the four FPN maps, and a box head: ``2fc`` (torchvision's
TwoMLPHead, detectron2's default FPN head) or ``4conv1fc`` (detectron2's
``FastRCNNConvFCHead`` with norm, PixPro's FPN config). Everything is fine-tuned by default
(detectron2 ``FREEZE_AT 0``); ``freeze_at=k`` freezes the stem (k >= 1) and res2..res{k}
(k >= 2), with frozen BatchNorm there.

BatchNorm (``norm``): ``bn`` trains it with batch statistics (one process: what SyncBN gives
on one GPU), ``syncbn`` converts it to SyncBatchNorm when torch.distributed is initialised
(plain ``bn`` otherwise), ``frozen`` replaces it by FrozenBatchNorm2d (torchvision's default
for ImageNet-supervised backbones; a random-init backbone then has identity statistics).

Training: SGD (momentum 0.9, weight decay 1e-4), linear warm-up then step decay (x0.1 at
``steps``), horizontal flips, images resized by torchvision's transform (``min_size``,
``max_size``; a list of ``min_size`` values samples one per batch, as multi-scale training).
VOC "difficult" objects are trained on (as detectron2) and ignored by the metric; COCO crowd
regions are neither.

Metric: pycocotools COCOeval (bbox) on the validation split after the LAST iteration, against
a COCO object built in memory from the split (VOC difficult / COCO crowd objects enter as
``iscrowd=1``, i.e. ignored). Reported in percent like detectron2: AP (IoU .50:.95), AP50,
AP75, APs/APm/APl (-1 where a size range has no object). For VOC this is COCO-style AP, not
the VOC07 11-point AP of detectron2's PascalVOC evaluator.

Presets (``preset=``, files eval/presets/detection-NAME.yaml): ``scenes`` (the default values: Fashion-Scenes 64 px, resnet18_small,
a few CPU minutes), ``voc0712`` and ``coco-1x`` (paper-scale schedules, FPN variant; the
papers' VOC numbers use R50-C4 in detectron2: export with ``densessl export --to detectron2``
for those). See docs/interop.md.
"""
from __future__ import annotations

import contextlib
import io
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from densessl.config import ConfigError, require_extra
from densessl.data.augment import IMAGENET_MEAN, IMAGENET_STD
from densessl.eval.finetune import FinetuneConfig, FinetuneTask, eval_batches, fine_tune
from densessl.eval.transfer import autocast, transfer_config


# ---------------------------------------------------------------- model


class FPNBackbone(nn.Module):
    """A densessl backbone (C2..C5) + torchvision FPN; ``out_channels`` as torchvision expects."""

    def __init__(self, backbone: nn.Module, out_channels: int = 256, stages=("c2", "c3", "c4", "c5")):
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

        self.body = backbone
        self.stages = tuple(stages)
        self.fpn = FeaturePyramidNetwork([backbone.channels[s] for s in self.stages], out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.body(x, stages=self.stages)
        return self.fpn(OrderedDict((str(i), feats[s]) for i, s in enumerate(self.stages)))


def _frozen_copy(bn: nn.BatchNorm2d) -> nn.Module:
    from torchvision.ops.misc import FrozenBatchNorm2d

    frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
    frozen.weight.copy_(bn.weight.detach())
    frozen.bias.copy_(bn.bias.detach())
    frozen.running_mean.copy_(bn.running_mean)
    frozen.running_var.copy_(bn.running_var)
    return frozen


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d under ``module`` by a FrozenBatchNorm2d with its statistics."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, _frozen_copy(child))
        else:
            freeze_batchnorm(child)
    return module


def apply_freeze_at(backbone: nn.Module, freeze_at: int) -> None:
    """detectron2's FREEZE_AT: 0 nothing, 1 the stem, k >= 2 the stem and res2..res{k}
    (no gradient, frozen BatchNorm)."""
    if not 0 <= freeze_at <= 5:
        raise ConfigError(f"freeze_at must lie in 0..5, got {freeze_at}")
    if freeze_at >= 1:
        for p in list(backbone.conv1.parameters()) + list(backbone.bn1.parameters()):
            p.requires_grad_(False)
        if isinstance(backbone.bn1, nn.BatchNorm2d):
            backbone.bn1 = _frozen_copy(backbone.bn1)
    for i in range(1, freeze_at):
        layer = getattr(backbone, f"layer{i}")
        for p in layer.parameters():
            p.requires_grad_(False)
        freeze_batchnorm(layer)


def build_detector(backbone: nn.Module, num_classes: int, cfg: "DetectionConfig") -> nn.Module:
    """torchvision FasterRCNN (num_classes + background) on an FPN over the backbone."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    if cfg.norm == "frozen":
        freeze_batchnorm(backbone)
    elif cfg.norm == "syncbn":
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            backbone = nn.SyncBatchNorm.convert_sync_batchnorm(backbone)
    elif cfg.norm != "bn":
        raise ConfigError(f"norm={cfg.norm!r}; expected bn, syncbn or frozen")
    apply_freeze_at(backbone, cfg.freeze_at)
    body = FPNBackbone(backbone, cfg.fpn_channels)
    if len(cfg.anchor_sizes) != 5:
        raise ConfigError(f"anchor_sizes needs one size per FPN level (5: C2..C5 + pool), got {cfg.anchor_sizes}")
    anchors = AnchorGenerator(sizes=tuple((int(s),) for s in cfg.anchor_sizes),
                              aspect_ratios=(tuple(float(a) for a in cfg.aspect_ratios),) * 5)
    pooler = MultiScaleRoIAlign(featmap_names=["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    if cfg.box_head == "2fc":
        head = TwoMLPHead(cfg.fpn_channels * 49, cfg.representation_size)
    elif cfg.box_head == "4conv1fc":
        head = FastRCNNConvFCHead((cfg.fpn_channels, 7, 7), [cfg.fpn_channels] * 4, [cfg.representation_size],
                                  norm_layer=nn.BatchNorm2d)
    else:
        raise ConfigError(f"box_head={cfg.box_head!r}; expected 2fc or 4conv1fc")
    return FasterRCNN(
        body, num_classes=None, min_size=tuple(int(s) for s in cfg.min_size),
        max_size=int(cfg.max_size), image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
        rpn_anchor_generator=anchors, box_roi_pool=pooler, box_head=head,
        box_predictor=FastRCNNPredictor(cfg.representation_size, num_classes + 1),
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n[0], rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n[1],
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n[0], rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n[1],
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_score_thresh=cfg.score_thresh, box_detections_per_img=cfg.detections_per_img,
    )


# ---------------------------------------------------------------- config


@dataclass
class DetectionConfig(FinetuneConfig):  # + data, model, preset, the SGD schedule, logging (finetune.py)
    norm: str = "bn"  # bn | syncbn | frozen
    freeze_at: int = 0  # detectron2 FREEZE_AT
    fpn_channels: int = 64
    anchor_sizes: list[int] = field(default_factory=lambda: [8, 16, 32, 48, 64])  # per level C2..C5, pool
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    min_size: list[int] = field(default_factory=lambda: [64])  # shorter side after resizing (list: multi-scale)
    max_size: int = 64
    box_head: str = "2fc"  # 2fc | 4conv1fc
    representation_size: int = 256
    rpn_pre_nms_top_n: list[int] = field(default_factory=lambda: [1000, 500])  # train, test (per level)
    rpn_post_nms_top_n: list[int] = field(default_factory=lambda: [500, 300])  # train, test
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 128
    score_thresh: float = 0.05
    detections_per_img: int = 100
    iterations: int = 800  # scenes: about 0.5 s per iteration on one busy CPU core (batch 8, 64 px, width 32)
    batch_size: int = 8
    lr: float = 0.01  # detectron2's 0.02 at batch 16, scaled linearly
    warmup_iters: int = 50
    warmup_factor: float = 0.001
    steps: list[int] = field(default_factory=lambda: [600, 740])  # lr x gamma at these iterations
    gamma: float = 0.1
    clip_grad: Optional[float] = None


def detection_config(overrides: list[str]) -> DetectionConfig:
    """Defaults, the preset eval/presets/detection-NAME.yaml (preset=NAME), then the overrides."""
    return transfer_config(DetectionConfig, "detection", overrides)


# ---------------------------------------------------------------- data


def _train_target(item: dict, flip: bool) -> tuple[torch.Tensor, dict]:
    image = item["image"].float().div(255.0)
    keep = item["train_keep"]
    boxes = item["boxes"][keep].float()
    labels = item["classes"][keep].long() + 1
    ok = (boxes[:, 2] - boxes[:, 0] > 1e-3) & (boxes[:, 3] - boxes[:, 1] > 1e-3)
    boxes, labels = boxes[ok], labels[ok]
    if flip:
        w = image.shape[-1]
        image = image.flip(-1)
        boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
    return image, {"boxes": boxes.reshape(-1, 4), "labels": labels}


def coco_ground_truth(dataset, num_classes: int) -> dict:
    """A COCO-format dict of the split: image ids 1..N in dataset order, category ids 1..C;
    ``eval_ignore`` objects become ``iscrowd=1``."""
    images, anns = [], []
    for i in range(len(dataset)):
        s = dataset[i]
        h, w = s["image"].shape[-2:]
        images.append({"id": i + 1, "width": int(w), "height": int(h), "file_name": f"{i}"})
        for box, c, ign in zip(s["boxes"].tolist(), s["classes"].tolist(), s["eval_ignore"].tolist()):
            x1, y1, x2, y2 = box
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(c) + 1,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": int(ign)})
    return {"images": images, "annotations": anns,
            "categories": [{"id": k + 1, "name": str(k)} for k in range(num_classes)]}


def coco_box_ap(gt: dict, detections: list[dict]) -> dict:
    """COCOeval bbox on in-memory ground truth and detections; AP values in percent."""
    COCOeval = require_extra("pycocotools.cocoeval", "coco", "COCO-style box AP").COCOeval

    from densessl.data.coco import coco_from_dict

    names = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    if not detections:
        return {**{k: 0.0 for k in names}, "num_detections": 0, "summary": "no detections"}
    coco_gt = coco_from_dict(gt)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        coco_dt = coco_gt.loadRes(detections)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [float(v) for v in ev.stats[:6]]
    out = {k: (100.0 * v if v >= 0 else -1.0) for k, v in zip(names, stats)}
    out["num_detections"] = len(detections)
    out["summary"] = buf.getvalue().strip().splitlines()[-12:]
    return out


# ---------------------------------------------------------------- protocol


class DetectionTask(FinetuneTask):
    """Faster R-CNN + FPN: torchvision's own losses (RPN and box head), step-decay lr."""

    name = "detection"
    collate = list

    def __init__(self, cfg: DetectionConfig):
        super().__init__(cfg)
        self.clip_grad = cfg.clip_grad

    def check(self) -> None:
        super().check()
        if len(self.cfg.rpn_pre_nms_top_n) != 2 or len(self.cfg.rpn_post_nms_top_n) != 2:
            raise ConfigError("rpn_pre_nms_top_n and rpn_post_nms_top_n are [train, test] pairs")

    def build(self, backbone, num_classes):
        model = build_detector(backbone, num_classes, self.cfg)
        return model, [{"params": [p for p in model.parameters() if p.requires_grad], "lr_mult": 1.0}]

    def transform(self, item, gen):
        return _train_target(item, self.cfg.flip and bool(torch.rand((), generator=gen) < 0.5))

    def loss(self, model, batch, device):
        images = [image.to(device, non_blocking=True) for image, _ in batch]
        targets = [{k: v.to(device, non_blocking=True) for k, v in target.items()} for _, target in batch]
        with autocast(device, self.cfg.precision):
            loss_dict = model(images, targets)
        return sum(v.float() for v in loss_dict.values()), loss_dict

    def lr_at(self, it: int) -> float:
        """detectron2's WarmupMultiStepLR: x gamma at each of ``steps``, linear warm-up from warmup_factor."""
        cfg = self.cfg
        lr = cfg.lr * cfg.gamma ** sum(it >= s for s in cfg.steps)
        if it < cfg.warmup_iters:
            alpha = it / cfg.warmup_iters
            lr *= cfg.warmup_factor * (1 - alpha) + alpha
        return lr

    def evaluate(self, model, dataset, classes, device):
        return evaluate_detection(model, dataset, len(classes), device, self.cfg)

    def settings(self, classes):
        return {"classes": list(classes), "metric": "COCO bbox AP (pycocotools) after the last iteration, percent"}

    def summary(self, r):
        return (f"AP {r['AP']:.2f}  AP50 {r['AP50']:.2f}  AP75 {r['AP75']:.2f}  "
                f"(Faster R-CNN FPN, {self.cfg.iterations} iterations, last iteration)")


def run_detection(spec: str, cfg: DetectionConfig, log=print) -> dict:
    """Fine-tune the detector from ``spec`` and return the metrics dict."""
    return fine_tune(spec, DetectionTask(cfg), log)


@torch.no_grad()
def evaluate_detection(model: nn.Module, dataset, num_classes: int, device, cfg) -> dict:
    model.eval()
    detections = []
    for idx in eval_batches(dataset, cfg.eval_batch_size):
        images = [dataset[i]["image"].float().div(255.0).to(device) for i in idx]
        with autocast(device, cfg.precision):
            outputs = model(images)
        for i, out in zip(idx, outputs):
            for box, score, label in zip(out["boxes"].float().cpu().tolist(), out["scores"].float().cpu().tolist(),
                                         out["labels"].cpu().tolist()):
                x1, y1, x2, y2 = box
                detections.append({"image_id": i + 1, "category_id": int(label), "bbox": [x1, y1, x2 - x1, y2 - y1],
                                   "score": float(score)})
    model.train()
    return coco_box_ap(coco_ground_truth(dataset, num_classes), detections)
