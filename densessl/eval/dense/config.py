"""The configuration of the frozen dense probes: one dataclass, presets (eval/presets/dense-*.yaml),
typed overrides.

:class:`DenseConfig` extends the image-level :class:`~densessl.eval.protocols.EvalConfig`, so
the backbone (``model``, ``seed``, ``random_init_seed``), the BatchNorm handling (``bn_stats``),
``precision``, ``device`` and ``out`` mean exactly what they mean for ``densessl eval frozen``,
and :func:`~densessl.eval.backbone.load_backbone` reads it unchanged. The inherited
probe fields keep their image-level meaning and apply to the *region* probe, which is that
kNN and that linear probe run on RoIAlign features: ``k``, ``temperature``, ``chunk_size``
(weighted kNN) and ``epochs``, ``lr``, ``weight_decay``, ``batch_size`` (the SGD linear
probe of eval/linear.py). Each dense probe has its own section (``retrieval.*``, ``seg.*``,
``cluster.*``, ``region.*``).

Stage sets are strings: ``c4`` one stage, ``c3+c4`` several, upsampled bilinearly to the
finest of them and concatenated along channels (the region probe concatenates pooled vectors).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from densessl.config import ConfigError, DataConfig
from densessl.eval.protocols import EvalConfig, check_eval_data
from densessl.models.backbones import STAGES


@dataclass
class DenseData(DataConfig):
    """``dataset``: fashion_scenes (built in) | voc (data.root: VOC folder with SegmentationClass)
    | coco (data.root: folder with annotations/instances_<split>.json). VOC/COCO images and
    masks are resized to ``size`` x ``size`` (bilinear / nearest), boxes scaled with them."""
    train_split: str = "train"
    val_split: str = "val"


@dataclass
class RetrievalConfig:
    stages: list[str] = field(default_factory=lambda: ["c4", "c3", "c3+c4"])
    k: int = 30
    temperature: float = 0.02
    memory_size: int = 16384  # patches in the memory at most (Hummingbird's bounded memory)
    fractions: list[float] = field(default_factory=lambda: [1 / 16, 1 / 4, 1.0])  # of the training images
    sampling: str = "rare"  # rare: rare-class patches first (Hummingbird) | uniform
    chunk_size: int = 1024  # queries per similarity matmul


@dataclass
class LinearSegConfig:
    stages: list[str] = field(default_factory=lambda: ["c3", "c4", "c5", "c3+c4+c5"])
    lr_grid: list[float] = field(default_factory=lambda: [1e-3, 1e-2, 1e-1])
    holdout: float = 0.2  # fraction of the TRAINING images that scores the lr grid
    epochs: int = 20
    weight_decay: float = 1e-4
    batch_size: int = 64  # images per step
    # training loss on masks downsampled (nearest) to this side, as Leopart's 100x100 at 448 px;
    # None: the full label size. Scoring is always at the full label size.
    train_label_size: Optional[int] = 16


@dataclass
class OverclusterConfig:
    stages: list[str] = field(default_factory=lambda: ["c4", "c3"])
    pca_dim: int = 32
    seeds: int = 5
    iters: int = 50  # Lloyd iterations at most (stops earlier when assignments settle)
    overcluster_k: Optional[int] = None  # None: points / points_per_cluster, at least 2 x classes
    points_per_cluster: int = 2300  # Leopart: VOC val 1449 x 28 x 28 patches / K=500


@dataclass
class RegionConfig:
    stages: list[str] = field(default_factory=lambda: ["c3", "c4", "c5", "c3+c4+c5"])
    output_size: int = 2  # RoIAlign output (output_size x output_size, averaged)
    sampling_ratio: int = 2
    size_bins: str = "terciles"  # terciles (of the training boxes' areas) | coco (32^2, 96^2 px)


@dataclass
class DenseConfig(EvalConfig):
    data: DenseData = field(default_factory=DenseData)
    preset: Optional[str] = "scenes"
    num_train: Optional[int] = 2000  # training images (None: the whole split; fashion_scenes: data.num_scenes)
    num_test: Optional[int] = 500  # validation images (None: the whole split)
    probes: list[str] = field(default_factory=lambda: ["retrieval", "linear_seg", "overcluster", "region"])
    extract_batch_size: int = 64
    store_dtype: str = "float32"  # dense features kept on the CPU as float32 | float16 | bfloat16
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    seg: LinearSegConfig = field(default_factory=LinearSegConfig)
    cluster: OverclusterConfig = field(default_factory=OverclusterConfig)
    region: RegionConfig = field(default_factory=RegionConfig)


PROBES = ("retrieval", "linear_seg", "overcluster", "region")


def dense_config(overrides: list[str]) -> DenseConfig:
    from densessl.eval.transfer import transfer_config

    cfg = transfer_config(DenseConfig, "dense", overrides)  # presets: eval/presets/dense-*.yaml
    check_config(cfg)
    return cfg


def parse_stage_set(name: str) -> tuple[str, ...]:
    stages = tuple(s.strip() for s in name.split("+"))
    bad = [s for s in stages if s not in STAGES]
    if not stages or bad:
        raise ConfigError(f"stage set {name!r}: expected stages from {', '.join(STAGES)} joined by '+', e.g. c3+c4")
    return stages


def check_config(cfg: DenseConfig) -> None:
    """Fail early, naming the key, on values the probes cannot use."""
    check_eval_data(cfg.data)
    bad = [p for p in cfg.probes if p not in PROBES]
    if bad:
        raise ConfigError(f"probes: unknown probe {bad[0]!r}; expected some of {', '.join(PROBES)}")
    for section in ("retrieval", "seg", "cluster", "region"):
        for s in getattr(cfg, section).stages:
            parse_stage_set(s)
    r, s, c = cfg.retrieval, cfg.seg, cfg.cluster
    # (ok, key, value, what was expected): a refusal names the key, the value given and the rule
    checks = [
        (r.k >= 1, "retrieval.k", r.k, ">= 1"), (r.temperature > 0, "retrieval.temperature", r.temperature, "> 0"),
        (r.memory_size >= 1, "retrieval.memory_size", r.memory_size, ">= 1"),
        (bool(r.fractions) and all(0 < f <= 1 for f in r.fractions), "retrieval.fractions", r.fractions,
         "fractions in (0, 1]"),
        (r.sampling in ("rare", "uniform"), "retrieval.sampling", r.sampling, "rare or uniform"),
        (bool(s.lr_grid) and all(lr > 0 for lr in s.lr_grid), "seg.lr_grid", s.lr_grid, "positive learning rates"),
        (0 < s.holdout < 1, "seg.holdout", s.holdout, "a fraction in (0, 1)"),
        (s.epochs >= 1, "seg.epochs", s.epochs, ">= 1"),
        (c.seeds >= 1, "cluster.seeds", c.seeds, ">= 1"), (c.pca_dim >= 1, "cluster.pca_dim", c.pca_dim, ">= 1"),
        (cfg.region.size_bins in ("terciles", "coco"), "region.size_bins", cfg.region.size_bins, "terciles or coco"),
        (cfg.store_dtype in ("float32", "float16", "bfloat16"), "store_dtype", cfg.store_dtype,
         "float32, float16 or bfloat16"),
        (cfg.precision in ("fp32", "bf16"), "precision", cfg.precision, "fp32 or bf16"),
        (cfg.data.dataset in ("fashion_scenes", "moving_scenes", "voc", "coco"), "data.dataset", cfg.data.dataset,
         "fashion_scenes, moving_scenes, voc or coco (the probes need per-pixel labels; an image folder's "
         "class labels serve `densessl eval frozen`)"),
    ]
    for ok, key, value, expected in checks:
        if not ok:
            raise ConfigError(f"{key}={value!r}: expected {expected}")
