"""densessl command line: pretrain, eval, export, import, data, bench, study, report, demo."""
from __future__ import annotations

import argparse
import sys


def cmd_pretrain(args) -> int:
    from pathlib import Path

    from densessl.config import RENAMED_RECIPES, build_config, config_yaml

    if args.recipe in RENAMED_RECIPES:
        print(f"densessl: recipe '{args.recipe}' was renamed to '{RENAMED_RECIPES[args.recipe]}'", file=sys.stderr)
    cfg = build_config(args.recipe, args.overrides)
    if args.print_config:
        print(config_yaml(cfg), end="")
        return 0
    from densessl.common.distributed import rank_failures_reported, shutdown_distributed
    from densessl.engine.trainer import Trainer

    with rank_failures_reported(Path(cfg.run_dir) / "checkpoints" / "last.pt"):  # under torchrun: a lost rank
        trainer = Trainer(cfg)
        result = trainer.fit()
        is_main = trainer.dist.is_main
        del trainer  # no DDP module may outlive the process group (shutdown_distributed)
    if is_main:
        from densessl.report import plot_losses

        plot_losses(Path(cfg.run_dir) / "metrics.jsonl", Path(cfg.run_dir) / "loss.png")
    shutdown_distributed()  # on success only: a failing rank must not wait at a barrier
    print(f"done: step {result['step']}, checkpoint {result['checkpoint']}")
    return 0


def cmd_eval(args) -> int:
    from densessl.eval.commands import run_eval_cli

    return run_eval_cli(args.protocol, args.checkpoint, args.overrides)


def cmd_export(args) -> int:
    from densessl.eval.backbone import load_backbone_file
    from densessl.interop import DETECTRON2_CONFIG, export_backbone

    backbone = load_backbone_file(args.checkpoint)
    out = export_backbone(backbone, args.to, args.out)
    print(f"wrote {out} ({args.to}, {backbone.name}, {len(backbone.state_dict())} tensors)")
    if args.to == "detectron2":
        print("detectron2 config for these weights: " + " ".join(f"{k} {v}" for k, v in DETECTRON2_CONFIG.items()))
    return 0


def cmd_import(args) -> int:
    from densessl.interop import import_official, save_imported

    backbone, report = import_official(args.path, args.layout, arch=args.arch, drop=tuple(args.drop))
    out = save_imported(backbone, args.out, source=f"{args.layout}:{args.path}")
    print(report.summary())
    print(f"wrote {out}")
    return 0


def cmd_study(args) -> int:
    from pathlib import Path

    from densessl.study import default_paths, load_study, run_study

    study = load_study(args.study)
    table, runs = default_paths(study)
    run_study(study, Path(args.table) if args.table else table, Path(args.runs) if args.runs else runs,
              stop_after_minutes=args.stop_after_minutes, only=args.only or None,
              protocols=args.protocols or None, shard=_study_shard(args.shard), seeds=args.seeds or None)
    return 0


