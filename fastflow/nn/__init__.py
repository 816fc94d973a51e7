"""The nn.Modules of fastflow: invertible layers that follow the Transform contract.

Each family lives in its own file; this package re-exports the public layers.
"""

from fastflow.nn.coupling import MASKS, MLP, AdditiveCoupling, AffineCoupling, ConvNet

__all__ = ["MASKS", "AffineCoupling", "AdditiveCoupling", "MLP", "ConvNet"]
