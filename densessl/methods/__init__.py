"""Method registry: each method file registers its config dataclass and its class."""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import pkgutil

_REGISTRY: dict[str, tuple[type, type]] = {}


def register(name: str, config_cls: type):
    def wrap(cls):
        _REGISTRY[name] = (config_cls, cls)
        return cls
    return wrap


def _load_all():
    """Import every method file in this folder (adding a method = adding a file)."""
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"densessl.methods.{info.name}")


def available() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def method_config(data):
    """Validate the `method:` section against the chosen method's config dataclass."""
    from densessl.config import ConfigError, from_dict

    if dataclasses.is_dataclass(data):
        return data
    _load_all()
    name = data.get("name")
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"method.name={name!r} is not a known method{hint} (known: {', '.join(sorted(_REGISTRY))})")
    return from_dict(_REGISTRY[name][0], data, "method")


def build_method(method_cfg, backbone):
    _load_all()
    return _REGISTRY[method_cfg.name][1](method_cfg, backbone)
