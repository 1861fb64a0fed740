"""The exact conic JKO step (jk.ConicJKO) against the closed forms of docs/theory.md.

Each test compares one step, or a few iterates, with a formula derived independently of the
library: the Lambert-W / Wright-omega Hellinger step of KL (theory §3), the linear MMD step of
1/2 MMD^2 (§4), the Gaussian recursion of the 1-D Fokker-Planck JKO (§5), the discrete
Barenblatt recursion of the porous medium JKO (derived below, after §6), the decay of
1/2 MMD^2 along IFT (§8) and the limits of the inf-convolutions (§1).
"""

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.special import beta as beta_function
from scipy.special import lambertw, wrightomega

import jko_ift as jk

# ---------------------------------------------------------------------------------------------
# Tolerances
# ---------------------------------------------------------------------------------------------

#: Clarabel's default stopping tolerances (tol_gap_abs = tol_gap_rel = 1e-8) on the scaled
#: problem, whose objective is (2 tau / s) times ours with s = mass / n (docs/conic.md §4).
SOLVER_GAP = 1e-8

#: Objectives agree to the certified gap, with a factor 10 for the primal residual and the
#: NumPy re-evaluation: |objective - exact| <= OBJECTIVE_RTOL * max(1, |exact|). (The scaled
#: gap floor 1e-8 maps to 1e-8 s / (2 tau) <= 1e-8 in our units when 2 tau >= mass / n.)
OBJECTIVE_RTOL = 10 * SOLVER_GAP

#: A strongly convex objective certified to a relative gap g pins its minimizer only to
#: about sqrt(g) (the objective is quadratic around it): sqrt(1e-8) = 1e-4 relative on the
#: weights (observed up to 1.1e-4 on the Hellinger step), times 10.
WEIGHT_RTOL = 10 * np.sqrt(SOLVER_GAP)

#: Clarabel asked for gap and feasibility 1e-12: the same argument gives sqrt(1e-12) = 1e-6
#: on the weights, times 10 (observed: 4e-9, the interior point ends quadratically).
TIGHT_SOLVER = {"tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12, "tol_feas": 1e-12, "tol_ktratio": 1e-10}
TIGHT_WEIGHT_RTOL = 1e-5

#: The quantities first order in the weights (F(mu^{k+1}) in the decay bounds) inherit the
#: weight accuracy WEIGHT_RTOL.
FIRST_ORDER_RTOL = WEIGHT_RTOL


def objective_tolerance(value: float) -> float:
    """Absolute tolerance on a step objective of size ``value`` (see OBJECTIVE_RTOL)."""
    return OBJECTIVE_RTOL * max(1.0, abs(value))


def mmd_tolerance(tau: float, modulus_per_tau: float, objective: float) -> float:
    """MMD distance to the exact minimizer implied by an objective excess.

    For an objective G with G(b) - G(b*) >= (1/2) modulus MMD^2(b, b*), an excess
    delta <= objective_tolerance gives MMD(b, b*) <= sqrt(2 delta / modulus).
    ``modulus_per_tau``: the modulus times tau (for the MMD step of 1/2 MMD^2: 1 + tau).
    """
    return float(np.sqrt(2.0 * objective_tolerance(objective) * tau / modulus_per_tau))


def scalar_samples(n: int, seed: int, low: float = 0.2, high: float = 2.0) -> np.ndarray:
    """Random-ish positive weights bounded away from 0, as the closed forms assume."""
    return np.random.default_rng(seed).uniform(low, high, n)


# ---------------------------------------------------------------------------------------------
# 1. Hellinger step of KL on a common support (theory §3)
# ---------------------------------------------------------------------------------------------

LINE_50 = np.linspace(0.0, 1.0, 50)[:, None]
A_50 = scalar_samples(50, seed=0) / 50
P_50 = scalar_samples(50, seed=1) / 50 * 1.3  # a target of another mass: KL on M+


def hellinger_kl_step(a, p, tau, multiplier=0.0):
    """b = a / (tau omega(z))^2, z = (log a - log p + l) / 2 + 1/tau - log tau (theory §3).

    ``multiplier`` l is that of sum(b) = sum(a) (it replaces log p by log p - l).
    """
    z = 0.5 * (np.log(a) - np.log(p) + multiplier) + 1.0 / tau - np.log(tau)
    return a / (tau * np.real(wrightomega(z))) ** 2


def hellinger_kl_step_lambert(a, p, tau):
    """The same step through W_0: b = a / (tau^2 W_0(sqrt(a) e^c / tau)^2), c = 1/tau - log(p)/2."""
    c = 1.0 / tau - 0.5 * np.log(p)
    return a / (tau**2 * np.real(lambertw(np.sqrt(a) * np.exp(c) / tau)) ** 2)


def hellinger_kl_objective(a, b, p, tau):
    """KL(b | p) + He^2(a, b) / (2 tau), generalized KL (theory §2)."""
    kl = np.sum(b * np.log(b / p) - b + p)
    return kl + 4.0 * np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) / (2.0 * tau)


