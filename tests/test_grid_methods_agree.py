"""Three exact-or-regularized steps on one grid agree: EntropicJKO tends to BackAndForthJKO's
exact step as eps -> 0, down to a floor of the order of the grid spacing h (below eps ~ h^2 the
entropic step turns into the step between cell centres, which moves mass by whole cells)."""

import numpy as np

import jko_ift as jk

CENTRE, STIFFNESS = np.array([0.2, -0.1]), 0.5  # F = Entropy + |x - c|^2 / (2 s)


def test_entropic_step_tends_to_the_exact_grid_step_down_to_an_order_h_floor():
    grid = jk.Grid([-4, -4], [4, 4], (24, 24))
    h = grid.spacing[0]  # 1/3
    F = jk.Entropy() + jk.Potential(lambda x: np.sum((x - CENTRE) ** 2, 1) / (2 * STIFFNESS))
    mu = grid.measure(lambda x: np.exp(-np.sum((x - np.array([-1.0, 0.8])) ** 2, 1) / (2 * 0.9**2)),
                      normalize=True)
    tau = 0.5
    exact = jk.BackAndForthJKO(tol=2e-3, max_iter=2000).step(F, jk.Wasserstein(), mu, tau).measure
    epsilons = [1.0, 0.3, 0.1]
    distances = [jk.w2(jk.EntropicJKO(eps=eps).step(F, jk.Wasserstein(), mu, tau).measure, exact)
                 for eps in epsilons]
    assert np.all(np.diff(distances) < 0), distances
    rate = np.polyfit(np.log(epsilons), np.log(distances), 1)[0]
    assert rate > 0.5, (epsilons, distances)  # the blur's displacement, about sqrt(eps)
    assert distances[-1] < h / 4
    # below eps = h^2 the entropic step moves mass between cell centres: an O(h) floor
    locked = jk.EntropicJKO(eps=0.01).step(F, jk.Wasserstein(), mu, tau).measure
    assert jk.w2(locked, exact) < h / 2
