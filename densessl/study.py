"""``densessl study NAME``: a declared grid of pretrainings and evaluations, resumable.

A study (``densessl/studies/NAME.yaml``, or a YAML path) lists runs (a recipe, overrides, a
budget) x seeds, the random-init baseline at several weight seeds, and protocols (``densessl
eval`` commands with overrides). Every (run, seed) is pretrained into its own run folder
and every protocol evaluated on it; each evaluation appends one row to the table
(``results.jsonl``). Rerunning the same command skips every row already in the table and
resumes a pretraining that was killed from its last checkpoint, so a study can be stopped
anywhere. Under torchrun, pretraining uses every process and rank 0 evaluates while the others
wait.

A row: study, run, recipe, seed, epochs, protocol, metrics (flat name -> value), config_hash
(the resolved pretraining config without run folder and logging keys), eval_hash, minutes
(pretraining, of the process that finished it: a killed process's minutes are not counted;
evaluation), machine, densessl version, finished_at.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from densessl.config import ConfigError, build_config, from_dict, to_dict
from densessl.eval.commands import EVAL_COMMANDS, FINETUNE_COMMANDS, FROZEN_COMMANDS

STUDIES_DIR = Path(__file__).parent / "studies"


@dataclass
class StudyRun:
    recipe: str
    name: str | None = None  # the row's run name (default: the recipe)
    epochs: int | None = None  # the budget (default: the recipe's train.epochs)
    overrides: list[str] = field(default_factory=list)
    seeds: list[int] | None = None  # default: the study's seeds
    protocols: list[str] | None = None  # the protocol names this run is evaluated by (default: all)

    @property
    def label(self) -> str:
        return self.name or self.recipe


@dataclass
class StudyProtocol:
    name: str
    eval: str  # a `densessl eval` command: frozen, knn, linear, multilabel, dense, retrieval, ...
    overrides: list[str] = field(default_factory=list)


@dataclass
class RandomBaseline:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    overrides: list[str] = field(default_factory=list)  # the architecture: model.backbone=... model.width=...


@dataclass
class Claim:
    claim: str  # what the paper says, in words
    protocol: str
    metric: str
    better: str  # run name expected higher
    worse: str  # run name expected lower
    source: str = ""
    scale: float = 100.0  # points per unit of the metric (100: a fraction; 1: already in points, e.g. AP)


@dataclass
class Clears:
    """Does a run clear the random init's range on its paper's own protocol (every seed above it)?"""
    run: str
    protocol: str
    metric: str
    paper: str = ""  # the paper's protocol, in words
    scale: float = 100.0
    why: str = ""  # a doc link (relative to the results page): why the method does not clear at this scale


@dataclass
class ReportMetric:
    protocol: str
    metric: str
    label: str
    scale: float = 100.0  # points per unit of the metric (100: a fraction; 1: already in points, e.g. AP)


@dataclass
class Headline:
    """The few figures README.md quotes, written there by `densessl report --readme`."""
    run: str  # the run README's main job trains (its recipe and budget)
    metrics: list[str] = field(default_factory=list)  # labels of report metrics


@dataclass
class Study:
    name: str
    description: str = ""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    pretrain_overrides: list[str] = field(default_factory=list)  # added to every run
    random: RandomBaseline = field(default_factory=RandomBaseline)
    runs: list[StudyRun] = field(default_factory=list)
    protocols: list[StudyProtocol] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)
    clears: list[Clears] = field(default_factory=list)  # each method against the random init, its own protocol
    report: list[ReportMetric] = field(default_factory=list)  # the headline metrics of the results page
    headline: Headline | None = None


def find_study(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if p.exists():
            return p
        raise ConfigError(f"study file {p} not found")
    candidate = STUDIES_DIR / f"{name_or_path}.yaml"
    if not candidate.exists():
        known = ", ".join(sorted(q.stem for q in STUDIES_DIR.glob("*.yaml")))
        raise ConfigError(f"study '{name_or_path}' not found (a .yaml path or one of: {known})")
    return candidate


def load_study(name_or_path: str) -> Study:
    import yaml

    path = find_study(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse study {path}: {' '.join(str(e).split())}") from e
    study = from_dict(Study, raw)
    names = [r.label for r in study.runs]
    if "random" in names or len(set(names)) != len(names):
        raise ConfigError(f"{path}: run names must be unique and not 'random' (got {names}); set runs[i].name")
    if study.headline is not None:
        labels = [m.label for m in study.report]
        if study.headline.run not in names or not set(study.headline.metrics) <= set(labels):
            raise ConfigError(f"{path}: headline names run {study.headline.run!r} and metrics "
                              f"{study.headline.metrics}; expected a declared run and labels of report metrics "
                              f"({', '.join(labels)})")
    protos = [p.name for p in study.protocols]
    if len(set(protos)) != len(protos):
        raise ConfigError(f"{path}: protocol names must be unique (got {protos})")
    for p in study.protocols:
        if p.eval not in EVAL_COMMANDS:
            raise ConfigError(f"{path}: protocol {p.name!r} has eval={p.eval!r}; expected one of "
                              f"{', '.join(EVAL_COMMANDS)}")
    for r in study.runs:
        unknown = sorted(set(r.protocols or ()) - set(protos))
        if unknown:
            raise ConfigError(f"{path}: run {r.label!r} names protocols {unknown}, which the study does not declare")
    for c in study.claims:
        for key, value in (("protocol", c.protocol), ("better", c.better), ("worse", c.worse)):
            if value not in (protos if key == "protocol" else names + ["random"]):
                raise ConfigError(f"{path}: claim {c.claim!r} names {key}={value!r}, which the study does not declare")
    for c in study.clears:
        if c.run not in names or c.protocol not in protos:
            raise ConfigError(f"{path}: clears entry names run {c.run!r} and protocol {c.protocol!r}; expected a "
                              f"declared run and protocol")
    return study


# ---------------------------------------------------------------- the table


def read_table(path: Path) -> list[dict]:
    """The rows of a results table (JSONL, as metrics.jsonl); a line cut by a kill mid-write is
    skipped, with a message."""
    from densessl.common.metrics_jsonl import read_metrics

    return read_metrics(path) if Path(path).exists() else []


def row_key(row: dict) -> tuple:
    return row["run"], row["seed"], row["protocol"]


def append_row(path: Path, row: dict) -> None:
    """One JSON line, written with one call and fsynced: a kill leaves the row whole or cut."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cut = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    with open(path, "a") as f:
        f.write(("\n" if cut else "") + json.dumps(row) + "\n")  # after a cut line: on a line of its own
        f.flush()
        os.fsync(f.fileno())


