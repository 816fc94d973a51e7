"""FFJORD on 2-D data: one train step, fastflow (native and reference backends) beside zuko; and
FFJORD on images, compiled into one graph against eager.

Workload (FFJORD's 2-D toy configuration, Grathwohl et al. 2019): one continuous normalizing
flow block on 2-D points, dynamics ``2 -> 64 -> 64 -> 64 -> 2`` with tanh, end time ``T = 0.5``,
dopri5 with ``atol = rtol = 1e-5``, Hutchinson's divergence estimate (one Gaussian probe per
sample, drawn once per solve), gradients by an adjoint solve; batch 512 points of the ``moons``
density (:func:`fastflow.data.toy_data`, seed 3), float32 by default. The pass is
``train-step``: ``opt.zero_grad(); loss = -model.log_prob(x).mean(); loss.backward();
opt.step()`` with Adam(lr=1e-3), from the model's initialisation (the model moves a little with
every timed step).

Implementations:

``native`` / ``reference``
    ``fastflow.models.FFJORD(2, hidden=(64, 64, 64), activation="tanh", layer="concatsquash",
    T=0.5, estimator="hutchinson", solver="dopri5", atol=1e-5, rtol=1e-5)`` under
    ``fastflow.backend("native")`` or ``fastflow.backend("reference")``. Concat-squash layers
    ``(W h + b) * sigmoid(W_g t + b_g) + W_b t``; ``T`` is learned (``T = sqrt_T^2``);
    torchdiffeq's ``odeint_adjoint`` (the adjoint state integrated backwards with dopri5 at the
    same tolerances). Under ``native`` the whole solve is one call of the native operator
    :func:`fastflow.ops.cnf_dopri5.cnf_dopri5` (its dynamics the native Hutchinson pass of
    :func:`fastflow.ops.mlp_trace.mlp_trace`), and the backward pass one call of its adjoint
    solve; it replays torchdiffeq's step control, so both take the same steps (the NFE columns
    agree). Under ``reference`` the solve is torchdiffeq's over the network and one autograd
    vector-Jacobian product per evaluation.
``zuko``
    ``zuko.flows.CNF(2, hidden_features=(64, 64, 64), activation=nn.Tanh, atol=1e-5, rtol=1e-5,
    exact=False)`` with its integration interval set to ``[0, 0.5]``.

Where the configurations differ (zuko offers no choice for these):

* time conditioning: zuko's dynamics are a plain MLP on ``[x, cos(k pi t), sin(k pi t)]``,
  ``k = 1, 2, 3`` (input width 8, then 64, 64, 64, 2 with tanh); fastflow's are concat-squash
  layers (the time gates and shifts every layer). Parameter counts: fastflow 9225, zuko 9026.
* end time: fixed at 0.5 in zuko, learned (initialised at 0.5) in fastflow.
* solver: both Dormand-Prince 5(4) with ``atol = rtol = 1e-5``, but zuko's error norm is the
  maximum over every element of the batch's state, with the log-det state's tolerance relaxed
  100-fold (``trace_scale = 1e-2``), and its first step is the whole interval; torchdiffeq's is
  the RMS norm over the state with a first step chosen from the derivatives.
* gradient: zuko's adaptive checkpoint adjoint (it keeps the accepted forward steps and
  re-integrates backwards over them with fixed dopri5 steps, no error control), fastflow's
  adjoint solves the adjoint ODE backwards with its own adaptive steps.
* probes: both Gaussian, drawn once per solve; zuko's backward reuses the forward's probe.

A second pass, ``eval-nll``, is the held-out NLL of the batch in eval mode without gradients,
from the initialisation: fastflow's eval mode takes the exact 2-D trace (the native solve with
the two basis vectors as probes; the reference, two autograd vector-Jacobian products per
evaluation), and zuko's ``exact=True`` (its exact trace by autograd).

The number of function evaluations (NFE) of the dynamics per train step is recorded in the
group's params as ``nfe_forward_<impl>`` and ``nfe_backward_<impl>`` (of the last step run:
fastflow's ``CNF.last_nfe`` and ``last_nfe_backward``; for zuko, calls of its dynamics MLP
counted by a forward hook, before and during ``backward``). ``python -m bench.cases.ffjord
--nfe`` prints them as a table, per step over the first few steps.

A third group, ``ffjord-image``, is FFJORD on 1 x 8 x 8 images (concat-squash convolutions)
trained with the adjoint: ``native`` is the train step compiled into one graph with
:func:`fastflow.compile` (the in-graph solver and adjoint solve, Inductor), ``reference`` the
eager solve on torchdiffeq (no native kernel takes convolutional dynamics). See
``_image_group``.

No ``reference-compiled`` row: the reference solve calls ``torch.autograd.grad`` inside the
dynamics and the adjoint is a Python loop of torchdiffeq, which ``torch.compile(fullgraph=True)``
cannot capture (the native solve is one node of a graph, so compiling it changes nothing).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import fastflow
from bench.cases._common import check_native, seeded, train_step
from bench.harness import REFERENCE, Group, Skip

__all__ = ["BATCH", "HIDDEN", "IMPLS", "T_END", "TOL", "groups", "nfe_table", "main"]

HIDDEN = (64, 64, 64)
BATCH = 512
T_END = 0.5
TOL = 1e-5
LR = 1e-3
IMPLS = ("native", REFERENCE, "zuko")


class _Model:
    """One implementation: its module, the loss of a batch, and its NFE counters."""

    def __init__(self, module: nn.Module, loss: Callable[[torch.Tensor], torch.Tensor],
                 nfe: Callable[[], tuple[int, int]], reset: Callable[[], None]):
        self.module, self.loss, self.nfe, self.reset = module, loss, nfe, reset


def _fastflow(hidden: tuple[int, ...], tol: float) -> _Model:
    from fastflow.models import FFJORD

    flow = FFJORD(2, n_blocks=1, hidden=hidden, activation="tanh", layer="concatsquash",
                  T=T_END, estimator="hutchinson", solver="dopri5", atol=tol, rtol=tol)
    block = flow.blocks[0]
    return _Model(flow, lambda x: -flow.log_prob(x).mean(),
                  lambda: (block.last_nfe or 0, block.last_nfe_backward or 0), lambda: None)


def _zuko(hidden: tuple[int, ...], tol: float) -> _Model:
    try:
        import zuko
    except ImportError as exc:
        raise Skip(f"zuko is not installed (pip install zuko): {exc}") from None
    flow = zuko.flows.CNF(2, hidden_features=hidden, activation=nn.Tanh, atol=tol, rtol=tol,
                          exact=False)
    transform = flow.transform
    if not hasattr(transform, "times") or not hasattr(transform, "ode"):
        raise Skip(f"zuko {zuko.__version__}: CNF has no transform.times / transform.ode")
    transform.times.copy_(torch.tensor([0.0, T_END]))
    # calls of the dynamics: [before backward, during backward]
    calls = {"n": 0, "fwd": 0}
    transform.ode.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))

    def loss(x: torch.Tensor) -> torch.Tensor:
        calls["n"] = 0
        value = -flow().log_prob(x).mean()
        calls["fwd"] = calls["n"]
        return value

    def reset() -> None:
        calls["n"] = calls["fwd"] = 0

    return _Model(flow, loss, lambda: (calls["fwd"], calls["n"] - calls["fwd"]), reset)


_BUILDERS = {"native": _fastflow, REFERENCE: _fastflow, "zuko": _zuko}


def _config(quick: bool) -> tuple[tuple[int, ...], int, float]:
    """(hidden, batch, tolerance); ``quick``: a tiny net and batch, loose tolerance."""
    return ((8,), 16, 1e-3) if quick else (HIDDEN, BATCH, TOL)


def _data(batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    from fastflow.data import toy_data

    return toy_data("moons", batch, seed=3).to(device=device, dtype=dtype)


def _build(impl: str, device: torch.device, dtype: torch.dtype, quick: bool) -> _Model:
    if impl == "native":
        check_native(device)
    hidden, _, tol = _config(quick)
    torch.manual_seed(0)
    model = _BUILDERS[impl](hidden, tol)
    model.module.to(device=device, dtype=dtype).train()
    return model


def _backend(impl: str) -> str:
    return impl if impl in ("native", REFERENCE) else "auto"


def groups(device: torch.device, dtype: torch.dtype, quick: bool = False) -> list[Group]:
    """The train-step group (``quick``: hidden (8,), batch 16, tolerance 1e-3)."""
    hidden, batch, tol = _config(quick)
    params: dict[str, Any] = {"features": 2, "hidden": list(hidden), "batch": batch, "T": T_END,
                              "atol": tol, "rtol": tol, "solver": "dopri5",
                              "estimator": "hutchinson"}
    cache: dict[str, torch.Tensor] = {}

    def train(impl: str) -> Callable[[], Callable[[], Any]]:
        def factory() -> Callable[[], Any]:
            model = _build(impl, device, dtype, quick)
            if "x" not in cache:
                cache["x"] = _data(batch, device, dtype)
            x = cache["x"]
            step = train_step(impl, model.module, lambda: model.loss(x), _backend(impl), LR)

            def record() -> None:
                fwd, bwd = model.nfe()
                params[f"nfe_forward_{impl}"] = fwd
                params[f"nfe_backward_{impl}"] = bwd

            record()  # the step train_step ran once already

            def call() -> torch.Tensor:
                loss = step()
                record()
                return loss

            return call

        return factory

    def evaluate(impl: str) -> Callable[[], Callable[[], Any]]:
        def factory() -> Callable[[], Any]:
            model = _build(impl, device, dtype, quick)
            model.module.eval()  # fastflow: the exact 2-D trace in eval mode
            if impl == "zuko":
                model.module.transform.exact = True
            if "x" not in cache:
                cache["x"] = _data(batch, device, dtype)
            x = cache["x"]

            def call() -> torch.Tensor:
                with torch.no_grad(), fastflow.backend(_backend(impl)):
                    return model.loss(x)

            call()
            return call

        return factory

    name = f"ffjord/d2-h{'x'.join(map(str, hidden))}-b{batch}"
    return [
        Group(name, "train-step", {impl: train(impl) for impl in IMPLS}, repeat=5, warmup=1,
              params=params),
        Group(name, "eval-nll", {impl: evaluate(impl) for impl in IMPLS}, repeat=7, warmup=1,
              params={**params, "estimator": "exact"}),
        _image_group(device, dtype, quick),
    ]


def _image_group(device: torch.device, dtype: torch.dtype, quick: bool) -> Group:
    """FFJORD on images, trained with the adjoint: the whole train step compiled into one graph
    (``native``: :func:`fastflow.compile`, Inductor; the in-graph solver and adjoint solve of
    :mod:`fastflow.nn._ode_graph`) against the eager solve on torchdiffeq and autograd
    (``reference``). ``FFJORD((1, 8, 8), hidden=(16, 16))``: concat-squash convolutions (3x3),
    softplus, learned ``T = 0.5``, dopri5 at ``atol = rtol = 1e-5``, Hutchinson, the adjoint;
    batch 32 (``quick``: ``(1, 4, 4)``, hidden (4,), batch 4, tolerance 1e-3). The compilation
    happens in the untimed first step."""
    from fastflow.models import FFJORD

    shape, hidden, batch, tol = ((1, 4, 4), (4,), 4, 1e-3) if quick else ((1, 8, 8), (16, 16), 32, TOL)
    params: dict[str, Any] = {"shape": list(shape), "hidden": list(hidden), "batch": batch,
                              "T": T_END, "atol": tol, "rtol": tol, "solver": "dopri5",
                              "estimator": "hutchinson", "adjoint": True}

    def factory(impl: str) -> Callable[[], Callable[[], Any]]:
        def build() -> Callable[[], Any]:
            torch.manual_seed(0)
            flow = FFJORD(shape, hidden=hidden, activation="softplus", layer="concatsquash",
                          T=T_END, solver="dopri5", atol=tol, rtol=tol, adjoint=True)
            flow.to(device=device, dtype=dtype).train()
            x = torch.randn(batch, *shape, generator=seeded(3, device), device=device, dtype=dtype)
            if impl == "native":
                torch._dynamo.reset()
                log_prob = fastflow.compile(flow.log_prob, fullgraph=True)
            else:
                log_prob = flow.log_prob
            step = train_step(impl, flow, lambda: -log_prob(x).mean(), _backend(impl), LR)
            params[f"nfe_forward_{impl}"] = int(flow.blocks[0].last_nfe)
            return step

        return build

    name = f"ffjord-image/c{shape[0]}-{shape[1]}x{shape[2]}-h{'x'.join(map(str, hidden))}-b{batch}"
    return Group(name, "train-step", {impl: factory(impl) for impl in ("native", REFERENCE)},
                 repeat=5, warmup=1, params=params)


def nfe_table(device: torch.device, dtype: torch.dtype, quick: bool = False, steps: int = 5,
              impls: tuple[str, ...] = IMPLS, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Runs ``steps`` train steps of each implementation from the same initialisation and data
    and returns one row per implementation: NFE of the forward and backward solves per step (a
    list), their means, and the median milliseconds per step. Implementations that cannot run
    here are left out with a note."""
    _, batch, _ = _config(quick)
    x = _data(batch, device, dtype)
    rows = []
    for impl in impls:
        try:
            model = _build(impl, device, dtype, quick)
        except Skip as why:
            log(f"skipped {impl}: {why}")
            continue
        opt = torch.optim.Adam(model.module.parameters(), lr=LR)
        fwd, bwd, ms = [], [], []
        for _ in range(steps):
            model.reset()
            start = time.perf_counter()
            with fastflow.backend(_backend(impl)):
                opt.zero_grad(set_to_none=True)
                loss = model.loss(x)
                loss.backward()
                opt.step()
            ms.append((time.perf_counter() - start) * 1e3)
            f, b = model.nfe()
            fwd.append(f)
            bwd.append(b)
        rows.append({"impl": impl, "nfe_forward": fwd, "nfe_backward": bwd,
                     "mean_nfe_forward": statistics.mean(fwd), "mean_nfe_backward": statistics.mean(bwd),
                     "median_ms": statistics.median(ms), "loss": loss.item()})
    return rows


