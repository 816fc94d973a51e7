"""A Real NVP train step: fastflow native vs reference, and the same model in nflows/normflows.

Workload: 64 features, 8 affine couplings, conditioner MLPs of width 256, batch 1024 (float32 by
default), one fixed batch drawn from a correlated Gaussian. One timed step is the whole of a
training iteration::

    opt.zero_grad(); loss = -model.log_prob(x).mean(); loss.backward(); opt.step()

with ``torch.optim.Adam(lr=1e-4)``; every implementation has its own model (same seed) and
optimiser.

Implementations:

``native`` / ``reference``
    ``fastflow.models.RealNVP(64, n_couplings=8, hidden=256)``, the step run under
    ``fastflow.backend("native")`` or ``("reference")``.
``reference-compiled``
    the same model, ``-log_prob(x).mean()`` compiled with ``torch.compile`` under the reference
    backend (AOTAutograd compiles its backward); ``zero_grad`` and the Adam step stay eager.
``nflows``
    ``nflows.flows.Flow`` over a ``CompositeTransform`` of ``AffineCouplingTransform`` with the
    same masks (the same features transformed at each coupling) and a conditioner MLP of the
    same widths and depth as fastflow's, and a ``StandardNormal`` base.
``normflows``
    ``normflows.NormalizingFlow`` of ``AffineCouplingBlock`` (split mode ``channel``: the second
    half is transformed from the first) with ``normflows.nets.MLP`` conditioners of the same
    widths and depth, ``Permute(64, mode="swap")`` between blocks (exchanges the halves, so the
    transformed half alternates as in fastflow), and a fixed ``DiagGaussian`` base.

Differences that remain (each library keeps its own coupling):

* scale function: fastflow uses ``s = 2 tanh(h / 2)``, ``y = x exp(s) + t`` (soft-clamped Real
  NVP); nflows uses ``scale = sigmoid(h + 2) + 1e-3``, ``y = x scale + t``; normflows uses
  ``exp`` without a clamp, ``y = x exp(h) + t`` (its log-density runs the flows' ``inverse``,
  ``(y - t) exp(-h)``). All are one elementwise pass of similar cost.
* nflows gathers and scatters the two halves with index tensors (``inputs[:, idx]``) and
  normflows with ``chunk``/``cat`` and a swap permutation; fastflow's own split is described in
  ``fastflow/models.py``.
* normflows' conditioner output interleaves shift and scale (even/odd columns); nflows' and
  fastflow's split it in halves. Same matrix sizes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import fastflow
from bench.cases._common import check_native, seeded, train_step
from bench.harness import COMPILED, REFERENCE, Group, Skip

__all__ = ["FEATURES", "N_COUPLINGS", "HIDDEN", "BATCH", "groups"]

FEATURES = 64
N_COUPLINGS = 8
HIDDEN = 256
BATCH = 1024
#: Hidden layers of width HIDDEN in each conditioner: in -> H -> H -> out (fastflow's default).
HIDDEN_LAYERS = 2
LR = 1e-4


def _batch(features: int, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    gen = seeded(1, device)
    mix = torch.randn(features, features, generator=gen, device=device, dtype=dtype) / features**0.5
    z = torch.randn(batch, features, generator=gen, device=device, dtype=dtype)
    return z @ mix + 0.1 * torch.randn(batch, features, generator=gen, device=device, dtype=dtype)


def _mlp(n_in: int, n_out: int, hidden: int) -> nn.Sequential:
    """fastflow's default conditioner (Linear/ReLU x HIDDEN_LAYERS, zero-initialised last
    Linear, so the flow starts as the identity) for nflows' couplings."""
    from fastflow.nn import MLP

    return MLP(n_in, n_out, hidden=hidden, n_hidden_layers=HIDDEN_LAYERS)


def _fastflow_model(features: int, n_couplings: int, hidden: int) -> tuple[nn.Module, Callable]:
    try:
        from fastflow.models import RealNVP
    except ImportError as exc:
        raise Skip(f"fastflow.models.RealNVP is not available yet ({exc})") from None
    model = RealNVP(features, n_couplings=n_couplings, hidden=hidden, n_hidden_layers=HIDDEN_LAYERS)
    return model, model.log_prob


class _NflowsConditioner(nn.Module):
    """An MLP for nflows' coupling, which calls its network as ``net(inputs, context)``."""

    def __init__(self, n_in: int, n_out: int, hidden: int):
        super().__init__()
        self.net = _mlp(n_in, n_out, hidden)

    def forward(self, inputs: torch.Tensor, context: Any = None) -> torch.Tensor:
        return self.net(inputs)


