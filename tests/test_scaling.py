"""The engines of the entropic steps: the scaling iterations (jko_ift.methods.scaling) and the
bracketed roots with a mass multiplier (jko_ift.methods.roots), against closed forms and POT."""

import numpy as np
import ot
import pytest

from jko_ift.methods.gibbs import DenseGibbs
from jko_ift.methods.roots import mass_multiplier, solve_increasing
from jko_ift.methods.scaling import (
    LEVEL_TOL,
    HardRows,
    KernelScalings,
    LogScalings,
    Relaxation,
    eps_levels,
    eps_schedule,
    iterate,
)

#: Roots and multipliers are solved to round-off (NEWTON_TOL 1e-12 in log units, and a mass
#: multiplier to 1e-13 in log sum): a few ulps more than that.
ROOT_ATOL = 1e-11

#: The plan of two hard marginals at tolerance 1e-12 against POT's plan at its own stop 1e-12.
PLAN_RTOL = 1e-8


def _fixed_column(b):
    """The column map of a hard second marginal: nu = b whatever q (classic Sinkhorn)."""
    with np.errstate(divide="ignore"):
        log_b = np.log(b)
    return lambda log_q: log_b


def _two_marginals(n=30, seed=0):
    rng = np.random.default_rng(seed)
    points = np.sort(rng.uniform(-1, 1, (n, 1)), axis=0)
    a = rng.uniform(0.5, 1.5, n)
    b = rng.uniform(0.5, 1.5, n)
    return points, a / a.sum(), b / b.sum()


def test_eps_levels_halve_down_to_eps_and_budget_the_last_level():
    assert eps_schedule(1.0, 0.1, 0.5) == [1.0, 0.5, 0.25, 0.125, 0.1]
    levels = list(eps_levels([1.0, 0.5, 0.1], max_iter=10, tol=1e-8, used=lambda: 9))
    assert [level.eps for level in levels] == [0.1]  # intermediate levels leave it one
    assert levels[0].budget == 1 and levels[0].tol == 1e-8
    first = next(eps_levels([1.0, 0.1], max_iter=10, tol=1e-8, used=lambda: 0))
    assert first.tol == LEVEL_TOL and first.budget == 9


@pytest.mark.parametrize("domain", ["kernel", "log"])
def test_both_domains_give_the_sinkhorn_plan_of_pot(domain):
    points, a, b = _two_marginals()
    eps = 0.05
    op = DenseGibbs(points, eps)
    rows, column = HardRows(a), _fixed_column(b)
    if domain == "kernel":
        scalings = KernelScalings(op, rows, column, np.zeros(a.size))
    else:
        scalings = LogScalings(op, rows, column, np.zeros(a.size))
    outcome = iterate(scalings, Relaxation(1.0, adaptive=False), 1e-12, 5000)
    assert outcome.violation <= 1e-12 and outcome.stopped is None and not outcome.broken
    f, g = scalings.log_u, scalings.log_v
    plan = np.exp(f[:, None] + g[None, :] - (points - points.T) ** 2 / eps)
    expected = ot.sinkhorn(a, b, (points - points.T) ** 2, eps, stopThr=1e-12, numItermax=100_000)
    np.testing.assert_allclose(plan, expected, rtol=PLAN_RTOL, atol=PLAN_RTOL * expected.max())


def test_overrelaxation_converges_to_the_same_potentials_in_fewer_iterations():
    points, a, b = _two_marginals(seed=1)
    op = DenseGibbs(points, 0.02)
    plain = LogScalings(op, HardRows(a), _fixed_column(b), np.zeros(a.size))
    fast = LogScalings(op, HardRows(a), _fixed_column(b), np.zeros(a.size))
    slow = iterate(plain, Relaxation(1.0, adaptive=False), 1e-11, 20_000)
    quick = iterate(fast, Relaxation(1.0, adaptive=True), 1e-11, 20_000)
    assert quick.iterations < slow.iterations
    np.testing.assert_allclose(fast.log_u + fast.log_v.mean(), plain.log_u + plain.log_v.mean(),
                               atol=1e-8)


def test_bracketed_newton_finds_roots_over_forty_orders_of_magnitude():
    c = np.logspace(-20, 20, 41)

    def residual(z):  # increasing in z, root log c
        return np.exp(z) - c, np.exp(z)

    def check(lo, hi):
        assert np.all(residual(lo)[0] < 0) and np.all(residual(hi)[0] > 0)

    roots, steps, _ = solve_increasing(residual, c.size, 60.0, None, check, 1e-12, 200)
    np.testing.assert_allclose(roots, np.log(c), atol=ROOT_ATOL)
    assert steps < 200


