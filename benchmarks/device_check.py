"""The GPU check (docs/performance.md, "GPU check"): one script, one JSON file, under 8 minutes.

Stages, each in its own try/except, the JSON rewritten (atomically) after every stage and every
contender, so a failing or killed stage keeps what the others measured:

  environment : device name, torch / CUDA / cuDNN versions, CPU, git commit, every setting
  steps       : training steps of the paper-scale recipes (byol-imagenet, pixpro-imagenet,
                swav-imagenet: ResNet-50, 2 x 224 px; SwAV 2 x 224 + 6 x 96) through
                Trainer.train_step on one fixed loader batch (device augmentation, forward,
                backward, LARS, EMA), bf16 autocast, channels_last; beside lightly's BYOL
                (densessl.bench.lightly_byol_step) on the same device, as its example writes it
                (fp32) and with the same bf16 autocast + channels_last. Median step time over
                the timed steps (each synchronised) after warm-up, images/s = batch / median,
                a rate over the same number of unsynchronised steps, peak CUDA memory.
  pretrain    : `python -m densessl pretrain <recipe>` (the real CLI and Trainer) on an
                ImageFolder of JPEGs this script writes, for --pretrain-seconds; images/s and
                data_wait_frac (the share of the step spent waiting on the DataLoader) from
                the run's metrics.jsonl.
  pretrain_device_decode : the same with data.decode_on=device (the workers read bytes and
                draw crops; the JPEGs are decoded on the GPU by nvJPEG, the views cut there).
  compiled    : the steps again with torch.compile (on by default with CUDA); a compile error
                is recorded and that contender is measured eagerly instead.

A stage (or contender) is not started when the time budget (--budget-s) would be exceeded.

    bash benchmarks/device_check.sh [OUT.json] [options]       # GPU sizes (defaults)
    bash benchmarks/device_check.sh --tiny OUT.json            # CPU-sized check of every code path
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from densessl import bench  # noqa: E402
from densessl.common.machine import describe_machine  # noqa: E402

METHODS = ("byol", "pixpro", "swav")
STAGES = ("steps", "pretrain", "pretrain_device_decode", "compiled")
# sizes: GPU defaults, and the tiny mode that runs every code path on a CPU in seconds
GPU = dict(batch=64, size=224, small_size=96, warmup=5, steps=20, pretrain_seconds=75.0, pretrain_steps=100_000,
           jpegs=4000, jpeg_min_side=320, jpeg_max_side=500, workers=None, log_every=20, lightly_backbone="resnet50",
           threads=None)
# tiny: one thread (tiny models on a loaded 2-core machine: a second thread costs seconds a step)
TINY = dict(batch=4, size=32, small_size=16, warmup=1, steps=2, pretrain_seconds=90.0, pretrain_steps=4,
            jpegs=16, jpeg_min_side=40, jpeg_max_side=64, workers=1, log_every=1, lightly_backbone="resnet18",
            threads=1)
TINY_MODEL = ["model.backbone=resnet18_small", "model.width=8", "method.proj_hidden_dim=32", "method.proj_dim=16"]
TINY_HEADS = {"byol": ["method.pred_hidden_dim=32"], "pixpro": ["method.pred_hidden_dim=32"],
              "swav": ["method.num_prototypes=16"]}
# seconds a piece of work is expected to take at GPU sizes: it is started only if it fits the budget
EXPECTED_S = {"eager": 25.0, "compiled": 120.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="device_check", description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", default=None,
                   help="the JSON file (default: $OUT/device_check.json, else runs/device_check.json)")
    p.add_argument("--tiny", action="store_true", help="CPU-sized run of every code path (tests)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="auto: on where CUDA is present")
    p.add_argument("--compile-methods", nargs="+", choices=METHODS, default=["byol"],
                   help="the methods measured compiled (pixpro's and swav's forwards read the step number, "
                        "which may recompile every step)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--no-lightly", dest="lightly", action="store_false")
    p.add_argument("--pretrain-recipe", default="byol-imagenet")
    p.add_argument("--budget-s", type=float, default=420.0, help="no stage or contender starts past this (s)")
    for k, v in GPU.items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v) if v is not None else int, default=None,
                       help=f"default {v} (tiny: {TINY[k]})")
    args = p.parse_args(argv)
    for k, v in (TINY if args.tiny else GPU).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.out is None:
        args.out = str(Path(os.environ["OUT"]) / "device_check.json") if os.environ.get("OUT") else \
            str(REPO / "runs" / "device_check.json")
    return args


# ---------------------------------------------------------------- helpers


class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def skip_reason(self, need: float) -> str | None:
        if self.left() < need:
            return (f"time budget: {self.elapsed():.0f} s elapsed of {self.seconds:.0f} s, "
                    f"this needs about {need:.0f} s")
        return None


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:2000]


def write_json(report: dict, path: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    report["elapsed_s"] = round(time.perf_counter() - report["_t0"], 2)
    report["summary"] = summary(report)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({k: v for k, v in report.items() if not k.startswith("_")}, indent=1, default=str))
    os.replace(tmp, path)


def summary(report: dict) -> dict:
    """The headline figures (images/s, ratios to lightly's BYOL) of what has been measured so far."""
    out = {}
    for stage in ("steps", "compiled"):
        for name, r in report["stages"].get(stage, {}).get("results", {}).items():
            if isinstance(r.get("images_per_s"), float):
                out[f"{stage}.{name}.images_per_s"] = round(r["images_per_s"], 2)
    steps = report["stages"].get("steps", {}).get("results", {})
    ours = steps.get("byol", {}).get("images_per_s")
    for ref in ("lightly_byol_fp32", "lightly_byol_bf16_channels_last"):
        theirs = steps.get(ref, {}).get("images_per_s")
        if isinstance(ours, float) and isinstance(theirs, float) and not report["settings"]["tiny"]:
            out[f"steps.byol_vs_{ref}"] = round(ours / theirs, 3)  # tiny: different backbones, no ratio
    for stage in ("pretrain", "pretrain_device_decode"):
        pre = report["stages"].get(stage, {})
        for k in ("images_per_s", "data_wait_frac"):
            if isinstance(pre.get(k), float):
                out[f"{stage}.{k}"] = round(pre[k], 4)
    return out


def run_stage(report: dict, name: str, fn, *fn_args, need: float | None = 0.0) -> None:
    """fn(stage_dict, ...) fills the stage's figures; errors and skips are recorded, never raised.
    Skipped when fewer than `need` seconds of the budget are left (None: always run)."""
    stage = report["stages"].setdefault(name, {})
    reason = None if need is None else report["_budget"].skip_reason(need)
    if reason:
        stage.update(status="skipped", reason=reason)
    else:
        t0 = time.perf_counter()
        stage["status"] = "running"
        write_json(report, report["settings"]["out"])
        try:
            fn(stage, *fn_args)
            stage["status"] = "ok" if stage.get("status") == "running" else stage["status"]
        except Exception as e:  # noqa: BLE001 - one stage's failure must not lose the others
            stage.update(status="error", error=error_text(e), traceback=traceback.format_exc()[-4000:])
        except BaseException as e:  # SIGTERM (a timeout), Ctrl-C: keep what this stage had, then stop
            stage.update(status="interrupted", error=error_text(e), seconds=round(time.perf_counter() - t0, 2))
            raise
        stage["seconds"] = round(time.perf_counter() - t0, 2)
    print(f"[device_check {report['_budget'].elapsed():6.1f} s] {name}: {stage['status']}"
          + (f" ({stage.get('reason') or stage.get('error')})" if stage["status"] != "ok" else ""), flush=True)
    write_json(report, report["settings"]["out"])


def cuda_in_use(args) -> bool:
    return args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())


