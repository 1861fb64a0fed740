"""Energies: first variations are derivatives in the weights, gradients are derivatives in
space, CVXPY expressions agree with the values, and the algebra composes."""

import cvxpy as cp
import numpy as np
import pytest

import jko_ift as jk
from jko_ift.energies import NotConvexError
from jko_ift.methods.conic import ConicSupport, conic_expression

#: Central differences (step 1e-7 relative) of smooth functions: truncation ~1e-12,
#: round-off ~1e-9 relative.
FD_RTOL = 1e-6

GRID = jk.Grid([-2, -1], [2, 1], [8, 5])
RNG = np.random.default_rng(0)
MU = GRID.measure(0.2 + RNG.random(GRID.size))
TARGET = GRID.measure(0.2 + RNG.random(GRID.size))
SAMPLES = jk.Measure(RNG.normal(size=(7, 2)), RNG.random(7))
QUADRATIC = jk.Potential(lambda x: 0.5 * (x**2).sum(1), lambda x: x)
REPULSION = jk.Interaction(lambda z: np.exp(-(z**2).sum(1)),
                           lambda z: -2 * z * np.exp(-(z**2).sum(1))[:, None])

ENERGIES = {
    "potential": QUADRATIC,
    "interaction": REPULSION,
    "entropy": jk.Entropy(),
    "porous": jk.PorousMedium(2.5),
    "kl_measure": jk.KL(TARGET),
    "kl_density": jk.KL(lambda x: -0.5 * (x**2).sum(1)),
    "mmd2_samples": jk.MMD2(SAMPLES, jk.Gaussian(0.8)),
    "mmd2_energy_kernel": jk.MMD2(TARGET, jk.EnergyKernel()),
    "sum": jk.Entropy() + 0.5 * QUADRATIC + jk.MMD2(TARGET, jk.IMQ(1.0)),
}


@pytest.mark.parametrize("name", ENERGIES)
def test_first_variation_is_the_derivative_in_the_weights(name):
    F = ENERGIES[name]
    f = F.first_variation(MU)
    for i in (0, 7, 23):
        step = 1e-7 * MU.weights[i]
        up, down = MU.weights.copy(), MU.weights.copy()
        up[i] += step
        down[i] -= step
        fd = (F.value(MU.with_weights(up)) - F.value(MU.with_weights(down))) / (2 * step)
        assert fd == pytest.approx(f[i], rel=FD_RTOL, abs=FD_RTOL)


@pytest.mark.parametrize("name", ["potential", "interaction", "mmd2_samples"])
def test_gradient_is_the_derivative_in_space(name):
    F = ENERGIES[name]
    points = RNG.normal(size=(6, 2))
    mu = jk.Measure(points, RNG.random(6))
    grad = F.grad_first_variation(mu)
    # f(x) at a moved point with the measure held fixed: evaluate at the point with zero mass
    for i in range(3):
        for k in range(2):
            step = np.zeros(2)
            step[k] = 1e-6
            probe = np.vstack([points, points[i] + step, points[i] - step])
            nu = jk.Measure(probe, np.concatenate([mu.weights, [0.0, 0.0]]))
            f = F.first_variation(nu)
            assert (f[-2] - f[-1]) / 2e-6 == pytest.approx(grad[i, k], rel=1e-5, abs=1e-7)


def test_grid_gradient_of_entropy_is_the_score():
    grid = jk.Grid([-4], [4], [400])
    mu = grid.measure(lambda x: np.exp(-x[:, 0] ** 2 / 2))
    grad = jk.Entropy().grad_first_variation(mu)[:, 0]
    inner = slice(1, -1)  # central differences of log rho = -x^2/2 are exact inside
    np.testing.assert_allclose(grad[inner], -grid.points[inner, 0], atol=1e-9)


@pytest.mark.parametrize("name", [n for n in ENERGIES if n != "interaction"])
def test_cvxpy_expression_agrees_with_value_up_to_a_constant(name):
    F = ENERGIES[name]
    scale = MU.mass / MU.n
    y = cp.Variable(MU.n, nonneg=True)
    expression = conic_expression(F, y, ConicSupport(MU, scale, MU.mass))
    other = MU.with_weights(MU.weights * (1 + 0.3 * np.sin(np.arange(MU.n))))
    other = other.with_weights(other.weights * MU.mass / other.mass)  # same mass (c.p.d. kernel)
    values = []
    for mu in (MU, other):
        y.value = mu.weights / scale
        values.append(expression.value)
    assert values[0] - values[1] == pytest.approx(F.value(MU) - F.value(other), rel=1e-9, abs=1e-12)