@pytest.mark.parametrize("tau", [0.01, 0.1, 1.0, 10.0])
def test_lambert_and_wright_omega_forms_agree(tau):
    """The two forms of the closed form itself (both from theory §3), where e^{1/tau} is finite."""
    np.testing.assert_allclose(hellinger_kl_step(A_50, P_50, tau),
                               hellinger_kl_step_lambert(A_50, P_50, tau), rtol=1e-12)


@pytest.mark.parametrize("tau", [0.01, 0.1, 1.0, 10.0])
def test_hellinger_step_of_kl_matches_lambert_w(tau):
    mu, target = jk.Measure(LINE_50, A_50), jk.Measure(LINE_50, P_50)
    result = jk.jko_step(jk.KL(target), jk.Hellinger(), mu, tau)
    expected = hellinger_kl_step(A_50, P_50, tau)
    assert result.status == "optimal"
    exact_objective = hellinger_kl_objective(A_50, expected, P_50, tau)
    assert result.objective == pytest.approx(exact_objective, abs=objective_tolerance(exact_objective))
    np.testing.assert_allclose(result.measure.weights, expected, rtol=WEIGHT_RTOL)


def test_hellinger_step_with_tight_solver_pins_the_weights():
    """With Clarabel at 1e-12 the weights agree to sqrt(1e-12): the error is the solver's."""
    mu, target = jk.Measure(LINE_50, A_50), jk.Measure(LINE_50, P_50)
    method = jk.ConicJKO(solver_options=TIGHT_SOLVER)
    result = jk.jko_step(jk.KL(target), jk.Hellinger(), mu, 0.1, method=method)
    np.testing.assert_allclose(result.measure.weights, hellinger_kl_step(A_50, P_50, 0.1),
                               rtol=TIGHT_WEIGHT_RTOL)


@pytest.mark.parametrize("tau", [0.01, 0.1, 1.0, 10.0])
def test_mass_conserving_hellinger_step_of_kl_matches_lambert_w_with_multiplier(tau):
    mu, target = jk.Measure(LINE_50, A_50), jk.Measure(LINE_50, P_50)
    result = jk.jko_step(jk.KL(target), jk.Hellinger(conserve_mass=True), mu, tau)

    def excess_mass(multiplier):  # strictly decreasing in the multiplier (theory §3)
        return hellinger_kl_step(A_50, P_50, tau, multiplier).sum() - A_50.sum()

    multiplier = brentq(excess_mass, -50.0, 50.0, xtol=1e-14, rtol=1e-14)
    expected = hellinger_kl_step(A_50, P_50, tau, multiplier)
    assert result.status == "optimal"
    assert result.measure.mass == pytest.approx(A_50.sum(), rel=1e-12)
    np.testing.assert_allclose(result.measure.weights, expected, rtol=WEIGHT_RTOL)
    exact_objective = hellinger_kl_objective(A_50, expected, P_50, tau)
    assert result.objective == pytest.approx(exact_objective, abs=objective_tolerance(exact_objective))


# ---------------------------------------------------------------------------------------------
# 2. MMD step of 1/2 MMD^2 on a shared support (theory §4)
# ---------------------------------------------------------------------------------------------

KERNEL = jk.Gaussian(0.5)
LINE_40 = np.linspace(-2.0, 2.0, 40)[:, None]
A_40 = scalar_samples(40, seed=2)
A_40 /= A_40.sum()
P_40 = scalar_samples(40, seed=3)
P_40 *= 1.5 / P_40.sum()  # another mass: the step and the flow live on M+
GRAM_40 = KERNEL(LINE_40, LINE_40)


def mmd_linear_step(a, p, tau, ridge):
    """The stationarity condition K(b - p) + (K + ridge I)(b - a) / tau = 0, solved for b."""
    n = a.size
    lhs = (1.0 + 1.0 / tau) * GRAM_40 + (ridge / tau) * np.eye(n)
    rhs = GRAM_40 @ p + (GRAM_40 + ridge * np.eye(n)) @ a / tau
    if ridge == 0.0:  # singular Gram: every solution has the same MMD (theory §4)
        return np.linalg.lstsq(lhs, rhs, rcond=None)[0]
    return np.linalg.solve(lhs, rhs)


def mmd_step_objective(a, b, p, tau, ridge):
    d, e = b - p, b - a
    return 0.5 * d @ GRAM_40 @ d + (e @ GRAM_40 @ e + ridge * e @ e) / (2 * tau)


@pytest.mark.parametrize("ridge", [0.0, 1e-8, 1e-6, 1e-4])
@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_mmd_step_solves_the_linear_system(tau, ridge):
    mu, target = jk.Measure(LINE_40, A_40), jk.Measure(LINE_40, P_40)
    result = jk.jko_step(jk.MMD2(target, KERNEL), jk.MMD(KERNEL, ridge=ridge), mu, tau)
    expected = mmd_linear_step(A_40, P_40, tau, ridge)
    assert expected.min() > 0  # the constraint b >= 0 is inactive, so this is the minimizer
    exact_objective = mmd_step_objective(A_40, expected, P_40, tau, ridge)
    assert result.status == "optimal"
    assert result.objective == pytest.approx(exact_objective, abs=objective_tolerance(exact_objective))
    # G(b) - G(b*) >= (1 + 1/tau) MMD^2(b, b*) / 2
    assert jk.mmd(result.measure, mu.with_weights(expected), KERNEL) <= mmd_tolerance(
        tau, 1.0 + tau, exact_objective)