# ---------------------------------------------------------------- environment


def environment(stage: dict, args) -> None:
    import torchvision

    import densessl

    cuda = torch.cuda.is_available()
    env = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
           "torchvision": torchvision.__version__, "densessl": densessl.__version__,
           "cuda_available": cuda, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "cudnn_benchmark": torch.backends.cudnn.benchmark,
           "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
           "cpu": describe_machine(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "device_used": "cuda" if cuda_in_use(args) else "cpu"}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env.update(device_name=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count(),
                   capability=list(torch.cuda.get_device_capability(0)), total_memory_bytes=props.total_memory,
                   multiprocessors=props.multi_processor_count, bf16_supported=torch.cuda.is_bf16_supported())
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception as e:  # noqa: BLE001
            env["driver"] = f"unknown ({error_text(e)})"
    else:
        env["device_name"] = env["cpu"]
    try:
        import lightly

        env["lightly"] = lightly.__version__
    except Exception as e:  # noqa: BLE001
        env["lightly"] = f"not importable: {error_text(e)}"
    try:
        git = ["git", "-C", str(REPO)]
        env["git_commit"] = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True,
                                           timeout=20).stdout.strip() or None
        dirty = subprocess.run(git + ["status", "--porcelain"], capture_output=True, text=True, timeout=20).stdout
        env["git_changed_files"] = len(dirty.splitlines()) if env["git_commit"] else None
    except Exception as e:  # noqa: BLE001
        env["git_commit"] = f"unknown ({error_text(e)})"
    stage.update(env)


