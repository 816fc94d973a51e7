"""Peak tensor memory on any device: :func:`track_peak_memory`.

``torch.cuda.max_memory_allocated`` answers "how much memory did this need" on CUDA only. This
module answers it on every device (the CPU included) by watching the operators themselves: a
:class:`~torch.utils._python_dispatch.TorchDispatchMode` sees the output of every operator that
goes through the dispatcher (forward, the autograd engine's backward, the optimiser, fastflow's
native operators), records each output's storage once, and subtracts it again when the storage
is freed (``weakref.finalize``). The running total is the memory held by the tensor storages
created inside the block; its maximum is the peak.

What it counts:

* the bytes of every tensor storage created by a dispatched operator while the tracker is
  active (factory functions, operator outputs, autograd's saved tensors, which are such outputs,
  the gradients computed in backward), until the storage is freed, whether that happens inside
  the block or after it;
* a storage that already existed when the block was entered (parameters, inputs) counts zero,
  also when an in-place or view operator returns it (baseline 0: the peak is what the block
  needed on top of what already lived, like the CUDA figure of ``bench/harness.py``).

What it does not count: the caching and fragmentation of the allocators (the CUDA caching
allocator, glibc's ``malloc``), workspaces that a kernel allocates and frees internally without
returning them as a tensor (oneDNN or cuBLAS scratch space, the temporaries of a C++ kernel,
so also everything a native fastflow operator allocates inside itself: use
:func:`track_peak_allocations` to compare a native operator with anything else),
storages created outside the dispatcher (``torch.get_rng_state``, tensors made from NumPy
arrays), and the growth of an existing storage by ``resize_``. It is a count of live tensor
bytes, the quantity that autograd's memory use is made of, not a reading of the process's
resident memory. Tracking adds Python work to every operator: measure time without it.

Example:
    >>> a = torch.randn(256, 256, requires_grad=True)
    >>> with track_peak_memory() as mem:
    ...     loss = (a @ a).tanh().sum()    # tanh saves its 256 x 256 output for backward
    ...     loss.backward()
    >>> mem.peak_bytes >= 2 * 256 * 256 * 4
    True
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["PeakMemory", "track_peak_allocations", "track_peak_memory"]


class PeakMemory:
    """The figures of one :func:`track_peak_memory` block (bytes; ``*_mib`` in MiB).

    Attributes:
        peak_bytes: the most bytes of tracked storages alive at once while the block ran.
        current_bytes: the bytes of tracked storages still alive now (it keeps falling after the
            block as they are freed).
        allocated_bytes: the total bytes of every storage created in the block.
        allocations: the number of storages created in the block.
        device: the device type counted (None: every device).
    """

    def __init__(self, device: str | None):
        self.device = device
        self.peak_bytes = 0
        self.current_bytes = 0
        self.allocated_bytes = 0
        self.allocations = 0
        self._lock = threading.Lock()

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20

    @property
    def current_mib(self) -> float:
        return self.current_bytes / 2**20

    def __repr__(self) -> str:
        return (
            f"PeakMemory(peak={self.peak_mib:.3f} MiB, current={self.current_mib:.3f} MiB, "
            f"allocated={self.allocated_bytes / 2**20:.3f} MiB in {self.allocations} storages, "
            f"device={self.device})"
        )

    def _add(self, nbytes: int) -> None:
        with self._lock:
            self.current_bytes += nbytes
            self.allocated_bytes += nbytes
            self.allocations += 1
            if self.current_bytes > self.peak_bytes:
                self.peak_bytes = self.current_bytes

    def _free(self, nbytes: int) -> None:
        with self._lock:
            self.current_bytes -= nbytes


def _storage(t: torch.Tensor) -> torch.UntypedStorage | None:
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, functional)
        return None


class _StorageCounter(TorchDispatchMode):
    def __init__(self, result: PeakMemory):
        super().__init__()
        self.result = result
        # StorageImpl address -> True while the storage lives (removed by its finalizer)
        self._live: dict[int, bool] = {}

    def _forget(self, key: int, nbytes: int) -> None:
        self._live.pop(key, None)
        self.result._free(nbytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = set()
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor):
                s = _storage(t)
                if s is not None:
                    inputs.add(s._cdata)
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            if self.result.device is not None and t.device.type != self.result.device:
                continue
            s = _storage(t)
            if s is None:
                continue
            key = s._cdata
            # in-place and view operators return a storage they were given: not a new one
            if key in inputs or key in self._live:
                continue
            nbytes = s.nbytes()
            self._live[key] = True
            self.result._add(nbytes)
            weakref.finalize(s, self._forget, key, nbytes)
        return out


class track_peak_memory:  # noqa: N801 (used as a function: ``with track_peak_memory() as mem``)
    """Context manager that measures the peak bytes of tensor storages created inside it.

    Works on every device (module docstring: what is and is not counted). The figures are on
    the returned :class:`PeakMemory`, final for ``peak_bytes`` once the block has exited.

    Arguments:
        device: count only storages on this device type (``"cpu"``, ``"cuda"``, or a
            ``torch.device``); None counts every device.

    Example:
        >>> with track_peak_memory() as mem:
        ...     x = torch.empty(1000, dtype=torch.float64)   # 8000 bytes
        ...     del x
        ...     y = torch.empty(10)                          # 40 bytes
        >>> mem.peak_bytes, mem.current_bytes
        (8000, 40)
    """

    def __init__(self, device: str | torch.device | None = None):
        if device is not None:
            if isinstance(device, str):
                device = torch.device(device)
            if not isinstance(device, torch.device):
                raise TypeError(
                    f"device must be None, a device type string or a torch.device, got "
                    f"{type(device).__name__}"
                )
            device = device.type
        self.result = PeakMemory(device)
        self._mode: _StorageCounter | None = None

    def __enter__(self) -> PeakMemory:
        if self._mode is not None:
            raise RuntimeError("a track_peak_memory object cannot be entered twice; make a new one")
        self._mode = _StorageCounter(self.result)
        self._mode.__enter__()
        return self.result

    def __exit__(self, *exc: Any) -> None:
        assert self._mode is not None
        self._mode.__exit__(*exc)


class track_peak_allocations:  # noqa: N801 (used as a function)
    """Context manager that measures the peak bytes held by the allocator of ``device`` inside
    the block: every allocation counts, the temporaries a C++/CUDA kernel allocates and frees
    internally included (which :func:`track_peak_memory` cannot see inside a native operator).

    It reads the allocator's events through the PyTorch profiler (``profile_memory=True``,
    the memory timeline), so it is slower than :func:`track_peak_memory` and adds the profiler's
    overhead: measure time without it. Memory that existed before the block counts zero; the
    figure is the largest sum of the sizes of the allocations made in the block and not yet
    freed at any moment.

    Arguments:
        device: ``"cpu"`` (default) or ``"cuda"``: the allocator to count.

    Example:
        >>> with track_peak_allocations() as mem:
        ...     a = torch.ones(1000, dtype=torch.float64)     # 8000 bytes
        ...     b = (a * 2).sum()                             # 8000 more, freed at once
        >>> mem.peak_bytes >= 16000
        True
    """

    def __init__(self, device: str | torch.device = "cpu"):
        if isinstance(device, torch.device):
            device = device.type
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        self.result = PeakMemory(device)
        self._prof = None

    def __enter__(self) -> PeakMemory:
        from torch.profiler import ProfilerActivity, profile

        if self._prof is not None:
            raise RuntimeError("a track_peak_allocations object cannot be entered twice; make a new one")
        activities = [ProfilerActivity.CPU]
        if self.result.device == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self._prof = profile(activities=activities, profile_memory=True, record_shapes=True,
                             with_stack=True)
        self._prof.__enter__()
        return self.result

    def __exit__(self, *exc: Any) -> None:
        from torch.profiler._memory_profiler import Action

        self._prof.__exit__(*exc)
        if exc[0] is not None:
            return
        live = 0
        for _, action, (key, _version), size in self._prof._memory_profile().timeline:
            if key.device.type != self.result.device or action == Action.PREEXISTING:
                continue
            if action == Action.CREATE:
                live += size
                self.result.allocated_bytes += size
                self.result.allocations += 1
            elif action == Action.DESTROY:
                live -= size
            self.result.peak_bytes = max(self.result.peak_bytes, live)
        self.result.current_bytes = live
