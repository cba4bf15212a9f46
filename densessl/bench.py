"""Speed benchmarks, measured side by side in one process (ratios, not absolute claims).

`densessl bench step`  : the BYOL training step (images/s) of densessl in several precisions and
                         memory layouts, and lightly's BYOL step with the same backbone,
                         resolution, batch and loss when lightly is importable.
`densessl bench methods`: every method's recipe step, plain fp32 beside densessl's defaults;
                         with `--compile`, the defaults eager beside torch.compile of the forward.
`densessl bench views` : view generation from JPEG files: densessl's uint8 sampler + batched
                         device augmentation against a seed-style per-image PIL/torchvision
                         pipeline, for BYOL's two views and a 2x224 + 6x96 multi-crop.

Rounds interleave the contenders (A B C A B C ...) so slow drifts of the machine's load hit all
of them alike; the median over rounds is reported.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from densessl.common.machine import describe_machine


@dataclass
class Result:
    name: str
    images_per_s: float
    samples: list[float]


def _median_rate(times: list[float], batch: int) -> float:
    return batch / statistics.median(times)


def interleaved(contenders: dict, rounds: int, batch: int, warmup: int = 2) -> list[Result]:
    """contenders: name -> zero-arg callable doing one step; returns per-name median images/s."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return [Result(k, _median_rate(v, batch), [batch / t for t in v]) for k, v in times.items()]


# ---------------------------------------------------------------- training step


def densessl_byol_step(backbone: str, width, size: int, batch: int, precision: str, channels_last: bool,
                       small_map_convs: bool = True):
    from densessl.config import OptimConfig
    from densessl.engine.optim import build_optimizer
    from densessl.methods.byol import BYOL, BYOLConfig
    from densessl.models.backbones import build_backbone

    from densessl.models.small_maps import use_small_map_convs

    torch.manual_seed(0)
    bb = build_backbone(backbone, width)
    if not small_map_convs:
        use_small_map_convs(bb, max_positions=0)
    method = BYOL(BYOLConfig(proj_hidden_dim=4096, proj_dim=256, pred_hidden_dim=4096), bb)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    method = method.to(memory_format=fmt)
    opt = build_optimizer(OptimConfig(name="lars", weight_decay=1e-6), [method], lr=0.5)  # as the recipes
    views = [torch.randn(batch, 3, size, size).contiguous(memory_format=fmt) for _ in range(2)]
    dtype = torch.bfloat16 if precision == "bf16" else None
    step = [0]

    def run():
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = method(views, {})
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        method.after_step(step[0], 1000)
        step[0] += 1

    run.method, run.optimizer = method, opt  # for the profile (benchmarks/profile_step.py)
    return run


