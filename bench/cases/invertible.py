"""Glow train step with standard backprop, invertible backprop and per-step checkpointing.

The model: ``fastflow.models.Glow((3, 32, 32), levels=3, depth=K, hidden=128)`` on a batch of
16 (``[16, 3, 32, 32]``), ``K = 16`` and, to show how each method scales with depth, ``K = 32``.
A step is: zero the gradients, ``loss = -log_prob(x).mean()`` (top prior, split priors,
log-det), backward, Adam. Implementations:

* ``standard``: ``model.log_prob`` with ordinary autograd (every activation kept);
* ``invertible``: :class:`fastflow.nn.InvertibleBackprop` ``(model).log_prob`` (only the chain's
  output kept, inputs reconstructed by the inverses in backward);
* ``checkpoint``: ``torch.utils.checkpoint`` (non-reentrant) around every Glow step (each step's
  input kept, the step recomputed in backward).

A second group, at ``K = 4`` (compiling the deeper models takes minutes per implementation on
two cores), compares the two under ``torch.compile(fullgraph=True)`` (default backend, compiled
in the untimed first step): ``standard-compiled`` and ``invertible-compiled`` beside the eager
``standard`` and ``invertible``; the same four for a Residual Flow (``ResidualFlow(16,
n_blocks=4, hidden=64, n_hidden=2)`` on a batch of 256, training mode: the roulette with the
Neumann gradient), whose blocks the wrapper checkpoints.

Memory: the peak is measured on CUDA by ``torch.cuda.max_memory_allocated`` and elsewhere by
:func:`fastflow.memory.track_peak_allocations` (one extra untimed step, bench/harness.py), on top of
what lives before the step. The gradients stay allocated between steps
(``zero_grad(set_to_none=False)``) and Adam updates one parameter at a time
(``foreach=False``), so that, like the model and the optimiser state, parameter-sized memory is
not charged to the step: what the step needs on top is activations and temporaries, the
quantity invertible backpropagation is about. ActNorm is initialised before timing.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import fastflow
from bench.cases._common import seeded
from bench.harness import Group

__all__ = ["SHAPE", "LEVELS", "DEPTHS", "HIDDEN", "IMPLS", "groups"]

SHAPE = (16, 3, 32, 32)
LEVELS = 3
DEPTHS = (16, 32)
HIDDEN = 128
LR = 1e-4
IMPLS = ("standard", "invertible", "checkpoint")
COMPILED_DEPTH = 4
RESIDUAL_SHAPE = (256, 16)
RESIDUAL_BLOCKS = 4
RESIDUAL_HIDDEN = 64
COMPILED_IMPLS = ("standard", "invertible", "standard-compiled", "invertible-compiled")


def _checkpointed_log_prob(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model.log_prob(x)`` of a Glow with every step under ``torch.utils.checkpoint``."""
    ms = model.multiscale
    h, total = x, None
    z1s, z2s = [], []
    for i in range(ms.levels):
        h = F.pixel_unshuffle(h, 2)
        for step in ms.steps[i]:
            h, logdet = checkpoint(step, h, use_reentrant=False)
            logdet = logdet.to(torch.promote_types(logdet.dtype, torch.float32))
            total = logdet if total is None else total + logdet
        if i < ms.levels - 1:
            k = ms._kept[i]
            z1s.append(h[:, :k])
            z2s.append(h[:, k:])
            h = h[:, :k]
    log_p = model.base.log_prob(h)
    for prior, z2, z1 in zip(ms.priors, z2s, z1s):
        log_p = log_p + prior.log_prob(z2, z1)
    return log_p + total


def _glow(shape, depth, hidden, levels, device, dtype) -> Callable[[], tuple[torch.nn.Module, torch.Tensor]]:
    """A builder of the bench Glow and its batch, ActNorm initialised (outside the timing)."""
    cache: dict[str, torch.Tensor] = {}

    def build() -> tuple[torch.nn.Module, torch.Tensor]:
        from fastflow.models import Glow

        if "x" not in cache:
            cache["x"] = torch.randn(shape, generator=seeded(3, device), device=device, dtype=dtype)
        torch.manual_seed(0)
        model = Glow(shape[1:], levels=levels, depth=depth, hidden=hidden).to(device=device, dtype=dtype)
        with torch.no_grad():
            model(cache["x"])  # ActNorm's data-dependent initialisation
        return model, cache["x"]

    return build


