"""Regimes a run can slip into without failing, and how the library reports them.

* Explicit steps past their stability limit (status "unstable"): forward Euler of the W2 flow
  of V = L|x|^2/2 maps x to (1 - tau L) x, so F(mu^{k+1}) = (1 - tau L)^2 F(mu^k): it descends
  iff tau L < 2 and satisfies the JKO dissipation inequality F(mu^{k+1}) + D^2/(2 tau) <= F(mu^k)
  iff tau L <= 1 (D^2 = 2 tau^2 L F(mu^k), so the left side is (1 - tau L + (tau L)^2) F(mu^k)).
  The explicit MMD step of
  1/2 MMD^2 on a shared support maps a - p to (I - eta G^{-1} K)(a - p): descent iff
  eta x (the curvature d^T K d / d^T G d) < 2.
* Weights clipped at zero (``WeightClippingWarning``): the pure MMD flow
  mu_t = pi + e^{-t}(mu_0 - pi) stays positive (no warning); an IFT flow whose unconstrained
  particle ODE (DOP853, tolerance 1e-10) drives a weight negative warns in every scheme.
* Masses that do not fit (``MassMismatchWarning``): a target of another mass under a
  mass-conserving geometry; a spherical (probability) geometry given mass != 1.
"""

import warnings

import numpy as np
import pytest
from scipy.integrate import solve_ivp

import jko_ift as jk
from jko_ift.methods.base import CLIPPED_MASS_RTOL, clipping_report

#: For a quadratic F the secant estimate of tau times the curvature is exact up to the
#: round-off of F(mu^{k+1}) - F(mu^k) over the predicted decrease (values of size 1: ~1e-15).
RATIO_ATOL = 1e-9

#: The explicit MMD steps are linear algebra on a Gram with ridge 1e-3 (condition <= 1e4):
#: their closed forms hold to this in MMD.
LINEAR_ALGEBRA_ATOL = 1e-10

RIDGE = 1e-3


def cloud(n=12, d=2, seed=0, mass=1.0):
    rng = np.random.default_rng(seed)
    return jk.Measure(rng.standard_normal((n, d)), np.full(n, mass / n))


def quadratic(L):
    """V = L |x|^2 / 2: the W2 flow x' = -L x."""
    return jk.Potential(lambda z: 0.5 * L * np.sum(z**2, 1), lambda z: L * z)


