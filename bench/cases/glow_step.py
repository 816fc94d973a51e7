"""One Glow step (ActNorm, 1x1 convolution over PLU, sigmoid affine coupling) as a train step.

Shapes ``[16, 12, 16, 16]`` and ``[64, 12, 16, 16]``, conditioner width 128 (conv3x3 -> ReLU ->
conv1x1 -> ReLU -> zero-initialised conv3x3, the same in both libraries). A step is: zero the
gradients, ``loss = -(log N(z; 0, I) + logdet).mean()``, backward, Adam. Implementations:
``native``, ``reference``, ``reference-compiled`` (fastflow's ``GlowStep``) and ``normflows``
(its ``GlowBlock(12, 128, scale_map="sigmoid", split_mode="channel")``, which applies the same
three layers in the reverse order: coupling, 1x1 conv, ActNorm). Both ActNorms initialise from
the first batch, before timing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

import fastflow
from bench.cases._common import check_native, seeded, train_step
from bench.harness import COMPILED, REFERENCE, Group, Skip

__all__ = ["SHAPES", "HIDDEN", "groups"]

SHAPES = ((16, 12, 16, 16), (64, 12, 16, 16))
HIDDEN = 128
LR = 1e-4


def _fastflow(shape: tuple[int, ...], hidden: int) -> torch.nn.Module:
    from fastflow.nn import GlowStep

    return GlowStep(shape[1:], hidden=hidden)


def _normflows(shape: tuple[int, ...], hidden: int) -> torch.nn.Module:
    try:
        import normflows as nf
    except ImportError as exc:
        raise Skip(f"normflows is not installed (pip install normflows): {exc}") from None
    return nf.flows.GlowBlock(shape[1], hidden, scale_map="sigmoid", split_mode="channel")


_BUILDERS = {"native": _fastflow, REFERENCE: _fastflow, COMPILED: _fastflow, "normflows": _normflows}


def _factories(shape, hidden, device, dtype) -> dict[str, Callable[[], Callable[[], Any]]]:
    cache: dict[str, torch.Tensor] = {}

    def data() -> torch.Tensor:
        if "x" not in cache:
            cache["x"] = torch.randn(shape, generator=seeded(2, device), device=device, dtype=dtype)
        return cache["x"]

    dims = math.prod(shape[1:])

    def make(impl: str) -> Callable[[], Callable[[], Any]]:
        def factory() -> Callable[[], Any]:
            if impl == "native":
                check_native(device)
            torch.manual_seed(0)
            model = _BUILDERS[impl](shape, hidden).to(device=device, dtype=dtype).train()
            x = data()

            def loss_of(x: torch.Tensor) -> torch.Tensor:
                z, logdet = model(x)
                log_pz = -0.5 * z.pow(2).reshape(len(z), -1).sum(1) - 0.5 * dims * math.log(2 * math.pi)
                return -(log_pz + logdet).mean()

            with torch.no_grad(), fastflow.backend("reference"):
                model(x)  # ActNorm's data-dependent initialisation, outside the timing
            if impl == COMPILED:
                compiled = torch.compile(loss_of, dynamic=False)
                backend = "reference"
                loss_fn = compiled
            else:
                backend = impl if impl in ("native", REFERENCE) else "auto"
                loss_fn = loss_of
            return train_step(impl, model, lambda: loss_fn(x), backend, LR)

        return factory

    return {impl: make(impl) for impl in _BUILDERS}


def groups(device: torch.device, dtype: torch.dtype, quick: bool = False) -> list[Group]:
    """The Glow-step train steps (``quick``: a tiny image and width)."""
    shapes, hidden = (((2, 4, 4, 4),), 8) if quick else (SHAPES, HIDDEN)
    return [
        Group(
            case=f"glow_step/{'x'.join(map(str, shape))}-h{hidden}",
            pass_="train-step",
            impls=_factories(shape, hidden, device, dtype),
            repeat=10,
            warmup=2,
            params={"shape": list(shape), "hidden": hidden, "optimizer": f"Adam(lr={LR})"},
        )
        for shape in shapes
    ]
