"""KL-proximal maps of the energies, the building block of the entropic JKO step.

The generalized Sinkhorn iterations of the entropic step (docs/entropic.md) need, for the
measure q given by the plan, the KL-proximal map

    prox_{sigma F}^{KL}(q) = argmin_b  sigma F(b) + KL(b | q),    KL(b | q) = sum b log(b/q) - b + q,

whose optimality condition is sigma f(b) + log(b / q) = 0 with f = dF/dmu. On a fixed support
every energy of the library has a first variation of the form

    f(b) = L log b + o + sum_k c_k b^(p_k) + Q b                           (``EnergyForm``)

(L, c_k >= 0, p_k > 0, Q symmetric positive semidefinite): Entropy and KL give the log
term, Potential the offset o, PorousMedium a power, MMD2 and Interaction the matrix Q.
In s = log b the condition reads

    A s + o' + sum_k c'_k e^(p_k s) + Q' e^s = 0,     A = 1 + sigma L > 0,          (*)

solved by ``LogEquation``: in closed form without powers and Q, through the Wright omega
function with one power (A s + c e^(p s) = R  <=>  s = R/A - omega(log(p c / A) + p R / A) / p),
by a vectorized monotone Newton iteration per point with several powers, and by a damped
Newton iteration with one symmetric positive definite solve per step when Q couples the
points. Everything works on log q and log b, so the log-domain iterations never
exponentiate a potential.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import linalg
from scipy.special import wrightomega

from ..energies import UNKNOWN_PSD, ZERO_SUM_PSD, Energy, NoWeightFormError, WeightForm, psd_factor
from ..measures import Measure
from .roots import mass_multiplier, solve_increasing

#: Points above which a coupled energy (MMD2, Interaction) is refused: its KL-proximal map
#: solves dense n x n systems (O(n^3)), and its Gram matrix alone would need n^2 floats.
MAX_COUPLED_POINTS = 6000

#: Newton stops when every |step| in s = log b is below this (b is then exact to 1e-12
#: relative), or after NEWTON_MAX_ITER steps.
NEWTON_TOL = 1e-12
NEWTON_MAX_ITER = 100

#: The coupled Newton iteration stops when the residual of (*) (in units of log b, times A)
#: is below this: b is then exact to about 1e-11 relative.
NEWTON_RESIDUAL_TOL = 1e-11

#: A chord step (the Newton matrix of an earlier step of the same equation, factored then) is
#: kept when it divides the residual of (*) by at least 1 / CHORD_RATE; otherwise the step is
#: a true Newton step. Between Sinkhorn iterations q moves little, and a chord step costs
#: O(n r) against O(n r^2 + r^3) for a factorization.
CHORD_RATE = 0.25

#: Largest change of log b in one Newton step of the coupled solve (a trust region): far
#: from the root the Newton step of a near-singular Gram matrix can be huge.
NEWTON_MAX_LOG_STEP = 2.0

#: log b below which a point is left out of the coupled Newton system and solved afterwards
#: in closed form (its weight e^-200 = 1e-87 cannot change Q b).
NEGLIGIBLE_LOG = -200.0

#: log b below which a weight counts as zero in the coupled Newton system (e^-700 = 1e-304).
LOG_FLOOR = -700.0

#: The low-rank factor W W^T of a coupling matrix Q (``low_rank_factor``) leaves out a PSD
#: remainder E with diagonal below this fraction of ||Q||_F, so ||E|| <= n RANK_TOL ||Q||_F; E
#: is left out of the Newton matrix, never out of the residual, so the root is that of the
#: exact Q. Newton with the truncated matrix converges linearly at the rate ||E|| max(b) / A at
#: worst (the dropped part against diag(A / b)). The Gram matrices of smooth kernels keep
#: about a third to two thirds of their rank here (183-265 of 400 on the 20 x 20 grid of
#: examples/configs/ift_mixture.toml).
RANK_TOL = 1e-12

#: A coupled solve that ends (NEWTON_MAX_ITER steps, or a line search that no longer
#: decreases) with a residual of (*) above this is unresolved: the Sinkhorn step that used it
#: is not an exact block maximization, and the entropic step stops and says so. Float64
#: resolves the residual to about 1e-13 times sigma ||Q|| max(b); 1e-8 leaves room for that.
PROX_FAIL_RESIDUAL = 1e-8


class UnsupportedEnergyError(ValueError):
    """The entropic step has no KL-proximal map for this energy."""


@dataclass(frozen=True)
class EnergyForm(WeightForm):
    """f(b) = log_coef log b + offset + sum_k c_k b^p_k + quadratic @ b on a fixed support: the
    energy's own normal form (``energies.WeightForm``) with the log part's reference folded into
    the offset (+inf where b must vanish), and the low-rank factor of Q kept once computed.
    Built from an energy by ``energy_form``.
    """

    def factor(self) -> np.ndarray | None:
        """W (n, r) with quadratic = W W^T up to RANK_TOL (``low_rank_factor``), computed once."""
        if self.quadratic is None:
            return None
        if self.__dict__.get("_factor") is None:
            object.__setattr__(self, "_factor", low_rank_factor(self.quadratic))
        return self._factor

    @property
    def separable(self) -> bool:
        return self.quadratic is None


def low_rank_factor(Q: np.ndarray) -> np.ndarray:
    """W (n, r) with W W^T = Q up to a PSD remainder E with every E_ii <= RANK_TOL ||Q||_F
    (so |E_ij| <= RANK_TOL ||Q||_F): the Cholesky factorization of the symmetric PSD Q with
    diagonal pivoting (LAPACK ``pstrf``), stopped at that pivot. The numerically null space
    and round-off negatives are left out; r is about the number of eigenvalues above
    RANK_TOL times the largest (225 of 400 either way on the 20 x 20 grid of
    examples/configs/ift_mixture.toml), at about a tenth of the cost of an eigendecomposition."""
    n = Q.shape[0]
    symmetric = 0.5 * (Q + Q.T)
    scale = float(np.linalg.norm(symmetric))
    if not (np.isfinite(scale) and scale > 0):
        return np.zeros((n, 0))
    factor, pivots, rank, _ = linalg.lapack.dpstrf(symmetric, tol=RANK_TOL * scale, lower=1)
    W = np.zeros((n, rank))
    W[pivots[:n] - 1] = np.tril(factor[:, :rank])
    return W


def energy_form(F: Energy, mu: Measure) -> EnergyForm:
    """The ``EnergyForm`` of F on the support of mu, read off F's own normal form
    (``Energy.form``), or UnsupportedEnergyError when the entropic step cannot take it."""
    try:
        form = F.form(mu)
    except NoWeightFormError as error:
        raise UnsupportedEnergyError(
            f"EntropicJKO has no KL-proximal map for {type(F).__name__} ({error}); it takes "
            "energies that state a convex form in the weights: sums and positive multiples of "
            "jk.Entropy, jk.KL, jk.Potential, jk.PorousMedium, jk.MMD2 and convex "
            "jk.Interaction energies") from None
    if not form.convex:
        raise UnsupportedEnergyError(
            f"{type(F).__name__} is a negative multiple of an energy that is not linear in the "
            "weights, so it is not convex; the entropic JKO step needs a convex energy")
    quadratic = form.quadratic
    if quadratic is not None:
        _check_coupled(mu.n, type(F).__name__)
        if form.quadratic_psd == ZERO_SUM_PSD:
            raise UnsupportedEnergyError(
                f"{type(F).__name__} has a conditionally positive definite kernel, so it is not "
                "convex on M+; the entropic step takes positive definite kernels "
                "(jk.Gaussian, jk.IMQ, jk.Laplace)")
        quadratic = 0.5 * (quadratic + quadratic.T)
        if form.quadratic_psd == UNKNOWN_PSD and psd_factor(quadratic) is None:
            raise UnsupportedEnergyError(
                "this energy is not convex in the weights (its matrix, e.g. an Interaction's "
                "[W(x_i - x_j)], is not positive semidefinite, e.g. an attraction); the entropic "
                "step cannot take it. Use a particle method (jk.ParticleJKO, jk.ExplicitEuler)")
    return EnergyForm(mu.n, form.log_coef, form.total_offset, form.powers, quadratic)


def _check_coupled(n: int, name: str) -> None:
    if n > MAX_COUPLED_POINTS:
        raise UnsupportedEnergyError(
            f"{name} couples all {n} points: its KL-proximal map solves dense {n} x {n} systems, "
            f"refused above {MAX_COUPLED_POINTS} points; use a coarser support or a particle method")


class LogEquation:
    """Solver of (*): A s + offset + sum_k c_k e^(p_k s) + Q e^s = rhs, for s = log b.

    ``A``: scalar > 0; offset: (n,) (may hold +inf: s = -inf there); powers [(c_k, p_k)];
    Q: (n, n) PSD or None; factor: W (n, r) with Q = W W^T up to RANK_TOL (computed from Q
    when not given; the restriction of Q to a subset of points is W[subset] W[subset]^T, so
    one factorization serves every sub-system). ``solve(rhs, start)`` returns s; ``start``
    warm-starts the coupled Newton iteration (the Sinkhorn loop passes the previous solution).
    """

    def __init__(self, A: float, offset: np.ndarray, powers, Q: np.ndarray | None,
                 factor: np.ndarray | None = None):
        if not A > 0:
            raise ValueError(f"the log coefficient must be positive, got {A}")
        self.A, self.offset, self.powers, self.Q = float(A), offset, list(powers), Q
        self._W = factor
        self.unresolved = 0  # coupled solves that ended above PROX_FAIL_RESIDUAL
        self.worst_residual = 0.0
        self.zero = ~np.isfinite(offset) & (offset > 0)  # b = 0 forced (KL target 0)
        self.newton_steps = 0
        self.chord_steps = 0  # of the newton_steps, those made with an earlier Newton matrix
        self._chord = None  # (scale, V, Cholesky factor) of the last Newton matrix

    def solve(self, rhs: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
        dead = self.zero | ~np.isfinite(rhs)  # b = 0: forced, or q = 0
        R = np.where(dead, 0.0, rhs - np.where(dead, 0.0, self.offset))
        if self.Q is None:
            s = self._separable(R)
        elif dead.any():
            s = np.full(R.shape, -np.inf)
            live = ~dead
            sub = LogEquation(self.A, self.offset[live], self.powers, self.Q[np.ix_(live, live)],
                              self.factor[live])
            start = None if start is None else start[live]
            s[live] = sub._coupled(R[live], rhs[live], start)
            self._absorb(sub)
        else:
            s = self._coupled_split(R, rhs, start)
        s[dead] = -np.inf
        return s

    def _coupled_split(self, R, rhs, start):
        """Newton on the points that matter; the others (b < e^NEGLIGIBLE_LOG) in closed form.

        Points whose diagonal-start root is below NEGLIGIBLE_LOG carry no weight in Q b to
        float precision, so for them (*) is separable given the others: s = (R - Q b - ...) / A,
        exact in the log domain however small (a floor on log b would corrupt the potentials).
        """
        upper = self._separable_start(R)
        small = upper < NEGLIGIBLE_LOG
        for _ in range(3):
            if not small.any():
                return self._coupled(R, rhs, start)
            big = ~small
            s = np.empty_like(R)
            if big.any():
                sub = LogEquation(self.A, self.offset[big], self.powers, self.Q[np.ix_(big, big)],
                                  self.factor[big])
                s[big] = sub._coupled(R[big], rhs[big], None if start is None else start[big])
                self._absorb(sub)
                coupling = self.Q[np.ix_(small, big)] @ np.exp(s[big])
            else:
                coupling = 0.0
            s[small] = LogEquation(self.A, np.zeros(small.sum()), self.powers, None)._separable(
                R[small] - coupling)
            grown = small & (s >= NEGLIGIBLE_LOG)  # possible for Q with negative entries
            if not grown.any():
                return s
            small = small & ~grown
        return s

    # -- separable -------------------------------------------------------------------------
    def _single_power(self, R, c, p):
        """A s + c e^(p s) = R through the Wright omega function."""
        with np.errstate(over="ignore", invalid="ignore"):
            z = np.log(p * c / self.A) + p * R / self.A
            w = np.asarray(wrightomega(z).real, float)
        return R / self.A - w / p

    def _separable(self, R):
        finite = np.isfinite(R)
        Rf = np.where(finite, R, 0.0)
        if not self.powers:
            return Rf / self.A
        starts = [self._single_power(Rf, c, p) for c, p in self.powers]
        s = np.min(starts, axis=0)
        if len(self.powers) == 1:
            return s
        # monotone Newton: phi(s) = A s + sum c e^(p s) - R is convex increasing and each
        # single-power root is >= the root, so Newton from their minimum decreases to it
        for _ in range(NEWTON_MAX_ITER):
            self.newton_steps += 1
            terms = [(c * np.exp(p * s), p) for c, p in self.powers]
            phi = self.A * s + sum(t for t, _ in terms) - Rf
            slope = self.A + sum(p * t for t, p in terms)
            step = phi / slope
            s = s - step
            if np.max(np.abs(step)) <= NEWTON_TOL:
                break
        return s

    # -- coupled ---------------------------------------------------------------------------
    def _absorb(self, sub: LogEquation) -> None:
        self.newton_steps += sub.newton_steps
        self.chord_steps += sub.chord_steps
        self.unresolved += sub.unresolved
        self.worst_residual = max(self.worst_residual, sub.worst_residual)

    def _give_up(self, size: float) -> None:
        if not size <= PROX_FAIL_RESIDUAL:
            self.unresolved += 1
            self.worst_residual = max(self.worst_residual, float(size)) if np.isfinite(size) \
                else np.inf

    @property
    def factor(self) -> np.ndarray:
        if self._W is None:
            self._W = low_rank_factor(self.Q)
        return self._W

    def _newton_direction(self, diagonal: np.ndarray, phi: np.ndarray) -> np.ndarray:
        """y = -(diag(d) + W W^T)^-1 phi (the Newton step in b), by Woodbury on the range of Q.

        With T = diag(d)^-1/2 and V = T W: y = -T (I - V (I_r + V^T V)^-1 V^T) T phi. The only
        matrix factored is I_r + V^T V, whose eigenvalues are >= 1 (condition number at most
        1 + ||Q|| max(1 / d)): no solve with the near-singular Q or with the diagonal 1 / b that
        spans hundreds of orders of magnitude. Cost O(n r^2).
        """
        scale = 1.0 / np.sqrt(diagonal)
        V = self.factor * scale[:, None]
        small = np.eye(V.shape[1]) + V.T @ V
        factor = linalg.cho_factor(small, lower=True, check_finite=False)
        self._chord = (scale, V, factor)
        return self._chord_direction(phi)

    def _chord_direction(self, phi: np.ndarray) -> np.ndarray:
        """-(diag(d) + W W^T)^-1 phi with the diagonal d of the last factorization (Woodbury as
        in ``_newton_direction``, its factor reused: O(n r) instead of O(n r^2 + r^3))."""
        scale, V, (factor, lower) = self._chord
        rhs = scale * phi
        inner, _ = linalg.lapack.dpotrs(factor, V.T @ rhs, lower=int(lower))  # cho_solve, less overhead
        return -scale * (rhs - V @ inner)

    def _try_chord(self, s, R, phi, size):
        """A full step along the chord direction (the Newton matrix of an earlier step, whose
        diagonal A / b moved little since: the Sinkhorn loop calls with nearby q), kept when it
        brings the residual to at most CHORD_RATE times its size: (s, phi, b) of the accepted
        point; else None (and the step is a true Newton step)."""
        if self._chord is None or self._chord[0].shape != s.shape:
            return None
        step = self._chord_direction(phi) / np.maximum(np.exp(s), np.exp(LOG_FLOOR))
        largest = np.max(np.abs(step))
        if not largest <= NEWTON_MAX_LOG_STEP:
            return None
        trial = np.maximum(s + step, LOG_FLOOR)
        phi_trial, b_trial = self._residual(trial, R)
        if not np.max(np.abs(phi_trial)) <= CHORD_RATE * size:
            return None
        return trial, phi_trial, b_trial

    def _residual(self, s, R):
        b = np.exp(s)
        phi = self.A * s - R + self.Q @ b
        for c, p in self.powers:
            phi += c * np.exp(p * s)
        return phi, b

    def _merit(self, s, R):
        """Psi(b) = sum A (b log b - b) - R b + sum c b^(p+1)/(p+1) + b^T Q b / 2: (*) is grad Psi."""
        b = np.exp(s)
        value = np.sum(self.A * (b * s - b) - R * b) + 0.5 * b @ (self.Q @ b)
        for c, p in self.powers:
            value += np.sum(c * b ** (p + 1) / (p + 1))
        return value

    def _coupled(self, R, rhs, start):
        if start is None or not np.all(np.isfinite(start)):
            start = self._separable_start(R)
        s = np.maximum(np.asarray(start, float).copy(), LOG_FLOOR)
        merit = self._merit(s, R)
        phi, b = self._residual(s, R)
        size = np.max(np.abs(phi), initial=0.0)
        for _ in range(NEWTON_MAX_ITER):
            size = np.max(np.abs(phi), initial=0.0)
            if not np.isfinite(size) or size <= NEWTON_RESIDUAL_TOL:
                break
            self.newton_steps += 1
            chord = self._try_chord(s, R, phi, size)
            if chord is not None:
                s, phi, b = chord
                merit = None  # computed when a line search needs it
                self.chord_steps += 1
                continue
            merit = self._merit(s, R) if merit is None else merit
            diagonal = self.A / np.maximum(b, np.exp(LOG_FLOOR))
            for c, p in self.powers:
                diagonal += c * p * b ** (p - 1)
            try:
                y = self._newton_direction(diagonal, phi)
            except np.linalg.LinAlgError:  # round-off broke I + V^T V's definiteness (tau ~ 1e30)
                self._give_up(size)
                return s
            step = y / np.maximum(b, np.exp(LOG_FLOOR))
            largest = np.max(np.abs(step))
            if largest > NEWTON_MAX_LOG_STEP:  # a trust region in log b: far from the root
                step *= NEWTON_MAX_LOG_STEP / largest  # the Gram part can be near singular
            slope = float(phi @ (b * step))  # directional derivative of the merit, < 0
            t = 1.0
            while True:
                # Armijo on the convex merit Psi(e^s); near the root, where Psi no longer
                # resolves the decrease, a smaller residual is accepted instead
                trial = np.maximum(s + t * step, LOG_FLOOR)
                value = self._merit(trial, R)
                phi_trial, b_trial = self._residual(trial, R)
                if (value <= merit + 1e-4 * t * slope
                        or np.max(np.abs(phi_trial)) <= 0.9 * size):
                    break
                t *= 0.5
                if t < 1e-12:
                    self._give_up(size)
                    return s
            s, merit, phi, b = trial, value, phi_trial, b_trial
            size = np.max(np.abs(phi), initial=0.0)
        self._give_up(size)
        return s

    def _separable_start(self, R):
        """The root with Q replaced by its diagonal (Wright omega / monotone Newton).

        For Q with nonnegative entries (Gram matrices of the kernels here) Q b >= diag(Q) b,
        so this is above the root, and of the right scale even when q is far from it.
        """
        diagonal = np.diag(self.Q)
        powers = list(self.powers)
        if np.all(diagonal > 0):
            return _PointwiseLinear(self.A, powers, diagonal)._separable(R)
        return LogEquation(self.A, np.zeros_like(R), powers, None)._separable(R)


class _PointwiseLinear(LogEquation):
    """A s + sum_k c_k e^(p_k s) + d_i e^s = R: the power p = 1 with a per-point coefficient."""

    def __init__(self, A, powers, diagonal):
        super().__init__(A, np.zeros_like(diagonal), list(powers) + [(diagonal, 1.0)], None)


class KLProx:
    """b = prox_{sigma F}^{KL}(q) for F given by an ``EnergyForm``: (*) with A = 1 + sigma L."""

    def __init__(self, form: EnergyForm, sigma: float):
        self.form, self.sigma = form, float(sigma)
        coupled = form.quadratic is not None
        self.equation = LogEquation(1.0 + sigma * form.log_coef, sigma * form.offset,
                                    [(sigma * c, p) for c, p in form.powers],
                                    sigma * form.quadratic if coupled else None,
                                    np.sqrt(sigma) * form.factor() if coupled else None)
        self._last = None
        # closed form log b = (log q - sigma o) / A: the scaling v = b / q is q^-theta e^c0
        self.closed = form.quadratic is None and not form.powers
        A = self.equation.A
        self.theta = 1.0 - 1.0 / A
        with np.errstate(invalid="ignore"):
            self.c0 = np.where(self.equation.zero, -np.inf, -sigma * form.offset / A)

    def scaling(self, q: np.ndarray) -> np.ndarray:
        """v = prox(q) / q in the kernel domain (closed forms only): one log and one exp."""
        log_v = np.log(q)
        log_v *= -self.theta
        log_v += self.c0
        return np.exp(log_v, out=log_v)

    def __call__(self, log_q: np.ndarray) -> np.ndarray:
        """log b from log q: (n,) -> (n,)."""
        s = self.equation.solve(log_q, self._last)
        self._last = s
        return s


# ---------------------------------------------------------------------------------------------
# Inf-convolutions: the column function is the reaction envelope of F
# ---------------------------------------------------------------------------------------------


class _PointwiseProx:
    """A KL-proximal map that solves one increasing equation r(z) = 0 per point (F separable).

    Subclasses give ``_residual(z, lq, offset) -> (r, dr / dz, log b)``, ``_refuse(residual,
    lo, hi)`` (raise when the brackets show an unbounded step), ``_log_mass_slope(weights,
    total, z, dr)`` (d log sum b / d l) and the constants BOUND and MASS_ROUNDS. The roots come
    from ``roots.solve_increasing`` (warm started at the last call's roots); with a mass, the
    multiplier l added to the offset of f comes from ``roots.mass_multiplier``.
    """

    BOUND = 60.0
    MASS_ROUNDS = 60

    def __init__(self, form: EnergyForm, mass: float | None):
        self.form, self.mass = form, mass
        self.shift = 0.0  # the multiplier of the last call
        self._previous = None  # the roots of the last call
        self.newton_steps = 0
        self.log_b = None  # log of the measure read off the column, at the last call

    def _solve(self, lq, offset):
        """(z, log b, dr / dz) at the roots, for the offset of f given."""

        def residual(z):
            return self._residual(z, lq, offset)

        z, steps, (_, slope, lb) = solve_increasing(
            residual, lq.size, self.BOUND, self._previous,
            lambda lo, hi: self._refuse(residual, lo, hi), NEWTON_TOL, NEWTON_MAX_ITER)
        self.newton_steps += steps
        return z, lb, slope

    def _conserve(self, lq, offset, live):
        """sum(b) = mass through the multiplier added to the first variation: (z, log b)."""

        def solve(shift):
            z, lb, slope = self._solve(lq, offset + shift)
            return np.where(live, np.exp(lb), 0.0), (z, lb, slope)

        def log_mass_slope(weights, total, solution):
            z, _, slope = solution
            return self._log_mass_slope(weights, total, z, slope)

        self.shift, (z, lb, _) = mass_multiplier(solve, log_mass_slope, self.mass, self.shift,
                                                 self.MASS_ROUNDS)
        return z, lb


class HellingerEnvelopeProx(_PointwiseProx):
    """KL-proximal map of sigma G, G(nu) = min_b F(b) + He^2(nu, b) / (2 tau beta) (WFR).

    Per point (F separable) the prox min_{nu, b} KL(nu | q) + sigma F(b) + kappa sum (nu + b
    - 2 sqrt(nu b)), kappa = 2 sigma / (tau beta), is stationary iff, with t = log sqrt(b / nu),

        log nu = log q - kappa (1 - e^t),   log b = log nu + 2 t,
        g(t) = sigma f(b) + kappa (1 - e^-t) = 0,

    and g is strictly increasing in t: one root per point, found by a bracketed Newton
    iteration. ``conserve_mass``: f -> f + l with the scalar l chosen so that sum(b) = mass
    (sum b decreases in l; Newton on log sum b).
    """

    #: |t| = |log sqrt(b / nu)| is bracketed in [-T_MAX, T_MAX]: a step changes a mass by at
    #: most e^(2 T_MAX) relative, or the energy is unbounded below.
    T_MAX = BOUND = 60.0

    def __init__(self, form: EnergyForm, sigma: float, tau_beta: float, mass: float | None):
        _require_separable(form, "WFR step")
        super().__init__(form, mass)
        self.sigma = float(sigma)
        self.kappa = 2.0 * self.sigma / tau_beta

    def _residual(self, t, lq, offset):
        """g(t), g'(t) and log b at t."""
        lb = lq - self.kappa * (1.0 - np.exp(t)) + 2.0 * t
        with np.errstate(over="ignore", invalid="ignore"):
            f, slope = _separable_variation(self.form, lb, offset)
            g = self.sigma * f + self.kappa * (1.0 - np.exp(-t))
            dg = self.sigma * slope * (self.kappa * np.exp(t) + 2.0) + self.kappa * np.exp(-t)
        return g, dg, lb

    def _refuse(self, residual, lo, hi):
        if np.any(~(residual(hi)[0] > 0)):
            raise UnsupportedEnergyError(
                "the WFR step is unbounded: some mass would grow by more than "
                f"e^{2 * self.T_MAX:.0f}; the energy is unbounded below in the Hellinger "
                "direction (e.g. a potential below -2 / (tau beta))")

    def _log_mass_slope(self, weights, total, t, dg):
        return -(weights * (self.kappa * np.exp(t) + 2.0) * self.sigma / dg).sum() / total

    def __call__(self, log_q):
        live = np.isfinite(log_q)
        lq = np.where(live, log_q, 0.0)
        if self.mass is None:
            t, lb, _ = self._solve(lq, self.form.offset)
        else:
            t, lb = self._conserve(lq, self.form.offset, live)
        self._previous = t
        log_nu = lq - self.kappa * (1.0 - np.exp(t))
        self.log_b = np.where(live, lb, -np.inf)
        return np.where(live, log_nu, -np.inf)

#: Zero sets of the IFT envelope whose factorizations are kept (at most CACHE_FLOATS floats).
ZERO_SET_CACHE = 8
CACHE_FLOATS = 1 << 25


class MMDEnvelope:
    """G(nu) = min_{b >= 0} F(b) + MMD^2(nu, b) / (2 tau beta) for a quadratic F (IFT).

    With f(b) = o + Q_F b, G_M = K + ridge I, c = 1 / (tau beta) and the set Z of weights held
    at zero, the minimizer is affine in nu on the free set (with sum(b) = mass added through
    its multiplier when the geometry conserves mass): b*(nu) = B_Z nu + b0_Z, and G is
    piecewise quadratic, C^1, with grad G(nu) = c G_M (nu - b*(nu)) = H_Z nu + offset_Z.
    ``prox`` solves the KL-proximal map of sigma G with H_Z and updates Z until the KKT
    conditions of the inner problem hold (b >= 0, multipliers >= 0 on Z).
    """

    def __init__(self, form: EnergyForm, geometry, mu: Measure, tau: float, zero=None):
        """``zero``: a zero set to start from (the last step's on the same support), or None."""
        if not form.is_quadratic:
            raise UnsupportedEnergyError(
                "EntropicJKO's IFT step takes energies whose first variation is affine in the "
                "weights (MMD2, Potential, convex Interaction and their sums): their MMD "
                "envelope is then piecewise quadratic (docs/entropic.md). For KL, Entropy or "
                "PorousMedium under IFT use jk.ConicJKO or jk.Splitting")
        reaction = geometry.reaction
        if not reaction.metric_definite:
            raise UnsupportedEnergyError(
                f"the metric of {reaction!r} is positive definite only on zero-sum vectors (a "
                "conditionally positive definite kernel); EntropicJKO's IFT step needs a "
                "positive definite kernel")
        n = mu.n
        _check_coupled(n, "IFT")
        self.n, self.c = n, 1.0 / (tau * geometry.beta)
        matrix, ridge = reaction.metric_parts(mu.points)  # G_M = K + ridge I for MMD
        self.metric = 0.5 * (matrix + matrix.T) + ridge * np.eye(n)
        self.S = self.c * self.metric + (0.0 if form.quadratic is None else form.quadratic)
        self.offset = form.offset
        self.mass = mu.mass if geometry.conserve_mass else None
        start = zero is not None and zero.shape == (n,) and not zero.all()
        self.zero = zero.copy() if start else np.zeros(n, bool)
        self.active_set_changes = 0
        # each entry holds about 3 n^2 floats (B, H and the factor of H)
        self._cache: dict = {}
        self._cache_size = int(min(ZERO_SET_CACHE, max(1, CACHE_FLOATS // (3 * n * n))))
        self._build()

    def _build(self):
        """B, b0 (b*(nu) = B nu + b0) and G's EnergyForm for the current zero set, from the
        cache of the last zero sets when there (the iterations revisit them)."""
        key = self.zero.tobytes()
        cached = self._cache.pop(key, None)
        if cached is None:
            cached = self._factorize()
        self._cache[key] = cached  # most recent last
        while len(self._cache) > self._cache_size:
            self._cache.pop(next(iter(self._cache)))
        self.B, self.b0, self.form = cached

    def _factorize(self):
        n, c, free = self.n, self.c, ~self.zero
        S = self.S[np.ix_(free, free)]
        S = S + 1e-14 * np.trace(S) / max(S.shape[0], 1) * np.eye(S.shape[0])
        factor = linalg.cho_factor(S, check_finite=False)
        B = np.zeros((n, n))
        b0 = np.zeros(n)
        B[free] = linalg.cho_solve(factor, c * self.metric[free], check_finite=False)
        b0[free] = -linalg.cho_solve(factor, self.offset[free], check_finite=False)
        if self.mass is not None:
            e = np.zeros(n)
            e[free] = linalg.cho_solve(factor, np.ones(free.sum()), check_finite=False)
            B = B - np.outer(e, B.sum(axis=0)) / e.sum()
            b0 = b0 - e * (b0.sum() - self.mass) / e.sum()
        H = c * self.metric @ (np.eye(n) - B)
        return B, b0, EnergyForm(n, offset=-c * self.metric @ b0, quadratic=0.5 * (H + H.T))

    def minimizer(self, nu: np.ndarray) -> np.ndarray:
        return self.B @ nu + self.b0

    def update_zero_set(self, nu: np.ndarray, rebuild: bool = True) -> bool:
        """Move weights between the free set and Z by the KKT conditions; True if Z changed
        (with ``rebuild=False``: True if it would change, Z and the factorization kept)."""
        b = self.minimizer(nu)
        gradient = self.offset + self.S @ b - self.c * (self.metric @ nu)
        free = ~self.zero
        shift = -gradient[free].mean() if (self.mass is not None and free.any()) else 0.0
        scale = max(np.abs(b).max(), 1e-300)
        leave = self.zero & (gradient + shift < -1e-12 * max(1.0, np.abs(gradient).max()))
        enter = free & (b < -1e-13 * scale)
        if not (leave.any() or enter.any()):
            return False
        if not rebuild:
            return True
        self.zero = (self.zero & ~leave) | enter
        if self.zero.all():
            self.zero[np.argmax(b)] = False
        self.active_set_changes += 1
        self._build()
        return True

    def bregman(self, nu_new: np.ndarray, nu_old: np.ndarray) -> float:
        d = nu_new - nu_old
        return 0.5 * float(d @ (self.form.quadratic @ d))


class EnvelopeProx:
    """KL-proximal map of sigma G for the piecewise quadratic MMD envelope (``MMDEnvelope``)."""

    #: A zero set found inconsistent is rebuilt (a Cholesky, an n x n solve, a pivoted Cholesky) in at
    #: most ROUNDS active-set rounds of one call in every REBUILD_EVERY calls; in between the
    #: prox is that of G with the zero set held, and ``settled`` says whether the last call's
    #: zero set satisfied the KKT conditions (the step is converged only on a settled call: the
    #: scaling loop goes on until one). Measured on examples/configs/ift_mixture.toml: rebuilt
    #: in every round of every call, the zero set changed 1.4 times per iteration, and the
    #: rebuilds took most of the step.
    ROUNDS = 2
    REBUILD_EVERY = 5

    def __init__(self, envelope: MMDEnvelope, sigma: float):
        self.envelope, self.sigma = envelope, float(sigma)
        self._prox = KLProx(envelope.form, sigma)
        self._form = envelope.form
        self.newton_steps = 0
        self.unresolved = 0
        self.worst_residual = 0.0
        self.settled = True
        self.unresolved_now = False
        self._since_rebuild = self.REBUILD_EVERY

    def __call__(self, log_q: np.ndarray) -> np.ndarray:
        self._since_rebuild += 1
        if self._since_rebuild < self.REBUILD_EVERY:
            log_nu = self._solve(log_q)
            if not self.unresolved_now:
                self.settled = not self.envelope.update_zero_set(np.exp(log_nu), rebuild=False)
            return log_nu
        for _ in range(self.ROUNDS):
            log_nu = self._solve(log_q)
            if self.unresolved_now:
                return log_nu
            self.settled = not self.envelope.update_zero_set(np.exp(log_nu))
            if self.settled:
                break
            self._since_rebuild = 0
        return log_nu

    def _solve(self, log_q: np.ndarray) -> np.ndarray:
        """One Newton solve of the prox with the envelope's current zero set."""
        self.unresolved_now = False
        if self._form is not self.envelope.form:  # the zero set changed
            last = self._prox._last
            self._prox = KLProx(self.envelope.form, self.sigma)
            self._prox._last = last
            self._form = self.envelope.form
        equation = self._prox.equation
        before, failed = equation.newton_steps, equation.unresolved
        log_nu = self._prox(log_q)
        self.newton_steps += equation.newton_steps - before
        if equation.unresolved > failed:
            self.unresolved += equation.unresolved - failed
            self.worst_residual = max(self.worst_residual, equation.worst_residual)
            self.unresolved_now = True
        return log_nu


# ---------------------------------------------------------------------------------------------
# WFR with the exact Hellinger-Kantorovich distance (logarithmic entropy transport)
# ---------------------------------------------------------------------------------------------


class LETEnvelopeProx(_PointwiseProx):
    """KL-proximal map of the column function of the entropic LET step (docs/entropic.md §2b).

    The column function is G(nu) = min_b rho F(b) + KL(nu | b) (the soft second marginal of
    the LET plan and the energy, rho = tau beta / 2 after dividing the step by 4 / (2 tau beta));
    its prox with step 1 / eps' (eps' the dimensionless blur) is, per point (F separable),

        min_{nu, b}  KL(nu | q) + (1 / eps') [rho F(b) + KL(nu | b)].

    Stationarity: log nu = theta log b + (1 - theta) log q, theta = 1 / (1 + eps'), and, with
    y = kappa (log q - log b), kappa = 1 - theta (so nu / b = e^y),

        h(y) = e^y - 1 - rho f(b) = 0,    log b = log q - y / kappa,

    h strictly increasing in y: one root per point (bracketed Newton in y). ``mass``:
    f -> f + l with l chosen so that sum(b) = mass (sum b decreases in l). Points with
    q = 0 (no mass within reach of the kernel) get nu = b = 0; points where f = +inf (a KL
    target without mass) get b = nu = 0.
    """

    #: |y| = |log(nu / b)| is bracketed in [-Y_MAX, Y_MAX].
    Y_MAX = BOUND = 60.0
    MASS_ROUNDS = 100

    def __init__(self, form: EnergyForm, rho: float, eps_prime: float, mass: float | None):
        _require_separable(form, "Hellinger-Kantorovich step")
        super().__init__(form, mass)
        self.rho = float(rho)
        self.theta = 1.0 / (1.0 + eps_prime)
        self.kappa = eps_prime / (1.0 + eps_prime)

    def _residual(self, y, lq, offset):
        """h(y), h'(y) and log b at y."""
        lb = lq - y / self.kappa
        with np.errstate(over="ignore", invalid="ignore"):
            f, slope = _separable_variation(self.form, lb, offset)
            h = np.exp(y) - 1.0 - self.rho * f
            dh = np.exp(y) + self.rho * slope / self.kappa
        return h, dh, lb

    def _refuse(self, residual, lo, hi):
        if np.any(residual(lo)[0] > 0):
            raise UnsupportedEnergyError(
                "the Hellinger-Kantorovich step is unbounded: some mass would grow without "
                "bound; the energy is unbounded below in the reaction direction (e.g. a "
                "potential below -2 / (tau beta))")

    def _log_mass_slope(self, weights, total, y, dh):
        return -(weights * self.rho / (self.kappa * dh)).sum() / total

    def __call__(self, log_q):
        live = np.isfinite(log_q) & np.isfinite(self.form.offset)
        lq = np.where(live, log_q, 0.0)
        offset = np.where(live, self.form.offset, 0.0)
        if self.mass is None:
            y, lb, _ = self._solve(lq, offset)
        else:
            y, lb = self._conserve(lq, offset, live)
        self._previous = y
        self.log_b = np.where(live, lb, -np.inf)
        log_nu = self.theta * lb + (1.0 - self.theta) * lq
        return np.where(live, log_nu, -np.inf)

def _separable_variation(form: EnergyForm, lb: np.ndarray, offset) -> tuple[np.ndarray, np.ndarray]:
    """f = offset + L log b + sum_k c_k b^p_k at log b = lb (a separable form, the offset
    possibly shifted by a multiplier), and its derivative df / dlog b = L + sum_k p_k c_k b^p_k."""
    f = offset + form.log_coef * lb
    slope = np.full_like(lb, form.log_coef)
    for c, p in form.powers:
        term = c * np.exp(p * lb)
        f = f + term
        slope = slope + p * term
    return f, slope


def _require_separable(form: EnergyForm, step: str) -> None:
    """Pointwise solves need an energy without a coupling (quadratic) part."""
    if form.quadratic is not None:
        raise UnsupportedEnergyError(
            f"EntropicJKO's {step} needs an energy that is separable over the points (Entropy, "
            "KL, Potential, PorousMedium and their sums); MMD2 and Interaction couple the "
            "points: use jk.ConicJKO for them")
