"""``python -m fastflow demo`` (also ``python -m fastflow.demo``): a short end-to-end run.

What it does, through the command line of :mod:`fastflow.cli`:

1. ``python -m fastflow train`` for each of ``--models`` (default: ``realnvp`` and ``maf``) on
   one 2-D toy density (``--data``, default ``moons``) for ``--steps`` steps, each run in
   ``OUT/MODEL`` with its checkpoint, training history and pictures (the density beside the
   data, samples, the training curve; matplotlib is an optional extra, ``pip install
   fastflow[plot]``, without it the pictures are skipped); each density picture is also copied
   to ``OUT/MODEL_DATA.png``;
2. a table of the held-out NLLs (nats per point) beside that of the best Gaussian (mean and
   covariance of the training points), the baseline a flow must beat;
3. the speed of a Real NVP training step on the native operators and on the pure-PyTorch
   reference, timed in alternating blocks, and their ratio.

Example::

    python -m fastflow demo --data moons --steps 1500 --out out/demo

With the defaults the whole demo takes about a minute on a 2-core x86-64 CPU (one thread).
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import sys
import time

import torch

import fastflow

__all__ = ["main", "run", "add_arguments"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The demo's options, shared by ``python -m fastflow demo`` and ``python -m fastflow.demo``."""
    from fastflow.data import TOY_DATASETS

    p.add_argument("--data", default="moons", choices=TOY_DATASETS, help="toy density (default moons)")
    p.add_argument("--models", nargs="+", default=["realnvp", "maf"],
                   choices=("realnvp", "maf", "iaf", "planar", "sylvester", "iresnet", "resflow", "ffjord"),
                   help="families to train (default: realnvp maf)")
    p.add_argument("--steps", type=int, default=1500, help="training steps per model (default 1500)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: each model's, 512)")
    p.add_argument("--hidden", type=int, default=None, help="hidden width of every model (default: each model's, 64)")
    p.add_argument("--couplings", type=int, default=None, help="Real NVP's coupling layers (default 8)")
    p.add_argument("--out", default=os.path.join("out", "demo"), help="output folder (default out/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timing-steps", type=int, default=20, help="steps per backend timed (default 20; 0: skip)")
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (default 1: 2-D models are too small to gain from more, and on a busy "
        "machine two threads that wait on each other can make a step 5-10x slower)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _gaussian_nll(train: torch.Tensor, test: torch.Tensor) -> float:
    """Test NLL (nats) of the maximum-likelihood Gaussian of ``train``."""
    mean = train.mean(0)
    cov = torch.cov(train.T.double()) + 1e-9 * torch.eye(train.shape[1], dtype=torch.float64)
    dist = torch.distributions.MultivariateNormal(mean.double(), covariance_matrix=cov)
    return -dist.log_prob(test.double()).mean().item()


def _time_backends(model, x: torch.Tensor, lr: float, steps: int) -> dict[str, float]:
    """Median seconds per train step under each backend, on copies of ``model``.

    The two backends alternate in blocks of a few steps (the machine's noise falls on both);
    each has its own copy of the model and its own optimiser.
    """
    backends = ["reference"]
    if x.device.type in fastflow.native_available():
        backends.insert(0, "native")
    else:
        why = fastflow.native_load_error() or "no native kernel for this device"
        print(f"timing: native backend unavailable ({why}); reference only")
    setups = {}
    for name in backends:
        m = copy.deepcopy(model).train()
        setups[name] = (m, torch.optim.Adam(m.parameters(), lr=lr * 0.01))
    times: dict[str, list[float]] = {name: [] for name in backends}

    def one_step(name: str) -> None:
        m, opt = setups[name]
        with fastflow.backend(name):
            loss = -m.log_prob(x).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    for name in backends:  # warm-up
        for _ in range(3):
            one_step(name)
    block = 5
    for r in range(max(1, steps // block)):
        order = backends if r % 2 == 0 else backends[::-1]
        for name in order:
            start = time.perf_counter()
            for _ in range(block):
                one_step(name)
            times[name].append((time.perf_counter() - start) / block)
    return {name: statistics.median(v) for name, v in times.items()}


def run(args: argparse.Namespace) -> int:
    """Runs the demo for parsed arguments (see :func:`add_arguments`); returns the exit status."""
    from fastflow import cli
    from fastflow.checkpoint import load_checkpoint

    if args.steps < 1:
        print("python -m fastflow demo: --steps must be positive", file=sys.stderr)
        return 2
    start = time.perf_counter()
    results = []
    for model in args.models:
        out = os.path.join(args.out, model)
        argv = ["train", "--model", model, "--data", args.data, "--steps", str(args.steps),
                "--out", out, "--seed", str(args.seed), "--threads", str(args.threads)]
        if args.no_progress:
            argv += ["--progress", "off"]
        if args.batch:
            argv += ["--batch-size", str(args.batch)]
        if args.hidden and model != "planar":
            argv += ["--set", f"hidden={args.hidden}"]
        if args.couplings and model == "realnvp":
            argv += ["--set", f"n_couplings={args.couplings}"]
        print(f"\n$ python -m fastflow {' '.join(argv)}", flush=True)
        status = cli.main(argv)
        if status != 0:
            return status
        state = load_checkpoint(os.path.join(out, cli.CHECKPOINT_NAME))
        results.append((model, state))

    data = cli.load_dataset(args.data, args.seed)
    gauss = _gaussian_nll(data.train, data.heldout)
    print(f"\ntest NLL: the mean over {data.heldout.shape[0]} held-out points of {args.data}, in nats "
          "(lower is better)")
    print(f"  {'best Gaussian':<14} {gauss:8.4f}")
    for model, state in results:
        evals = state["history"]["eval"]
        nll = evals[-1]["value"] if evals else float("nan")
        secs = state["history"].get("seconds", float("nan"))
        print(f"  {model:<14} {nll:8.4f}   ({gauss - nll:.3f} below the Gaussian's; "
              f"{state['step']} steps in {secs:.0f} s)")
    print("pictures (data | model density; samples; training curve):")
    for model, _ in results:
        density = os.path.join(args.out, model, "density.png")
        if os.path.exists(density):  # the headline picture, also at the top of the output folder
            shutil.copyfile(density, os.path.join(args.out, f"{model}_{args.data}.png"))
            print(f"  {os.path.abspath(os.path.join(args.out, f'{model}_{args.data}.png'))}")
        for name in ("samples.png", "curve.png"):
            path = os.path.join(args.out, model, name)
            if os.path.exists(path):
                print(f"  {os.path.abspath(path)}")

    if args.timing_steps > 0:
        state = next((s for m, s in results if m == "realnvp"), None)
        config = state["config"] if state else {"model_kwargs": cli.recipe_for("realnvp", False).kwargs, "lr": 2e-3,
                                                 "batch_size": args.batch or 512}
        model = cli.build_model("realnvp", [2], config["model_kwargs"])
        if state:
            model.load_state_dict(state["model"])
        x = data.train[: config["batch_size"]]
        medians = _time_backends(model, x, config["lr"], args.timing_steps)
        parts = [f"{name} {1e3 * t:.2f} ms/step" for name, t in medians.items()]
        line = f"Real NVP train step (batch {x.shape[0]}): " + ", ".join(parts)
        if "native" in medians:
            line += f"; native is {medians['reference'] / medians['native']:.2f}x the reference's speed"
        print("\n" + line)
        print("  (in 2-D the coupling's elementwise work is a small part of a step, which the "
              "conditioner MLPs dominate; python -m bench times the operators themselves)")
    print(f"\ndemo done in {time.perf_counter() - start:.0f} s; next: python -m fastflow --help")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastflow.demo",
        description="Train two flow families on a 2-D density through the CLI, draw them, and "
        "time the native operators against the reference.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
