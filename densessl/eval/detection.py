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

Presets (``preset=``): ``scenes`` (the default values: Fashion-Scenes 64 px, resnet18_small,
a few CPU minutes), ``voc0712`` and ``coco-1x`` (paper-scale schedules, FPN variant; the
papers' VOC numbers use R50-C4 in detectron2: export with ``densessl export --to detectron2``
for those). See docs/interop.md.
"""
from __future__ import annotations

import contextlib
import io
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch import nn

from densessl.config import ConfigError, EvalBackboneConfig, ModelConfig, require_extra
from densessl.data.augment import IMAGENET_MEAN, IMAGENET_STD
from densessl.eval.transfer import (SampleStream, TransferData, autocast, build_task_dataset, load_backbone_spec,
                                    pick_device, stream_loader, transfer_config)


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
class DetectionConfig(EvalBackboneConfig):  # + model, seed, random_init_seed (every protocol's keys)
    data: TransferData = field(default_factory=TransferData)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(backbone="resnet18_small", width=32))
    preset: Optional[str] = None
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
    momentum: float = 0.9
    weight_decay: float = 1.0e-4
    warmup_iters: int = 50
    warmup_factor: float = 0.001
    steps: list[int] = field(default_factory=lambda: [600, 740])  # lr x gamma at these iterations
    gamma: float = 0.1
    flip: bool = True
    clip_grad: Optional[float] = None
    eval_batch_size: int = 32
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    log_every: int = 100
    out: Optional[str] = None


PRESETS: dict[str, dict] = {
    # the default values: Fashion-Scenes 64 px, resnet18_small (stride 2..16 + pool), anchors 8..64 px
    "scenes": {},
    # VOC07+12 trainval -> VOC07 test: detectron2's 24k schedule (steps 18k/22k, warm-up 100, batch 16,
    # lr 0.02), multi-scale 480..800 / 1333, torchvision-standard FPN anchors; SyncBN
    "voc0712": {"data": {"dataset": "voc", "train_split": "trainval", "val_split": "test", "num_workers": 8},
                "model": {"backbone": "resnet50", "width": None}, "norm": "syncbn", "fpn_channels": 256,
                "anchor_sizes": [32, 64, 128, 256, 512], "min_size": [480, 512, 544, 576, 608, 640, 672, 704, 736,
                                                                      768, 800],
                "max_size": 1333, "representation_size": 1024, "rpn_pre_nms_top_n": [2000, 1000],
                "rpn_post_nms_top_n": [2000, 1000], "box_batch_size_per_image": 512, "iterations": 24000,
                "batch_size": 16, "lr": 0.02, "warmup_iters": 100, "steps": [18000, 22000],
                "eval_batch_size": 8, "log_every": 20},
    # COCO 2017 train -> val, 1x: 90k iterations, steps 60k/80k, warm-up 1000, batch 16, lr 0.02,
    # 640..800 / 1333, 4conv1fc box head with norm (PixPro's FPN config); SyncBN
    "coco-1x": {"data": {"dataset": "coco", "train_split": "train2017", "val_split": "val2017", "num_workers": 8},
                "model": {"backbone": "resnet50", "width": None}, "norm": "syncbn", "fpn_channels": 256,
                "anchor_sizes": [32, 64, 128, 256, 512], "min_size": [640, 672, 704, 736, 768, 800],
                "max_size": 1333, "box_head": "4conv1fc", "representation_size": 1024,
                "rpn_pre_nms_top_n": [2000, 1000], "rpn_post_nms_top_n": [2000, 1000],
                "box_batch_size_per_image": 512, "iterations": 90000, "batch_size": 16, "lr": 0.02,
                "warmup_iters": 1000, "steps": [60000, 80000], "eval_batch_size": 8, "log_every": 20},
}


def detection_config(overrides: list[str]) -> DetectionConfig:
    return transfer_config(DetectionConfig, PRESETS, overrides)


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


class _TrainTransform:
    """Item -> (float image, target) with a horizontal flip drawn from the sample's generator."""

    def __init__(self, flip: bool):
        self.flip = flip

    def __call__(self, item, gen):
        return _train_target(item, self.flip and bool(torch.rand((), generator=gen) < 0.5))


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


