"""Semantic-segmentation transfer: an FCN or DeepLabV3 head on the backbone, mIoU.

``densessl eval segmentation CHECKPOINT|random [preset=NAME] [key=value ...]``

Model: the backbone's C5 (``stages=[c5]``) or C4+C5 (C5 upsampled bilinearly to C4's size and
concatenated), optionally dilated to a smaller output stride (``output_stride``, as the
"D8"/"D16" ResNets of mmseg/detectron2), then torchvision's ``FCNHead`` (3x3 conv to C/4, BN,
ReLU, dropout 0.1, 1x1 conv) or ``DeepLabHead`` (ASPP with ``aspp_rates``), upsampled
bilinearly to the input size. Loss: cross-entropy, 255 ignored. SGD (momentum 0.9), poly
learning-rate decay (power 0.9) per iteration after an optional linear warm-up.

Modes:
- ``freeze_backbone=true``: the backbone is frozen (no gradient, BatchNorm in eval mode), only
  the head learns -- the protocol of the PixPro optical-flow variant (detectron2 DeepLabV3 with
  FREEZE_AT=5);
- ``freeze_backbone=false`` (default): everything is fine-tuned (``backbone_lr_mult`` scales the
  backbone's learning rate).

Metric: a confusion matrix (rows ground truth, columns prediction) accumulated over the
validation images at their full size after the LAST iteration; IoU_c = TP / (TP + FP + FN),
mIoU = mean over classes that occur in the ground truth or the predictions (others are NaN and
skipped, like mmseg's nanmean), plus pixel accuracy.

Presets (``preset=``, files eval/presets/segmentation-NAME.yaml): ``scenes`` (the default values: Fashion-Scenes 64 px, a few CPU
minutes), ``voc-fcn`` (the SS-PRL / DenseCL VOC12+aug protocol, FCN on a dilated R50 at 512
px, 20k iterations), ``frozen-deeplabv3`` (the optical-flow PixPro protocol's schedule on
VOC-style data). See docs/interop.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from densessl.config import ConfigError
from densessl.data.augment import normalize
from densessl.eval.finetune import FinetuneConfig, FinetuneTask, eval_batches, fine_tune
from densessl.eval.transfer import autocast, transfer_config

IGNORE_INDEX = 255


# ---------------------------------------------------------------- metric


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(C, C) int64 counts, rows = ground truth, columns = prediction; ``ignore_index`` pixels
    are left out. A target outside 0..C-1 (other than the ignore value) is an error."""
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    if pred.shape != target.shape:
        raise ValueError(f"pred and target differ in size: {pred.numel()} vs {target.numel()}")
    valid = target != ignore_index
    t, p = target[valid], pred[valid]
    if t.numel() and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"target values must lie in [0, {num_classes}) or be {ignore_index}; "
                         f"found {int(t.min())}..{int(t.max())}")
    if p.numel() and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f"pred values must lie in [0, {num_classes}); found {int(p.min())}..{int(p.max())}")
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


def segmentation_metrics(cm: torch.Tensor) -> dict:
    """mIoU, per-class IoU (NaN where a class is absent from ground truth and predictions),
    pixel accuracy and mean class accuracy from a confusion matrix."""
    cm = cm.double()
    tp = cm.diag()
    gt, pr = cm.sum(1), cm.sum(0)
    union = gt + pr - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
    valid = ~torch.isnan(iou)
    total = cm.sum()
    return {
        "mIoU": float(iou[valid].mean()) if valid.any() else float("nan"),
        "iou_per_class": [float(v) for v in iou],
        "pixel_acc": float(tp.sum() / total) if total > 0 else float("nan"),
        "mean_acc": float(acc[~torch.isnan(acc)].mean()) if (~torch.isnan(acc)).any() else float("nan"),
        "classes_scored": int(valid.sum()),
    }


# ---------------------------------------------------------------- model


