"""Multi-label linear probe on Pascal VOC07 and COCO, as SS-PRL (and GAELLE) evaluate.

``densessl eval multilabel CHECKPOINT|random data.dataset=voc data.root=.../VOC2007 [key=value ...]``
(``cli.py`` sends ``eval multilabel`` here when ``data.dataset`` is ``voc`` or ``coco``).

Protocol (SS-PRL ``benchmarks/classification``, spec methods-swav-ssprl-gaelle.md §2.6): a
linear layer ``Linear(D, C)`` (weights N(0, 0.01), bias 0.1) on the frozen backbone's pooled
C5 (backbone in eval mode: BatchNorm uses its running statistics, no gradient);
BCE-with-logits summed over classes and divided by the batch size, entries marked "ignore"
(VOC's difficult-only classes) left out of the loss; gradient norm clipped to 10; SGD
(momentum 0.9, weight decay 1e-6, no Nesterov), cosine learning rate to 0 (per iteration);
100 epochs; seed 777.

- VOC07: ``trainval`` -> ``test``, batch 32, lr 0.03; mAP ignores difficult-only entries
  (``mean_average_precision(ignore=...)``).
- COCO: ``train2014`` -> ``val2014``, batch 128, lr 0.1; 80 classes; a class is positive when
  the image has at least one instance.

Images: ``mode=augment`` (default, SS-PRL): every epoch, training images go through
RandomResizedCrop(``crop_size``, scale 0.08-1, ratio 3/4-4/3) + flip and then the frozen
backbone; test images: resize the shorter side to ``resize_size``, centre crop ``crop_size``
(features computed once). ``mode=cached`` extracts the training features once with the test
transform and trains on those (no augmentation; much cheaper, numbers not comparable with
``augment``). Normalisation: ImageNet mean/std as everywhere in densessl (SS-PRL uses
std 0.228 for the red channel, a 0.4 % difference).

Reported: the mAP after the LAST epoch (``mAP``). SS-PRL reports the best mAP over the 100
epochs on the test split itself; that number is given too, labelled ``best_epoch_mAP``
(selected on the test split). Per-class AP is the non-interpolated AP of scikit-learn
(``densessl.eval.metrics``); SS-PRL's -1e-5 * label tie-break is not applied (ties between
float scores are rare; ours count tied scores together, as scikit-learn).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from densessl.common.distributed import pick_device
from densessl.config import ConfigError, EvalBackboneConfig, ModelConfig
from densessl.data.augment import normalize
from densessl.eval.metrics import count_skipped, mean_average_precision
from densessl.eval.backbone import load_backbone
from densessl.eval.linear import linear_head, sgd_epochs
from densessl.eval.transfer import TransferData, autocast, build_task_dataset, load_preset, preset_names, with_preset


@dataclass
class MultilabelData(TransferData):
    dataset: str = "voc"  # voc | coco
    train_split: Optional[str] = None  # from the dataset's preset (voc: trainval; coco: train2014)
    val_split: Optional[str] = None  # from the preset (voc: test; coco: val2014)


@dataclass
class MultilabelTransferConfig(EvalBackboneConfig):  # + model, seed, random_init_seed (every protocol's keys)
    data: MultilabelData = field(default_factory=MultilabelData)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(backbone="resnet50", width=None))
    mode: str = "augment"  # augment | cached
    epochs: int = 100
    batch_size: Optional[int] = None  # from the preset (voc 32, coco 128)
    lr: Optional[float] = None  # from the preset (voc 0.03, coco 0.1)
    momentum: float = 0.9
    weight_decay: float = 1.0e-6
    clip_grad: Optional[float] = 10.0
    bias_init: float = 0.1
    crop_size: int = 224
    resize_size: int = 256
    scale: tuple[float, float] = (0.08, 1.0)
    eval_every: int = 1  # epochs between test-set evaluations (the last epoch is always evaluated)
    feature_batch_size: int = 128  # images per backbone call
    seed: int = 777  # SS-PRL's
    device: str = "auto"
    precision: str = "fp32"
    out: Optional[str] = None


def multilabel_transfer_config(overrides: list[str]) -> MultilabelTransferConfig:
    """Defaults, then the dataset's preset (eval/presets/multilabel-<voc|coco>.yaml: splits, batch
    size and lr of SS-PRL's script), then the overrides."""
    from densessl.config import apply_overrides, from_dict, to_dict

    tree = to_dict(MultilabelTransferConfig())
    dataset = from_dict(MultilabelTransferConfig, apply_overrides(tree, overrides)).data.dataset
    if dataset not in preset_names("multilabel"):
        raise ConfigError(f"data.dataset={dataset!r}; the VOC/COCO multi-label protocol takes voc or coco "
                          "(Fashion-Scenes: densessl eval multilabel without data.dataset)")
    tree = with_preset(tree, load_preset(MultilabelTransferConfig, "multilabel", dataset))
    cfg = from_dict(MultilabelTransferConfig, apply_overrides(tree, overrides))
    if cfg.mode not in ("augment", "cached"):
        raise ConfigError(f"mode={cfg.mode!r}; expected augment or cached")
    if cfg.epochs < 1 or cfg.batch_size < 1 or not cfg.lr > 0:
        raise ConfigError(f"need epochs >= 1, batch_size >= 1, lr > 0; got {cfg.epochs}, {cfg.batch_size}, {cfg.lr}")
    return cfg


