"""The weight (reaction) steps on a fixed support and their QP solver (jko_ift.methods.weights).

Checked against a second, independent method: CVXPY with Clarabel for the quadratic programs,
the conic JKO step for the Hellinger step, brute force for the simplex projection.
"""

import cvxpy as cp
import numpy as np
import pytest
import scipy.linalg

import jko_ift as jk
from jko_ift.methods import qp
from jko_ift.methods.weights import (
    frank_wolfe_gap,
    hellinger_step,
    mmd_step,
    project_simplex,
    solve_weight_qp,
)

#: Clarabel's default stopping tolerance (relative gap 1e-8): objectives agree to this, relative.
CLARABEL_RTOL = 1e-8

#: Our solver certifies a gap of DEFAULT_WEIGHT_RTOL = 1e-10 relative (or its round-off floor);
#: against Clarabel the comparison is bounded by Clarabel's own 1e-8, so objectives must agree
#: to CLARABEL_RTOL and ours must never be worse than Clarabel's beyond our certificate.
OURS_NOT_WORSE_RTOL = 1e-10

#: The Newton method of the Hellinger step is asked for a certificate at round-off.
NEWTON_RTOL = 1e-15

#: The conic step's objective is certified to 1e-6 relative (ConicJKO DEFAULT_GAP_TOL) on the
#: scaled problem; weights of a strongly convex problem to about its square root (1e-3),
#: measured in the problem's own norm. Observed agreement is ~1e-8.
CONIC_OBJECTIVE_RTOL = 1e-6


def kernel_qp(n, seed, sigma=1.5, eta=0.1, ridge=1e-8):
    """The MMD weight step of 1/2 MMD^2 to n target samples: H = K + G / eta, g = c + G a / eta."""
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(n, 2)) + 2.0, rng.normal(size=(n, 2))
    k = jk.Gaussian(sigma)
    K = k(x, x)
    c = k.apply(x, y, np.full(n, 1.0 / n))
    a = rng.uniform(0.5, 1.5, n)
    a /= a.sum()
    G = K + ridge * np.eye(n)
    return K + G / eta, c + G @ a / eta, a


def clarabel_qp(H, g, mass):
    b = cp.Variable(g.size, nonneg=True)
    constraints = [cp.sum(b) == mass] if mass is not None else []
    problem = cp.Problem(cp.Minimize(0.5 * cp.quad_form(b, cp.psd_wrap(H)) - g @ b), constraints)
    problem.solve(solver="CLARABEL")
    return problem.value


@pytest.mark.parametrize("mass", [1.0, None], ids=["simplex", "orthant"])
@pytest.mark.parametrize("sigma, eta", [(1.5, 0.1), (10.0, 0.1), (1.5, 1e-3)])
def test_qp_matches_clarabel(mass, sigma, eta):
    H, g, a = kernel_qp(120, seed=1, sigma=sigma, eta=eta)
    solution = solve_weight_qp(H, g, mass, start=a)
    assert solution.status == "optimal"
    assert_matches_clarabel(solution, H, g, a, mass)


def assert_matches_clarabel(solution, H, g, a, mass) -> None:
    """Feasible, the objective of CVXPY-Clarabel to CLARABEL_RTOL (and not worse), and a
    certificate that is an honest bound: recomputed from scratch."""
    reference = clarabel_qp(H, g, mass)
    assert np.all(solution.weights >= 0)
    if mass is not None:
        assert solution.weights.sum() == pytest.approx(mass, rel=1e-14)
    assert abs(solution.objective - reference) <= CLARABEL_RTOL * abs(reference)
    assert solution.objective <= reference + OURS_NOT_WORSE_RTOL * abs(reference)
    gap = frank_wolfe_gap(H @ solution.weights - g, solution.weights, mass, a.sum())
    assert gap == pytest.approx(solution.gap, rel=1e-6, abs=1e-15)