# ---------------------------------------------------------------- training steps


def method_overrides(method: str, args) -> list[str]:
    """Sizes as parameters: crops of args.size (SwAV's small crops args.small_size) from a canvas
    of args.size; the tiny mode's small backbone and heads."""
    small = f"views.1.size={args.small_size}" if method == "swav" else f"views.1.size={args.size}"
    out = [f"data.size={args.size}", f"views.0.size={args.size}", small, f"train.device={args.device}"]
    if args.tiny:
        out += TINY_MODEL + TINY_HEADS[method]
    return out


def timed_steps(step, args, sync, deadline: float) -> dict:
    """Warm-up (the first step timed on its own: compilation, autotuning), then args.steps steps
    each synchronised (median step time), then args.steps unsynchronised steps (a rate)."""
    t = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t
    for _ in range(args.warmup - 1):
        if time.perf_counter() > deadline:
            break
        step()
        sync()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
        if time.perf_counter() > deadline:
            break
    n, t = 0, time.perf_counter()
    while n < len(times):
        step()
        n += 1
    sync()
    block = time.perf_counter() - t
    median = statistics.median(times)
    return {"first_step_s": first, "timed_steps": len(times), "step_time_median_s": median,
            "step_times_s": [round(x, 5) for x in times], "images_per_s": args.batch / median,
            "images_per_s_unsynced": n * args.batch / block, "stopped_early": len(times) < args.steps}


def measure(results: dict, name: str, build, args, report: dict, compiled: bool) -> None:
    """One contender: build it, time it, record its figures or its error under results[name]."""
    budget = report["_budget"]
    reason = budget.skip_reason(EXPECTED_S["compiled" if compiled else "eager"] if not args.tiny else 0.0)
    if reason:
        results[name] = {"status": "skipped", "reason": reason}
        return
    cuda = cuda_in_use(args)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    entry = results.setdefault(name, {})
    try:
        t0 = time.perf_counter()
        step, info = build()
        entry.update({"precision": args.precision, "channels_last": args.channels_last, **info},
                     build_s=time.perf_counter() - t0, batch=args.batch, warmup_steps=args.warmup)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        deadline = time.perf_counter() + max(30.0, budget.left() + 30.0)
        if compiled:
            step = compile_or_eager(step, entry, args, sync, deadline)
        entry.update(timed_steps(step, args, sync, deadline))
        if compiled and entry.get("compiled"):
            entry["dynamo"] = dynamo_counters()
        entry["peak_memory_bytes"] = torch.cuda.max_memory_allocated() if cuda else None
        entry["peak_memory_reserved_bytes"] = torch.cuda.max_memory_reserved() if cuda else None
        entry["status"] = "ok"
    except Exception as e:  # noqa: BLE001
        entry.update(status="error", error=error_text(e), traceback=traceback.format_exc()[-3000:])
    finally:
        step = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    print(f"[device_check {budget.elapsed():6.1f} s]   {name}: "
          + (f"{entry['images_per_s']:.1f} images/s" if entry["status"] == "ok" else entry["error"]), flush=True)
    write_json(report, args.out)