def flat_metrics(result: dict, eval_command: str) -> dict[str, float]:
    """The headline numbers of one eval result, as flat names: ``knn_top1``, ``retrieval.mIoU.c3+c4.1``."""
    out: dict[str, float] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix] = float(value)

    for name, section in result.items():
        if not isinstance(section, dict) or name in ("model", "features"):
            continue
        if eval_command in FROZEN_COMMANDS + FINETUNE_COMMANDS:  # {"knn_top1": ..., "settings": ...}
            walk("", {k: v for k, v in section.items() if k not in ("settings", "seconds")})
        else:  # dense: summary tables beside "results" (per-class detail) and "settings"
            walk(name, {k: v for k, v in section.items() if k not in ("results", "settings", "seconds", "skipped")})
    return out


def config_hash(tree: dict) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _pretrain_hash(cfg) -> str:
    from densessl.engine.trainer import RESUME_FREE_KEYS

    tree = to_dict(cfg)
    tree.pop("run_dir", None)
    for key in RESUME_FREE_KEYS:
        section, _, name = key.partition(".")
        tree.get(section, {}).pop(name, None)
    return config_hash(tree)


# ---------------------------------------------------------------- running


@dataclass
class Unit:
    """One backbone of the study: a (run, seed) to pretrain, or a random-init weight seed."""
    run: str
    seed: int
    recipe: str | None = None
    overrides: list[str] = field(default_factory=list)
    protocols: list[str] | None = None  # None: every protocol of the study


def unit_protocols(study: Study, unit: Unit) -> list[StudyProtocol]:
    return [p for p in study.protocols if unit.protocols is None or p.name in unit.protocols]


