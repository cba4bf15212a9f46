#!/usr/bin/env bash
# The GPU check (docs/performance.md, "GPU check"): benchmarks/device_check.py, one JSON file.
#
#   bash benchmarks/device_check.sh --fetch-wheels        # once, on a machine with pip access:
#        omegaconf (densessl needs it) and lightly (the BYOL reference) as wheels in
#        runs/device-wheels, for the GPU image's Python 3.12, which has neither
#   bash benchmarks/device_check.sh [OUT.json] [options]  # the check (GPU sizes; < 8 min on one GPU)
#   bash benchmarks/device_check.sh --tiny OUT.json       # every code path at CPU sizes (seconds)
#
# OUT.json defaults to $OUT/device_check.json (else runs/device_check.json). The Python is
# $PYTHON, else .venv/bin/python when it imports densessl, else python3; densessl is imported
# from this checkout (PYTHONPATH), so nothing needs installing. Options: python
# benchmarks/device_check.py --help.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=runs/device-wheels

if [ "${1:-}" = "--fetch-wheels" ]; then
  PIP=python3; [ -x .venv/bin/python ] && PIP=.venv/bin/python
  exec "$PIP" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any \
    -d "$WHEELS" omegaconf==2.4.0 lightly==1.6.0
fi

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import densessl, torch" 2>/dev/null; then
    PY=.venv/bin/python
  else
    PY=python3
  fi
fi
# only the packages this Python lacks, from the carried wheels, into a private folder
SITE=${TMPDIR:-/tmp}/densessl-device-site
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}:$SITE"
for pair in omegaconf:omegaconf lightly:lightly; do
  mod=${pair%%:*}; whl=${pair##*:}
  if ! "$PY" -c "import $mod" 2>/dev/null; then
    if ls "$WHEELS"/"$whl"-*.whl >/dev/null 2>&1; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --upgrade \
        --target "$SITE" "$WHEELS"/"$whl"-*.whl || echo "device_check.sh: could not install $whl from $WHEELS" >&2
    else
      echo "device_check.sh: $mod is not importable and $WHEELS has no $whl wheel (see --fetch-wheels)" >&2
    fi
  fi
done
export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/device_check.py "$@"
