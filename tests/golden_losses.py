"""The first training losses of every recipe on a fixed seed, as exact float hex strings.

Recorded before a refactor that must not change behaviour, and compared after it
(tests/test_golden_losses.py for the scenes recipes). Every recipe runs on the built-in
Fashion-Scenes with a small batch, one thread and no loader workers, so a run is a few seconds
(scenes recipes) to a minute (paper-scale ResNet-50 recipes, whose views stay at their sizes).

    python tests/golden_losses.py            # record all recipes into tests/golden/first_losses.json
    python tests/golden_losses.py --check    # compare every recipe with the recorded values
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

GOLDEN = Path(__file__).parent / "golden" / "first_losses.json"
STEPS = 20
BATCH = 16  # scenes recipes; paper-scale recipes (224-px views) take 8
# Paper-scale recipes read ImageNet / COCO / BDD100k; here they read scenes at their own view
# sizes, and a 1-frame-stride moving-scenes video for the video recipe.
SMALL_DATA = ["data.dataset=fashion_scenes", "data.num_scenes=400", "data.size=64", "data.root=null"]
VIDEO_DATA = ["data.dataset=moving_scenes", "data.num_scenes=64", "data.size=64", "data.root=null"]


def recipes() -> list[str]:
    from densessl.config import find_recipe

    folder = find_recipe("pixpro-scenes").parent
    return sorted(p.stem for p in folder.glob("*.yaml"))


def overrides_for(recipe: str, run_dir: str) -> list[str]:
    batch = BATCH if recipe.endswith("-scenes") else 8
    base = [f"train.batch_size={batch}", "data.num_workers=0", "train.progress=false", "train.knn_every=0",
            "train.tracker=none", "train.precision=fp32", f"run_dir={run_dir}", "train.seed=0"]
    if recipe.endswith("-scenes"):
        return base
    return base + (VIDEO_DATA if "video" in recipe else SMALL_DATA) + ["train.sync_bn=false"]


def machine() -> str:
    """The recording machine, compared exactly (no thread count: the losses run on one thread)."""
    from densessl.common.machine import cpu_model

    return f"{platform.machine()} {cpu_model()} torch {torch.__version__}"


def first_losses(recipe: str, run_dir: str, steps: int = STEPS) -> list[str]:
    """The first `steps` losses of `recipe` (float hex of the float32 loss), one thread."""
    from densessl.config import build_config
    from densessl.engine.trainer import Trainer

    torch.set_num_threads(1)
    trainer = Trainer(build_config(recipe, overrides_for(recipe, run_dir)))
    trainer.method.train()
    losses = []
    epoch = 0
    while len(losses) < steps:
        for batch in trainer.loader(epoch):
            out, _ = trainer.train_step(batch)
            losses.append(float(out["loss"].detach()).hex())
            if len(losses) == steps:
                break
        epoch += 1
    return losses


def main(argv=None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the recorded values")
    parser.add_argument("recipe", nargs="*", help="recipes (default: all)")
    args = parser.parse_args(argv)
    names = args.recipe or recipes()
    recorded = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {"machine": machine(), "losses": {}}
    failed = 0
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                losses = first_losses(name, tmp)
            except Exception as e:  # record what fails, so the after-run can say it still fails the same way
                losses = [f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"]
        if args.check:
            same = recorded["losses"].get(name) == losses
            failed += not same
            print(f"{name:<24} {'same' if same else 'DIFFERENT'} {losses[0]}", flush=True)
        else:
            recorded["losses"][name] = losses
            print(f"{name:<24} {losses[0]} ... {losses[-1]}", flush=True)
    if not args.check:
        recorded["machine"] = machine()
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(recorded, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
