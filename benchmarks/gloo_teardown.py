"""How often a 2-process gloo run aborts at exit, with and without freeing DDP before teardown.

Runs the SCRL two-process test script (tests/methods/test_scrl.py, mode "plain one") N times in
each variant, alternating: "kept" keeps the DistributedDataParallel wrapper alive through
`shutdown_distributed()` (the script before 2026-11-30), "freed" deletes it first (the script
now). An abort shows as a non-zero exit after both ranks printed "ok" ("terminate called without
an active exception"). The rate grows with machine load; run it beside other work to see it.
With `--trainer`, the same count for the trainer's own path: `torchrun -m densessl.cli pretrain
byol-scenes` with the test suite's tiny settings (8 steps, synchronised BN, a checkpoint every
2 steps); there a run counts as aborted when it exits non-zero.

python benchmarks/gloo_teardown.py [N] [--trainer]
"""
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "tests"),
                str(Path(__file__).resolve().parents[1] / "tests" / "methods")]
from conftest import TINY, subprocess_env  # noqa: E402
from test_scrl import DDP_SCRIPT  # noqa: E402

FREE = "del ddp, out"


def trainer_aborts(n: int) -> int:
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                  "--standalone", "-m", "densessl.cli", "pretrain", "byol-scenes", *TINY,
                                  "train.sync_bn=true", f"run_dir={tmp}/run{i}"],
                                 env=subprocess_env(), capture_output=True, text=True)
            failures += res.returncode != 0
            if res.returncode != 0:
                print(f"run {i}: exit {res.returncode}: {res.stderr[-400:]}", flush=True)
    return failures


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 40
    if "--trainer" in sys.argv:
        print(f"| path | runs | aborted |\n|---|---:|---:|\n| densessl pretrain under torchrun | {n} | "
              f"{trainer_aborts(n)} |")
        sys.exit(0)
    assert FREE in DDP_SCRIPT, "the test script no longer frees its DDP wrapper as expected"
    variants = {"freed": DDP_SCRIPT, "kept": DDP_SCRIPT.replace(FREE, "pass")}
    failures = dict.fromkeys(variants, 0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, text in variants.items():
            paths[name] = Path(tmp) / f"ddp_{name}.py"
            paths[name].write_text(text)
        for _ in range(n):
            for name, path in paths.items():
                res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                      "--standalone", str(path), "plain", "one"], capture_output=True, text=True)
                failures[name] += res.returncode != 0
    print("| DDP wrapper at teardown | runs | aborted |\n|---|---:|---:|")
    for name in variants:
        print(f"| {name} | {n} | {failures[name]} |")