def units(study: Study) -> list[Unit]:
    out = [Unit("random", s) for s in study.random.seeds]
    for r in study.runs:
        budget = [f"train.epochs={r.epochs}"] if r.epochs is not None else []
        for s in (r.seeds if r.seeds is not None else study.seeds):
            out.append(Unit(r.label, s, r.recipe, [*study.pretrain_overrides, *r.overrides, *budget], r.protocols))
    return out


def run_study(study: Study, table: Path, runs_dir: Path, stop_after_minutes: float | None = None,
              only: list[str] | None = None, protocols: list[str] | None = None,
              shard: tuple[int, int] = (0, 1), seeds: list[int] | None = None, log=print) -> dict:
    """Pretrain and evaluate what the table lacks; returns counts of rows written and skipped.
    `only` (run names) and `protocols` (protocol names) restrict the work: a unit none of whose
    wanted protocols is left is neither pretrained nor evaluated (cheap protocols first, say).
    `shard` (k, n): only the units whose place in the declared order is k modulo n, so that n
    processes (one per core, say) share a study without overlap; they append to the same table.
    `seeds`: only these pretraining (and random-init) seeds, e.g. seed 0 of every run first."""
    from densessl.common.distributed import init_distributed

    _check_names("--only", only, {r.label for r in study.runs} | {"random"}, study.name)
    _check_names("--protocols", protocols, {p.name for p in study.protocols}, study.name)
    _check_names("--seeds", [str(x) for x in seeds or ()], {str(u.seed) for u in units(study)}, study.name)

    start = time.perf_counter()
    dist = init_distributed("auto", timeout_s=4 * 3600)  # other ranks wait while rank 0 evaluates
    done = {row_key(r) for r in read_table(table)}
    written = skipped = 0
    k_shard, n_shard = shard
    if not 0 <= k_shard < n_shard:
        raise ConfigError(f"--shard {k_shard}/{n_shard}: expected k/n with 0 <= k < n")
    mine = {(u.run, u.seed) for i, u in enumerate(units(study)) if i % n_shard == k_shard
            and (not only or u.run in only) and (not seeds or u.seed in seeds)}  # this process's units
    for unit in work_order(study, runs_dir):
        if (unit.run, unit.seed) not in mine:
            continue
        wanted = [p for p in unit_protocols(study, unit) if not protocols or p.name in protocols]
        missing = [p for p in wanted if (unit.run, unit.seed, p.name) not in done]
        skipped += len(wanted) - len(missing)
        if not missing:
            continue
        if stop_after_minutes is not None and (time.perf_counter() - start) / 60 > stop_after_minutes:
            log(f"study {study.name}: stopping after {stop_after_minutes} minutes (stop_after_minutes); "
                f"rerun the same command to continue")
            break
        spec, info = _backbone(study, unit, runs_dir, dist, log)
        if dist.is_main:
            for p in missing:
                row = _evaluate(study, unit, p, spec, info, runs_dir, log)
                append_row(table, row)
                written += 1
        if dist.world_size > 1:
            import torch.distributed

            torch.distributed.barrier()
    log(f"study {study.name}: {written} rows written, {skipped} already in {table}")
    return {"written": written, "skipped": skipped}


def _check_names(option: str, given: list[str] | None, declared: set[str], study: str) -> None:
    unknown = sorted(set(given or ()) - declared)
    if unknown:
        raise ConfigError(f"{option} {', '.join(unknown)}: not declared in study {study!r}; "
                          f"expected one of {', '.join(sorted(declared))}")


def work_order(study: Study, runs_dir: Path) -> list[Unit]:
    """The study's units, those already pretrained in `runs_dir` first (their missing rows cost only
    evaluation), then the declared order."""
    every = units(study)
    return sorted(every, key=lambda u: not (u.recipe and (unit_dir(runs_dir, u) / PRETRAINED).exists()))


PRETRAINED = "study_minutes.json"  # written when a unit's pretraining has finished (its minutes)


def unit_dir(runs_dir: Path, unit: Unit) -> Path:
    return Path(runs_dir) / unit.run / f"seed{unit.seed}"


