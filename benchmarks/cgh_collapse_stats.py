"""CGH's collapse statistics on a finished checkpoint (for runs made before CGH logged them).

Loads the checkpoint's method state into the cgh-scenes recipe's CGH, runs 256 un-augmented
training scenes through it in train mode (weak and strong view the same images) and prints the
step's outputs: the loss terms, `z_std` (per-dimension std of the unit student embeddings; 0 when
collapsed, at most 1/sqrt(dim)) and `teacher_entropy` (entropy of the global teacher relation over
the queue; ln K when it carries nothing).

python benchmarks/cgh_collapse_stats.py runs/cgh-12ep/checkpoints/last.pt
"""
import math
import sys
import tempfile

import torch

from densessl.config import build_config
from densessl.data.augment import normalize
from densessl.data.scenes import FashionScenes
from densessl.common.checkpoint import load_checkpoint
from densessl.engine.trainer import Trainer


def main(path):
    cfg = build_config("cgh-scenes", [f"run_dir={tempfile.mkdtemp()}", "data.num_workers=0"])
    method = Trainer(cfg).method
    method.load_state_dict(load_checkpoint(path)["method"])
    scenes = FashionScenes("train", 256, with_masks=False)
    x = normalize(torch.stack([scenes[i]["image"] for i in range(len(scenes))]))
    method.train()
    method.current_step = 10 ** 9  # past the InfoNCE warm-up
    with torch.no_grad():
        out = method([x, x], {})
    dim, K = method.queue["global"].shape
    stats = {k: round(float(v), 4) for k, v in out.items() if torch.is_tensor(v) and v.ndim == 0}
    print(path, stats, f"ln K = {math.log(K):.3f}", f"1/sqrt(dim) = {1 / math.sqrt(dim):.4f}")


if __name__ == "__main__":
    main(sys.argv[1])