def _residual(shape, blocks, hidden, device, dtype) -> Callable[[], tuple[torch.nn.Module, torch.Tensor]]:
    """A builder of the bench Residual Flow (training mode: the roulette with the Neumann
    gradient) and its batch, ActNorm initialised."""
    def build() -> tuple[torch.nn.Module, torch.Tensor]:
        from fastflow.models import ResidualFlow
        from fastflow.nn import initialize_actnorm

        x = torch.randn(shape, generator=seeded(3, device), device=device, dtype=dtype)
        torch.manual_seed(0)
        model = ResidualFlow(shape[1], n_blocks=blocks, hidden=hidden, n_hidden=2).to(device=device, dtype=dtype)
        initialize_actnorm(model, x)
        return model, x

    return build


def _factories(build, impls=IMPLS) -> dict[str, Callable[[], Callable[[], Any]]]:
    def make(impl: str) -> Callable[[], Callable[[], Any]]:
        def factory() -> Callable[[], Any]:
            from fastflow.nn import InvertibleBackprop

            model, x = build()
            if impl.startswith(("standard", "invertible")):
                log_prob = model.log_prob
                if impl.startswith("invertible"):
                    log_prob = InvertibleBackprop(model).log_prob
                if impl.endswith("-compiled"):
                    torch._dynamo.reset()  # a new model: no earlier graph, no recompile limit
                    log_prob = torch.compile(log_prob, fullgraph=True)
                loss_fn = lambda: -log_prob(x).mean()  # noqa: E731
            else:
                loss_fn = lambda: -_checkpointed_log_prob(model, x).mean()  # noqa: E731
            opt = torch.optim.Adam(model.parameters(), lr=LR, foreach=False)
            for p in model.parameters():  # the gradients live between steps (module docstring)
                p.grad = torch.zeros_like(p)

            def step() -> torch.Tensor:
                opt.zero_grad(set_to_none=False)
                loss = loss_fn()
                loss.backward()
                opt.step()
                return loss.detach()

            loss = step()
            if not torch.isfinite(loss):
                raise RuntimeError(f"{impl}: the first train step gave a non-finite loss {loss.item()}")
            return step

        return factory

    return {impl: make(impl) for impl in impls}


def groups(device: torch.device, dtype: torch.dtype, quick: bool = False) -> list[Group]:
    """The Glow train step at ``K = 16`` and ``K = 32``, and compiled at ``K = 4`` (``quick``:
    a tiny Glow)."""
    if quick:
        shape, depths, hidden, levels, compiled_depth = (2, 3, 8, 8), (1, 2), 8, 2, 1
    else:
        shape, depths, hidden, levels, compiled_depth = SHAPE, DEPTHS, HIDDEN, LEVELS, COMPILED_DEPTH
    params = {"shape": list(shape), "levels": levels, "hidden": hidden,
              "optimizer": f"Adam(lr={LR}, foreach=False)", "grads": "kept between steps"}
    compiled = Group(
        case=f"invertible-compiled/glow-L{levels}-K{compiled_depth}-h{hidden}/{'x'.join(map(str, shape))}",
        pass_="train-step",
        impls=_factories(_glow(shape, compiled_depth, hidden, levels, device, dtype), COMPILED_IMPLS),
        repeat=9,
        warmup=2,
        params={**params, "depth": compiled_depth, "compile": "torch.compile(fullgraph=True)"},
        memory=True,
    )
    rshape, rblocks, rhidden = ((16, 4), 1, 8) if quick else (RESIDUAL_SHAPE, RESIDUAL_BLOCKS, RESIDUAL_HIDDEN)
    residual = Group(
        case=f"invertible-compiled/residual-B{rblocks}-h{rhidden}/{'x'.join(map(str, rshape))}",
        pass_="train-step",
        impls=_factories(_residual(rshape, rblocks, rhidden, device, dtype), COMPILED_IMPLS),
        repeat=15,
        warmup=2,
        params={"shape": list(rshape), "blocks": rblocks, "hidden": rhidden, "n_hidden": 2,
                "estimator": "roulette (Neumann gradient)",
                "optimizer": f"Adam(lr={LR}, foreach=False)", "grads": "kept between steps",
                "compile": "torch.compile(fullgraph=True)"},
        memory=True,
    )
    return [
        Group(
            case=f"invertible/glow-L{levels}-K{depth}-h{hidden}/{'x'.join(map(str, shape))}",
            pass_="train-step",
            impls=_factories(_glow(shape, depth, hidden, levels, device, dtype)),
            repeat=5,
            warmup=1,
            params={**params, "depth": depth},
            memory=True,
        )
        for depth in depths
    ] + [compiled, residual]


# --------------------------------------------------------------------------------------------
# ``python -m bench.cases.invertible --errors``: reconstruction error and gradient error by depth


