"""A contractive residual block (i-ResNet / Residual Flows): train step and fixed-point inverse,
fastflow beside normflows.

The block is ``y = x + g(x)`` with ``g = LipSwish -> SNLinear(d, 128) -> (LipSwish -> SNLinear(128,
128)) x 2 -> LipSwish -> SNLinear(128, d)``, every spectral norm bounded by ``c = 0.97`` (normflows'
default), 5 power iterations per training forward. fastflow: ``iResBlock(residual_mlp(d, 128, 3,
coeff=0.97))``; normflows: ``Residual(LipschitzMLP([d, 128, 128, 128, d], lipschitz_const=0.97))``,
whose ``inverse`` is the density direction (``x + g(x)`` with the log-det estimate).

``train-step`` (``d`` in 2, 64; batch 256, 1024; estimator ``roulette`` (geometric p = 0.5, 2
exact terms) or ``series`` (5 terms), both with the Neumann gradient and the memory-efficient
backward in both libraries (fastflow ``series_grad="neumann"``, normflows ``reduce_memory``)): ``zero_grad``, ``loss = -(log N(y) + logdet).mean()``, backward, Adam(1e-4).

``fixed-point``: the solve alone, without the log-det at the solution that ``inverse``
includes (fastflow's ``mlp_fixed_point``, normflows' ``_inverse_fixed_point``), iterations
recorded the same way.

``inverse``: the fixed-point inverse of ``y = block(x)`` with tol 1e-5 (normflows: atol = rtol =
1e-5 on the squared step, i.e. a step below about 3e-3, whole batch; fastflow: per-sample max
step relative to ``1 + |y|``, so fastflow iterates to a tighter answer) and at most 1000
iterations, in eval mode, on a block whose normalised layers all sit at their bound (every
weight ``c * eye``) (at initialisation ``g`` is nearly zero and one iteration
converges, which measures nothing). The iterations each library took (calls of ``g``) are
recorded in the group's params as ``iterations_<impl>``.

``residual-image`` train steps: :class:`~fastflow.models.ResidualFlowImage` on ``3 x 16 x 16``
(2 levels of 2 blocks on ``residual_cnn`` branches, 32 hidden channels, ActNorm), batch 16,
roulette (Neumann gradient), series (5 terms, backpropagated gradient) and the roulette with
its gradient backpropagated through the terms (``neumann_grad=False``), eager. ``native``:
fastflow's eager path for these branches: the branch's products as (transposed) convolutions in
PyTorch operations (no native kernel) for the series and the backpropagated roulette, and the
autograd estimator for the Neumann gradient (the products measured the same speed there with
more peak memory, so eager keeps autograd's; a compiled graph takes the products);
``reference``: the same model with every branch hidden behind a wrapper, so the log-det always
runs on the autograd estimators (``torch.autograd.grad`` with ``create_graph``), the oracle of
the tests.

Peak memory of the train steps: on CUDA every sample's, on the CPU one untimed step under
:func:`fastflow.memory.track_peak_allocations` (the allocator's bytes above what existed before
the step, the native operators' internal temporaries included: activations kept for backward,
gradients, optimiser temporaries).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import fastflow
from bench.cases._common import check_native, seeded, train_step
from bench.harness import REFERENCE, Group, Skip

__all__ = ["COEFF", "HIDDEN", "groups"]

COEFF = 0.97
HIDDEN = 128
N_HIDDEN = 3
LR = 1e-4
TOL = 1e-5
MAX_ITER = 1000


def _fastflow(d: int, estimator: str) -> tuple[nn.Module, nn.Module, Callable, Callable]:
    from fastflow.nn.residual import iResBlock, residual_mlp

    g = residual_mlp(d, HIDDEN, N_HIDDEN, coeff=COEFF)
    # both libraries with the Neumann gradient taken in the forward (normflows' reduce_memory)
    kwargs = dict(memory_efficient=True)
    if estimator == "series":
        kwargs.update(n_terms=5, series_grad="neumann")
    block = iResBlock(g, estimator=estimator, tol=TOL, max_iter=MAX_ITER, **kwargs)
    return block, g, lambda x: block(x), lambda y: block.inverse(y)[0]


def _normflows(d: int, estimator: str) -> tuple[nn.Module, nn.Module, Callable, Callable]:
    try:
        import normflows as nf
    except ImportError as exc:
        raise Skip(f"normflows is not installed (pip install normflows): {exc}") from None
    g = nf.nets.LipschitzMLP([d] + [HIDDEN] * N_HIDDEN + [d], lipschitz_const=COEFF, init_zeros=True)
    n_series = 5 if estimator == "series" else None
    block = nf.flows.Residual(g, reduce_memory=True, n_power_series=n_series)

    def density(x: torch.Tensor):
        # normflows' layers never update their power iteration in forward; its training loops
        # call update_lipschitz after each optimiser step. Doing it here, before the forward,
        # gives the same 5 iterations per step as fastflow's training forward.
        if block.training:
            nf.utils.update_lipschitz(g, 5)
        return block.inverse(x)  # normflows' Residual: inverse = density direction (x + g(x))

    return block, g, density, lambda y: block.forward(y)[0]  # forward = fixed-point solve


_BUILDERS = {"native": _fastflow, REFERENCE: _fastflow, "normflows": _normflows}


IMAGE_SHAPE = (3, 16, 16)


class _Opaque(nn.Module):
    """Hides a branch's structure: the block's log-det then runs on the autograd estimators."""

    def __init__(self, g: nn.Module):
        super().__init__()
        self.g = g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.g(x)


def _nll(z: torch.Tensor, logdet: torch.Tensor) -> torch.Tensor:
    d = z.shape[1]
    log_pz = -0.5 * z.pow(2).sum(1) - 0.5 * d * math.log(2 * math.pi)
    return -(log_pz + logdet.reshape(-1)).mean()


def _saturate(g: nn.Module, x: torch.Tensor) -> None:
    """Give every linear layer of ``g`` the raw weight ``10 * eye(out, in)`` and converge the
    power iterations, so that each normalised layer is ``c * eye``: ``g`` then acts on the first
    ``d`` coordinates only, as ``c * LipSwish`` composed four times, whose slope approaches
    ``c**4`` (0.89) where LipSwish's slope is near 1."""
    with torch.no_grad():
        for name, p in g.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                p.copy_(10.0 * torch.eye(*p.shape, dtype=p.dtype))
        g.train()
        for _ in range(40):
            g(x)
        try:  # normflows updates its power iteration outside forward
            import normflows as nf

            nf.utils.update_lipschitz(g, 200)
        except ImportError:
            pass