def lightly_byol_step(size: int, batch: int, backbone: str = "resnet18", device="cpu", precision: str = "fp32",
                      channels_last: bool = False):
    """lightly's BYOL as its example writes it: per-view forwards, SGD, update_momentum. The
    defaults are the example's (fp32, contiguous, CPU); `device`, bf16 autocast and channels_last
    give it the same settings as densessl on a GPU (benchmarks/device_check.py)."""
    import copy

    import torchvision
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.utils.scheduler import cosine_schedule

    torch.manual_seed(0)
    resnet = getattr(torchvision.models, backbone)()
    feat = resnet.fc.in_features
    net = torch.nn.Sequential(*list(resnet.children())[:-1])

    class LightlyBYOL(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = net
            self.projection_head = BYOLProjectionHead(feat, 4096, 256)
            self.prediction_head = BYOLPredictionHead(256, 4096, 256)
            self.backbone_momentum = copy.deepcopy(self.backbone)
            self.projection_head_momentum = copy.deepcopy(self.projection_head)
            deactivate_requires_grad(self.backbone_momentum)
            deactivate_requires_grad(self.projection_head_momentum)

        def forward(self, x):
            return self.prediction_head(self.projection_head(self.backbone(x).flatten(start_dim=1)))

        def forward_momentum(self, x):
            return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()

    device = torch.device(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = LightlyBYOL().to(device, memory_format=fmt)
    criterion = NegativeCosineSimilarity()
    opt = torch.optim.SGD(model.parameters(), lr=0.06)
    x0, x1 = (torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt) for _ in range(2))
    step = [0]

    def run():
        m = cosine_schedule(step[0], 1000, 0.996, 1)
        update_momentum(model.backbone, model.backbone_momentum, m=m)
        update_momentum(model.projection_head, model.projection_head_momentum, m=m)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            p0, z0 = model(x0), model.forward_momentum(x0)
            p1, z1 = model(x1), model.forward_momentum(x1)
            loss = 0.5 * (criterion(p0, z1) + criterion(p1, z0))
        loss.backward()
        opt.step()
        opt.zero_grad()
        step[0] += 1

    return run


def bench_step(backbone="resnet18", width=None, size=64, batch=64, rounds=7, with_lightly=True) -> list[Result]:
    contenders = {}
    if with_lightly:
        try:
            contenders["lightly BYOL (fp32)"] = lightly_byol_step(size, batch, backbone)
        except ImportError:
            print("lightly is not importable here: run `bash benchmarks/setup_bench_env.sh` and this command with "
                  ".venv-bench/bin/python for the side-by-side")
        else:  # lightly's loop at densessl's best settings: bf16 autocast and channels_last
            contenders["lightly BYOL (bf16, channels_last)"] = lightly_byol_step(
                size, batch, backbone, precision="bf16", channels_last=True)
    for precision in ("fp32", "bf16"):
        for cl in (False, True):
            name = f"densessl BYOL ({precision}, {'channels_last' if cl else 'contiguous'})"
            contenders[name] = densessl_byol_step(backbone, width, size, batch, precision, cl)
    # the same best configuration with oneDNN convolutions everywhere: what the small-map GEMMs give
    contenders["densessl BYOL (bf16, channels_last, no small-map GEMM)"] = densessl_byol_step(
        backbone, width, size, batch, "bf16", True, small_map_convs=False)
    return interleaved(contenders, rounds, batch)


# Training steps of the recipes' methods, through Trainer.train_step on one fixed loader batch
# (view generation is measured separately). "small": the Fashion-Scenes recipe (resnet18_small,
# 64 px); "paper": the paper-scale recipe (ResNet-50, 224 px crops; SwAV adds 6 x 96 px) with
# Fashion-Scenes drawn at 224 px as the images and a CPU-sized batch.
STEP_METHODS = ("byol", "mocov2", "densecl", "pixpro", "scrl", "cgh", "swav", "ssprl", "gaelle", "pixcontrast",
                "pixpro-video")  # every recipe family; the name is the recipe's without its data suffix
# the recipe of each at each scale (recipes are named <method>-<data>); the paper-scale multi-label
# methods pretrain on COCO, and PixContrast / the video variant have no paper-scale image recipe
STEP_RECIPES = {"small": {m: f"{m}-scenes" for m in STEP_METHODS},
                "paper": {**{m: f"{m}-imagenet" for m in STEP_METHODS[:7]}, "ssprl": "ssprl-coco",
                          "gaelle": "gaelle-coco"}}
STEP_SCALES = tuple(STEP_RECIPES)


def step_recipe(method: str, scale: str) -> str:
    if method not in STEP_RECIPES[scale]:
        from densessl.config import ConfigError

        raise ConfigError(f"bench methods: {method} has no {scale}-scale recipe; at --scale {scale}: "
                          f"{', '.join(STEP_RECIPES[scale])}")
    return STEP_RECIPES[scale][method]


def recipe_step(method: str, scale: str, batch: int, precision: str, channels_last: bool, small_map_convs: bool,
                extra: tuple[str, ...] = ()):
    """A closure running one `Trainer.train_step` of `method`'s recipe at `scale`; `extra`:
    overrides applied last (sizes of benchmarks/device_check.py's tiny mode)."""
    import tempfile

    from densessl.config import build_config
    from densessl.engine.trainer import Trainer
    from densessl.models.small_maps import use_small_map_convs

    overrides = [f"train.batch_size={batch}", f"train.precision={precision}",
                 f"train.channels_last={str(channels_last).lower()}", "train.knn_every=0", "train.progress=false",
                 "data.num_workers=0", f"run_dir={tempfile.mkdtemp(prefix='densessl-bench-')}"]
    if scale == "paper":
        overrides += ["data.dataset=fashion_scenes", "data.root=null", "data.size=224", f"data.num_scenes={batch}"]
    torch.manual_seed(0)
    trainer = Trainer(build_config(step_recipe(method, scale), overrides + list(extra)))
    if not small_map_convs:
        use_small_map_convs(trainer.method, max_positions=0)
    loader_batch = next(iter(trainer.loader(0)))
    trainer.model.train()

    cuda = trainer.dist.device.type == "cuda"

    def run():
        trainer.train_step(loader_batch)
        if cuda:  # time the work, not its launch
            torch.cuda.synchronize()

    run.trainer, run.batch = trainer, loader_batch  # for inspection (tests) and unsynchronised timing
    return run


def bench_methods(scale="small", methods=None, batch=None, rounds=5, overrides=()) -> dict[str, list[Result]]:
    """Per method: the plain-PyTorch way (fp32, contiguous, oneDNN convolutions everywhere) beside
    densessl in fp32 (channels_last, small-map GEMMs: the defaults on a CPU without bf16 units)
    and densessl's defaults on a CPU with AMX or AVX512-BF16 (the same in bf16 autocast)."""
    batch = batch or (128 if scale == "small" else 16)
    methods = list(STEP_RECIPES[scale]) if methods is None else methods
    results = {}
    for m in methods:
        results[m] = interleaved({
            "fp32, contiguous (plain PyTorch)": recipe_step(m, scale, batch, "fp32", False, False, tuple(overrides)),
            "densessl, fp32 (channels_last)": recipe_step(m, scale, batch, "fp32", True, True, tuple(overrides)),
            "densessl defaults (bf16, channels_last)": recipe_step(m, scale, batch, "bf16", True, True,
                                                                   tuple(overrides)),
        }, rounds, batch, warmup=2)
    return results


def compile_step(run, backend: str = "inductor", mode: str | None = None):
    """torch.compile what `Trainer.train_step` calls for the forward (`trainer.model`: the
    method, whose forward holds the backbone, heads and loss; AOTAutograd compiles the backward
    with it); augmentation, optimiser and after-step hooks stay eager. Returns the eager module
    (to restore it)."""
    tr = run.trainer
    eager = tr.model
    tr.model = torch.compile(eager, backend=backend, mode=mode)
    return eager


def first_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


@dataclass
class CompiledResult:
    """One method's eager and compiled steps, timed in the same interleaved rounds."""
    method: str
    eager: Result | None
    compiled: Result | None
    compile_s: float | None = None  # wall time of the compiled warm-up steps (compilation included)
    graphs: int | None = None  # dynamo's unique graphs after the warm-up
    recompiled_in_rounds: int = 0  # graphs added during the timed rounds (their time is in the rate then)
    error: str | None = None  # first line of the compile (or compiled step's) error

    @property
    def ratio(self) -> float | None:
        return self.compiled.images_per_s / self.eager.images_per_s if self.compiled and self.eager else None


def bench_methods_compiled(scale="small", methods=None, batch=None, rounds=3, precision="bf16",
                           channels_last=True, overrides=None, backend="inductor", mode=None,
                           warmup=2) -> dict[str, CompiledResult]:
    """Per method, densessl's defaults eager beside the same step with the forward compiled
    (`compile_step`). The compiled contender's warm-up steps (which compile) are timed apart and
    excluded from its rate; a method whose compilation or compiled step fails is reported with
    the error's first line and its eager rate, and the run goes on. `overrides`: method -> extra
    config overrides (tiny sizes in the tests)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    batch = batch or (128 if scale == "small" else 16)
    methods = list(STEP_RECIPES[scale]) if methods is None else methods
    out = {}
    for m in methods:
        extra = tuple((overrides or {}).get(m, ()))
        res = CompiledResult(m, None, None)
        try:
            eager = recipe_step(m, scale, batch, precision, channels_last, True, extra)
            comp = recipe_step(m, scale, batch, precision, channels_last, True, extra)
        except Exception as e:  # noqa: BLE001 - e.g. a batch the recipe cannot split: report, go on
            res.error = "eager step: " + first_line(e)
            out[m] = res
            continue
        torch._dynamo.reset()
        counters.clear()
        try:
            compile_step(comp, backend, mode)  # returns the eager forward (unused: comp is dropped after)
            t0 = time.perf_counter()
            for _ in range(warmup):
                comp()
            res.compile_s = time.perf_counter() - t0
            res.graphs = int(counters["stats"].get("unique_graphs", 0))
        except Exception as e:  # noqa: BLE001 - one method's failure must not end the run
            res.error = first_line(e)
            comp = None
        contenders = {"eager": eager}
        if comp is not None:
            contenders["compiled"] = comp
        for _ in range(warmup):
            eager()
        try:
            timed = {r.name: r for r in interleaved(contenders, rounds, batch, warmup=0)}
        except Exception as e:  # noqa: BLE001 - a compiled step failing later: time eager alone
            res.error = first_line(e)
            timed = {r.name: r for r in interleaved({"eager": eager}, rounds, batch, warmup=0)}
        res.eager, res.compiled = timed.get("eager"), timed.get("compiled")
        if res.compiled is not None and res.graphs is not None:
            res.recompiled_in_rounds = int(counters["stats"].get("unique_graphs", 0)) - res.graphs
        out[m] = res
        print(f"[bench methods --compile] {m}: warm-up incl. compile {res.compile_s or 0:.1f} s, "
              f"{'failed: ' + res.error if res.error else f'compiled/eager {res.ratio:.2f}x'}", flush=True)
        del eager, comp
        torch._dynamo.reset()
    return out


def format_compiled(results: dict[str, CompiledResult], scale: str = "small") -> str:
    lines = ["| method (recipe) | eager images/s | compiled images/s | compiled / eager | warm-up incl. compile (s) "
             "| graphs | note |", "|---|---:|---:|---:|---:|---:|---|"]
    for m, r in results.items():
        eager = f"{r.eager.images_per_s:.1f}" if r.eager else "-"
        comp = f"{r.compiled.images_per_s:.1f}" if r.compiled else "failed"
        ratio = f"{r.ratio:.2f}x" if r.ratio else "-"
        cs = f"{r.compile_s:.1f}" if r.compile_s is not None else "-"
        note = f"failed: {r.error}" if r.error else (
            f"{r.recompiled_in_rounds} recompilation(s) inside the timed rounds" if r.recompiled_in_rounds else "")
        lines.append(f"| {m} ({step_recipe(m, scale)}) | {eager} | {comp} | {ratio} | {cs} | {r.graphs if r.graphs is not None else '-'} "
                     f"| {note.replace('|', '/')} |")
    return "\n".join(lines)


def matmul_peak(dtype=torch.float32, n=2048, reps=5) -> float:
    """Measured GFLOP/s of an n x n matrix product (the machine's practical peak)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def byol_step_flops(backbone="resnet18", width=None, size=64, batch=64) -> float:
    """FLOPs of one BYOL step: online forward+backward (3x forward) and target forward, 2 views.

    Counted with ordinary convolutions (the conventional count, padding taps included), so the
    figure does not change with how densessl computes small-map convolutions."""
    from torch.utils.flop_counter import FlopCounterMode

    from densessl.methods.byol import BYOL, BYOLConfig
    from densessl.models.backbones import build_backbone
    from densessl.models.small_maps import use_small_map_convs

    bb = build_backbone(backbone, width)
    use_small_map_convs(bb, max_positions=0)
    m = BYOL(BYOLConfig(proj_hidden_dim=4096, proj_dim=256, pred_hidden_dim=4096), bb)
    views = [torch.randn(batch, 3, size, size) for _ in range(2)]
    with FlopCounterMode(display=False) as counter:
        m(views, {})["loss"].backward()
    return float(counter.get_total_flops())


def format_results(results: list[Result], reference: str | None = None) -> str:
    ref = next((r for r in results if r.name == reference), None)
    lines = ["| contender | images/s (median) | ratio |", "|---|---:|---:|"]
    for r in results:
        ratio = f"{r.images_per_s / ref.images_per_s:.2f}x" if ref else "-"
        lines.append(f"| {r.name} | {r.images_per_s:.1f} | {ratio} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- command line


def add_bench_commands(subparsers) -> None:
    s = subparsers.add_parser("step", help="BYOL training step, images/s, beside lightly's when importable")
    s.add_argument("--backbone", default="resnet18")
    s.add_argument("--width", type=int, default=None)
    s.add_argument("--size", type=int, default=64)
    s.add_argument("--batch", type=int, default=64)
    s.add_argument("--rounds", type=int, default=7)
    s.add_argument("--no-lightly", action="store_true")
    s.set_defaults(func=_cmd_step)
    m = subparsers.add_parser("methods", help="training steps of every method's small recipe, fp32 beside the defaults")
    m.add_argument("--scale", choices=sorted(STEP_SCALES), default="small")
    m.add_argument("--methods", nargs="+", choices=STEP_METHODS, default=None,
                   help="default: every method with a recipe at --scale")
    m.add_argument("--batch", type=int, default=None, help="default: 128 (small), 16 (paper)")
    m.add_argument("--rounds", type=int, default=5)
    m.add_argument("--compile", action="store_true",
                   help="instead: densessl's defaults eager beside torch.compile of the method's forward")
    m.add_argument("--compile-backend", default="inductor", help="torch.compile backend (with --compile)")
    m.add_argument("--compile-mode", default=None, help="torch.compile mode (with --compile)")
    m.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to every method's recipe (repeatable)")
    m.set_defaults(func=_cmd_methods)
    v = subparsers.add_parser("views", help="view generation from JPEG files beside a seed-style PIL pipeline")
    v.add_argument("--folder", default="runs/bench-jpegs")
    v.add_argument("--num", type=int, default=64)
    v.add_argument("--rounds", type=int, default=5)
    v.set_defaults(func=_cmd_views)


def _cmd_step(args) -> int:
    results = bench_step(args.backbone, args.width, args.size, args.batch, args.rounds, not args.no_lightly)
    ref = "lightly BYOL (fp32)" if any(r.name.startswith("lightly") for r in results) else results[0].name
    print(f"BYOL training step, {args.backbone}, {args.size} px, batch {args.batch}, {args.rounds} interleaved "
          f"rounds; {describe_machine()}")
    print(format_results(results, ref))
    rates = {r.name: r.images_per_s for r in results}
    if "lightly BYOL (bf16, channels_last)" in rates:
        best_name = max((n for n in rates if n.startswith("densessl")), key=rates.get)
        print(f"best densessl ({best_name}) vs lightly at its best (bf16, channels_last): "
              f"{rates[best_name] / rates['lightly BYOL (bf16, channels_last)']:.2f}x")
    flops = byol_step_flops(args.backbone, args.width, args.size, args.batch)
    best = max(r.images_per_s for r in results if r.name.startswith("densessl"))
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    print(f"step FLOPs {flops / 1e9:.1f} GFLOP per batch; best densessl {flops / 1e9 * best / args.batch:.0f} "
          f"GFLOP/s achieved; measured matmul peak fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s")
    return 0


def _cmd_methods(args) -> int:
    args.methods = args.methods or list(STEP_RECIPES[args.scale])
    for m in args.methods:
        step_recipe(m, args.scale)  # one line for a method without a recipe at this scale
    if args.compile:
        res = bench_methods_compiled(args.scale, args.methods, args.batch, args.rounds,
                                     overrides={m: args.overrides for m in args.methods},
                                     backend=args.compile_backend, mode=args.compile_mode)
        print(f"training steps ({args.scale} scale, densessl defaults: bf16, channels_last), eager beside "
              f"torch.compile(backend={args.compile_backend}, mode={args.compile_mode}) of the method's forward, "
              f"{args.rounds} interleaved rounds after the warm-up; {describe_machine()}")
        print(format_compiled(res, args.scale))
        return 0
    results = bench_methods(args.scale, args.methods, args.batch, args.rounds, args.overrides)
    print(f"training steps ({args.scale} scale), {args.rounds} interleaved rounds; {describe_machine()}")
    for name, res in results.items():
        print(f"\n{name} ({step_recipe(name, args.scale)}):")
        print(format_results(res, res[0].name))
    return 0


def _cmd_views(args) -> int:
    from densessl.bench_views import bench_views

    res = bench_views(args.folder, args.num, args.rounds)
    print(f"view generation from {args.num} JPEGs (256 px), one process; {describe_machine()}")
    for label, results in res.items():
        print(f"\n{label}")
        print(format_results(results, "seed-style PIL per image"))
    return 0


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="densessl bench")
    add_bench_commands(p.add_subparsers(dest="bench_command", required=True))
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
