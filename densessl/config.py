"""Typed configuration: YAML recipes, `key.sub=value` overrides, strict validation.

A recipe is a YAML file (or a name in densessl/recipes/). `extends: NAME` or `extends: [NAME, ...]`
merges the named files underneath, in order (later ones win, the recipe's own keys win over all):
other recipes, the shared bases in recipes/_base/ (`_base/scenes`) and the view sets in
recipes/views/ (`views/byol-pair-64`). Lists do not merge element-wise: a view set is a whole
`views:` list, and a recipe that writes its own `views:` replaces the inherited one entirely.
Overrides from the command line are parsed by OmegaConf's dotlist rules.
The merged tree is then checked against the dataclasses below: an unknown key is rejected
with the closest valid key suggested, a wrong type names the key, the expected type and the
value. `method` is validated against the schema that the chosen method registers.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf

from densessl.common.errors import ConfigError  # noqa: F401  (raised here; importers take it from here too)
from densessl.common.registry import method_schema

RECIPES_DIR = Path(__file__).parent / "recipes"


def require_extra(module: str, extra: str, purpose: str):
    """Import an optional dependency, or fail with one line naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"{purpose} needs the Python package {module.split('.')[0]!r}, which is not installed; "
                          f"pip install 'densessl[{extra}]'") from e


MISSING = object()  # field_default's answer for a key the schema does not define


def field_default(cfg, dotted: str):
    """The schema default of a dotted config key (e.g. data.min_side) of `cfg`, or MISSING."""
    *path, name = dotted.split(".")
    obj = cfg
    for part in path:  # a number indexes a list (views.0.blur_kind)
        if part.isdigit() and isinstance(obj, (list, tuple)):
            obj = obj[int(part)] if int(part) < len(obj) else None
        else:
            obj = getattr(obj, part, None)
    if obj is None or not dataclasses.is_dataclass(obj):
        return MISSING
    for f in dataclasses.fields(obj):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            return f.default_factory() if f.default_factory is not dataclasses.MISSING else MISSING
    return MISSING


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


BLUR_KINDS = ("gaussian", "resize")


@dataclass
class ViewConfig:
    """One group of crops: `count` crops of `size` px, with their augmentation."""
    size: int = 64
    count: int = 1
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_frac: float = 0.1  # kernel side as a fraction of the crop (BYOL: 23 px at 224)
    # gaussian (blur_sigma, blur_kernel_frac) | resize: SCRL's code, down by 1.1, 1.2 or 1.5 and
    # back up, bicubic (blur_sigma and blur_kernel_frac unused)
    blur_kind: str = "gaussian"
    solarize_p: float = 0.0
    # Pyramid patches (SS-PRL). grid > 0: one region per image is drawn with `scale`/`ratio`,
    # resized to region_size x region_size (0: grid * size), cut into grid x grid cells, and
    # each cell gives `count` patches of `size` px (a random crop inside the cell, own flip, own
    # photometric augmentation): count * grid**2 view slots, view-major (all cells of patch
    # view 0 in row-major order, then view 1, ...). grid = 0: plain crops, as before.
    grid: int = 0
    region_size: int = 0

    def __post_init__(self):
        if self.blur_kind not in BLUR_KINDS:
            raise ConfigError(f"key 'views.blur_kind' expects one of {', '.join(BLUR_KINDS)}, got {self.blur_kind!r}")


@dataclass
class DataConfig:
    dataset: str = "fashion_scenes"  # fashion_scenes | imagefolder | shards (data.root: `densessl data shard` OUT)
    root: Optional[str] = None  # imagefolder: the folder; fashion_scenes: Fashion-MNIST IDX folder
    num_scenes: int = 20000
    size: Optional[int] = 64  # fashion_scenes canvas side; imagefolder: resize+centre-crop side (null keeps)
    seed: int = 0
    num_workers: int = 2
    on_error: str = "raise"  # imagefolder: raise | skip unreadable images (and those below min_side), counted
    # imagefolder: an image whose shorter side is below this many px is unusable (on_error decides:
    # an error naming it, or skipped and counted with the unreadable ones). 16: below it an image
    # holds less than one C5 cell of resnet18_small (stride 16) and every crop is an upsampled
    # smear of a few pixels (1x1, 1-px-wide strips); icons and thumbnails start at 16 px.
    min_side: int = 16
    style: str = "textured"  # fashion_scenes backgrounds and tints: textured | uniform | plain | photo
    # imagefolder / shards, pretraining: where images are decoded. workers: in the loader workers (default);
    # device: the workers read bytes and draw crops, the training process decodes on train.device
    # (nvJPEG on a GPU) and cuts the views there (densessl/data/device_decode.py)
    decode_on: str = "workers"