@pytest.mark.parametrize("ridge", [1e-6, 1e-4, 1e-3])
@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_mmd_step_is_the_convex_combination_up_to_the_ridge(tau, ridge):
    """b = (a + tau p)/(1 + tau) for ridge 0; with a ridge MMD <= sqrt(tau ridge) |a - p|_2 (§4)."""
    mu, target = jk.Measure(LINE_40, A_40), jk.Measure(LINE_40, P_40)
    result = jk.jko_step(jk.MMD2(target, KERNEL), jk.MMD(KERNEL, ridge=ridge), mu, tau)
    combination = mu.with_weights((A_40 + tau * P_40) / (1 + tau))
    ridge_bound = np.sqrt(tau * ridge) * np.linalg.norm(A_40 - P_40)
    solver_bound = mmd_tolerance(tau, 1.0 + tau, result.objective)
    assert jk.mmd(result.measure, combination, KERNEL) <= ridge_bound + solver_bound


def test_mmd_step_conserves_mass_of_the_convex_combination():
    """With sum(p) = sum(a) the convex combination has the mass of a; the spherical step too."""
    target = jk.Measure(LINE_40, P_40 / P_40.sum())
    mu = jk.Measure(LINE_40, A_40)
    tau, ridge = 0.5, 1e-8
    geometry = jk.MMD(KERNEL, ridge=ridge, conserve_mass=True)
    result = jk.jko_step(jk.MMD2(target, KERNEL), geometry, mu, tau)
    combination = mu.with_weights((A_40 + tau * target.weights) / (1 + tau))
    assert result.measure.mass == pytest.approx(1.0, rel=1e-12)
    ridge_bound = np.sqrt(tau * ridge) * np.linalg.norm(A_40 - target.weights)
    assert jk.mmd(result.measure, combination, KERNEL) <= ridge_bound + mmd_tolerance(
        tau, 1.0 + tau, result.objective)


def test_mmd_jko_iterates_are_the_geometric_sequence():
    """mu^k = pi + (1 + tau)^{-k} (mu^0 - pi), distinguishable from the flow's e^{-k tau}."""
    tau, steps, ridge = 0.5, 6, 1e-10
    mu, target = jk.Measure(LINE_40, A_40), jk.Measure(LINE_40, P_40)
    trajectory = jk.solve(jk.MMD2(target, KERNEL), jk.MMD(KERNEL, ridge=ridge), mu, tau,
                          steps=steps, progress=False)
    distance0 = jk.mmd(mu, target, KERNEL)
    for k, measure in enumerate(trajectory.measures):
        expected = mu.with_weights(P_40 + (1 + tau) ** -k * (A_40 - P_40))
        # each step errs by mmd_tolerance; the next steps contract it by 1 / (1 + tau)
        solver = mmd_tolerance(tau, 1 + tau, 1.0) * (1 + tau) / tau
        ridge_bound = np.sqrt(k * tau * ridge) * np.linalg.norm(A_40 - P_40)
        assert jk.mmd(measure, expected, KERNEL) <= solver + ridge_bound
    flow_gap = abs((1 + tau) ** -steps - np.exp(-steps * tau)) * distance0
    assert flow_gap > 10 * (solver + ridge_bound)  # the check above tells the two apart


# ---------------------------------------------------------------------------------------------
# 3. Gaussians under the 1-D Fokker-Planck W2 JKO (theory §5)
# ---------------------------------------------------------------------------------------------


def fokker_planck(kappa):
    """Entropy + kappa x^2 / 2: Ornstein-Uhlenbeck (kappa = 0: heat)."""
    return jk.Entropy() + jk.Potential(lambda x: 0.5 * kappa * x[:, 0] ** 2, lambda x: kappa * x)


def gaussian_on(grid, mean, sd):
    return grid.measure(lambda x: np.exp(-0.5 * ((x[:, 0] - mean) / sd) ** 2), normalize=True)


def gaussian_jko_recursion(mean, sd, kappa, tau, steps):
    """m_{k+1} = m_k / (1 + tau kappa), (1 + tau kappa) s^2 - s_k s - tau = 0 (theory §5)."""
    means, sds = [mean], [sd]
    for _ in range(steps):
        q = 1 + tau * kappa
        means.append(means[-1] / q)
        sds.append((sds[-1] + np.sqrt(sds[-1] ** 2 + 4 * tau * q)) / (2 * q))
    return np.array(means), np.array(sds)


