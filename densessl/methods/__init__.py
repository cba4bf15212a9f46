"""The methods: one file per method, registered by name (densessl.common.registry).

Method files import only the shared parts (PARTS) and the lower layers, never each other."""
from __future__ import annotations

from densessl.common.registry import available, method_class, register  # noqa: F401

PARTS = {"base", "losses", "momentum", "prototypes", "pixpro_core"}  # shared parts, not methods


def build_method(method_cfg, backbone):
    return method_class(method_cfg.name)(method_cfg, backbone)
