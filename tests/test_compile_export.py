"""torch.compile and torch.export.

* Every exact-log-det family (RealNVP, RealNVPImage, Glow and GlowStep, MAF
  ``forward``/``inverse``/``log_prob``, IAF ``sample``, PlanarFlow, Radial, SylvesterFlow,
  LULinear, OrthogonalLinear, QRLinear, ActNorm, InvertibleConv1x1, couplings, squeeze,
  Permutation, BatchNormFlow in eval mode) compiles with ``fullgraph=True`` after initialisation and
  matches eager. ``torch._dynamo.explain`` counts one graph and no graph break, so the native
  operators (``torch.ops.fastflow.*``) trace through their ``register_fake`` without breaking.
  Most cases compile with the ``aot_eager`` backend (Dynamo + AOTAutograd with fake tensors:
  the part that must trace the operators; seconds per case on a small CPU); RealNVP and Glow
  also with the default Inductor backend (about 10 s each here).
* Residual Flows and i-ResNet on MLP branches (:class:`~fastflow.nn.iResBlock` on
  ``residual_mlp``, :class:`~fastflow.models.ResidualFlow`) and on convolutional branches
  (``residual_cnn``, :class:`~fastflow.models.ResidualFlowImage`): ``forward`` and ``log_prob``
  compile with ``fullgraph=True`` in training and eval mode (one graph, no break) for every
  estimator: the roulette with the Neumann gradient and with the backpropagated one, the series
  with either gradient and the exact log-det, and match eager with the same seed: values, the
  roulette's number of terms, gradients w.r.t. the input and every parameter, and the
  spectral-norm and ActNorm state after two calls. The roulette's random number of terms is a
  tensor in the graph: one compilation serves every draw. Two cases also under Inductor; the
  MLP branch's Neumann gradients also under ``fastflow.backend("reference")`` (no native
  operator: the products in PyTorch operations in the graph).
* Residual blocks on a branch of the user's own (any module): one graph on ``torch.func``
  products, every estimator, training and eval mode, blocks and ``ResidualFlow``, torch's
  spectral-norm parametrization; also under Inductor, and bf16 autocast on
  ``ResidualFlowImage``.
* Blocks whose log-det runs on the autograd estimators (a branch with torch's hook-based
  ``spectral_norm``) run eagerly inside a compiled model by design (``torch.compiler.disable``): a plain
  ``torch.compile`` (graph breaks allowed) matches eager, and ``fullgraph=True`` raises an error
  that names the reason. FFJORD solves with gradients on torchdiffeq (concat layers here; also
  conv dynamics, the regularisers, fixed-step solvers) break the graph at the solver's loop and
  also match eager under a plain ``torch.compile``; its native solve (concat-squash dynamics,
  dopri5, Hutchinson or exact trace) is one graph, tested in tests/test_cnf_dopri5.py, and the
  solves without gradients are one graph on the in-graph solver, tests/test_cnf_compile.py.
* ``InvertibleBackprop``'s ``log_prob`` (Real NVP, Glow with its split priors, checkpointed
  planar, IAF, MAF with batch norms in training mode and residual blocks with the exact
  log-det, anchors, a context): one graph, the model's values, gradients and buffers, and a
  compiled forward that keeps batch-sized tensors independent of depth; with ``check`` or a
  layer that draws random numbers it stays on its eager function (a plain compile matches,
  fullgraph raises).
* ``torch.export`` of ``log_prob`` for RealNVP, Glow, MAF, planar and Sylvester flows: the
  exported program's output equals eager's.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch

import fastflow
from fastflow import models
from fastflow import nn as fnn
from fastflow.nn import initialize_actnorm
from fastflow.nn._loops import loop_gradient_settings, loop_gradients_in_graph

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _perturb(module: torch.nn.Module) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return module


def _glow():
    torch.manual_seed(0)
    model = _perturb(models.Glow((2, 4, 4), levels=2, depth=1, hidden=4, n_hidden_layers=1))
    initialize_actnorm(model, torch.randn(8, 2, 4, 4))
    return model


def _glow_step():
    step = fnn.GlowStep((2, 4, 4), hidden=4)
    initialize_actnorm(step, torch.randn(8, 2, 4, 4))
    return step


def _actnorm():
    layer = fnn.ActNorm(2)
    initialize_actnorm(layer, torch.randn(8, 2, 3, 3))
    return layer


VEC = (3, 4)
IMG = (3, 2, 4, 4)

# name -> (builder, input shape, methods to compile)
CASES = {
    "realnvp": (lambda: models.RealNVP(4, n_couplings=2, hidden=8, n_hidden_layers=1), VEC, ("forward", "inverse", "log_prob")),
    "realnvp_image": (lambda: models.RealNVPImage((2, 4, 4), n_couplings=2, hidden=4, n_hidden_layers=1), IMG, ("forward", "log_prob")),
    "glow": (_glow, IMG, ("forward", "inverse", "log_prob")),
    "maf": (lambda: models.MAF(4, n_transforms=2, hidden=8), VEC, ("forward", "inverse", "log_prob")),
    "planar": (lambda: models.PlanarFlow(4, n_transforms=2), VEC, ("forward", "log_prob")),
    "sylvester_orthogonal": (lambda: models.SylvesterFlow(4, n_transforms=2, variant="orthogonal"), VEC, ("log_prob",)),
    "sylvester_householder": (lambda: models.SylvesterFlow(4, n_transforms=2, variant="householder"), VEC, ("log_prob",)),
    "sylvester_triangular": (lambda: models.SylvesterFlow(4, n_transforms=2, variant="triangular"), VEC, ("log_prob",)),
    "lulinear": (lambda: fnn.LULinear(4), VEC, ("forward", "inverse")),
    "orthogonal": (lambda: fnn.OrthogonalLinear(4), VEC, ("forward", "inverse")),
    "qr": (lambda: fnn.QRLinear(4), VEC, ("forward", "inverse")),
    "actnorm": (_actnorm, IMG, ("forward", "inverse")),
    "invconv": (lambda: fnn.InvertibleConv1x1(2), IMG, ("forward", "inverse")),
    "invconv_dense": (lambda: fnn.InvertibleConv1x1(2, lu=False), IMG, ("forward",)),
    "affine_coupling": (lambda: fnn.AffineCoupling(4, hidden=8, n_hidden_layers=1), VEC, ("forward", "inverse")),
    "affine_coupling_image": (lambda: fnn.AffineCoupling((2, 4, 4), mask="checkerboard", hidden=4, n_hidden_layers=1, activation="sigmoid"), IMG, ("forward", "inverse")),
    "additive_coupling": (lambda: fnn.AdditiveCoupling(4, hidden=8, n_hidden_layers=1), VEC, ("forward", "inverse")),
    "squeeze": (lambda: fnn.Squeeze(2), IMG, ("forward", "inverse")),
    "radial": (lambda: fnn.Radial(4), VEC, ("forward",)),
    "permutation": (lambda: fnn.Permutation(4, "random"), VEC, ("forward", "inverse")),
    "batchnorm_flow": (lambda: fnn.BatchNormFlow(4), VEC, ("forward", "inverse")),
    "glow_step": (_glow_step, IMG, ("forward", "inverse")),
}


def _build(name):
    torch.manual_seed(0)
    builder, shape, methods = CASES[name]
    model = _perturb(builder())
    model.eval()
    return model, torch.randn(shape), methods


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


def _assert_same(got, want, what):
    for k, (g, w) in enumerate(zip(_outputs(got), _outputs(want))):
        assert g.dtype == w.dtype, f"{what}[{k}]"
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=f"{what}[{k}]")


@pytest.mark.parametrize("name", list(CASES))
def test_fullgraph_compile_matches_eager(name):
    model, x, methods = _build(name)
    with torch.no_grad():
        z = _outputs(model(x))[0] if "inverse" in methods else None
    for method in methods:
        fn = getattr(model, method)
        x = z if method == "inverse" else x  # the inverse of a latent: squeeze's shape
        with torch.no_grad():
            want = fn(x)
            explanation = torch._dynamo.explain(fn)(x)
            assert explanation.graph_count == 1 and explanation.graph_break_count == 0, (
                method, [str(r.reason) for r in explanation.break_reasons]
            )
            compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
            _assert_same(compiled(x), want, method)


def test_batchnorm_flow_training_mode_compiles_with_its_running_statistics():
    """BatchNormFlow in training mode (batch statistics, running averages updated in the
    forward): the compiled forward gives eager's output, gradients and running averages."""
    torch.manual_seed(0)
    eager = fnn.BatchNormFlow(4).train()
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        x = torch.randn(6, 4)
        want = eager(x.clone().requires_grad_())
        got = compiled(x.clone().requires_grad_())
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        gw = torch.autograd.grad(sum(o.sum() for o in want), list(eager.parameters()))
        gc = torch.autograd.grad(sum(o.sum() for o in got), list(compiled_layer.parameters()))
        for g, w in zip(gc, gw):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    for (k, w), g in zip(eager.state_dict().items(), compiled_layer.state_dict().values()):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7, msg=k)


