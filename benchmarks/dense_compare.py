"""Dense-probe results of several backbones side by side, against the random init's range.

    python benchmarks/dense_compare.py random=runs/dense/random-s*-textured.json \
        pixpro=runs/dense/pixpro-s0-textured.json densecl=runs/dense/densecl-4ep-s0-textured.json

Each argument is NAME=GLOB of `densessl eval dense` JSONs (several files: seeds). The group
named `random` is the baseline: its min-max over the files is printed, and every other
backbone is marked `>` where it clears the baseline's whole range (above its maximum), `<`
below its minimum, `~` inside it. Values in %; a group of several files prints mean (min-max).
"""
from __future__ import annotations

import glob
import json
import sys


def flatten(result: dict) -> dict[str, float]:
    """The headline numbers of one JSON as {row name: value in %}."""
    out = {}
    r = result.get("retrieval")
    if r:
        for stage, by_fraction in r["mIoU"].items():
            for frac, v in by_fraction.items():
                out[f"retrieval {stage} memory {frac}: mIoU"] = v
                out[f"retrieval {stage} memory {frac}: fg mIoU"] = r["fg_mIoU"][stage][frac]
    s = result.get("linear_seg")
    if s:
        for stage, v in s["mIoU"].items():
            out[f"linear-seg {stage}: mIoU"] = v
            out[f"linear-seg {stage}: fg mIoU"] = s["fg_mIoU"][stage]
    c = result.get("overcluster")
    if c:
        for stage, by_matching in c["mIoU"].items():
            for matching, v in by_matching.items():
                out[f"overcluster {stage} {matching}: mIoU"] = v
    g = result.get("region")
    if g:
        for stage, by_probe in g["acc"].items():
            for probe, v in by_probe.items():
                out[f"region {stage} {probe}: top-1"] = v
    return {k: 100.0 * v for k, v in out.items()}


def load_groups(args: list[str]) -> dict[str, list[dict[str, float]]]:
    groups = {}
    for arg in args:
        name, _, pattern = arg.partition("=")
        files = sorted(glob.glob(pattern))
        if not files:
            sys.exit(f"dense_compare: error: {name}={pattern} matches no file")
        groups[name] = [flatten(json.load(open(f))) for f in files]
    return groups


def table(groups: dict[str, list[dict[str, float]]], baseline: str = "random") -> str:
    rows = list(next(iter(groups.values()))[0])
    base = groups.get(baseline)
    names = [n for n in groups if n != baseline]
    head = ["metric"] + ([f"{baseline} (n={len(base)})"] if base else []) + names
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row]
        lo = hi = None
        if base:
            vals = [b[row] for b in base if row in b]
            lo, hi = min(vals), max(vals)
            cells.append(f"{lo:.1f}-{hi:.1f}")
        for n in names:
            vals = [g[row] for g in groups[n] if row in g]
            if not vals:
                cells.append("")
                continue
            mean = sum(vals) / len(vals)
            text = f"{mean:.1f}" if len(vals) == 1 else f"{mean:.1f} ({min(vals):.1f}-{max(vals):.1f})"
            if lo is not None:
                text += " >" if min(vals) > hi else " <" if max(vals) < lo else " ~"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(load_groups(sys.argv[1:])))
