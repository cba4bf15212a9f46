"""Frozen dense probes: what a backbone's per-pixel and per-region features are worth, without
fine-tuning (docs/dense-eval.md).

- ``retrieval``: Hummingbird-style dense nearest-neighbour label transfer (no training);
- ``linear_seg``: BatchNorm + 1x1 conv on one stage or a concatenation of stages;
- ``overcluster``: k-means on validation patches, Hungarian (K = classes) and many-to-one
  (K >> classes) matching;
- ``region``: RoIAlign features at the ground-truth boxes, linear and kNN classifiers, by size.

All read the stage maps of one extraction (``features.extract_dense``); the backbone comes from
``densessl.eval.backbone.load_backbone`` whether it is a checkpoint or ``random``.
"""
from densessl.eval.dense.config import DenseConfig, dense_config

__all__ = ["DenseConfig", "dense_config"]
