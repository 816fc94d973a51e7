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
that setting itself: donated buffers save memory in every compiled backward of the program, so
it is the user's choice. Set it before the compiled model first runs::

    torch._functorch.config.donated_buffer = False
    model = torch.compile(model, fullgraph=True)

Then the roulette's backpropagated series runs exactly the drawn number of products in a
compiled graph (not every product up to the cap), and a CNF trained on the in-graph solvers
(``adjoint=False`` through the solver's steps, ``adjoint=True`` by the adjoint solve) compiles
into one graph. With the default setting these keep the safe
paths (the capped product loop; the eager torchdiffeq solve). Dynamo guards on the setting, so
a change recompiles.

Loops over convolutions (convolutional residual branches, :class:`~fastflow.nn.ODEConvNet`
dynamics) also need ``torch._inductor.config.layout_optimization = False``: Inductor otherwise
turns the convolutions' gradients in the loop's backward channels-last, and ``while_loop``
refuses a carry whose strides change (an error when the graph compiles).
"""

from __future__ import annotations

import torch

__all__ = ["loop_gradients_in_graph"]


def loop_gradients_in_graph(convolutions: bool = False) -> bool:
    """Whether a compiled graph may backpropagate through a ``while_loop`` (module docstring):
    ``True`` when ``torch._functorch.config.donated_buffer`` is off, and, for a loop over
    convolutions, ``torch._inductor.config.layout_optimization`` too."""
    if torch._functorch.config.donated_buffer:
        return False
    return not (convolutions and torch._inductor.config.layout_optimization)
