"""Glow's invertible 1x1 convolution over a PLU decomposition, ``fastflow.ops.invconv_plu``.

Shapes: ``[64, 12, 16, 16]`` (an early Glow level: many pixels, few channels) and
``[64, 48, 16, 16]`` (more channels). The factors come from ``InvertibleConv1x1``'s random
rotation. Passes, as for the coupling operator: ``fwd`` (no grad), ``fwd+bwd`` (gradient of
``(y * gy).sum() + (logdet * gl).sum()`` w.r.t. x and the three trained factors, through
``torch.autograd.grad``) and ``inverse`` (no grad). Implementations: ``native``, ``reference``
(pure PyTorch, eager) and ``reference-compiled``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import fastflow
from bench.cases._common import check_native, compile_reference, seeded
from bench.harness import COMPILED, REFERENCE, Group
from fastflow.nn import InvertibleConv1x1
from fastflow.ops import invconv_plu, invconv_plu_inverse

__all__ = ["SHAPES", "PASSES", "groups"]

SHAPES = ((64, 12, 16, 16), (64, 48, 16, 16))
PASSES = ("fwd", "fwd+bwd", "inverse")


def _factories(shape, pass_, device, dtype) -> dict[str, Callable[[], Callable[[], Any]]]:
    cache: dict[str, Any] = {}

    def data():
        if "d" not in cache:
            torch.manual_seed(0)
            layer = InvertibleConv1x1(shape[1]).to(device=device, dtype=dtype)
            gen = seeded(0, device)
            x = torch.randn(shape, generator=gen, device=device, dtype=dtype)
            gy = torch.randn(shape, generator=gen, device=device, dtype=dtype)
            gl = torch.randn(shape[0], generator=gen, device=device, dtype=dtype)
            factors = [t.detach() for t in (layer.perm, layer.lower, layer.upper, layer.sign, layer.log_s)]
            cache["d"] = (x, gy, gl, factors)
        return cache["d"]

    op = invconv_plu_inverse if pass_ == "inverse" else invconv_plu

    def call(x, perm, lower, upper, sign, log_s):
        return op(x, perm, lower, upper, sign, log_s)

    def make(impl: str) -> Callable[[], Callable[[], Any]]:
        def factory() -> Callable[[], Any]:
            if impl == "native":
                check_native(device)
            x, gy, gl, (perm, lower, upper, sign, log_s) = data()
            if impl == COMPILED:
                run, backend = compile_reference(call), "auto"
            else:
                run, backend = call, impl
            if pass_ in ("fwd", "inverse"):

                def step() -> Any:
                    with torch.no_grad(), fastflow.backend(backend):
                        return run(x, perm, lower, upper, sign, log_s)

            else:
                xg, lg, ug, sg = (t.clone().requires_grad_() for t in (x, lower, upper, log_s))

                def step() -> Any:
                    with fastflow.backend(backend):
                        y, logdet = run(xg, perm, lg, ug, sign, sg)
                    return torch.autograd.grad((y, logdet), (xg, lg, ug, sg), (gy, gl))

            step()
            return step

        return factory

    return {impl: make(impl) for impl in ("native", REFERENCE, COMPILED)}


def groups(device: torch.device, dtype: torch.dtype, quick: bool = False) -> list[Group]:
    """Every (shape, pass) of this family; ``quick``: one tiny shape."""
    shapes = ((2, 4, 4, 4),) if quick else SHAPES
    return [
        Group(
            case=f"invconv_plu/{'x'.join(map(str, shape))}",
            pass_=pass_,
            impls=_factories(shape, pass_, device, dtype),
            repeat=30,
            warmup=3,
            params={"shape": list(shape)},
        )
        for shape in shapes
        for pass_ in PASSES
    ]
