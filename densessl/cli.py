"""densessl command line: pretrain, eval, data, demo."""
from __future__ import annotations

import argparse
import sys


def cmd_pretrain(args) -> int:
    from densessl.config import build_config
    from densessl.engine.trainer import Trainer

    cfg = build_config(args.recipe, args.overrides)
    result = Trainer(cfg).fit()
    print(f"done: step {result['step']}, checkpoint {result['checkpoint']}")
    return 0


def cmd_eval(args) -> int:
    from densessl.eval.protocols import default_out, eval_config, evaluate, write_metrics

    cfg = eval_config(args.overrides)
    result = evaluate(args.checkpoint, [args.protocol], cfg)
    out = default_out(args.checkpoint, args.protocol, cfg)
    write_metrics(result, out)
    metric = {k: v for k, v in result[args.protocol].items() if k not in ("settings", "seconds")}
    print(f"{'backbone':<40} " + " ".join(f"{k:>16}" for k in metric))
    print(f"{result['backbone'][-40:]:<40} " + " ".join(f"{v:>16.4f}" for v in metric.values()))
    print(f"settings: {result[args.protocol]['settings']}")
    print(f"wrote {out}")
    return 0


def cmd_demo(args) -> int:
    from densessl.demo import run_demo

    return run_demo(args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="densessl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain a backbone from a recipe (resumes a run folder by itself)")
    p.add_argument("recipe", help="a recipe name (see densessl/recipes) or a YAML path")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.epochs=5")
    p.set_defaults(func=cmd_pretrain)

    ev = sub.add_parser("eval", help="evaluate a checkpoint or the random-init baseline")
    ev_sub = ev.add_subparsers(dest="protocol", required=True)
    for name, help_ in [("knn", "weighted kNN (cosine) on frozen features"),
                        ("linear", "offline single-label linear probe on cached features"),
                        ("multilabel", "multi-label linear probe (BCE), mean average precision")]:
        q = ev_sub.add_parser(name, help=help_)
        q.add_argument("checkpoint", help="a densessl checkpoint, or the word 'random'")
        q.add_argument("overrides", nargs="*", help="e.g. k=20 temperature=0.07 num_train=5000 model.backbone=...")
        q.set_defaults(func=cmd_eval)

    d = sub.add_parser("data", help="the built-in Fashion-Scenes data: preview and exports")
    from densessl.data.commands import add_data_commands

    add_data_commands(d.add_subparsers(dest="data_command", required=True))

    dm = sub.add_parser("demo", help="the main job: pretrain BYOL on Fashion-Scenes, compare with random init")
    dm.add_argument("overrides", nargs="*", help="overrides for the pretraining recipe")
    dm.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from densessl.config import ConfigError
    from densessl.engine.checkpoint import CheckpointError

    try:
        return args.func(args) or 0
    except (ConfigError, CheckpointError) as e:
        print(f"densessl: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
