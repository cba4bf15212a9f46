"""oneDNN convolution against the dense-matrix form (densessl.models.small_maps) on small maps.

For each layer shape of ResNet C4/C5 at 64-96 px: forward and forward+backward time (ms, median
of interleaved rounds) of nn.Conv2d and of its dense form (small_map_conv2d, same weights), bf16 autocast and fp32,
channels_last, batch 128 (BYOL's two views of 64 images), on this machine's threads.

python benchmarks/small_map_conv.py
"""
import statistics
import time

import torch

from densessl.models.small_maps import small_map_conv2d

# (in channels, out channels, kernel, stride, input side): ResNet-18 layer4 at 64 px (2x2),
# its first block (4x4 -> 2x2, and the 1x1 shortcut), layer4 at 96 px (3x3), layer3/resnet18_small C5 (4x4)
SHAPES = [(512, 512, 3, 1, 2), (256, 512, 3, 2, 4), (256, 512, 1, 2, 4), (512, 512, 3, 1, 3),
          (256, 256, 3, 1, 4), (256, 256, 3, 1, 3)]


def timed(fn, rounds=7, reps=5):
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t) / reps * 1000)
    return times


def main(batch=128):
    for dtype in (torch.bfloat16, torch.float32):
        table(batch, dtype)


def table(batch, dtype):
    print(f"\nthreads {torch.get_num_threads()}, batch {batch}, {dtype}, channels_last; ms (median of 7 rounds)")
    print("| C_in -> C_out, k, stride, map | conv fwd | dense fwd | conv fwd+bwd | dense fwd+bwd | fwd+bwd speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    for cin, cout, k, s, side in SHAPES:
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(cin, cout, k, stride=s, padding=k // 2, bias=False).to(memory_format=torch.channels_last)

        def dense(x, conv=conv):  # the dense form, forced for every shape (the module applies a rule)
            return small_map_conv2d(x, conv.weight, None, conv.stride, conv.padding)
        x = torch.randn(batch, cin, side, side).contiguous(memory_format=torch.channels_last).requires_grad_()

        def fwd(m):
            def run():
                with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                    m(x)
            return run

        def fwd_bwd(m):
            def run():
                with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                    y = m(x)
                y.float().sum().backward()
            return run

        res = {}
        for name, fn in [("conv fwd", fwd(conv)), ("dense fwd", fwd(dense)),
                         ("conv fb", fwd_bwd(conv)), ("dense fb", fwd_bwd(dense))]:
            fn(), fn()  # warm-up: oneDNN primitive creation, tap-index cache
            res[name] = []
        for _ in range(7):  # interleaved rounds
            for name, fn in [("conv fwd", fwd(conv)), ("dense fwd", fwd(dense)),
                             ("conv fb", fwd_bwd(conv)), ("dense fb", fwd_bwd(dense))]:
                res[name] += timed(fn, rounds=1)
        med = {k: statistics.median(v) for k, v in res.items()}
        print(f"| {cin} -> {cout}, {k}x{k}, s{s}, {side}x{side} | {med['conv fwd']:.1f} | {med['dense fwd']:.1f} | "
              f"{med['conv fb']:.1f} | {med['dense fb']:.1f} | {med['conv fb'] / med['dense fb']:.2f}x |")


if __name__ == "__main__":
    main()
