"""Every `densessl eval <command>` in one table. The command line and `densessl study` both evaluate
through `run_eval`, so a protocol one of them reaches (the VOC/COCO multi-label transfer, say) the
other reaches too, with the same config, the same result and the same output file name."""
from __future__ import annotations

from dataclasses import dataclass

FROZEN_COMMANDS = ("frozen", "knn", "linear", "multilabel")  # frozen: the other three on one extraction
FINETUNE_COMMANDS = ("detection", "segmentation")  # metrics in their own units (AP in points, mIoU a fraction)
DENSE_COMMANDS = ("dense", "retrieval", "linear-seg", "overcluster", "region")  # dense: the other four
EVAL_COMMANDS = FROZEN_COMMANDS + FINETUNE_COMMANDS + DENSE_COMMANDS


@dataclass
class Evaluation:
    result: dict  # what metrics.json holds
    cfg: object  # the typed config it ran with
    name: str  # the output file's stem: the command, or multilabel-voc|coco for the transfer
    summary: list[str]  # the lines the command line prints


def transfer_dataset(overrides: list[str]) -> str | None:
    """The value of a `data.dataset=voc|coco` override, if any: `multilabel` then runs the VOC/COCO
    transfer (labelled photos on disk) rather than the built-in scenes."""
    value = None
    for o in overrides:
        key, _, text = o.partition("=")
        if key.strip() == "data.dataset":
            value = text.strip()
    return value if value in ("voc", "coco") else None


def run_eval(command: str, spec: str, overrides: list[str], log=print) -> Evaluation:
    """Evaluate `spec` (a checkpoint, a .safetensors backbone, or ``random``) with one command."""
    if command not in EVAL_COMMANDS:
        from densessl.common.errors import ConfigError

        raise ConfigError(f"eval command {command!r} unknown; expected one of {', '.join(EVAL_COMMANDS)}")
    if command in DENSE_COMMANDS:
        from densessl.eval.dense.config import dense_config
        from densessl.eval.dense.run import COMMANDS, evaluate_dense, summary_lines

        cfg = dense_config(overrides)
        probes = list(cfg.probes) if command == "dense" else [COMMANDS[command]]
        result = evaluate_dense(spec, probes, cfg, log=log)
        return Evaluation(result, cfg, command, summary_lines(result))
    if command in FINETUNE_COMMANDS:
        if command == "detection":
            from densessl.eval.detection import DetectionTask as Task, detection_config as config, run_detection as run
        else:
            from densessl.eval.segmentation import (SegmentationTask as Task, run_segmentation as run,
                                                    segmentation_config as config)
        cfg = config(overrides)
        result = run(spec, cfg, log=log)
        return Evaluation(result, cfg, command, [f"{result['backbone'][-40:]:<40} {Task(cfg).summary(result[command])}"])
    if command == "multilabel" and transfer_dataset(overrides):
        from densessl.eval.multilabel_transfer import multilabel_transfer_config, run_multilabel_transfer, summary_lines

        cfg = multilabel_transfer_config(overrides)
        result = run_multilabel_transfer(spec, cfg, log=log)
        return Evaluation(result, cfg, f"multilabel-{cfg.data.dataset}", summary_lines(result, cfg))
    from densessl.eval.protocols import PROTOCOLS, eval_config, evaluate

    cfg = eval_config(overrides)
    protocols = list(PROTOCOLS) if command == "frozen" else [command]
    result = evaluate(spec, protocols, cfg)
    metric = {k: v for p in protocols for k, v in result[p].items() if k not in ("settings", "seconds")}
    summary = [f"{'backbone':<40} " + " ".join(f"{k:>16}" for k in metric),
               f"{result['backbone'][-40:]:<40} " + " ".join(f"{v:>16.4f}" for v in metric.values()),
               *(f"{p} settings: {result[p]['settings']}" for p in protocols)]
    return Evaluation(result, cfg, command, summary)


def run_eval_cli(command: str, spec: str, overrides: list[str]) -> int:
    """`densessl eval <command>`: run, write metrics.json beside the checkpoint (or at ``out``), print."""
    from densessl.eval.protocols import default_out, write_metrics

    ev = run_eval(command, spec, overrides)
    out = default_out(spec, ev.name, ev.cfg)
    write_metrics(ev.result, out)
    print("\n".join(ev.summary))
    print(f"wrote {out}")
    return 0
