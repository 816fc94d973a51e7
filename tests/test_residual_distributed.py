"""A Residual Flow trained with DistributedDataParallel: two gloo processes on the CPU.

Each rank builds the same :class:`~fastflow.models.ResidualFlow` (same seed), wraps it in
``DistributedDataParallel``, initialises the ActNorms on the first training forward (the
statistics are all-reduced) and takes ``STEPS`` SGD steps on the NLL of its OWN batch. After every
step, every parameter and buffer is gathered from both ranks (``all_gather``) and checked
bit-identical: the parameters, the ActNorm state, and the spectral-norm ``u``/``v`` buffers.

Why the buffers agree: in training mode each spectral-norm forward runs ``n_power_iter`` power
iterations from the stored ``u``, ``v`` on the current weight and stores the result. The weights
are identical on the ranks after DDP's all-reduced step, and the power iteration depends on the
weight and the previous ``u``, ``v`` only (not on the data), so the buffers stay identical, with
DDP's buffer broadcast (``broadcast_buffers=True``, the default: rank 0's buffers overwrite the
others' before each forward) and without it (``broadcast_buffers=False``: each rank evolves its own
buffers). Both settings give bit-identical ranks and the same values (checked below): here the
broadcast only costs a collective per forward.

Randomness: the default estimator is the Russian roulette, which draws a random number of terms
``N`` and Hutchinson probes from torch's global generator. With ``estimator="exact"`` (``D = 2``,
the brute-force Jacobian) the run is deterministic, so the DDP run must equal one process's run on
the concatenation of the two batches (DDP averages the gradients of equal-sized batches, which is
the gradient of the mean over their union), up to the reduction order. With the roulette both ranks
are seeded identically before every step, so they draw the same ``N`` (and the same probes, though
on different data); a single process on the concatenated batch draws probes of another shape, so
only the rank identity is checked for it.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastflow.models import ResidualFlow
from fastflow.nn import ActNorm, SpectralNormLinear

from _distributed import run_forked

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # torch >= 2.13 renames broadcast_buffers (forward_sync_buffers); the old name is still the
    # one that also skips the sync at construction, which the negative control relies on
    pytest.mark.filterwarnings("ignore:`broadcast_buffers` is deprecated:FutureWarning"),
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()),
        reason="torch.distributed with gloo not built",
    ),
]

WORLD_SIZE = 2
BATCH = 8  # per rank, equal sizes
DIM = 2
STEPS = 3
MODEL_SEED = 0
LR = 0.05


def make_model(estimator: str) -> ResidualFlow:
    torch.manual_seed(MODEL_SEED)
    return ResidualFlow(DIM, n_blocks=2, hidden=8, n_hidden=1, estimator=estimator, n_power_iter=2)


def rank_batch(rank: int) -> torch.Tensor:
    """Rank ``rank``'s own data: its own draw, mean and scale."""
    gen = torch.Generator().manual_seed(10 + rank)
    return (1.5 * rank - 0.5) + (1 + rank) * torch.randn(BATCH, DIM, generator=gen)


class NegativeLogLikelihood(nn.Module):
    """``-flow.log_prob(x).mean()`` as a module's forward, for DDP to wrap (DDP synchronises the
    gradients of a backward that starts from the output of its own forward)."""

    def __init__(self, flow: nn.Module):
        super().__init__()
        self.flow = flow

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -self.flow.log_prob(x).mean()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in itertools.chain(model.named_parameters(), model.named_buffers())}