def set_output_stride(backbone: nn.Module, output_stride: int) -> int:
    """Dilate the last stages of a torchvision-style ResNet in place so C5 has ``output_stride``.

    The first block of each dilated stage loses its stride (conv and shortcut) and keeps the
    previous dilation; later blocks use the new one -- torchvision's
    ``replace_stride_with_dilation``. Weights are unchanged. Returns the new output stride.
    """
    stem = backbone.conv1.stride[0] * (2 if isinstance(backbone.maxpool, nn.MaxPool2d) else 1)
    layers = [backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4]
    strides = [_block_stride(layer[0]) for layer in layers]
    total = stem * math.prod(strides)
    n_dilate = 0
    while total > output_stride and n_dilate < 3 and strides[3 - n_dilate] > 1:
        total //= strides[3 - n_dilate]
        n_dilate += 1
    if total != output_stride:
        raise ConfigError(f"output_stride={output_stride} is not reachable for this backbone (native C5 stride "
                          f"{stem * math.prod(strides)}; dilating stages gives {total})")
    dilation = 1
    for i, layer in enumerate(layers):
        if i < 4 - n_dilate:
            continue
        previous, dilation = dilation, dilation * strides[i]
        for j, block in enumerate(layer):
            d = previous if j == 0 else dilation
            for conv in _spatial_convs(block):
                conv.stride = (1, 1)
                conv.dilation, conv.padding = (d, d), (d, d)
            if block.downsample is not None:
                block.downsample[0].stride = (1, 1)
    return total


def _block_stride(block) -> int:
    return max(c.stride[0] for c in _spatial_convs(block))


def _spatial_convs(block) -> list[nn.Conv2d]:
    """The 3x3 convs of a block: Bottleneck's conv2 (torchvision puts the stride there), or
    BasicBlock's conv1 and conv2."""
    return [block.conv2] if hasattr(block, "conv3") else [block.conv1, block.conv2]


class SegmentationModel(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: int, head: str = "fcn", stages=("c5",),
                 aspp_rates=(12, 24, 36)):
        super().__init__()
        from torchvision.models.segmentation.deeplabv3 import DeepLabHead
        from torchvision.models.segmentation.fcn import FCNHead

        bad = [s for s in stages if s not in backbone.channels]
        if not stages or bad:
            raise ConfigError(f"stages must be a non-empty subset of {sorted(backbone.channels)}, got {list(stages)}")
        self.backbone = backbone
        self.stages = tuple(sorted(stages))
        in_ch = sum(backbone.channels[s] for s in self.stages)
        if head == "fcn":
            self.head = FCNHead(in_ch, num_classes)
        elif head == "deeplabv3":
            self.head = DeepLabHead(in_ch, num_classes, tuple(aspp_rates))
        else:
            raise ConfigError(f"head={head!r}; expected fcn or deeplabv3")
        self.frozen = False

    def freeze_backbone(self) -> None:
        self.frozen = True
        for p in self.backbone.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            feats = self.backbone(x, stages=self.stages)
        first = feats[self.stages[0]]
        maps = [first] + [F.interpolate(feats[s], size=first.shape[-2:], mode="bilinear", align_corners=False)
                          for s in self.stages[1:]]
        out = self.head(torch.cat(maps, 1) if len(maps) > 1 else first)
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)


# ---------------------------------------------------------------- config


@dataclass
class SegmentationConfig(FinetuneConfig):  # + data, model, preset, the SGD schedule, logging (finetune.py)
    head: str = "fcn"  # fcn | deeplabv3
    stages: list[str] = field(default_factory=lambda: ["c5"])  # [c5] or [c4, c5]
    aspp_rates: list[int] = field(default_factory=lambda: [12, 24, 36])
    output_stride: Optional[int] = None  # dilate the last stages to this C5 stride (null: the backbone's own)
    freeze_backbone: bool = False
    backbone_lr_mult: float = 1.0
    weight_decay: float = 5.0e-4
    poly_power: float = 0.9
    min_lr: float = 1.0e-4
    crop_size: int = 64  # training crop (padded with 0 / 255 when the image is smaller)
    scale_range: list[float] = field(default_factory=lambda: [1.0, 1.0])  # random rescale before cropping
    # eval_batch_size: validation images of different sizes are padded (pad = ignored)


def segmentation_config(overrides: list[str]) -> SegmentationConfig:
    """Defaults, the preset eval/presets/segmentation-NAME.yaml (preset=NAME), then the overrides."""
    return transfer_config(SegmentationConfig, "segmentation", overrides)


# ---------------------------------------------------------------- data


def _random_crop(image, mask, size: int, scale: float, flip: bool, gen: torch.Generator):
    if scale != 1.0:
        h, w = image.shape[-2:]
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        image = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", align_corners=False)[0]
        mask = F.interpolate(mask[None, None].float(), size=(nh, nw), mode="nearest")[0, 0].long()
    h, w = image.shape[-2:]
    ph, pw = max(0, size - h), max(0, size - w)
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph), value=0)
        mask = F.pad(mask, (0, pw, 0, ph), value=IGNORE_INDEX)
        h, w = image.shape[-2:]
    y = int(torch.randint(0, h - size + 1, (1,), generator=gen))
    x = int(torch.randint(0, w - size + 1, (1,), generator=gen))
    image, mask = image[:, y:y + size, x:x + size], mask[y:y + size, x:x + size]
    if flip and bool(torch.rand((), generator=gen) < 0.5):
        image, mask = image.flip(-1), mask.flip(-1)
    return image.float(), mask