def _nflows_model(features: int, n_couplings: int, hidden: int) -> tuple[nn.Module, Callable]:
    try:
        from nflows.distributions.normal import StandardNormal
        from nflows.flows.base import Flow
        from nflows.transforms.base import CompositeTransform
        from nflows.transforms.coupling import AffineCouplingTransform
    except ImportError as exc:
        raise Skip(f"nflows is not installed (pip install nflows): {exc}") from None
    layers = []
    for k in range(n_couplings):
        # mask > 0: transformed. Coupling k transforms the second half when k is even, the
        # first half when k is odd (conditioning on the other half).
        mask = torch.zeros(features)
        half = features // 2
        if k % 2 == 0:
            mask[half:] = 1
        else:
            mask[:half] = 1
        layers.append(
            AffineCouplingTransform(
                mask=mask,
                transform_net_create_fn=lambda n_in, n_out: _NflowsConditioner(n_in, n_out, hidden),
            )
        )
    model = Flow(CompositeTransform(layers), StandardNormal([features]))
    return model, model.log_prob


def _normflows_model(features: int, n_couplings: int, hidden: int) -> tuple[nn.Module, Callable]:
    try:
        import normflows as nf
    except ImportError as exc:
        raise Skip(f"normflows is not installed (pip install normflows): {exc}") from None
    half = features // 2
    flows = []
    for k in range(n_couplings):
        widths = [half] + [hidden] * HIDDEN_LAYERS + [2 * (features - half)]
        net = nf.nets.MLP(widths, init_zeros=True)  # Linear/ReLU x 2, zero last layer
        flows.append(nf.flows.AffineCouplingBlock(net, scale_map="exp"))
        if k < n_couplings - 1:
            flows.append(nf.flows.Permute(features, mode="swap"))
    base = nf.distributions.DiagGaussian(features, trainable=False)
    model = nf.NormalizingFlow(q0=base, flows=flows)
    return model, model.log_prob


_BUILDERS = {
    "native": _fastflow_model,
    REFERENCE: _fastflow_model,
    COMPILED: _fastflow_model,
    "nflows": _nflows_model,
    "normflows": _normflows_model,
}


def _factories(
    features: int, n_couplings: int, hidden: int, batch: int, device: torch.device, dtype: torch.dtype
) -> dict[str, Callable[[], Callable[[], Any]]]:
    cache: dict[str, torch.Tensor] = {}

    def data() -> torch.Tensor:
        if "x" not in cache:
            cache["x"] = _batch(features, batch, device, dtype)
        return cache["x"]

    def make(impl: str) -> Callable[[], Callable[[], Any]]:
        def factory() -> Callable[[], Any]:
            if impl == "native":
                check_native(device)
            torch.manual_seed(0)
            model, log_prob = _BUILDERS[impl](features, n_couplings, hidden)
            model = model.to(device=device, dtype=dtype).train()
            x = data()
            backend = impl if impl in ("native", REFERENCE) else "auto"
            if impl == COMPILED:

                def loss_of(x: torch.Tensor) -> torch.Tensor:
                    with fastflow.backend("reference"):
                        return -log_prob(x).mean()

                loss_fn = torch.compile(loss_of, dynamic=False)
            else:

                def loss_fn(x: torch.Tensor) -> torch.Tensor:
                    return -log_prob(x).mean()

            return train_step(impl, model, lambda: loss_fn(x), backend, LR)

        return factory

    return {impl: make(impl) for impl in _BUILDERS}


def groups(device: torch.device, dtype: torch.dtype, quick: bool = False) -> list[Group]:
    """The train-step group (``quick``: a tiny model and batch)."""
    if quick:
        features, n_couplings, hidden, batch = 4, 2, 8, 16
    else:
        features, n_couplings, hidden, batch = FEATURES, N_COUPLINGS, HIDDEN, BATCH
    name = f"realnvp/d{features}-k{n_couplings}-h{hidden}-b{batch}"
    return [
        Group(
            case=name,
            pass_="train-step",
            impls=_factories(features, n_couplings, hidden, batch, device, dtype),
            repeat=10,
            warmup=3,
            params={
                "features": features,
                "n_couplings": n_couplings,
                "hidden": hidden,
                "hidden_layers": HIDDEN_LAYERS,
                "batch": batch,
                "optimizer": f"Adam(lr={LR})",
            },
        )
    ]
