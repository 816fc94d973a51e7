"""A masked autoregressive flow: train step and sampling, fastflow vs zuko and nflows.

Workload: 64 features, 5 autoregressive layers, MADEs with two hidden layers of width 128, batch
1024, one fixed batch from a correlated Gaussian (float32 by default). Two passes:

``train-step``
    ``opt.zero_grad(); loss = -model.log_prob(x).mean(); loss.backward(); opt.step()`` with
    Adam(lr=1e-4): the density direction, one MADE pass per layer.
``sample``
    ``model.sample(1024)`` under ``torch.no_grad()``: the generating direction, 64 sequential
    MADE passes per layer (320 in all).

Implementations: ``native`` / ``reference`` (``fastflow.models.MAF(64, n_transforms=5,
hidden=128)``, reverse permutations between layers, under either backend),
``reference-compiled`` (train step only: the loss compiled under the reference backend), ``zuko``
(``zuko.flows.MAF(64, transforms=5, hidden_features=(128, 128))``, which reverses the order
between layers too) and ``nflows`` (``MaskedAffineAutoregressiveTransform(64, 128,
num_blocks=1, use_residual_blocks=False)`` layers, i.e. 64 -> 128 -> 128 -> 128, with
``ReversePermutation`` between them and a standard-normal base).

Differences that remain: the scale function (fastflow ``exp(2 tanh(h / 2))``, zuko
``exp(h)`` with a soft clip of ``h``, nflows ``sigmoid(h + 2) + 1e-3``); nflows' and zuko's
MADEs use ReLU like fastflow's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import fastflow
from bench.cases._common import check_native, seeded, train_step
from bench.harness import COMPILED, REFERENCE, Group, Skip

__all__ = ["FEATURES", "N_TRANSFORMS", "HIDDEN", "BATCH", "groups"]

FEATURES = 64
N_TRANSFORMS = 5
HIDDEN = 128
BATCH = 1024
LR = 1e-4


class _Model:
    """A model with ``log_prob(x)`` and ``sample(n)`` whatever its library."""

    def __init__(self, module: nn.Module, log_prob: Callable, sample: Callable):
        self.module, self.log_prob, self.sample = module, log_prob, sample


def _fastflow(features: int, n: int, hidden: int) -> _Model:
    from fastflow.models import MAF

    model = MAF(features, n_transforms=n, hidden=hidden)
    return _Model(model, model.log_prob, model.sample)


def _zuko(features: int, n: int, hidden: int) -> _Model:
    try:
        import zuko
    except ImportError as exc:
        raise Skip(f"zuko is not installed (pip install zuko): {exc}") from None
    flow = zuko.flows.MAF(features, transforms=n, hidden_features=(hidden, hidden))
    return _Model(flow, lambda x: flow().log_prob(x), lambda m: flow().sample((m,)))


def _nflows(features: int, n: int, hidden: int) -> _Model:
    try:
        from nflows.distributions.normal import StandardNormal
        from nflows.flows.base import Flow
        from nflows.transforms.autoregressive import MaskedAffineAutoregressiveTransform
        from nflows.transforms.base import CompositeTransform
        from nflows.transforms.permutations import ReversePermutation
    except ImportError as exc:
        raise Skip(f"nflows is not installed (pip install nflows): {exc}") from None
    layers: list[nn.Module] = []
    for k in range(n):
        if k > 0:
            layers.append(ReversePermutation(features))
        layers.append(
            MaskedAffineAutoregressiveTransform(
                features, hidden, num_blocks=1, use_residual_blocks=False
            )
        )
    flow = Flow(CompositeTransform(layers), StandardNormal([features]))
    return _Model(flow, flow.log_prob, flow.sample)


_BUILDERS = {"native": _fastflow, REFERENCE: _fastflow, COMPILED: _fastflow, "zuko": _zuko, "nflows": _nflows}


def _data(features: int, batch: int, device, dtype) -> torch.Tensor:
    gen = seeded(3, device)
    mix = torch.randn(features, features, generator=gen, device=device, dtype=dtype) / features**0.5
    return torch.randn(batch, features, generator=gen, device=device, dtype=dtype) @ mix


def groups(device: torch.device, dtype: torch.dtype, quick: bool = False) -> list[Group]:
    """The train-step and sampling groups (``quick``: a tiny model and batch)."""
    if quick:
        features, n, hidden, batch = 4, 2, 8, 16
    else:
        features, n, hidden, batch = FEATURES, N_TRANSFORMS, HIDDEN, BATCH
    cache: dict[str, torch.Tensor] = {}

    def data() -> torch.Tensor:
        if "x" not in cache:
            cache["x"] = _data(features, batch, device, dtype)
        return cache["x"]

    def build(impl: str) -> _Model:
        if impl == "native":
            check_native(device)
        torch.manual_seed(0)
        model = _BUILDERS[impl](features, n, hidden)
        model.module.to(device=device, dtype=dtype)
        return model

    def train(impl: str) -> Callable[[], Callable[[], Any]]:
        def factory() -> Callable[[], Any]:
            model = build(impl)
            x = data()
            if impl == COMPILED:

                def loss_of(x: torch.Tensor) -> torch.Tensor:
                    with fastflow.backend("reference"):
                        return -model.log_prob(x).mean()

                compiled = torch.compile(loss_of, dynamic=False)
                loss = lambda: compiled(x)  # noqa: E731
            else:
                loss = lambda: -model.log_prob(x).mean()  # noqa: E731
            backend = impl if impl in ("native", REFERENCE) else "auto"
            return train_step(impl, model.module.train(), loss, backend, LR)

        return factory

    def sample(impl: str) -> Callable[[], Callable[[], Any]]:
        def factory() -> Callable[[], Any]:
            model = build(impl)
            model.module.eval()
            backend = impl if impl in ("native", REFERENCE) else "auto"

            def call() -> Any:
                with torch.no_grad(), fastflow.backend(backend):
                    return model.sample(batch)

            return call

        return factory

    name = f"maf/d{features}-k{n}-h{hidden}-b{batch}"
    params = {"features": features, "transforms": n, "hidden": hidden, "batch": batch}
    return [
        Group(name, "train-step", {impl: train(impl) for impl in _BUILDERS}, repeat=10, warmup=2,
              params=params),
        Group(name, "sample", {impl: sample(impl) for impl in _BUILDERS if impl != COMPILED},
              repeat=5, warmup=1, params=params),
    ]
