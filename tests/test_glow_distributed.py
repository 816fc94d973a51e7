"""A whole Glow trained with DistributedDataParallel: two gloo processes on the CPU.

Each rank builds the same model (same seed), wraps it in ``DistributedDataParallel``, takes its
OWN batch, initialises the ActNorms from it (explicitly with ``initialize_actnorm``, or implicitly
on the first training forward through DDP) and takes one SGD step on the NLL. Checked:

* every parameter and buffer is bit-identical on the two ranks afterwards (``all_gather``);
* every ActNorm's initialisation equals what one process gets from the concatenation of the two
  batches (the statistics are all-reduced, deeper layers included), and the parameters after the
  step equal one process's step on the concatenation (DDP averages the gradients of equal-sized
  batches, which is the gradient of the mean over their union);
* negative control: when each rank initialises its ActNorms from its own batch only (a
  one-rank ``process_group``), exactly the ActNorm parameters differ between the ranks after the
  step, so the identity check above can fail.

The order matters for the last point: DDP broadcasts rank 0's parameters when it is constructed,
so the model is wrapped BEFORE the initialisation, as a training script that initialises on its
first batch would; a per-rank initialisation before the wrap would be hidden by that broadcast.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastflow.models import Glow
from fastflow.nn import ActNorm, initialize_actnorm

from _distributed import run_forked

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()),
        reason="torch.distributed with gloo not built",
    ),
]

WORLD_SIZE = 2
BATCH = 6  # per rank; equal sizes, so DDP's mean of the ranks' gradients is the global mean's
MODEL_SEED = 0
LR = 0.05


def make_model() -> Glow:
    """The same model in every process. The zero-initialised layers (the couplings' last
    convolutions, the priors) get small seeded noise, so that the couplings act and the deeper
    ActNorms see inputs that the earlier ones have not already normalised."""
    torch.manual_seed(MODEL_SEED)
    model = Glow((2, 8, 8), levels=2, depth=2, hidden=8)
    gen = torch.Generator().manual_seed(MODEL_SEED + 1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def rank_batch(rank: int) -> torch.Tensor:
    """Rank ``rank``'s batch: its own draw, mean and scale, so that no rank's statistics are the
    union's."""
    gen = torch.Generator().manual_seed(10 + rank)
    ramp = torch.linspace(-1, 1, 8).view(1, 1, 1, 8)
    return (1.5 * rank - 0.5) + (1 + rank) * torch.randn(BATCH, 2, 8, 8, generator=gen) + ramp


def actnorm_parameter_names(model: nn.Module) -> list[str]:
    return [
        f"{name}.{p}"
        for name, m in model.named_modules()
        if isinstance(m, ActNorm)
        for p in ("bias", "log_scale")
    ]


class NegativeLogLikelihood(nn.Module):
    """``-flow.log_prob(x).mean()`` as a module's ``forward``, for DDP to wrap.

    DDP only synchronises the gradients of a backward that starts from the output of ITS
    forward: ``DistributedDataParallel.forward`` prepares the reducer (and broadcasts the
    buffers) before it calls the wrapped module's ``forward``. Glow's own ``forward`` returns
    ``(z, logdet)`` without the priors, and ``ddp.module.log_prob(x)`` would bypass DDP's forward
    (no gradient all-reduce), so the loss is what the wrapped module's forward returns.
    """

    def __init__(self, flow: nn.Module):
        super().__init__()
        self.flow = flow

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -self.flow.log_prob(x).mean()


