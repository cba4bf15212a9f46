"""pyflakes' checks over the code, tests and benchmarks (undefined names, unused imports and
variables): a moved function whose old import was left behind fails here, not in a user's run."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_pyflakes_checks_pass():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise",
                           "densessl", "tests", "benchmarks"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
