"""What detection and segmentation fine-tuning share: the config keys and the training loop.

:class:`FinetuneConfig` holds the keys both protocols take (data, backbone, SGD schedule
length, logging); each protocol's config derives from it and adds its model's keys. A protocol
is a :class:`FinetuneTask`: its model, its training transform and collate, its loss and
learning-rate schedule, and its evaluation. :func:`fine_tune` runs one: data, backbone, SGD
over a :class:`~densessl.eval.transfer.SampleStream` for ``iterations`` steps, the metric on
the validation split after the LAST iteration, and the metrics dict with every setting.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from densessl.common.distributed import pick_device
from densessl.config import ConfigError, EvalBackboneConfig, ModelConfig
from densessl.eval.backbone import load_backbone
from densessl.eval.transfer import SampleStream, TransferData, build_task_dataset, stream_loader


@dataclass
class FinetuneConfig(EvalBackboneConfig):  # + model, seed, random_init_seed (every protocol's keys)
    data: TransferData = field(default_factory=TransferData)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(backbone="resnet18_small", width=32))
    preset: Optional[str] = None  # the eval/presets/<protocol>-<name>.yaml applied (preset=NAME)
    iterations: int = 600
    batch_size: int = 16
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1.0e-4
    warmup_iters: int = 0
    flip: bool = True
    eval_batch_size: int = 32
    device: str = "auto"
    precision: str = "fp32"
    log_every: int = 100
    out: Optional[str] = None


class FinetuneTask:
    """One fine-tuning protocol; subclasses fill in the model, data, loss, schedule and metric."""

    name: str  # "detection" | "segmentation": the task of build_task_dataset and the metrics key
    collate: Callable
    clip_grad: Optional[float] = None  # gradient-norm clip (None: none)

    def __init__(self, cfg: FinetuneConfig):
        self.cfg = cfg

    def check(self) -> None:
        """Refuse values the protocol cannot use, naming the key."""
        if self.cfg.iterations < 1 or self.cfg.batch_size < 1:
            raise ConfigError(f"need iterations >= 1 and batch_size >= 1; got {self.cfg.iterations}, "
                              f"{self.cfg.batch_size}")

    def build(self, backbone: nn.Module, num_classes: int) -> tuple[nn.Module, list[dict]]:
        """(model, SGD parameter groups, each with an "lr_mult"); the model is moved to the device after."""
        raise NotImplementedError

    def transform(self, item: dict, gen: torch.Generator):
        raise NotImplementedError

    def loss(self, model: nn.Module, batch, device) -> tuple[torch.Tensor, dict]:
        """(total loss, its named terms; {} when it has none) of one training batch."""
        raise NotImplementedError

    def lr_at(self, it: int) -> float:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, dataset, classes: tuple, device) -> dict:
        raise NotImplementedError

    def settings(self, classes: tuple) -> dict:
        """Settings of this protocol added to the config's in metrics.json."""
        return {}

    def summary(self, metrics: dict) -> str:
        """The one line that `densessl eval` prints for the metrics."""
        raise NotImplementedError


def fine_tune(spec: str, task: FinetuneTask, log=print) -> dict:
    """Fine-tune from ``spec`` (a checkpoint, a .safetensors backbone or ``random``) and return
    ``{"backbone": description, task.name: {metrics..., "settings", "seconds"}}``."""
    cfg = task.cfg
    task.check()
    t0 = time.perf_counter()
    device = pick_device(cfg.device)
    train_ds, classes = build_task_dataset(cfg.data, "train", task.name)
    val_ds, _ = build_task_dataset(cfg.data, "val", task.name)
    backbone, desc = load_backbone(spec, cfg)
    torch.manual_seed(cfg.seed)
    model, groups = task.build(backbone, len(classes))
    model.to(device)
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    stream = SampleStream(train_ds, cfg.iterations * cfg.batch_size, cfg.seed, task.transform)
    batches = iter(stream_loader(stream, cfg.batch_size, cfg.data.num_workers, task.collate))
    model.train()
    history = []  # per iteration: the loss, then its terms
    for it in range(cfg.iterations):
        lr = task.lr_at(it)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_mult"]
        loss, terms = task.loss(model, next(batches), device)
        if not torch.isfinite(loss):
            named = f" ({ {k: float(v) for k, v in terms.items()} })" if terms else ""
            raise FloatingPointError(f"{task.name} loss is {float(loss)} at iteration {it}{named}; lower lr={cfg.lr}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if task.clip_grad:
            torch.nn.utils.clip_grad_norm_(params, task.clip_grad)
        opt.step()
        history.append(torch.stack([loss.detach()] + [v.detach().float() for v in terms.values()]))
        if cfg.log_every and (it + 1) % cfg.log_every == 0:
            mean = torch.stack(history[-cfg.log_every:]).mean(0).tolist()
            named = " (" + " ".join(f"{k} {v:.3f}" for k, v in zip(terms, mean[1:])) + ")" if terms else ""
            log(f"iter {it + 1}/{cfg.iterations} loss {mean[0]:.4f}{named} lr {lr:.5f}")
    train_loss_last = torch.stack(history[-max(1, min(50, len(history))):]).mean(0).tolist()[0]
    metrics = task.evaluate(model, val_ds, classes, device)
    settings = asdict(cfg)
    settings.update(train_images=len(train_ds), val_images=len(val_ds), num_classes=len(classes),
                    train_loss_last=train_loss_last, **task.settings(classes))
    return {"backbone": desc, task.name: {**metrics, "settings": settings,
                                         "seconds": round(time.perf_counter() - t0, 2)}}


def eval_batches(dataset, batch_size: int):
    """The validation split in order, as lists of item indices of ``batch_size`` (at least 1)."""
    bs = max(1, batch_size)
    for start in range(0, len(dataset), bs):
        yield list(range(start, min(start + bs, len(dataset))))
