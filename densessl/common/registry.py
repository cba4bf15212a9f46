"""The method registry: method name -> (its config dataclass, its class).

Each method file registers itself (`@register("byol", BYOLConfig)`); config.py validates the
`method:` section against `method_schema(name)`; `method_class(name)` is the class to build.
Living here, below config, it lets config check `method:` without importing densessl.methods:
the method files are found by package name at run time (adding a method = adding a file), as a
plugin registry finds its plugins.
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil

from densessl.common.errors import ConfigError

METHODS_PACKAGE = "densessl.methods"  # its method files register themselves when imported

_REGISTRY: dict[str, tuple[type, type]] = {}


def register(name: str, config_cls: type):
    def wrap(cls):
        _REGISTRY[name] = (config_cls, cls)
        return cls
    return wrap


def _load_all() -> None:
    """Import every method file of the methods package: each registers itself (the shared parts,
    `densessl.methods.PARTS`, register nothing and come with the method files that use them)."""
    package = importlib.import_module(METHODS_PACKAGE)
    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in package.PARTS:
            importlib.import_module(f"{METHODS_PACKAGE}.{info.name}")


def available() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def method_schema(name) -> type:
    """The config dataclass that method `name` registered; a ConfigError (with the closest known
    name) for an unknown one."""
    _load_all()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"method.name={name!r} is not a known method{hint} (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name][0]


def method_class(name: str) -> type:
    """The class that method `name` registered (its config validated: method_schema)."""
    _load_all()
    return _REGISTRY[name][1]
