"""Numeric core of GRAIL: Gram statistics, closed-form compensation and channel selection.

Only numpy and the standard library are used here. See ``solve.py`` for the
closed form B = G[:, P] (G[P, P] + lam I)^-1 and its merge variant.
"""

from __future__ import annotations

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
    "SELECTORS",
    "GramAccumulator",
    "absorb",
    "averaging_matrix",
    "fold_map",
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
