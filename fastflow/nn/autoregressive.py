"""Autoregressive flows: :class:`MADE`, the layers :class:`MaskedAutoregressive` (MAF) and
:class:`InverseAutoregressive` (IAF), and the layers that go between them
(:class:`Permutation`, :class:`BatchNormFlow`). The stacked models are
:class:`fastflow.models.MAF` and :class:`fastflow.models.IAF`.

MADE (Germain et al.) is a fully connected network whose weight masks make output ``i`` depend
only on the inputs that come before ``i`` in a chosen order. MAF (Papamakarios et al.) uses it to
give every feature its own affine map conditioned on the features before it:

``z_i = x_i * s(h_i(x_<i)) + t_i(x_<i)``,  ``log|det dz/dx| = sum_i log s(h_i)``,

with the scale activations of the coupling operator (``"exp"`` of a soft-clamped log-scale,
``"sigmoid"``, ``"additive"``); the elementwise part and its log-det run in
:func:`fastflow.ops.affine_coupling` (native where built). The density direction (``forward``)
is one pass; the sampling direction (``inverse``) takes ``D`` sequential passes, pass ``k``
fixing the ``k``-th feature of the order. IAF (Kingma et al.) is the same layer used the other
way round: sampling in one pass, density in ``D``.

References:
    Germain, Gregor, Murray, Larochelle. "MADE: Masked Autoencoder for Distribution Estimation"
    (2015), https://arxiv.org/abs/1502.03509.
    Papamakarios, Pavlakou, Murray. "Masked Autoregressive Flow for Density Estimation" (2017),
    https://arxiv.org/abs/1705.07057.
    Kingma, Salimans, Jozefowicz, Chen, Sutskever, Welling. "Improving Variational Inference
    with Inverse Autoregressive Flow" (2016), https://arxiv.org/abs/1606.04934.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fastflow.flow import Transform
from fastflow.nn.coupling import check_layer_input
from fastflow.ops.affine_coupling import affine_coupling, affine_coupling_inverse
from fastflow._checks import positive_int as _positive_int

__all__ = ["MADE", "MaskedAutoregressive", "InverseAutoregressive", "Permutation", "BatchNormFlow"]

_ACTIVATIONS = ("exp", "sigmoid", "additive")


def _order(features: int, order) -> Tensor:
    """The autoregressive order as a permutation of ``0..features-1`` (``order[k]`` is the
    ``k``-th feature)."""
    if order is None or (isinstance(order, str) and order == "sequential"):
        return torch.arange(features)
    if isinstance(order, str):
        if order == "reverse":
            return torch.arange(features - 1, -1, -1)
        raise ValueError(
            f"order must be 'sequential', 'reverse' or a permutation of 0..{features - 1}, "
            f"got {order!r}"
        )
    perm = torch.as_tensor(order)
    if perm.dim() != 1 or perm.numel() != features or perm.is_floating_point() or not torch.equal(
        perm.sort().values, torch.arange(features)
    ):
        raise ValueError(f"order must be a permutation of 0..{features - 1}, got {order!r}")
    return perm.long()


class _MaskedLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, mask: Tensor):
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """Masked autoencoder: ``[B, D]`` (and context ``[B, K]``) to ``[B, n_params * D]``.

    The output holds ``n_params`` blocks of ``D`` (block ``j`` is ``out[:, j*D:(j+1)*D]``), and
    entry ``i`` of every block depends only on the inputs before ``i`` in ``order`` (and on the
    context, which enters the first hidden layer unmasked). Hidden unit degrees cycle through
    ``1..D-1`` (deterministic, as nflows does without random masks).

    Arguments:
        features: ``D``.
        hidden: widths of the hidden layers (an int: two layers of that width).
        n_params: parameters per feature (2 for an affine map, 1 for a shift).
        context_features: width of the context, or None.
        order: ``"sequential"`` (default), ``"reverse"``, or a permutation of ``0..D-1``
            (``order[k]`` is the ``k``-th feature).
        zero_init: zero the output layer, so the flow built on it starts at its identity.

    Example:
        >>> made = MADE(3, hidden=16, n_params=2)
        >>> made(torch.randn(5, 3)).shape
        torch.Size([5, 6])
    """

    def __init__(
        self,
        features: int,
        hidden: int | Sequence[int] = 128,
        n_params: int = 2,
        context_features: int | None = None,
        order="sequential",
        zero_init: bool = True,
    ):
        super().__init__()
        D = _positive_int(features, "features")
        self.features = D
        self.n_params = _positive_int(n_params, "n_params")
        widths = [hidden, hidden] if isinstance(hidden, int) else list(hidden)
        for w in widths:
            _positive_int(w, "hidden")
        if context_features is not None:
            _positive_int(context_features, "context_features")
        self.context_features = context_features
        perm = _order(D, order)
        self.register_buffer("order", perm)
        self.order_list = perm.tolist()  # the same, for Python loops (no device read, traceable)
        self.register_load_state_dict_post_hook(MADE._refresh_order_list)
        deg_in = torch.empty(D, dtype=torch.long)
        deg_in[perm] = torch.arange(1, D + 1)  # feature order[k] has degree k + 1
        self.register_buffer("degrees", deg_in)
        layers = []
        prev = deg_in
        width_in = D
        for w in widths:
            deg = torch.arange(w) % max(1, D - 1) + 1
            mask = (deg[:, None] >= prev[None, :])  # hidden unit sees inputs of degree <= its own
            layers.append(_MaskedLinear(width_in, w, mask))
            prev, width_in = deg, w
        out_deg = deg_in.repeat(self.n_params)
        out_mask = out_deg[:, None] > prev[None, :]  # strictly: output i never sees input i
        self.hidden_layers = nn.ModuleList(layers)
        self.output = _MaskedLinear(width_in, self.n_params * D, out_mask)
        if zero_init:
            nn.init.zeros_(self.output.weight)
            nn.init.zeros_(self.output.bias)
        # the context enters the first hidden layer (or the output, without hidden layers)
        self.context = (
            nn.Linear(context_features, widths[0] if widths else self.n_params * D)
            if context_features
            else None
        )

    @staticmethod
    def _refresh_order_list(module: "MADE", incompatible_keys) -> None:
        module.order_list = module.order.tolist()

    def extra_repr(self) -> str:
        return f"features={self.features}, n_params={self.n_params}"

    def _check_context(self, context: Tensor | None) -> None:
        if (context is None) != (self.context_features is None):
            raise ValueError(
                "context must be given exactly when the network was built with context_features"
            )

    def prepare(self, context: Tensor | None = None) -> tuple[list[tuple[Tensor, Tensor]], Tensor | None]:
        """The masked weights and biases, and the context's contribution, for repeated calls of
        :meth:`apply` (``D`` sequential passes form them once instead of ``D`` times)."""
        self._check_context(context)
        layers = list(self.hidden_layers) + [self.output]
        params = [(layer.weight * layer.mask, layer.bias) for layer in layers]
        ctx = self.context(context) if context is not None else None
        return params, ctx

    def apply(self, x: Tensor, prepared: tuple[list[tuple[Tensor, Tensor]], Tensor | None]) -> Tensor:
        """The network on ``x`` with parameters from :meth:`prepare`."""
        params, ctx = prepared
        h = x
        for k, (w, b) in enumerate(params[:-1]):
            h = F.linear(h, w, b)
            if k == 0 and ctx is not None:
                h = h + ctx
            h = F.relu(h)
        w, b = params[-1]
        out = F.linear(h, w, b)
        if len(params) == 1 and ctx is not None:
            out = out + ctx
        return out

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.apply(x, self.prepare(context))


class MaskedAutoregressive(Transform):
    """One masked autoregressive affine layer (MAF) on vectors ``[B, D]``.

    ``forward`` (data to latent, one pass): ``z = x * s(h(x)) + t(x)`` elementwise, with
    ``(h, t)`` from a :class:`MADE` and ``s`` the activation; ``inverse`` (latent to data):
    ``D`` passes. :class:`InverseAutoregressive` swaps the two.

    Arguments:
        features: ``D``.
        hidden: the MADE's hidden widths.
        context_features: width of the context, or None.
        activation: ``"exp"`` (default; soft-clamped by ``clamp``), ``"sigmoid"`` or
            ``"additive"`` (volume-preserving shift only).
        clamp: soft clamp of the ``"exp"`` activation (``math.inf``: none).
        order: the autoregressive order (see :class:`MADE`).

    Example:
        >>> layer = MaskedAutoregressive(4, hidden=16)
        >>> x = torch.randn(8, 4)
        >>> z, logdet = layer(x)
        >>> x2, _ = layer.inverse(z)
        >>> torch.allclose(x, x2, atol=1e-5)
        True
    """

    def __init__(
        self,
        features: int,
        hidden: int | Sequence[int] = 128,
        context_features: int | None = None,
        activation: str = "exp",
        clamp: float = 2.0,
        order="sequential",
    ):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        self.clamp = float(clamp)
        n_params = 1 if activation == "additive" else 2
        self.made = MADE(features, hidden, n_params, context_features, order)
        self.features = self.made.features

    def extra_repr(self) -> str:
        return f"features={self.features}, activation={self.activation!r}"

    def _check(self, x: Tensor, name: str) -> None:
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.features:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must have shape [B, {self.features}], got {shape}")
        check_layer_input(self, x, name)

    def _params(self, x: Tensor, prepared) -> tuple[Tensor | None, Tensor]:
        out = self.made.apply(x, prepared)
        D = self.features
        if self.activation == "additive":
            return None, out
        return out[:, :D], out[:, D:]

    def _density(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        log_scale, shift = self._params(x, self.made.prepare(context))
        return affine_coupling(x, log_scale, shift, self.activation, self.clamp)

    def _generate_naive(self, z: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """The textbook inverse: ``D`` full MADE passes, pass ``k`` fixing feature
        ``order[k]``. Kept as the oracle of :meth:`_generate`."""
        x = torch.zeros_like(z)
        logdet = None
        prepared = self.made.prepare(context)
        for _ in range(self.features):
            log_scale, shift = self._params(x, prepared)
            x, logdet = affine_coupling_inverse(z, log_scale, shift, self.activation, self.clamp)
        return x, logdet

    def _generate(self, z: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        # The same D passes as _generate_naive, with two savings that do not change the result:
        # pass k only needs the output rows of feature i = order[k] (2 rows instead of 2 D), and
        # fixing x_i changes the first layer's pre-activation by the rank-one term
        # x_i * W1[:, i], so it is updated instead of recomputed (B x H instead of B x D x H).
        params, ctx = self.made.prepare(context)
        D = self.features
        w_out, b_out = params[-1]
        w_in = params[0][0]
        pre = params[0][1].expand(z.shape[0], -1)
        if ctx is not None:
            pre = pre + ctx
        columns: list[Tensor | None] = [None] * D
        logdet = z.new_zeros(z.shape[0], dtype=torch.promote_types(z.dtype, torch.float32))
        rows = [0] if self.activation == "additive" else [0, D]
        for k in self.made.order_list:
            idx = [r + k for r in rows]
            if len(params) == 1:
                out = pre[:, idx]  # no hidden layer: pre is the output's pre-activation
            else:
                h = torch.relu(pre)
                for w, b in params[1:-1]:
                    h = torch.relu(F.linear(h, w, b))
                out = F.linear(h, w_out[idx], b_out[idx])
            z_k = z[:, k : k + 1]
            if self.activation == "additive":
                x_k, ld = affine_coupling_inverse(z_k, None, out[:, :1].contiguous(), "additive")
            else:
                x_k, ld = affine_coupling_inverse(
                    z_k, out[:, :1].contiguous(), out[:, 1:].contiguous(), self.activation, self.clamp
                )
            columns[k] = x_k
            logdet = logdet + ld
            pre = pre + x_k * w_in[:, k]
        return torch.cat(columns, dim=1), logdet

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x, "x")
        return self._density(x, context)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(z, "z")
        return self._generate(z, context)


class InverseAutoregressive(MaskedAutoregressive):
    """Inverse autoregressive flow (IAF): a :class:`MaskedAutoregressive` layer used the other
    way round.

    ``inverse`` (latent to data, sampling) is one pass, ``x = z * s(h(z)) + t(z)``; ``forward``
    (data to latent, density) takes ``D`` passes. Same arguments as :class:`MaskedAutoregressive`.
    """

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x, "x")
        return self._generate(x, context)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(z, "z")
        return self._density(z, context)


class Permutation(Transform):
    """A fixed permutation of the features (dimension 1); log-det 0.

    Arguments:
        features: ``D``.
        perm: a permutation of ``0..D-1`` (``z[:, i] = x[:, perm[i]]``), ``"reverse"`` (default)
            or ``"random"`` (drawn from torch's generator at construction; saved in the state
            dict).
    """

    def __init__(self, features: int, perm="reverse"):
        super().__init__()
        D = _positive_int(features, "features")
        if isinstance(perm, str) and perm == "random":
            p = torch.randperm(D)
        else:
            try:
                p = _order(D, perm)
            except ValueError:
                raise ValueError(
                    f"perm must be 'reverse', 'random' or a permutation of 0..{D - 1}, got {perm!r}"
                ) from None
        self.features = D
        self.register_buffer("perm", p)
        self.register_buffer("inverse_perm", torch.argsort(p))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x.index_select(1, self.perm), x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return z.index_select(1, self.inverse_perm), z.new_zeros(z.shape[0])


class BatchNormFlow(Transform):
    """Batch normalisation as a flow layer (MAF paper): ``z = (x - mean) / sqrt(var + eps) *
    exp(log_gamma) + beta`` per feature.

    In training the batch's statistics are used (and the running averages updated); in eval
    mode, and always in ``inverse``, the running averages. ``log|det dz/dx| = sum(log_gamma -
    0.5 log(var + eps))``.

    Arguments:
        features: ``D``.
        momentum: weight of the new batch in the running averages.
        eps: added to the variance.
    """

    def __init__(self, features: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        D = _positive_int(features, "features")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum!r}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        self.features, self.momentum, self.eps = D, float(momentum), float(eps)
        self.log_gamma = nn.Parameter(torch.zeros(D))
        self.beta = nn.Parameter(torch.zeros(D))
        self.register_buffer("running_mean", torch.zeros(D))
        self.register_buffer("running_var", torch.ones(D))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.training:
            if x.shape[0] < 2:
                raise ValueError("BatchNormFlow needs a batch of at least 2 in training mode")
            mean = x.mean(0)
            var = x.var(0, unbiased=False)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach(), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        z = (x - mean) * torch.rsqrt(var + self.eps) * self.log_gamma.exp() + self.beta
        logdet = (self.log_gamma - 0.5 * torch.log(var + self.eps)).sum()
        return z, logdet.expand(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        mean, var = self.running_mean, self.running_var
        x = (z - self.beta) * torch.exp(-self.log_gamma) * torch.sqrt(var + self.eps) + mean
        logdet = -(self.log_gamma - 0.5 * torch.log(var + self.eps)).sum()
        return x, logdet.expand(z.shape[0])