def compile_or_eager(step, entry: dict, args, sync, deadline: float):
    """torch.compile the contender's module; if the first (compiling) step fails, record the error
    and return the eager step (measured instead)."""
    import torch._dynamo

    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    holder, attr = step.compile_target
    eager = getattr(holder, attr)
    try:
        setattr(holder, attr, torch.compile(eager))
        t = time.perf_counter()
        step()
        sync()
        entry.update(compiled=True, compile_first_step_s=time.perf_counter() - t)
    except Exception as e:  # noqa: BLE001 - compile must never lose the figure
        setattr(holder, attr, eager)
        torch._dynamo.reset()
        entry.update(compiled=False, compile_error=error_text(e), fallback="eager")
    return step


def dynamo_counters() -> dict:
    from torch._dynamo.utils import counters

    breaks = counters.get("graph_break", {})
    return {"stats": {k: int(v) for k, v in counters.get("stats", {}).items()},
            "graph_breaks": int(sum(breaks.values())),
            "graph_break_reasons": [str(k)[:300] for k in list(breaks)[:5]]}


def densessl_contender(method: str, args):
    def build():
        run = bench.recipe_step(method, "paper", args.batch, args.precision, args.channels_last, True,
                                tuple(method_overrides(method, args)))
        tr, batch = run.trainer, run.batch

        def step():
            tr.train_step(batch)

        step.compile_target = (tr, "model")  # train_step calls trainer.model(views, batch)
        return step, {"recipe": bench.step_recipe(method, "paper"), "backbone": tr.cfg.model.backbone,
                      "views": [[v.size, v.count] for v in tr.cfg.views], "device": str(tr.dist.device),
                      "what": "Trainer.train_step on one loader batch: device augmentation, forward, backward, "
                              "optimiser, EMA / after-step"}
    return build


def lightly_contender(args, precision: str, channels_last: bool):
    def build():
        device = "cuda" if cuda_in_use(args) else "cpu"
        try:
            run = bench.lightly_byol_step(args.size, args.batch, args.lightly_backbone, device, precision,
                                          channels_last)
        except ImportError as e:
            raise RuntimeError(f"lightly is not importable ({e}); run benchmarks/device_check.sh --fetch-wheels "
                               f"here and carry runs/device-wheels") from e
        return run, {"backbone": f"torchvision {args.lightly_backbone}", "views": [[args.size, 2]], "device": device,
                     "precision": precision, "channels_last": channels_last,
                     "what": "lightly's BYOL example step (densessl.bench.lightly_byol_step): per-view forwards, "
                             "SGD, update_momentum; random input tensors, no augmentation"}
    return build


def steps_stage(stage: dict, args, report: dict, compiled: bool) -> None:
    if compiled:
        stage["compile_setting"] = args.compile
        if not report["settings"]["compile_used"]:
            stage.update(status="skipped", reason="torch.compile is off (--compile auto without CUDA, or off)")
            return
        methods = [m for m in args.methods if m in args.compile_methods]
    else:
        methods = list(args.methods)
    results = stage.setdefault("results", {})
    stage["images_per_s_counts"] = "source images per step (the batch), not crops"
    for m in methods:
        measure(results, m, densessl_contender(m, args), args, report, compiled)
    if args.lightly and "byol" in methods and not compiled:  # lightly's example is not compiled
        for name, prec, cl in (("lightly_byol_fp32", "fp32", False),
                               ("lightly_byol_bf16_channels_last", args.precision, args.channels_last)):
            measure(results, name, lightly_contender(args, prec, cl), args, report, compiled)
    failed = [k for k, r in results.items() if r.get("status") == "error"]
    if failed:
        stage["failed"] = failed


