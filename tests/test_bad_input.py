"""Bad input sweep (hypothesis): every operator and layer, over batch sizes (the empty batch
included), dtypes, memory layouts and values (NaN, +-inf, huge magnitudes).

The rule (DESIGN.md, "Bad input"), per call:

* it returns, and every row whose input is finite and of moderate size has a finite result equal
  to the reference computed on the good rows ALONE (so a bad row cannot leak into the others, and
  the native kernel agrees with the pure-PyTorch reference); the bad rows may be non-finite (NaN
  propagates within its row); a row of huge but finite values that gives a finite result must
  give the reference's result; or
* it raises ``ValueError``/``RuntimeError`` whose message names the argument at fault;
* never a crash of the process, a hang, or another exception type.

Operators whose inputs are not rows of a batch (the spectral-norm pair, on a weight matrix)
follow the same rule for the whole result: a finite weight gives the reference's result, a
non-finite one gives a non-finite result or raises.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastflow
from fastflow import nn as fnn
from fastflow import ops

from _devices import DEVICES

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # fallbacks, convergence warnings
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

SETTINGS = settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
HUGE = 1e30
BAD_VALUES = ["none", "nan", "inf", "-inf", "huge"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64]
LAYOUTS = ["contiguous", "strided", "transposed"]


def _names_argument(message: str, names: tuple[str, ...]) -> bool:
    return any(re.search(rf"(?<![A-Za-z_]){re.escape(n)}(?![A-Za-z_])", message) for n in names)


def call(fn, names: tuple[str, ...]):
    """``fn()``'s result, or None if it raised a ValueError/RuntimeError naming an argument."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn()
    except (ValueError, RuntimeError) as e:
        assert _names_argument(str(e), names), (
            f"{type(e).__name__} does not name an argument {names}: {e}"
        )
        return None


