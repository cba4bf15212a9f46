#!/usr/bin/env bash
# A separate environment for side-by-side benchmarks: densessl plus the peers it is compared
# with (lightly). The peers are never dependencies of densessl itself.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-bench/bin/python ]; then
  python3 -m venv .venv-bench
  .venv-bench/bin/pip install -q torch==2.14.1 torchvision==0.29.1
  .venv-bench/bin/pip install -q lightly==1.6.0
  .venv-bench/bin/pip install -q -e .
fi
