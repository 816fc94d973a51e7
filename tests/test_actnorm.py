"""Tests of ActNorm (fastflow.nn.actnorm): the transform and its data-dependent initialisation.

The transform: inverse(forward(x)) == x; the log-det equals log|det| of the brute-force Jacobian
(float64), for vectors and images; float32 log-det for half inputs. The initialisation
(DESIGN.md, "Data-dependent initialisation"): zero mean / unit std per channel on the init batch;
the flag survives a state-dict round trip (a loaded layer does not re-initialise); no
data-dependent branch after init (torch.compile fullgraph); all-reduced statistics under
torch.distributed (two gloo processes, different batches, identical parameters); a clear error
before init; bad input raises an error naming the argument.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from fastflow import Compose, Flow
from fastflow.nn import ActNorm, AffineCoupling, initialize_actnorm

from _distributed import run_forked


pytestmark = pytest.mark.usefixtures("one_thread")


def randomized(c: int, logscale_factor: float = 1.0, seed: int = 0, dtype=torch.float64) -> ActNorm:
    """An initialised ActNorm with random (non-trivial) parameters."""
    gen = torch.Generator().manual_seed(seed)
    layer = ActNorm(c, logscale_factor=logscale_factor, data_init=False).to(dtype)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(c, generator=gen, dtype=dtype))
        layer.log_scale.copy_(0.5 * torch.randn(c, generator=gen, dtype=dtype))
    return layer


def brute_force_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    """log|det d fn(x_i)/d x_i| per sample, from the full float64 Jacobian."""
    out = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        jac = torch.autograd.functional.jacobian(lambda v: fn(v.reshape(xi.shape)).reshape(-1), xi.reshape(-1))
        out.append(torch.linalg.slogdet(jac).logabsdet)
    return torch.stack(out)


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.transpose(0, 1).reshape(x.shape[1], -1).double()
    return xf.mean(1), xf.std(1, unbiased=False)


# --------------------------------------------------------------------------------------------
# The transform


@pytest.mark.parametrize("shape", [(3, 5), (3, 2, 3, 4), (2, 3, 5)], ids=["vector", "image", "sequence"])
@pytest.mark.parametrize("logscale_factor", [1.0, 3.0])
def test_logdet_matches_jacobian_and_round_trip(shape, logscale_factor):
    c = shape[1]
    layer = randomized(c, logscale_factor)
    x = torch.randn(shape, dtype=torch.float64)
    y, logdet = layer(x)
    assert y.shape == x.shape and logdet.shape == (shape[0],) and logdet.dtype == torch.float64
    expected = brute_force_logdet(lambda v: layer(v)[0], x)
    torch.testing.assert_close(logdet, expected)
    x2, logdet_inv = layer.inverse(y)
    torch.testing.assert_close(x2, x)
    torch.testing.assert_close(logdet_inv, -logdet)
    # the documented map itself, with L = logscale_factor * log_scale
    view = (1, c) + (1,) * (len(shape) - 2)
    L = logscale_factor * layer.log_scale.detach()
    torch.testing.assert_close(y, (x + layer.bias.detach().view(view)) * L.exp().view(view))
    torch.testing.assert_close(layer.effective_log_scale.detach(), L)


def test_half_input_gives_float32_logdet_and_half_output():
    layer = randomized(4, dtype=torch.float32)
    x = torch.randn(3, 4, 2, 2).half()
    y, logdet = layer(x)
    assert y.dtype == torch.float16 and logdet.dtype == torch.float32
    torch.testing.assert_close(logdet, layer(x.float())[1])
    x2, logdet_inv = layer.inverse(y)
    assert x2.dtype == torch.float16 and logdet_inv.dtype == torch.float32


def test_channels_last_keeps_memory_format():
    layer = randomized(3, dtype=torch.float32)
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    y, _ = layer(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, layer(x.contiguous())[0])


def test_gradients_reach_both_parameters():
    layer = randomized(3, logscale_factor=3.0, dtype=torch.float32)
    y, logdet = layer(torch.randn(4, 3, 2, 2))
    (y.square().sum() + logdet.sum()).backward()
    assert layer.bias.grad is not None and layer.bias.grad.abs().sum() > 0
    assert layer.log_scale.grad is not None and layer.log_scale.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# Data-dependent initialisation


@pytest.mark.parametrize("shape", [(64, 3), (16, 3, 4, 4)], ids=["vector", "image"])
@pytest.mark.parametrize("logscale_factor", [1.0, 3.0])
def test_first_training_forward_normalises_the_batch(shape, logscale_factor):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = x * torch.tensor([0.5, 2.0, 7.0], dtype=torch.float64).view(1, 3, *([1] * (len(shape) - 2))) + 3.0
    layer = ActNorm(3, logscale_factor=logscale_factor).double()
    assert not bool(layer.initialized)
    y, logdet = layer(x)
    assert bool(layer.initialized)
    mean, std = channel_stats(y)
    torch.testing.assert_close(mean, torch.zeros(3, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(std, torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0)
    x_mean, x_std = channel_stats(x)
    torch.testing.assert_close(layer.bias.detach(), -x_mean)
    torch.testing.assert_close(layer.effective_log_scale.detach(), -torch.log(x_std + 1e-6))
    spatial = math.prod(shape[2:])
    torch.testing.assert_close(logdet, (-torch.log(x_std + 1e-6)).sum().expand(shape[0]) * spatial)
    # initialised once: the next batch goes through the fixed parameters
    bias = layer.bias.detach().clone()
    layer(x + 10)
    torch.testing.assert_close(layer.bias.detach(), bias)


def test_explicit_initialize_and_eval_mode():
    x = 2 + 3 * torch.randn(32, 4, 3, 3)
    layer = ActNorm(4).eval()
    with pytest.raises(RuntimeError, match="not initialised"):
        layer(x)  # eval mode never initialises implicitly
    with pytest.raises(RuntimeError, match="initialize"):
        layer.inverse(x)
    layer.initialize(x)
    assert bool(layer.initialized)
    mean, std = channel_stats(layer(x)[0])
    assert mean.abs().max() < 1e-5 and (std - 1).abs().max() < 1e-4
    x2, _ = layer.inverse(layer(x)[0])
    torch.testing.assert_close(x2, x, atol=1e-5, rtol=1e-5)


def test_data_init_false_starts_as_identity():
    layer = ActNorm(2, data_init=False)
    x = torch.randn(4, 2)
    y, logdet = layer(x)
    assert bool(layer.initialized)
    torch.testing.assert_close(y, x)
    torch.testing.assert_close(logdet, torch.zeros(4))


def test_initialize_actnorm_initialises_every_layer_in_order():
    torch.manual_seed(0)
    model = Compose(ActNorm(4), AffineCoupling(4, hidden=8), ActNorm(4))
    with torch.no_grad():  # a non-identity coupling, so the second ActNorm sees new statistics
        for p in model[1].parameters():
            p.normal_(0, 0.3)
    model.eval()
    x = 1 + 4 * torch.randn(128, 4)
    assert initialize_actnorm(model, x) == 2
    assert not model.training  # the mode is left alone
    assert bool(model[0].initialized) and bool(model[2].initialized)
    h, _ = model[0](x)
    h, _ = model[1](h)
    mean, std = channel_stats(model[2](h)[0])
    assert mean.abs().max() < 1e-5 and (std - 1).abs().max() < 1e-4
    assert initialize_actnorm(model, x) == 0  # nothing left to initialise
    bias = model[0].bias.detach().clone()
    assert initialize_actnorm(model, x + 5, force=True) == 2
    torch.testing.assert_close(model[0].bias.detach(), bias - 5, atol=1e-4, rtol=0)


def test_initialize_actnorm_through_flow_then_sample():
    flow = Flow([ActNorm(2), AffineCoupling(2, hidden=8), ActNorm(2)], event_shape=2)
    with pytest.raises(RuntimeError, match="not initialised"):
        flow.sample(3)
    initialize_actnorm(flow, torch.randn(64, 2) * 3)
    assert flow.sample(5).shape == (5, 2)
    assert flow.log_prob(torch.randn(7, 2)).shape == (7,)


def test_initialize_actnorm_reports_layers_not_reached():
    class SkipsSecond(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = ActNorm(3), ActNorm(3)

        def forward(self, x):
            return self.a(x)

    model = SkipsSecond()
    with pytest.raises(RuntimeError, match="did not reach 1 ActNorm layer.*'b'"):
        initialize_actnorm(model, torch.randn(8, 3))
    assert bool(model.a.initialized) and not bool(model.b.initialized)
    assert not model.b._init_on_next_forward


def test_state_dict_round_trip_keeps_flag_and_parameters():
    x = 3 + 2 * torch.randn(16, 3, 4, 4)
    layer = ActNorm(3, logscale_factor=3.0)
    layer(x)
    state = layer.state_dict()
    assert set(state) == {"bias", "log_scale", "initialized"}
    assert bool(state["initialized"])

    fresh = ActNorm(3, logscale_factor=3.0)  # training mode, not initialised
    fresh.load_state_dict(state)
    assert bool(fresh.initialized)
    other = torch.randn(16, 3, 4, 4)  # different statistics: would change the parameters
    y, logdet = fresh(other)
    torch.testing.assert_close(fresh.bias, layer.bias)
    torch.testing.assert_close(fresh.log_scale, layer.log_scale)
    torch.testing.assert_close((y, logdet), layer(other))
    fresh.eval()
    torch.testing.assert_close(fresh.inverse(y)[0], other, atol=1e-5, rtol=1e-5)

    # inside a model too, and loading an uninitialised state un-initialises
    model = nn.Sequential(ActNorm(3))
    model.load_state_dict(nn.Sequential(layer).state_dict())
    assert model[0]._initialized
    model.load_state_dict(nn.Sequential(ActNorm(3)).state_dict())
    assert not model[0]._initialized and not bool(model[0].initialized)


def test_compile_fullgraph_after_init_matches_eager():
    layer = ActNorm(3)
    x = 1 + 2 * torch.randn(8, 3, 4, 4)
    layer(x)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y, logdet = compiled(x * 0.5)
    torch.testing.assert_close((y, logdet), layer(x * 0.5))
    assert bool(layer.initialized)


def test_compile_before_init_initialises_eagerly_then_recompiles():
    layer = ActNorm(3)
    compiled = torch.compile(layer, backend="aot_eager")  # no fullgraph: initialize() runs eagerly
    x = 1 + 2 * torch.randn(8, 3, 4, 4)
    y, _ = compiled(x)
    assert bool(layer.initialized)
    mean, std = channel_stats(y)
    assert mean.abs().max() < 1e-5 and (std - 1).abs().max() < 1e-4
    bias = layer.bias.detach().clone()
    torch.testing.assert_close(compiled(x + 3), layer(x + 3))  # no second initialisation
    torch.testing.assert_close(layer.bias.detach(), bias)


# --------------------------------------------------------------------------------------------
# Distributed initialisation: two gloo processes, each with its own batch


def _distributed_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        gen = torch.Generator().manual_seed(100 + rank)
        # different sizes and distributions per rank
        image = (rank * 3.0 + (1 + rank) * torch.randn(4 + 3 * rank, 3, 4, 4, generator=gen)).double()
        vector = (rank - 2.0 + (2 + rank) * torch.randn(5 + rank, 6, generator=gen)).double()
        a = ActNorm(3).double()
        a(image)  # implicit: first forward in training mode
        b = ActNorm(6, logscale_factor=3.0).double().eval()
        initialize_actnorm(b, vector)  # explicit helper
        torch.save(
            {"image": image, "vector": vector, "a": a.state_dict(), "b": b.state_dict()},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_distributed_init_all_reduces_statistics(tmp_path):
    world_size = 2
    run_forked(_distributed_worker, (world_size, str(tmp_path / "init"), str(tmp_path)), world_size)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    for key, name in (("a", "image"), ("b", "vector")):
        states = [r[key] for r in results]
        for k in ("bias", "log_scale", "initialized"):
            assert torch.equal(states[0][k], states[1][k]), (key, k)
        assert bool(states[0]["initialized"])
        # equal to the statistics of the concatenated batch
        mean, std = channel_stats(torch.cat([r[name] for r in results]))
        factor = 3.0 if key == "b" else 1.0
        torch.testing.assert_close(states[0]["bias"], -mean)
        torch.testing.assert_close(states[0]["log_scale"] * factor, -torch.log(std + 1e-6))
        # and not those of either rank's own batch
        own_mean, _ = channel_stats(results[0][name])
        assert not torch.allclose(states[0]["bias"], -own_mean)


# --------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_features": 0}, "num_features"),
        ({"num_features": 2.5}, "num_features"),
        ({"num_features": 3, "logscale_factor": 0.0}, "logscale_factor"),
        ({"num_features": 3, "eps": -1.0}, "eps"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ActNorm(**kwargs)


def test_bad_inputs_name_the_argument():
    layer = ActNorm(3)
    with pytest.raises(ValueError, match=r"x must have shape \[batch, 3\]"):
        layer(torch.randn(4, 2, 5, 5))
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(4))
    with pytest.raises(ValueError, match="x must be a floating-point"):
        layer(torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2 values per channel"):
        layer(torch.randn(1, 3))
    with pytest.raises(ValueError, match="non-finite"):
        layer(torch.tensor([[1.0, 2.0, math.nan], [0.0, 1.0, 2.0]]))
    assert not bool(layer.initialized)  # failed initialisations leave the layer untouched
    layer.initialize(torch.randn(8, 3))
    with pytest.raises(ValueError, match=r"z must have shape \[batch, 3\]"):
        layer.inverse(torch.randn(4, 5))