def record(run):
    """(the result of run(), the warnings it raised), with every warning recorded."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run()
    return result, caught


def categories(caught):
    return [w.category for w in caught]


# ---------------------------------------------------------------------------------------------
# Explicit steps past their stability limit
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", [jk.ExplicitEuler(), jk.Splitting(transport="explicit")],
                         ids=["ExplicitEuler", "Splitting-explicit"])
@pytest.mark.parametrize("tau_L", [0.9, 1.5, 1.9])
def test_forward_euler_below_its_limit_stays_optimal_and_measures_tau_L(method, tau_L):
    L, mu = 3.0, cloud()
    F = quadratic(L)
    for _ in range(5):
        result = method.step(F, jk.Wasserstein(), mu, tau_L / L)
        # an explicit step solves nothing ("explicit"); Splitting certifies its implicit pieces
        assert result.status == ("explicit" if isinstance(method, jk.ExplicitEuler) else "optimal")
        assert result.info["stability_ratio"] == pytest.approx(tau_L, abs=RATIO_ATOL)
        assert result.energy == pytest.approx((1 - tau_L) ** 2 * F.value(mu), rel=1e-12)
        mu = result.measure


@pytest.mark.parametrize("method", [jk.ExplicitEuler(), jk.Splitting(transport="explicit")],
                         ids=["ExplicitEuler", "Splitting-explicit"])
def test_forward_euler_past_its_limit_is_unstable_and_names_the_limit(method):
    L, tau, mu = 3.0, 0.7, cloud()  # tau L = 2.1: x -> -1.1 x, F grows by 1.21 per step
    F = quadratic(L)
    result = method.step(F, jk.Wasserstein(), mu, tau, throw=False)
    assert result.status == "unstable" and not result.ok
    assert result.info["stability_ratio"] == pytest.approx(2.1, abs=RATIO_ATOL)
    with pytest.raises(jk.SolverError) as raised:
        method.step(F, jk.Wasserstein(), mu, tau)
    message = str(raised.value)
    assert raised.value.status == "unstable"
    assert "stability limit" in message and "about 2.1, above the limit 2" in message
    assert "tau below about 0.667" in message  # 2 / L: the limit of the closed form
    assert "jk.ParticleJKO()" in message and "transport='implicit'" in message


def test_explicit_mmd_reaction_is_unstable_once_eta_passes_two():
    """b - p = (I - eta G^{-1} K)(a - p) on a shared support; the curvature along the step
    is d^T K d / d^T G d < 1, so the limit is eta a little above 2."""
    k = jk.Gaussian(1.0)
    target = cloud(n=8, seed=1)
    rng = np.random.default_rng(2)
    mu = jk.Measure(target.points, target.weights * (1 + 0.1 * rng.uniform(-1, 1, 8)))
    F, geometry = jk.MMD2(target, k), jk.MMD(k, ridge=RIDGE)
    K = k(target.points, target.points)
    G = K + RIDGE * np.eye(8)
    for eta, status in [(1.9, "explicit"), (2.2, "unstable")]:
        result = jk.ExplicitEuler().step(F, geometry, mu, eta, throw=False)
        d = result.measure.weights - mu.weights
        assert np.allclose(d, -eta * np.linalg.solve(G, K @ (mu.weights - target.weights)),
                           rtol=0, atol=LINEAR_ALGEBRA_ATOL)  # no projection: weights stay > 0
        assert result.status == status
        assert result.info["stability_ratio"] == pytest.approx(eta * (d @ K @ d) / (d @ G @ d),
                                                               abs=1e-7)


def test_a_converged_explicit_run_is_not_called_unstable():
    """eta = 1 lands on the target in one step; later steps move F only by round-off."""
    k = jk.Gaussian(1.0)
    target = cloud(n=8, seed=1)
    mu = jk.Measure(target.points, np.linspace(1, 2, 8) / 12)
    F = jk.MMD2(target, k)
    tr = jk.solve(F, jk.MMD(k), mu, tau=1.0, steps=10, method=jk.ExplicitEuler(), progress=False)
    assert all(s["status"] == "explicit" for s in tr.stats)
    assert tr.energies[-1] < 1e-12


def test_driver_blames_the_time_step_not_the_solver_for_explicit_dissipation():
    """tau L = 1.5: stable, but forward Euler breaks F(mu^{k+1}) + D^2/(2 tau) <= F(mu^k)
    (it holds iff tau L <= 1); tau L = 0.9 keeps it."""
    L, mu = 3.0, cloud()
    F = quadratic(L)
    kept, caught = record(lambda: jk.solve(F, jk.Wasserstein(), mu, tau=0.9 / L, steps=4,
                                           method=jk.ExplicitEuler(), progress=False))
    assert jk.DissipationWarning not in categories(caught)
    broken, caught = record(lambda: jk.solve(F, jk.Wasserstein(), mu, tau=1.5 / L, steps=4,
                                             method=jk.ExplicitEuler(), progress=False))
    (warning,) = [w for w in caught if w.category is jk.DissipationWarning]
    text = str(warning.message)
    assert "the step is explicit" in text and "about 1.5" in text
    assert "less accurate than certified" not in text
    assert [s["status"] for s in broken.stats] == ["explicit"] * 4


def test_driver_stops_an_unstable_run_without_a_dissipation_warning():
    L, mu = 3.0, cloud()
    F = quadratic(L)
    tr, caught = record(lambda: jk.solve(F, jk.Wasserstein(), mu, tau=2.5 / L, steps=4,
                                         method=jk.ExplicitEuler(), progress=False, throw=False))
    assert tr.stop_reason == "failed" and tr.stats[-1]["status"] == "unstable"
    assert tr.stats[-1]["stability_ratio"] == pytest.approx(2.5, abs=RATIO_ATOL)
    assert jk.DissipationWarning not in categories(caught)
    with pytest.raises(jk.SolverError, match="past its stability limit"):
        jk.solve(F, jk.Wasserstein(), mu, tau=2.5 / L, steps=4, method=jk.ExplicitEuler(),
                 progress=False)


def test_noise_injection_is_not_judged_a_descent_step():
    """With noise the witness gradient is taken at perturbed points: F may rise legitimately."""
    k = jk.Gaussian(1.0)
    F = jk.MMD2(cloud(seed=3), k)
    method = jk.ExplicitEuler(noise=3.0, seed=0)
    result = method.step(F, jk.Wasserstein(), cloud(seed=4), 0.5)
    assert result.status == "explicit" and "stability_ratio" not in result.info


# ---------------------------------------------------------------------------------------------
# Weights clipped at zero
# ---------------------------------------------------------------------------------------------

POSITIVE_FLOW_METHODS = [jk.ExplicitEuler(), jk.Splitting(), jk.ParticleJKO()]


@pytest.mark.parametrize("method", POSITIVE_FLOW_METHODS, ids=lambda m: type(m).__name__)
def test_pure_mmd_flow_stays_positive_without_clipping_warnings(method):
    """mu_t = pi + e^{-t}(mu_0 - pi) is a convex combination: no weight reaches zero. On the
    shared support with G = K + ridge I the steps are linear maps of a - p: explicit
    I - tau G^{-1} K, implicit (I + tau G^{-1} K)^{-1} (the exact step of theory §4)."""
    k = jk.Gaussian(1.0)
    target = cloud(n=10, seed=1)
    mu0 = jk.Measure(target.points, np.r_[np.full(5, 0.19), np.full(5, 0.01)])
    F, tau, steps = jk.MMD2(target, k), 0.25, 8
    tr, caught = record(lambda: jk.solve(F, jk.MMD(k, ridge=RIDGE), mu0, tau=tau, steps=steps,
                                         method=method, progress=False))
    assert jk.WeightClippingWarning not in categories(caught) and not tr.warnings
    K = k(target.points, target.points)
    flow = np.linalg.solve(K + RIDGE * np.eye(10), K)
    step = (np.eye(10) - tau * flow if isinstance(method, jk.ExplicitEuler)
            else np.linalg.inv(np.eye(10) + tau * flow))
    closed_form = target.weights + np.linalg.matrix_power(step, steps) @ (mu0.weights - target.weights)
    assert closed_form.min() > 0
    assert jk.mmd(tr.final, jk.Measure(target.points, closed_form), k) < LINEAR_ALGEBRA_ATOL


def ift_problem():
    """1-D IFT (Gaussian kernel, spherical): 8 particles spread over [-4, 4], target samples
    near 0; the unconstrained particle ODE drives the outer weights below zero at t = 0.16
    (to -0.067 at t = 0.5, -0.073 at t = 0.84)."""
    rng = np.random.default_rng(1)
    k = jk.Gaussian(1.0)
    target = jk.Measure(rng.normal(0, 0.5, (30, 1)), np.full(30, 1 / 30))
    mu0 = jk.Measure(np.linspace(-4, 4, 8)[:, None], np.full(8, 1 / 8))
    return jk.MMD2(target, k), jk.IFT(k, alpha=1.0, beta=5.0, conserve_mass=True), mu0


def unconstrained_ift_weights(F, geometry, mu0, t_final):
    """The weights of the IFT particle ODE x' = -alpha grad f, a' = -beta G^{-1}(f - l 1),
    with signed weights (no positivity constraint), on [0, t_final]: (8, times)."""
    k, target, n = F.kernel, F.target, mu0.n
    alpha, beta, ridge = geometry.alpha, geometry.beta, geometry.reaction.ridge

    def rhs(_, state):
        x, a = state[:n].reshape(n, 1), state[n:]
        f = k(x, x) @ a - k(x, target.points) @ target.weights
        G = k(x, x) + ridge * np.eye(n)
        Gf, G1 = np.linalg.solve(G, f), np.linalg.solve(G, np.ones(n))
        grad = k.grad_sum(x, x, a) - k.grad_sum(x, target.points, target.weights)
        return np.concatenate([-alpha * grad.ravel(), -beta * (Gf - Gf.sum() / G1.sum() * G1)])

    state = np.concatenate([mu0.points.ravel(), mu0.weights])
    solution = solve_ivp(rhs, (0, t_final), state, method="DOP853", rtol=1e-10, atol=1e-12)
    return solution.y[n:]


@pytest.mark.parametrize(("method", "tau"), [(jk.ExplicitEuler(), 0.02), (jk.Splitting(), 0.05),
                                             (jk.ParticleJKO(), 0.05),
                                             (jk.Splitting(transport="explicit",
                                                           reaction="projected_gradient"), 0.02)],
                         ids=["ExplicitEuler", "Splitting", "ParticleJKO", "paper-code"])
def test_ift_weights_leaving_the_cone_warn_in_every_scheme(method, tau):
    F, geometry, mu0 = ift_problem()
    assert unconstrained_ift_weights(F, geometry, mu0, 0.5).min() < -0.05  # the flow leaves
    tr, caught = record(lambda: jk.solve(F, geometry, mu0, tau=tau, t_final=0.5, method=method,
                                         progress=False))
    (clipping,) = [w for w in tr.warnings if w.category == "WeightClippingWarning"]
    assert "positivity-constrained flow" in clipping.message and "whatever tau" in clipping.message
    assert sum(w.category is jk.WeightClippingWarning for w in caught) == 1  # once per run
    assert clipping.count == sum(s.get("zeroed_weights", 0) > 0 for s in tr.stats)


def test_linear_hellinger_clipping_reports_the_negative_mass():
    """b = a (1 - eta V): V = x + 2 on [-1, 1] and eta = 0.5 give b = -a x / 2, negative on the
    4 particles with x > 0."""
    x = np.linspace(-1, 1, 8)[:, None]
    mu = jk.Measure(x, np.full(8, 1 / 8))
    F = jk.Potential(lambda z: z[:, 0] + 2.0, lambda z: np.c_[np.ones(len(z))])
    method = jk.ExplicitEuler(hellinger_update="linear")
    result, caught = record(lambda: method.step(F, jk.Hellinger(), mu, 0.5))
    negative = float(np.sum(mu.weights * np.maximum(x[:, 0], 0) / 2))
    (warning,) = [w for w in caught if w.category is jk.WeightClippingWarning]
    assert result.info["zeroed_weights"] == 4
    assert f"negative, {-negative:.3g} in all" in str(warning.message)


def test_multiplicative_hellinger_underflow_is_not_clipping():
    """b = a e^{-eta V} is positive for every eta; with eta (V_max - V_min) = 1000 it underflows
    to 0, which is not the constraint b >= 0 at work."""
    x = np.linspace(-1, 1, 8)[:, None]
    mu = jk.Measure(x, np.full(8, 1 / 8))
    F = jk.Potential(lambda z: z[:, 0], lambda z: np.c_[np.ones(len(z))])
    result, caught = record(lambda: jk.ExplicitEuler().step(F, jk.Hellinger(), mu, 500.0))
    assert result.info["underflow_weights"] > 0
    assert jk.WeightClippingWarning not in categories(caught)


def test_round_off_clipping_is_not_reported():
    a = np.array([0.5, 0.5 - 1e-15, 1e-300, 1e-15])
    tiny = np.array([0.5, 0.5 - 1e-15, 0.0, -1e-15])  # a weight of 1e-300 and a drift of -1e-15
    info, caught = {}, None
    _, caught = record(lambda: clipping_report(a, tiny, info, "test"))
    assert not caught and info["zeroed_weights"] == 2
    real = np.array([0.5 + 2 * CLIPPED_MASS_RTOL, 0.5, 0.0, 0.0])
    big = np.array([0.5, 0.5, 2 * CLIPPED_MASS_RTOL, 0.0])
    _, caught = record(lambda: clipping_report(big, real, {}, "test"))
    assert categories(caught) == [jk.WeightClippingWarning]


def _grid_1d():
    grid = jk.Grid([-2], [2], [30])
    return grid, grid.measure(lambda x: np.exp(-x[:, 0] ** 2), normalize=True)


@pytest.mark.parametrize("geometry", [jk.MMD(jk.Gaussian(0.5)), jk.IFT(jk.Gaussian(0.5), 1.0, 1.0)])
def test_conic_mmd_reaction_on_the_constraint_warns(geometry):
    """A linear potential under an MMD reaction: d_t a = -beta (K + ridge I)^{-1} V drives the
    weights on the uphill side below zero within t = 0.3, so the exact step ends on b >= 0."""
    _, mu0 = _grid_1d()
    F = jk.Potential(lambda x: x[:, 0], lambda x: np.ones_like(x))
    tr, caught = record(lambda: jk.solve(F, geometry, mu0, tau=0.3, steps=2, progress=False))
    (clipping,) = [w for w in tr.warnings if w.category == "WeightClippingWarning"]
    assert clipping.count == 2 and tr.stats[0]["zeroed_weights"] > 10
    assert categories(caught).count(jk.WeightClippingWarning) == 1


@pytest.mark.parametrize("geometry", [jk.MMD(jk.Gaussian(0.5)), jk.IFT(jk.Gaussian(0.5), 1.0, 1.0)])
def test_conic_mmd_flow_toward_a_target_stays_off_the_constraint(geometry):
    """1/2 MMD^2 under MMD: mu_t = pi + e^{-t}(mu_0 - pi) stays positive; nothing clipped."""
    grid, mu0 = _grid_1d()
    target = grid.measure(lambda x: np.exp(-(x[:, 0] - 0.5) ** 2 / 0.3), normalize=True)
    F = jk.MMD2(target, jk.Gaussian(0.5))
    tr, caught = record(lambda: jk.solve(F, geometry, mu0, tau=0.3, steps=2, progress=False))
    assert jk.WeightClippingWarning not in categories(caught)
    assert all(s.get("zeroed_weights") is None for s in tr.stats)


# ---------------------------------------------------------------------------------------------
# Masses that do not fit the geometry or the target
# ---------------------------------------------------------------------------------------------

def test_target_of_another_mass_under_mass_conservation_warns_once_per_run():
    F, geometry, mu0 = ift_problem()
    heavy = jk.Measure(mu0.points, mu0.weights * 2.5)
    tr, caught = record(lambda: jk.solve(F, geometry, heavy, tau=0.05, steps=3,
                                         method=jk.Splitting(), progress=False))
    mismatches = [w for w in caught if w.category is jk.MassMismatchWarning]
    assert len(mismatches) == 1  # the driver's own input check does not warn a second time
    text = str(mismatches[0].message)
    assert "mass 1 but mu has mass 2.5" in text and "cannot reach 0" in text
    (entry,) = [w for w in tr.warnings if w.category == "MassMismatchWarning"]
    assert entry.count == 3


def test_masses_of_positive_measure_geometries_are_free():
    """On M+ (conserve_mass=False) the reaction creates and destroys mass: no warning."""
    F, _, mu0 = ift_problem()
    heavy = jk.Measure(mu0.points, mu0.weights * 2.5)
    geometry = jk.IFT(F.kernel, alpha=1.0, beta=5.0)
    _, caught = record(lambda: jk.ExplicitEuler().step(F, geometry, heavy, 0.01))
    assert jk.MassMismatchWarning not in categories(caught)


def test_w2_with_a_target_of_another_mass_warns():
    k = jk.Gaussian(1.0)
    F = jk.MMD2(cloud(seed=1), k)
    _, caught = record(lambda: jk.ExplicitEuler().step(F, jk.Wasserstein(), cloud(mass=2.0), 0.1))
    assert jk.MassMismatchWarning in categories(caught)
    _, caught = record(lambda: jk.ExplicitEuler().step(F, jk.Wasserstein(), cloud(), 0.1))
    assert jk.MassMismatchWarning not in categories(caught)


def test_unnormalized_grid_measure_under_a_probability_geometry_warns_with_the_fix():
    grid = jk.Grid([-3.0], [3.0], [40])
    F = jk.Potential(lambda z: z[:, 0] ** 2)
    density = lambda z: np.exp(-z[:, 0] ** 2)  # noqa: E731 - mass sqrt(pi) on the grid
    geometry = jk.Hellinger(conserve_mass=True)
    _, caught = record(lambda: jk.jko_step(F, geometry, grid.measure(density), 0.1))
    (warning,) = [w for w in caught if w.category is jk.MassMismatchWarning]
    mass = grid.measure(density).mass  # sqrt(pi) up to the quadrature
    assert f"mu has mass {mass:.6g}" in str(warning.message)
    assert "normalize=True" in str(warning.message)
    _, caught = record(lambda: jk.jko_step(F, geometry, grid.measure(density, normalize=True), 0.1))
    assert jk.MassMismatchWarning not in categories(caught)
    # W2 conserves any mass: an unnormalized density with no target is a well-posed flow
    _, caught = record(lambda: jk.jko_step(F + jk.Entropy(), jk.Wasserstein(), grid.measure(density),
                                           0.1))
    assert jk.MassMismatchWarning not in categories(caught)


def test_kl_to_an_unnormalized_log_density_is_not_a_mismatch():
    """Spherical flows ignore the normalizing constant of a log-density target (theory §2)."""
    grid = jk.Grid([-3.0], [3.0], [40])
    mu = grid.measure(lambda z: np.exp(-(z[:, 0] - 1) ** 2), normalize=True)
    F = jk.KL(lambda z: -z[:, 0] ** 2 + 5.0)
    _, caught = record(lambda: jk.jko_step(F, jk.WFR(conserve_mass=True), mu, 0.1))
    assert jk.MassMismatchWarning not in categories(caught)


def test_warnings_point_at_the_callers_line():
    """``warn_user`` attributes a warning to the first frame outside jko_ift: here this file."""
    F, geometry, mu0 = ift_problem()
    heavy = jk.Measure(mu0.points, mu0.weights * 2.5)
    _, caught = record(lambda: jk.jko_step(F, geometry, heavy, 0.01, method=jk.ExplicitEuler()))
    (warning,) = [w for w in caught if w.category is jk.MassMismatchWarning]
    assert warning.filename == __file__
