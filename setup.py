"""Build of fastflow._C, the native operators.

Build against the torch that is already installed:

    pip install --no-build-isolation -e .

Environment switches:
  FASTFLOW_CUDA=1|0       force the CUDA kernels on or off (default: on when torch is a CUDA
                          build and a CUDA toolkit is found)
  FASTFLOW_CPU_ISA=auto|avx2|none
                          instruction set of the CPU kernels (default auto: avx2 when the
                          build machine has AVX2 and FMA). An avx2 build records that in
                          fastflow/_build_config.py and is not loaded on a CPU without AVX2
                          (fastflow falls back to the reference and says why).
  FASTFLOW_NO_NATIVE=1    build nothing native (pure-PyTorch package)
  FASTFLOW_WRITE_BUILD_CONFIG=0
                          do not write fastflow/_build_config.py (out-of-tree builds)
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _cpu_has_avx2() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


def _cpu_isa() -> str:
    isa = os.environ.get("FASTFLOW_CPU_ISA", "auto").lower()
    if isa not in ("auto", "avx2", "none"):
        raise ValueError(f"FASTFLOW_CPU_ISA must be auto, avx2 or none, got {isa!r}")
    if isa == "auto":
        isa = "avx2" if _cpu_has_avx2() else "none"
    return isa


def _want_cuda() -> bool:
    forced = os.environ.get("FASTFLOW_CUDA")
    if forced is not None:
        return forced.strip() not in ("", "0", "false", "False")
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


def _write_build_config(isa: str, cuda: bool, native: bool) -> None:
    if os.environ.get("FASTFLOW_WRITE_BUILD_CONFIG", "1") == "0":
        return  # an out-of-tree build (the CI's CUDA build check) leaves the tree alone
    (ROOT / "fastflow" / "_build_config.py").write_text(
        "# Written by setup.py; describes how fastflow._C was built.\n"
        f"NATIVE = {native!r}\n"
        f"CPU_ISA = {isa!r}\n"
        f"CUDA = {cuda!r}\n"
    )


def _cuda_wheel_includes() -> list[str]:
    """Header folders of the nvidia-* wheels a pip-installed CUDA torch depends on.

    torch's CUDA headers include cusparse.h and friends, which such a torch finds in those
    wheels (e.g. site-packages/nvidia/cu13/include) rather than in the toolkit.
    """
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for root in getattr(nvidia, "__path__", []):
        for inc in sorted(glob.glob(os.path.join(root, "*", "include"))):
            if os.path.exists(os.path.join(inc, "cusparse.h")):
                found.append(inc)
    return found


def _extensions():
    if os.environ.get("FASTFLOW_NO_NATIVE", "0") not in ("", "0"):
        _write_build_config("none", False, False)
        return [], {}

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    isa = _cpu_isa()
    cuda = _want_cuda()
    sources = ["csrc/fastflow.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is implemented inline with OpenMP pragmas in ATen's headers;
    # without it every kernel runs on one thread. libgomp resolves to the copy torch loads.
    cxx = ["-O3", "-fvisibility=hidden", "-fopenmp"]
    if isa == "avx2":
        # ATen's at::vec::Vectorized is plain scalar code unless these are defined.
        cxx += ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    extra = {"cxx": cxx}
    ext_cls = CppExtension
    include_dirs = [str(ROOT / "csrc" / "include")]
    if cuda:
        include_dirs += _cuda_wheel_includes()
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr"]
        ext_cls = CUDAExtension
    ext = ext_cls(
        name="fastflow._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )
    _write_build_config(isa, cuda, True)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
