"""Shared fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors: one thread is as fast on an idle machine, and on a busy
    2-core machine two OpenMP threads spin against other processes (10-20x slower). The
    operator tests keep torch's default so the kernels' parallel paths run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global random state, so a test that draws without its
    own generator gives the same numbers in every run and in any order (no flaky tolerances)."""
    torch.manual_seed(0)
    yield