def _lr_at(cfg: DetectionConfig, it: int) -> float:
    lr = cfg.lr * cfg.gamma ** sum(it >= s for s in cfg.steps)
    if it < cfg.warmup_iters:
        alpha = it / cfg.warmup_iters
        lr *= cfg.warmup_factor * (1 - alpha) + alpha
    return lr


def run_detection(spec: str, cfg: DetectionConfig, log=print) -> dict:
    """Fine-tune the detector from ``spec`` and return the metrics dict."""
    if cfg.iterations < 1 or cfg.batch_size < 1:
        raise ConfigError(f"need iterations >= 1 and batch_size >= 1; got {cfg.iterations}, {cfg.batch_size}")
    if len(cfg.rpn_pre_nms_top_n) != 2 or len(cfg.rpn_post_nms_top_n) != 2:
        raise ConfigError("rpn_pre_nms_top_n and rpn_post_nms_top_n are [train, test] pairs")
    t0 = time.perf_counter()
    device = pick_device(cfg.device)
    train_ds, classes = build_task_dataset(cfg.data, "train", "detection")
    val_ds, _ = build_task_dataset(cfg.data, "val", "detection")
    backbone, desc = load_backbone_spec(spec, cfg.model, cfg.init_seed())
    torch.manual_seed(cfg.seed)
    model = build_detector(backbone, len(classes), cfg).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    stream = SampleStream(train_ds, cfg.iterations * cfg.batch_size, cfg.seed, _TrainTransform(cfg.flip))
    batches = iter(stream_loader(stream, cfg.batch_size, cfg.data.num_workers, list))
    model.train()
    losses = []
    for it in range(cfg.iterations):
        lr = _lr_at(cfg, it)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = next(batches)
        images = [image.to(device, non_blocking=True) for image, _ in batch]
        targets = [{k: v.to(device, non_blocking=True) for k, v in target.items()} for _, target in batch]
        with autocast(device, cfg.precision):
            loss_dict = model(images, targets)
        loss = sum(v.float() for v in loss_dict.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"detection loss is {float(loss)} at iteration {it} "
                                     f"({ {k: float(v) for k, v in loss_dict.items()} }); lower lr={cfg.lr}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        opt.step()
        losses.append(torch.stack([loss.detach()] + [v.detach().float() for v in loss_dict.values()]))
        if cfg.log_every and (it + 1) % cfg.log_every == 0:
            mean = torch.stack(losses[-cfg.log_every:]).mean(0).tolist()
            terms = " ".join(f"{k} {v:.3f}" for k, v in zip(loss_dict, mean[1:]))
            log(f"iter {it + 1}/{cfg.iterations} loss {mean[0]:.4f} ({terms}) lr {lr:.5f}")
    last = torch.stack(losses[-max(1, min(50, len(losses))):]).mean(0).tolist()
    metrics = evaluate_detection(model, val_ds, len(classes), device, cfg)
    settings = asdict(cfg)
    settings.update(train_images=len(train_ds), val_images=len(val_ds), num_classes=len(classes),
                    classes=list(classes), train_loss_last=last[0],
                    metric="COCO bbox AP (pycocotools) after the last iteration, percent")
    return {"backbone": desc, "detection": {**metrics, "settings": settings,
                                            "seconds": round(time.perf_counter() - t0, 2)}}


@torch.no_grad()
def evaluate_detection(model: nn.Module, dataset, num_classes: int, device, cfg) -> dict:
    model.eval()
    detections = []
    bs = max(1, cfg.eval_batch_size)
    for start in range(0, len(dataset), bs):
        idx = list(range(start, min(start + bs, len(dataset))))
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


def run_cli(spec: str, overrides: list[str]) -> int:
    from pathlib import Path

    from densessl.eval.protocols import default_out, write_metrics

    cfg = detection_config(overrides)
    result = run_detection(spec, cfg)
    out = default_out(spec, "detection", cfg)
    write_metrics(result, Path(out))
    r = result["detection"]
    print(f"{result['backbone'][-40:]:<40} AP {r['AP']:.2f}  AP50 {r['AP50']:.2f}  AP75 {r['AP75']:.2f}  "
          f"(Faster R-CNN FPN, {cfg.iterations} iterations, last iteration)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    import sys

    sys.exit(run_cli(sys.argv[1], sys.argv[2:]))
