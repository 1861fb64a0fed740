"""A screened Poisson solve with no-flux boundaries by the discrete cosine transform.

On a cell-centred grid the 5-point (in d dimensions 2d+1-point) Laplacian with homogeneous
Neumann conditions is diagonal in the DCT-II basis, with eigenvalues
lambda_k = sum_axes (2 - 2 cos(pi k_a / n_a)) / h_a^2. ``ScreenedPoisson`` solves
(a L + b) u = f, L = -Laplacian, in O(n log n): one forward and one inverse transform.
"""

from __future__ import annotations

import numpy as np
from scipy import fft


def neumann_symbol(shape, spacing) -> np.ndarray:
    """The eigenvalues of the Neumann Laplacian -L in the DCT-II basis, of the grid's shape."""
    eigen = np.zeros(shape)
    for axis, (n, h) in enumerate(zip(shape, spacing, strict=True)):
        values = (2.0 - 2.0 * np.cos(np.pi * np.arange(n) / n)) / h**2
        eigen = eigen + values.reshape([-1 if k == axis else 1 for k in range(len(shape))])
    return eigen


def heat(values: np.ndarray, spacing, time: float) -> np.ndarray:
    """The discrete heat flow exp(t L) of grid values (no-flux boundary): mass is kept."""
    symbol = np.exp(-time * neumann_symbol(values.shape, spacing))
    return fft.idctn(fft.dctn(values, type=2, norm="ortho") * symbol, type=2, norm="ortho")


class ScreenedPoisson:
    """(stiffness * L + shift) u = f on a grid of ``shape`` and ``spacing``; shift > 0."""

    def __init__(self, shape, spacing, stiffness: float, shift: float):
        self.symbol = stiffness * neumann_symbol(shape, spacing) + shift

    def solve(self, f: np.ndarray) -> np.ndarray:
        spectrum = fft.dctn(f, type=2, norm="ortho")
        spectrum /= self.symbol  # in place, and the inverse transform may overwrite it: no temporaries
        return fft.idctn(spectrum, type=2, norm="ortho", overwrite_x=True)

    def inner(self, u: np.ndarray, v: np.ndarray) -> float:
        """<u, v> in the metric of the operator: sum u (a L + b) v (per cell)."""
        return float(np.sum(fft.dctn(u, type=2, norm="ortho") * fft.dctn(v, type=2, norm="ortho")
                            * self.symbol))
