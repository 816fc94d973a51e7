"""Mixed precision: Real NVP, Glow and Residual Flow under ``torch.autocast("cpu", bfloat16)``.

DESIGN.md: "The log-det is float32 or wider even when activations are half/bf16". Under autocast
the parameters and the data stay float32; the matrix products (linear layers, convolutions) run
in bf16. Checked, per model:

* ``forward`` returns a float32 latent and a float32 log-det; ``log_prob`` is float32;
* the log-det and ``log_prob`` stay within a stated tolerance of the float32 run (the same model,
  same input, autocast off). Tolerance: ``|logdet_bf16 - logdet_fp32| <= 0.02 + 0.01 |logdet|``
  and ``|log_prob_bf16 - log_prob_fp32| <= 0.05 + 0.01 |log_prob|``. Measured on these models
  (seeded): log-det errors of 0.004 (Real NVP, |logdet| <= 0.7), 0.003 (Glow, |logdet| <= 17),
  0.0007 (Residual Flow, exact log-det); log_prob errors of 0.004 (Real NVP, |log p| <= 11),
  0.4 (Glow, |log p| <= 243: 0.17 %, from the bf16 convolutions of its split priors), 0.005
  (Residual Flow). bf16 has 8 significant bits (relative rounding 2^-9 = 0.2 %);
* a training step (autocast forward, float32 backward, SGD) gives finite float32 gradients, a
  float32 loss within the tolerance above of the float32 loss, and gradients close to float32's.

The coupling layers compute the coupling itself (scale, shift and its log-det) in the data's
dtype when the conditioner's output comes back in bf16, and the 1x1 convolution's native
operator keeps its input's dtype under autocast.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import fastflow
from fastflow import models
from fastflow.nn import AffineCoupling, InvertibleConv1x1, initialize_actnorm
from fastflow.ops import invconv_plu

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # the native kernels do not take bf16 on the CPU: "auto" falls back to the reference and warns
    pytest.mark.filterwarnings("ignore:fastflow.*uses the pure-PyTorch reference:RuntimeWarning"),
]

BF16 = torch.bfloat16
LD_ATOL, LD_RTOL = 0.02, 0.01
LP_ATOL, LP_RTOL = 0.05, 0.01


def _perturb(model: torch.nn.Module) -> None:
    """Zero-initialised layers (the couplings' last layers, the priors) get small seeded noise,
    so that every layer acts."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


def make(name: str):
    torch.manual_seed(0)
    if name == "realnvp":
        model, x = models.RealNVP(4, n_couplings=4, hidden=16, n_hidden_layers=1), torch.randn(32, 4)
    elif name == "realnvp_image":
        model, x = models.RealNVPImage((2, 4, 4), n_couplings=2, hidden=8, n_hidden_layers=1), torch.randn(8, 2, 4, 4)
    elif name == "glow":
        model = models.Glow((2, 8, 8), levels=2, depth=2, hidden=8, n_hidden_layers=1)
        x = torch.randn(16, 2, 8, 8)
    elif name.startswith("residual"):
        estimator = name.split("_")[1]
        model = models.ResidualFlow(4, n_blocks=2, hidden=16, n_hidden=1, estimator=estimator)
        x = torch.randn(32, 4)
    else:
        raise AssertionError(name)
    _perturb(model)
    initialize_actnorm(model, x)
    return model, x


def _close(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float, what: str) -> None:
    err = (got.double() - want.double()).abs()
    bound = atol + rtol * want.double().abs()
    assert bool((err <= bound).all()), f"{what}: max error {err.max().item():.3g} (bound {bound.min().item():.3g}..)"


EXACT_MODELS = ["realnvp", "realnvp_image", "glow", "residual_exact"]


@pytest.mark.parametrize("name", EXACT_MODELS)
def test_autocast_forward_log_det_is_float32_and_close(name):
    model, x = make(name)
    model.eval()  # deterministic estimators, no power iteration between the runs
    with torch.no_grad():
        z32, ld32 = model(x)
        lp32 = model.log_prob(x)
        with torch.autocast("cpu", dtype=BF16):
            z16, ld16 = model(x)
            lp16 = model.log_prob(x)
    assert ld16.dtype == torch.float32 and lp16.dtype == torch.float32
    assert z16.dtype == torch.float32 and z16.shape == x.shape
    assert torch.isfinite(ld16).all() and torch.isfinite(lp16).all()
    _close(ld16, ld32, LD_ATOL, LD_RTOL, "log-det")
    _close(lp16, lp32, LP_ATOL, LP_RTOL, "log_prob")
    # the bf16 run is really a different computation (autocast is on), so the check can fail
    assert not torch.equal(lp16, lp32)


def _train_step(model, x, autocast: bool):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        loss = -model.log_prob(x).mean()
    opt.zero_grad()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    return loss.detach(), grads


@pytest.mark.parametrize(
    "name",
    EXACT_MODELS
    + [
        "residual_series",
        "residual_roulette",
    ],
)
def test_autocast_training_step(name):
    model, x = make(name)
    ref_model, _ = make(name)
    model.train()
    ref_model.train()
    loss16, grads16 = _train_step(model, x, autocast=True)
    loss32, grads32 = _train_step(ref_model, x, autocast=False)
    assert loss16.dtype == torch.float32
    assert torch.isfinite(loss16)
    _close(loss16, loss32, LP_ATOL, LP_RTOL, "loss")
    assert grads16.keys() == grads32.keys() and grads16
    for n, g in grads16.items():
        assert g.dtype == torch.float32, n
        assert torch.isfinite(g).all(), n
    # the gradient as a whole points the same way as float32's (bf16 products)
    flat16 = torch.cat([g.flatten() for g in grads16.values()])
    flat32 = torch.cat([g.flatten() for g in grads32.values()])
    cos = torch.nn.functional.cosine_similarity(flat16.double(), flat32.double(), dim=0)
    assert cos > 0.99, cos
    for p in model.parameters():
        assert p.dtype == torch.float32 and torch.isfinite(p).all()


def test_invconv_operator_keeps_input_dtype_under_autocast():
    """The native 1x1-convolution operator returns its input's dtype with autocast on (its GEMM
    is not recast), forward and backward; equal to the autocast-off result."""
    torch.manual_seed(0)
    layer = InvertibleConv1x1(4)
    x = torch.randn(3, 4, 2, 2, requires_grad=True)
    y32, ld32 = layer(x)
    with torch.autocast("cpu", dtype=BF16):
        y, ld = layer(x)
        y_op, _ = invconv_plu(x, *layer._factors())
    assert y.dtype == torch.float32 and ld.dtype == torch.float32 and y_op.dtype == torch.float32
    torch.testing.assert_close(y, y32)
    torch.testing.assert_close(ld, ld32)
    # a bf16 consumer downstream (a convolution under autocast): the gradient flows back
    conv = torch.nn.Conv2d(4, 4, 1)
    with torch.autocast("cpu", dtype=BF16):
        y, ld = layer(x)
        out = conv(y)
    assert out.dtype == BF16
    (out.float().sum() + ld.sum()).backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize("activation", ["exp", "sigmoid", "additive"])
def test_coupling_computes_in_data_dtype_under_autocast(activation):
    torch.manual_seed(0)
    if activation == "additive":
        from fastflow.nn import AdditiveCoupling

        layer = AdditiveCoupling(6, hidden=8, n_hidden_layers=1)
    else:
        layer = AffineCoupling(6, hidden=8, n_hidden_layers=1, activation=activation)
    _perturb(layer)
    x = torch.randn(5, 6)
    y32, ld32 = layer(x)
    with torch.autocast("cpu", dtype=BF16):
        y, ld = layer(x)
        x_back, ld_inv = layer.inverse(y)
    assert y.dtype == ld.dtype == x_back.dtype == ld_inv.dtype == torch.float32
    _close(ld, ld32, LD_ATOL, LD_RTOL, "log-det")
    torch.testing.assert_close(y, y32, atol=0.05, rtol=0.02)
    # forward and inverse under the same autocast use the same bf16 conditioner: exact inverse
    torch.testing.assert_close(x_back, x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ld_inv, -ld, atol=1e-5, rtol=1e-5)


def test_native_backend_used_for_float32_data_under_autocast():
    """Under autocast the data stays float32, so the native kernels (float32/float64 on the CPU)
    still run; no fallback warning for the 1x1 convolution."""
    if not fastflow.native_available():
        pytest.skip("fastflow._C is not built")
    torch.manual_seed(0)
    layer = InvertibleConv1x1(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast("cpu", dtype=BF16), fastflow.backend("native"):
            y, ld = layer(torch.randn(2, 3, 2, 2))
    assert y.dtype == torch.float32