@pytest.mark.parametrize("name", ["realnvp", "glow", "maf"])
def test_fullgraph_compile_gradients_match_eager(name):
    """The compiled log_prob's backward (AOTAutograd over the operators' registered autograd)
    gives eager's gradients."""
    model, x, _ = _build(name)
    model.train()
    if name == "glow":
        model = _glow()  # initialised; training mode from here on does not re-initialise
    loss = -model.log_prob(x).mean()
    eager = torch.autograd.grad(loss, list(model.parameters()))
    compiled = torch.compile(model.log_prob, fullgraph=True, backend="aot_eager")
    loss_c = -compiled(x).mean()
    grads = torch.autograd.grad(loss_c, list(model.parameters()))
    for (n, _), g, e in zip(model.named_parameters(), grads, eager):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("name", ["realnvp", "glow"])
def test_inductor_fullgraph_matches_eager(name):
    model, x, _ = _build(name)
    with torch.no_grad():
        want = model.log_prob(x)
        compiled = torch.compile(model.log_prob, fullgraph=True)  # the default backend: Inductor
        torch.testing.assert_close(compiled(x), want, rtol=1e-5, atol=1e-5)


def test_iaf_sample_compiles_fullgraph():
    torch.manual_seed(0)
    model = _perturb(models.IAF(4, n_transforms=2, hidden=8)).eval()
    explanation = torch._dynamo.explain(lambda: model.sample(3))()
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
    compiled = torch.compile(model.sample, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.manual_seed(5)
        got = compiled(3)
        torch.manual_seed(5)
        want = model.sample(3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _Opaque(torch.nn.Module):
    """A branch the structured paths do not recognise (any user module)."""

    def __init__(self, g):
        super().__init__()
        self.g = g

    def forward(self, x):
        return self.g(x)


class _TorchSpectralNorm(torch.nn.Module):
    """A branch on torch's own spectral norm, scaled to ``Lip < 1``: the parametrization
    (``torch.nn.utils.parametrizations.spectral_norm``) or, with ``hooks``, the older
    ``torch.nn.utils.spectral_norm``, whose forward hook runs the power iteration and sets the
    weight attribute on every call."""

    def __init__(self, d, hidden, hooks=False):
        super().__init__()
        sn = torch.nn.utils.spectral_norm if hooks else torch.nn.utils.parametrizations.spectral_norm
        self.net = torch.nn.Sequential(sn(torch.nn.Linear(d, hidden)), torch.nn.ELU(),
                                       sn(torch.nn.Linear(hidden, d)))

    def forward(self, x):
        return 0.9 * self.net(x)


def _residual_torch_sn(hooks=True):
    """A ResidualFlow on branches with torch's spectral norm, in training mode (with
    ``hooks``, the blocks' log-det runs on the autograd estimators, eagerly)."""
    torch.manual_seed(0)
    model = models.ResidualFlow(2, n_blocks=2, hidden=8, n_hidden=1)
    for block in model.blocks:
        block.g = _TorchSpectralNorm(2, 8, hooks)
    initialize_actnorm(model, torch.randn(16, 2))
    return model.train(), torch.randn(5, 2)


def _ffjord():
    torch.manual_seed(0)  # concat layers, with gradients: autograd dynamics in torchdiffeq's loop
    return models.FFJORD(2, hidden=(8,), layer="concat").eval(), torch.randn(5, 2)


@pytest.mark.parametrize("builder", [_residual_torch_sn, _ffjord], ids=["residual_torch_sn", "ffjord"])
def test_blocks_run_eagerly_inside_compiled_models(builder):
    """Plain torch.compile (graph breaks allowed) of a model whose blocks run eagerly: the
    compiled log_prob equals eager's. (FFJORD: about 20 s here, the slowest case.)"""
    model, x = builder()
    twin, _ = builder()  # (the same seed; torch's hook-based spectral norm does not deepcopy)
    torch.manual_seed(3)
    want = model.log_prob(x).detach()
    compiled = torch.compile(twin.log_prob, backend="aot_eager")
    torch.manual_seed(3)
    torch.testing.assert_close(compiled(x).detach(), want, rtol=1e-5, atol=1e-5)
    for (k, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(b, a, msg=k)


def _invertible_case(name, depth=2):
    torch.manual_seed(0)
    if name == "glow":  # split priors in log_prob
        model = _perturb(models.Glow((2, 4, 4), levels=2, depth=1, hidden=4, n_hidden_layers=1))
        initialize_actnorm(model, torch.randn(8, 2, 4, 4))
        return model.double(), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    if name == "planar":  # checkpointed layers (their inputs kept)
        return models.PlanarFlow(4, n_transforms=depth).double(), torch.randn(5, 4, dtype=torch.float64)
    if name == "maf_batch_norm":  # checkpointed, and batch norms that update running averages
        model = models.MAF(4, n_transforms=depth, hidden=8, batch_norm=True)
        return _perturb(model).double().train(), torch.randn(5, 4, dtype=torch.float64)
    if name == "iaf":
        return _perturb(models.IAF(4, n_transforms=depth, hidden=8)).double(), torch.randn(5, 4, dtype=torch.float64)
    if name == "residual_exact":  # checkpointed, spectral norms updated once per step
        model = models.ResidualFlow(3, n_blocks=depth, hidden=8, n_hidden=1, estimator="exact",
                                    n_power_iter=1).double()
        initialize_actnorm(model, torch.randn(16, 3, dtype=torch.float64))
        return model.train(), torch.randn(5, 3, dtype=torch.float64)
    model = models.RealNVP(4, n_couplings=depth, hidden=8, n_hidden_layers=1)
    return _perturb(model).double(), torch.randn(5, 4, dtype=torch.float64)


def _float_buffers(model):
    params = dict(model.named_parameters())
    return {k: v for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and k not in params}


@pytest.mark.parametrize("name, kwargs", [
    ("realnvp", {}), ("glow", {}), ("planar", {}), ("iaf", {}), ("maf_batch_norm", {}),
    ("residual_exact", {}),
    ("glow", dict(checkpoint_every=1)), ("realnvp", dict(checkpoint_every="level")),
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={w}" for k, w in v.items()) or "default")
def test_invertible_backprop_fullgraph_matches_the_model(name, kwargs):
    """InvertibleBackprop's log_prob compiles into one graph (its backward reconstructs each
    layer's input and differentiates the layer by torch.func) and gives the model's own values
    and gradients (the input's and every parameter's), float64, and the model's buffers after
    the step: batch norms' running averages and spectral norms' u, v updated once (the
    recomputation runs on copies, without updates). With anchors (checkpoint_every) too."""
    model, x = _invertible_case(name)
    explanation = torch._dynamo.explain(fnn.InvertibleBackprop(copy.deepcopy(model), **kwargs).log_prob)(
        x.clone().requires_grad_())
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, (
        [str(r.reason) for r in explanation.break_reasons]
    )
    twin = copy.deepcopy(model)
    xr = x.clone().requires_grad_()
    want = model.log_prob(xr)
    want_grads = torch.autograd.grad(want.sum(), [xr, *model.parameters()], allow_unused=True)
    xr = x.clone().requires_grad_()
    got = torch.compile(fnn.InvertibleBackprop(twin, **kwargs).log_prob, fullgraph=True, backend="aot_eager")(xr)
    got_grads = torch.autograd.grad(got.sum(), [xr, *twin.parameters()], allow_unused=True)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for k, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert (g is None) == (w is None), k
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10, msg=f"gradient {k}")
    buffers = _float_buffers(model)
    assert buffers or name not in ("maf_batch_norm", "residual_exact")
    for key, value in _float_buffers(twin).items():
        torch.testing.assert_close(value, buffers[key], rtol=0, atol=1e-12, msg=key)


def _invertible_residual_case(name):
    """Residual flows whose blocks draw random numbers (float64, training mode, spectral norms
    restarted so that the forward's update moves them)."""
    torch.manual_seed(0)
    if name == "image_roulette":  # convolutional branches, the Neumann gradient
        model = models.ResidualFlowImage((1, 4, 4), levels=2, blocks_per_level=1, hidden=4).double()
        initialize_actnorm(model, torch.randn(8, 1, 4, 4, dtype=torch.float64))
        return _unconverged(model).train(), torch.randn(3, 1, 4, 4, dtype=torch.float64)
    kwargs = {"roulette": {}, "roulette_backprop": dict(neumann_grad=False),
              "series_neumann": dict(estimator="series", series_grad="neumann")}[name]
    model = models.ResidualFlow(3, n_blocks=2, hidden=8, n_hidden=1, n_probes=2, **kwargs).double()
    initialize_actnorm(model, torch.randn(16, 3, dtype=torch.float64))
    return _unconverged(model).train(), torch.randn(5, 3, dtype=torch.float64)


@pytest.mark.parametrize("name", ["roulette", "roulette_backprop", "series_neumann",
                                  "image_roulette"])
def test_invertible_backprop_fullgraph_residual_blocks_that_draw(name):
    """Residual blocks with the stochastic estimators inside InvertibleBackprop's graph: each
    block's random numbers (the roulette's N, the probes) are drawn before its forward and the
    recomputation in the backward uses them, so one graph gives the model's values, gradients
    and spectral-norm state for the same seed. The reference is the model on fastflow's
    reference operators (the recomputation's): the native operator's Neumann gradient is
    another per-draw form of the same estimator (fastflow.ops.mlp_trace)."""
    model, x = _invertible_residual_case(name)
    twin = copy.deepcopy(model)
    wrapped = fnn.InvertibleBackprop(twin)
    xr = x.clone().requires_grad_()
    torch.manual_seed(5)
    with fastflow.backend("reference"):
        want = model.log_prob(xr)
        want_grads = torch.autograd.grad(want.sum(), [xr, *model.parameters()])
    xr = x.clone().requires_grad_()
    torch.manual_seed(5)
    got = torch.compile(wrapped.log_prob, fullgraph=True, backend="aot_eager")(xr)
    got_grads = torch.autograd.grad(got.sum(), [xr, *twin.parameters()])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for k, (g, w) in enumerate(zip(got_grads, want_grads)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10, msg=f"gradient {k}")
    buffers = _float_buffers(model)
    assert buffers
    for key, value in _float_buffers(twin).items():
        torch.testing.assert_close(value, buffers[key], rtol=0, atol=1e-12, msg=key)
    assert torch.is_tensor(twin.blocks[0].last_terms) or name == "series_neumann"


def test_invertible_backprop_graph_keeps_the_neumann_vectors():
    """The roulette's Neumann gradient inside InvertibleBackprop's graph: the forward keeps the
    surrogate's left vectors, so the recomputation takes one product per block, not the
    series' products up to the cap (n_exact + 54 here, which the recomputation would run
    under torch.func): the backward graph of two blocks holds 20 matrix products, against
    240 without the kept vectors."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    model, x = _invertible_residual_case("roulette")
    counts = []

    def backward_compiler(gm, example_inputs):
        counts.append(sum(1 for n in gm.graph.nodes
                          if n.op == "call_function" and "mm" in str(n.target)))
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward),
                           bw_compiler=backward_compiler)
    torch._dynamo.reset()
    out = torch.compile(fnn.InvertibleBackprop(model).log_prob, fullgraph=True, backend=backend)(
        x.clone().requires_grad_())
    out.sum().backward()
    torch._dynamo.reset()
    assert len(counts) == 1 and 0 < counts[0] <= 12 * len(model.blocks), counts


@pytest.mark.parametrize("name", ["residual_exact", "roulette"])
def test_invertible_backprop_inductor_takes_the_forwards_state(name):
    """Residual blocks under Inductor, two forwards before one backward: each forward's
    recomputation uses the spectral norms' u, v and the random numbers of that forward, not
    the buffers as they are at the backward (Inductor's partitioner may recompute a copy from
    the buffer). The roulette with eager's random numbers (``fallback_random``), against the
    model on the reference operators (as in the test above)."""
    if name == "roulette":
        model, x = _invertible_residual_case(name)
    else:
        model, x = _invertible_case(name)
    twin = copy.deepcopy(model)
    x2 = x.flip(0) + 0.5
    torch.manual_seed(5)
    with fastflow.backend("reference"):
        want = model.log_prob(x).sum() + model.log_prob(x2).sum()
        want_grads = torch.autograd.grad(want, list(model.parameters()))
    compiled = torch.compile(fnn.InvertibleBackprop(twin).log_prob, fullgraph=True)
    torch.manual_seed(5)
    with torch._inductor.config.patch(fallback_random=True):
        got = compiled(x).sum() + compiled(x2).sum()
    got_grads = torch.autograd.grad(got, list(twin.parameters()))
    torch._dynamo.reset()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)
    buffers = _float_buffers(model)
    for key, value in _float_buffers(twin).items():
        torch.testing.assert_close(value, buffers[key], rtol=0, atol=1e-12, msg=key)


def _saved_activations(fn, x):
    """How many tensors the compiled forward keeps for the backward that are not parameters."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    counts = []

    def forward_compiler(gm, example_inputs):
        (outputs,) = [n.args[0] for n in gm.graph.nodes if n.op == "output"]
        shapes = [tuple(o.meta["val"].shape) for o in outputs if hasattr(o, "meta") and "val" in o.meta]
        counts.append(shapes)
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=forward_compiler, bw_compiler=lambda gm, _: make_boxed_func(gm.forward))
    torch._dynamo.reset()
    torch.compile(fn, fullgraph=True, backend=backend)(x.clone().requires_grad_())
    torch._dynamo.reset()
    return sum(1 for shape in counts[0] if shape and shape[0] == x.shape[0])


def test_invertible_backprop_fullgraph_context_gradient():
    """A conditional RealNVP: the context's gradient (summed over the layers) is the model's."""
    torch.manual_seed(0)
    model = _perturb(models.RealNVP(3, n_couplings=2, hidden=8, context_features=2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    c = torch.randn(5, 2, dtype=torch.float64)
    grads = []
    for fn in (model.log_prob,
               torch.compile(fnn.InvertibleBackprop(model).log_prob, fullgraph=True, backend="aot_eager")):
        cr = c.clone().requires_grad_()
        out = fn(x, context=cr)
        grads.append((out.detach(), *torch.autograd.grad(out.sum(), [cr, *model.parameters()])))
    for g, w in zip(grads[1], grads[0]):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_invertible_backprop_compiled_keeps_no_activations_per_layer():
    """The compiled graph keeps batch-sized tensors independent of depth for the backward
    (the chain's output and input), where the model's own compiled graph keeps more with each
    layer: the memory that invertible backpropagation saves, kept under torch.compile."""
    kept = {}
    for depth in (2, 4):
        model, x = _invertible_case("realnvp", depth)
        kept[("wrapped", depth)] = _saved_activations(fnn.InvertibleBackprop(model).log_prob, x)
        kept[("model", depth)] = _saved_activations(model.log_prob, x)
    assert kept[("wrapped", 2)] == kept[("wrapped", 4)] <= 3, kept
    assert kept[("model", 4)] > kept[("model", 2)] > kept[("wrapped", 2)], kept


def test_invertible_backprop_inductor_matches_the_model():
    model, x = _invertible_case("realnvp")
    params = list(model.parameters())
    want_grads = torch.autograd.grad(model.log_prob(x).sum(), params)
    got = torch.compile(fnn.InvertibleBackprop(model).log_prob, fullgraph=True)(x)
    got_grads = torch.autograd.grad(got.sum(), params)
    torch.testing.assert_close(got, model.log_prob(x), rtol=1e-10, atol=1e-10)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("case", ["check", "user_branch_roulette", "user_branch_exact",
                                  "conv_autocast"])
def test_invertible_backprop_that_stays_eager_runs_under_a_plain_compile(case):
    """With check mode, or a checkpointed residual block whose products would be torch.func
    calls (a branch of the user's own; a convolutional branch under autocast),
    InvertibleBackprop keeps its eager function, which saves the RNG state for its
    recomputation (Dynamo does not trace that): a plain torch.compile matches eager (values
    and gradients); fullgraph raises. (Before those blocks were excluded from the graph path,
    Dynamo crashed on the exact user branch and on the convolutional branch under autocast.)"""
    torch.manual_seed(0)
    autocast = contextlib.nullcontext()
    if case == "check":
        model, kwargs = models.RealNVP(4, n_couplings=2, hidden=8, n_hidden_layers=1), dict(check=True)
        x = torch.randn(5, 4)
    elif case == "conv_autocast":
        model, kwargs = models.ResidualFlowImage((1, 4, 4), levels=2, blocks_per_level=1, hidden=4,
                                                 eval_estimator="roulette"), {}
        initialize_actnorm(model, torch.randn(8, 1, 4, 4))
        model.eval()
        x = torch.randn(3, 1, 4, 4)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    else:  # eval mode: no power-iteration update between the two calls
        model, kwargs = models.ResidualFlow(2, n_blocks=1, hidden=8, n_hidden=1,
                                            eval_estimator=case.split("_")[-1]), {}
        model.blocks[0].g = _Opaque(model.blocks[0].g)
        initialize_actnorm(model, torch.randn(16, 2))
        model.eval()
        x = torch.randn(5, 2)
    wrapped = fnn.InvertibleBackprop(model, **kwargs)
    params = list(wrapped.parameters())
    with autocast:
        torch.manual_seed(1)
        want = wrapped.log_prob(x)
        torch.manual_seed(1)
        got = torch.compile(wrapped.log_prob, backend="aot_eager")(x)
    want_grads = torch.autograd.grad(want.sum(), params)
    got_grads = torch.autograd.grad(got.sum(), params)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    reason = "check=True reads" if case == "check" else "torch.func calls"
    with autocast, pytest.raises(Exception, match=f"(?s)InvertibleBackprop runs its chain eagerly.*{reason}"):
        torch.compile(wrapped.log_prob, fullgraph=True, backend="aot_eager")(x)
    torch._dynamo.reset()


@pytest.mark.parametrize("case", ["cnf", "dropout"])
def test_invertible_backprop_fullgraph_error_names_the_reason(case):
    """Where InvertibleBackprop runs its chain eagerly inside a compiled model, fullgraph's
    error says why: a CNF (its solver draws random numbers inside), a branch with dropout in
    training mode (its call cannot be repeated)."""
    torch.manual_seed(0)
    if case == "cnf":
        model, x = models.FFJORD(2, hidden=(8,)), torch.randn(4, 2)
        reason = "inside its solver"
    else:
        model = models.ResidualFlow(2, n_blocks=1, hidden=8, n_hidden=1)
        model.blocks[0].g = torch.nn.Sequential(model.blocks[0].g, torch.nn.Dropout(0.1))
        initialize_actnorm(model, torch.randn(16, 2))
        x, reason = torch.randn(4, 2), "cannot be repeated"
    wrapped = fnn.InvertibleBackprop(model.train())
    torch._dynamo.reset()
    with pytest.raises(Exception, match=f"(?s)InvertibleBackprop runs its chain eagerly.*{reason}"):
        torch.compile(wrapped.log_prob, fullgraph=True, backend="aot_eager")(x)
    torch._dynamo.reset()


def test_autograd_estimator_blocks_break_the_graph():
    model, x = _residual_torch_sn()
    explanation = torch._dynamo.explain(model.log_prob)(x)
    # one break per eager block (torch.compiler.disable), the ActNorms and the base compiled
    assert explanation.graph_break_count >= len(model.blocks)
    with pytest.raises(Exception, match="(?s)disable.*autograd estimators"):
        torch.compile(model.log_prob, fullgraph=True, backend="aot_eager")(x)


# --------------------------------------------------------------------------------------------
# Residual Flows and i-ResNet on MLP branches: one graph, eager's values, gradients and state

requires_native = pytest.mark.skipif(
    not fastflow.native_available(), reason="fastflow._C is not built (the native trace operator)"
)


def _unconverged(model):
    """Spectral norms restarted from random unit vectors, so that the training forward's power
    iteration visibly moves ``u`` and ``v`` (after the construction's 200 rounds it would not,
    and a compiled forward that skipped the update would go unnoticed)."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (fnn.SpectralNormLinear, fnn.SpectralNormConv2d)):
                for t in (m.u, m.v):
                    unit = torch.nn.functional.normalize(torch.randn(t.numel(), generator=gen), dim=0)
                    t.copy_(unit.view(t.shape))
    return model


def _block(kind):
    torch.manual_seed(0)
    if kind == "iresnet_series":  # i-ResNet: ELU, no pre-activation, backpropagated series
        g = fnn.residual_mlp(3, hidden=8, n_hidden=1, activation="elu", preact=False)
        return _unconverged(fnn.iResBlock(g, "series", "series", n_terms=3, eval_n_terms=4))
    if kind.startswith("conv_"):  # convolutional branches (residual_cnn) on [B, 2, 4, 4]
        est, _, rest = kind[5:].partition("_")
        kwargs = {"neumann": dict(series_grad="neumann"), "backprop": dict(neumann_grad=False)}
        g = fnn.residual_cnn(2, hidden=4, coeff=0.9)
        # float64: eager's Neumann surrogate (autograd's double backward) and the graph's (the
        # products) round differently, about 1e-6 of the gradients in float32
        block = fnn.iResBlock(g, est, est, n_terms=3, eval_n_terms=3, **kwargs.get(rest, {}))
        block = block.double()
        block(torch.randn(2, 2, 4, 4, dtype=torch.float64))  # the 3x3 spectral norms are sized
        return _unconverged(block)
    g = fnn.residual_mlp(3, hidden=8, n_hidden=1)
    if kind == "roulette_backprop":  # p = 0.9: a cap of 16 draws, 18 products compiled
        return _unconverged(fnn.iResBlock(g, "roulette", "roulette", neumann_grad=False,
                                          geometric_p=0.9))
    if kind == "roulette":
        return _unconverged(fnn.iResBlock(g, "roulette", "roulette", n_probes=2))
    if kind == "series_neumann":
        return _unconverged(fnn.iResBlock(g, "series", "series", n_terms=3, series_grad="neumann"))
    return _unconverged(fnn.iResBlock(g, "exact"))


def _flow():
    torch.manual_seed(0)
    model = models.ResidualFlow(2, n_blocks=2, hidden=8, n_hidden=1)  # roulette; exact in eval
    initialize_actnorm(model, torch.randn(16, 2))
    return _unconverged(model)


def _tensors(out):
    return [t for t in _outputs(out)]


def _run(model, method, x, compiled):
    """Two calls (seeds 3 and 4): outputs, last_terms, gradients w.r.t. x and every parameter
    of ``sum(outputs**2) + 3 sum(last output)``, and the state dict after each call."""
    fn = getattr(model, method)
    if compiled:
        fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    params = list(model.parameters())
    calls = []
    for seed in (3, 4):
        torch.manual_seed(seed)
        xr = x.clone().requires_grad_()
        out = _tensors(fn(xr))
        loss = sum(o.square().sum() for o in out) + 3 * out[-1].sum()
        grads = torch.autograd.grad(loss, [xr] + params, allow_unused=True)
        terms = getattr(model, "last_terms", None)
        state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        calls.append(([o.detach() for o in out], None if terms is None else int(terms), grads, state))
    return calls


def _assert_matches_eager(builder, method, x, train):
    model = builder().train(train)
    probe = copy.deepcopy(model)
    explanation = torch._dynamo.explain(getattr(probe, method))(x)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, (
        [str(r.reason) for r in explanation.break_reasons]
    )
    compiled_model = copy.deepcopy(model)
    eager = _run(model, method, x, compiled=False)
    compiled = _run(compiled_model, method, x, compiled=True)
    for i, ((eo, et, eg, es), (co, ct, cg, cs)) in enumerate(zip(eager, compiled)):
        assert et == ct, f"call {i}: last_terms"
        for k, (a, b) in enumerate(zip(eo, co)):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"call {i}: output {k}")
        for k, (a, b) in enumerate(zip(eg, cg)):
            assert (a is None) == (b is None), f"call {i}: gradient {k}"
            if a is not None:
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"call {i}: gradient {k}")
        assert es.keys() == cs.keys()
        for k in es:
            torch.testing.assert_close(cs[k], es[k], rtol=1e-6, atol=1e-7, msg=f"call {i}: {k}")
    return compiled_model


@pytest.mark.parametrize("kind", [
    pytest.param("roulette", marks=requires_native),
    pytest.param("series_neumann", marks=requires_native),
    "iresnet_series",
    "exact",
    "roulette_backprop",
    "conv_exact",
    "conv_series",
    "conv_series_neumann",
    "conv_roulette",
])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_residual_block_fullgraph_matches_eager(kind, train):
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64) if kind.startswith("conv_") else torch.randn(5, 3)
    _assert_matches_eager(lambda: _block(kind), "forward", x, train)


@pytest.mark.parametrize("kind", ["roulette", "series_neumann"])
def test_residual_block_fullgraph_without_the_native_operator(kind):
    """Under fastflow.backend("reference") the MLP branch's Neumann gradients run on the MLP's
    products in the graph (eager: the autograd estimators); float64, as the convolutional
    cases."""
    with fastflow.backend("reference"):
        x = torch.randn(5, 3, dtype=torch.float64)
        _assert_matches_eager(lambda: _block(kind).double(), "forward", x, True)


def test_conv_roulette_backprop_fullgraph_matches_eager():
    """The roulette with its gradient backpropagated through the products, on a convolutional
    branch: compiled, every capped product runs with zero weights past the draw (about 20 s
    to compile here; training mode only)."""
    _assert_matches_eager(lambda: _block("conv_roulette_backprop"), "forward",
                          torch.randn(3, 2, 4, 4, dtype=torch.float64), True)


def _image_flow():
    torch.manual_seed(0)
    model = models.ResidualFlowImage((1, 4, 4), levels=2, blocks_per_level=1, hidden=4).double()
    initialize_actnorm(model, torch.randn(8, 1, 4, 4, dtype=torch.float64))
    return _unconverged(model)  # float64: see _block's convolutional branches


@pytest.mark.parametrize("method", ["forward", "log_prob"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_residual_flow_image_fullgraph_matches_eager(method, train):
    """ResidualFlowImage (roulette with the Neumann gradient in training mode, exact in eval
    mode at this size): one graph, eager's values, draws, gradients and state."""
    _assert_matches_eager(_image_flow, method, torch.randn(3, 1, 4, 4, dtype=torch.float64), train)


def _graph_has_while_loop(block, x):
    """Whether the compiled block's graph (aot_eager, training with gradients) holds a
    while_loop."""
    from torch._dynamo.backends.registry import lookup_backend

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    torch.compile(copy.deepcopy(block), fullgraph=True, backend=capture)(x.clone().requires_grad_())
    torch._dynamo.reset()
    return any("while_loop" in gm.code for gm in graphs)


def _assert_same_logdet_and_gradients(x, runs, allow_unused=False):
    """``runs``: ``(module, fn)`` pairs, eager's first, each called on ``x`` with the seed 3
    and, under Inductor, eager's random numbers (``fallback_random``): every run's log-det and
    gradients of ``sum(y**2) + 3 sum(logdet)`` w.r.t. the input and the module's parameters
    are eager's (``allow_unused``: a parameter may get none, in every run alike)."""
    out = []
    with torch._inductor.config.patch(fallback_random=True):
        for module, fn in runs:
            torch.manual_seed(3)
            xr = x.clone().requires_grad_()
            y, logdet = fn(xr)
            grads = torch.autograd.grad(y.square().sum() + 3 * logdet.sum(),
                                        [xr, *module.parameters()], allow_unused=allow_unused)
            out.append((logdet.detach(), grads))
    torch._dynamo.reset()
    (want, want_grads), *others = out
    for got, got_grads in others:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for a, b in zip(want_grads, got_grads):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind, loop_gradients", [
    ("exact", False),
    ("conv_exact", False),
    ("roulette_backprop", False),
    ("conv_roulette", False),
    ("roulette_backprop", True),
    ("conv_roulette_backprop", True),
])
def test_residual_inductor_gradients_match_eager(kind, loop_gradients):
    """Under the default Inductor backend (with eager's random numbers): the exact log-det
    (Inductor differentiates slogdet of the MLP Jacobian's column-major layout wrongly; the
    graph writes the gradient out), the masked roulette with the backpropagated gradient, and
    the Neumann surrogate whose series runs in a while_loop without autograd, give eager's
    values and gradients. With donated buffers (and
    the layout optimisation) off (fastflow.nn._loops), the backpropagated roulette runs a
    while_loop with its gradient through it (the graph holds one; with the default setting it
    does not), and its gradients are eager's too."""
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64) if kind.startswith("conv_") else torch.randn(5, 3)
    block = _block(kind).eval()  # eval: no power-iteration update (the same weights twice)
    with loop_gradient_settings() if loop_gradients else contextlib.nullcontext():
        if kind.endswith("backprop"):
            assert _graph_has_while_loop(block, x) == loop_gradients
        _assert_same_logdet_and_gradients(x, [(block, block),
                                              (block, torch.compile(block, fullgraph=True))])


def test_fastflow_compile_takes_loop_gradients_for_that_model_only():
    """fastflow.compile: the backpropagated roulette on a convolutional branch runs its
    while_loop with gradients under Inductor (the backward lowered with the forward, under the
    settings; the gradients taken after the call) and gives eager's gradients; the program's
    settings are unchanged after."""
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    block = _block("conv_roulette_backprop").eval()
    _assert_same_logdet_and_gradients(x, [(block, block),
                                          (block, fastflow.compile(block, fullgraph=True))])
    assert torch._functorch.config.donated_buffer and torch._inductor.config.layout_optimization
    assert not loop_gradients_in_graph()
    with loop_gradient_settings():
        assert _graph_has_while_loop(block, x)
    with pytest.raises(TypeError, match="fn must be callable"):
        fastflow.compile(3)


@requires_native  # training mode: the roulette on the native trace operator
@pytest.mark.parametrize("method", ["forward", "log_prob"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_residual_flow_fullgraph_matches_eager(method, train):
    _assert_matches_eager(_flow, method, torch.randn(5, 2), train)


# --------------------------------------------------------------------------------------------
# Residual blocks on a branch of the user's own (any module): products by torch.func in the graph


def _user_block(kind):
    """``_block(kind)`` with its branch wrapped in a module the structured paths do not
    recognise."""
    block = _block(kind)
    block.g = _Opaque(block.g)
    return block


@pytest.mark.parametrize("kind, train", [
    ("exact", True), ("exact", False), ("iresnet_series", True), ("iresnet_series", False),
    ("roulette", True), ("roulette", False), ("series_neumann", True), ("conv_exact", False),
    ("conv_roulette", True),
])  # the backpropagated roulette: test_user_branch_backprop_roulette_never_loops_with_gradients
def test_user_branch_block_fullgraph_matches_eager(kind, train):
    """One graph on a branch of unknown structure (eager: the autograd estimators), for every
    estimator and gradient: eager's values, draws, gradients w.r.t. the input and every
    parameter, and spectral-norm state (the branch's own call updates it once; the products'
    calls do not); the module flags and the backend are as before the call."""
    from fastflow.nn import lipschitz

    x = torch.randn(3, 2, 4, 4, dtype=torch.float64) if kind.startswith("conv_") else torch.randn(5, 3)
    block = _assert_matches_eager(lambda: _user_block(kind), "forward", x, train)
    assert all(m.training == train for m in block.modules())
    assert fastflow.get_backend() == "auto" and lipschitz._power_updates


@pytest.mark.parametrize("kind, train", [("roulette", True), ("conv_roulette", False)])
def test_user_branch_without_gradients(kind, train):
    """Under torch.no_grad (evaluation): one graph, eager's values and state, no graph kept."""
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64) if kind.startswith("conv_") else torch.randn(5, 3)
    block = _user_block(kind).train(train)
    twin = copy.deepcopy(block)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.manual_seed(3)
        want = block(x)
        torch.manual_seed(3)
        got = compiled(x)
    for g, w in zip(got, want):
        assert not g.requires_grad
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    for (k, a), b in zip(block.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(b, a, msg=k)


def _user_flow():
    torch.manual_seed(0)
    model = models.ResidualFlow(2, n_blocks=2, hidden=8, n_hidden=1)
    for block in model.blocks:
        block.g = _Opaque(block.g)
    initialize_actnorm(model, torch.randn(16, 2))
    return _unconverged(model)


@pytest.mark.parametrize("method", ["forward", "log_prob"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_user_branch_flow_fullgraph_matches_eager(method, train):
    _assert_matches_eager(_user_flow, method, torch.randn(5, 2), train)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_user_branch_torch_spectral_norm_compiles(train):
    """Branches on torch's spectral-norm parametrization: its power iteration runs once per
    call, in the branch's own call (the products reuse the weights: parametrize's cache), so
    one graph gives eager's values, gradients and ``_u``/``_v`` state."""
    _assert_matches_eager(lambda: _residual_torch_sn(hooks=False)[0], "log_prob", torch.randn(5, 2),
                          train)


def test_user_branch_backprop_roulette_never_loops_with_gradients():
    """Where loops may take gradients (fastflow.nn._loops), the backpropagated roulette on a
    user's branch still runs the capped products (a while_loop with autograd over torch.func
    products gave wrong values, even under aot_eager), and matches eager."""
    x = torch.randn(5, 3)
    with loop_gradient_settings():
        assert not _graph_has_while_loop(_user_block("roulette_backprop").train(), x)
        assert _graph_has_while_loop(_block("roulette_backprop").train(), x)
        _assert_matches_eager(lambda: _user_block("roulette_backprop"), "forward", x, True)


def test_user_branch_inductor_matches_eager():
    """Under Inductor (with eager's random numbers), training mode with the roulette's Neumann
    gradient (its series in a while_loop without autograd): eager's values and gradients."""
    x = torch.randn(5, 3)
    block = _user_block("roulette").train()
    twin = copy.deepcopy(block)
    _assert_same_logdet_and_gradients(
        x, [(block, block), (twin, torch.compile(twin, fullgraph=True))], allow_unused=True
    )


def test_residual_flow_image_under_autocast_compiles():
    """bf16 autocast on convolutional branches (eager: the autograd estimators, in bf16): one
    graph on the torch.func products; its log_prob within bf16 rounding of eager's, its
    gradients as close to float32's as eager's are (both bf16 estimates of the same
    roulette)."""
    torch.manual_seed(0)
    model = models.ResidualFlowImage((1, 4, 4), levels=2, blocks_per_level=1, hidden=4)
    initialize_actnorm(model, torch.randn(8, 1, 4, 4))
    model = _unconverged(model).train()
    x = torch.randn(3, 1, 4, 4)
    explanation = torch._dynamo.explain(copy.deepcopy(model).log_prob)
    with torch.autocast("cpu", torch.bfloat16):
        counts = explanation(x)
    assert counts.graph_count == 1 and counts.graph_break_count == 0
    runs = {}
    for name in ("float32", "eager", "compiled"):
        twin = copy.deepcopy(model)
        fn = torch.compile(twin.log_prob, fullgraph=True, backend="aot_eager") if name == "compiled" else twin.log_prob
        torch.manual_seed(3)
        with torch.autocast("cpu", torch.bfloat16, enabled=name != "float32"):
            lp = fn(x)
        assert lp.dtype == torch.float32
        grads = torch.autograd.grad(lp.sum(), list(twin.parameters()), allow_unused=True)
        runs[name] = (lp.detach(), [g for g in grads if g is not None])

    def gap(name):
        return max((a - b).norm() / b.norm() for a, b in zip(runs[name][1], runs["float32"][1]))

    torch.testing.assert_close(runs["compiled"][0], runs["eager"][0], rtol=2e-2, atol=0.1)
    assert gap("compiled") < 2 * gap("eager") + 1e-2, (gap("compiled"), gap("eager"))


@pytest.mark.parametrize("kind", [pytest.param("roulette", marks=requires_native), "conv_roulette"])
def test_roulette_draw_is_a_tensor_in_the_graph(kind):
    """One compilation serves every draw of the roulette's number of terms (a Python int would
    recompile or break the graph), and each compiled call draws what eager draws."""
    from torch._dynamo.backends.registry import lookup_backend

    compilations = []

    def counting(gm, example_inputs):
        compilations.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    block = _block(kind).eval()  # eval: no power-iteration update between the calls
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64) if kind.startswith("conv_") else torch.randn(5, 3)
    compiled = torch.compile(block, fullgraph=True, backend=counting)
    terms = set()
    with torch.no_grad():
        for seed in range(8):
            torch.manual_seed(seed)
            _, want = block(x)
            want_terms = block.last_terms
            torch.manual_seed(seed)
            _, got = compiled(x)
            assert isinstance(block.last_terms, torch.Tensor) and int(block.last_terms) == want_terms
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            terms.add(want_terms)
    assert len(compilations) == 1
    assert len(terms) > 1, terms  # the draws differ: nothing was folded into the graph


class LogProb(torch.nn.Module):
    def __init__(self, flow):
        super().__init__()
        self.flow = flow

    def forward(self, x):
        return self.flow.log_prob(x)


@pytest.mark.parametrize("name", ["realnvp", "glow", "maf", "planar", "sylvester_orthogonal"])
def test_export_log_prob_matches_eager(name):
    model, x, _ = _build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(LogProb(model), (x,))
    with torch.no_grad():
        want = model.log_prob(x)
        got = program.module()(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # another batch of the same shape: the program is not a constant
        x2 = torch.randn_like(x)
        torch.testing.assert_close(program.module()(x2), model.log_prob(x2), rtol=1e-5, atol=1e-5)
    # the native operators are in the graph as themselves (not decomposed or skipped)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    if name in ("realnvp", "glow", "maf"):
        assert any("fastflow" in t for t in targets), sorted(targets)


# --------------------------------------------------------------------------------------------
# gradients through a while_loop in a graph (fastflow.nn._loops)


def _torch_bug_record(reason):
    """A strict xfail recording a torch bug (its assertion fails while the bug is there): a
    torch without the bug makes the test pass, so fail, naming what fastflow may then change."""
    return pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason)


def _while_loop_weight_gradient_error():
    """The smallest case found of Inductor's wrong ``while_loop`` backward: the initial carry
    ``d * (x @ w)`` and a body that closes over ``d``, ``w`` and ``x``. The loop's body, lowered
    in the backward graph, takes that graph's donated-buffer indices for its own inputs and
    writes the ``x`` gradient's accumulator in place; the graph then reuses that buffer after the
    loop for ``d * grad`` of the initial carry, and the ``w`` gradient is wrong. ``aot_eager``
    must give eager's gradient (checked first). Returns Inductor's largest error."""
    from torch._higher_order_ops import while_loop

    torch.manual_seed(0)
    w = (0.3 * torch.randn(3, 3)).requires_grad_()
    x = torch.randn(4, 3, requires_grad=True)

    def f(x):
        d = torch.sigmoid(x)
        u = d * (x.detach() @ w)

        def body(k, u, total):
            u = d * (u @ w)
            return k + 1, u, total + (u * x).sum(1)

        one = torch.ones((), dtype=torch.int64)
        return while_loop(lambda k, u, total: k < 4, body, (one, u, (u * x).sum(1)))[2]

    (want,) = torch.autograd.grad(f(x).sum(), [w])
    errors = {}
    for backend in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        (got,) = torch.autograd.grad(torch.compile(f, fullgraph=True, backend=backend)(x).sum(), [w])
        errors[backend] = float((got - want).abs().max())
    torch._dynamo.reset()
    assert errors["aot_eager"] < 1e-6, errors
    return errors["inductor"]


@_torch_bug_record("torch 2.13/2.14: Inductor's while_loop backward with donated buffers "
                   "gives a wrong weight gradient here; when this passes, a torch with the fix "
                   "(pytorch/pytorch#193960) is installed and fastflow.nn._loops may allow "
                   "gradients through loops by default")
def test_inductor_while_loop_backward_is_still_wrong():
    assert not loop_gradients_in_graph()  # the default setting
    assert _while_loop_weight_gradient_error() < 1e-5


def _func_loop_errors():
    """The backpropagated roulette's power sums on a user branch's torch.func products
    (fastflow.nn._branch_products.func_products), compiled (aot_eager, donated buffers off):
    through a while_loop with autograd, and through the capped products fastflow runs
    (``loop_gradients=False``). Returns the largest differences of the value and of the
    weight gradient, each against eager's Python loop of the same products."""
    from fastflow.nn._branch_products import func_products, power_sums
    from fastflow.ops.logdet_estimators import roulette_coefficients

    torch.manual_seed(0)
    g = _Opaque(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh())).double()
    with torch.no_grad():
        g.g[0].weight.mul_(0.5)
    x = torch.randn(4, 3, dtype=torch.float64)
    probes = torch.randn(1, 4, 3, dtype=torch.float64)
    n = torch.tensor(3)
    value, _ = roulette_coefficients(n, 0, 0.5)

    def f(x, loops):
        with func_products(g, x) as (_, vjp):
            return power_sums(vjp, probes, value, n, loop_gradients=loops)[0]

    def run(fn):
        out = fn(x)
        return out.detach(), torch.autograd.grad(out.sum(), [g.g[0].weight])[0]

    want = run(lambda x: _eager_sums(g, x, probes, value, 3))
    errors = {}
    with loop_gradient_settings():
        for loops in (True, False):
            torch._dynamo.reset()
            got = run(torch.compile(lambda x, loops=loops: f(x, loops), fullgraph=True,
                                    backend="aot_eager"))
            errors[loops] = max(float((a - b).abs().max()) for a, b in zip(got, want))
    torch._dynamo.reset()
    return errors


def _eager_sums(g, x, probes, value, n):
    """Eager: the same power sums by autograd's products, in a Python loop."""
    xr = x.clone().requires_grad_()
    gx = g(xr)
    u, total = probes[0], None
    for k in range(n):
        (u,) = torch.autograd.grad(gx, xr, u, create_graph=True)
        term = (u * probes[0]).sum(1) * value[k]
        total = term if total is None else total + term
    return total


@_torch_bug_record("torch 2.13: a while_loop with autograd over torch.func products gives "
                   "wrong values and gradients (the capped products are right); when this "
                   "passes, a user branch's backpropagated roulette and CNF adjoint=False "
                   "training with a user's net may loop in the graph")
def test_while_loop_gradients_over_torch_func_are_still_wrong():
    errors = _func_loop_errors()
    assert errors[False] < 1e-10, errors  # the path fastflow takes
    assert errors[True] < 1e-10, errors


def test_inductor_while_loop_backward_is_right_without_donated_buffers():
    """The setting fastflow.nn._loops checks: with donated buffers off, the same case is right."""
    with torch._functorch.config.patch(donated_buffer=False):
        assert loop_gradients_in_graph()
        assert _while_loop_weight_gradient_error() < 1e-5


@_torch_bug_record("torch 2.13: Inductor differentiates slogdet of a matrix laid out "
                   "column-major per sample wrongly (the value is right); when this passes, "
                   "logdet_identity_plus may differentiate slogdet in a graph again")
def test_inductor_slogdet_gradient_of_a_column_major_matrix_is_still_wrong():
    """The torch bug that logdet_identity_plus works around in a compiled graph: slogdet of
    I + J^T under Inductor, J a batch of 3x3 matrices, against eager's gradient. (The
    workaround's own check: test_residual_inductor_gradients_match_eager[exact-False].)"""
    torch.manual_seed(0)
    J = (0.3 * torch.randn(6, 3, 3, dtype=torch.float64)).requires_grad_()

    def logabsdet(J):
        return torch.linalg.slogdet(torch.eye(3, dtype=J.dtype) + J.mT).logabsdet

    want = torch.autograd.grad(logabsdet(J).sum(), J)[0]
    got = torch.autograd.grad(torch.compile(logabsdet, fullgraph=True)(J).sum(), J)[0]
    torch._dynamo.reset()
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


_FLAG = [False]  # a module global that the function below sets, as func_products sets its own


@_torch_bug_record("torch 2.13: Dynamo fails (an internal AssertionError, 'Expected "
                   "FakeTensor') on an autograd.Function whose forward calls torch.func.vjp and "
                   "stores a module global; when this passes, InvertibleBackprop may run "
                   "residual blocks on a user's branch (func_products) in its compiled graph")
def test_dynamo_torch_func_in_a_function_forward_with_a_global_store_still_fails():
    """The torch bug that keeps InvertibleBackprop's residual blocks on a user's branch out of
    its compiled graph (_graph_chain_blocker): func_products, inside the chain's autograd function,
    sets module globals (the backend, the spectral norms' updates) around torch.func calls."""
    lin = torch.nn.Linear(3, 3)

    class Products(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            global _FLAG
            _FLAG = True
            _, pull = torch.func.vjp(lambda v: torch.tanh(lin(v)), x)
            _FLAG = False
            return pull(torch.ones_like(x))[0]

        @staticmethod
        def backward(ctx, g):
            return g

    x = torch.randn(4, 3, requires_grad=True)
    try:
        got = torch.compile(Products.apply, fullgraph=True, backend="aot_eager")(x)
        error = None
    except Exception as exc:  # noqa: BLE001 (Dynamo's internal error is the record)
        got, error = None, exc
    torch._dynamo.reset()
    assert error is None, f"{type(error).__name__}: {str(error).splitlines()[0]}"
    torch.testing.assert_close(got, Products.apply(x))