def test_kernel_qp_minimizers_are_sparse_and_cold_start_agrees():
    """With a small ridge the minimizer uses few particles (docs/particles.md §3); a cold start
    (best vertex) and a warm start reach the same objective."""
    H, g, a = kernel_qp(300, seed=2)
    warm, cold = solve_weight_qp(H, g, 1.0, start=a), solve_weight_qp(H, g, 1.0)
    assert warm.info["support"] < 100
    assert warm.objective == pytest.approx(cold.objective, rel=OURS_NOT_WORSE_RTOL, abs=1e-14)


def test_non_convex_qp_ends_at_a_stationary_point():
    """An indefinite H (negative diagonal: no face can be factored) falls back to projected
    gradient, which ends where the Frank-Wolfe gap (a stationarity measure here) vanishes."""
    rng = np.random.default_rng(3)
    n = 30
    B = rng.normal(size=(n, n))
    H = 0.5 * (B + B.T) - 3 * np.eye(n)
    g = rng.normal(size=n)
    solution = solve_weight_qp(H, g, 1.0, start=np.full(n, 1.0 / n), max_iter=20_000)
    assert solution.method == "projected_gradient"
    assert solution.status == "optimal"
    assert np.all(solution.weights >= 0) and solution.weights.sum() == pytest.approx(1.0)


def test_unbounded_orthant_program_is_reported():
    """Negative curvature on the orthant: the program is unbounded below, and says so."""
    n = 5
    solution = solve_weight_qp(-np.eye(n), np.zeros(n), None, start=np.arange(1.0, n + 1))
    assert solution.status == "unbounded"


def test_simplex_projection_against_brute_force():
    rng = np.random.default_rng(4)
    for _ in range(20):
        v = rng.normal(size=7) * 3
        p = project_simplex(v, 2.0)
        assert p.sum() == pytest.approx(2.0) and np.all(p >= 0)
        # optimality: p = max(v - t, 0) with one threshold t; no feasible point is closer
        t = (v - p)[p > 0]
        assert np.allclose(t, t[0])
        for _ in range(50):
            q = rng.dirichlet(np.ones(7)) * 2.0
            assert np.sum((v - p) ** 2) <= np.sum((v - q) ** 2) + 1e-12


def test_mmd_step_closed_form_with_target_on_the_support():
    """theory §4: b = (a + tau p) / (1 + tau) for F = 1/2 MMD^2 without ridge."""
    rng = np.random.default_rng(5)
    x = np.stack(np.meshgrid(np.arange(5.0), np.arange(4.0)), -1).reshape(-1, 2)
    a, p = rng.uniform(0.5, 1.5, 20), rng.uniform(0.5, 1.5, 20)
    a, p = a / a.sum(), p / p.sum()
    k = jk.Gaussian(0.6)
    F = jk.MMD2(jk.Measure(x, p), k)
    for conserve in (False, True):
        result = mmd_step(F, jk.MMD(k, ridge=0.0), x, a, 0.4, conserve, energy_scale=1.0)
        np.testing.assert_allclose(result.weights, (a + 0.4 * p) / 1.4, atol=1e-12)