def _stack(batch):
    return torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])


def _pad_batch(items: list[dict]):
    h = max(it["image"].shape[-2] for it in items)
    w = max(it["image"].shape[-1] for it in items)
    images = torch.zeros(len(items), 3, h, w, dtype=torch.uint8)
    masks = torch.full((len(items), h, w), IGNORE_INDEX, dtype=torch.int64)
    for k, it in enumerate(items):
        ih, iw = it["image"].shape[-2:]
        images[k, :, :ih, :iw] = it["image"]
        masks[k, :ih, :iw] = it["mask"]
    return images, masks


# ---------------------------------------------------------------- protocol


class SegmentationTask(FinetuneTask):
    """A head on the backbone (frozen or fine-tuned): cross-entropy, poly lr."""

    name = "segmentation"
    collate = staticmethod(_stack)

    def check(self) -> None:
        cfg = self.cfg
        if cfg.iterations < 1 or cfg.batch_size < 1 or cfg.crop_size < 8:
            raise ConfigError(f"need iterations >= 1, batch_size >= 1, crop_size >= 8; got {cfg.iterations}, "
                              f"{cfg.batch_size}, {cfg.crop_size}")

    def build(self, backbone, num_classes):
        cfg = self.cfg
        if cfg.output_stride is not None:
            set_output_stride(backbone, cfg.output_stride)
        model = SegmentationModel(backbone, num_classes, cfg.head, tuple(cfg.stages), tuple(cfg.aspp_rates))
        groups = [{"params": list(model.head.parameters()), "lr_mult": 1.0}]
        if cfg.freeze_backbone:
            model.freeze_backbone()
        else:
            groups.append({"params": list(model.backbone.parameters()), "lr_mult": cfg.backbone_lr_mult})
        return model, groups

    def transform(self, item, gen):
        """Random rescale in ``scale_range``, crop, flip: (uint8-valued float crop, mask)."""
        lo, hi = self.cfg.scale_range
        scale = float(lo + (hi - lo) * torch.rand((), generator=gen))
        return _random_crop(item["image"], item["mask"], self.cfg.crop_size, scale, self.cfg.flip, gen)

    def loss(self, model, batch, device):
        images, masks = batch
        images = normalize(images.to(device, non_blocking=True) / 255.0)
        masks = masks.to(device, non_blocking=True)
        with autocast(device, self.cfg.precision):
            logits = model(images)
        return F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX), {}

    def lr_at(self, it: int) -> float:
        """Poly decay from lr to min_lr over the iterations, after an optional linear warm-up."""
        cfg = self.cfg
        lr = (cfg.lr - cfg.min_lr) * (1.0 - it / cfg.iterations) ** cfg.poly_power + cfg.min_lr
        if it < cfg.warmup_iters:
            lr *= (it + 1) / cfg.warmup_iters
        return lr

    def evaluate(self, model, dataset, classes, device):
        metrics = evaluate_segmentation(model, dataset, len(classes), device, self.cfg)
        metrics["iou_per_class"] = dict(zip(classes, metrics["iou_per_class"]))
        return metrics

    def settings(self, classes):
        return {"metric": "mIoU after the last iteration", "backbone_frozen": self.cfg.freeze_backbone}

    def summary(self, r):
        mode = "frozen backbone" if self.cfg.freeze_backbone else "fine-tuned"
        return (f"mIoU {100 * r['mIoU']:.2f}  pixel acc {100 * r['pixel_acc']:.2f}  "
                f"({self.cfg.head}, {mode}, {self.cfg.iterations} iterations, last iteration)")


def run_segmentation(spec: str, cfg: SegmentationConfig, log=print) -> dict:
    """Train the head (and the backbone unless frozen) and return the metrics dict."""
    return fine_tune(spec, SegmentationTask(cfg), log)


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, dataset, num_classes: int, device, cfg) -> dict:
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for idx in eval_batches(dataset, cfg.eval_batch_size):
        images, masks = _pad_batch([dataset[i] for i in idx])
        with autocast(device, cfg.precision):
            logits = model(normalize(images.to(device)))
        cm += confusion_matrix(logits.argmax(1).cpu(), masks, num_classes)
    model.train()
    out = segmentation_metrics(cm)
    out["confusion_matrix"] = cm.tolist()
    return out