def make_input(shape, dtype, layout, bad, bad_row, device, seed=0):
    """A ``shape`` tensor of ``dtype`` in ``layout``, with value ``bad`` in row ``bad_row``."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen, dtype=torch.float64)
    if shape[0] > 0 and bad != "none":
        value = {"nan": float("nan"), "inf": float("inf"), "-inf": -float("inf"), "huge": HUGE}[bad]
        base[bad_row % shape[0]].view(-1)[0] = value
    x = base.to(dtype) if dtype.is_floating_point else (base * 3).to(dtype)
    if layout == "strided":  # every other element of a wider buffer along the last dimension
        wide = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=dtype)
        wide[..., ::2] = x
        x = wide[..., ::2]
    elif layout == "transposed":  # batch dimension last in memory (channels-last for images)
        if len(shape) == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        else:
            x = x.t().contiguous().t()
    return x.to(device)


def bad_rows(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(x.shape[0], -1).double() if x.shape[0] else x.new_zeros(0, 1).double()
    return ~torch.isfinite(flat).all(dim=1) | (flat.abs() > 1e4).any(dim=1)


def huge_rows(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(x.shape[0], -1).double() if x.shape[0] else x.new_zeros(0, 1).double()
    return torch.isfinite(flat).all(dim=1) & (flat.abs() > 1e4).any(dim=1)


def _tol(dtype):
    return {torch.float64: 1e-7, torch.float32: 2e-4}.get(dtype, 3e-2)


def check_rowwise(fn, ref, x, names, n_out=None):
    """``fn(x)`` against ``ref`` on the good rows alone (outputs: tuples of batch-first tensors,
    the first ``n_out`` compared)."""
    out = call(lambda: fn(x), names)
    if out is None:
        return
    out = out if isinstance(out, tuple) else (out,)
    out = out[:n_out] if n_out else out
    for o in out:
        assert o.shape[0] == x.shape[0], "a result lost the batch dimension"
    bad, huge = bad_rows(x), huge_rows(x)
    good = ~bad
    if good.any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = ref(x[good.to(x.device)])
        expected = expected if isinstance(expected, tuple) else (expected,)
        for k, (o, e) in enumerate(zip(out, expected)):
            og = o[good.to(o.device)]
            assert torch.isfinite(og).all(), f"output {k}: a good row is not finite (a bad row leaked?)"
            tol = _tol(o.dtype)
            torch.testing.assert_close(og.double(), e.double(), rtol=tol, atol=tol, msg=f"output {k}")
    if huge.any():
        idx = huge.nonzero().flatten()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                expected = ref(x[idx.to(x.device)])
            except (ValueError, RuntimeError):
                return
        expected = expected if isinstance(expected, tuple) else (expected,)
        for k, (o, e) in enumerate(zip(out, expected)):
            oh = o[idx.to(o.device)]
            both = torch.isfinite(oh) & torch.isfinite(e)
            if both.any():
                torch.testing.assert_close(oh[both].double(), e[both].double(), rtol=1e-3, atol=1e-3,
                                           msg=f"output {k}: a huge row gave another finite value")


inputs = st.fixed_dictionaries({
    "batch": st.sampled_from([0, 1, 3, 5]),
    "dtype": st.sampled_from(DTYPES),
    "layout": st.sampled_from(LAYOUTS),
    "bad": st.sampled_from(BAD_VALUES),
    "bad_row": st.integers(0, 4),
    "wrong_width": st.sampled_from([False, False, False, True]),
    "device": st.sampled_from(DEVICES),
})


def _perturb(module: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def reference_backend(fn):
    def run(*args):
        with fastflow.backend("reference"):
            return fn(*args)
    return run


# --------------------------------------------------------------------------------------------
# Operators


@SETTINGS
@given(p=inputs, activation=st.sampled_from(["exp", "sigmoid", "additive"]), inverse=st.booleans())
def test_affine_coupling_bad_input(p, activation, inverse):
    D = 4 + p["wrong_width"]
    x = make_input((p["batch"], 4), p["dtype"], p["layout"], p["bad"], p["bad_row"], p["device"])
    dt = x.dtype if x.is_floating_point() else torch.float32
    gen = torch.Generator().manual_seed(2)
    ls = (0.5 * torch.randn(p["batch"], D, generator=gen)).to(dt).to(x.device)
    sh = torch.randn(p["batch"], D, generator=gen).to(dt).to(x.device)
    op = ops.affine_coupling_inverse if inverse else ops.affine_coupling

    names = ("x", "y", "log_scale", "shift")
    out = call(lambda: op(x, ls, sh, activation=activation), names)
    if out is None:
        return
    good = ~bad_rows(x)
    if good.any():
        g = good.to(x.device)
        expected = ops.affine_coupling_reference(x[g], ls[g], sh[g], activation=activation, inverse=inverse)
        for o, e in zip(out, expected):
            assert torch.isfinite(o[g]).all(), "a good row is not finite (a bad row leaked?)"
            tol = _tol(o.dtype)
            torch.testing.assert_close(o[g].double(), e.double(), rtol=tol, atol=tol)
    assert out[1].dtype in (torch.float32, torch.float64), "the log-det is float32 or wider"


@SETTINGS
@given(p=inputs, inverse=st.booleans())
def test_invconv_plu_bad_input(p, inverse):
    C = 3 + p["wrong_width"]
    x = make_input((p["batch"], 3, 2, 2), p["dtype"], p["layout"], p["bad"], p["bad_row"], p["device"])
    torch.manual_seed(3)
    layer = fnn.InvertibleConv1x1(C).to(p["device"])
    if x.dtype == torch.float64:
        layer = layer.double()
    factors = [t.detach() for t in layer._factors()]
    op = ops.invconv_plu_inverse if inverse else ops.invconv_plu
    names = ("x", "y", "lower", "upper", "sign", "log_s", "perm")
    check_rowwise(
        lambda xx: op(xx, *factors),
        lambda xx: ops.invconv_plu_reference(xx, *factors, inverse=inverse),
        x, names,
    )


@SETTINGS
@given(
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(LAYOUTS),
    bad=st.sampled_from(BAD_VALUES),
    wrong=st.sampled_from(["none", "none", "u_shape", "v_dtype"]),
    n_iter=st.integers(0, 3),
    device=st.sampled_from(DEVICES),
)
def test_spectral_norm_bad_input(dtype, layout, bad, wrong, n_iter, device):
    w = make_input((5, 3), dtype, layout, bad, 1, device)
    dt = w.dtype if w.is_floating_point() else torch.float32
    gen = torch.Generator().manual_seed(4)
    u = torch.nn.functional.normalize(torch.randn(5 + (wrong == "u_shape"), generator=gen), dim=0).to(dt).to(device)
    v = torch.nn.functional.normalize(torch.randn(3, generator=gen), dim=0).to(
        torch.int64 if wrong == "v_dtype" else dt).to(device)
    names = ("weight", "u", "v")
    out = call(lambda: ops.spectral_norm_power(w, u, v, n_iter), names)
    finite = bool(torch.isfinite(w.double()).all()) if w.is_floating_point() else True
    if out is not None:
        ref = ops.spectral_norm_power_reference(w, u, v, n_iter)
        if finite and bad != "huge":
            for o, e in zip(out, ref):
                assert torch.isfinite(o).all()
                tol = _tol(o.dtype)
                torch.testing.assert_close(o.double(), e.double(), rtol=tol, atol=tol)
        u, v = out
    out = call(lambda: ops.spectral_norm_apply(w, u, v, 0.9), names + ("coeff",))
    if out is not None and finite and bad != "huge":
        ref = ops.spectral_norm_apply_reference(w, u, v, 0.9)
        for o, e in zip(out, ref):
            assert torch.isfinite(o).all()
            tol = _tol(o.dtype)
            torch.testing.assert_close(o.double(), e.double(), rtol=tol, atol=tol)
    if out is not None and not finite:
        w_hat, sigma = out
        assert not torch.isfinite(sigma).all() or not torch.isfinite(w_hat).all(), \
            "a non-finite weight gave a finite result (silent garbage)"


def _mlp(D, dtype, device):
    gen = torch.Generator().manual_seed(5)
    ws = [torch.randn(6, D, generator=gen), torch.randn(D, 6, generator=gen)]
    ws = [(0.5 * m / torch.linalg.matrix_norm(m, ord=2)).to(dtype).to(device) for m in ws]
    bs = [(0.1 * torch.randn(6, generator=gen)).to(dtype).to(device),
          (0.1 * torch.randn(D, generator=gen)).to(dtype).to(device)]
    betas = torch.ones(2, dtype=dtype, device=device)  # preact: two activations
    return ws, bs, betas


@SETTINGS
@given(p=inputs)
def test_mlp_trace_bad_input(p):
    x = make_input((p["batch"], 3), p["dtype"], p["layout"], p["bad"], p["bad_row"], p["device"])
    dt = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    ws, bs, betas = _mlp(3 + p["wrong_width"], dt, p["device"])
    probes = torch.randn(1, p["batch"], 3, generator=torch.Generator().manual_seed(6)).to(dt).to(p["device"])
    vc, pc = [1.0, -0.5, 1 / 3], [1.0, -1.0, 1.0]
    good = ~bad_rows(x)

    def fn(xx):
        return ops.mlp_trace(xx, ws, bs, betas=betas, activation="lipswish", preact=True,
                             probes=probes, value_coeffs=vc, psi_coeffs=pc)

    def ref(xx):
        sel = good if xx.shape[0] == int(good.sum()) else huge_rows(x)
        return ops.mlp_trace_reference(xx, ws, bs, (), (), betas, "lipswish", True,
                                       probes[:, sel.to(probes.device)], vc, pc)

    check_rowwise(fn, ref, x, ("x", "weights", "biases", "betas", "probes"))


@SETTINGS
@given(p=inputs)
def test_mlp_fixed_point_bad_input(p):
    y = make_input((p["batch"], 3), p["dtype"], p["layout"], p["bad"], p["bad_row"], p["device"])
    dt = y.dtype if y.dtype in (torch.float32, torch.float64) else torch.float32
    ws, bs, betas = _mlp(3 + p["wrong_width"], dt, p["device"])
    check_rowwise(
        lambda yy: ops.mlp_fixed_point(yy, ws, bs, betas, "lipswish", True, tol=1e-6, max_iter=200),
        lambda yy: ops.mlp_fixed_point_reference(yy, ws, bs, betas, "lipswish", True, tol=1e-6, max_iter=200),
        y, ("y", "weights", "biases", "betas"), n_out=1,
    )


@SETTINGS
@given(p=inputs, reverse=st.booleans())
def test_cnf_dopri5_bad_input(p, reverse):
    """The native CNF solve couples the rows through its step sizes (one adaptive solve for the
    batch, as torchdiffeq's), so the rule is for the whole call: a non-finite row raises naming
    ``z``; finite input gives finite results equal to torchdiffeq's solve of the same batch;
    huge but finite rows give finite results or raise naming an argument."""
    if not fastflow.native_available():
        pytest.skip("the native CNF solve has no reference of its own (fastflow._C is not built)")
    x = make_input((p["batch"], 2), p["dtype"], p["layout"], p["bad"], p["bad_row"], p["device"])
    dt = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    torch.manual_seed(0)
    net = _perturb(fnn.ODEnet(2 + p["wrong_width"], hidden=(6,))).to(dt).to(p["device"])
    T = torch.tensor(0.5, dtype=dt, device=p["device"])
    torch.manual_seed(7)
    probe = torch.randn(x.shape, dtype=dt, device=p["device"])
    out = call(lambda: ops.cnf_dopri5(x, *ops.concatsquash_tensors(net), T, "tanh", probe,
                                      reverse=reverse, rtol=1e-6, atol=1e-6),
               ("z", "weights", "probe"))
    finite = bool(torch.isfinite(x.double()).all())
    if not finite:
        assert out is None, "a non-finite row must raise"
        return
    if out is None:
        return
    z, logdet, nfe = out
    assert z.shape == x.shape and logdet.shape == x.shape[:1] and int(nfe) >= 0
    assert torch.isfinite(z).all() and torch.isfinite(logdet).all()
    if huge_rows(x).any() or x.shape[0] == 0:
        return
    cnf = fnn.CNF(2, net=net, T=0.5, train_T=False, rtol=1e-6, atol=1e-6).to(dt).to(p["device"])
    cnf.train()
    with fastflow.backend("reference"), torch.no_grad():
        torch.manual_seed(7)  # the probe drawn above
        z_ref, logdet_ref = cnf.inverse(x.contiguous()) if reverse else cnf(x.contiguous())
    tol = _tol(dt)
    torch.testing.assert_close(z, z_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(logdet, logdet_ref, rtol=tol, atol=tol)


@SETTINGS
@given(p=inputs)
def test_fixed_point_inverse_bad_input(p):
    y = make_input((p["batch"], 3), p["dtype"], p["layout"], p["bad"], p["bad_row"], p["device"])
    dt = y.dtype if y.dtype in (torch.float32, torch.float64) else torch.float32
    ws, bs, betas = _mlp(3, dt, p["device"])

    def g(x):
        return ops.mlp_apply_reference(x, ws, bs, betas, "lipswish", True)

    def fn(yy):
        r = ops.fixed_point_inverse(g, yy, tol=1e-6, max_iter=200)
        return (r.x,)

    # "x": a dtype that the branch g rejects is reported by g, under its own argument's name
    check_rowwise(fn, fn, y, ("y", "g", "x_init", "x"))


@SETTINGS
@given(p=inputs, kind=st.sampled_from(["exact", "series"]))
def test_logdet_estimators_bad_input(p, kind):
    x = make_input((p["batch"], 3), p["dtype"], p["layout"], p["bad"], p["bad_row"], p["device"])
    dt = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    ws, bs, betas = _mlp(3, dt, p["device"])

    def fn(xx):
        xg = xx.detach().requires_grad_() if xx.is_floating_point() else xx
        gx = ops.mlp_apply_reference(xg, ws, bs, betas, "lipswish", True)
        if kind == "exact":
            return (ops.logdet_exact(xg, gx, create_graph=False),)
        torch.manual_seed(7)  # the probes: the same draw for a batch and its rows? no: per row
        return (ops.logdet_series(xg, gx, 4, n_probes=1, create_graph=False),)

    if kind == "series":
        # the Hutchinson probes differ between a batch and its subset: only the rule on finite
        # results, not the comparison
        out = call(lambda: fn(x), ("x", "gx", "n_terms"))
        if out is not None:
            good = (~bad_rows(x)).to(out[0].device)
            assert torch.isfinite(out[0][good]).all()
            assert out[0].dtype in (torch.float32, torch.float64)
        return
    check_rowwise(fn, fn, x, ("x", "gx"))


# --------------------------------------------------------------------------------------------
# Layers: forward and inverse of each, against the reference backend on the good rows alone


def _vector_layers():
    torch.manual_seed(0)
    actnorm = fnn.ActNorm(3)
    fnn.initialize_actnorm(actnorm, torch.randn(16, 3))
    g = fnn.residual_mlp(3, 8, 1, 0.7, "lipswish", 2, True)
    block = fnn.iResBlock(g, estimator="exact")
    layers = {
        "affine_exp": fnn.AffineCoupling(3, hidden=8, n_hidden_layers=1, activation="exp"),
        "affine_sigmoid": fnn.AffineCoupling(3, hidden=8, n_hidden_layers=1, activation="sigmoid"),
        "additive": fnn.AdditiveCoupling(3, hidden=8, n_hidden_layers=1),
        "actnorm": actnorm,
        "lulinear": fnn.LULinear(3),
        "orthogonal": fnn.OrthogonalLinear(3),
        "qr": fnn.QRLinear(3),
        "planar": fnn.Planar(3),
        "radial": fnn.Radial(3),
        "sylvester": fnn.Sylvester(3),
        "maf": fnn.MaskedAutoregressive(3, hidden=8),
        "iaf": fnn.InverseAutoregressive(3, hidden=8),
        "permutation": fnn.Permutation(3),
        "iresblock": block,
    }
    for layer in layers.values():
        _perturb(layer)
        layer.eval()
    return layers


def _image_layers():
    torch.manual_seed(0)
    actnorm = fnn.ActNorm(2)
    fnn.initialize_actnorm(actnorm, torch.randn(8, 2, 4, 4))
    layers = {
        "affine_checkerboard": fnn.AffineCoupling((2, 4, 4), mask="checkerboard", hidden=4, n_hidden_layers=1),
        "affine_channel": fnn.AffineCoupling((2, 4, 4), mask="channel", hidden=4, n_hidden_layers=1, activation="sigmoid"),
        "actnorm": actnorm,
        "invconv": fnn.InvertibleConv1x1(2),
        "invconv_dense": fnn.InvertibleConv1x1(2, lu=False),
        "squeeze": fnn.Squeeze(2),
    }
    for layer in layers.values():
        _perturb(layer)
        layer.eval()
    return layers


VECTOR_LAYERS = _vector_layers()
IMAGE_LAYERS = _image_layers()
LAYER_NAMES = ("x", "z", "context")


def _layer_case(layer, p, shape, inverse):
    x = make_input(shape, p["dtype"], p["layout"], p["bad"], p["bad_row"], p["device"])
    layer = copy.deepcopy(layer).to(p["device"])  # a fresh copy per example: no state carried over
    if x.dtype == torch.float64:
        layer = layer.double()
    else:
        layer = layer.float()
    fn = layer.inverse if inverse else layer
    # iResBlock.inverse names its argument y
    names = LAYER_NAMES + (("y",) if isinstance(layer, fnn.iResBlock) else ())
    check_rowwise(fn, reference_backend(fn), x, names)


@pytest.mark.parametrize("name", list(VECTOR_LAYERS))
@SETTINGS
@given(p=inputs, inverse=st.booleans())
def test_vector_layer_bad_input(name, p, inverse):
    shape = (p["batch"], 3 + p["wrong_width"])
    _layer_case(VECTOR_LAYERS[name], p, shape, inverse)


@pytest.mark.parametrize("name", list(IMAGE_LAYERS))
@SETTINGS
@given(p=inputs, inverse=st.booleans())
def test_image_layer_bad_input(name, p, inverse):
    shape = (p["batch"], 2 + p["wrong_width"], 4, 4)
    _layer_case(IMAGE_LAYERS[name], p, shape, inverse)


def test_the_checker_catches_a_leaking_row():
    """Negative control: an operation that mixes rows (a batch mean) fails the row rule."""
    x = make_input((3, 3), torch.float32, "contiguous", "nan", 0, "cpu")
    with pytest.raises(AssertionError, match="leaked"):
        check_rowwise(lambda xx: (xx - xx.mean(0),), lambda xx: (xx - xx.mean(0),), x, ("x",))
    with pytest.raises(AssertionError, match="does not name"):
        call(lambda: (_ for _ in ()).throw(ValueError("bad value")), ("x",))
