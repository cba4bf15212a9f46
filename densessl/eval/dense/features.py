"""Dense features of a frozen backbone, computed once per split, and the shared scores.

:func:`extract_dense` runs the one frozen forward of ``densessl.eval.features.frozen_forward``
(``normalize``, channels_last, eval-mode BatchNorm, inference mode, optional autocast) and
keeps every requested stage map (C3 16x16, C4 8x8, C5 4x4 at 64 px on resnet18_small) with
the labels and boxes of each image. Every probe reads a :class:`DenseSplit`; none runs the
backbone again.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from densessl.eval.dense.data import IGNORE_INDEX, collate_dense
from densessl.eval.features import frozen_forward
from densessl.eval.segmentation import confusion_matrix, segmentation_metrics

Tensor = torch.Tensor
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class DenseSplit:
    """Stage maps and targets of one split, on the CPU.

    ``feats[stage]`` (N, C, h, w); ``labels`` uint8 (N, H, W) (0 background, 255 ignore);
    ``boxes[i]`` float32 (n_i, 4) xyxy in label pixels and ``classes[i]`` int64 (n_i,) in
    0..len(class_names) - 2 (object classes; ``class_names[0]`` is "background").
    """
    feats: dict[str, Tensor]
    labels: Tensor
    boxes: list[Tensor]
    classes: list[Tensor]
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def maps(self, stages: tuple[str, ...], index=slice(None), unit: bool = False) -> Tensor:
        """float32 (n, sum C, h, w): the stages of images ``index``, upsampled bilinearly to the
        finest of them and concatenated along channels; ``unit``: each stage's part of every
        cell L2-normalised first (so a cosine on the concatenation is the mean of the stages'
        cosines, whatever their scales)."""
        return stage_maps([self.feats[s][index] for s in stages], unit)


def stage_maps(maps: list[Tensor], unit: bool = False) -> Tensor:
    size = max((m.shape[-2:] for m in maps), key=lambda hw: hw[0] * hw[1])
    out = [m.float() if tuple(m.shape[-2:]) == tuple(size) else
           F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False) for m in maps]
    if unit:
        out = [F.normalize(m, dim=1) for m in out]
    return out[0] if len(out) == 1 else torch.cat(out, 1)


def extract_dense(backbone, dataset: Dataset, class_names: tuple[str, ...], stages: tuple[str, ...], device,
                  batch_size: int = 64, num_workers: int = 0, autocast_dtype=None,
                  store_dtype: torch.dtype = torch.float32) -> DenseSplit:
    """Stage maps ``stages`` of every image of ``dataset`` (items of ``dense/data.py``), in order."""
    device = torch.device(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_dense, pin_memory=device.type == "cuda")
    feats: dict[str, list[Tensor]] = {s: [] for s in stages}
    labels, boxes, classes = [], [], []
    for out, rest in frozen_forward(backbone, loader, device, autocast_dtype, lambda b, x: b(x, stages=stages)):
        for s in stages:
            feats[s].append(out[s].to("cpu", store_dtype).contiguous())
        labels.append(rest["label"])
        boxes += rest["boxes"]
        classes += rest["classes"]
    if not labels:
        raise ValueError("extract_dense: the dataset is empty")
    # torch.cat outside inference mode: ordinary tensors, usable by the probes' autograd
    return DenseSplit({s: torch.cat(v) for s, v in feats.items()}, torch.cat(labels), boxes, classes,
                      tuple(class_names))


# ---------------------------------------------------------------- scores


def seg_scores(cm: Tensor, class_names: tuple[str, ...]) -> dict:
    """mIoU (classes present in ground truth or prediction), foreground mIoU (the same mean
    over classes 1..C-1: a background-only prediction scores 0 there), pixel accuracy,
    per-class IoU by name, from a (C, C) confusion matrix (rows ground truth)."""
    m = segmentation_metrics(cm)
    fg = [v for v in m["iou_per_class"][1:] if not math.isnan(v)]
    return {"mIoU": m["mIoU"], "fg_mIoU": sum(fg) / len(fg) if fg else float("nan"), "pixel_acc": m["pixel_acc"],
            "iou_per_class": dict(zip(class_names, m["iou_per_class"]))}


def upsampled_confusion(scores: Tensor, labels: Tensor, num_classes: int, mode: str = "bilinear") -> Tensor:
    """Confusion matrix of per-cell class scores (n, C, h, w) upsampled to the labels (n, H, W)
    and arg-maxed over classes (dim 1); label pixels of 255 are ignored."""
    up = F.interpolate(scores.float(), size=labels.shape[-2:], mode=mode,
                       **({"align_corners": False} if mode == "bilinear" else {}))
    return confusion_matrix(up.argmax(1), labels.long(), num_classes, ignore_index=IGNORE_INDEX)