def format_nfe_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of :func:`nfe_table`'s rows."""
    lines = ["| impl | NFE forward per step | NFE backward per step | mean fwd | mean bwd | median ms/step |",
             "|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['impl']} | {' '.join(map(str, r['nfe_forward']))} | "
            f"{' '.join(map(str, r['nfe_backward']))} | {r['mean_nfe_forward']:.1f} | "
            f"{r['mean_nfe_backward']:.1f} | {r['median_ms']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.cases.ffjord",
        description="Function evaluations (NFE) per FFJORD train step, fastflow beside zuko.",
    )
    p.add_argument("--nfe", action="store_true", help="print the NFE table (the only action)")
    p.add_argument("--steps", type=int, default=5, help="train steps per implementation (default 5)")
    p.add_argument("--quick", action="store_true", help="tiny workload (checks that it runs)")
    p.add_argument("--impl", help="comma-separated implementations (default native,reference,zuko)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    args = p.parse_args(argv)
    if not args.nfe:
        p.error("nothing to do: pass --nfe (the timings are in python -m bench --filter ffjord)")
    if args.steps < 1:
        p.error("--steps must be a positive integer")
    impls = IMPLS if not args.impl else tuple(s.strip() for s in args.impl.split(",") if s.strip())
    unknown = set(impls) - set(IMPLS)
    if unknown:
        p.error(f"--impl: unknown {sorted(unknown)}; choose from {', '.join(IMPLS)}")
    dtype = torch.float32 if args.dtype == "float32" else torch.float64
    hidden, batch, tol = _config(args.quick)
    print(f"FFJORD train step: hidden {hidden}, batch {batch}, T {T_END}, dopri5 atol=rtol={tol:g}, "
          f"Hutchinson, {args.dtype}, {torch.get_num_threads()} threads")
    rows = nfe_table(torch.device("cpu"), dtype, quick=args.quick, steps=args.steps, impls=impls)
    print(format_nfe_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
