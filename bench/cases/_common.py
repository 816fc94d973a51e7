"""Helpers shared by the case modules: native availability and compiled references."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import fastflow
from bench.harness import Skip

__all__ = ["check_native", "compile_reference", "seeded", "train_step"]


def check_native(device: torch.device) -> None:
    """Raises :class:`Skip` when no native kernel is built for ``device``."""
    if device.type not in fastflow.native_available():
        why = fastflow.native_load_error() or f"no native kernel is built for {device.type}"
        raise Skip(f"native unavailable: {why}")


def compile_reference(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile`` of ``fn`` run under ``fastflow.backend("reference")``.

    The backend is switched inside the compiled function, so the graph holds the reference's
    PyTorch operations whatever backend is in force at the call. One graph, no breaks
    (``fullgraph=True``): a break would time Python glue rather than the compiled reference.

    Every case compiles the same wrapper code, and dynamo counts recompilations per code
    object, so its caches are reset first (the previous group's compiled function is not used
    again; inductor's on-disk cache still spares the code generation of a graph seen before).
    """
    torch._dynamo.reset()

    def under_reference(*args: Any) -> Any:
        with fastflow.backend("reference"):
            return fn(*args)

    return torch.compile(under_reference, dynamic=False, fullgraph=True)


def seeded(seed: int, device: torch.device) -> torch.Generator:
    """A generator on ``device`` (CPU generator for the CPU), so inputs repeat run to run."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def train_step(
    impl: str, model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], backend: str, lr: float
) -> Callable[[], torch.Tensor]:
    """One Adam step of ``loss_fn`` (zero_grad, backward, step) under ``backend``.

    Runs the step once before returning it, so a failure (or a non-finite first loss) is
    reported for ``impl`` rather than raised inside the timing loop.
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def step() -> torch.Tensor:
        with fastflow.backend(backend):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn()
            loss.backward()
            opt.step()
        return loss

    loss = step()
    if not torch.isfinite(loss):
        raise RuntimeError(f"{impl}: the first train step gave a non-finite loss {loss.item()}")
    return step