def snapping_bound(h, tau, kappa, steps):
    """W2 error of the grid iterates against the exact ones, argued from theory §7.

    The grid measure of the initial Gaussian is within h/2 in W2 of it (each cell's mass
    within h/2 of the cell). Each grid step is the exact step with the map rounded to the
    grid: at most h/2 more. The exact step of a kappa-convex energy contracts W2 by
    1/(1 + tau kappa), so E_k <= (h/2) [q^{-k} + sum_{j<k} q^{-j}], q = 1 + tau kappa. The
    moments obey sqrt(dm^2 + ds^2) <= W2 (Gelbrich), so this bounds the error in (m, s).
    """
    q = 1.0 + tau * kappa
    return 0.5 * h * (q**-steps + sum(q**-j for j in range(steps)))


def gaussian_errors(kappa, mean, sd, lo, hi, tau, steps, n):
    """Errors sqrt(dm^2 + ds^2) of the grid iterates against the recursion, per step, and h."""
    grid = jk.Grid(lo, hi, n)
    mu0 = gaussian_on(grid, mean, sd)
    trajectory = jk.solve(fokker_planck(kappa), jk.Wasserstein(), mu0, tau, steps=steps,
                          progress=False)
    assert all(stats["status"] == "optimal" for stats in trajectory.stats)
    # the recursion from the grid measure's own moments (they match mean, sd to 1e-8)
    means, sds = gaussian_jko_recursion(mu0.mean()[0], np.sqrt(mu0.covariance()[0, 0]), kappa,
                                        tau, steps)
    errors = [np.hypot(m.mean()[0] - means[k], np.sqrt(m.covariance()[0, 0]) - sds[k])
              for k, m in enumerate(trajectory.measures)]
    return np.array(errors), grid.spacing[0], np.hypot(means[-1] - means[0], sds[-1] - sds[0])


@pytest.mark.parametrize(
    ("kappa", "mean", "sd", "lo", "hi", "tau"),
    [(1.0, 1.0, 0.8, -4.5, 5.5, 0.2),  # Ornstein-Uhlenbeck: mean and sd both move
     (0.0, 0.5, 0.8, -5.75, 6.75, 0.1)],  # heat: the sd grows to 1.2, domain +-5.2 sd
    ids=["ornstein-uhlenbeck", "heat"],
)
def test_fokker_planck_steps_follow_the_gaussian_recursion(kappa, mean, sd, lo, hi, tau):
    steps = 4
    errors, h, motion = gaussian_errors(kappa, mean, sd, lo, hi, tau, steps, 200)
    for k, error in enumerate(errors):
        assert error <= snapping_bound(h, tau, kappa, k)
    # the iterates did move by more than that (observed errors <= 0.05 h, the bound 1.8-2.5 h)
    assert motion > 2 * snapping_bound(h, tau, kappa, steps)
    # consistency at fixed tau: the error vanishes with h (theory §7 gives first order, i.e. a
    # ratio 0.5 per halving; 0.6 leaves room for the irregular rounding; observed 0.07-0.13)
    coarse, _, _ = gaussian_errors(kappa, mean, sd, lo, hi, tau, steps, 100)
    assert errors.max() <= 0.6 * coarse.max()


# ---------------------------------------------------------------------------------------------
# 4. Barenblatt profiles of the porous medium equation (theory §6)
# ---------------------------------------------------------------------------------------------
#
# For m = 2 in 1-D the JKO step maps a parabola rho_k = A_k (r_k^2 - x^2)_+ of mass M to the
# parabola of radius R with R^2 (R - r_k) = 3 M tau. In quantiles (theory §5) the step
# minimises int_0^1 1/Q' dq + |Q - Q_k|^2 / (2 tau), strictly convex; its Euler-Lagrange
# equation d/dq[rho(Q)^2] = -(Q - Q_k)/tau, i.e. 2 rho'(x) = -(x - T(x))/tau with the affine
# map T(x) = (r_k / R) x, holds for rho = A (R^2 - x^2)_+ iff 1 - r_k/R = 4 A tau, and
# A = 3 M / (4 R^3); the boundary term 1/Q'^2 = rho^2 vanishes at the edges. As tau -> 0 this
# is d(r^3)/dt = 9 M, the radius r(t) = sqrt(C / kappa_B) t^{1/3} of the Barenblatt profile.

PME_EXPONENT = 2.0
PME_MASS = 1.0
PME_KAPPA = (PME_EXPONENT - 1) / (2 * PME_EXPONENT * (PME_EXPONENT + 1))  # kappa_B, d = 1
PME_RATE = 1 / (PME_EXPONENT + 1)  # k = d / (d (m - 1) + 2)
PME_C = (PME_MASS * np.sqrt(PME_KAPPA) / beta_function(0.5, PME_EXPONENT / (PME_EXPONENT - 1))) ** (
    2 * (PME_EXPONENT - 1) / (PME_EXPONENT + 1))


#: Spread error of the named problem at tau = 0.2 on 400 cells: measured 8.9e-3 (first order
#: in tau, 1.1e-2 at tau = 0.1 where locking starts on this grid).
PME_SPREAD_ATOL = 0.015


