#!/usr/bin/env bash
# CUDA build check for machines without a GPU: compile and link every CUDA source against a
# CUDA build of torch, load the library, and fail unless every fastflow operator has both a CPU
# and a CUDA kernel registered. A CUDA kernel that no CPU-only build compiles would otherwise
# rot unseen until someone runs on a GPU.
#
# Needs only python3 and a CUDA toolkit (CUDA_HOME, default /usr/local/cuda). The CUDA torch
# lives in its own venv, ${FASTFLOW_CUDA_VENV:-.ci/.venv-cuda}, created on first use, and the
# build goes to a scratch folder (${FASTFLOW_CUDA_BUILD_DIR}, kept for incremental rebuilds when
# set, else a temporary one), so the CPU venv and its editable build in the tree are untouched.
set -euo pipefail
cd "$(dirname "$0")/.."

start=$(date +%s)
say() { echo "cuda-check: $*"; }
fail() { echo "cuda-check: FAILED: $*" >&2; exit 1; }

venv="${FASTFLOW_CUDA_VENV:-.ci/.venv-cuda}"
torch_version="${FASTFLOW_CUDA_TORCH_VERSION:-2.14.1}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export FASTFLOW_CUDA=1
# An out-of-tree build must not rewrite fastflow/_build_config.py of the CPU build in the tree.
export FASTFLOW_WRITE_BUILD_CONFIG=0
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

[ -x "$CUDA_HOME/bin/nvcc" ] || fail "no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME)"
command -v python3 >/dev/null || fail "python3 not found"

# 1. The venv with a CUDA build of torch: reused when it already has what the build needs.
py="$venv/bin/python"
if [ ! -x "$py" ]; then
  say "creating venv $venv"
  python3 -m venv "$venv" || fail "python3 -m venv $venv"
fi
venv_ready() {
  "$py" - "$torch_version" <<'EOF' 2>/dev/null
import sys
import ninja, numpy, setuptools, torch  # noqa: F401
sys.exit(0 if torch.__version__.split("+")[0] == sys.argv[1] and torch.version.cuda else 1)
EOF
}
if venv_ready; then
  say "reusing $venv"
else
  say "installing torch==$torch_version (CUDA build, ~5.5 GB; minutes the first time), ninja, numpy into $venv"
  "$py" -m pip install -q --disable-pip-version-check \
    "torch==$torch_version" ninja numpy setuptools || fail "pip install into $venv"
  venv_ready || fail "$venv has no CUDA build of torch $torch_version after installing"
fi
site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# torch's CUDA headers include cusparse.h and friends, which a pip-installed CUDA torch ships in
# the nvidia wheels rather than in the toolkit.
wheel_inc="$(dirname "$(ls "$site"/nvidia/*/include/cusparse.h 2>/dev/null | head -n1)" 2>/dev/null || true)"
[ -n "$wheel_inc" ] && [ -d "$wheel_inc" ] || fail "no nvidia/*/include/cusparse.h under $site"
export CPLUS_INCLUDE_PATH="$wheel_inc${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}"
export CPATH="$wheel_inc${CPATH:+:$CPATH}"
say "torch $("$py" -c 'import torch; print(torch.__version__, "(CUDA", torch.version.cuda + ")")')," \
    "nvcc $("$CUDA_HOME/bin/nvcc" --version | grep -o 'release [0-9.]*' | cut -d' ' -f2)," \
    "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, headers from $wheel_inc"

# 2. Build fastflow._C with its CUDA sources, out of tree.
if [ -n "${FASTFLOW_CUDA_BUILD_DIR:-}" ]; then
  out="$FASTFLOW_CUDA_BUILD_DIR"
  mkdir -p "$out"
else
  out="$(mktemp -d)"
  trap 'rm -rf "$out"' EXIT
fi
say "building fastflow._C (CPU + CUDA sources: $(ls csrc/cuda/*.cu | tr '\n' ' ')) into $out, $MAX_JOBS jobs"
build_start=$(date +%s)
rm -rf "$out/lib"
if ! "$py" setup.py -q build_ext --build-lib "$out/lib" --build-temp "$out/obj" \
    > "$out/build.log" 2>&1; then
  tail -n 60 "$out/build.log"
  fail "build (log above, last 60 lines)"
fi
lib="$(ls "$out"/lib/fastflow/_C*.so 2>/dev/null | head -n1)"
[ -n "$lib" ] || fail "build produced no fastflow/_C*.so under $out/lib"
warnings=$(grep -c -i 'warning' "$out/build.log" || true)
say "built $(basename "$lib") in $(( $(date +%s) - build_start )) s ($warnings warning lines in the build log)"

# 3. Load it (no GPU needed) and check every operator's kernels.
"$py" .ci/check_cuda_ops.py "$lib" --schemas csrc/fastflow.cpp || fail "operator check"
say "passed in $(( $(date +%s) - start )) s"