def test_repulsive_interaction_is_convex_and_attractive_is_refused():
    support = ConicSupport(MU, 1.0, None)
    y = cp.Variable(MU.n)
    assert conic_expression(REPULSION, y, support).is_convex()
    attraction = jk.Interaction(lambda z: 0.5 * (z**2).sum(1), lambda z: z)
    with pytest.raises(NotConvexError, match="ParticleJKO"):
        conic_expression(attraction, y, support)
    with pytest.raises(ValueError, match="particle method"):
        jk.jko_step(attraction, jk.Hellinger(), MU, 0.1)


def test_energy_kernel_needs_fixed_mass():
    F = jk.MMD2(TARGET, jk.EnergyKernel())
    with pytest.raises(NotConvexError, match="conserve_mass"):
        conic_expression(F, cp.Variable(MU.n), ConicSupport(MU, 1.0, None))


def test_algebra():
    F = jk.Entropy() + 2.0 * QUADRATIC
    assert F.value(MU) == pytest.approx(jk.Entropy().value(MU) + 2 * QUADRATIC.value(MU))
    np.testing.assert_allclose(
        F.first_variation(MU), jk.Entropy().first_variation(MU) + 2 * QUADRATIC.first_variation(MU)
    )
    assert sum([jk.Entropy(), QUADRATIC]).value(MU) == pytest.approx(
        jk.Entropy().value(MU) + QUADRATIC.value(MU))
    assert len((F + jk.Entropy()).terms) == 3
    with pytest.raises(ValueError, match="particle method"):
        conic_expression(-1.0 * jk.Entropy(), cp.Variable(MU.n), ConicSupport(MU, 1.0, None))


def test_generalized_kl_on_positive_measures():
    a, b = np.array([1.0, 2.0, 0.0]), np.array([2.0, 2.0, 1.0])
    points = np.zeros((3, 1))
    F = jk.KL(jk.Measure(points, b))
    assert F.value(jk.Measure(points, a)) == pytest.approx(np.log(0.5) - 1 + 2 + 0 - 0 + 1)
    assert F.value(jk.Measure(points, b)) == 0.0
    assert F.value(jk.Measure(points, [1.0, 1.0, 1.0]).with_weights([1.0, 0, 0])) > 0
    with pytest.raises(ValueError, match="same support"):
        F.value(jk.Measure(np.zeros((2, 1)), [1.0, 1.0]))


def test_mmd2_value_and_dimension_check():
    k = jk.Gaussian(1.0)
    F = jk.MMD2(SAMPLES, k)
    mu = jk.Measure(RNG.normal(size=(5, 2)), RNG.random(5))
    assert 2 * F.value(mu) == pytest.approx(jk.mmd(mu, SAMPLES, k, squared=True))
    with pytest.raises(ValueError, match="dimension"):
        F.value(jk.Measure(np.zeros((2, 3)), [1.0, 1.0]))


def test_entropy_and_porous_medium_need_a_cell_volume():
    cloud = jk.Measure(RNG.normal(size=(4, 2)), np.ones(4))
    for F in (jk.Entropy(), jk.PorousMedium(2)):
        with pytest.raises(ValueError, match="cell volume"):
            F.value(cloud)
    with pytest.raises(ValueError, match="m > 1"):
        jk.PorousMedium(1.0)


def test_a_potential_runs_once_per_support_and_its_values_stay_the_callers():
    """A grid's support is one frozen array at every step: its potential is evaluated once and
    kept (read-only); the callable's own array is not frozen, and a new support calls again."""
    calls = []
    table = np.arange(16.0)

    def V(x):
        calls.append(len(x))
        return table  # a kept table: must stay writable for its owner

    grid = jk.Grid([0.0], [1.0], [16])
    mu = grid.measure(np.ones(16), normalize=True)
    F = jk.Potential(V)
    first = F.first_variation(mu)
    assert F.value(mu) == pytest.approx(table.mean()) and F.form(mu).offset is first
    assert F.value(mu.with_weights(np.full(16, 0.5))) == pytest.approx(table.sum() / 2)
    assert calls == [16] and not first.flags.writeable and table.flags.writeable
    jk.Potential(V).value(jk.Measure(grid.points.copy(), mu.weights))  # another support
    assert calls == [16, 16]


def test_a_potential_is_checked_for_nan_at_its_first_evaluation_on_a_support():
    grid = jk.Grid([0.0], [1.0], [8])
    mu = grid.measure(np.ones(8), normalize=True)
    F = jk.Potential(lambda x: np.log(x[:, 0] - 0.5))
    for _ in range(2):  # refused again: nothing is kept from a failed evaluation
        with pytest.raises(ValueError, match="Potential V returned"):
            F.value(mu)