def _study_shard(text: str) -> tuple[int, int]:
    from densessl.config import ConfigError

    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected k/n, e.g. 0/2 (this process's share of the units)") from None
    return k, n


def cmd_report(args) -> int:
    from pathlib import Path

    from densessl.report import write_report
    from densessl.study import default_paths, load_study

    study = load_study(args.study)
    table = Path(args.table) if args.table else default_paths(study)[0]
    for path in write_report(study, table, Path(args.out), Path(args.figure) if args.figure else None,
                             Path(args.readme) if args.readme else None):
        print(f"wrote {path}")
    return 0


def cmd_demo(args) -> int:
    from densessl.demo import run_demo

    return run_demo(args.overrides, args.recipe)


def build_parser() -> argparse.ArgumentParser:
    from densessl import __version__

    parser = argparse.ArgumentParser(prog="densessl", description=__doc__)
    parser.add_argument("--version", action="version", version=f"densessl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain a backbone from a recipe (resumes a run folder by itself)")
    p.add_argument("recipe", help="a recipe name (see densessl/recipes) or a YAML path")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.epochs=5")
    p.add_argument("--print-config", action="store_true",
                   help="print the effective config (YAML, after bases and overrides) and exit without training")
    p.set_defaults(func=cmd_pretrain)

    ev = sub.add_parser("eval", help="evaluate a checkpoint or the random-init baseline")
    ev_sub = ev.add_subparsers(dest="protocol", required=True)
    ckpt = "a densessl checkpoint, or the word 'random'"
    frozen = ("e.g. k=20 temperature=0.07 num_train=5000 model.backbone=...; multilabel also takes "
              "data.dataset=voc|coco data.root=... (see docs/interop.md)")
    finetune = "key=value overrides, e.g. preset=scenes iterations=200 data.dataset=voc data.root=... (see docs/interop.md)"
    dense = ("e.g. preset=scenes|paper random_init_seed=1 retrieval.k=30 seg.epochs=20 data.dataset=voc data.root=... "
             "(see docs/dense-eval.md)")
    for name, help_, ckpt_help, overrides_help in [
            ("knn", "weighted kNN (cosine) on frozen features", ckpt, frozen),
            ("linear", "offline single-label linear probe on cached features", ckpt, frozen),
            ("multilabel", "multi-label linear probe (BCE), mean average precision", ckpt, frozen),
            ("frozen", "knn, linear and multilabel in one call (features extracted once)", ckpt, frozen),
            ("detection", "fine-tune Faster R-CNN + FPN on the backbone; COCO AP/AP50/AP75",
             "a densessl checkpoint, a densessl .safetensors backbone, or 'random'", finetune),
            ("segmentation", "FCN/DeepLabV3 head on the backbone (frozen or fine-tuned); mIoU",
             "a densessl checkpoint, a densessl .safetensors backbone, or 'random'", finetune),
            ("dense", "the four frozen dense probes below on one dense feature extraction", ckpt, dense),
            ("retrieval", "dense retrieval (Hummingbird): kNN label transfer of patches, mIoU", ckpt,
             dense),
            ("linear-seg", "BN + 1x1 conv on frozen stage maps, lr chosen on train; mIoU, fg mIoU",
             ckpt, dense),
            ("overcluster", "k-means on frozen patches, Hungarian and many-to-one matching; mIoU",
             ckpt, dense),
            ("region", "RoIAlign features at ground-truth boxes, linear + kNN; accuracy by size", ckpt,
             dense)]:
        q = ev_sub.add_parser(name, help=help_)
        q.add_argument("checkpoint", help=ckpt_help)
        q.add_argument("overrides", nargs="*", help=overrides_help)
        q.set_defaults(func=cmd_eval)

    from densessl.interop import EXPORT_FORMATS, LAYOUTS

    ex = sub.add_parser("export", help="export a backbone: safetensors, torchvision, timm or detectron2")
    ex.add_argument("checkpoint", help="a densessl checkpoint or a densessl .safetensors backbone")
    ex.add_argument("--to", choices=EXPORT_FORMATS, default="safetensors", help="format (default: safetensors)")
    ex.add_argument("--out", required=True, help="file to write (.safetensors, .pth, .pkl)")
    ex.set_defaults(func=cmd_export)

    im = sub.add_parser("import", help="read an official checkpoint (MoCo, SwAV, PixPro, ...) into a densessl backbone",
                        description="Layouts: " + "; ".join(f"{k}: {v.description}" for k, v in sorted(LAYOUTS.items())))
    im.add_argument("layout", choices=sorted(LAYOUTS), help="the checkpoint's key layout")
    im.add_argument("path", help="the official checkpoint file")
    im.add_argument("--out", required=True, help="a densessl checkpoint (.pt) or a .safetensors backbone")
    im.add_argument("--arch", default="auto", choices=("auto", "resnet18", "resnet50"),
                    help="backbone architecture (default: inferred from the keys)")
    im.add_argument("--drop", action="append", default=[], metavar="REGEX",
                    help="also drop head keys matching REGEX (after the layout's prefix); repeatable")
    im.set_defaults(func=cmd_import)

    d = sub.add_parser("data", help="the built-in Fashion-Scenes data: preview and exports")
    from densessl.data.commands import add_data_commands

    add_data_commands(d.add_subparsers(dest="data_command", required=True))

    b = sub.add_parser("bench", help="speed benchmarks beside reference implementations (ratios, one run)")
    from densessl.bench import add_bench_commands

    add_bench_commands(b.add_subparsers(dest="bench_command", required=True))

    st = sub.add_parser("study", help="run a declared grid of pretrainings x seeds x protocols (resumable)")
    st.add_argument("study", help="a study name (see densessl/studies) or a YAML path")
    st.add_argument("--table", help="the results table (default: runs/studies/NAME/results.jsonl)")
    st.add_argument("--runs", help="the folder of run folders (default: runs/studies/NAME)")
    st.add_argument("--stop-after-minutes", type=float, default=None,
                    help="start no new backbone after this many minutes (rerun to continue)")
    st.add_argument("--only", action="append", default=[], metavar="RUN", help="only this run name (repeatable)")
    st.add_argument("--protocols", action="append", default=[], metavar="PROTOCOL",
                    help="only this protocol (repeatable): e.g. the cheap ones before fine-tuning")
    st.add_argument("--seeds", action="append", type=int, default=[], metavar="SEED",
                    help="only this seed (repeatable): e.g. seed 0 of every run before the others")
    st.add_argument("--shard", default="0/1", metavar="K/N",
                    help="only units K, K+N, K+2N, ... of the declared order: N processes share a study "
                         "(one per core), appending to one table")
    st.set_defaults(func=cmd_study)

    rp = sub.add_parser("report", help="the results page (tables, claims, chart) from a study's table")
    rp.add_argument("study", help="a study name or a YAML path")
    rp.add_argument("--table", help="the results table (default: runs/studies/NAME/results.jsonl)")
    rp.add_argument("--out", default="docs/results.md", help="the page to write (default: docs/results.md)")
    rp.add_argument("--figure", help="the chart (default: beside the page, <out stem>.png)")
    rp.add_argument("--readme", help="also rewrite the study's headline block in this file (README.md), "
                                     "between its marker lines")
    rp.set_defaults(func=cmd_report)

    from densessl.demo import RECIPE

    dm = sub.add_parser("demo", help="the main job: pretrain on Fashion-Scenes, compare with random init")
    dm.add_argument("--recipe", default=RECIPE, help=f"the pretraining recipe (default: {RECIPE})")
    dm.add_argument("overrides", nargs="*", help="overrides for the recipe; eval.<key>=value for the evaluation")
    dm.set_defaults(func=cmd_demo)
    return parser


def error_line(e: BaseException) -> str:
    """The one-line message of a user error. An error raised in a DataLoader worker comes back
    re-raised with the worker's traceback in its message ("Caught X in DataLoader worker ...");
    its own message is the traceback's last line."""
    text = str(e)
    if text.startswith("Caught ") and "DataLoader worker" in text.partition("\n")[0]:
        last = text.rstrip().rpartition("\n")[2]
        prefix = f"{type(e).__module__}.{type(e).__qualname__}: "
        text = last[len(prefix):] if last.startswith(prefix) else last
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # argparse ends the overrides list at a flag (`pretrain RECIPE --print-config k=v`): the
    # key=value words after it are overrides too
    if rest and isinstance(getattr(args, "overrides", None), list) and all("=" in r and not r.startswith("-")
                                                                           for r in rest):
        args.overrides += rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from densessl.common.errors import AnnotationError, CheckpointError, ConfigError, ImageReadError
    from densessl.engine.trainer import NonFiniteLossError

    try:
        return args.func(args) or 0
    # user errors, and a loss or probe that diverged (their messages say which key to change)
    except (ConfigError, CheckpointError, AnnotationError, ImageReadError, NonFiniteLossError,
            FloatingPointError) as e:
        print(f"densessl: error: {error_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
