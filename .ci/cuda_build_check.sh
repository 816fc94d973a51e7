#!/usr/bin/env bash
# CUDA build check, for machines without a GPU: compile and link every CUDA source against a
# CUDA build of torch (in its own venv, never the CPU venv), load the library, and fail unless
# every fastflow operator has both a CPU and a CUDA kernel registered.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${FASTFLOW_CUDA_VENV:-.ci/.venv-cuda}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
start=$(date +%s)
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "cuda-check: no nvcc at $CUDA_HOME/bin/nvcc" >&2
  exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "cuda-check: creating $venv"
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
  echo "cuda-check: installing the CUDA build of torch into $venv (several GB, from local disk)"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check \
    "torch==${FASTFLOW_CUDA_TORCH_VERSION:-2.14.1}" ninja numpy setuptools wheel
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check ninja setuptools wheel
echo "cuda-check: torch $("$venv/bin/python" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)'), nvcc $("$CUDA_HOME/bin/nvcc" --version | grep -o 'release [0-9.]*')"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
echo "cuda-check: building fastflow._C with CUDA for sm_${TORCH_CUDA_ARCH_LIST}"
FASTFLOW_CUDA=1 FASTFLOW_WRITE_BUILD_CONFIG=0 MAX_JOBS="${MAX_JOBS:-2}" \
  "$venv/bin/python" setup.py -q build_ext --build-lib "$out/lib" --build-temp "$out/obj" \
  > "$out/build.log" 2>&1 || { tail -n 60 "$out/build.log"; echo "cuda-check: build FAILED" >&2; exit 1; }
lib="$(ls "$out"/lib/fastflow/_C*.so)"
echo "cuda-check: built $(basename "$lib") in $(( $(date +%s) - start )) s"
"$venv/bin/python" .ci/check_cuda_ops.py "$lib"
