"""The training loop: plain PyTorch, one step after another.

Per step: look up lr / wd for this step, augment the uint8 views on the device, forward under
autocast, backward, optimiser step, the method's after_step (EMA). Metrics stay on the device
and are read only every `log_every` steps; a non-finite loss is detected there and before
every checkpoint, so no checkpoint ever holds weights from a NaN step.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from densessl.common import checkpoint as ckpt_io
from densessl.common.distributed import DistInfo, all_reduce_mean, convert_sync_batchnorm, init_distributed
from densessl.common.metrics_jsonl import read_metrics
from densessl.common.schedules import warmup_cosine
from densessl.config import MISSING, Config, ConfigError, field_default, save_config, to_dict
from densessl.data.augment import augment_batch
from densessl.data.build import build_dataset
from densessl.data.views import ResumableBatchSampler, ViewDataset, ViewSampler, collate_views
from densessl.engine.optim import build_optimizer
from densessl.engine.trackers import open_tracker, tracker_module
from densessl.eval.monitor import KnnMonitor, probe_epoch_record
from densessl.methods import build_method
from densessl.models.backbones import build_backbone

# Keys that may differ between a run and its resumption without changing the result
# (train.tensorboard: retired, still in older runs' config.yaml; see config._retire_keys).
RESUME_FREE_KEYS = {"train.progress", "train.log_every", "train.tensorboard", "train.tracker", "train.device",
                    "data.num_workers", "train.ckpt_every", "train.keep_every", "train.dist_timeout_s"}


class NonFiniteLossError(RuntimeError):
    pass


class TrainStep(nn.Module):
    """The method plus the online probe, so one DDP wrapper averages both gradients."""

    def __init__(self, method: nn.Module, probe: nn.Module | None):
        super().__init__()
        self.method, self.probe = method, probe

    def forward(self, views, batch):
        out = self.method(views, batch)
        total = out["loss"]
        if self.probe is not None:
            logits = self.probe(out["features"].float())
            if "labels" in batch:  # multi-hot: multi-label probe
                probe_loss = F.binary_cross_entropy_with_logits(logits, batch["labels"].float())
            else:
                probe_loss = F.cross_entropy(logits, batch["label"])
            out["probe_loss"] = probe_loss.detach()
            out["probe_logits"] = logits.detach()
            total = total + probe_loss
        out["total_loss"] = total
        return out


def collapse_warning(first_z_std: float, z_std: float, ratio: float = 0.6) -> str | None:
    """A warning when the logged embedding std has fallen below `ratio` x its first value.

    Chosen from the logged runs behind docs/studies/2026-11-results-notebook.md (min z_std / first z_std per run): every
    run evaluated there stayed at 0.78 or above; the SwAV-family runs whose loss sat at ln K fell
    to 0.12-0.52 ("SwAV-family collapse"), as did one BYOL augmentation-sweep variant (0.40)."""
    if first_z_std > 0 and z_std < ratio * first_z_std:
        return (f"warning: embedding std z_std fell from {first_z_std:.4f} to {z_std:.4f} (below {ratio:.0%} of "
                f"its first value): the embeddings may be collapsing; "
                f"see docs/reliability.md, 'The collapse warning'")
    return None


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: bf16 on GPUs that have it and on CPUs with bf16 matrix units (AMX or
    AVX512-BF16); fp16 on older GPUs; fp32 on other CPUs (docs/performance.md)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16_units() else None


def cpu_has_bf16_units() -> bool:
    """AMX tiles (Intel Sapphire Rapids and later) or AVX512-BF16 (Intel Cooper Lake, AMD Zen 4
    and later): oneDNN has bf16 kernels for both, measured 2.5-4x faster than fp32 for our steps
    (docs/performance.md). Without either there is no bf16 hardware path, so fp32 stays."""
    return any(bool(check()) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
               if (check := getattr(torch.cpu, name, None)) is not None)


def resolve_channels_last(setting: bool | None, device: torch.device) -> bool:
    """channels_last unless the config says otherwise: faster on GPUs and, with bf16 and fp32
    alike, on this project's CPUs (benchmarks/step_layouts.py, docs/performance.md)."""
    return True if setting is None else setting