def barenblatt(t, x):
    """rho(t, x) = t^{-k} (C - kappa_B x^2 t^{-2k})_+^{1/(m-1)} (theory §6, d = 1)."""
    core = PME_C - PME_KAPPA * x**2 * t ** (-2 * PME_RATE)
    return t ** (-PME_RATE) * np.maximum(core, 0.0) ** (1 / (PME_EXPONENT - 1))


def barenblatt_radius(t):
    return np.sqrt(PME_C / PME_KAPPA) * t**PME_RATE


def parabola(grid, radius):
    return grid.measure(lambda x: np.maximum(radius**2 - x[:, 0] ** 2, 0.0), normalize=True)


def test_barenblatt_constants():
    """Mass 1 and the radius law r^3 = 9 M t that the discrete recursion is consistent with."""
    grid = jk.Grid(-4, 4, 4000)
    assert grid.measure(lambda x: barenblatt(1.5, x[:, 0])).mass == pytest.approx(PME_MASS, rel=1e-5)
    assert barenblatt_radius(2.0) ** 3 == pytest.approx(9 * PME_MASS * 2.0, rel=1e-12)


def run_porous_medium(n, tau, steps, t0=1.0):
    grid = jk.Grid(-3.0, 3.0, n)  # holds the support, of radius <= r(2) = 2.62
    mu0 = grid.measure(lambda x: barenblatt(t0, x[:, 0]), normalize=True)
    trajectory = jk.solve(jk.PorousMedium(PME_EXPONENT), jk.Wasserstein(), mu0, tau, steps=steps,
                          progress=False)
    assert all(stats["status"] == "optimal" for stats in trajectory.stats)
    radius = barenblatt_radius(t0)
    for _ in range(steps):  # R^2 (R - r_k) = 3 M tau
        previous = radius
        radius = brentq(lambda r, rk=previous: r * r * (r - rk) - 3 * PME_MASS * tau,
                        previous, previous + 10.0, xtol=1e-14)
    return grid, trajectory.final, radius


def test_porous_medium_steps_follow_the_discrete_barenblatt_recursion():
    tau, steps = 0.25, 4  # from t0 = 1 to t1 = 2
    grid, final, radius = run_porous_medium(200, tau, steps)
    h = grid.spacing[0]
    # initial quantization h/2, k roundings of the map by h/2 (theory §7; the step of a
    # displacement convex energy does not expand W2), and the grid sampling of the profile h/2
    bound = 0.5 * h * (steps + 2)
    error = jk.w2(final, parabola(grid, radius))
    assert error <= bound
    # the parabola of radius R has sd R / sqrt(5); Gelbrich: |sd - sd'| <= W2
    assert abs(np.sqrt(final.covariance()[0, 0]) - radius / np.sqrt(5)) <= bound
    # consistency in h: halving the cells at least halves-ish the error (observed: / 3.7)
    coarse_grid, coarse, _ = run_porous_medium(100, tau, steps)
    assert error <= 0.6 * jk.w2(coarse, parabola(coarse_grid, radius))


def test_porous_medium_steps_approach_the_barenblatt_profile_at_t1():
    tau, steps, t0 = 0.25, 4, 1.0
    t1 = t0 + steps * tau
    grid, final, radius = run_porous_medium(200, tau, steps, t0)
    h = grid.spacing[0]
    # grid part as above, plus the time error of the recursion, exactly W2 between parabolas
    # of radii R_k and r(t1): |R_k - r(t1)| / sqrt(5)
    time_error = abs(radius - barenblatt_radius(t1)) / np.sqrt(5)
    profile = grid.measure(lambda x: barenblatt(t1, x[:, 0]), normalize=True)
    assert jk.w2(final, profile) <= 0.5 * h * (steps + 2) + time_error
    # the run did move: the profile at t0 is farther than the bound
    start = grid.measure(lambda x: barenblatt(t0, x[:, 0]), normalize=True)
    assert jk.w2(start, profile) > 2 * (0.5 * h * (steps + 2) + time_error)


# ---------------------------------------------------------------------------------------------
# 7. Decay of 1/2 MMD^2 along IFT (theory §8)
# ---------------------------------------------------------------------------------------------

IFT_GRID = jk.Grid(-2, 2, 40)
IFT_MU0 = IFT_GRID.measure(lambda x: np.exp(-2 * (x[:, 0] + 0.8) ** 2) + 0.02, normalize=True)
IFT_TARGET = IFT_GRID.measure(lambda x: np.exp(-2 * (x[:, 0] - 0.7) ** 2) + 0.02, normalize=True)


