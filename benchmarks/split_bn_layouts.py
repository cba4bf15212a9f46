"""Shuffle-BN on one process (SplitBatchNorm2d) in each memory layout, and an alternative.

SplitBatchNorm2d folds the batch into channels (N, C, H, W) -> (N/G, G*C, H, W): a free view of a
contiguous tensor, a copy of a channels_last one. The alternative computes the G groups'
statistics with `var_mean` on a (N/G, G, C, H, W) view, which keeps either layout. Each contender
is one `Trainer.train_step` of a recipe (bf16, as the CPU defaults), interleaved rounds.

python benchmarks/split_bn_layouts.py [moco|densecl|cgh]
"""
import sys

import torch

from densessl.bench import format_results, interleaved, recipe_step
from densessl.methods import moco

FOLD = moco.SplitBatchNorm2d.forward


def var_mean_forward(self, x):
    """The same normalisation and running statistics as SplitBatchNorm2d, without folding."""
    G = self.num_splits
    if not self.training or G == 1:
        return torch.nn.BatchNorm2d.forward(self, x)
    N, C, H, W = x.shape
    x5 = x.unflatten(0, (N // G, G))  # sample i is in group i mod G, as in SplitBatchNorm2d
    var, mean = torch.var_mean(x5.float(), dim=(0, 3, 4), correction=0)  # (G, C)
    scale = self.weight.view(1, C) * torch.rsqrt(var + self.eps)
    shift = self.bias.view(1, C) - mean * scale
    y = x5 * scale.to(x.dtype)[None, :, :, None, None] + shift.to(x.dtype)[None, :, :, None, None]
    with torch.no_grad():
        n = N // G * H * W
        self.running_mean.mul_(1 - self.momentum).add_(mean.mean(0), alpha=self.momentum)
        self.running_var.mul_(1 - self.momentum).add_((var * n / (n - 1)).mean(0), alpha=self.momentum)
        self.num_batches_tracked.add_(1)
    return y.flatten(0, 1)


def check_equal() -> None:
    torch.manual_seed(0)
    for layout in (torch.contiguous_format, torch.channels_last):
        a, b = moco.SplitBatchNorm2d(6, 4), moco.SplitBatchNorm2d(6, 4)
        with torch.no_grad():
            a.weight.uniform_(), a.bias.uniform_()
        b.load_state_dict(a.state_dict())
        x = (torch.randn(8, 6, 3, 3) * 3 + 1).contiguous(memory_format=layout)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = FOLD(a, xa), var_mean_forward(b, xb)
        g = torch.randn_like(ya)
        ya.backward(g), yb.backward(g)
        assert torch.allclose(ya, yb, atol=1e-5) and torch.allclose(xa.grad, xb.grad, atol=1e-5)
        assert torch.allclose(a.running_var, b.running_var, atol=1e-6)


def with_forward(step, forward):
    def run():
        moco.SplitBatchNorm2d.forward = forward
        step()
    return run


if __name__ == "__main__":
    method = sys.argv[1] if len(sys.argv) > 1 else "mocov2"
    check_equal()
    contenders = {}
    for impl, forward in (("fold", FOLD), ("var_mean", var_mean_forward)):
        for cl in (False, True):
            contenders[f"{impl}, bf16, {'channels_last' if cl else 'contiguous'}"] = with_forward(
                recipe_step(method, "small", 128, "bf16", cl, True), forward)
    print(f"{method}-scenes training step, batch 128")
    print(format_results(interleaved(contenders, rounds=5, batch=128), next(iter(contenders))))