def test_mass_multiplier_gives_the_closed_form_shift():
    w0 = np.array([0.2, 1.0, 3.0])
    mass = 0.5

    def solve(shift):
        return w0 * np.exp(-shift), None

    def slope(weights, total, _):
        return -1.0  # d log sum(w0 e^-l) / dl

    shift, _ = mass_multiplier(solve, slope, mass, 0.0, 60)
    assert shift == pytest.approx(np.log(w0.sum() / mass), abs=ROOT_ATOL)


def test_closed_form_kernel_iteration_gives_the_potentials_of_the_general_one():
    """The cheap kernel-domain iteration (closed-form column map, Pade-relaxed, no logarithms of
    the scalings) converges to the same scalings as the general kernel-domain one."""
    from jko_ift.methods.entropic_prox import EnergyForm, KLProx
    from jko_ift.methods.scaling import ClosedKernelScalings

    points, a, _ = _two_marginals(n=40, seed=2)
    n = a.size
    # F = sum b log b + V b (Entropy plus a potential), sigma = 5
    form = EnergyForm(n, log_coef=1.0, offset=1.0 + 2.0 * points[:, 0] ** 2)
    op = DenseGibbs(points, 0.02)
    general = KernelScalings(op, HardRows(a), KLProx(form, 5.0), np.zeros(n))
    closed = ClosedKernelScalings(op, HardRows(a), KLProx(form, 5.0), np.zeros(n))
    reference = iterate(general, Relaxation(1.0, adaptive=False), 1e-12, 20_000)
    relaxed = iterate(closed, Relaxation(1.0, adaptive=True, start=1.5), 1e-12, 20_000)
    assert reference.violation <= 1e-12 and relaxed.violation <= 1e-12
    assert relaxed.iterations < reference.iterations
    np.testing.assert_allclose(closed.v, general.v, rtol=1e-9)
    np.testing.assert_allclose(closed.u * op.apply(closed.v), a, rtol=1e-10)


def test_pade_column_scalings_converge_to_the_exact_potentials():
    """Column scalings from the last exact one by a Pade approximant, far above tolerance only:
    some updates are approximate, the iteration ends on exact ones at the same potentials."""
    from jko_ift.methods.entropic_prox import EnergyForm, KLProx
    from jko_ift.methods.scaling import ClosedKernelScalings

    points, a, _ = _two_marginals(n=60, seed=3)
    n = a.size
    form = EnergyForm(n, log_coef=1.0, offset=1.0 + 2.0 * points[:, 0] ** 2)
    op = DenseGibbs(points, 0.01)
    exact = ClosedKernelScalings(op, HardRows(a), KLProx(form, 20.0), np.zeros(n))
    cheap = ClosedKernelScalings(op, HardRows(a), KLProx(form, 20.0), np.zeros(n), exact_below=1e-10)
    first = iterate(exact, Relaxation(1.0, adaptive=True, start=1.5), 1e-12, 20_000)
    second = iterate(cheap, Relaxation(1.0, adaptive=True, start=1.5), 1e-12, 20_000)
    assert first.violation <= 1e-12 and second.violation <= 1e-12
    assert cheap.approximations > 0 and not cheap.approximate and exact.approximations == 0
    assert second.iterations <= first.iterations + 2
    np.testing.assert_allclose(cheap.v, exact.v, rtol=1e-9)


def test_an_intermediate_level_ends_at_tolerance_without_a_settled_column_map():
    """settle=False (an intermediate eps level): the violation alone ends the level, even when
    the column map never says it is settled (an active set cycling on a degenerate point)."""
    points, a, b = _two_marginals()
    column = _fixed_column(b)
    column.settled = False
    op = DenseGibbs(points, 0.05)
    unsettled = iterate(KernelScalings(op, HardRows(a), column, np.zeros(a.size)),
                        Relaxation(1.0, adaptive=False), 1e-6, 1000, settle=False)
    assert unsettled.violation <= 1e-6 and unsettled.iterations < 1000
    waiting = iterate(KernelScalings(op, HardRows(a), column, np.zeros(a.size)),
                      Relaxation(1.0, adaptive=False), 1e-6, 1000)
    assert waiting.iterations == 1000  # the last level waits for a settled map


def test_relaxation_starts_relaxed_and_rises_towards_the_optimum():
    """Given a start, omega is used from the first iteration; a relaxed rate above omega - 1
    raises omega by Young's relation, a rate at omega - 1 leaves it."""
    relax = Relaxation(1.0, adaptive=True, start=1.3)
    assert relax.omega == 1.3 and not relax.plain
    for k in range(2 * Relaxation.RETUNE):
        relax.observe(0.9**k, 1e-12)  # rate 0.9 > omega - 1 = 0.3: below the optimum
    assert relax.omega > 1.3 and relax.tuned == relax.omega
    steady = Relaxation(1.0, adaptive=True, start=1.5)
    for k in range(4 * Relaxation.RETUNE):
        steady.observe(0.5**k, 1e-30)
    assert steady.omega == 1.5