@pytest.mark.filterwarnings("ignore::jko_ift.GridLockingWarning")  # late steps, near pi
@pytest.mark.parametrize("conserve_mass", [False, True], ids=["M+", "spherical"])
@pytest.mark.parametrize(
    ("alpha", "beta", "tau"),
    # transport moves mass in the first steps (2 tau alpha |grad f| > h = 0.1), except in the
    # last case, where the bound is attained
    [(5.0, 1.0, 0.2), (20.0, 1.0, 0.1), (20.0, 5.0, 0.1), (5.0, 2.0, 0.5), (1e-4, 2.0, 0.2)],
)
def test_ift_decays_at_least_like_one_plus_beta_tau_squared(alpha, beta, tau, conserve_mass):
    """F(mu^{k+1}) <= F(mu^k) / (1 + beta tau)^2 for F = 1/2 MMD^2, target on the support,
    equal masses, no ridge (theory §8); equality as alpha -> 0.

    Bound used: F(mu^{k+1}) <= F(mu^k) (1 + beta tau)^{-2} (1 + FIRST_ORDER_RTOL), and the
    step objective F + D^2/(2 tau) <= F(mu^k)/(1 + beta tau) up to the objective tolerance.
    """
    F = jk.MMD2(IFT_TARGET, KERNEL)
    geometry = jk.IFT(KERNEL, alpha, beta, ridge=0.0, conserve_mass=conserve_mass)
    trajectory = jk.solve(F, geometry, IFT_MU0, tau, steps=6, progress=False)
    energies = trajectory.energies
    factor = (1 + beta * tau) ** -2
    for k, stats in enumerate(trajectory.stats):
        assert stats["status"] == "optimal"
        assert energies[k + 1] <= factor * energies[k] * (1 + FIRST_ORDER_RTOL)
        assert stats["objective"] <= energies[k] / (1 + beta * tau) + objective_tolerance(energies[k])
    steps = np.arange(len(energies))
    assert np.all(energies <= factor**steps * energies[0] * (1 + FIRST_ORDER_RTOL) ** steps)
    if alpha >= 1.0:  # transport makes the first step strictly faster than the bound
        assert trajectory.stats[0]["moved_fraction"] > 0.5
        assert energies[1] < 0.9 * factor * energies[0]


@pytest.mark.filterwarnings("ignore::jko_ift.GridLockingWarning")  # alpha -> 0 locks transport
def test_ift_decay_is_exactly_one_plus_beta_tau_squared_without_transport():
    """As alpha -> 0 the bound is attained, so the iterates decay *slower* than e^{-2 beta t}."""
    beta, tau = 2.0, 0.2
    F = jk.MMD2(IFT_TARGET, KERNEL)
    trajectory = jk.solve(F, jk.IFT(KERNEL, 1e-4, beta, ridge=0.0), IFT_MU0, tau, steps=6,
                          progress=False)
    energies = trajectory.energies
    ratios = energies[1:] / energies[:-1]
    np.testing.assert_allclose(ratios, (1 + beta * tau) ** -2, rtol=FIRST_ORDER_RTOL)
    assert np.all(energies[1:] > np.exp(-2 * beta * trajectory.times[1:]) * energies[0])


@pytest.mark.filterwarnings("ignore::jko_ift.GridLockingWarning")  # alpha -> 0 locks transport
@pytest.mark.parametrize("alpha", [1e-3, 5.0])  # nearly pure MMD (tight), and with transport
def test_ift_with_a_ridge_obeys_the_ridge_bound(alpha):
    """With a ridge: F + D^2/(2 tau) <= F/(1 + beta tau) + ridge beta tau |a - p|^2 / (2 (1 + beta tau)^2)."""
    beta, tau, ridge = 1.0, 0.5, 1e-3
    F = jk.MMD2(IFT_TARGET, KERNEL)
    trajectory = jk.solve(F, jk.IFT(KERNEL, alpha, beta, ridge=ridge), IFT_MU0, tau, steps=4,
                          progress=False)
    for k, stats in enumerate(trajectory.stats):
        before = trajectory.measures[k]
        slack = ridge * beta * tau / (2 * (1 + beta * tau) ** 2) * np.sum(
            (before.weights - IFT_TARGET.weights) ** 2)
        bound = trajectory.energies[k] / (1 + beta * tau) + slack
        assert stats["objective"] <= bound + objective_tolerance(bound)


# ---------------------------------------------------------------------------------------------
# 8. Limits of WFR and IFT (theory §1, §7)
# ---------------------------------------------------------------------------------------------
#
# beta -> 0: the reaction part becomes expensive, nu = b, and the step becomes the W2 step.
# By the envelope theorem, V(beta) = V_W2 - (tau beta / 2) <f, K_R f>_{b_W} + O(beta^2), with
# f = dF/dmu at the W2 minimizer b_W and K_R the reaction's Onsager operator: He: sum b f^2
# (f centred under mass conservation); MMD with F = 1/2 MMD^2: f^T K^{-1} f = 2 F(b_W) (also
# under mass conservation, since 1^T K^{-1} f = sum(b - p) = 0).
# alpha -> 0: on a grid the transport part is locked once 2 tau alpha |grad f| < h (theory §7),
# and the step *is* the pure reaction step.

