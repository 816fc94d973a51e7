#!/usr/bin/env bash
# Sets up a development environment in .venv (or $FASTFLOW_VENV): torch, the test, plot and data
# (scikit-learn) extras, and fastflow itself with its native extension built against that torch.
# Idempotent: a second run reuses the environment and rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${FASTFLOW_VENV:-.venv}"
py="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv"
  "$py" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
# torch is pinned to the CPU wheel of this machine kind; a plain "torch" would pull a CUDA build.
"${pip[@]}" "torch==${FASTFLOW_TORCH_VERSION:-2.13.0}" setuptools wheel ninja numpy \
  pytest pytest-xdist hypothesis expecttest matplotlib tqdm scikit-learn torchdiffeq
echo "setup: building fastflow._C (about a minute on 2 cores)"
"${pip[@]}" --no-build-isolation -e .
"$venv/bin/python" -c "import fastflow; print('setup: fastflow', fastflow.__version__, 'native:', fastflow.native_available() or fastflow.native_load_error())"
