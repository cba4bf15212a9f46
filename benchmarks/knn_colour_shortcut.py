"""Do a backbone's kNN neighbours follow colour rather than the item? Two measures on the
single-item kNN data of `densessl eval knn` (same splits, sizes, k and T):

- colour alignment: the mean colour similarity (histogram intersection of 4x4x4-bin RGB
  histograms) between a test image and its k feature-nearest train images, rescaled so that
  0 = no more alike than k random train images and 1 = as alike as its k colour-nearest ones;
- kNN top-1 on the images as given and on their grayscale copies (both splits), with the
  colour-histogram kNN as the colour-only reference (chance is 10%: tints and backgrounds are
  drawn independently of the class).

python benchmarks/knn_colour_shortcut.py random:0 runs/<run>/checkpoints/last.pt ...
"""
import sys

import torch
import torch.nn.functional as F

from densessl.data.augment import rgb_to_gray
from densessl.data.build import build_dataset
from densessl.eval.features import extract_features
from densessl.eval.knn import knn_accuracy
from densessl.eval.backbone import load_backbone
from densessl.eval.protocols import eval_config

BINS = 4


def grayscale(items: list[dict]) -> list[dict]:
    """The items with their uint8 images as luminance (the augmentation's weights) on 3 channels."""
    return [{**it, "image": (rgb_to_gray(it["image"][None].float() / 255)[0] * 255).round().clamp(0, 255)
             .to(torch.uint8).expand(3, -1, -1)} for it in items]


def colour_histograms(items: list[dict]) -> torch.Tensor:
    """(N, BINS**3) joint RGB histograms, each summing to 1."""
    out = []
    for it in items:
        q = (it["image"].long() * BINS) // 256  # (3, H, W) bin per channel
        idx = (q[0] * BINS + q[1]) * BINS + q[2]
        out.append(torch.bincount(idx.flatten(), minlength=BINS ** 3).float() / idx.numel())
    return torch.stack(out)


def intersection(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Histogram intersection of every row of a (N, B) with every row of b (M, B) -> (N, M)."""
    return torch.stack([torch.minimum(row, b).sum(1) for row in a])


def mean_topk_colour(sim_feat: torch.Tensor, colour_sim: torch.Tensor, k: int) -> float:
    """Mean colour similarity between each test row and its k most feature-similar train columns."""
    idx = sim_feat.topk(k, dim=1).indices
    return float(colour_sim.gather(1, idx).mean())


if __name__ == "__main__":
    cfg = eval_config([])
    # each split generated once and held in memory (7000 images of 64 px: 86 MB), then reused
    splits = {s: build_dataset(cfg.data, split=s, single_item=True, num=cfg.num_train if s == "train" else cfg.num_test)
              for s in ("train", "val")}
    items = {s: [ds[i] for i in range(len(ds))] for s, ds in splits.items()}
    gray = {s: grayscale(v) for s, v in items.items()}
    labels = {s: torch.stack([it["label"] for it in v]) for s, v in items.items()}
    hist = {s: colour_histograms(v) for s, v in items.items()}
    colour_sim = intersection(hist["val"], hist["train"])  # (N_test, N_train)
    generator = torch.Generator().manual_seed(0)
    at_random = float(colour_sim.gather(1, torch.randint(colour_sim.shape[1], (colour_sim.shape[0], cfg.k),
                                                         generator=generator)).mean())
    at_best = float(colour_sim.topk(cfg.k, dim=1).values.mean())

    def knn(train, test):
        return 100 * knn_accuracy(train, labels["train"], test, labels["val"], 10, k=cfg.k, temperature=cfg.temperature)

    print(f"colour-histogram kNN: {knn(hist['train'], hist['val']):.1f} (chance 10); colour similarity of k random / "
          f"k colour-nearest train images: {at_random:.3f} / {at_best:.3f}\n")
    print("| backbone | kNN | kNN on grayscale | colour alignment of the k neighbours |\n|---|---:|---:|---:|")
    for arg in sys.argv[1:]:
        spec, extra = ("random", [f"random_init_seed={arg.split(':')[1]}"]) if arg.startswith("random:") else (arg, [])
        cfg = eval_config(extra)
        backbone, desc = load_backbone(spec, cfg)
        dtype = torch.bfloat16 if cfg.precision == "bf16" else None  # as FeatureCache

        def features(ds):
            return extract_features(backbone, ds, batch_size=256, target_key=None, autocast_dtype=dtype)[0]

        xtr, xte = features(items["train"]), features(items["val"])
        sim = F.normalize(xte, dim=1) @ F.normalize(xtr, dim=1).T
        align = (mean_topk_colour(sim, colour_sim, cfg.k) - at_random) / (at_best - at_random)
        print(f"| {desc} | {knn(xtr, xte):.1f} | {knn(features(gray['train']), features(gray['val'])):.1f} | "
              f"{align:.2f} |", flush=True)
