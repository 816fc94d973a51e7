"""fastflow.memory.track_peak_memory: live tensor-storage bytes on any device, counted by hand.

The ground truth here needs no CUDA: a chain ``h <- tanh(h @ W_i)`` keeps exactly one
``[B, D]`` activation per layer for backward (``tanh`` saves its output, ``mm`` its inputs), so
every figure of the tracker can be written down in advance.
"""

from __future__ import annotations

import gc
import os
import sys

import pytest
import torch

import fastflow

from fastflow.memory import PeakMemory, track_peak_allocations, track_peak_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

pytestmark = pytest.mark.usefixtures("one_thread")

B, D, L = 8, 32, 4
UNIT = B * D * 4  # one float32 activation [B, D]


def _chain():
    weights = [torch.randn(D, D, requires_grad=True) for _ in range(L)]
    return weights, torch.randn(B, D)


def test_allocation_and_free_are_counted():
    with track_peak_memory() as mem:
        x = torch.empty(1000, dtype=torch.float64)  # 8000 bytes
        del x
        y = torch.empty(10)  # 40 bytes
    assert isinstance(mem, PeakMemory)
    assert mem.peak_bytes == 8000
    assert mem.current_bytes == 40
    assert mem.allocated_bytes == 8040 and mem.allocations == 2
    del y
    gc.collect()
    assert mem.current_bytes == 0  # freed after the block: still subtracted
    assert mem.peak_bytes == 8000


def test_existing_storages_count_zero():
    x = torch.randn(100, 100)
    with track_peak_memory() as mem:
        x.add_(1.0)  # in place: the storage it returns existed before
        v = x.view(-1)[:10]  # views share it
        x.t_()
    assert mem.peak_bytes == 0 and mem.allocations == 0
    del v


def test_forward_saved_activations_by_hand():
    weights, x = _chain()
    with track_peak_memory() as mem:
        h = x
        for w in weights:
            h = torch.tanh(h @ w)  # mm's output lives until tanh's output exists
        loss = h.sum()
    # at the last layer: L - 1 saved activations + mm's output + tanh's output
    assert mem.peak_bytes == (L + 1) * UNIT
    # afterwards: the L saved tanh outputs (the last one is h) and the 4-byte loss
    assert mem.current_bytes == L * UNIT + 4
    del h
    assert mem.current_bytes == L * UNIT + 4  # h is also saved by the graph of loss
    del loss  # the graph goes, and its saved tensors with it
    gc.collect()
    assert mem.current_bytes == 0


def test_backward_allocations_by_hand():
    weights, x = _chain()
    h = x
    for w in weights:
        h = torch.tanh(h @ w)
    loss = h.sum()
    with track_peak_memory() as mem:
        loss.backward()
    # what stays: the L weight gradients [D, D]; the peak adds the gradient flowing through
    # the chain ([B, D]) and the 4-byte gradient of the loss
    assert mem.current_bytes == L * D * D * 4
    assert mem.peak_bytes == L * D * D * 4 + UNIT + 4


def test_train_step_peak_covers_activations_and_gradients():
    weights, x = _chain()
    with track_peak_memory() as mem:
        h = x
        for w in weights:
            h = torch.tanh(h @ w)
        h.sum().backward()
    # the gradients are made while the activations are still saved
    assert mem.peak_bytes >= L * UNIT + D * D * 4
    assert mem.peak_bytes <= (L + 1) * UNIT + L * D * D * 4 + UNIT + 8


def test_autograd_function_saved_tensors_are_seen():
    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            b = a * 2  # an intermediate kept on ctx, not an output
            ctx.keep = b
            return a * a

        @staticmethod
        def backward(ctx, g):
            return g * ctx.keep

    a = torch.randn(1000, requires_grad=True)
    with track_peak_memory() as mem:
        out = Square.apply(a)
    assert mem.current_bytes == 2 * 4000  # out and the kept intermediate
    del out
    gc.collect()
    assert mem.current_bytes == 0


