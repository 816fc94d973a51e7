"""The nn.Modules of fastflow: invertible layers that follow the Transform contract.

Each family lives in its own file; this package re-exports the public layers.
"""

from fastflow.nn.coupling import MASKS, MLP, AdditiveCoupling, AffineCoupling, ConvNet
from fastflow.nn.actnorm import ActNorm, initialize_actnorm
from fastflow.nn.multiscale import SplitPrior, Squeeze, ZeroConv2d
from fastflow.nn.invconv import InvertibleConv1x1
from fastflow.nn.glow import GlowStep, MultiScale

__all__ = ["MASKS", "AffineCoupling", "AdditiveCoupling", "MLP", "ConvNet",
           "ActNorm", "initialize_actnorm", "Squeeze", "SplitPrior", "ZeroConv2d",
           "InvertibleConv1x1", "GlowStep", "MultiScale"]
