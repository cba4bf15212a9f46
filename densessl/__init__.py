"""densessl: self-supervised pretraining of backbones with good per-region features, and its evaluation."""

__version__ = "0.2.0"