class Trainer:
    def __init__(self, cfg: Config, dist_info: DistInfo | None = None):
        self.cfg = cfg
        self.dist = dist_info or init_distributed(cfg.train.device, cfg.train.dist_timeout_s)
        tracker_module(cfg)  # a missing W&B / MLflow package: one line, on every rank, before any work
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        t = cfg.train
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        self.dataset = build_dataset(cfg.data, split="train", method_cfg=cfg.method)
        self._views = None  # the view dataset, built on first use (view_dataset)
        if t.batch_size < 1:
            raise ConfigError(f"train.batch_size={t.batch_size}; expected a batch of at least 1")
        if len(self.dataset) < t.batch_size:
            d, n = cfg.data, len(self.dataset)
            where = f"data.dataset={d.dataset}" + (f" data.root={d.root}" if d.root else "")
            raise ConfigError(f"the training data ({where}) has {n} samples, fewer than one batch of "
                              f"train.batch_size={t.batch_size}; set train.batch_size={n} or lower"
                              + (", or raise data.num_scenes" if d.dataset == "fashion_scenes" else ""))
        self.steps_per_epoch = t.steps_per_epoch or len(self.dataset) // t.batch_size
        self.total_steps = t.epochs * self.steps_per_epoch
        self.local_batch = t.batch_size // self.dist.world_size

        backbone = build_backbone(cfg.model.backbone, cfg.model.width, cfg.model.zero_init_residual)
        self.method = build_method(cfg.method, backbone)
        sample = self.dataset[0]
        probe = None
        # the probe's class count comes from the data: multi-hot width, or the dataset's classes
        n_classes = (sample["labels"].numel() if "labels" in sample
                     else len(getattr(self.dataset, "classes", ())) if "label" in sample else 0)
        if t.online_probe and n_classes > 0:
            probe = nn.Linear(backbone.out_dim, n_classes)
        self.step_module = TrainStep(self.method, probe)
        device = self.dist.device
        if self.dist.world_size > 1 and t.sync_bn:
            self.step_module = convert_sync_batchnorm(self.step_module, device)
            self.method = self.step_module.method
        self.step_module.to(device)
        self.channels_last = resolve_channels_last(t.channels_last, device)
        if self.channels_last:
            self.step_module.to(memory_format=torch.channels_last)
        self.model = self.step_module
        if self.dist.world_size > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.step_module, device_ids=[device.index] if device.type == "cuda" else None,
                broadcast_buffers=False)

        self.method.steps_per_epoch, self.method.total_steps = self.steps_per_epoch, self.total_steps
        self.peak_lr = cfg.optim.lr * t.batch_size / 256
        self.optimizer = build_optimizer(cfg.optim, [self.method], self.peak_lr)
        if probe is not None:  # the probe trains at a fixed lr, no LARS, no wd
            self.optimizer.add_param_group({"params": list(self.step_module.probe.parameters()), "lr": t.probe_lr,
                                            "weight_decay": 0.0, "lars_exclude": True, "fixed_lr": True,
                                            "wd_scale": 0.0})
        self.amp_dtype = resolve_precision(t.precision, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.knn_monitor = KnnMonitor(cfg.data, device, self.amp_dtype)
        self.step = 0
        self.log_file = None
        self.tracker = None  # train.tracker, opened by rank 0 (densessl/engine/trackers.py)
        self._first_z_std, self._collapse_warned = None, False
        if cfg.data.decode_on != "workers":
            self.view_dataset()  # what device decoding cannot do is refused here, before the first step

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {
            "format": ckpt_io.FORMAT,
            "step": self.step,
            "config": to_dict(self.cfg),
            "method": self.method.state_dict(),
            "probe": self.step_module.probe.state_dict() if self.step_module.probe is not None else {},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict, path: Path) -> None:
        detail = config_changes(state["config"], self.cfg)
        if detail:
            raise ConfigError(f"{path} was written with a different config ({detail}); resume with the same "
                              f"settings, or start a new run with run_dir=<another folder>")
        self.method.load_state_dict(state["method"])
        if self.step_module.probe is not None:
            self.step_module.probe.load_state_dict(state["probe"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        self.step = state["step"]

    def save_checkpoint(self, bad: torch.Tensor) -> None:
        self.check_finite(bad)
        if not self.dist.is_main:
            return
        state = self.state_dict()
        ckpt_io.save_atomic(state, self.ckpt_dir / "last.pt")
        keep = self.cfg.train.keep_every
        if keep and self.step % keep == 0:
            ckpt_io.save_atomic(state, self.ckpt_dir / f"step_{self.step:07d}.pt")

    def check_finite(self, bad: torch.Tensor) -> None:
        if bool(all_reduce_mean(bad.float()) > 0):
            last = self.ckpt_dir / "last.pt"
            kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint had been written yet"
            raise NonFiniteLossError(
                f"the loss became NaN or inf at or before step {self.step}; training stopped and {kept} "
                f"(it was not overwritten). Lower optim.lr, set optim.clip_grad, or try train.precision=fp32.")

    # ------------------------------------------------------------------ loop

    def view_dataset(self) -> tuple:
        """(view dataset keyed by (epoch, index), collate), built once per run: the video variant's
        frame pairs hold a flow model and a cache that every epoch reuses."""
        if self._views is None:
            own_views = self.method.view_dataset(self.dataset, self.cfg)  # None but for methods with their own
            if self.cfg.data.decode_on != "workers":
                self._views = _device_decode_views(self.dataset, own_views, self.cfg)
                return self._views
            if own_views is not None:
                views, collate = own_views
                if hasattr(views, "use_device"):  # frame pairs: a learned flow model (RAFT) runs on train.device's
                    views.use_device(self.dist.device)
            else:
                views, collate = ViewDataset(self.dataset, ViewSampler(self.cfg.views), seed=self.cfg.train.seed), \
                    collate_views
            self._views = views, collate
        return self._views

    def loader(self, epoch: int, start: int = 0) -> DataLoader:
        """The view batches of `epoch` from its batch `start` on (resumable; also used by benchmarks)."""
        t = self.cfg.train
        views, collate = self.view_dataset()
        sampler = ResumableBatchSampler(len(self.dataset), t.batch_size, self.steps_per_epoch, t.seed, epoch,
                                        start, self.dist.rank, self.dist.world_size,
                                        shard_sizes=getattr(self.dataset, "shard_sizes", None))  # data.dataset=shards
        nw = self.cfg.data.num_workers
        # "spawn" where workers compute on CUDA (flows): a forked worker cannot use CUDA once this process has
        context = getattr(views, "worker_start_method", None) if nw > 0 else None
        return DataLoader(views, batch_sampler=sampler, collate_fn=collate, num_workers=nw,
                          pin_memory=self.dist.device.type == "cuda", persistent_workers=False,
                          prefetch_factor=4 if nw > 0 else None, multiprocessing_context=context)

    def _set_schedules(self) -> None:
        o = self.cfg.optim
        warmup = int(round(o.warmup_epochs * self.steps_per_epoch))
        batch = self.cfg.train.batch_size
        lr = warmup_cosine(self.step, self.total_steps, warmup, self.peak_lr, o.min_lr * batch / 256,
                           o.warmup_start_lr * batch / 256)
        wd_end = o.weight_decay if o.weight_decay_end is None else o.weight_decay_end
        wd = warmup_cosine(self.step, self.total_steps, 0, o.weight_decay, wd_end)
        for g in self.optimizer.param_groups:
            if not g.get("fixed_lr"):
                g["lr"] = lr
                g["weight_decay"] = wd * g.get("wd_scale", 1.0)
        self.current_lr = lr

    def train_step(self, batch: dict) -> tuple[dict, dict]:
        """One optimisation step on a loader batch (uint8 views + geometry): schedules, batched
        augmentation on the device, forward under autocast, backward, optimiser step, the
        method's after-step hook (EMA, ...). Returns the method's outputs and the batch's
        non-view entries on the device; advances `self.step`."""
        t, device = self.cfg.train, self.dist.device
        self._set_schedules()
        if "encoded" in batch:  # data.decode_on=device: decode and cut the views here (data/device_decode.py)
            from densessl.data.device_decode import decode_views

            batch = {k: v for k, v in batch.items() if k not in ("encoded", "crops", "where", "fit")} | \
                {"views": decode_views(batch, device)}
        views = augment_batch(batch["views"], self.cfg.views, t.seed, self.step, device,
                              self.dist.rank, self.dist.world_size, self.channels_last)
        cpu_geometry = {"box": batch["box"], "flip": batch["flip"]}
        batch = _to_device({k: v for k, v in batch.items() if k != "views"}, device)
        batch["cpu"] = cpu_geometry  # host copy for CPU-side geometry (SCRL's boxes)
        self.method.current_step = self.step
        with torch.autocast(device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            out = self.model(views, batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out["total_loss"]).backward()
        self.method.before_optimizer_step(self.step)
        if self.cfg.optim.clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.method.parameters(), self.cfg.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.method.after_step(self.step, self.total_steps)
        self.step += 1
        return out, batch

    def fit(self) -> dict:
        t = self.cfg.train
        device = self.dist.device
        last = self.ckpt_dir / "last.pt"
        if self.dist.is_main:
            for p in ckpt_io.remove_partial_writes(self.ckpt_dir):
                print(f"removed {p}: a partial checkpoint left by an interrupted save", flush=True)
        if last.exists():
            self.load_state_dict(ckpt_io.load_checkpoint(last), last)
            if self.dist.is_main:
                print(f"resuming from {last} at step {self.step}/{self.total_steps}", flush=True)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
            self._open_logs()
        bad = torch.zeros((), dtype=torch.bool, device=device)
        sums: dict[str, torch.Tensor] = {}
        n_sum = 0
        t_log, step_log = time.perf_counter(), self.step
        self._data_wait = 0.0  # seconds spent in next(loader) since the last log (_waited)
        bar = self._progress()
        if t.knn_every and self.step == 0:
            self._knn_monitor()  # the untrained backbone: the reference the run must beat
        self.model.train()
        while self.step < self.total_steps:
            epoch, start = divmod(self.step, self.steps_per_epoch)
            probe_scores, probe_targets = [], []
            for batch in self._waited(self.loader(epoch, start)):
                out, batch = self.train_step(batch)
                bad |= ~torch.isfinite(out["loss"].detach())
                for k, v in out.items():
                    if torch.is_tensor(v) and v.ndim == 0:
                        sums[k] = sums.get(k, 0) + v.detach().float()
                n_sum += 1
                if "probe_logits" in out:
                    probe_scores.append(out["probe_logits"].float())
                    probe_targets.append(batch["labels"] if "labels" in batch else batch["label"])
                if self.step % t.log_every == 0 or self.step == self.total_steps:
                    self.check_finite(bad)
                    now = time.perf_counter()
                    ips = (self.step - step_log) * t.batch_size / max(now - t_log, 1e-9)
                    record = {k: float(all_reduce_mean(v / n_sum)) for k, v in sums.items()}
                    record.update(step=self.step, epoch=self.step / self.steps_per_epoch, lr=self.current_lr,
                                  momentum=self.method.momentum, images_per_s=ips,
                                  data_wait_frac=self._data_wait / max(now - t_log, 1e-9))
                    self._log(record)
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{ips:.0f}")
                    sums, n_sum, t_log, step_log, self._data_wait = {}, 0, now, self.step, 0.0
                if bar is not None:
                    bar.update(1)
                if self.step % t.ckpt_every == 0 or self.step == self.total_steps:
                    self.save_checkpoint(bad)
                if t.knn_every and (self.step % t.knn_every == 0 or self.step == self.total_steps):
                    self._knn_monitor()
            if probe_scores:
                self._log({"step": self.step, **probe_epoch_record(epoch, torch.cat(probe_scores),
                                                                   torch.cat(probe_targets))})
        if bar is not None:
            bar.close()
        self.save_checkpoint(bad)  # on every rank (its finiteness check is a collective), whatever the loop saved
        if self.dist.is_main:
            self._close_logs()
        return {"step": self.step, "checkpoint": str(self.ckpt_dir / "last.pt")}

    def _waited(self, loader):
        """The loader's batches; the time spent waiting in next() for each is added to
        `self._data_wait` (host clock around next() only, no device sync), logged as
        `data_wait_frac`: that time over the log interval's wall time (this rank's)."""
        batches = iter(loader)
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            self._data_wait += time.perf_counter() - t0
            if batch is None:
                return
            yield batch

    # ------------------------------------------------------------------ logs

    def _progress(self):
        if not (self.cfg.train.progress and self.dist.is_main):
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True, mininterval=2.0)

    def _open_logs(self) -> None:
        path = self.run_dir / "metrics.jsonl"
        if path.exists():  # drop records past the checkpoint we resumed from: they will be redone
            kept = [r for r in read_metrics(path) if r.get("step", 0) <= self.step]
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))
            # the collapse warning compares with the run's first z_std, not the resumed one
            self._first_z_std = next((r["z_std"] for r in kept if "z_std" in r), None)
        self.log_file = open(path, "a")
        self.tracker = open_tracker(self.cfg, self.run_dir)

    def _log(self, record: dict) -> None:
        if not self.dist.is_main:
            return
        self.log_file.write(json.dumps(record) + "\n")
        self.log_file.flush()
        if "z_std" in record and not self._collapse_warned:
            if self._first_z_std is None:
                self._first_z_std = record["z_std"]
            elif (msg := collapse_warning(self._first_z_std, record["z_std"])) is not None:
                print(f"step {record['step']}: {msg}", file=sys.stderr, flush=True)
                self._collapse_warned = True
        if self.tracker is not None:  # the same record
            self.tracker.log(record)

    def _knn_monitor(self) -> None:
        """The kNN monitor's record of the online backbone (rank 0; fashion_scenes runs only)."""
        if self.dist.is_main and self.knn_monitor.applies:
            self._log({"step": self.step, **self.knn_monitor.record(self.method.backbone)})

    def _close_logs(self) -> None:
        if self.log_file:
            self.log_file.close()
        if self.tracker is not None:
            self.tracker.close()


def config_changes(saved_tree: dict, cfg, ignore: tuple[str, ...] = ()) -> str:
    """What differs between the config a run was written with (its tree) and `cfg`, as
    "key: old -> new, ..." ("" when nothing does). A key added to densessl since the run was
    written counts at its default (the run ran with it); the RESUME_FREE_KEYS and `ignore` never
    count."""
    saved = _flatten(saved_tree)
    current = _flatten(to_dict(cfg))
    for k in set(current) - set(saved):  # a key added since the run began: it ran with the default
        parent = k.rpartition(".")[0]
        if parent and not any(s.startswith(parent + ".") for s in saved):
            continue  # a whole section or list item the run did not have (e.g. one more view): a change
        default = field_default(cfg, k)
        if default is not MISSING:
            saved[k] = to_dict(default) if dataclasses.is_dataclass(default) else default
    differ = sorted(k for k in set(saved) | set(current)
                    if saved.get(k) != current.get(k) and k not in RESUME_FREE_KEYS and k not in ignore)
    return ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differ[:6])


