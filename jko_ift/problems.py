"""Named problems: closed-form flows for tests and studies, and the paper's 2-D targets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .diagnostics import mmd
from .energies import MMD2, Energy, Entropy, Potential
from .geometries import IFT, MMD, Geometry, Wasserstein
from .kernels import Gaussian
from .measures import Grid, Measure

#: The paper's 2-D mixture target (Gladin et al. 2024, section 5): equal weights.
PAPER_MIXTURE = (
    ((0.0, 0.0), ((1.0, 0.5), (0.5, 2.0))),
    ((3.0, -1.0), ((1.0, 0.0), (0.0, 1.0))),
    ((1.0, 4.0), ((3.0, 0.5), (0.5, 1.0))),
)


@dataclass(frozen=True)
class Problem:
    """An energy, a geometry, an initial measure and a horizon; ``error(trajectory)`` is the
    largest distance of the saved measures to the reference (a closed form if there is one)."""

    name: str
    energy: Energy
    geometry: Geometry
    initial: Measure
    t_final: float
    error: Callable | None = None


def gaussian_density(mean, covariance) -> Callable[[np.ndarray], np.ndarray]:
    """The normal density N(mean, covariance) as a callable on points (n, d)."""
    mean, covariance = np.atleast_1d(mean).astype(float), np.atleast_2d(covariance).astype(float)
    precision = np.linalg.inv(covariance)
    norm = np.sqrt(np.linalg.det(2 * np.pi * covariance))

    def density(x):
        centred = x - mean
        return np.exp(-0.5 * np.einsum("ni,ij,nj->n", centred, precision, centred)) / norm

    return density


def paper_mixture_density(x: np.ndarray) -> np.ndarray:
    """The paper's equal-weight mixture of three 2-D Gaussians, on points (n, 2)."""
    return sum(gaussian_density(m, c)(x) for m, c in PAPER_MIXTURE) / len(PAPER_MIXTURE)


def mmd_flow(cells: int = 30, kernel_width: float = 1.0, t_final: float = 5.0) -> Problem:
    """1/2 MMD^2 in the MMD geometry on a 1-D grid: mu_t = pi + e^{-t}(mu_0 - pi) exactly."""
    grid = Grid(-3, 3, cells)
    kernel = Gaussian(kernel_width)
    mu0 = grid.measure(gaussian_density(1.5, 0.25), normalize=True)
    target = grid.measure(gaussian_density(-1.0, 0.4), normalize=True)

    def error(trajectory):
        return max(mmd(mu, target.with_weights(target.weights + np.exp(-t) * (mu0.weights - target.weights)),
                       kernel) for t, mu in zip(trajectory.times, trajectory.measures, strict=True))

    return Problem("mmd_flow", MMD2(target, kernel), MMD(kernel), mu0, t_final, error)


def ornstein_uhlenbeck(cells: int = 300, mean: float = 3.0, sd: float = 1.0, kappa: float = 1.0,
                       t_final: float = 3.0) -> Problem:
    """Fokker-Planck F = Entropy + kappa |x|^2 / 2 under W2 on a 1-D grid, from N(mean, sd^2):
    N(mean e^{-kappa t}, 1/kappa + (sd^2 - 1/kappa) e^{-2 kappa t}) exactly (docs/theory.md §5).
    The error is |mean - m(t)| + |sd - s(t)| (grid error about h^2 below it)."""
    grid = Grid(mean - 6 * sd - 2, mean + 6 * sd, cells)
    mu0 = grid.measure(gaussian_density(mean, sd**2), normalize=True)
    energy = Entropy() + Potential(lambda x: 0.5 * kappa * x[:, 0] ** 2, lambda x: kappa * x)

    def error(trajectory):
        worst = 0.0
        for t, mu in zip(trajectory.times, trajectory.measures, strict=True):
            m_t = mean * np.exp(-kappa * t)
            s_t = np.sqrt(1 / kappa + (sd**2 - 1 / kappa) * np.exp(-2 * kappa * t))
            worst = max(worst, abs(mu.mean()[0] - m_t) + abs(np.sqrt(mu.covariance()[0, 0]) - s_t))
        return worst

    return Problem("ornstein_uhlenbeck", energy, Wasserstein(), mu0, t_final, error)


def ift_paper_mixture(cells: int = 14, kernel_width: float = 2.0, alpha: float = 5.0,
                      beta: float = 1.0, t_final: float = 2.0) -> Problem:
    """IFT flow of 1/2 MMD^2 to the paper's 2-D mixture target, from N((3, 3), I), on a grid of
    [-4, 7]^2. No closed form: ``error`` is None; compare with a run of much smaller tau.
    (The paper's particles start at (5, 5) with kernel width 10; a grid holding both and a
    Gram matrix that is not numerically of rank one need a closer start and a narrower kernel.)
    """
    grid = Grid([-4.0, -4.0], [7.0, 7.0], [cells, cells])
    target = grid.measure(paper_mixture_density, normalize=True)
    mu0 = grid.measure(gaussian_density([3.0, 3.0], np.eye(2)), normalize=True)
    kernel = Gaussian(kernel_width)
    return Problem("ift_paper_mixture", MMD2(target, kernel), IFT(kernel, alpha, beta), mu0, t_final)


PROBLEMS = {"mmd_flow": mmd_flow, "ornstein_uhlenbeck": ornstein_uhlenbeck,
            "ift_paper_mixture": ift_paper_mixture}
