"""The fused affine-coupling operator, ``fastflow.ops.affine_coupling`` and its inverse.

Shapes: ``[4096, 64]`` (a tabular batch) and ``[64, 6, 32, 32]`` (an image batch, contiguous),
each for the activations ``exp`` (soft clamp 2.0), ``sigmoid`` (Glow) and ``additive`` (NICE).
Passes:

``fwd``
    ``y, logdet = affine_coupling(x, h, t)`` under ``torch.no_grad()`` (inference: the native op
    then saves nothing for a backward).
``fwd+bwd``
    the same with ``x``, ``h`` and ``t`` requiring grad, followed by the gradient of
    ``(y * gy).sum() + (logdet * gl).sum()`` with respect to ``x``, ``h`` and ``t`` for a fixed
    random ``gy``, ``gl`` (so no gradient is trivially all-ones). It is computed as
    ``torch.autograd.grad((y, logdet), (x, h, t), (gy, gl))``, which is that gradient without
    timing the extra multiply-and-sum. For ``additive`` ``h`` is None and the gradients are
    those of ``x`` and ``t``.
``inverse``
    ``x, logdet_inv = affine_coupling_inverse(y, h, t)`` under ``torch.no_grad()``.

Implementations: ``native`` (``fastflow.backend("native")``), ``reference`` (the pure-PyTorch
reference, eager) and ``reference-compiled`` (``torch.compile`` of a function that runs the op
under ``fastflow.backend("reference")``, compiled and warmed up before timing; for ``fwd+bwd``
the forward is compiled and AOTAutograd compiles its backward).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import fastflow
from bench.cases._common import check_native, compile_reference, seeded
from bench.harness import COMPILED, REFERENCE, Group
from fastflow.ops import affine_coupling, affine_coupling_inverse, affine_coupling_reference

__all__ = ["SHAPES", "ACTIVATIONS", "PASSES", "groups"]

SHAPES = ((4096, 64), (64, 6, 32, 32))
ACTIVATIONS = ("exp", "sigmoid", "additive")
PASSES = ("fwd", "fwd+bwd", "inverse")
CLAMP = 2.0


def _inputs(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = seeded(0, device)

    def draw(*size: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(size, generator=gen, device=device, dtype=dtype) * scale

    x = draw(*shape)
    h = draw(*shape, scale=0.5)
    t = draw(*shape, scale=0.5)
    gy = draw(*shape)
    # The log-det is float32 for half/bf16 inputs, so is its upstream gradient.
    ld_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    gl = torch.randn(shape[0], generator=gen, device=device, dtype=ld_dtype)
    return {"x": x, "h": h, "t": t, "gy": gy, "gl": gl}


def _factories(
    shape: tuple[int, ...], activation: str, pass_: str, device: torch.device, dtype: torch.dtype
) -> dict[str, Callable[[], Callable[[], Any]]]:
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def data() -> dict[str, torch.Tensor]:
        if "d" not in cache:  # drawn once, shared by every implementation of the group
            cache["d"] = _inputs(shape, device, dtype)
        return cache["d"]

    additive = activation == "additive"
    op = affine_coupling_inverse if pass_ == "inverse" else affine_coupling

    def call(x: torch.Tensor, h: torch.Tensor | None, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return op(x, h, t, activation=activation, clamp=CLAMP)

    def make(impl: str) -> Callable[[], Callable[[], Any]]:
        def factory() -> Callable[[], Any]:
            if impl == "native":
                check_native(device)
            d = data()
            if impl == COMPILED:
                run = compile_reference(call)
                backend = "auto"  # the compiled function switches to the reference itself
            else:
                run, backend = call, impl
            h = None if additive else d["h"]
            if pass_ in ("fwd", "inverse"):
                x, t = d["x"], d["t"]
                if pass_ == "inverse":  # invert a real forward output
                    x = affine_coupling_reference(x, h, t, activation, CLAMP)[0]

                def step() -> Any:
                    with torch.no_grad(), fastflow.backend(backend):
                        return run(x, h, t)

            else:
                x = d["x"].detach().clone().requires_grad_()
                t = d["t"].detach().clone().requires_grad_()
                h = None if additive else d["h"].detach().clone().requires_grad_()
                wrt = (x, t) if additive else (x, h, t)
                gy, gl = d["gy"], d["gl"]

                def step() -> Any:
                    with fastflow.backend(backend):
                        y, logdet = run(x, h, t)
                    if logdet.requires_grad:
                        return torch.autograd.grad((y, logdet), wrt, (gy, gl))
                    # the reference's additive log-det is a constant zero outside the graph
                    return torch.autograd.grad(y, wrt, gy)

            step()  # fails here (and is reported) rather than inside the timing loop
            return step

        return factory

    return {impl: make(impl) for impl in ("native", REFERENCE, COMPILED)}


def groups(device: torch.device, dtype: torch.dtype, quick: bool = False) -> list[Group]:
    """Every (shape, activation, pass) of this family; ``quick``: one tiny shape."""
    out = []
    shapes = ((8, 16),) if quick else SHAPES
    for shape in shapes:
        for activation in ACTIVATIONS:
            name = f"affine_coupling/{activation}/{'x'.join(map(str, shape))}"
            for pass_ in PASSES:
                out.append(
                    Group(
                        case=name,
                        pass_=pass_,
                        impls=_factories(shape, activation, pass_, device, dtype),
                        repeat=30,
                        warmup=3,
                        params={"shape": list(shape), "activation": activation, "clamp": CLAMP},
                    )
                )
    return out
