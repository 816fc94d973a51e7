"""The benchmark cases, one module per family; each module has ``groups(device, dtype, quick)``.

``quick=True`` shrinks every case to a tiny workload (the smoke test, and ``--quick``): it
exercises the harness end to end and says nothing about speed.
"""

from __future__ import annotations

import torch

from bench.cases import (
    affine_coupling,
    ffjord,
    glow_step,
    invconv,
    invertible,
    maf,
    realnvp,
    residual,
    spectral_norm,
)
from bench.harness import Group

__all__ = ["FAMILIES", "all_groups"]

FAMILIES = (affine_coupling, invconv, glow_step, realnvp, maf, spectral_norm, residual, invertible, ffjord)


def all_groups(device: torch.device, dtype: torch.dtype, quick: bool = False) -> list[Group]:
    """Every group of every family, in a fixed order."""
    out: list[Group] = []
    for family in FAMILIES:
        out.extend(family.groups(device, dtype, quick=quick))
    return out
