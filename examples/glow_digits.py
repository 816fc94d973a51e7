"""Train a multi-scale Glow on scikit-learn's 8x8 digits for a fixed wall-clock budget.

Reports the test-set bits per dimension reached in that budget, so that implementations can be
compared by what the same time buys:

* ``fastflow``: :class:`fastflow.models.Glow` with the default backend (the native operators when
  built);
* ``reference``: the same model under ``fastflow.backend("reference")`` (pure PyTorch);
* ``normflows``: normflows' multi-scale Glow (``MultiscaleFlow`` of ``GlowBlock``\\ s, its
  README's construction, unconditional ``GlowBase`` priors) with the same levels, steps per
  level and conditioner width.

The data are the 1797 digits (17 grey levels, 0..16), split 80/20 into train and test with a
fixed seed, uniformly dequantised to ``[0, 1)`` (``(k + u) / 17``) and shifted by -0.5 (a
unit-Jacobian shift, so the density is that of the dequantised image). Bits per dimension
count the bin width, ``-(log p(x) - D log 17) / (D log 2)``, ``D = 64``; the test figure uses
one fixed dequantisation draw, the same for every implementation.

With ``--out DIR`` the script writes ``DIR/<impl>.json`` (the figures) and, for the fastflow
implementations, ``DIR/<impl>_samples.png``: a grid of samples at temperatures 0, 0.5, 0.7 and
1.0 (one row each; at temperature 0 every sample is the decoding of the zero latent, the mode
of every prior).

Example::

    python examples/glow_digits.py --impl fastflow --seconds 120 --out runs/digits
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
from fastflow.data import DIGITS_LEVELS, load_digits
from fastflow.images import bits_per_dim, dequantize
from fastflow.models import Glow

IMPLS = ("fastflow", "reference", "normflows")
TEMPERATURES = (0.0, 0.5, 0.7, 1.0)
SHAPE = (1, 8, 8)
DIMS = math.prod(SHAPE)


def build_fastflow(levels: int, depth: int, hidden: int) -> torch.nn.Module:
    return Glow(SHAPE, levels=levels, depth=depth, hidden=hidden)


class NormflowsGlow(torch.nn.Module):
    """normflows' multi-scale Glow over ``SHAPE``, with ``log_prob`` and ``sample`` like fastflow's."""

    def __init__(self, levels: int, depth: int, hidden: int):
        super().__init__()
        import normflows as nf

        c, h, w = SHAPE
        q0, merges, flows = [], [], []
        for i in range(levels):
            # level i of normflows' list is the (levels - i)-th squeeze, deepest first
            channels = c * 2 ** (levels + 1 - i)
            level = [nf.flows.GlowBlock(channels, hidden, split_mode="channel") for _ in range(depth)]
            flows.append(level + [nf.flows.Squeeze()])
            if i > 0:
                merges.append(nf.flows.Merge())
                latent = (c * 2 ** (levels - i), h // 2 ** (levels - i), w // 2 ** (levels - i))
            else:
                latent = (c * 2 ** (levels + 1), h // 2**levels, w // 2**levels)
            q0.append(nf.distributions.GlowBase(latent))
        self.model = nf.MultiscaleFlow(q0, flows, merges, class_cond=False)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.log_prob(x, None)

    def sample(self, n: int, temperature: float = 1.0) -> torch.Tensor:
        return self.model.sample(n, temperature=temperature)[0]


def build(impl: str, levels: int, depth: int, hidden: int) -> torch.nn.Module:
    if impl == "normflows":
        return NormflowsGlow(levels, depth, hidden)
    return build_fastflow(levels, depth, hidden)


def preprocess(k: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return dequantize(k, n_bins=DIGITS_LEVELS, generator=generator) - 0.5


@torch.no_grad()
def test_bits_per_dim(model: torch.nn.Module, test_x: torch.Tensor) -> float:
    model.eval()
    lp = torch.cat([model.log_prob(chunk) for chunk in test_x.split(512)])
    model.train()
    return bits_per_dim(lp, DIMS, n_bins=DIGITS_LEVELS).mean().item()


def save_grid(model: torch.nn.Module, path: str, per_row: int = 10, seed: int = 0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    rows = []
    with torch.no_grad():
        for t in TEMPERATURES:
            torch.manual_seed(seed)
            rows.append((model.sample(per_row, temperature=t) + 0.5).clamp(0, 1))
    fig, axes = plt.subplots(len(TEMPERATURES), per_row, figsize=(per_row * 0.8, len(TEMPERATURES) * 0.9))
    for r, (t, images) in enumerate(zip(TEMPERATURES, rows)):
        for c in range(per_row):
            ax = axes[r, c]
            ax.imshow(images[c, 0].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(f"T={t:g}", rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    train_k = load_digits("train", seed=args.split_seed)
    test_k = load_digits("test", seed=args.split_seed)
    test_x = preprocess(test_k, torch.Generator().manual_seed(1234))
    gen = torch.Generator().manual_seed(args.seed)

    backend = "reference" if args.impl == "reference" else "auto"
    with fastflow.backend(backend):
        model = build(args.impl, args.levels, args.depth, args.hidden)
        params = sum(p.numel() for p in model.parameters())
        # data-dependent ActNorm initialisation on one larger batch, the same for every impl
        init = preprocess(train_k[torch.randperm(len(train_k), generator=gen)[: args.init_batch]], gen)
        with torch.no_grad():
            model.log_prob(init)
        bpd_start = test_bits_per_dim(model, test_x)
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup))
        steps, epochs, start = 0, 0, time.perf_counter()
        last_loss = float("nan")
        while time.perf_counter() - start < args.seconds:
            order = torch.randperm(len(train_k), generator=gen)
            for idx in order.split(args.batch_size):
                if len(idx) < args.batch_size:
                    continue
                x = preprocess(train_k[idx], gen)
                loss = bits_per_dim(model.log_prob(x), DIMS, n_bins=DIGITS_LEVELS).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
                opt.step()
                sched.step()
                steps += 1
                last_loss = loss.item()
                if time.perf_counter() - start >= args.seconds:
                    break
            epochs += 1
        elapsed = time.perf_counter() - start
        result = {
            "impl": args.impl,
            "native": args.impl == "fastflow" and fastflow.native_available(),
            "seconds": round(elapsed, 1),
            "steps": steps,
            "steps_per_second": round(steps / elapsed, 2),
            "epochs": epochs,
            "train_bits_per_dim_last_batch": round(last_loss, 4),
            "test_bits_per_dim_start": round(bpd_start, 4),
            "test_bits_per_dim": round(test_bits_per_dim(model, test_x), 4),
            "levels": args.levels,
            "depth": args.depth,
            "hidden": args.hidden,
            "parameters": params,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "seed": args.seed,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, f"{args.impl}.json"), "w") as f:
                json.dump(result, f, indent=1)
            if args.impl != "normflows":
                path = os.path.join(args.out, f"{args.impl}_samples.png")
                save_grid(model, path)
                result["samples_png"] = path
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impl", choices=IMPLS, default="fastflow")
    p.add_argument("--seconds", type=float, default=120.0, help="training wall-clock budget")
    p.add_argument("--levels", type=int, default=2)
    p.add_argument("--depth", type=int, default=8, help="Glow steps per level")
    p.add_argument("--hidden", type=int, default=64, help="conditioner width")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--init-batch", type=int, default=256, help="ActNorm initialisation batch")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100, help="linear learning-rate warm-up steps")
    p.add_argument("--clip", type=float, default=50.0, help="gradient-norm clip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--out", default=None, help="directory for the JSON figures and the PNG grid")
    args = p.parse_args(argv)
    if args.seconds <= 0:
        p.error("--seconds must be positive")
    for name in ("levels", "depth", "hidden", "batch_size", "init_batch", "warmup"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer")
    return args


def main(argv: list[str] | None = None) -> int:
    result = train(parse_args(argv))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
