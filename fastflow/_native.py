"""Loading of the native operators (fastflow._C) and the choice between native and reference.

Every function in :mod:`fastflow.ops` asks :func:`use_native` whether to call
``torch.ops.fastflow.<op>`` or its pure-PyTorch reference. The choice follows the backend set
with :func:`backend`:

``"auto"`` (default)
    native where a kernel is built for the tensor's device and dtype, the reference elsewhere,
    with one warning per operator, device and dtype the first time it falls back.
``"native"``
    native or a ``RuntimeError`` saying why not.
``"reference"``
    always the reference (the oracle of the tests, and the baseline of the benchmark).
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Iterable, Iterator

import torch

__all__ = ["native_available", "backend", "get_backend", "native_load_error", "use_native"]

_BACKENDS = ("auto", "native", "reference")
_backend = "auto"
_warned: set[tuple[str, str, str]] = set()
# Operator name -> device type -> dtypes its native kernel accepts. Filled by fastflow.ops.*.
_native_dtypes: dict[str, dict[str, frozenset[torch.dtype]]] = {}


def _cpu_has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return " avx2" in flags and " fma" in flags
    except OSError:
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _load() -> str | None:
    """Loads fastflow._C; returns None on success, else why it is not available."""
    try:
        config = importlib.import_module("fastflow._build_config")
    except ImportError:
        return "the extension fastflow._C is not built (pip install --no-build-isolation -e .)"
    if not getattr(config, "NATIVE", False):
        return "fastflow was installed without its native extension (FASTFLOW_NO_NATIVE=1)"
    if getattr(config, "CPU_ISA", "none") == "avx2" and not _cpu_has_avx2():
        # Loading an AVX2 build on such a CPU would die with an illegal instruction.
        return (
            "fastflow._C was built for AVX2 but this CPU has no AVX2/FMA; rebuild with "
            "FASTFLOW_CPU_ISA=none"
        )
    try:
        importlib.import_module("fastflow._C")
    except ImportError as exc:
        return f"fastflow._C failed to load: {exc}"
    return None


_load_error = _load()


def native_load_error() -> str | None:
    """Why the native extension is not loaded, or None when it is."""
    return _load_error


def _op_names() -> list[str]:
    return sorted(
        name for name in torch._C._dispatch_get_all_op_names() if name.startswith("fastflow::")
    )


def native_available() -> tuple[str, ...]:
    """Device types (``"cpu"``, ``"cuda"``) for which every native operator has a kernel.

    Empty (falsy) when the extension is not built or failed to load.
    """
    if _load_error is not None:
        return ()
    names = _op_names()
    if not names:
        return ()
    devices = []
    for device, key in (("cpu", "CPU"), ("cuda", "CUDA")):
        if all(torch._C._dispatch_has_kernel_for_dispatch_key(n, key) for n in names):
            devices.append(device)
    return tuple(devices)


def get_backend() -> str:
    """The backend in force: ``"auto"``, ``"native"`` or ``"reference"``."""
    return _backend


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Selects the implementation of every fastflow operator inside the ``with`` block.

    Args:
        name: ``"auto"``, ``"native"`` or ``"reference"`` (see the module docstring).

    Raises:
        ValueError: for an unknown name.
        RuntimeError: for ``"native"`` when the extension is not loaded.

    Example:
        >>> import fastflow
        >>> with fastflow.backend("reference"):
        ...     pass
    """
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    if name == "native" and _load_error is not None:
        raise RuntimeError(f"fastflow.backend('native'): {_load_error}")
    previous = _backend
    _backend = name
    try:
        yield
    finally:
        _backend = previous


def register_native_dtypes(op: str, device: str, dtypes: Iterable[torch.dtype]) -> None:
    """Declares the dtypes that ``op``'s native kernel on ``device`` accepts.

    Only devices with a kernel actually registered in the loaded extension are kept, so that
    :func:`use_native` is a pure-Python look-up (torch.compile traces it without a break).
    """
    if _load_error is not None:
        return
    key = {"cpu": "CPU", "cuda": "CUDA"}[device]
    if torch._C._dispatch_has_kernel_for_dispatch_key(f"fastflow::{op}", key):
        _native_dtypes.setdefault(op, {})[device] = frozenset(dtypes)


def _why_not_native(op: str, device: str, dtype: torch.dtype) -> str | None:
    if _load_error is not None:
        return _load_error
    by_device = _native_dtypes.get(op, {})
    if device not in by_device:
        return f"no native {op} kernel is built for device {device!r}"
    if dtype not in by_device[device]:
        return f"the native {op} kernel on {device} does not take {dtype}"
    return None


def use_native(op: str, x: torch.Tensor) -> bool:
    """Whether ``op`` on a tensor like ``x`` runs natively under the current backend."""
    if _backend == "reference":
        return False
    why = _why_not_native(op, x.device.type, x.dtype)
    if why is None:
        return True
    if _backend == "native":
        raise RuntimeError(f"fastflow.backend('native'): {why}")
    # Without the extension there is one thing to say, so say it once for the whole package.
    key = ("", "", "") if _load_error is not None else (op, x.device.type, str(x.dtype))
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"fastflow: {op} uses the pure-PyTorch reference on {x.device.type}/{x.dtype}: {why}",
            RuntimeWarning,
            stacklevel=3,
        )
    return False