def reconstruction_errors(depths=(4, 8, 16, 32), perturb=(0.0, 0.01, 0.02), batch: int = 16,
                          dtype: torch.dtype = torch.float32, log=print) -> list[dict[str, Any]]:
    """For each depth ``K`` and parameter perturbation: the largest reconstruction error of any
    layer (check mode), that of the first layer (reconstructed last), and the relative error of
    the gradients against standard backprop (over all parameters together, and the largest of
    one parameter), also with ``checkpoint_every="level"``, beside the error of standard
    backprop itself in ``dtype`` against float64 (the rounding any float32 training has).

    ``perturb``: every parameter is moved by ``perturb * N(0, 1)`` after ActNorm's
    initialisation (0: the model at initialisation, where every coupling is the identity).
    """
    from fastflow.models import Glow
    from fastflow.nn import InvertibleBackprop

    rows = []
    for scale in perturb:
        for depth in depths:
            torch.manual_seed(0)
            model = Glow(SHAPE[1:], levels=LEVELS, depth=depth, hidden=HIDDEN).to(dtype)
            x = torch.randn((batch, *SHAPE[1:]), generator=seeded(3, torch.device("cpu")), dtype=dtype)
            with torch.no_grad():
                model(x)
                gen = torch.Generator().manual_seed(1)
                for p in model.parameters():
                    p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))

            def grads(f) -> list[torch.Tensor]:
                model.zero_grad(set_to_none=True)
                (-f(x).mean()).backward()
                return [p.grad.clone() for p in model.parameters()]

            ref = grads(model.log_prob)
            checked = InvertibleBackprop(model, check=True)
            try:
                got = grads(checked.log_prob)
            except RuntimeError as exc:  # a reconstruction that is not finite
                log(f"K={depth:3d} perturb={scale:g}: {exc}")
                continue
            errors = checked.reconstruction_errors
            try:
                level = grads(InvertibleBackprop(model, checkpoint_every="level").log_prob)
            except RuntimeError:
                level = [torch.full_like(r, math.nan) for r in ref]
            baseline = math.nan
            if dtype != torch.float64:  # standard backprop's own rounding: against float64
                wide = copy.deepcopy(model).double()
                wide.zero_grad(set_to_none=True)
                (-wide.log_prob(x.double()).mean()).backward()
                exact = [p.grad for p in wide.parameters()]
                diff = torch.cat([(r.double() - e).flatten() for r, e in zip(ref, exact)])
                baseline = (diff.norm() / torch.cat([e.flatten() for e in exact]).norm()).item()
                del wide, exact

            def rel(gs: list[torch.Tensor]) -> float:
                return max(((g - r).norm() / r.norm().clamp_min(1e-30)).item() for g, r in zip(gs, ref))

            def rel_all(gs: list[torch.Tensor]) -> float:
                diff = torch.cat([(g - r).flatten() for g, r in zip(gs, ref)])
                return (diff.norm() / torch.cat([r.flatten() for r in ref]).norm()).item()

            row = {
                "depth": depth, "perturb": scale, "dtype": str(dtype).replace("torch.", ""),
                "layers": len(errors), "max_error": max(e for _, e in errors),
                "first_layer_error": errors[0][1], "grad_rel_error": rel_all(got),
                "grad_rel_error_max_param": rel(got), "grad_rel_error_level": rel_all(level),
                "standard_vs_float64": baseline,
            }
            rows.append(row)
            log(
                f"K={depth:3d} perturb={scale:g} {row['dtype']}: {row['layers']} layers, max abs "
                f"reconstruction error {row['max_error']:.3g} (first layer {row['first_layer_error']:.3g}); "
                f"relative gradient error {row['grad_rel_error']:.3g} (largest of one parameter "
                f"{row['grad_rel_error_max_param']:.3g}), with checkpoint_every='level' "
                f"{row['grad_rel_error_level']:.3g}; standard backprop in {row['dtype']} against "
                f"float64: {row['standard_vs_float64']:.3g}"
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m bench.cases.invertible",
        description="Invertible backprop on the bench Glow (3 levels, hidden 128, [B, 3, 32, 32]): "
        "reconstruction and gradient errors by depth (the timing and memory are in python -m bench "
        "--filter invertible).",
    )
    p.add_argument("--errors", action="store_true", help="measure the errors (the only action)")
    p.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--perturb", type=float, nargs="+", default=[0.0, 0.01, 0.02])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if not args.errors:
        p.print_help()
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    reconstruction_errors(args.depths, args.perturb, args.batch, getattr(torch, args.dtype))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
