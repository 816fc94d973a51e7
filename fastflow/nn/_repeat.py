"""Whether a module's call can be repeated inside a compiled graph.

Where a compiled graph takes vector-Jacobian products of a module of the user's own by
``torch.func`` (a residual branch, :func:`fastflow.nn._branch_products.func_products`; a CNF's
dynamics net, :func:`fastflow.nn._ode_graph.func_dynamics`), it calls the module again at the
same point, inside ``torch.func.vjp`` and often inside a ``while_loop``. That call must give
the same result and change no state: a module that draws random numbers or updates a buffer
in its call cannot be repeated so (``torch.func`` refuses an in-place update of a captured
tensor). :func:`unrepeatable_submodule` finds torch's modules of that kind; the model then
keeps its eager path for that call.
"""

from __future__ import annotations

from torch import nn

__all__ = ["unrepeatable_submodule"]


def unrepeatable_submodule(g: nn.Module) -> nn.Module | None:
    """A submodule of ``g`` whose call cannot be repeated without changing state or results
    (in training mode: dropout, batch statistics; in any mode: torch's hook-based
    ``torch.nn.utils.spectral_norm``), or None. fastflow's spectral norms and torch's
    parametrizations (``torch.nn.utils.parametrizations.spectral_norm``) are not such
    modules."""
    from torch.nn.modules.batchnorm import _NormBase
    from torch.nn.modules.dropout import _DropoutNd
    from torch.nn.utils.spectral_norm import SpectralNorm as _SpectralNormHook

    for m in g.modules():
        # (the hook sets the module's weight attribute on every call, in eval mode too)
        if any(isinstance(h, _SpectralNormHook) for h in m._forward_pre_hooks.values()):
            return m
        if m.training and isinstance(m, (_DropoutNd, _NormBase, nn.RReLU)):
            return m
    return None