def test_device_filter():
    with track_peak_memory(device="cuda") as mem:
        torch.empty(1000)
    assert mem.peak_bytes == 0
    with track_peak_memory(device=torch.device("cpu")) as mem:
        torch.empty(1000)
    assert mem.peak_bytes == 4000
    with pytest.raises(TypeError, match="device"):
        track_peak_memory(device=3)


def test_nested_trackers_and_reuse():
    with track_peak_memory() as outer:
        a = torch.empty(100)
        with track_peak_memory() as inner:
            b = torch.empty(200)
        del b
    assert inner.peak_bytes == 800
    assert outer.peak_bytes == 1200
    del a
    tracker = track_peak_memory()
    with tracker:
        pass
    with pytest.raises(RuntimeError, match="entered twice"):
        with tracker:
            pass


def test_harness_reports_cpu_peak_in_one_untimed_call():
    from bench import harness

    calls = {"n": 0, "tracked": 0}

    def factory():
        w = torch.randn(64, 64, requires_grad=True)

        def fn():
            calls["n"] += 1
            if torch.autograd.profiler._is_profiler_enabled:  # under the tracker
                calls["tracked"] += 1
            h = torch.randn(128, 64)
            for _ in range(3):
                h = torch.tanh(h @ w)
            h.sum().backward()

        return fn

    group = harness.Group(case="mem/test", pass_="train-step", impls={"a": factory}, repeat=3,
                          warmup=1, memory=True)
    (rec,) = harness.run_group(group, torch.device("cpu"), torch.float32, min_sample_ms=0,
                               log=lambda _: None)
    assert rec.peak_mem_method == "track_peak_allocations"
    # input [128, 64] + 3 saved activations, at least
    assert rec.peak_mem_mb is not None and rec.peak_mem_mb * 2**20 >= 4 * 128 * 64 * 4
    # 1 warmup + 3 timed samples (min_sample_ms=0: no probe) + exactly one tracked call
    assert calls["n"] == 1 + 3 + 1
    assert calls["tracked"] == 1  # the timed samples ran without the tracker
    group.memory = False
    (rec,) = harness.run_group(group, torch.device("cpu"), torch.float32, min_sample_ms=0,
                               log=lambda _: None)
    assert rec.peak_mem_mb is None and rec.peak_mem_method is None
    (rec,) = harness.run_group(group, torch.device("cpu"), torch.float32, min_sample_ms=0,
                               log=lambda _: None, memory=True)
    assert rec.peak_mem_mb is not None


# --------------------------------------------------------------------------------------------
# track_peak_allocations: the allocator's own events (kernel temporaries included)


def test_allocations_are_counted_by_the_allocator():
    gc.collect()
    with track_peak_allocations() as mem:
        a = torch.empty(1000, dtype=torch.float64)   # 8000 bytes
        b = torch.empty(500, dtype=torch.float64)    # 4000 more: 12000 at once
        del a, b
        c = torch.empty(10)                          # 40 bytes, still alive at the end
    assert mem.peak_bytes == 12000
    assert mem.current_bytes == 40
    assert mem.allocations == 3
    with pytest.raises(ValueError, match="device"):
        track_peak_allocations("tpu")
    del c


@pytest.mark.skipif(not fastflow.native_available(), reason="fastflow._C is not built")
def test_allocations_see_inside_native_operators():
    """The residual block's native trace operator allocates its per-layer tensors inside C++:
    the allocator sees them, the dispatch-level tracker does not."""
    from fastflow.nn import iResBlock, residual_mlp

    torch.manual_seed(0)
    block = iResBlock(residual_mlp(2, 128, 3), estimator="roulette")
    x = torch.randn(256, 2)

    def step():
        y, logdet = block(x)
        (y.square().sum() - logdet.sum()).backward()

    step()
    with fastflow.backend("native"):
        with track_peak_memory() as storages:
            step()
        with track_peak_allocations() as allocations:
            step()
    # the operator's backward holds at least the activations' inputs of 3 hidden layers of 128
    assert allocations.peak_bytes >= 3 * 256 * 128 * 4
    assert allocations.peak_bytes > 2 * storages.peak_bytes
