"""Running a test's worker in several CPU processes (torch.distributed with gloo)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch.multiprocessing as mp


def run_forked(worker: Callable, args: tuple, nprocs: int, timeout_s: float = 120.0) -> None:
    """Runs ``worker(rank, *args)`` in ``nprocs`` processes and waits for all of them; fails
    the test (killing the workers) if they have not finished within ``timeout_s``.

    fork, not spawn: a spawned child re-imports torch (seconds each on a busy machine). The
    workers set one thread first, as DataLoader workers do, which makes OpenMP fork-safe.
    """
    context = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="fork")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"the distributed workers did not finish within {timeout_s:g} s")