def _worker(rank, world_size, init_file, out_dir, estimator, broadcast_buffers, perturb=False) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = make_model(estimator)
        ddp = DistributedDataParallel(NegativeLogLikelihood(model), broadcast_buffers=broadcast_buffers)
        if perturb and rank == 1:
            # after the wrap (DDP broadcasts rank 0's state at construction): rank 1's power
            # iteration starts elsewhere
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, SpectralNormLinear):
                        m.u.copy_(torch.nn.functional.normalize(m.u + 0.5, dim=0))
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        x = rank_batch(rank)
        steps = []
        for step in range(STEPS):
            torch.manual_seed(100 + step)  # the same roulette draw of N on every rank
            loss = ddp(x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            gathered = {}
            for name, t in _state(model).items():
                t = t.contiguous()
                if t.dtype == torch.bool:  # not every backend gathers bool
                    t = t.to(torch.uint8)
                parts = [torch.empty_like(t) for _ in range(world_size)]
                dist.all_gather(parts, t)
                gathered[name] = parts
            steps.append({"gathered": gathered, "loss": loss.detach()})
        torch.save(steps, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(tmp_path, estimator: str, broadcast_buffers: bool, perturb: bool = False) -> list[list[dict]]:
    run_forked(
        _worker,
        (WORLD_SIZE, str(tmp_path / "init"), str(tmp_path), estimator, broadcast_buffers, perturb),
        WORLD_SIZE,
    )
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]


def single_process_run(estimator: str) -> list[dict]:
    """One process, the concatenated batches, the same steps."""
    model = make_model(estimator)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x = torch.cat([rank_batch(r) for r in range(WORLD_SIZE)])
    steps = []
    for step in range(STEPS):
        torch.manual_seed(100 + step)
        loss = -model.log_prob(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps.append({"state": _state(model), "loss": loss.detach()})
    return steps


def spectral_buffer_names(model: nn.Module) -> list[str]:
    return [f"{n}.{b}" for n, m in model.named_modules() if isinstance(m, SpectralNormLinear) for b in ("u", "v")]


def check_ranks_identical(results: list[list[dict]], estimator: str) -> None:
    model = make_model(estimator)
    names = list(_state(model))
    sn = spectral_buffer_names(model)
    assert len(sn) == 2 * 2 * 2  # 2 blocks x 2 spectral-norm layers x (u, v)
    assert sum(isinstance(m, ActNorm) for m in model.modules()) == 2
    previous = _state(model)
    for step in range(STEPS):
        gathered = results[0][step]["gathered"]
        assert list(gathered) == names
        for name, (t0, t1) in gathered.items():
            assert torch.equal(t0, t1), f"step {step}: {name} differs between the ranks"
        # each rank's own view of the gather agrees
        assert all(results[1][step]["gathered"][n][0].equal(t[0]) for n, t in gathered.items())
        flags = [t[0] for n, t in gathered.items() if n.endswith(".initialized")]
        assert len(flags) == 2 and all(bool(f) for f in flags)
        # the buffers moved (the power iteration ran), so the identity is not trivial
        current = {n: t[0] for n, t in gathered.items()}
        assert any(not torch.equal(current[n], previous[n]) for n in sn), f"step {step}: u, v never updated"
        previous = current


@pytest.mark.parametrize("broadcast_buffers", [True, False], ids=["broadcast", "no_broadcast"])
def test_ddp_residual_flow_exact_matches_single_process(tmp_path, broadcast_buffers):
    results = run_ranks(tmp_path, "exact", broadcast_buffers)
    check_ranks_identical(results, "exact")
    reference = single_process_run("exact")
    for step in range(STEPS):
        gathered = results[0][step]["gathered"]
        ref = reference[step]
        # the ranks' mean NLL is the union's; every parameter and buffer is the union's run's
        mean_loss = (results[0][step]["loss"] + results[1][step]["loss"]) / 2
        torch.testing.assert_close(mean_loss, ref["loss"], rtol=1e-5, atol=1e-5)
        for name, value in ref["state"].items():
            got = gathered[name][0]
            if got.dtype == torch.uint8:
                got = got.bool()
            torch.testing.assert_close(got, value, rtol=1e-4, atol=1e-5, msg=f"step {step}: {name}")


def test_ddp_residual_flow_roulette_ranks_identical(tmp_path):
    """The default roulette estimator, no buffer broadcast: ranks seeded identically stay
    bit-identical (parameters, ActNorm state, spectral-norm u/v) after every step."""
    results = run_ranks(tmp_path, "roulette", False)
    check_ranks_identical(results, "roulette")
    for step in range(STEPS):
        assert torch.isfinite(results[0][step]["loss"]) and torch.isfinite(results[1][step]["loss"])


def test_broadcast_setting_does_not_change_the_run(tmp_path):
    """broadcast_buffers=True and False give bit-identical states after every step."""
    (tmp_path / "on").mkdir()
    (tmp_path / "off").mkdir()
    on = run_ranks(tmp_path / "on", "exact", True)
    off = run_ranks(tmp_path / "off", "exact", False)
    for step in range(STEPS):
        for name, parts in on[0][step]["gathered"].items():
            assert torch.equal(parts[0], off[0][step]["gathered"][name][0]), f"step {step}: {name}"


@pytest.mark.parametrize("broadcast_buffers", [True, False], ids=["broadcast", "no_broadcast"])
def test_negative_control_diverged_power_iteration_state(tmp_path, broadcast_buffers):
    """Rank 1's ``u`` moved after the wrap: with the buffer broadcast, rank 0's buffers overwrite
    it before every forward and the ranks stay bit-identical; without it, exactly the
    spectral-norm ``u``/``v`` buffers differ between the ranks after every step (the power
    iteration pulls them together but not bitwise; the weights stay identical because the
    normalisation ``W / max(1, sigma / coeff)`` leaves them alone while ``sigma < coeff``), so the
    identity check is able to fail, and ``broadcast_buffers=True`` would hide such a divergence."""
    results = run_ranks(tmp_path, "exact", broadcast_buffers, perturb=True)
    sn = spectral_buffer_names(make_model("exact"))
    for step in range(STEPS):
        gathered = results[0][step]["gathered"]
        differing = [name for name, (t0, t1) in gathered.items() if not torch.equal(t0, t1)]
        assert sorted(differing) == ([] if broadcast_buffers else sorted(sn)), (step, differing)
