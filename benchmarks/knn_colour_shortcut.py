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
from torch.utils.data import Dataset

from densessl.data.build import build_dataset
from densessl.eval.features import extract_features
from densessl.eval.knn import knn_accuracy
from densessl.eval.protocols import eval_config, load_eval_backbone

BINS = 4


class Grayscale(Dataset):
    """The wrapped dataset's images as luminance (ITU-R 601), repeated on 3 channels."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        item = dict(self.ds[i])
        r, g, b = item["image"].float()
        item["image"] = (0.299 * r + 0.587 * g + 0.114 * b).round().clamp(0, 255).to(torch.uint8).expand(3, -1, -1)
        return item


def colour_histograms(ds) -> torch.Tensor:
    """(N, BINS**3) joint RGB histograms, each summing to 1."""
    out = []
    for i in range(len(ds)):
        q = (ds[i]["image"].long() * BINS) // 256  # (3, H, W) bin per channel
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
    splits = {s: build_dataset(cfg.data, split=s, single_item=True, num=cfg.num_train if s == "train" else cfg.num_test)
              for s in ("train", "val")}
    hist = {s: colour_histograms(ds) for s, ds in splits.items()}
    colour_sim = intersection(hist["val"], hist["train"])  # (N_test, N_train)
    generator = torch.Generator().manual_seed(0)
    at_random = float(colour_sim.gather(1, torch.randint(colour_sim.shape[1], (colour_sim.shape[0], cfg.k),
                                                         generator=generator)).mean())
    at_best = float(colour_sim.topk(cfg.k, dim=1).values.mean())
    labels = {s: torch.stack([ds[i]["label"] for i in range(len(ds))]) for s, ds in splits.items()}
    colour_knn = 100 * knn_accuracy(hist["train"], labels["train"], hist["val"], labels["val"], 10, k=cfg.k,
                                    temperature=cfg.temperature)
    print(f"colour-histogram kNN: {colour_knn:.1f} (chance 10); colour similarity of k random / k colour-nearest "
          f"train images: {at_random:.3f} / {at_best:.3f}\n")
    print("| backbone | kNN | kNN on grayscale | colour alignment of the k neighbours |\n|---|---:|---:|---:|")
    for arg in sys.argv[1:]:
        spec, extra = ("random", [f"random_init_seed={arg.split(':')[1]}"]) if arg.startswith("random:") else (arg, [])
        cfg = eval_config(extra)
        backbone, desc = load_eval_backbone(spec, cfg)
        dtype = torch.bfloat16 if cfg.precision == "bf16" else None

        def features(ds):
            return extract_features(backbone, ds, batch_size=256, target_key="label", autocast_dtype=dtype)

        (xtr, ytr), (xte, yte) = features(splits["train"]), features(splits["val"])
        (gtr, _), (gte, _) = features(Grayscale(splits["train"])), features(Grayscale(splits["val"]))
        knn = 100 * knn_accuracy(xtr, ytr, xte, yte, 10, k=cfg.k, temperature=cfg.temperature)
        knn_gray = 100 * knn_accuracy(gtr, ytr, gte, yte, 10, k=cfg.k, temperature=cfg.temperature)
        sim = torch.nn.functional.normalize(xte, dim=1) @ torch.nn.functional.normalize(xtr, dim=1).T
        align = (mean_topk_colour(sim, colour_sim, cfg.k) - at_random) / (at_best - at_random)
        print(f"| {desc} | {knn:.1f} | {knn_gray:.1f} | {align:.2f} |", flush=True)