# ---------------------------------------------------------------- pretraining run


def _write_jpeg(job) -> int:
    import numpy as np
    from PIL import Image

    path, seed, lo, hi = job
    rng = np.random.default_rng(seed)
    h, w = (int(x) for x in rng.integers(lo, hi + 1, size=2))
    # smooth random colour fields plus noise: JPEGs of roughly natural-photo size and decode cost
    coarse = rng.integers(0, 256, (max(2, h // 24), max(2, w // 24), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32)
    img = np.clip(img + rng.normal(0.0, 12.0, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, quality=90)
    return os.path.getsize(path)


def write_jpeg_folder(root: Path, n: int, lo: int, hi: int, classes: int = 10) -> dict:
    """n JPEGs of random content and random sides in [lo, hi], in `classes` class folders."""
    t0 = time.perf_counter()
    jobs = []
    for c in range(classes):
        (root / f"class_{c:02d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        jobs.append((str(root / f"class_{i % classes:02d}" / f"{i:06d}.jpg"), [7, i], lo, hi))
    procs = min(16, os.cpu_count() or 1)
    if n >= 256 and procs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(procs, mp_context=mp.get_context("fork")) as pool:
            sizes = list(pool.map(_write_jpeg, jobs, chunksize=32))
    else:
        sizes = [_write_jpeg(j) for j in jobs]
    return {"jpegs": n, "jpeg_sides": [lo, hi], "jpeg_mean_bytes": sum(sizes) / n, "classes": classes,
            "write_s": time.perf_counter() - t0}


def pretrain_overrides(args, root: Path, run_dir: Path, decode_on: str = "workers") -> list[str]:
    out = [f"data.root={root}", "data.dataset=imagefolder", f"data.decode_on={decode_on}", f"train.batch_size={args.batch}", "train.epochs=1",
           f"train.steps_per_epoch={args.pretrain_steps}", f"train.log_every={args.log_every}",
           "train.ckpt_every=1000000000", "train.keep_every=0", "train.progress=false", "train.tracker=none",
           "train.knn_every=0", f"train.precision={args.precision}",
           f"train.channels_last={str(args.channels_last).lower()}", f"train.device={args.device}",
           f"run_dir={run_dir}"]
    if args.workers is not None:
        out.append(f"data.num_workers={args.workers}")
    if args.tiny:
        out += [f"views.0.size={args.size}", f"views.1.size={args.size}"] + TINY_MODEL + ["method.pred_hidden_dim=32"]
    return out


def stop_group(proc: subprocess.Popen) -> None:
    """SIGINT to the run's process group (as Ctrl-C: the loader's workers shut down), SIGKILL
    after 10 s."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def interval_summary(records: list[dict], batch: int) -> dict:
    """images/s and data-wait share over the log intervals after the first one (start-up: worker
    start, cuDNN and allocator warm-up), weighted by each interval's duration."""
    prev, rows = 0, []
    for r in records:
        dt = (r["step"] - prev) * batch / r["images_per_s"] if r["images_per_s"] > 0 else 0.0
        rows.append((r["step"] - prev, dt, r.get("data_wait_frac")))
        prev = r["step"]
    steady = rows[1:] if len(rows) > 1 else rows
    total = sum(dt for _, dt, _ in steady)
    out = {"log_intervals": len(records), "steady_intervals": len(steady),
           "images_per_s": sum(n for n, _, _ in steady) * batch / total if total > 0 else None,
           "images_per_s_median": statistics.median(r["images_per_s"] for r in records[-len(steady):])}
    if all(w is not None for _, _, w in steady) and total > 0:
        out["data_wait_frac"] = sum(w * dt for _, dt, w in steady) / total
    out["first_interval"] = {k: records[0].get(k) for k in ("step", "images_per_s", "data_wait_frac")}
    return out


def pretrain_stage(stage: dict, args, report: dict, decode_on: str = "workers") -> None:
    budget = report["_budget"]
    work = Path(tempfile.mkdtemp(prefix="densessl-device-check-"))
    root, run_dir = work / "jpegs", work / "run"
    stage.update(write_jpeg_folder(root, args.jpegs, args.jpeg_min_side, args.jpeg_max_side))
    seconds = min(args.pretrain_seconds, max(20.0, budget.left() + 45.0))
    overrides = pretrain_overrides(args, root, run_dir, decode_on)
    cmd = [sys.executable, "-m", "densessl", "pretrain", args.pretrain_recipe, *overrides]
    stage.update(recipe=args.pretrain_recipe, command=" ".join(cmd), time_limit_s=seconds, batch=args.batch)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    log = work / "pretrain.log"
    write_json(report, args.out)
    t0 = time.perf_counter()
    # its own process group (not session: whoever ends this script's session ends it too), so that
    # it and its loader workers are stopped together
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    ended = "interrupted (this script was stopped)"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(REPO), **group)
        try:
            rc = proc.wait(timeout=seconds)
            ended = "completed" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            ended = f"stopped at the time limit ({seconds:.0f} s)"
        finally:  # also when this script is interrupted: never leave the run going; keep what it logged
            if proc.poll() is None:
                stop_group(proc)
            stage.update(wall_s=time.perf_counter() - t0, ended=ended, log_tail=log.read_text()[-3000:])
            records = pretrain_records(stage, run_dir / "metrics.jsonl", args.batch)
            shutil.rmtree(work, ignore_errors=True)  # the JPEGs and the run: what matters is in the JSON
    if not records:
        raise RuntimeError(f"the pretraining run logged no step record ({ended}); see log_tail")
    if ended.startswith("failed"):
        stage["status"] = "error"
        stage["error"] = f"the pretraining run {ended}; see log_tail"


def pretrain_records(stage: dict, metrics: Path, batch: int) -> list[dict]:
    """The run's step records, summarised into `stage` (never raises: it also runs on the way out)."""
    from densessl.common.metrics_jsonl import read_metrics

    try:
        records = [r for r in read_metrics(metrics) if "images_per_s" in r] if metrics.exists() else []
        if records:
            stage.update(interval_summary(records, batch), steps=records[-1]["step"],
                         records=[{k: r.get(k) for k in ("step", "images_per_s", "data_wait_frac", "loss")}
                                  for r in records[-200:]])
        return records
    except Exception as e:  # noqa: BLE001
        stage["records_error"] = error_text(e)
        return []


# ---------------------------------------------------------------- main


def _terminated(signum, frame):
    signal.signal(signum, signal.SIG_IGN)  # `timeout` signals twice (us, then its group): finish cleanly once
    raise SystemExit(f"stopped by signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = Budget(args.budget_s)
    report = {"schema": "densessl.device_check/1", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "settings": dict(vars(args)), "stages": {}, "_t0": budget.t0, "_budget": budget}
    report["settings"]["compile_used"] = args.compile == "on" or (args.compile == "auto" and cuda_in_use(args))
    print(f"[device_check] writing {args.out}", flush=True)
    previous = signal.signal(signal.SIGTERM, _terminated)  # `timeout`: finish the JSON, stop the pretraining run
    try:
        run_stage(report, "environment", environment, args, need=None)
        if "steps" in args.stages:
            run_stage(report, "steps", steps_stage, args, report, False)
        for name, decode_on in (("pretrain", "workers"), ("pretrain_device_decode", "device")):
            if name in args.stages:
                run_stage(report, name, pretrain_stage, args, report, decode_on,
                          need=0.0 if args.tiny else min(args.pretrain_seconds, 60.0) + 20.0)
        if "compiled" in args.stages:
            run_stage(report, "compiled", steps_stage, args, report, True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_json(report, args.out)
    print(json.dumps(report["summary"], indent=1), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
