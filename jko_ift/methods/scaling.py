"""Generalized Sinkhorn (scaling) iterations: the engine of the entropic steps.

A plan P = diag(u) K diag(v) on a fixed support, K the Gibbs operator (module ``gibbs``:
``apply`` for K w, ``log_apply`` for log K e^h), has its two marginals priced by two convex
functions; block coordinate ascent on the dual alternates their KL-proximal maps

    rows:     log u = row_prox(log K v)                    (``HardRows``: P 1 = a exactly,
                                                             ``SoftRows``: KL(P 1 | a) / eps')
    columns:  log v = column_prox(log K^T u) - log K^T u   (any map log q -> log nu)

(Chizat, Peyre, Schmitzer, Vialard 2018). The engine is one loop, ``iterate``, over one
eps level in one of two domains: ``KernelScalings`` stores u, v (fast, overflows at small
eps), ``LogScalings`` stores f = log u, g = log v and never exponentiates them. Around it:
the levels of eps-scaling with their iteration budget (``eps_levels``), over-relaxation
(``Relaxation``), the early stop of a level that cannot converge (``futile``) and, for
closed-form column maps against hard rows, the translation block that sets the column mass
(``mass_shift``). What the caller reads off the final scalings (the plan, its cost, the
dual gap) stays with the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.linalg import blas

from ..display import report_iteration

#: Tolerance of the intermediate eps levels of eps-scaling: they only give a starting point.
LEVEL_TOL = 1e-3

#: Kernel-domain scalings above this (or below its inverse) leave the kernel domain: the step
#: continues in the log domain.
KERNEL_DOMAIN_MAX = 1e200

#: A level whose marginal violation, at the rate measured over the last PROGRESS_WINDOW
#: iterations, would need more than FUTILE_FACTOR times the remaining budget to reach its
#: tolerance stops early (the step is reported not converged, info["stopped"] says why): the
#: iteration count is bounded by max_iter anyway, this only spends less time on a step that
#: cannot converge. Sinkhorn's violation is not monotone over short spans; a window of 200
#: iterations, checked from 400 on, and a factor 10 keep a slow but converging level going.
PROGRESS_WINDOW = 200
FUTILE_FACTOR = 10.0


# ---------------------------------------------------------------------------------------------
# Levels of eps
# ---------------------------------------------------------------------------------------------


def eps_schedule(top: float, eps: float, factor: float) -> list[float]:
    """top, top * factor, ... while above eps, then eps: the levels of eps-scaling."""
    levels = []
    level = top
    while level > eps:
        levels.append(level)
        level *= factor
    return levels + [eps]


@dataclass(frozen=True)
class Level:
    """One eps level: its tolerance and its iteration budget (``last``: the requested eps)."""

    eps: float
    last: bool
    tol: float
    budget: int


def level_budget(max_iter: int, used: int, last: bool) -> int:
    """Iterations left to a level: intermediate levels leave the last one at least one."""
    return max_iter - used - (0 if last else 1)


def eps_levels(levels, max_iter: int, tol: float, used: Callable[[], int]):
    """The levels to run, in order: intermediate ones with tolerance max(tol, LEVEL_TOL) and
    skipped once the budget is spent; the final level always runs (budget at least 1).
    ``used()`` is the number of iterations spent so far."""
    for index, eps in enumerate(levels):
        last = index == len(levels) - 1
        budget = level_budget(max_iter, used(), last)
        if budget <= 0 and not last:
            continue
        yield Level(eps, last, tol if last else max(tol, LEVEL_TOL), max(budget, 1))


# ---------------------------------------------------------------------------------------------
# Row marginals
# ---------------------------------------------------------------------------------------------


class HardRows:
    """P 1 = a: u = a / (K v) (u = 0 where a = 0). The violation is |P 1 - a|_1 / sum(a)."""

    hard = True

    def __init__(self, a: np.ndarray):
        self.a = a
        self.mass = float(a.sum())
        self.positive = a > 0
        with np.errstate(divide="ignore"):
            self.log_a = np.log(a)
        self.log_mass = float(np.log(self.mass))

    def log_update(self, log_kv: np.ndarray) -> np.ndarray:
        return np.where(self.positive, self.log_a - log_kv, -np.inf)

    def log_violation(self, f: np.ndarray, log_kv: np.ndarray, update: np.ndarray) -> float:
        rows = np.where(self.positive, np.exp(f + log_kv), 0.0)
        return float(np.abs(rows - self.a).sum() / self.mass)

    def kernel_update(self, kv: np.ndarray) -> np.ndarray:
        return np.where(self.positive, self.log_a - np.log(kv), -np.inf)

    def kernel_violation(self, u: np.ndarray, kv: np.ndarray) -> float:
        return float(np.abs(u * kv - self.a).sum() / self.mass)


class SoftRows:
    """Rows priced by a KL term: log u = row_const - theta log K v (the KL-prox of the row
    function divided by K v). The violation is |P 1 - prox(P 1)|_1 / mass: how far the rows
    are from the fixed point of their own proximal map."""

    hard = False

    def __init__(self, positive: np.ndarray, row_const: np.ndarray, theta: float, mass: float):
        self.positive, self.row_const, self.theta, self.mass = positive, row_const, theta, mass

    def log_update(self, log_kv: np.ndarray) -> np.ndarray:
        return self.row_const - self.theta * log_kv

    def log_violation(self, f: np.ndarray, log_kv: np.ndarray, update: np.ndarray) -> float:
        """update: ``log_update(log_kv)``, the next f."""
        rows = np.where(self.positive, np.exp(f + log_kv), 0.0)
        target = np.where(self.positive, np.exp(update + log_kv), 0.0)
        return float(np.abs(rows - target).sum() / self.mass)


# ---------------------------------------------------------------------------------------------
# The two domains
# ---------------------------------------------------------------------------------------------


class _Scalings:
    """What both domains hold: log u and log v (dimensionless potentials f, g), the Gibbs
    operator, the row marginal, the column map
    ``prox`` (log q -> log nu) and ``check()``, why its last call cannot be trusted (or None).
    ``closed``: the column map has the closed form log nu = c0 + (1 - theta) log q, and the rows
    are hard, so that the translation block (``mass_shift``) applies."""

    def __init__(self, op, rows, prox, check, log_v: np.ndarray):
        self.op, self.rows, self.prox, self.check = op, rows, prox, check
        self.closed = rows.hard and getattr(prox, "closed", False)
        self.log_u, self.log_v = None, log_v

    @property
    def started(self) -> bool:
        """A row update was made (the first pass only computes K v)."""
        return self.log_u is not None

    def column_trouble(self) -> str | None:
        return self.check() if self.check is not None else None

    def settled(self) -> bool:
        """The last column map was exact for its own function (an active-set prox whose set is
        only rebuilt now and then says so with ``settled``): converged only then."""
        return getattr(self.prox, "settled", True)


class LogScalings(_Scalings):
    """Only the potentials f = log u, g = log v: stable at any eps. ``stop_if_not_finite``:
    a non-finite violation ends the level (otherwise the budget does)."""

    def __init__(self, op, rows, prox, g: np.ndarray, check=None, stop_if_not_finite=False):
        super().__init__(op, rows, prox, check, g)
        self.stop_if_not_finite = stop_if_not_finite
        self.log_kv = self.f_next = self.log_q = self.log_nu = None

    def apply_to_columns(self) -> None:
        self.log_kv = self.op.log_apply(self.log_v)
        self.f_next = self.rows.log_update(self.log_kv)

    def violation(self) -> float:
        return self.rows.log_violation(self.log_u, self.log_kv, self.f_next)

    def healthy(self, violation: float) -> bool:
        return not self.stop_if_not_finite or bool(np.isfinite(violation))

    def update_rows(self, relax: Relaxation) -> None:
        self.log_u = relax(self.log_u, self.f_next)

    def update_columns(self, relax: Relaxation) -> str | None:
        log_q = self.op.log_apply(self.log_u)
        if self.closed:
            shift = mass_shift(log_q, self.prox, self.rows.log_mass)
            self.log_u, log_q = self.log_u + shift, log_q + shift
        self.log_q = log_q
        self.log_nu = log_nu = self.prox(log_q)
        stopped = self.column_trouble()
        if stopped is not None:
            return stopped
        self.log_v = relax(self.log_v, np.where(np.isfinite(log_q), log_nu - log_q, -np.inf))
        return None


class KernelScalings(_Scalings):
    """u, v themselves (with their logs, which the relaxation mixes): one product with K per
    half-step, no logarithm of a kernel sum. Hard rows only. ``healthy`` is False once the
    scalings leave float range (``out_of_range``): the caller then continues in the log domain
    from ``good_v``, the last scaling that was in range."""

    def __init__(self, op, rows: HardRows, prox, log_v: np.ndarray, check=None):
        super().__init__(op, rows, prox, check, log_v)
        self.v = self.good_v = np.exp(log_v)
        self.u = self.q = self.kv = None

    def apply_to_columns(self) -> None:
        self.kv = self.op.apply(self.v)

    def violation(self) -> float:
        return self.rows.kernel_violation(self.u, self.kv)

    def healthy(self, violation: float) -> bool:
        if not np.isfinite(violation) or out_of_range(self.v, self.log_v):
            return False
        self.good_v = self.v
        return True

    def update_rows(self, relax: Relaxation) -> None:
        self.log_u = relax(self.log_u, self.rows.kernel_update(self.kv))
        self.u = np.exp(self.log_u)

    def update_columns(self, relax: Relaxation) -> str | None:
        prox = self.prox
        q = self.op.apply(self.u)
        log_q = np.log(q)
        if self.closed:
            shift = mass_shift(log_q, prox, self.rows.log_mass)
            if shift != 0.0:  # the plan diag(u) xi diag(v) is unchanged, its mass right
                self.log_u = self.log_u + shift
                self.u, q, log_q = self.u * np.exp(shift), q * np.exp(shift), log_q + shift
            new_log_v = prox.c0 - prox.theta * log_q
        else:
            new_log_v = prox(log_q) - log_q
            stopped = self.column_trouble()
            if stopped is not None:
                self.q = q
                return stopped
        self.q = q
        self.log_v = relax(self.log_v, new_log_v)
        self.v = np.exp(self.log_v)  # inf or nan (overflow) moves to the log domain
        return None


class ClosedKernelScalings(KernelScalings):
    """The kernel domain for hard rows and a closed-form column map, log nu = c0 + (1 - theta) log q
    (W2 of Entropy, KL, Potential and their sums): the cheap iteration.

    Per pass two products with K, one log and one exp (v = e^c0 q^-theta, whose dot product with q
    also gives the mass shift), the rest in place on preallocated arrays. The over-relaxation
    x <- x_new^omega x_old^(1 - omega) is written x_new r^s, r = x_new / x_old, s = omega - 1, with
    r^s replaced by its [1/1] Pade approximant ((1 - s) + (1 + s) r) / ((1 + s) + (1 - s) r): the
    same value and slope at r = 1 (the same linear rate near the fixed point), no transcendental
    function, and a factor bounded in [(1 - s) / (1 + s), (1 + s) / (1 - s)] far from it. A plain
    update (omega = 1) is exact, so the step still ends on an exact block maximization.

    Every array of the loop is allocated once (K v, K u, the work arrays, and two arrays each
    for u and v, the new scaling written into the one the old scaling does not use). ``good_v``
    stays valid: the array it names is rewritten only by the update after the next check.

    The column scaling e^c0 q^-theta (one log and one exp per entry, about half of what the
    iteration spends beyond its two kernel products at 256 x 256) is, while the violation is
    above ``exact_below``, written e^c0 q_r^-theta rho^-theta with rho = q / q_r, q_r the q of the
    last exact evaluation, and rho^-theta replaced by the same Pade approximant, whose relative
    error is at most 1.2 c_theta d^3 for d = max |rho - 1| <= PADE_SPREAD = 0.1 (c_theta =
    theta (1 - theta^2) / 12, the cubic term; 1.17 c_theta d^3 at d = 0.1 for every theta in
    (0, 1)). It is used only when d <= PADE_SPREAD and that bound is at most PADE_ERROR times
    the current violation, so that the update is the exact one up to a hundredth of the
    distance still to go. Below ``exact_below`` (and always when it is None) every update is
    exact, and ``settled`` is False after an inexact one, so that a level ends on an exact
    block maximization.
    """

    #: The largest error of an approximate column scaling, relative to the current violation,
    #: and the largest |q / q_r - 1| at which it is used (where the error bound holds).
    PADE_ERROR = 1e-2
    PADE_SPREAD = 0.1

    def __init__(self, op, rows: HardRows, prox, log_v: np.ndarray, check=None,
                 exact_below: float | None = None):
        super().__init__(op, rows, prox, log_v, check)
        n = log_v.size
        self._buffers = [np.empty(n) for _ in range(2)]
        self._kv, self._kq = np.empty(n), np.empty(n)  # K v and K u
        self._spare_u, self._spare_v = np.empty(n), np.empty(n)  # where the next u, v go
        self.exact_below = exact_below
        self._q_ref = self._v_ref = None  # q and e^c0 q^-theta at the last exact evaluation
        self._violation = np.inf
        self.approximate = False  # the last column scaling was a Pade approximation
        self.approximations = 0
        self.dead_rows = ~rows.positive if not rows.positive.all() else None
        self.dead_columns = ~np.isfinite(prox.c0) if not np.isfinite(prox.c0).all() else None
        self.log_mass = rows.log_mass

    @property
    def log_v(self):
        with np.errstate(divide="ignore"):
            return np.log(self.v)

    @log_v.setter
    def log_v(self, value):  # set once by the base class; v carries the state
        pass

    def apply_to_columns(self) -> None:
        self.kv = self.op.apply(self.v, out=self._kv)

    def healthy(self, violation: float) -> bool:
        top, low = self.v.max(initial=0.0), self._live_min(self.v)
        if not (np.isfinite(violation) and np.isfinite(top)) or top > KERNEL_DOMAIN_MAX or (
                low < 1.0 / KERNEL_DOMAIN_MAX):
            return False
        self.good_v = self.v  # rewritten only two updates later, after the next check
        return True

    def _live_min(self, v):
        if self.dead_columns is None:
            return v.min(initial=np.inf)
        return np.min(v, where=~self.dead_columns, initial=np.inf)

    def _mix(self, new: np.ndarray, old: np.ndarray | None, omega: float, dead,
             scale: float = 1.0) -> np.ndarray:
        """x r^s (Pade), x = scale new, r = x / old, in place in ``new``; zeros where ``dead``.
        With k = (1 + s) / (1 - s) the Pade factor is (1 + k r) / (k + r) = k - (k^2 - 1) / (k + r),
        and x (k - (k^2 - 1) / (k + r)) = new (scale k - (k^2 - 1) / (k / scale + new / old))."""
        if old is not None and omega != 1.0:
            k = omega / (2.0 - omega)
            r = self._buffers[0]
            np.divide(new, old, out=r)
            r += k / scale
            np.divide(k * k - 1.0, r, out=r)
            np.subtract(scale * k, r, out=r)
            new *= r
        elif scale != 1.0:
            new *= scale
        if dead is not None:
            new[dead] = 0.0
        return new

    def _pade_power(self, rho: np.ndarray, s: float) -> np.ndarray:
        """rho^s by its [1/1] Pade approximant at 1, in place (``_mix``'s factor)."""
        k = (1.0 + s) / (1.0 - s)
        rho += k
        np.divide(k * k - 1.0, rho, out=rho)
        np.subtract(k, rho, out=rho)
        return rho

    def _column_scaling(self, q: np.ndarray, out: np.ndarray) -> np.ndarray:
        """e^c0 q^-theta into ``out``: exact, or from the last exact one (class docstring)."""
        theta = self.prox.theta
        self.approximate = False
        if (self._q_ref is not None and self.exact_below is not None
                and self._violation > self.exact_below):
            rho = np.divide(q, self._q_ref, out=out)
            spread = max(float(rho.max()) - 1.0, 1.0 - float(rho.min()))  # nan: not <= below
            bound = 1.2 * theta * (1.0 - theta * theta) / 12.0 * spread**3
            if spread <= self.PADE_SPREAD and bound <= self.PADE_ERROR * self._violation:
                self._pade_power(rho, -theta)
                out *= self._v_ref
                self.approximate = True
                self.approximations += 1
                return out
        np.log(q, out=out)
        out *= -theta
        out += self.prox.c0
        np.exp(out, out=out)
        if self.exact_below is not None:
            if self._q_ref is None:
                self._q_ref, self._v_ref = np.empty_like(q), np.empty_like(q)
            np.copyto(self._q_ref, q)
            np.copyto(self._v_ref, out)
        return out

    def settled(self) -> bool:
        return super().settled() and not self.approximate

    @property
    def started(self) -> bool:
        return self.u is not None

    @property
    def q(self):
        return None if self._q is None else self._q * self.q_scale

    @q.setter
    def q(self, value):
        self._q, self.q_scale = value, 1.0

    def update_rows(self, relax: Relaxation) -> None:
        old = self.u
        u_new = np.divide(self.rows.a, self.kv, out=self._spare_u)
        self.u = self._mix(u_new, old, relax.omega, self.dead_rows)
        self._spare_u = old if old is not None else np.empty_like(u_new)

    def update_columns(self, relax: Relaxation) -> str | None:
        prox = self.prox
        q = self.op.apply(self.u, out=self._kq)
        v_new = self._column_scaling(q, self._spare_v)  # e^c0 q^-theta: nu = q v before the shift
        shift = (self.log_mass - np.log(q @ v_new)) / (1.0 - prox.theta)
        self.q_scale = scale = 1.0
        if np.isfinite(shift) and shift != 0.0:
            self.u *= np.exp(shift)
            self.q_scale = np.exp(shift)  # applied when q is read (only at the end)
            scale = np.exp(-prox.theta * shift)  # v_new's factor, applied by the mix
        self._q = q
        old = self.v
        self.v = self._mix(v_new, old, relax.omega, self.dead_columns, scale)
        self._spare_v = old
        return None

    def violation(self) -> float:
        residual = self._buffers[1]
        np.multiply(self.u, self.kv, out=residual)
        residual -= self.rows.a
        self._violation = float(blas.dasum(residual)) / self.rows.mass  # sum |.| in one pass
        return self._violation


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


@dataclass
class LevelOutcome:
    """iterations: full updates made; violation: the last one measured (inf before any);
    stopped: why the level ended early without converging, or None; broken: the scalings
    became unusable (``healthy`` was False), the iterates are those before."""

    iterations: int = 0
    violation: float = np.inf
    stopped: str | None = None
    broken: bool = False


def iterate(scalings, relax: Relaxation, tol: float, budget: int,
            stop: Callable[[list, float, int], str | None] | None = None,
            stage: str = "", settle: bool = True) -> LevelOutcome:
    """Scaling iterations on one eps level until the row violation is at most tol (with a
    plain last update, and, with ``settle``, a column map that says it is ``settled``), the
    budget is spent, ``stop(history, tol, remaining)`` gives a reason, or the column map's
    check does. Each violation is reported to the run's progress bar
    (``display.report_iteration``, with ``stage``, e.g. the level's eps). An intermediate eps
    level only gives a starting point and passes ``settle=False``: an active-set map whose set
    cycles on it (seen on examples/configs/ift_mixture.toml from eps_start = 4: 19828
    iterations at eps = 0.016 with the violation at 1e-13) would otherwise spend the budget.

    Each pass: K v; the violation of the rows of the current plan; u from the row map; v from
    the column map. ``scalings`` is a ``LogScalings`` or ``KernelScalings``, updated in place.
    """
    outcome = LevelOutcome()
    with np.errstate(all="ignore"):
        for it in range(budget + 1):
            scalings.apply_to_columns()
            if scalings.started:
                outcome.violation = violation = scalings.violation()
                report_iteration(outcome.iterations, violation, stage)
                if not scalings.healthy(violation):
                    outcome.broken = True
                    break
                if (violation <= tol and relax.plain and (scalings.settled() or not settle)
                        or it == budget):
                    break
                relax.observe(violation, tol)
                outcome.stopped = stop(relax.history, tol, budget - it) if stop else None
                if outcome.stopped is not None:
                    break
            scalings.update_rows(relax)
            outcome.stopped = scalings.update_columns(relax)
            if outcome.stopped is not None:
                break
            outcome.iterations += 1
    return outcome


# ---------------------------------------------------------------------------------------------
# Pieces of the loop
# ---------------------------------------------------------------------------------------------


def mass_shift(log_q: np.ndarray, prox, log_mass: float) -> float:
    """The scalar c for which the closed-form prox of q e^c has the mass of the rows.

    (f, g) -> (f + c, g - c) leaves the plan unchanged; maximizing the dual over c (a third,
    one-dimensional block of the coordinate ascent, the translation-invariant Sinkhorn of
    Sejourne et al. 2022) makes the prox output mass equal sum(a), which every column
    marginal of a plan with rows a has. Without it the mass mode contracts only like
    1 - 1 / (1 + sigma), sigma = 2 tau alpha / eps (thousands of iterations at large tau).
    With log nu = (1 - theta)(log q + c) + c0 the root is explicit.
    """
    with np.errstate(all="ignore"):
        terms = (1.0 - prox.theta) * log_q + prox.c0
        top = np.max(terms, initial=-np.inf)
        if not np.isfinite(top):
            return 0.0
        log_total = top + np.log(np.sum(np.exp(terms - top)))
    shift = (log_mass - log_total) / (1.0 - prox.theta)
    return float(shift) if np.isfinite(shift) else 0.0


def out_of_range(v: np.ndarray, log_v: np.ndarray) -> bool:
    """Kernel-domain scalings that overflow, or underflow where the potential is finite (a zero
    v would make its column dead for good, and log(v) = -inf would carry that to the log domain)."""
    if not np.all(np.isfinite(v)) or v.max(initial=0.0) > KERNEL_DOMAIN_MAX:
        return True
    return bool(np.any((v < 1.0 / KERNEL_DOMAIN_MAX) & np.isfinite(log_v)))


def futile(history: list[float], tol: float, remaining: int) -> str | None:
    """Why the level cannot reach tol within the remaining iterations (module constants
    PROGRESS_WINDOW, FUTILE_FACTOR), or None."""
    window = PROGRESS_WINDOW
    if len(history) < 2 * window or len(history) % 50:
        return None
    old, new = history[-window], history[-1]
    if not (np.isfinite(new) and new > 0):
        return None
    rate = (new / old) ** (1.0 / (window - 1)) if old > 0 else 1.0
    if rate >= 1.0:
        return (f"the marginal violation stopped decreasing ({old:.3g} -> {new:.3g} over the last "
                f"{window} iterations)")
    needed = np.log(tol / new) / np.log(rate)
    if needed > FUTILE_FACTOR * remaining:
        return (f"the marginal violation decreases by a factor {rate:.6f} per iteration: about "
                f"{needed:.3g} more iterations would reach tol, {remaining} remain")
    return None


class Relaxation:
    """Over-relaxed scalings: log u <- (1 - omega) log u_old + omega log u_new (same for v).

    omega = 1 is the plain iteration (block coordinate ascent, convergent). With ``adaptive``
    the first PROBE iterations are plain (or, given ``start``, relaxed with omega = start from
    the first one: the omega of the last step on the same support); their linear rate r of the
    marginal violation gives omega = 2 / (1 + sqrt(1 - r)) (the optimal relaxation of a linear
    iteration of rate r, Young; for Sinkhorn see Thibault et al. 2017, Lehmann et al. 2021),
    capped at OMEGA_MAX. While relaxed, every RETUNE iterations the observed rate lam of the
    relaxed iteration is checked (``RETUNE_CLASS`` only): above omega - 1 the relaxation is below
    the optimum, and Young's relation (lam + omega - 1)^2 = lam omega^2 mu^2 recovers the plain
    rate mu^2 and so the optimal omega (adaptive SOR, Hageman and Young 1981); omega only grows
    this way. If the violation stops decreasing for STALL iterations, omega is halved towards 1.
    Once the violation is below tolerance the last update is made plain, so that the
    potentials returned are those of an exact KL-proximal update (the dual gap needs it).
    """

    PROBE = 20
    STALL = 30
    RETUNE = 10
    RETUNE_CLASS = True
    OMEGA_MAX = 1.9

    def __init__(self, omega: float, adaptive: bool, start: float | None = None):
        self.omega, self.adaptive = omega, adaptive
        self.tuned_at = None  # the iteration count at which omega was last set adaptively
        if adaptive and start is not None and start > 1.0:
            self.omega, self.tuned_at = min(float(start), self.OMEGA_MAX), 0
        self.peak = self.tuned = self.omega  # tuned: the last omega chosen (a start for the next)
        self.history: list[float] = []
        self.best, self.since_best = np.inf, 0
        self.finishing = False

    @property
    def plain(self) -> bool:
        return self.omega == 1.0

    def observe(self, violation: float, tol: float) -> None:
        self.history.append(violation)
        if violation <= tol:  # converged while relaxed: one plain update to finish
            self.omega, self.finishing = 1.0, True
            return
        if self.finishing:
            return
        if violation < self.best:
            self.best, self.since_best = violation, 0
        else:
            self.since_best += 1
            if self.since_best >= self.STALL and self.omega > 1.0:
                self.omega = 1.0 + 0.5 * (self.omega - 1.0)
                self.omega = 1.0 if self.omega < 1.05 else self.omega
                self.since_best, self.tuned_at, self.tuned = 0, None, self.omega
        if not self.adaptive:
            return
        if self.tuned_at is None and len(self.history) == self.PROBE:
            old, new = self.history[self.PROBE // 2], self.history[-1]
            if 0 < new < old:
                rate = (new / old) ** (1.0 / (self.PROBE - self.PROBE // 2 - 1))
                self._set(2.0 / (1.0 + np.sqrt(1.0 - rate)))
        elif self.tuned_at is not None and len(self.history) - self.tuned_at >= 2 * self.RETUNE:
            self._retune()

    def _set(self, omega: float) -> None:
        self.omega = self.tuned = min(self.OMEGA_MAX, omega)
        self.peak = max(self.peak, self.omega)
        self.tuned_at = len(self.history)

    def _retune(self) -> None:
        """Raise omega from the rate of the last RETUNE relaxed iterations (Young's relation)."""
        if not self.RETUNE_CLASS or self.omega <= 1.0 or len(self.history) % self.RETUNE:
            return
        old, new = self.history[-self.RETUNE], self.history[-1]
        if not 0 < new < old:
            return
        lam = (new / old) ** (1.0 / (self.RETUNE - 1))
        omega = self.omega
        if lam <= omega - 1.0 + 0.05:  # at or above the optimum: the rate is omega - 1
            return
        mu_sq = (lam + omega - 1.0) ** 2 / (lam * omega**2)
        if mu_sq < 1.0:
            best = 2.0 / (1.0 + np.sqrt(1.0 - mu_sq))
            if best > omega + 0.01:
                self._set(best)

    def __call__(self, old, new):
        if old is None or self.omega == 1.0:
            return new
        mixed = (1.0 - self.omega) * old + self.omega * new
        return np.where(np.isfinite(old) & np.isfinite(new), mixed, new)


class SoftRelaxation(Relaxation):
    """``Relaxation`` with a higher cap: with soft marginals the plain rate is about
    (1 + eps')^-2, and the optimal omega = 2 / (1 + sqrt(1 - r)) approaches 2 as eps' -> 0
    (without the retuning, whose relation assumes two hard blocks)."""

    OMEGA_MAX = 1.98
    RETUNE_CLASS = False