def _backbone(study: Study, unit: Unit, runs_dir: Path, dist, log) -> tuple[str, dict]:
    """(eval spec, row fields): the random baseline, or the unit's pretrained checkpoint."""
    if unit.recipe is None:
        return "random", {"recipe": None, "epochs": 0, "config_hash": None, "pretrain_minutes": 0.0}
    from densessl.common.distributed import rank_failures_reported
    from densessl.engine.trainer import Trainer

    folder = unit_dir(runs_dir, unit)
    cfg = build_config(unit.recipe, [*unit.overrides, f"train.seed={unit.seed}", f"run_dir={folder}"])
    # pretraining minutes of the process that finished it (a killed process's minutes are not counted)
    timing = folder / PRETRAINED
    last = folder / "checkpoints" / "last.pt"
    info = {"recipe": unit.recipe, "epochs": cfg.train.epochs, "config_hash": _pretrain_hash(cfg)}
    done = json.loads(timing.read_text()) if timing.exists() and last.exists() else {}
    if "config_hash" in done:  # pretrained by an earlier invocation: only its evaluations are missing
        if done["config_hash"] != info["config_hash"]:  # a changed run, or keys densessl added since (their
            import yaml

            from densessl.engine.trainer import config_changes  # defaults are what the run had: no change)

            saved = folder / "config.yaml"
            changes = config_changes(yaml.safe_load(saved.read_text()), cfg, ignore=("run_dir",)) \
                if saved.is_file() else "its config.yaml is missing"
            if changes:
                raise ConfigError(f"{folder} was pretrained with another config than the study now declares for "
                                  f"{unit.run} seed {unit.seed} ({changes}); give the changed run another name "
                                  f"(runs[i].name), or delete that folder to pretrain it again")
        # the rows of one pretraining carry the hash it was written with
        return str(last), {**info, "config_hash": done["config_hash"], "pretrain_minutes": round(done["minutes"], 2)}
    t0 = time.perf_counter()
    log(f"study {study.name}: pretraining {unit.run} seed {unit.seed} ({cfg.train.epochs} epochs) in {folder}")
    with rank_failures_reported(folder / "checkpoints" / "last.pt"):
        result = Trainer(cfg, dist_info=dist).fit()  # resumes a killed run from its last checkpoint
    minutes = (time.perf_counter() - t0) / 60
    if dist.is_main:
        timing.write_text(json.dumps({"minutes": minutes, "config_hash": info["config_hash"]}))
        from densessl.report import plot_losses  # the run folder's loss curve, as `densessl pretrain` draws it

        plot_losses(folder / "metrics.jsonl", folder / "loss.png")
    return result["checkpoint"], {**info, "pretrain_minutes": round(minutes, 2)}


def _evaluate(study: Study, unit: Unit, protocol: StudyProtocol, spec: str, info: dict, runs_dir: Path,
              log) -> dict:
    from densessl import __version__
    from densessl.common.machine import describe_machine
    from densessl.eval.commands import run_eval
    from densessl.eval.protocols import write_metrics

    out = unit_dir(runs_dir, unit) / "eval" / f"{protocol.name}.json"
    overrides = [*protocol.overrides, f"out={out}"]
    if spec == "random":
        overrides = [*study.random.overrides, *overrides, f"random_init_seed={unit.seed}"]
    t0 = time.perf_counter()
    log(f"study {study.name}: {protocol.name} ({protocol.eval}) on {unit.run} seed {unit.seed}")
    ev = run_eval(protocol.eval, spec, overrides, log=lambda *a: None)
    result, cfg = ev.result, ev.cfg
    write_metrics(result, out)
    eval_tree = to_dict(cfg)
    eval_tree.pop("out", None)
    return {"study": study.name, "run": unit.run, "recipe": info["recipe"], "seed": unit.seed,
            "epochs": info["epochs"], "protocol": protocol.name, "eval": protocol.eval,
            "metrics": flat_metrics(result, protocol.eval), "config_hash": info["config_hash"],
            "eval_hash": config_hash(eval_tree), "pretrain_minutes": info["pretrain_minutes"],
            "eval_minutes": round((time.perf_counter() - t0) / 60, 2), "machine": describe_machine(),
            "densessl": __version__, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def default_paths(study: Study) -> tuple[Path, Path]:
    """(table, runs folder) of a study when not given: runs/studies/NAME/."""
    base = Path("runs") / "studies" / study.name
    return base / "results.jsonl", base


__all__ = ["Study", "load_study", "read_table", "run_study", "flat_metrics", "units", "default_paths"]