def groups(device: torch.device, dtype: torch.dtype, quick: bool = False) -> list[Group]:
    """Train-step groups for d in (2, 64), batch in (256, 1024), roulette and series, and the
    inverse at d in (2, 64), batch 1024 (``quick``: d 2, batch 16, one estimator)."""
    if quick:
        configs, inverse_configs = [(2, 16, "roulette")], [(2, 16)]
    else:
        configs = [(d, b, e) for e in ("roulette", "series") for d in (2, 64) for b in (256, 1024)]
        inverse_configs = [(2, 1024), (64, 1024)]

    def data(d: int, b: int) -> torch.Tensor:
        return torch.randn(b, d, generator=seeded(4, device), device=device, dtype=dtype)

    def build(impl: str, d: int, estimator: str):
        if impl == "native":
            check_native(device)
        torch.manual_seed(0)
        block, g, fwd, inv = _BUILDERS[impl](d, estimator)
        block.to(device=device, dtype=dtype)
        return block, g, fwd, inv

    def train(impl: str, d: int, b: int, estimator: str) -> Callable[[], Callable[[], Any]]:
        def factory() -> Callable[[], Any]:
            block, _, fwd, _ = build(impl, d, estimator)
            x = data(d, b)
            backend = impl if impl in ("native", REFERENCE) else "auto"
            return train_step(impl, block.train(), lambda: _nll(*fwd(x)), backend, LR)

        return factory

    def saturated(impl: str, d: int, b: int):
        """A block in eval mode with every normalised layer at its bound, an input ``x`` and
        ``y = block(x)``."""
        block, g, fwd, inv = build(impl, d, "roulette")
        x = 3.0 * data(d, b)
        backend = impl if impl in ("native", REFERENCE) else "auto"
        with fastflow.backend(backend):
            _saturate(g, x)
            block.eval()
            with torch.no_grad():
                y = fwd(x)[0]
        return block, g, inv, x, y, backend

    def inverse(impl: str, d: int, b: int, params: dict) -> Callable[[], Callable[[], Any]]:
        def factory() -> Callable[[], Any]:
            block, g, inv, x, y, backend = saturated(impl, d, b)
            with fastflow.backend(backend):
                calls = [0]
                hook = g.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
                with torch.no_grad():
                    x_rec = inv(y)
                hook.remove()
            iters = getattr(block, "last_iterations", None)
            params[f"iterations_{impl}"] = int(iters.max()) if iters is not None else calls[0]
            params[f"max_error_{impl}"] = float((x_rec - x).abs().max())

            def call() -> Any:
                with torch.no_grad(), fastflow.backend(backend):
                    return inv(y)

            return call

        return factory

    def solve(impl: str, d: int, b: int, params: dict) -> Callable[[], Callable[[], Any]]:
        """The fixed-point solve alone (no log-det at the solution): fastflow's
        ``mlp_fixed_point`` (native kernel or the reference loop), normflows'
        ``_inverse_fixed_point``."""

        def factory() -> Callable[[], Any]:
            block, g, _, _, y, backend = saturated(impl, d, b)
            if impl == "normflows":
                calls = [0]
                hook = g.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
                with torch.no_grad():
                    block.iresblock._inverse_fixed_point(y)
                hook.remove()
                params[f"iterations_{impl}"] = calls[0]

                def call() -> Any:
                    with torch.no_grad():
                        return block.iresblock._inverse_fixed_point(y)

                return call
            from fastflow.nn.residual import _mlp_tensors, mlp_structure
            from fastflow.ops.mlp_trace import mlp_fixed_point

            structure = mlp_structure(g)
            with torch.no_grad():
                weights, biases, betas = _mlp_tensors(structure, y.dtype)

            def call() -> Any:
                with torch.no_grad(), fastflow.backend(backend):
                    return mlp_fixed_point(y, weights, biases, betas, structure[0], structure[1],
                                           tol=TOL, max_iter=MAX_ITER)

            params[f"iterations_{impl}"] = int(call()[1].max())
            return call

        return factory

    def image(impl: str, estimator: str, b: int) -> Callable[[], Callable[[], Any]]:
        def factory() -> Callable[[], Any]:
            from fastflow import models

            kwargs = dict(neumann_grad=False) if estimator == "roulette-backprop" else {}
            torch.manual_seed(0)
            model = models.ResidualFlowImage(
                IMAGE_SHAPE, levels=2, blocks_per_level=2, hidden=32,
                estimator=estimator.split("-")[0], **kwargs,
            ).to(device=device, dtype=dtype)
            if impl == REFERENCE:
                for block in model.blocks:
                    block.g = _Opaque(block.g)
            x = torch.randn(b, *IMAGE_SHAPE, generator=seeded(4, device), device=device, dtype=dtype)
            return train_step(impl, model.train(), lambda: -model.log_prob(x).mean(), "auto", LR)

        return factory

    out: list[Group] = []
    image_configs = [("roulette", 4)] if quick else [
        (e, 16) for e in ("roulette", "series", "roulette-backprop")
    ]
    for estimator, b in image_configs:
        impls = {impl: image(impl, estimator, b) for impl in ("native", REFERENCE)}
        out.append(Group(f"residual-image/{estimator}/3x16x16-b{b}", "train-step", impls,
                         repeat=7, warmup=2, memory=True,
                         params={"shape": list(IMAGE_SHAPE), "batch": b, "estimator": estimator}))
    for d, b, estimator in configs:
        name = f"residual/{estimator}/d{d}-b{b}"
        impls = {impl: train(impl, d, b, estimator) for impl in _BUILDERS}
        out.append(Group(name, "train-step", impls, repeat=10, warmup=2, memory=True,
                         params={"d": d, "batch": b, "estimator": estimator, "coeff": COEFF}))
    for d, b in inverse_configs:
        params: dict[str, Any] = {"d": d, "batch": b, "coeff": COEFF, "tol": TOL}
        impls = {impl: inverse(impl, d, b, params) for impl in _BUILDERS}
        out.append(Group(f"residual/inverse/d{d}-b{b}", "inverse", impls, repeat=5, warmup=1,
                         params=params))
        solve_params: dict[str, Any] = {"d": d, "batch": b, "coeff": COEFF, "tol": TOL}
        impls = {impl: solve(impl, d, b, solve_params) for impl in _BUILDERS}
        out.append(Group(f"residual/solve/d{d}-b{b}", "fixed-point", impls, repeat=5, warmup=1,
                         params=solve_params))
    return out
