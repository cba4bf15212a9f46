"""JPEG decoders side by side on the same files: PIL (the reference), torchvision.io and,
where installed, torchcodec, each through densessl.data.image_io.decode_rgb (bytes in memory
-> uint8 (3, H, W)), interleaved rounds, median; plus the largest pixel difference from PIL.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/decoders.py --sizes 64 224 512 --images 200
"""
from __future__ import annotations

import argparse
import io
import time

import numpy as np
import torch
from PIL import Image

from densessl.data.image_io import decode_rgb


def make(n: int, side: int, seed: int = 0) -> list[bytes]:
    """Smooth random photos-like JPEGs (quality 90, 4:2:0) of side x 3/4 side px."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (max(2, side // 16), max(2, side // 12), 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((side, side * 3 // 4), Image.BICUBIC).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 224, 512])
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    decoders = ["pil", "torchvision"]
    try:
        import torchcodec.decoders  # noqa: F401

        decoders.append("torchcodec")
    except ImportError:
        pass
    print("| JPEG size | KB each | " + " | ".join(f"{d} images/s" for d in decoders)
          + " | " + " | ".join(f"{d} max diff" for d in decoders[1:]) + " |")
    print("|---|---:|" + "---:|" * (2 * len(decoders) - 1))
    for side in args.sizes:
        jpegs = make(args.images, side)
        times = {d: [] for d in decoders}
        for _ in range(args.rounds):
            for d in decoders:  # interleaved: each round runs every decoder once
                t = time.perf_counter()
                for b in jpegs:
                    decode_rgb(b, d)
                times[d].append(time.perf_counter() - t)
        ref = [decode_rgb(b, "pil") for b in jpegs]
        diffs = [max(int((decode_rgb(b, d).int() - r.int()).abs().max()) for b, r in zip(jpegs, ref))
                 for d in decoders[1:]]
        rates = [args.images / float(np.median(times[d])) for d in decoders]
        kb = np.mean([len(b) for b in jpegs]) / 1024
        print(f"| {side}x{side * 3 // 4} | {kb:.1f} | " + " | ".join(f"{r:.0f}" for r in rates) + " | "
              + " | ".join(str(x) for x in diffs) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