#: V_W2 - V(beta) against its first-order term: the O(beta) remainder (beta = 1e-3, a
#: constant of order one) plus the solver gap 1e-8 |V| over a difference of ~1e-4 (1e-4
#: relative); 1e-2 covers both.
EXPANSION_RTOL = 1e-2
LIMIT_TAU = 0.2


def reaction_expansion(F, geometry_name, conserve_mass, w2_step):
    b = w2_step.measure
    if geometry_name == "WFR":
        f = F.first_variation(b)
        if conserve_mass:
            f = f - b.weights @ f / b.mass
        return 0.5 * LIMIT_TAU * b.weights @ f**2
    return LIMIT_TAU * F.value(b)


def limit_case(geometry_name):
    if geometry_name == "WFR":
        return jk.KL(IFT_TARGET), lambda a, b, cm: jk.WFR(a, b, conserve_mass=cm)
    return (jk.MMD2(IFT_TARGET, KERNEL),
            lambda a, b, cm: jk.IFT(KERNEL, a, b, ridge=0.0, conserve_mass=cm))


@pytest.mark.parametrize("conserve_mass", [False, True], ids=["M+", "spherical"])
@pytest.mark.parametrize("geometry_name", ["WFR", "IFT"])
def test_small_beta_approaches_the_w2_step(geometry_name, conserve_mass):
    F, make = limit_case(geometry_name)
    w2_step = jk.jko_step(F, jk.Wasserstein(), IFT_MU0, LIMIT_TAU)
    first_order = reaction_expansion(F, geometry_name, conserve_mass, w2_step)
    for beta in [1e-2, 1e-3]:
        step = jk.jko_step(F, make(1.0, beta, conserve_mass), IFT_MU0, LIMIT_TAU)
        drop = w2_step.objective - step.objective
        assert drop >= -objective_tolerance(w2_step.objective)  # nu = b is feasible
        assert drop == pytest.approx(beta * first_order, rel=EXPANSION_RTOL * beta / 1e-3)


@pytest.mark.parametrize("conserve_mass", [False, True], ids=["M+", "spherical"])
@pytest.mark.parametrize("geometry_name", ["WFR", "IFT"])
def test_small_alpha_gives_the_reaction_step(geometry_name, conserve_mass):
    F, make = limit_case(geometry_name)
    if geometry_name == "WFR":
        reaction = jk.Hellinger(conserve_mass=conserve_mass)
    else:
        reaction = jk.MMD(KERNEL, ridge=0.0, conserve_mass=conserve_mass)
    pure = jk.jko_step(F, reaction, IFT_MU0, LIMIT_TAU)
    alpha = 1e-3  # 2 tau alpha |grad f| ~ 1e-3 << h = 0.1: transport locked, steps equal
    with pytest.warns(jk.GridLockingWarning):  # and the library says so
        step = jk.jko_step(F, make(alpha, 1.0, conserve_mass), IFT_MU0, LIMIT_TAU)
    assert step.info["moved_fraction"] < 1e-6
    assert step.objective == pytest.approx(pure.objective, abs=objective_tolerance(pure.objective))
    if geometry_name == "WFR":  # Hellinger: strongly convex in the weights
        np.testing.assert_allclose(step.measure.weights, pure.measure.weights, rtol=WEIGHT_RTOL)
    else:  # MMD: only the MMD of the weights is determined; F + MMD^2/(2 tau) has modulus 1 + 1/tau
        assert jk.mmd(step.measure, pure.measure, KERNEL) <= 2 * mmd_tolerance(
            LIMIT_TAU, 1 + LIMIT_TAU, pure.objective)
        if not conserve_mass:  # and the closed form (a + tau p)/(1 + tau) of §4
            combination = IFT_MU0.with_weights((IFT_MU0.weights + LIMIT_TAU * IFT_TARGET.weights)
                                               / (1 + LIMIT_TAU))
            assert jk.mmd(step.measure, combination, KERNEL) <= 2 * mmd_tolerance(
                LIMIT_TAU, 1 + LIMIT_TAU, pure.objective)


@pytest.mark.filterwarnings("ignore::jko_ift.GridLockingWarning")  # alpha -> 0 locks transport
def test_tiny_alpha_objective_is_as_accurate_as_its_certificate():
    """The reported objective may exceed the optimum only by what the certificate allows.

    nu = mu^k (no transport) is feasible for WFR, so the Hellinger step's objective bounds
    the WFR optimum from above: objective - V_He <= certificate * scale (times 10).
    """
    F = jk.KL(IFT_TARGET)
    for conserve_mass in (False, True):
        pure = jk.jko_step(F, jk.Hellinger(conserve_mass=conserve_mass), IFT_MU0, LIMIT_TAU)
        step = jk.jko_step(F, jk.WFR(1e-8, 1.0, conserve_mass=conserve_mass), IFT_MU0, LIMIT_TAU,
                           throw=False)
        excess = (step.objective - pure.objective) / max(1.0, abs(pure.objective))
        assert step.status != "optimal" or excess <= 10 * max(step.certificate, SOLVER_GAP)


