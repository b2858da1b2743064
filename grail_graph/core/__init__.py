"""Numeric core of GRAIL: Gram statistics, closed-form compensation and channel selection.

Only numpy and the standard library are needed at import time. The folding
functions ``fold_features`` and ``cluster_channels`` import scikit-learn when
called. See ``solve.py`` for the closed form B = G[:, P] (G[P, P] + lam I)^-1
and its merge variant.
"""

from __future__ import annotations

from .affine import affine_prune_map, affine_reconstruction_error, bias_correction
from .allocation import (
    ALLOCATION_METHODS,
    AllocationGroup,
    allocate_widths,
    error_curve,
    flap_scores,
)
from .cross import CrossAccumulator, affine_cross_map, cross_map
from .fallback import HeldOutMoments, compensation_gain, variable_output_error
from .folding import cluster_channels, fold_features, fold_linear_chain, fold_producer
from .gram import GramAccumulator
from .selectors import (
    SELECTORS,
    gram_greedy_select,
    kept_width,
    magnitude_scores,
    random_select,
    select_channels,
    top_k,
    wanda_scores,
)
from .solve import (
    absorb,
    averaging_matrix,
    fold_map,
    output_energy_matrix,
    prune_map,
    reconstruction_error,
    relative_reconstruction_error,
    ridge_lambda,
    slice_map,
    solve_spd,
)

__all__ = [
    "HeldOutMoments",
    "compensation_gain",
    "variable_output_error",
    "ALLOCATION_METHODS",
    "SELECTORS",
    "AllocationGroup",
    "CrossAccumulator",
    "GramAccumulator",
    "absorb",
    "affine_cross_map",
    "affine_prune_map",
    "affine_reconstruction_error",
    "allocate_widths",
    "averaging_matrix",
    "bias_correction",
    "cluster_channels",
    "cross_map",
    "error_curve",
    "flap_scores",
    "fold_features",
    "fold_linear_chain",
    "fold_map",
    "fold_producer",
    "gram_greedy_select",
    "kept_width",
    "magnitude_scores",
    "output_energy_matrix",
    "prune_map",
    "random_select",
    "reconstruction_error",
    "relative_reconstruction_error",
    "ridge_lambda",
    "select_channels",
    "slice_map",
    "solve_spd",
    "top_k",
    "wanda_scores",
]
