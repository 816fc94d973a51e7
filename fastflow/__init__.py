"""fastflow: normalizing flows for PyTorch with hand-written C++/CUDA operators."""

from fastflow._native import backend, get_backend, native_available, native_load_error
from fastflow import ops

__version__ = "0.1.0"

__all__ = ["backend", "get_backend", "native_available", "native_load_error", "ops"]
