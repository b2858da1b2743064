"""Held-out output error of a compensation, used to fall back to plain slicing.

For one group, with hidden target h (H), kept source channels x_P (K), consumer map B
(H, K) and optional constant c (H), the consumers' output error summed over n held-out
rows is

    E(B, c) = tr(M [G_hh - C B^T - B C^T + B G_PP B^T
                    - s_h c^T - c s_h^T + B s_P c^T + c s_P^T B^T + n c c^T])

with M = sum of W^T W over the consumers, C = sum h x_P^T, G_PP = sum x_P x_P^T, s_h and
s_P the sums of h and x_P. The G_hh term does not depend on (B, c), so two candidate
solutions are compared without it. That matters for cross statistics, which record no
Gram of the original model's hidden values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from grail_graph.core.solve import output_energy_matrix


@dataclass(frozen=True)
class HeldOutMoments:
    """Sums over held-out rows that the output error of any (B, c) needs."""

    cross: np.ndarray
    """C = sum h x_P^T, (H, K)."""
    source_gram: np.ndarray
    """G_PP = sum x_P x_P^T, (K, K)."""
    target_sums: np.ndarray
    """s_h, (H,)."""
    source_sums: np.ndarray
    """s_P, (K,)."""
    count: int


def variable_output_error(
    energy: np.ndarray,
    moments: HeldOutMoments,
    b: np.ndarray,
    c: np.ndarray | None = None,
) -> float:
    """Return E(B, c) - tr(M G_hh): the part of the output error that (B, c) changes.

    `energy` is M (H, H), symmetric. Lower is better; the difference of two values is the
    difference of their output errors.
    """
    mb = energy @ b
    value = -2.0 * float(np.sum(moments.cross * mb))
    value += float(np.sum((b.T @ mb) * moments.source_gram))
    if c is not None:
        mc = energy @ c
        value -= 2.0 * float(moments.target_sums @ mc)
        value += 2.0 * float(moments.source_sums @ (b.T @ mc))
        value += moments.count * float(c @ mc)
    return value


def compensation_gain(
    consumers: Sequence[np.ndarray],
    moments: HeldOutMoments,
    b: np.ndarray,
    c: np.ndarray | None,
    sliced: np.ndarray,
) -> float:
    """Return E(slicing) - E(B, c) on held-out rows: positive when compensation helps.

    `sliced` is the 0/1 selection map of plain slicing, (H, K).
    """
    energy = output_energy_matrix(consumers)
    return variable_output_error(energy, moments, sliced) - variable_output_error(energy, moments, b, c)
