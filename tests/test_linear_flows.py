"""Tests of the linear flows for vectors: LULinear, OrthogonalLinear, QRLinear and the
Householder product they share."""

from __future__ import annotations

import io

import pytest
import torch

import fastflow
from fastflow.nn.invconv import InvertibleConv1x1
from fastflow.nn.linear import LULinear, OrthogonalLinear, QRLinear, householder_matrix

pytestmark = pytest.mark.usefixtures("one_thread")

D = 5
MAKERS = {
    "lu": lambda: LULinear(D),
    "lu-nobias": lambda: LULinear(D, bias=False),
    "orthogonal": lambda: OrthogonalLinear(D),
    "orthogonal-k2": lambda: OrthogonalLinear(D, n_reflections=2),
    "qr": lambda: QRLinear(D),
    "qr-k3-nobias": lambda: QRLinear(D, n_reflections=3, bias=False),
}
DTYPES = [torch.float32, torch.float64]


def _make(name: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.nn.Module:
    # every parameter away from its initial value (biases and R's strict triangle start at 0)
    torch.manual_seed(seed)
    layer = MAKERS[name]()
    with torch.no_grad():
        for pname, p in layer.named_parameters():
            if pname in ("log_s", "log_diag"):
                p.uniform_(-0.7, 0.7)
            elif pname != "vectors":
                p.normal_(0.0, 0.5)
    return layer.to(dtype)


def _per_sample_jacobian(f, x: torch.Tensor) -> torch.Tensor:
    # rows are independent: the Jacobian of the batch sum is [D, B, D]
    J = torch.autograd.functional.jacobian(lambda v: f(v).sum(0), x, vectorize=True)
    return J.permute(1, 0, 2)


def _explicit_householder(v: torch.Tensor) -> torch.Tensor:
    q = torch.eye(v.shape[1], dtype=v.dtype)
    for vi in v:
        q = q @ (torch.eye(v.shape[1], dtype=v.dtype) - 2 * torch.outer(vi, vi) / vi.dot(vi))
    return q


@pytest.mark.parametrize("name", MAKERS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_and_logdet_matches_jacobian(name, dtype):
    layer = _make(name, dtype)
    x = torch.randn(7, D, dtype=dtype)
    z, logdet = layer(x)
    x2, logdet_inv = layer.inverse(z)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert z.dtype == dtype and logdet.shape == (7,)
    torch.testing.assert_close(x2, x, rtol=tol, atol=tol)
    torch.testing.assert_close(logdet_inv, -logdet, rtol=tol, atol=tol)
    if dtype == torch.float64:
        J = _per_sample_jacobian(lambda v: layer(v)[0], x)
        torch.testing.assert_close(logdet, torch.linalg.slogdet(J)[1], rtol=1e-10, atol=1e-10)
        Jinv = _per_sample_jacobian(lambda v: layer.inverse(v)[0], z)
        logabs_inv = torch.linalg.slogdet(Jinv)[1]
        torch.testing.assert_close(logdet_inv, logabs_inv, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_orthogonal_q_is_orthogonal_and_is_the_product_of_reflections(dtype):
    torch.manual_seed(1)
    n = 64
    layer = OrthogonalLinear(n).to(dtype)
    Q = layer.orthogonal_matrix().detach()
    eye = torch.eye(n, dtype=dtype)
    err = (Q.T @ Q - eye).abs().max().item()
    assert err <= (1e-6 if dtype == torch.float32 else 1e-13), err
    ref = _explicit_householder(layer.vectors.detach().double())
    atol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(Q.double(), ref, rtol=0, atol=atol)
    x = torch.randn(16, n, dtype=dtype)
    z, logdet = OrthogonalLinear(n, bias=False).to(dtype)(x)
    torch.testing.assert_close(z.norm(dim=1), x.norm(dim=1))
    assert (logdet == 0).all()
    # n reflections reach both determinants; a zero vector is the identity
    dets = {
        torch.linalg.det(householder_matrix(torch.randn(k, 3, dtype=torch.float64))).sign().item()
        for k in (1, 2)
    }
    assert dets == {-1.0, 1.0}
    v = torch.randn(3, 4, dtype=torch.float64)
    v[1] = 0
    torch.testing.assert_close(householder_matrix(v), _explicit_householder(v[[0, 2]]))


def test_qr_logdet_and_weight():
    layer = _make("qr")
    W = layer.weight_matrix().detach()
    sign, logabs = torch.linalg.slogdet(W)
    torch.testing.assert_close(logabs, layer.log_diag.sum().detach())
    R = layer.triangular_matrix().detach()
    assert torch.equal(R, R.triu()) and (R.diagonal() > 0).all()
    eye = torch.eye(D, dtype=torch.float64)
    torch.testing.assert_close(layer.inverse_weight_matrix().detach() @ W, eye)


def test_lulinear_is_the_plu_operator_plus_a_bias():
    layer = _make("lu", torch.float32)
    conv = InvertibleConv1x1(D)
    conv.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "bias"})
    x = torch.randn(9, D)
    z, ld = layer(x)
    z_conv, ld_conv = conv(x)
    torch.testing.assert_close(z, z_conv + layer.bias)
    torch.testing.assert_close(ld, ld_conv)
    with fastflow.backend("reference"):
        z_ref, ld_ref = layer(x)
        x_ref, _ = layer.inverse(z)
    torch.testing.assert_close(z, z_ref)
    torch.testing.assert_close(layer.inverse(z)[0], x_ref)
    torch.testing.assert_close(ld, layer.log_s.sum().expand(9))


@pytest.mark.parametrize("name", ["lu", "orthogonal", "qr"])
def test_eval_cache_matches_and_follows_parameter_updates(name):
    layer = _make(name, torch.float32)
    z = torch.randn(6, D)
    x_train, ld_train = layer.inverse(z)
    y_train, _ = layer(x_train)
    layer.eval()
    with torch.no_grad():
        x_eval, ld_eval = layer.inverse(z)
        x_again, _ = layer.inverse(z)  # served from the cache
        y_eval, _ = layer(x_eval)
    torch.testing.assert_close(x_eval, x_train)
    torch.testing.assert_close(ld_eval, ld_train)
    torch.testing.assert_close(y_eval, y_train)
    assert torch.equal(x_again, x_eval)
    with torch.no_grad():  # an optimiser-like in-place update must invalidate the cache
        for p in layer.parameters():
            p.add_(0.1)
        x_new, _ = layer.inverse(z)
        y_new, _ = layer(z)
    assert not torch.allclose(x_new, x_eval)
    layer.train()  # no cache in training mode: the fresh values
    torch.testing.assert_close(x_new, layer.inverse(z)[0])
    torch.testing.assert_close(y_new, layer(z)[0])


@pytest.mark.parametrize("name", MAKERS)
def test_state_dict_round_trip(name):
    layer = _make(name, torch.float32, seed=2)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(99)
    other = MAKERS[name]()
    other.load_state_dict(torch.load(buf))
    x = torch.randn(4, D)
    for a, b in zip(layer(x), other(x)):
        torch.testing.assert_close(a, b)
    for a, b in zip(layer.inverse(x), other.inverse(x)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["lu", "orthogonal", "qr"])
def test_compile_fullgraph_matches_eager(name):
    layer = _make(name, torch.float32, seed=3)
    x = torch.randn(5, D)
    z, ld = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    z_ref, ld_ref = layer(x)
    torch.testing.assert_close(z, z_ref)
    torch.testing.assert_close(ld, ld_ref)
    if name != "qr":  # compile time; QRLinear's inverse is the one with a compile-only branch
        return
    x2, ld2 = torch.compile(layer.inverse, fullgraph=True, backend="aot_eager")(z)
    x_ref, ld2_ref = layer.inverse(z)
    torch.testing.assert_close(x2, x_ref)
    torch.testing.assert_close(ld2, ld2_ref)


@pytest.mark.parametrize("name", MAKERS)
def test_gradients_reach_every_parameter(name):
    layer = _make(name, torch.float32, seed=4)
    x = torch.randn(8, D)
    z, logdet = layer(x)
    (z.pow(2).sum() + logdet.sum()).backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
    layer.zero_grad()
    x2, logdet_inv = layer.inverse(x)
    (x2.pow(2).sum() + logdet_inv.sum()).backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


class _Method(torch.nn.Module):
    # calls layer.<method>, so that torch.func.functional_call can substitute the parameters
    def __init__(self, layer, method):
        super().__init__()
        self.layer, self.method = layer, method

    def forward(self, x):
        return getattr(self.layer, self.method)(x)


def _gradcheck_parameters(layer, x, methods=("forward", "inverse")):
    names = ["layer." + n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())
    for method in methods:
        wrapped = _Method(layer, method)

        def f(x, *ps):
            return torch.func.functional_call(wrapped, dict(zip(names, ps)), (x,))

        assert torch.autograd.gradcheck(f, (x.requires_grad_(), *params)), method


@pytest.mark.parametrize("name", ["orthogonal-k2", "qr"])
def test_gradcheck_forward_and_inverse(name):
    layer = _make(name, seed=5)
    _gradcheck_parameters(layer, torch.randn(3, D, dtype=torch.float64))


def test_singular_weights_are_reported():
    qr = QRLinear(3)
    with torch.no_grad():
        qr.log_diag[1] = -200.0  # exp(-200) underflows float32
    qr(torch.randn(2, 3))  # the forward does not check (no host synchronisation)
    with pytest.raises(ValueError, match=r"log_diag.*\[1\]"):
        qr.inverse(torch.randn(2, 3))
    with pytest.raises(ValueError, match="singular"):
        qr.check_invertible()
    qr.eval()
    with torch.no_grad(), pytest.raises(ValueError, match="log_diag"):
        qr.inverse(torch.randn(2, 3))
    lu = LULinear(3)
    with torch.no_grad():
        lu.log_s[0] = -200.0
    with pytest.raises(ValueError, match="singular"):
        lu.inverse(torch.randn(2, 3))


def test_bad_arguments_name_the_argument():
    for cls in (LULinear, OrthogonalLinear, QRLinear):
        with pytest.raises(ValueError, match="features"):
            cls(0)
        with pytest.raises(ValueError, match="features"):
            cls(2.5)
        with pytest.raises(ValueError, match="bias"):
            cls(3, bias="yes")
        layer = cls(3)
        with pytest.raises(ValueError, match=r"x must have shape \[B, 3\]"):
            layer(torch.randn(2, 4))
        with pytest.raises(ValueError, match=r"x must have shape \[B, 3\]"):
            layer(torch.randn(2, 3, 1, 1))
        with pytest.raises(ValueError, match=r"z must have shape \[B, 3\]"):
            layer.inverse(torch.randn(3))
        with pytest.raises(ValueError, match="x must have the layer's dtype"):
            layer(torch.randn(2, 3, dtype=torch.float64))
    for cls in (OrthogonalLinear, QRLinear):
        with pytest.raises(ValueError, match="n_reflections"):
            cls(3, n_reflections=0)
    with pytest.raises(ValueError, match="weight"):
        LULinear(3, weight=torch.eye(2))
    with pytest.raises(ValueError, match="vectors"):
        householder_matrix(torch.randn(3))
