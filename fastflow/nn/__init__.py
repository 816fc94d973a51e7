"""The nn.Modules of fastflow: invertible layers that follow the Transform contract.

Each family lives in its own file; this package re-exports the public layers.
"""

from fastflow.nn.coupling import MASKS, MLP, AdditiveCoupling, AffineCoupling, ConvNet
from fastflow.nn.actnorm import ActNorm, initialize_actnorm
from fastflow.nn.multiscale import SplitPrior, Squeeze, ZeroConv2d
from fastflow.nn.invconv import InvertibleConv1x1
from fastflow.nn.glow import GlowStep, MultiScale
from fastflow.nn.linear import LULinear, OrthogonalLinear, QRLinear, householder_matrix
from fastflow.nn.det_identity import Planar, Radial, Sylvester
from fastflow.nn.autoregressive import (
    MADE,
    BatchNormFlow,
    InverseAutoregressive,
    MaskedAutoregressive,
    Permutation,
)
from fastflow.nn.residual import iResBlock, residual_cnn, residual_mlp
from fastflow.nn.continuous import (
    CNF,
    ConcatConv2d,
    ConcatLinear,
    ConcatSquashConv2d,
    ConcatSquashLinear,
    ODEConvNet,
    ODEnet,
    divergence_exact,
    divergence_hutchinson,
)
from fastflow.nn.invertible import InvertibleBackprop
from fastflow.nn.lipschitz import LipSwish, SpectralNormConv2d, SpectralNormLinear, update_spectral_norms

__all__ = ["MASKS", "AffineCoupling", "AdditiveCoupling", "MLP", "ConvNet",
           "ActNorm", "initialize_actnorm", "Squeeze", "SplitPrior", "ZeroConv2d",
           "InvertibleConv1x1", "GlowStep", "MultiScale",
           "LULinear", "OrthogonalLinear", "QRLinear", "householder_matrix",
           "Planar", "Radial", "Sylvester",
           "MADE", "MaskedAutoregressive", "InverseAutoregressive", "Permutation", "BatchNormFlow",
           "iResBlock", "residual_mlp", "residual_cnn",
           "SpectralNormLinear", "SpectralNormConv2d", "LipSwish", "update_spectral_norms",
           "CNF", "ConcatLinear", "ConcatSquashLinear", "ODEnet", "divergence_exact",
           "divergence_hutchinson", "ConcatConv2d", "ConcatSquashConv2d", "ODEConvNet",
           "InvertibleBackprop"]
