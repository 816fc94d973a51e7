"""fastflow: normalizing flows for PyTorch with hand-written C++/CUDA operators.

The public API: the Transform contract and Flow, the base distributions, the layers
(:mod:`fastflow.nn`), the model builders (:mod:`fastflow.models`), the functional operators
(:mod:`fastflow.ops`), data (:mod:`fastflow.data`), checkpoints (:mod:`fastflow.checkpoint`),
pictures (:mod:`fastflow.plots`) and the backend switch; the command line is ``python -m fastflow``.
"""

from fastflow._native import backend, get_backend, native_available, native_load_error
from fastflow import ops
from fastflow.flow import (
    Compose,
    ConvergenceError,
    ConvergenceWarning,
    Flow,
    InverseNotAvailable,
    Transform,
)
from fastflow.distributions import DiagonalGaussian, StandardNormal
from fastflow import data, images, models, nn
from fastflow import checkpoint, plots  # plots imports matplotlib only when drawing
from fastflow.memory import track_peak_memory
from fastflow.nn._loops import compile

__version__ = "0.1.0"

__all__ = [
    "Compose",
    "ConvergenceError",
    "ConvergenceWarning",
    "DiagonalGaussian",
    "Flow",
    "InverseNotAvailable",
    "StandardNormal",
    "Transform",
    "backend",
    "checkpoint",
    "compile",
    "data",
    "get_backend",
    "images",
    "models",
    "native_available",
    "native_load_error",
    "nn",
    "ops",
    "plots",
    "track_peak_memory",
]