def test_named_porous_medium_problem_follows_the_barenblatt_spread():
    """problems.porous_medium by name from a config: its error is the spread against
    r(t0 + t)/sqrt(5); at tau = 0.2 on 400 cells the steps still move mass (no locking)."""
    from jko_ift.config import load_config

    spec = load_config({"problem": {"name": "porous_medium", "cells": 400},
                        "method": {"kind": "conic"}, "run": {"tau": 0.2, "steps": 5}})
    trajectory = spec.solve(progress=False)
    from jko_ift.problems import porous_medium

    problem = porous_medium(cells=400)
    assert problem.error(trajectory) < PME_SPREAD_ATOL
    assert problem.error(trajectory) > 0  # the first-order error of tau = 0.2 is visible


# ---------------------------------------------------------------------------------------------
# Error bounds of the steps (docs/conic.md §8): info["error_bound"] against the closed forms
# ---------------------------------------------------------------------------------------------

#: Clarabel at its own defaults (1e-8), as every step was solved before the tolerances shrank
#: with tau: the weights are then off by 1e-5 to 1e-4 relative at a certificate <= 1e-8.
LOOSE_SOLVER = {"tol_gap_abs": 1e-8, "tol_gap_rel": 1e-8, "tol_feas": 1e-8}

#: The residual bound is attained when the error lies where F has no curvature (the null space
#: of the Gram for F = MMD2): bound = error up to the rounding of the error measured here
#: (observed 1e-4 relative, on errors of 3e-11).
BOUND_RTOL = 1e-3

#: Up to tau = 0.1 the bound exceeds the error by the curvature of F it leaves out, a factor of
#: about 1 + tau (observed <= 1.08 on Hellinger, 1.013 on MMD).
BOUND_SHARPNESS = 2.0
#: MMD with ridge 0 keeps the sqrt(gap) bound plus the Gram truncation: observed 15-22 times
#: the error.
BOUND_SHARPNESS_NO_RIDGE = 50.0


def hellinger_distance(a, b):
    return float(np.sqrt(4.0 * np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)))


@pytest.mark.parametrize("options", [{}, LOOSE_SOLVER], ids=["defaults", "clarabel-1e-8"])
@pytest.mark.parametrize("tau", [0.00625, 0.05, 1.0])
@pytest.mark.parametrize("conserve_mass", [False, True], ids=["M+", "spherical"])
def test_hellinger_step_error_bound_holds_against_the_closed_form(conserve_mass, tau, options):
    mu, target = jk.Measure(LINE_50, A_50), jk.Measure(LINE_50, P_50)
    multiplier = 0.0
    if conserve_mass:
        multiplier = brentq(lambda m: hellinger_kl_step(A_50, P_50, tau, m).sum() - A_50.sum(),
                            -50.0, 50.0, xtol=1e-15, rtol=1e-15)
    exact = hellinger_kl_step(A_50, P_50, tau, multiplier)
    result = jk.ConicJKO(solver_options=options).step(
        jk.KL(target), jk.Hellinger(conserve_mass=conserve_mass), mu, tau)
    error, bound = hellinger_distance(result.measure.weights, exact), result.info["error_bound"]
    assert error <= bound * (1 + BOUND_RTOL)
    if tau <= 0.1:
        assert bound <= BOUND_SHARPNESS * error


@pytest.mark.parametrize("ridge", [1e-8, 1e-4])
@pytest.mark.parametrize("tau", [0.00625, 0.1, 1.0])
def test_mmd_step_error_bound_holds_against_the_linear_system(tau, ridge):
    mu, target = jk.Measure(LINE_40, A_40), jk.Measure(LINE_40, P_40)
    result = jk.ConicJKO(solver_options=LOOSE_SOLVER).step(jk.MMD2(target, KERNEL),
                                                           jk.MMD(KERNEL, ridge=ridge), mu, tau)
    difference = result.measure.weights - mmd_linear_step(A_40, P_40, tau, ridge)
    error = np.sqrt(difference @ GRAM_40 @ difference + ridge * difference @ difference)
    bound = result.info["error_bound"]
    assert error <= bound * (1 + BOUND_RTOL)
    if tau <= 0.1:
        assert bound <= BOUND_SHARPNESS * error


@pytest.mark.parametrize("tau", [0.00625, 1.0])
def test_mmd_step_without_ridge_bounds_the_gram_seminorm(tau):
    """Ridge 0: the weights are not unique; the convex combination is a minimizer (theory §4)
    and the bound holds in the Gram seminorm, counting the eigenvalues the program drops."""
    mu, target = jk.Measure(LINE_40, A_40), jk.Measure(LINE_40, P_40)
    result = jk.jko_step(jk.MMD2(target, KERNEL), jk.MMD(KERNEL, ridge=0.0), mu, tau)
    difference = result.measure.weights - (A_40 + tau * P_40) / (1 + tau)
    error, bound = np.sqrt(max(difference @ GRAM_40 @ difference, 0.0)), result.info["error_bound"]
    assert error <= bound <= BOUND_SHARPNESS_NO_RIDGE * error
