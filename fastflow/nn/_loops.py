"""When a compiled graph may take a gradient through ``torch._higher_order_ops.while_loop``.

fastflow runs two kinds of data-dependent loops inside a compiled graph as ``while_loop``: the
Russian-roulette power series of a residual block (:mod:`fastflow.nn._branch_products`) and the
CNF's ODE solve (:mod:`fastflow.nn._ode_graph`). Without autograd they are always right. With
autograd, torch builds the loop's backward as another ``while_loop`` in the backward graph, and
Inductor (torch 2.13 and 2.14 checked) gets that wrong: it lowers the loop's body as a subgraph
that inherits the backward graph's *donated-buffer* indices, which number a different list of
inputs. A carried input of the body can then be marked donated and overwritten in place, while
the graph reuses the same buffer after the loop: the gradients come out wrong, silently
(upstream: pytorch/pytorch pull request 193960, "Keep subgraph inputs from inheriting donation
indices"). ``tests/test_compile_export.py`` keeps a strict record of the bug.

With ``torch._functorch.config.donated_buffer = False`` no backward input is donated, and the
loops' gradients under Inductor equal eager's (the tests check this). fastflow does not change
that setting for the whole program (donated buffers save memory in every compiled backward).
:func:`compile` is ``torch.compile`` with the settings this module names applied while the
compiled function runs (and its backward lowered then, not at the first ``backward()``), so they
hold for the fastflow model's graphs only::

    log_prob = fastflow.compile(model.log_prob, fullgraph=True)

Or set them for the program, before the compiled model first runs::

    torch._functorch.config.donated_buffer = False
    torch._inductor.config.layout_optimization = False  # loops over convolutions (below)
    model = torch.compile(model, fullgraph=True)

Then the roulette's backpropagated series runs exactly the drawn number of products in a
compiled graph (not every product up to the cap), and a CNF trained on the in-graph solvers
(``adjoint=False`` through the solver's steps, ``adjoint=True`` by the adjoint solve) compiles
into one graph. With the default settings these keep the safe paths (the capped product loop;
the eager torchdiffeq solve). Dynamo guards on the settings, so a change recompiles.

Loops over convolutions (convolutional residual branches, :class:`~fastflow.nn.ODEConvNet`
dynamics) also need ``torch._inductor.config.layout_optimization = False``: Inductor otherwise
turns the convolutions' gradients in the loop's backward channels-last, and ``while_loop``
refuses a carry whose strides change (an error when the graph compiles).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["compile", "loop_gradient_settings", "loop_gradients_in_graph"]


def loop_gradients_in_graph(convolutions: bool = False) -> bool:
    """Whether a compiled graph may backpropagate through a ``while_loop`` (module docstring):
    ``True`` when ``torch._functorch.config.donated_buffer`` is off, and, for a loop over
    convolutions, ``torch._inductor.config.layout_optimization`` too."""
    if torch._functorch.config.donated_buffer:
        return False
    return not (convolutions and torch._inductor.config.layout_optimization)


@contextlib.contextmanager
def loop_gradient_settings() -> Iterator[None]:
    """The settings under which :func:`loop_gradients_in_graph` holds, for the block: donated
    buffers off, Inductor's layout optimisation off (loops over convolutions), and the backward
    graph lowered with the forward (so that it is lowered under these settings too)."""
    with torch._functorch.config.patch(donated_buffer=False, force_non_lazy_backward_lowering=True), \
            torch._inductor.config.patch(layout_optimization=False):
        yield


def compile(fn: Callable[..., Any], **kwargs: Any) -> Callable[..., Any]:  # noqa: A001
    """``torch.compile(fn, **kwargs)`` whose calls run under :func:`loop_gradient_settings`: a
    fastflow model's loops then take their gradients inside the graph (module docstring),
    without changing the settings for the rest of the program.

    Arguments:
        fn: what ``torch.compile`` takes: a module, a function or a bound method such as
            ``model.log_prob``.
        kwargs: ``torch.compile``'s (``fullgraph``, ``backend``, ``mode``, ...).

    Returns:
        A function with ``fn``'s signature; ``.compiled`` is ``torch.compile``'s result.

    Example:
        >>> import fastflow
        >>> model = fastflow.models.FFJORD(2, hidden=(8,), solver="euler", step_size=0.25)
        >>> log_prob = fastflow.compile(model.log_prob, fullgraph=True, backend="aot_eager")
        >>> loss = -log_prob(torch.randn(4, 2)).mean()
        >>> loss.backward()
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable (a module, function or method), got {type(fn).__name__}")
    compiled = torch.compile(fn, **kwargs)

    @functools.wraps(fn, updated=())  # (not a module's __dict__)
    def run(*args: Any, **kw: Any) -> Any:
        with loop_gradient_settings():
            return compiled(*args, **kw)

    run.compiled = compiled  # type: ignore[attr-defined]
    return run
