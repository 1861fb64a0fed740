"""Many monotone scalar roots at once: a bracketed Newton method and a mass multiplier.

The pointwise KL-proximal maps of the entropic steps (module ``entropic_prox``) solve one
equation per point, r_i(z_i) = 0 with r_i increasing in z_i, and their mass-conserving
variants add one scalar multiplier l (a shift of the first variation) chosen so that the
weights read off the roots have a prescribed mass. Both solvers are written here once:

* ``solve_increasing`` (``bracket_roots``, then ``bracketed_newton``): brackets [lo, hi] that
  double from [-1, 1] up to a bound, then Newton steps kept inside the brackets (a step that
  leaves them, or is not finite, is replaced by bisection), the brackets shrinking with the
  sign of r;
* ``mass_multiplier``: Newton on log sum w(l) - log M in l (sum w decreases in l), safeguarded
  by bisection once l is bracketed and by steps of size max(1, |l|) before.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

#: Rounds of bracket doubling: [-1, 1] grows to [-2^8, 2^8] at most, capped at the bound.
BRACKET_ROUNDS = 8

#: The mass multiplier stops when |log sum w - log M| is below this.
MASS_LOG_TOL = 1e-13

#: residual(z) -> (r, dr / dz, ...): values and derivatives at z, shape (n,) each.
Residual = Callable[[np.ndarray], tuple]


def bracket_roots(residual: Residual, n: int, bound: float) -> tuple[np.ndarray, np.ndarray]:
    """Brackets of the roots of n increasing residuals: from [-1, 1], lo doubles towards
    -bound where r(lo) > 0 and hi towards bound where r(hi) is not > 0 (NaN included).

    The caller checks that the final brackets hold a sign change where it matters (a root
    beyond the bound means an unbounded step, and the message depends on the step)."""
    lo, hi = np.full(n, -1.0), np.full(n, 1.0)
    for _ in range(BRACKET_ROUNDS):
        widen_lo, widen_hi = residual(lo)[0] > 0, ~(residual(hi)[0] > 0)
        if not (widen_lo.any() or widen_hi.any()):
            break
        lo = np.where(widen_lo, np.maximum(2 * lo, -bound), lo)
        hi = np.where(widen_hi, np.minimum(2 * hi, bound), hi)
    return lo, hi


def bracketed_newton(residual: Residual, start: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                     tol: float, max_iter: int) -> tuple[np.ndarray, int]:
    """Roots z: (n,) of increasing residuals inside [lo, hi] by safeguarded Newton.

    start must lie in the brackets. Stops when every |Newton update| is at most tol, or after
    max_iter steps. Returns the roots and the number of steps taken."""
    z = start
    steps = 0
    for _ in range(max_iter):
        steps += 1
        r, dr = residual(z)[:2]
        lo = np.where(r < 0, z, lo)
        hi = np.where(r > 0, z, hi)
        new = z - r / dr
        outside = (new < lo) | (new > hi) | ~np.isfinite(new)  # Newton left the bracket
        new = np.where(outside, 0.5 * (lo + hi), new)
        done = np.max(np.abs(new - z), initial=0.0) <= tol
        z = new
        if done:
            break
    return z, steps


def solve_increasing(residual: Residual, n: int, bound: float, previous: np.ndarray | None,
                     check: Callable[[np.ndarray, np.ndarray], None], tol: float,
                     max_iter: int) -> tuple[np.ndarray, int, tuple]:
    """Roots of n increasing residuals: ``bracket_roots`` up to ``bound``, ``check(lo, hi)``
    (raises when the brackets show a root beyond the bound), then ``bracketed_newton`` from
    ``previous`` (the last call's roots, clipped to the brackets) or zero.
    Returns the roots, the Newton steps taken and residual(roots)."""
    lo, hi = bracket_roots(residual, n, bound)
    check(lo, hi)
    start = np.zeros(n) if previous is None else np.clip(previous, lo, hi)
    roots, steps = bracketed_newton(residual, start, lo, hi, tol, max_iter)
    return roots, steps, residual(roots)


def mass_multiplier(solve: Callable[[float], tuple[np.ndarray, object]],
                    slope: Callable[[np.ndarray, float, object], float],
                    mass: float, start: float, max_rounds: int) -> tuple[float, object]:
    """The multiplier l with sum(w(l)) = mass, for weights w(l) whose sum decreases in l.

    solve(l) -> (w: (n,), payload); slope(w, sum(w), payload) = d log sum w / dl (< 0).
    Starts from ``start`` (the last call's multiplier: consecutive calls are close). Returns
    the multiplier and the payload of its solve."""
    target = np.log(mass)
    shift = start
    lo, hi = -np.inf, np.inf
    for _ in range(max_rounds):
        weights, payload = solve(shift)
        total = weights.sum()
        gap = np.log(total) - target
        if abs(gap) <= MASS_LOG_TOL:
            break
        if gap > 0:
            lo = shift
        else:
            hi = shift
        derivative = slope(weights, total, payload)
        new = shift - gap / derivative if derivative < 0 else np.nan
        if not (np.isfinite(new) and lo < new < hi):
            if np.isfinite(lo) and np.isfinite(hi):
                new = 0.5 * (lo + hi)
            else:
                new = shift + (1.0 if gap > 0 else -1.0) * max(1.0, abs(shift))
        shift = new
    return shift, payload