@dataclass
class ModelConfig:
    backbone: str = "resnet18_small"
    width: Optional[int] = None
    # true: the last BN gamma of every residual block starts at 0 (torchvision's zero_init_residual;
    # PixPro's code does it)
    zero_init_residual: bool = False


@dataclass
class EvalBackboneConfig:
    """The backbone keys every `densessl eval` protocol takes (frozen probes, VOC/COCO multi-label,
    detection, segmentation): each protocol's config derives from this one, so
    `random_init_seed=n` means the same weights everywhere. Protocols may change the defaults."""
    model: ModelConfig = field(default_factory=ModelConfig)  # the `random` baseline's architecture
    seed: int = 0  # the protocol's seed (probe / head init, data order)
    # the `random` baseline's weights (None: `seed`); the protocol keeps `seed`. A pretraining run
    # with train.seed=n starts from exactly the weights of random_init_seed=n: its own baseline.
    random_init_seed: Optional[int] = None

    def init_seed(self) -> int:
        """The seed of the `random` baseline's weights."""
        return self.seed if self.random_init_seed is None else self.random_init_seed


@dataclass
class OptimConfig:
    name: str = "lars"  # lars | sgd | adamw
    lr: float = 0.3  # base lr at batch 256; the applied lr is lr * batch_size / 256
    weight_decay: float = 1e-6
    weight_decay_end: Optional[float] = None  # cosine wd schedule end (None: constant)
    momentum: float = 0.9
    eta: float = 1e-3  # LARS trust coefficient
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 10.0
    warmup_start_lr: float = 0.0  # lr at step 0 of the warm-up, per 256 like lr (SwAV's start_warmup)
    min_lr: float = 0.0
    clip_grad: Optional[float] = None
    # false: biases and norm parameters (ndim <= 1) are decayed too (official MoCo, SwAV's LARC)
    wd_exclude_1d: bool = True
    # false: biases and norm parameters get the LARS trust ratio too (SwAV's LARC)
    lars_exclude_1d: bool = True

    def __post_init__(self):
        if self.warmup_start_lr < 0:
            raise ConfigError(f"key 'optim.warmup_start_lr' expects a learning rate >= 0, got {self.warmup_start_lr!r}")


TRACKERS = ("tensorboard", "wandb", "mlflow", "none")  # train.tracker; densessl/engine/trackers.py


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 256  # global batch, split across ranks
    steps_per_epoch: Optional[int] = None  # None: len(dataset) // batch_size
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    channels_last: Optional[bool] = None  # None: auto (on; measured faster on CPU and GPU)
    sync_bn: bool = True  # only used when world size > 1
    # seconds a rank waits in a collective for the others before it stops with an error (a rank that
    # hangs); longer than any rank-0-only pause (checkpoint write, kNN monitor). torch's gloo default: 30 min
    dist_timeout_s: float = 600.0
    log_every: int = 10
    ckpt_every: int = 100  # steps between `last` checkpoints
    keep_every: int = 0  # steps between kept periodic checkpoints (0: none)
    online_probe: bool = True
    knn_every: int = 0  # steps between kNN monitors on held-out Fashion items (0: off)
    probe_lr: float = 0.1
    device: str = "auto"  # auto | cpu | cuda
    progress: bool = True
    # where rank 0 sends metrics.jsonl's records too: tensorboard | wandb | mlflow | none (densessl/engine/trackers.py)
    tracker: str = "tensorboard"

    def __post_init__(self):
        if self.tracker not in TRACKERS:
            raise ConfigError(f"key 'train.tracker' expects one of {', '.join(TRACKERS)}, got {self.tracker!r}")


@dataclass
class Config:
    method: dict = field(default_factory=lambda: {"name": "byol"})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    views: list[ViewConfig] = field(default_factory=lambda: [ViewConfig(), ViewConfig()])
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run_dir: str = "runs/default"


