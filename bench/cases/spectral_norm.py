"""Spectral normalisation, ``fastflow.ops.spectral_norm_power`` + ``spectral_norm_apply``, against
``torch.nn.utils.parametrizations.spectral_norm``.

Weights ``[128, 128]`` (the hidden layers of a Residual Flow's vector blocks) and ``[512, 512]``.
The work timed is what a training forward of a spectrally normalised layer does to its weight:
5 rounds of power iteration from the stored ``u``, ``v``, then ``sigma = u^T W v`` and
``W_hat = W / max(1, sigma / 0.9)``. Passes:

``fwd``
    the normalised weight, no gradient.
``fwd+bwd``
    the same, then the gradient of ``(W_hat * G).sum()`` w.r.t. ``W`` (``torch.autograd.grad``).
``train-step``
    one Adam step (lr 1e-3) of a single layer on a fixed batch of 256 rows,
    ``loss = layer(x).square().mean()``: ``fastflow.nn.SpectralNormLinear`` (training mode, so
    the forward runs the 5 rounds and updates ``u``, ``v``) against ``nn.Linear`` with torch's
    parametrization. The batch GEMMs are the same in both; the difference is the weight's path.

Implementations: ``native``, ``reference`` (pure PyTorch, eager), ``reference-compiled``
(``torch.compile`` of the reference; in the train step the loss only), and
``torch-parametrize``: ``torch.nn.utils.parametrizations.spectral_norm(nn.Linear(n, n),
n_power_iterations=5)`` in training mode, whose ``.weight`` runs the same 5 rounds (two GEMVs
and two normalisations each, in Python) and divides by ``sigma`` (it normalises to 1 rather
than soft-clamping to ``c``: the same work). Every implementation starts from the same
weight.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import fastflow
from bench.cases._common import check_native, compile_reference, seeded, train_step
from bench.harness import COMPILED, REFERENCE, Group
from fastflow.nn import SpectralNormLinear
from fastflow.ops import spectral_norm_apply, spectral_norm_power

__all__ = ["SHAPES", "PASSES", "N_POWER_ITER", "COEFF", "BATCH", "groups"]

SHAPES = ((128, 128), (512, 512))
PASSES = ("fwd", "fwd+bwd")
N_POWER_ITER = 5
COEFF = 0.9
BATCH = 256
LR = 1e-3
TORCH = "torch-parametrize"


def _torch_linear(shape, device, dtype, weight: torch.Tensor) -> nn.Module:
    from torch.nn.utils.parametrizations import spectral_norm

    lin = nn.Linear(shape[1], shape[0], device=device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return spectral_norm(lin, n_power_iterations=N_POWER_ITER).train()


def _normalised(weight, u, v):
    u, v = spectral_norm_power(weight, u, v, N_POWER_ITER)
    return spectral_norm_apply(weight, u, v, COEFF)[0]


def _op_factories(shape, pass_, device, dtype) -> dict[str, Callable[[], Callable[[], Any]]]:
    cache: dict[str, Any] = {}

    def data():
        if "d" not in cache:
            gen = seeded(0, device)
            w = torch.randn(shape, generator=gen, device=device, dtype=dtype) / shape[1] ** 0.5
            u, v = (
                F.normalize(torch.randn(n, generator=gen, device=device, dtype=dtype), dim=0)
                for n in shape
            )
            g = torch.randn(shape, generator=gen, device=device, dtype=dtype)
            cache["d"] = (w, u, v, g)
        return cache["d"]

    def make(impl: str) -> Callable[[], Callable[[], Any]]:
        def factory() -> Callable[[], Any]:
            if impl == "native":
                check_native(device)
            w, u, v, g = data()
            if impl == TORCH:
                lin = _torch_linear(shape, device, dtype, w)
                original = lin.parametrizations.weight.original
                if pass_ == "fwd":

                    def step() -> Any:
                        with torch.no_grad():
                            return lin.weight

                else:

                    def step() -> Any:
                        return torch.autograd.grad(lin.weight, original, g)

                step()
                return step
            if impl == COMPILED:
                run, backend = compile_reference(_normalised), "auto"
            else:
                run, backend = _normalised, impl
            if pass_ == "fwd":

                def step() -> Any:
                    with torch.no_grad(), fastflow.backend(backend):
                        return run(w, u, v)

            else:
                wg = w.clone().requires_grad_()

                def step() -> Any:
                    with fastflow.backend(backend):
                        w_hat = run(wg, u, v)
                    return torch.autograd.grad(w_hat, wg, g)

            step()
            return step

        return factory

    return {impl: make(impl) for impl in ("native", REFERENCE, COMPILED, TORCH)}


def _train_factories(shape, batch, device, dtype) -> dict[str, Callable[[], Callable[[], Any]]]:
    def make(impl: str) -> Callable[[], Callable[[], Any]]:
        def factory() -> Callable[[], Any]:
            if impl == "native":
                check_native(device)
            torch.manual_seed(0)
            layer = SpectralNormLinear(shape[1], shape[0], coeff=COEFF, n_power_iter=N_POWER_ITER)
            layer = layer.to(device=device, dtype=dtype).train()
            x = torch.randn(batch, shape[1], generator=seeded(1, device), device=device, dtype=dtype)
            if impl == TORCH:
                model: nn.Module = _torch_linear(shape, device, dtype, layer.weight.detach())
                backend = "auto"
            else:
                model, backend = layer, impl if impl in ("native", REFERENCE) else "auto"

            def loss_of(x: torch.Tensor) -> torch.Tensor:
                return model(x).square().mean()

            if impl == COMPILED:
                loss_fn = compile_reference(loss_of)
            else:
                loss_fn = loss_of
            return train_step(impl, model, lambda: loss_fn(x), backend, LR)

        return factory

    return {impl: make(impl) for impl in ("native", REFERENCE, COMPILED, TORCH)}


def groups(device: torch.device, dtype: torch.dtype, quick: bool = False) -> list[Group]:
    """Every (shape, pass) of this family; ``quick``: one tiny shape and batch."""
    shapes = ((8, 8),) if quick else SHAPES
    batch = 4 if quick else BATCH
    out = []
    for shape in shapes:
        name = "x".join(map(str, shape))
        for pass_ in PASSES:
            out.append(
                Group(
                    case=f"spectral_norm/{name}",
                    pass_=pass_,
                    impls=_op_factories(shape, pass_, device, dtype),
                    repeat=30,
                    warmup=3,
                    params={"shape": list(shape), "n_power_iter": N_POWER_ITER, "coeff": COEFF},
                )
            )
        out.append(
            Group(
                case=f"spectral_norm/linear-{name}-b{batch}",
                pass_="train-step",
                impls=_train_factories(shape, batch, device, dtype),
                repeat=10,
                warmup=3,
                params={
                    "shape": list(shape),
                    "batch": batch,
                    "n_power_iter": N_POWER_ITER,
                    "coeff": COEFF,
                    "optimizer": f"Adam(lr={LR})",
                },
            )
        )
    return out