def _device_decode_views(dataset, own_views, cfg) -> tuple:
    """(EncodedViews, collate_encoded) for data.decode_on=device, or one ConfigError saying why not."""
    from densessl.data.device_decode import DECODE_ON, EncodedViews, collate_encoded

    if cfg.data.decode_on not in DECODE_ON:
        raise ConfigError(f"data.decode_on={cfg.data.decode_on!r}; expected one of {', '.join(DECODE_ON)}")
    if own_views is not None or not hasattr(dataset, "encoded"):
        what = "makes frame pairs of its videos" if own_views is not None else "has no image files"
        raise ConfigError(f"data.decode_on=device decodes the image files of data.dataset=imagefolder or shards "
                          f"for crop views; data.dataset={cfg.data.dataset} with method {cfg.method.name} {what}: "
                          f"set data.decode_on=workers")
    grids = [i for i, g in enumerate(cfg.views) if g.grid > 0]
    if grids:
        raise ConfigError(f"data.decode_on=device cuts crop views; views[{grids[0]}] is a pyramid grid "
                          f"(grid={cfg.views[grids[0]].grid}), cut on the loader workers: set data.decode_on=workers")
    return EncodedViews(dataset, ViewSampler(cfg.views), seed=cfg.train.seed), collate_encoded


def _to_device(batch: dict, device) -> dict:
    """Tensors and lists of tensors (per-view geometry) to the device, without blocking."""
    def move(v):
        if torch.is_tensor(v):
            return v.to(device, non_blocking=True)
        if isinstance(v, list) and v and torch.is_tensor(v[0]):
            return [x.to(device, non_blocking=True) for x in v]
        return v
    return {k: move(v) for k, v in batch.items()}


def _flatten(d, prefix=""):
    """Dotted keys of a config dict; lists of mappings (views) by index: views.0.blur_p."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                out.update(_flatten(x, f"{key}.{i}."))
        else:
            out[key] = v
    return out