# ---------------------------------------------------------------- transforms


def random_resized_crop_params(h: int, w: int, scale, ratio, gen: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) as torchvision's RandomResizedCrop.get_params, from ``gen``."""
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * float(torch.empty(1).uniform_(scale[0], scale[1], generator=gen))
        aspect = math.exp(float(torch.empty(1).uniform_(log_r[0], log_r[1], generator=gen)))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
            return top, left, ch, cw
    in_ratio = w / h  # fallback: centre crop at the closest allowed ratio
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


class ProbeImages(Dataset):
    """(uint8 image crop, labels, ignore) with the train or test transform; the train
    transform's randomness comes from (seed, epoch, index), so it does not depend on workers."""

    def __init__(self, base, train: bool, cfg: MultilabelTransferConfig):
        self.base, self.train, self.cfg = base, train, cfg
        self.epoch = 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        from torchvision.transforms.v2 import functional as TF

        s = self.base[i]
        image, size = s["image"], self.cfg.crop_size
        if self.train:
            gen = torch.Generator().manual_seed(((self.cfg.seed * 1_000_003 + self.epoch) * 1_000_003 + i) % 2**62)
            top, left, h, w = random_resized_crop_params(image.shape[1], image.shape[2], self.cfg.scale,
                                                         (3 / 4, 4 / 3), gen)
            image = TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)
            if bool(torch.rand((), generator=gen) < 0.5):
                image = image.flip(-1)
        else:
            image = TF.center_crop(TF.resize(image, self.cfg.resize_size, antialias=True), [size, size])
        return image, s["labels"], s["ignore"]


def _features(backbone, loader, device, precision) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    feats, labels, ignore = [], [], []
    with torch.inference_mode(), autocast(device, precision):
        for images, y, ign in loader:
            x = normalize(images.to(device, non_blocking=True)).contiguous(memory_format=torch.channels_last)
            feats.append(backbone.pool(x).float().cpu())
            labels.append(y.float())
            ignore.append(ign.bool())
    return torch.cat(feats), torch.cat(labels), torch.cat(ignore)


