"""Train a vector flow on a 2-D toy density for a fixed wall-clock budget.

Reports the test negative log-likelihood (nats per point) that the budget buys, checks that the
learned density integrates to one on a grid, and with ``--out DIR`` writes ``DIR/<model>_<data>.json``
and a picture ``DIR/<model>_<data>.png``: the data, the model's density (a heat map of
``exp(log p)`` on the grid) and samples drawn from the model (a scatter; a model whose layers
have no inverse gets a note in that panel instead).

Models (``--model``): ``realnvp`` (8 affine couplings), ``maf`` (5 autoregressive layers),
``planar`` (16 planar layers), ``sylvester`` (8 Householder Sylvester layers), ``resflow``
(a Residual Flow: 10 blocks of width 64, Russian-roulette log-det in training; evaluation and
the grid use the exact 2x2 log-det), ``ffjord`` (one CNF block, concat-squash dynamics
2 -> 64 -> 64 -> 64 -> 2 with tanh, learned end time from T = 0.5, dopri5 with
atol = rtol = 1e-5 and the adjoint; Hutchinson's divergence estimate with a Gaussian probe in
training, the exact 2-D trace in evaluation and on the grid). Data (``--data``): any of
:data:`fastflow.data.TOY_DATASETS`.

The train and test sets are 20000 and 5000 fresh points of the density (seeds 0 and 1); Adam,
batch 512, learning rate 5e-3 (2e-3 for ``ffjord``, nearer FFJORD's own 1e-3; ``--lr``
overrides). ``--steps`` caps the number of steps within the time budget.

Example::

    python examples/toy_2d.py --model maf --data moons --seconds 30 --out runs/toy
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

import fastflow
from fastflow import models
from fastflow.data import TOY_DATASETS, toy_data

MODELS = ("realnvp", "maf", "planar", "sylvester", "resflow", "ffjord")
GRID_LIMIT = 6.0
#: Learning rate per model when ``--lr`` is not given.
DEFAULT_LR = {"ffjord": 2e-3}
N_SAMPLES = 5000


def build(name: str) -> torch.nn.Module:
    if name == "realnvp":
        return models.RealNVP(2, n_couplings=8, hidden=64)
    if name == "maf":
        return models.MAF(2, n_transforms=5, hidden=64)
    if name == "planar":
        return models.PlanarFlow(2, n_transforms=16)
    if name == "sylvester":
        return models.SylvesterFlow(2, n_transforms=8, variant="householder")
    if name == "ffjord":
        return models.FFJORD(2, n_blocks=1, hidden=(64, 64, 64), activation="tanh",
                             layer="concatsquash", T=0.5, atol=1e-5, rtol=1e-5)
    return models.ResidualFlow(2, n_blocks=10, hidden=64, n_hidden=2, coeff=0.97)


def draw_samples(model: torch.nn.Module, n: int = N_SAMPLES, seed: int = 2) -> torch.Tensor | None:
    """``n`` samples of the model (eval mode), or None when its layers have no inverse."""
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(seed)
            return model.sample(n)
    except fastflow.InverseNotAvailable:
        return None
    finally:
        model.train()


def evaluate(model: torch.nn.Module, x: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        nll = -torch.cat([model.log_prob(chunk) for chunk in x.split(2500)]).mean().item()
    model.train()
    return nll


def grid_density(model: torch.nn.Module, n: int = 200) -> tuple[torch.Tensor, float]:
    """``p`` on an ``n x n`` grid over ``[-6, 6]^2`` and its Riemann sum (the mass)."""
    ticks = torch.linspace(-GRID_LIMIT, GRID_LIMIT, n)
    xx, yy = torch.meshgrid(ticks, ticks, indexing="xy")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    model.eval()
    with torch.no_grad():
        lp = torch.cat([model.log_prob(chunk) for chunk in pts.split(5000)])
    model.train()
    p = lp.exp().reshape(n, n)
    cell = (ticks[1] - ticks[0]).item() ** 2
    return p, float(p.sum() * cell)


def picture(data: torch.Tensor, p: torch.Tensor, samples: torch.Tensor | None, title: str,
            path: str) -> None:
    """Three panels: the data (a 2-D histogram), the density on the grid, and the samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 4.3))
    extent = (-GRID_LIMIT, GRID_LIMIT, -GRID_LIMIT, GRID_LIMIT)
    axes[0].hist2d(data[:, 0].numpy(), data[:, 1].numpy(), bins=200,
                   range=[[-GRID_LIMIT, GRID_LIMIT]] * 2, cmap="viridis")
    axes[0].set_title("data")
    axes[1].imshow(p.numpy(), origin="lower", extent=extent, cmap="viridis")
    axes[1].set_title(title)
    if samples is None:
        axes[2].text(0.5, 0.5, "no inverse:\nno samples", ha="center", va="center",
                     transform=axes[2].transAxes)
    else:
        s = samples.detach().double().numpy()
        axes[2].scatter(s[:, 0], s[:, 1], s=1, alpha=0.4, color="tab:blue", linewidths=0)
        axes[2].set_facecolor("white")
    axes[2].set_xlim(-GRID_LIMIT, GRID_LIMIT)
    axes[2].set_ylim(-GRID_LIMIT, GRID_LIMIT)
    axes[2].set_title(f"{len(samples)} samples" if samples is not None else "samples")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(args: argparse.Namespace) -> dict:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x_train = toy_data(args.data, 20000, seed=0)
    x_test = toy_data(args.data, 5000, seed=1)
    model = build(args.model)
    if args.model == "resflow":
        fastflow.nn.initialize_actnorm(model, x_train[:512])
    lr = args.lr if args.lr is not None else DEFAULT_LR.get(args.model, 5e-3)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(args.seed)
    start_nll = evaluate(model, x_test)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds and (args.steps is None or steps < args.steps):
        idx = torch.randint(len(x_train), (args.batch_size,), generator=gen)
        loss = -model.log_prob(x_train[idx]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    elapsed = time.perf_counter() - start
    train_nfe = getattr(model, "last_nfe", None)  # CNFs: evaluations of the last train step
    p, mass = grid_density(model, args.grid_points)
    result = {
        "model": args.model,
        "data": args.data,
        "seconds": round(elapsed, 1),
        "steps": steps,
        "test_nll_start": round(start_nll, 4),
        "test_nll": round(evaluate(model, x_test), 4),
        "grid_mass": round(mass, 4),
        "parameters": sum(q.numel() for q in model.parameters()),
        "lr": lr,
        "batch_size": args.batch_size,
        "native": bool(fastflow.native_available()),
        "threads": torch.get_num_threads(),
    }
    if train_nfe is not None:
        result["train_nfe_last_step"] = train_nfe
        result["eval_nfe_last_call"] = model.last_nfe
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"{args.model}_{args.data}")
        with open(stem + ".json", "w") as f:
            json.dump(result, f, indent=1)
        samples = draw_samples(model)
        picture(x_test, p, samples, f"{args.model}: test NLL {result['test_nll']:.3f}", stem + ".png")
        result["png"] = stem + ".png"
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS, default="maf")
    p.add_argument("--data", choices=TOY_DATASETS, default="moons")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--steps", type=int, default=None,
                   help="stop after this many steps even within --seconds (default: no limit)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=None,
                   help="Adam learning rate (default 5e-3; 2e-3 for ffjord)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's); 1 is steadier on a shared machine")
    p.add_argument("--grid-points", type=int, default=200,
                   help="grid points per axis for the density and its mass (default 200)")
    args = p.parse_args(argv)
    if not (args.seconds > 0 and math.isfinite(args.seconds)):
        p.error("--seconds must be positive")
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be a positive integer")
    if args.batch_size < 1:
        p.error("--batch-size must be a positive integer")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be a positive integer")
    if args.grid_points < 2:
        p.error("--grid-points must be an integer >= 2")
    if args.lr is not None and not (args.lr > 0 and math.isfinite(args.lr)):
        p.error("--lr must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    print(json.dumps(train(parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
