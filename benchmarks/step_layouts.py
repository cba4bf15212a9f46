"""The BYOL step of the Fashion-Scenes recipe's backbone in each precision and memory layout.

python benchmarks/step_layouts.py   (prints a table; interleaved rounds, medians)
"""
from densessl.bench import densessl_byol_step, format_results, interleaved

if __name__ == "__main__":
    contenders = {}
    for precision in ("fp32", "bf16"):
        for cl in (False, True):
            contenders[f"{precision}, {'channels_last' if cl else 'contiguous'}"] = densessl_byol_step(
                "resnet18_small", 32, 64, 128, precision, cl)
    print("BYOL step, resnet18_small width 32, 64 px, batch 128")
    print(format_results(interleaved(contenders, rounds=5, batch=128), "fp32, contiguous"))
