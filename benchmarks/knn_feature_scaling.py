"""Is a backbone's kNN score a feature-scaling artefact? kNN on raw, centred and standardised
pooled C5 features (train-set statistics), with the protocol of `densessl eval knn` otherwise.

python benchmarks/knn_feature_scaling.py random:0 random:1 runs/<run>/checkpoints/last.pt ...

`random:<s>` is the random-init backbone with weight seed s. The last column is the share of
the mean squared feature norm that lies in the mean feature (how much a common offset dominates
cosine similarity).
"""
import sys

from densessl.eval.knn import knn_accuracy
from densessl.eval.backbone import load_backbone
from densessl.eval.protocols import FeatureCache, eval_config

if __name__ == "__main__":
    print("| backbone | raw | centred | standardised | mean share |\n|---|---:|---:|---:|---:|")
    for arg in sys.argv[1:]:
        spec, extra = ("random", [f"random_init_seed={arg.split(':')[1]}"]) if arg.startswith("random:") else (arg, [])
        cfg = eval_config(extra)
        backbone, desc = load_backbone(spec, cfg)
        cache = FeatureCache(backbone, cfg)
        (xtr, ytr), (xte, yte) = cache.get(True, "train"), cache.get(True, "val")
        mu, sd = xtr.mean(0), xtr.std(0) + 1e-6

        def knn(f):
            return 100 * knn_accuracy(f(xtr), ytr, f(xte), yte, 10, k=cfg.k, temperature=cfg.temperature)

        share = float(mu.norm() ** 2 / xtr.pow(2).sum(1).mean())
        print(f"| {desc} | {knn(lambda x: x):.1f} | {knn(lambda x: x - mu):.1f} | "
              f"{knn(lambda x: (x - mu) / sd):.1f} | {share:.2f} |", flush=True)