def _worker(rank: int, world_size: int, init_file: str, out_dir: str, mode: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        # new_group is collective: every rank creates every one-rank group, in the same order
        own_group = [dist.new_group([r]) for r in range(world_size)][rank] if mode == "local" else None
        model = make_model()
        ddp = DistributedDataParallel(NegativeLogLikelihood(model))  # before the init: see above
        x = rank_batch(rank)
        if mode == "explicit":
            assert initialize_actnorm(model, x) == 4  # all-reduced over the world
        elif mode == "local":
            assert initialize_actnorm(model, x, process_group=own_group) == 4  # this rank only
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        loss = ddp(x)  # mode "implicit": the ActNorms initialise in this training forward
        names = actnorm_parameter_names(model)
        params = dict(model.named_parameters())
        init = {name: params[name].detach().clone() for name in names}
        opt.zero_grad()
        loss.backward()
        opt.step()
        gathered = {}
        for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
            t = t.detach().contiguous()
            if t.dtype == torch.bool:  # not every backend gathers bool
                t = t.to(torch.uint8)
            parts = [torch.empty_like(t) for _ in range(world_size)]
            dist.all_gather(parts, t)
            gathered[name] = parts
        torch.save(
            {"init": init, "gathered": gathered, "loss": loss.detach()},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def run_ranks(tmp_path, mode: str) -> list[dict]:
    run_forked(_worker, (WORLD_SIZE, str(tmp_path / "init"), str(tmp_path), mode), WORLD_SIZE)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]


def single_process_reference() -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """One process, the concatenated batches: the ActNorm init, the NLL after it, and every
    parameter after one SGD step on that NLL."""
    model = make_model()
    x = torch.cat([rank_batch(r) for r in range(WORLD_SIZE)])
    assert initialize_actnorm(model, x) == 4
    params = dict(model.named_parameters())
    init = {name: params[name].detach().clone() for name in actnorm_parameter_names(model)}
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss = -model.log_prob(x).mean()
    loss.backward()
    opt.step()
    return init, loss.detach(), {name: p.detach().clone() for name, p in model.named_parameters()}


def local_actnorm_init(rank: int) -> dict[str, torch.Tensor]:
    """The ActNorm init one process gets from rank ``rank``'s batch alone."""
    model = make_model()
    initialize_actnorm(model, rank_batch(rank))
    params = dict(model.named_parameters())
    return {name: params[name].detach() for name in actnorm_parameter_names(model)}


@pytest.mark.parametrize("mode", ["explicit", "implicit"])
def test_ddp_glow_step_gives_identical_parameters_on_every_rank(tmp_path, mode):
    results = run_ranks(tmp_path, mode)
    gathered = results[0]["gathered"]
    model = make_model()
    expected_names = [n for n, _ in itertools.chain(model.named_parameters(), model.named_buffers())]
    assert list(gathered) == expected_names
    # every parameter and buffer bit-identical on the two ranks
    for name, (t0, t1) in gathered.items():
        assert torch.equal(t0, t1), f"{name} differs between the ranks"
    assert all(results[1]["gathered"][n][0].equal(t[0]) for n, t in gathered.items())
    flags = [t[0] for n, t in gathered.items() if n.endswith(".initialized")]
    assert len(flags) == 4 and all(bool(f) for f in flags)

    # the ActNorm init is that of the concatenated batches, not of either rank's own
    init_ref, loss_ref, after_ref = single_process_reference()
    for r in range(WORLD_SIZE):
        assert list(results[r]["init"]) == list(init_ref)
        for name, value in results[r]["init"].items():
            torch.testing.assert_close(value, init_ref[name], rtol=1e-5, atol=1e-5, msg=f"rank {r}: {name}")
        # and not the statistics of the rank's own batch (the first ActNorm's, in every channel:
        # the ranks' batches have means -0.5 and 1, standard deviations about 1 and 2)
        own = local_actnorm_init(r)
        for name in list(init_ref)[:2]:
            assert (own[name] - init_ref[name]).abs().min() > 0.03, (r, name)
    # the ranks' mean NLL is the union's, and the step is one process's step on the union
    torch.testing.assert_close((results[0]["loss"] + results[1]["loss"]) / 2, loss_ref, rtol=1e-5, atol=1e-5)
    for name, value in after_ref.items():
        torch.testing.assert_close(gathered[name][0], value, rtol=1e-4, atol=1e-5, msg=name)
    assert not any(torch.equal(after_ref[name], init_ref[name]) for name in init_ref)  # it moved


def test_negative_control_rank_local_init_leaves_actnorm_parameters_different(tmp_path):
    """Without the all-reduce (each rank's ActNorms see only its own batch), the ActNorm
    parameters, and only they, differ between the ranks after the step: the check of
    identical parameters above is able to fail."""
    results = run_ranks(tmp_path, "local")
    gathered = results[0]["gathered"]
    names = actnorm_parameter_names(make_model())
    differing = [name for name, (t0, t1) in gathered.items() if not torch.equal(t0, t1)]
    assert sorted(differing) == sorted(names)
    # (every other parameter got the same all-reduced gradient from the same start); each rank's
    # ActNorms were initialised from its own batch alone
    for r in range(WORLD_SIZE):
        for name, value in local_actnorm_init(r).items():
            torch.testing.assert_close(
                results[r]["init"][name], value, rtol=1e-5, atol=1e-5, msg=f"rank {r}: {name}"
            )