@pytest.mark.parametrize("conserve", [False, True])
def test_hellinger_step_against_conic_and_closed_form(conserve):
    """For a potential, b_i = a_i / (1 + eta (V_i - nu) / 2)^2 (stationarity of the scalar
    problems); the exact step also agrees with the conic JKO step on the same support."""
    rng = np.random.default_rng(6)
    x = rng.normal(size=(25, 2))
    a = rng.uniform(0.5, 1.5, 25)
    a /= a.sum()
    V = jk.Potential(lambda z: 0.5 * np.sum(z**2, 1), lambda z: z)
    eta = 0.7
    result = hellinger_step(V, x, a, eta, conserve, rtol=NEWTON_RTOL, energy_scale=1.0)
    assert result.ok
    b = result.weights
    values = 0.5 * np.sum(x**2, 1)
    nu = 0.0
    if conserve:  # the multiplier from the largest weight, then check all particles
        i = int(np.argmax(b))
        nu = values[i] + (2 / eta) * (1 - np.sqrt(a[i] / b[i]))
    # the Hellinger term is strongly convex with modulus m = min sqrt(a) / (eta b^{3/2}) near b,
    # so a certified gap bounds the distance to the minimizer by sqrt(2 gap / m)
    modulus = float(np.min(np.sqrt(a) / (eta * b**1.5))) / 2
    distance = np.sqrt(2 * max(result.certificate, result.info["weight_roundoff"]) / modulus)
    np.testing.assert_allclose(b, a / (1 + eta * (values - nu) / 2) ** 2, rtol=0,
                               atol=distance + 1e-15)
    mu = jk.Measure(x, a)
    conic = jk.ConicJKO().step(V, jk.Hellinger(conserve_mass=conserve), mu, eta)
    ours = V.value(mu.with_weights(b)) + jk.Hellinger().squared_distance(mu, mu.with_weights(b)) / (
        2 * eta)
    assert ours <= conic.objective + CONIC_OBJECTIVE_RTOL * abs(conic.objective)
    assert ours == pytest.approx(conic.objective, rel=CONIC_OBJECTIVE_RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("sigma", [10.0, 1.0])
def test_qp_at_a_thousand_particles_matches_clarabel(sigma):
    H, g, a = kernel_qp(1000, seed=7, sigma=sigma)
    solution = solve_weight_qp(H, g, 1.0, start=a)
    reference = clarabel_qp(H, g, 1.0)
    assert solution.status == "optimal"
    assert abs(solution.objective - reference) <= CLARABEL_RTOL * abs(reference)


def test_warm_start_off_its_face_minimum_is_settled_by_the_active_set():
    """A sparse warm start whose weights do not minimize on their own face, with every
    multiplier off the face positive: the face minimum must still be found (not mistaken for
    optimality, nor left to the slow fallback). Closed form: on the face {0, 1} of the simplex,
    min 1/2 |b|^2 - g.b gives b_0 - b_1 = g_0 - g_1."""
    n = 10
    g = np.zeros(n)
    g[:2] = [1.0, 0.9]
    start = np.zeros(n)
    start[:2] = 0.5
    solution = solve_weight_qp(np.eye(n), g, mass=1.0, start=start)
    assert solution.status == "optimal" and solution.method == "active_set"
    expected = np.zeros(n)
    expected[:2] = [0.55, 0.45]
    np.testing.assert_allclose(solution.weights, expected, atol=1e-14)


# -------------------------------------------------------------------------------------------------
# Dense minimizers: the dense path (one factorization of H, primal-dual active set)
# -------------------------------------------------------------------------------------------------

def overlapping_qp(n, sigma, seed=0, eta=0.1, ridge=1e-8):
    """The weight step with the target overlapping the particles (points from N(0, I_2), target
    from N(0.5, 0.49 I_2), uniform weights): the minimizer carries mass on most particles."""
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((n, 2)), 0.5 + 0.7 * rng.standard_normal((n, 2))
    k = jk.Gaussian(sigma)
    K = k(x, x)
    a = np.full(n, 1.0 / n)
    G = K + ridge * np.eye(n)
    return K + G / eta, k.apply(x, y, np.full(n, 1.0 / n)) + G @ a / eta, a


@pytest.mark.parametrize("mass", [1.0, None], ids=["simplex", "orthant"])
@pytest.mark.parametrize("sigma", [0.5, 1.0, 10.0])
def test_dense_minimizers_match_clarabel_at_every_bandwidth(mass, sigma):
    H, g, a = overlapping_qp(200, sigma)
    solution = solve_weight_qp(H, g, mass, start=a)
    assert solution.status == "optimal" and solution.method == "dense_active_set"
    assert solution.info["support"] > 100  # not sparse: the case the dense path is for
    assert_matches_clarabel(solution, H, g, a, mass)
    assert solution.gap <= solution.info["tolerance"]


def test_dense_minimizer_needs_few_iterations():
    """A minimizer on about 75% of the points: the active set grown from a vertex (cold start)
    adds and drops particles one at a time, hundreds of face steps; the dense path exchanges
    many at once and needs a few, to the same objective."""
    H, g, a = overlapping_qp(300, 1.0)
    dense, grown = solve_weight_qp(H, g, 1.0, start=a), solve_weight_qp(H, g, 1.0)
    assert dense.method == "dense_active_set" and grown.method == "active_set"
    assert dense.info["support"] > 200
    assert dense.iterations <= 10 < 100 <= grown.iterations
    assert dense.objective == pytest.approx(grown.objective, rel=OURS_NOT_WORSE_RTOL)


def test_dense_path_warm_start_on_the_minimizer_takes_one_iteration():
    """A warm start with the minimizer's zeros (the previous step of a run) starts the dense
    path on the right face: one face minimum, the same objective."""
    H, g, a = overlapping_qp(300, 0.5)
    cold = solve_weight_qp(H, g, 1.0, start=a)
    warm = solve_weight_qp(H, g, 1.0, start=cold.weights)
    assert cold.iterations > 3 and warm.iterations == 1
    assert warm.status == "optimal" and warm.method == "dense_active_set"
    assert warm.objective == pytest.approx(cold.objective, rel=OURS_NOT_WORSE_RTOL)


def test_sparse_minimizer_from_a_dense_start_goes_to_the_grown_active_set():
    """Particles far from the target (the kernel QP of ``kernel_qp``): the minimizer is sparse,
    the dense path gives up after its first face minimum, the active set grown from a vertex
    solves it."""
    H, g, a = kernel_qp(300, seed=2)
    solution = solve_weight_qp(H, g, 1.0, start=a)
    assert solution.status == "optimal" and solution.method == "active_set"
    assert solution.info["support"] < 100


@pytest.mark.parametrize("mass", [1.0, None], ids=["simplex", "orthant"])
def test_degenerate_minimizers_from_dense_starts(mass):
    """All weights zero at the optimum (orthant, g <= 0), a single weight carrying the mass
    (simplex), from the uniform start: certified and exact."""
    H, _, a = overlapping_qp(80, 1.0)
    g = np.zeros(a.size)
    g[7] = 100.0
    if mass is None:
        g = -np.abs(np.random.default_rng(8).normal(size=a.size))
    solution = solve_weight_qp(H, g, mass, start=a)
    assert solution.status == "optimal"
    expected = np.zeros(a.size)
    if mass is not None:
        expected[7] = mass
    np.testing.assert_array_equal(solution.weights, expected)


@pytest.mark.parametrize("ridge", [1e-8, 0.0], ids=["ridge", "singular"])
def test_duplicate_points_make_H_singular_and_the_status_stays_honest(ridge):
    """Every point twice: with the ridge H is definite but as ill-conditioned as 1 / ridge and
    the dense path solves it; without, H is singular. Either way the status says whether the
    certified gap met its tolerance, and an "optimal" objective agrees with Clarabel."""
    rng = np.random.default_rng(9)
    x = np.tile(rng.normal(size=(30, 2)), (2, 1))
    y = 0.5 + 0.7 * rng.normal(size=(60, 2))
    k = jk.Gaussian(1.0)
    K, a = k(x, x), np.full(60, 1.0 / 60)
    G = K + ridge * np.eye(60)
    H, g = K + G / 0.1, k.apply(x, y, np.full(60, 1.0 / 60)) + G @ a / 0.1
    solution = solve_weight_qp(H, g, 1.0, start=a)
    reference = clarabel_qp(H, g, 1.0)
    gap = frank_wolfe_gap(H @ solution.weights - g, solution.weights, 1.0, 1.0)
    assert gap == pytest.approx(solution.gap, rel=1e-6, abs=1e-15)
    assert (solution.status == "optimal") == (solution.gap <= solution.info["tolerance"])
    if ridge > 0:
        assert solution.status == "optimal" and solution.method == "dense_active_set"
    if solution.status == "optimal":
        assert abs(solution.objective - reference) <= CLARABEL_RTOL * abs(reference)


def test_mmd_step_on_overlapping_measures_takes_the_dense_path():
    rng = np.random.default_rng(10)
    x, y = rng.standard_normal((150, 2)), 0.5 + 0.7 * rng.standard_normal((150, 2))
    k = jk.Gaussian(1.0)
    F = jk.MMD2(jk.Measure(y, np.full(150, 1.0 / 150)), k)
    a = np.full(150, 1.0 / 150)
    for conserve in (True, False):
        result = mmd_step(F, jk.MMD(k), x, a, 0.1, conserve, energy_scale=F.value(jk.Measure(x, a)))
        assert result.ok and result.info["weight_solver"] == "dense_active_set"


def test_warm_start_of_the_wrong_shape_is_refused():
    H, g, _ = overlapping_qp(20, 1.0)
    with pytest.raises(ValueError, match=r"warm start must have shape \(20,\)"):
        solve_weight_qp(H, g, 1.0, start=np.ones(3))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_H_is_refused_wherever_the_entry_is(value):
    """A NaN or infinite entry of H, in either triangle or on the diagonal, is a ValueError
    (the check sums H's rows; finite entries whose sums overflow are then checked one by one)."""
    H, g, a = overlapping_qp(20, 1.0)
    for entry in [(0, 19), (19, 0), (7, 7)]:
        bad = H.copy()
        bad[entry] = value
        with pytest.raises(ValueError, match="non-finite data"):
            solve_weight_qp(bad, g, 1.0, start=a)
    scale = 1e306  # the row sums overflow, the entries are finite: the program is solved
    with np.errstate(over="ignore"):
        assert not np.isfinite((scale * H @ np.ones(20)).sum())
    huge = solve_weight_qp(scale * H, scale * g, 1.0, start=a)
    assert huge.status == "optimal"
    np.testing.assert_allclose(huge.weights, solve_weight_qp(H, g, 1.0, start=a).weights, atol=1e-9)


# -------------------------------------------------------------------------------------------------
# The low-rank path: faces by conjugate gradients preconditioned with a pivoted Cholesky factor
# -------------------------------------------------------------------------------------------------

def test_pivoted_cholesky_preconditioner_reads_the_ridge_and_is_close_to_H():
    """H = (1 + 1 / eta) K + ridge / eta I with K a Gaussian Gram of 2-D points (numerically low
    rank): the ridge read off the factorization is ridge / eta to 1%, and P = F^T F + mu I is
    positive definite with the eigenvalues of P^{-1} H near 1 (CG then needs a few steps)."""
    H, _, _ = overlapping_qp(1000, 10.0)
    faces = qp._lowrank_preconditioner(H)
    assert faces is not None and faces.rows.shape[0] < 60
    assert faces.shift == pytest.approx(1e-8 / 0.1, rel=1e-2)
    P = faces.rows.T @ faces.rows + faces.shift * np.eye(1000)
    eigenvalues = scipy.linalg.eigh(H, P, eigvals_only=True)
    assert 0.9 <= eigenvalues.min() and eigenvalues.max() <= 1.5


def test_well_conditioned_H_is_not_taken_for_low_rank():
    """A ridge of the size of the kernel (nothing low rank to exploit): no preconditioner, and the
    solver still certifies the minimum (on the dense path)."""
    H, g, a = overlapping_qp(1000, 1.0, ridge=1.0)
    assert qp._lowrank_preconditioner(H) is None
    solution = solve_weight_qp(H, g, 1.0, start=a)
    assert solution.status == "optimal" and solution.method == "dense_active_set"


@pytest.mark.parametrize("mass", [1.0, None], ids=["simplex", "orthant"])
def test_range_space_face_minimum_solves_the_face_kkt_system(mass):
    """The face minimum from the forward halves L^{-1} e_i and one backward solve is the solution
    of the KKT system on the free set, H_FF z_F = g_F + nu 1_F (sum z = mass), with the
    multipliers of the zero set equal to (H z - g - nu)_Z; the zero set met twice, as the
    iteration does (columns kept)."""
    rng = np.random.default_rng(3)
    n = 60
    A = rng.standard_normal((n, n))
    H, g = A @ A.T + 0.1 * np.eye(n), rng.standard_normal(n)
    inverse = qp._DenseInverse(H)
    forward = inverse.forward(g[:, None] if mass is None else np.column_stack([g, np.ones(n)]))
    for zero in (np.array([3, 17, 41]), np.array([41, 5, 17, 58, 3]), np.zeros(0, dtype=int)):
        z, lam = qp._range_space_face(inverse, forward, zero, mass)
        free = np.setdiff1d(np.arange(n), zero)
        if mass is None:
            expected, nu = np.linalg.solve(H[np.ix_(free, free)], g[free]), 0.0
        else:
            kkt = np.block([[H[np.ix_(free, free)], -np.ones((free.size, 1))],
                            [np.ones((1, free.size)), np.zeros((1, 1))]])
            *expected, nu = np.linalg.solve(kkt, np.append(g[free], mass))
        assert np.all(z[zero] == 0.0)
        np.testing.assert_allclose(z[free], expected, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(lam, (H @ z - g - nu)[zero], rtol=1e-8, atol=1e-10)


def test_blocked_forward_solve_matches_a_triangular_solve():
    """L^{-1} X by blocks of rows (the factor read once for all columns), with and without the
    columns' first nonzero rows (unit vectors enter at their block), against SciPy's solve."""
    rng = np.random.default_rng(4)
    n = 3 * qp.FORWARD_BLOCK + 17
    A = rng.standard_normal((n, n))
    inverse = qp._DenseInverse(A @ A.T + n * np.eye(n))
    lower = np.tril(inverse.factor)
    X = rng.standard_normal((n, 5))
    np.testing.assert_allclose(inverse.forward(X), scipy.linalg.solve_triangular(lower, X, lower=True),
                               rtol=1e-12, atol=1e-14)
    starts = np.array([0, 5, qp.FORWARD_BLOCK + 3, 2 * qp.FORWARD_BLOCK, n - 1])
    unit = np.zeros((n, starts.size))
    unit[starts, np.arange(starts.size)] = 1.0
    expected = scipy.linalg.solve_triangular(lower, unit, lower=True)
    np.testing.assert_allclose(inverse.forward(unit, starts=starts), expected, rtol=1e-12, atol=1e-14)


def test_probe_skips_the_low_rank_factor_only_where_it_would_pass_its_cap(monkeypatch):
    """n = 1000: at sigma 1 the pstrf probe of 124 spread points needs more than half the cap of
    62 rows, and the pivoted factorization without the probe gives up too (rank 115 to the first
    pass's resolution); at sigma 10 the probe passes and the factor is found."""
    H, _, _ = overlapping_qp(1000, 1.0)
    resolved = qp.LOWRANK_RESOLVE * float(H.diagonal().max())
    assert qp._probe_rank(H, 62, resolved) * qp.PROBE_FACTOR > 62
    assert qp._lowrank_preconditioner(H) is None
    monkeypatch.setattr(qp, "PROBE_MAX", 0)  # no probe: the factorization itself gives up
    assert qp._probe_rank(H, 62, resolved) == 0
    assert qp._lowrank_preconditioner(H) is None
    monkeypatch.undo()
    H, _, _ = overlapping_qp(1000, 10.0)
    resolved = qp.LOWRANK_RESOLVE * float(H.diagonal().max())
    assert 0 < qp._probe_rank(H, 62, resolved) * qp.PROBE_FACTOR <= 62
    assert qp._lowrank_preconditioner(H) is not None


@pytest.mark.parametrize("mass", [1.0, None], ids=["simplex", "orthant"])
def test_low_rank_path_matches_clarabel_and_the_dense_path(mass, monkeypatch):
    """n = 1000, sigma 10: the low-rank path (no factorization of H), certified with H itself,
    gives Clarabel's objective and the dense path's to within the two certified gaps."""
    H, g, a = overlapping_qp(1000, 10.0)
    solution = solve_weight_qp(H, g, mass, start=a)
    assert solution.status == "optimal" and solution.method == "low_rank_active_set"
    assert solution.info["products"] <= 10
    assert_matches_clarabel(solution, H, g, a, mass)
    monkeypatch.setattr(qp, "LOWRANK_MIN_SIZE", 10**9)
    dense = solve_weight_qp(H, g, mass, start=a)
    assert dense.method == "dense_active_set"
    assert abs(solution.objective - dense.objective) <= solution.gap + dense.gap + 1e-15


@pytest.mark.slow
@pytest.mark.parametrize("sigma", [0.5, 1.0])
def test_low_rank_path_with_many_zeros_matches_the_dense_path(sigma, monkeypatch):
    """n = 4000, sigma 0.5 and 1: hundreds of weights vanish (the exchanges are made on the
    low-rank surrogate, then on H); the objective is the dense path's within the certificates."""
    H, g, a = overlapping_qp(4000, sigma)
    solution = solve_weight_qp(H, g, 1.0, start=a)
    assert solution.status == "optimal" and solution.method == "low_rank_active_set"
    assert solution.info["support"] < 3950
    monkeypatch.setattr(qp, "LOWRANK_MIN_SIZE", 10**9)
    dense = solve_weight_qp(H, g, 1.0, start=a)
    assert dense.status == "optimal" and dense.method == "dense_active_set"
    assert abs(solution.objective - dense.objective) <= solution.gap + dense.gap + 1e-15


# -------------------------------------------------------------------------------------------------
# The interior-point fallback of the dense path (from INTERIOR_MIN_SIZE points)
# -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mass", [1.0, None], ids=["simplex", "orthant"])
def test_interior_point_is_certified_at_the_dense_paths_objective(mass):
    """Mehrotra's interior point on the overlap QP (n = 200, sigma 0.5, dozens of vanishing
    weights): a few dozen Newton steps at most, weights > 0 (on the simplex of mass 1), and its
    certified gap within the tolerance, at the dense path's objective within the two gaps."""
    H, g, a = overlapping_qp(200, 0.5)
    solver = qp._ActiveSet(H, g, mass, qp.DEFAULT_WEIGHT_RTOL, None, mass_bound=a.sum())
    b, steps = qp._interior_point(H, g, mass, solver)
    dense = solve_weight_qp(H, g, mass, start=a)
    assert dense.method == "dense_active_set" and dense.info["support"] < 190
    assert steps <= 30 and np.all(b > 0)
    if mass is not None:
        assert b.sum() == pytest.approx(mass, rel=1e-14)
    r = H @ b - g
    objective = 0.5 * b @ H @ b - g @ b
    assert frank_wolfe_gap(r, b, mass, a.sum()) <= qp.DEFAULT_WEIGHT_RTOL * abs(objective)
    assert abs(objective - dense.objective) <= 2 * qp.DEFAULT_WEIGHT_RTOL * abs(objective)


@pytest.mark.parametrize("mass", [1.0, None], ids=["simplex", "orthant"])
def test_dense_path_that_does_not_converge_finishes_with_the_interior_point(mass, monkeypatch):
    """When the primal-dual iteration does not converge (here: at most 2 iterations allowed) on
    at least INTERIOR_MIN_SIZE points, the interior point finishes: certified, Clarabel's
    objective."""
    H, g, a = overlapping_qp(300, 0.5)
    monkeypatch.setattr(qp, "INTERIOR_MIN_SIZE", 100)
    monkeypatch.setattr(qp, "PDAS_MAX_ITER", 2)
    solution = solve_weight_qp(H, g, mass, start=a)
    assert solution.status == "optimal" and solution.method == "interior_point"
    assert_matches_clarabel(solution, H, g, a, mass)
    assert solution.gap <= solution.info["tolerance"]


@pytest.mark.slow
def test_interior_point_finishes_where_the_primal_dual_iteration_cycles():
    """n = 1000, sigma 0.5, seed 2: the primal-dual iteration does not converge in PDAS_MAX_ITER
    iterations (half the weights vanish); the interior point finishes, at Clarabel's objective."""
    H, g, a = overlapping_qp(1000, 0.5, seed=2)
    solution = solve_weight_qp(H, g, 1.0, start=a)
    assert solution.status == "optimal" and solution.method == "interior_point"
    assert_matches_clarabel(solution, H, g, a, 1.0)