# ---------------------------------------------------------------- validation


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp, key: str):
    """Check `value` against annotation `tp`; return the value converted (lists -> tuples...)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"key '{key}' expects a mapping ({tp.__name__}), got {type(value).__name__} {value!r}")
        return from_dict(tp, value, key)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"key '{key}' expects a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"key '{key}' expects {len(args)} values, got {len(value)}: {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        return origin(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is Any:
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"key '{key}' expects a mapping, got {type(value).__name__} {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"key '{key}' expects {tp.__name__}, got bool {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"key '{key}' expects {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls, data: dict, path: str = ""):
    """Build dataclass `cls` from a plain dict, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{(path + '.') if path else ''}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown key '{full}'{hint} (valid keys: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


# ---------------------------------------------------------------- loading


# Folders of RECIPES_DIR holding parts that recipes extend; they are not recipes to run.
RECIPE_PARTS = ("_base", "views")
# Old recipe names, still accepted: {old: new}. The CLI says so in one line.
RENAMED_RECIPES = {"moco-scenes": "mocov2-scenes"}


def recipe_names() -> list[str]:
    """The runnable recipes shipped in densessl/recipes/ (bases and view sets are not)."""
    return sorted(q.stem for q in RECIPES_DIR.glob("*.yaml"))


def find_recipe(name_or_path: str) -> Path:
    """A recipe's file: a .yaml path, a recipe name, or an old name (RENAMED_RECIPES)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    name = RENAMED_RECIPES.get(name_or_path, name_or_path)
    if name.split("/")[0] in RECIPE_PARTS:
        raise ConfigError(f"'{name_or_path}' is a part that recipes extend (densessl/recipes/{name}.yaml), "
                          f"not a recipe; run one of: {', '.join(recipe_names())}")
    candidate = RECIPES_DIR / f"{p.stem if p.suffix else name}.yaml"
    if candidate.exists():
        return candidate
    known = recipe_names()
    close = difflib.get_close_matches(str(name_or_path), known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"recipe '{name_or_path}' not found (a .yaml path or one of: {', '.join(known)}){hint}")


def _find_parent(name: str, child: Path) -> Path:
    """What `extends: name` in `child` names: a recipe, or a part (`_base/NAME`, `views/NAME`)."""
    if name.split("/")[0] not in RECIPE_PARTS:
        return find_recipe(name)
    path = RECIPES_DIR / f"{name}.yaml"
    if not path.exists():
        parts = sorted(str(q.relative_to(RECIPES_DIR).with_suffix("")) for d in RECIPE_PARTS
                       for q in (RECIPES_DIR / d).glob("*.yaml"))
        raise ConfigError(f"{child}: extends '{name}', which does not exist (parts: {', '.join(parts)})")
    return path


def load_yaml_tree(path: Path) -> dict:
    """The mapping in a YAML file (recipe, base, view set, eval preset) with ${...} left unresolved."""
    try:
        tree = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    except Exception as e:  # yaml syntax errors
        raise ConfigError(f"cannot parse {path}: {e}") from e
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} holds a {type(tree).__name__}; expected a mapping of config keys")
    return tree


def load_recipe_dict(name_or_path: str, _seen: tuple = ()) -> dict:
    return _load_with_parents(find_recipe(name_or_path), _seen)


def _load_with_parents(path: Path, seen: tuple) -> dict:
    if path in seen:
        raise ConfigError(f"recipe {path} extends itself through {seen}")
    raw = load_yaml_tree(path)
    parents = raw.pop("extends", None)
    if parents is None:
        return raw
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(n, str) for n in parents):
        raise ConfigError(f"{path}: extends expects a name or a list of names, got {parents!r}")
    trees = [_load_with_parents(_find_parent(n, path), seen + (path,)) for n in parents]
    return OmegaConf.to_container(OmegaConf.merge(*trees, raw), resolve=False)


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply `key.sub=value` overrides (YAML-parsed values; `views.1.blur_p=0.1` indexes lists)."""
    conf = OmegaConf.create(tree)
    for o in overrides:
        key, sep, text = o.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{o}' is not of the form key.sub=value")
        try:
            value = yaml.safe_load(text) if text else None
            OmegaConf.update(conf, key, value, merge=True, force_add=True)
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(f"cannot apply override '{o}': {e}") from e
    return OmegaConf.to_container(conf, resolve=True)


def build_config(recipe: str | None, overrides: list[str] = ()) -> Config:
    base = load_recipe_dict(recipe) if recipe else {}
    tree = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(to_dict(Config())), OmegaConf.create(base)))
    return config_from_dict(apply_overrides(tree, list(overrides)))


def to_dict(cfg) -> dict:
    def convert(v):
        if dataclasses.is_dataclass(v):
            return {f.name: convert(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [convert(x) for x in v]
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        return v

    return convert(cfg)


def config_yaml(cfg) -> str:
    """The effective config as YAML (what run folders keep and --print-config shows)."""
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def save_config(cfg: Config, path: Path) -> None:
    Path(path).write_text(config_yaml(cfg))


def _retire_keys(data: dict) -> dict:
    """Map keys densessl no longer has, still written in older run folders and checkpoints (and in
    users' commands), onto the key that replaced them. `train.tensorboard=false` is `train.tracker=none`."""
    train = data.get("train")
    if isinstance(train, dict) and "tensorboard" in train:
        train = dict(train)
        if train.pop("tensorboard") is False and train.get("tracker", "tensorboard") == "tensorboard":
            train["tracker"] = "none"
        data = {**data, "train": train}
    return data


def config_from_dict(data: dict) -> Config:
    cfg = from_dict(Config, _retire_keys(data))
    # `method:` is a plain mapping in Config; it is typed by the schema that its method registered
    cfg.method = from_dict(method_schema(cfg.method.get("name")), cfg.method, "method")
    return cfg