def probe_loss(logits: torch.Tensor, labels: torch.Tensor, ignore: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits summed over classes and non-ignored entries, divided by the batch size."""
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return (bce * (~ignore).to(bce.dtype)).sum() / logits.shape[0]


# ---------------------------------------------------------------- protocol


def run_multilabel_transfer(spec: str, cfg: MultilabelTransferConfig, log=print) -> dict:
    t0 = time.perf_counter()
    device = pick_device(cfg.device)
    train_base, classes = build_task_dataset(cfg.data, "train", "multilabel")
    test_base, _ = build_task_dataset(cfg.data, "val", "multilabel")
    log(f"classes ({len(classes)}, from {getattr(train_base, 'classes_source', cfg.data.dataset)}): "
        f"{', '.join(classes)}")
    backbone, desc = load_backbone(spec, cfg)
    backbone = backbone.to(device).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    workers = cfg.data.num_workers
    test_loader = DataLoader(ProbeImages(test_base, False, cfg), batch_size=cfg.feature_batch_size,
                             num_workers=workers)
    xte, yte, ite = _features(backbone, test_loader, device, cfg.precision)
    train_images = ProbeImages(train_base, cfg.mode == "augment", cfg)
    if cfg.mode == "cached":
        cached = _features(backbone, DataLoader(train_images, batch_size=cfg.feature_batch_size,
                                                num_workers=workers), device, cfg.precision)

    n = len(train_images)

    def epoch_data(epoch, perm):
        """This epoch's training features in `perm`'s order: augmented crops (computed now, already
        in that order) or the cached ones (ordered by `perm`)."""
        if cfg.mode == "cached":
            x, y, ign = cached
            return x, (y, ign), perm
        train_images.epoch = epoch
        loader = DataLoader(torch.utils.data.Subset(train_images, perm.tolist()), batch_size=cfg.feature_batch_size,
                            num_workers=workers)
        x, y, ign = _features(backbone, loader, device, cfg.precision)
        return x, (y, ign), torch.arange(n)

    gen = torch.Generator().manual_seed(cfg.seed)
    head = linear_head(xte.shape[1], len(classes), gen, bias=cfg.bias_init).to(device)
    history = []
    for epoch, train_loss in sgd_epochs(head, epoch_data, probe_loss, n=n, epochs=cfg.epochs,
                                        batch_size=cfg.batch_size, lr=cfg.lr, gen=gen, momentum=cfg.momentum,
                                        weight_decay=cfg.weight_decay, clip_grad=cfg.clip_grad):
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"multi-label probe diverged at epoch {epoch + 1} (loss {train_loss}); "
                                     f"lower lr={cfg.lr}")
        last = epoch + 1 == cfg.epochs
        if last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
            with torch.no_grad():
                scores = head(xte.to(device)).float().cpu()
            mAP, per_class = mean_average_precision(scores, yte, ignore=ite)
            history.append({"epoch": epoch + 1, "mAP": mAP, "train_loss": train_loss})
            log(f"epoch {epoch + 1}/{cfg.epochs} train loss {train_loss:.4f} test mAP {100 * mAP:.2f}")
    best = max(history, key=lambda h: h["mAP"])
    settings = asdict(cfg)
    settings.update(train_images=n, test_images=len(test_base), num_classes=len(classes), classes=list(classes),
                    classes_source=getattr(train_base, "classes_source", cfg.data.dataset), feature_dim=xte.shape[1],
                    ignored_test_entries=int(ite.sum()), metric="mAP after the last epoch (difficult-only "
                    "entries ignored)", skipped_classes=count_skipped(per_class))
    return {"backbone": desc, "multilabel": {
        "mAP": mAP, "ap_per_class": dict(zip(classes, per_class)),
        "best_epoch_mAP": best["mAP"], "best_epoch": best["epoch"],
        "best_epoch_note": "best over the evaluated epochs, selected on the test split (SS-PRL's reporting)",
        "history": history, "settings": settings, "seconds": round(time.perf_counter() - t0, 2)}}


def summary_lines(result: dict, cfg: MultilabelTransferConfig) -> list[str]:
    r = result["multilabel"]
    return [f"{result['backbone'][-40:]:<40} mAP {100 * r['mAP']:.2f} (last epoch)   best-epoch mAP "
            f"{100 * r['best_epoch_mAP']:.2f} (epoch {r['best_epoch']}, selected on the test split)",
            f"{cfg.data.dataset} {cfg.data.train_split} -> {cfg.data.val_split}, linear probe on frozen features, "
            f"{cfg.mode} mode, {cfg.epochs} epochs, batch {cfg.batch_size}, lr {cfg.lr}"]
