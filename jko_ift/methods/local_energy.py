"""Local (pointwise) energies on a grid and their convex conjugates, for dual JKO methods.

An energy made of ``Entropy``, ``PorousMedium(m)``, ``KL`` to a grid target and ``Potential``
terms, with positive coefficients on the first three, is on a grid of cell volume h^d

    F(a) = h^d sum_i [ u(rho_i) + W_i rho_i + C_i ],   rho_i = a_i / h^d,
    u(rho) = e rho log rho + sum_k q_k rho^{m_k} / (m_k - 1),

(c KL(. | pi) = c [rho log rho - rho (log pi + 1) + pi] adds e += c, W += -c (log pi + 1) and
C += c pi, with W = +inf where pi = 0; a potential c V adds W += c V). Its convex conjugate
F*(p) = sup_a p.a - F(a) is pointwise:

    F*(p) = h^d sum_i [ u*(p_i - W_i) - C_i ],   argmax rho_i = (u*)'(p_i - W_i) = (u')^{-1}(...),

in closed form for one internal term and by a safeguarded Newton iteration per cell otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from numba import njit

from ..energies import KL, MMD2, Entropy, Interaction, PorousMedium, Potential, Scaled, Sum
from ..measures import Measure

#: Where mu^k has no mass the cold start's first variation log(rho) is -inf; this floor (relative
#: to the largest density) keeps the initial dual potential finite there.
DENSITY_FLOOR = 1e-30

#: The mass balance of the dual potential stops at this relative error of the mass: above the
#: rounding of a sum of n <= 10^7 terms (about 1e-16 sqrt(n) typically), below any certificate.
MASS_BALANCE_RTOL = 1e-12

_NONLOCAL = ("needs an energy with a pointwise convex conjugate (Entropy, PorousMedium, KL to a "
             "grid target, Potential and their sums with positive coefficients); {name} couples "
             "the cells, so it has none. Use jk.ConicJKO (exact, fixed support), jk.EntropicJKO "
             "(entropic, large grids) or jk.ParticleJKO (moving particles) for it")


class UnsupportedEnergyError(ValueError):
    """The energy has no pointwise conjugate this method knows."""


@dataclass(frozen=True)
class LocalEnergy:
    """F on one grid as h^d sum_i [u(rho_i) + W_i rho_i + C_i] (module docstring).

    entropy: e >= 0; powers: ((q_k, m_k), ...) with q_k > 0, m_k > 1; potential: W (n,), +inf
    where the energy excludes mass; constant: C (n,); cell_volume: h^d.
    """

    entropy: float
    powers: tuple[tuple[float, float], ...]
    potential: np.ndarray
    constant: np.ndarray
    cell_volume: float

    # ---------------------------------------------------------------- the pointwise pieces
    def internal(self, rho: np.ndarray) -> np.ndarray:
        """u(rho) per cell (rho >= 0)."""
        with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
            out = self.entropy * np.where(rho > 0, rho * np.log(np.where(rho > 0, rho, 1.0)), 0.0)
        for q, m in self.powers:
            out = out + q * rho**m / (m - 1)
        return out

    def slope(self, rho: np.ndarray) -> np.ndarray:
        """u'(rho) per cell, -inf at rho = 0 with an entropy part."""
        with np.errstate(divide="ignore"):
            out = self.entropy * (np.log(rho) + 1.0) if self.entropy > 0 else np.zeros_like(rho)
        for q, m in self.powers:
            out = out + q * m / (m - 1) * rho ** (m - 1)
        return out

    def density(self, s: np.ndarray) -> np.ndarray:
        """(u*)'(s) = the rho >= 0 with u'(rho) = s (0 where s is below u'(0)); -inf gives 0."""
        e, powers = self.entropy, self.powers
        if not powers:
            with np.errstate(under="ignore"):
                return np.exp(np.minimum(s / e - 1.0, 700.0))
        if e == 0 and len(powers) == 1:
            q, m = powers[0]
            return ((m - 1) / (q * m) * np.maximum(s, 0.0)) ** (1.0 / (m - 1))
        q = np.array([p[0] for p in powers])
        m = np.array([p[1] for p in powers])
        s = np.asarray(s, dtype=float)  # any shape: the compiled solve runs over the cells
        return _solve_slope(np.ascontiguousarray(s).ravel(), e, q, m).reshape(s.shape)

    def conjugate(self, s: np.ndarray, rho: np.ndarray) -> np.ndarray:
        """u*(s) = rho s - u(rho) per cell, at rho = density(s); 0 where rho = 0."""
        if not self.powers:  # e exp(s / e - 1) = e rho
            return self.entropy * rho
        if self.entropy == 0 and len(self.powers) == 1:  # rho s (m - 1) / m
            m = self.powers[0][1]
            return np.where(rho > 0, rho * s * ((m - 1) / m), 0.0)
        with np.errstate(invalid="ignore", over="ignore", under="ignore"):  # subnormal densities
            return np.where(rho > 0, rho * s - self.internal(rho), 0.0)

    def curvature(self, s: np.ndarray, rho: np.ndarray) -> np.ndarray:
        """(u*)''(s) = 1 / u''(rho) per cell (0 where rho = 0)."""
        if not self.powers:
            return rho / self.entropy
        if self.entropy == 0 and len(self.powers) == 1 and self.powers[0][1] == 2.0:
            return np.where(rho > 0, 0.5 / self.powers[0][0], 0.0)
        second = np.zeros_like(rho)
        with np.errstate(divide="ignore", invalid="ignore"):
            if self.entropy > 0:
                second = second + self.entropy / rho
            for q, m in self.powers:
                second = second + q * m * rho ** (m - 2)
            return np.where(rho > 0, 1.0 / second, 0.0)

    # ---------------------------------------------------------------- on the grid
    def shifted(self, phi: np.ndarray) -> np.ndarray:
        """s = -phi - W (the argument of u*); -inf where W = +inf."""
        return -phi - self.potential

    def value(self, masses: np.ndarray) -> float:
        """F(a) for masses a (n,), +inf where a > 0 on an excluded cell."""
        closed = _closed_form(self)
        if closed is not None:  # one compiled pass
            masses = np.ascontiguousarray(masses, dtype=float)
            return self.cell_volume * _value_closed(masses, self.cell_volume, self.potential, self.constant,
                                                    *closed)
        rho = masses / self.cell_volume
        if np.any((rho > 0) & np.isinf(self.potential)):
            return float("inf")
        with np.errstate(invalid="ignore"):  # inf * 0 on excluded cells without mass
            linear = np.where(rho > 0, self.potential * rho, 0.0)
        return float(self.cell_volume * np.sum(self.internal(rho) + linear + self.constant))

    def blend_value(self, average: np.ndarray, new: np.ndarray, keep: float, weight: float) -> float:
        """average = keep * average + weight * new in place (contiguous masses (n,)), and F of the
        result (``value``); one compiled pass for a single internal term."""
        closed = _closed_form(self)
        if closed is None:
            average *= keep
            average += weight * new
            return self.value(average)
        return self.cell_volume * _blend_value(average, np.ascontiguousarray(new, dtype=float), keep, weight,
                                               self.cell_volume, self.potential, self.constant, *closed)

    def pointwise(self, phi: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        """(-F*(-phi), the maximizing masses a(phi) (n,), the curvature (u*)''(-phi - W) (n,)):
        one compiled pass for a single internal term (entropy, or one power), else ``dual_part``."""
        closed = _closed_form(self)
        if closed is None:
            own, masses, s = self.dual_part(phi)
            return own, masses, self.curvature(s, masses / self.cell_volume)
        return self._dual_terms(*_pointwise_closed(np.ascontiguousarray(phi, dtype=float),
                                                   self.potential, self.cell_volume, *closed))

    @cached_property
    def _constant_sum(self) -> float:
        return float(np.sum(self.constant))

    def _dual_terms(self, conjugate: float, masses: np.ndarray, curvature: np.ndarray):
        """``pointwise``'s outputs from the compiled pass's sum u*, masses and curvatures."""
        conjugate -= self._constant_sum
        return -self.cell_volume * (conjugate if np.isfinite(conjugate) else np.inf), masses, curvature

    def feasible_pointwise(self, phi: np.ndarray, mass: float, direction: np.ndarray | None = None,
                           sigma: float = 0.0) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
        """phi' = ``feasible(phi + sigma direction, mass)`` (phi's shape) and ``pointwise(phi')``:
        (phi', -F*(-phi'), a(phi') (n,), curvature (n,)); one compiled pass for one power alone."""
        closed = _closed_form(self)
        if not self.powers:  # entropy alone: the balance is a closed-form shift
            feasible = self.feasible(phi if direction is None else phi + sigma * direction, mass)
            return (feasible, *self.pointwise(feasible.ravel()))
        flat = np.ascontiguousarray(phi, dtype=float).ravel()
        step = np.empty(0) if direction is None else np.ascontiguousarray(direction, dtype=float).ravel()
        if closed is not None:
            _, q, m = closed
            out, conjugate, masses, curvature = _feasible_closed(
                flat, step, float(sigma), self.potential, self.cell_volume, q, m, mass / self.cell_volume,
                MASS_BALANCE_RTOL)
        else:  # an entropy and powers, or several powers: Newton steps per cell inside the balance
            q, m = (np.array([p[k] for p in self.powers]) for k in (0, 1))
            out, conjugate, masses, curvature = _feasible_general(
                flat, step, float(sigma), self.potential, self.cell_volume, self.entropy, q, m,
                mass / self.cell_volume, MASS_BALANCE_RTOL)
        return (out.reshape(phi.shape), *self._dual_terms(conjugate, masses, curvature))

    def dual_part(self, phi: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        """(-F*(-phi), the maximizing masses a(phi) (n,), s = -phi - W)."""
        s = self.shifted(phi)
        rho = self.density(s)
        with np.errstate(over="ignore", invalid="ignore"):  # a trial step too long: -inf, rejected
            conjugate = float(np.sum(self.conjugate(s, rho)) - np.sum(self.constant))
        if not np.isfinite(conjugate):
            conjugate = np.inf
        return -self.cell_volume * conjugate, rho * self.cell_volume, s

    def lowered(self, phi: np.ndarray) -> np.ndarray:
        """Without an entropy part, phi lowered to -W where it is above (cells where the energy
        wants no mass): a(phi) does not change there and the c-transform can only rise, so the
        dual does not decrease, and mass is not drawn to empty cells by a potential left high by
        earlier iterations (a warm start)."""
        if self.entropy > 0:
            return phi
        ceiling = -self.potential.reshape(phi.shape)
        return np.where(np.isfinite(ceiling), np.minimum(phi, ceiling), phi)

    def feasible(self, phi: np.ndarray, mass: float) -> np.ndarray:
        """``lowered(balanced(phi, mass))``, in one compiled pass with powers."""
        if not self.powers:
            return self.lowered(self.balanced(phi, mass))
        return self.feasible_pointwise(phi, mass)[0]

    def balanced(self, phi: np.ndarray, mass: float) -> np.ndarray:
        """phi + c with the constant c that makes sum a(phi + c) = mass: the exact maximization
        of the dual along constants (its derivative there is sum a - mass)."""
        s = self.shifted(phi.ravel()).reshape(phi.shape)
        closed = _closed_form(self)
        if self.powers and closed is not None:  # one power: the root found in one compiled call
            _, q, m = closed
            flat = s.ravel()
            return phi + _power_root(flat, _top(flat), q, m, mass / self.cell_volume, MASS_BALANCE_RTOL,
                                     np.empty((2, flat.size)), (0.0, 0.0, -1))
        with np.errstate(over="ignore"):
            wanted = self.cell_volume * float(np.sum(self.density(s)))
        if not np.isfinite(wanted):
            return phi
        if not self.powers:  # a = exp((s - c) / e - 1) h^d: closed form
            return phi + self.entropy * np.log(wanted / mass) if wanted > 0 else phi
        def excess(shift):
            rho = self.density(s - shift)
            return (self.cell_volume * float(np.sum(rho)) - mass,
                    self.cell_volume * float(np.sum(self.curvature(s - shift, rho))))

        width = max(1.0, float(np.max(np.abs(s[np.isfinite(s)]))))
        return phi + _decreasing_root(excess, 0.0, width, mass)

    def initial_potentials(self, mu: Measure, smoothed: np.ndarray | None = None) -> list[np.ndarray]:
        """Cold starts: ``initial_potential`` of rho^k and of a ``smoothed`` density (n,) if given
        and, without an entropy part, also phi = -W (no mass wanted anywhere until balanced): the
        first is better on continuous densities, the others on discontinuous ones (measured, see
        ``initial_potential``)."""
        starts = [self.initial_potential(mu)]
        if smoothed is not None:
            starts.append(self.initial_potential(mu, smoothed))
        if self.entropy == 0:
            finite = np.isfinite(self.potential)
            cap = self.potential[finite].max() if finite.any() else 0.0
            starts.append(-np.where(finite, self.potential, cap))
        return starts

    def initial_potential(self, mu: Measure, density: np.ndarray | None = None) -> np.ndarray:
        """A cold start: phi = -u'(rho^k) - W, the potential of the step that does not move (rho^k
        floored where it vanishes, so that phi stays finite; the constant is set by ``balanced``).
        Measured against phi = -W for porous media: better on Barenblatt profiles (m = 3, 96^2:
        certificate 6e-3 against 5e-2 after 300 iterations), worse on discontinuous data (the
        porous-medium example at 64^2: 2.5e-2 against 1.0e-2 after 1000)."""
        rho = mu.weights / self.cell_volume if density is None else density
        rho = np.maximum(rho, DENSITY_FLOOR * max(float(rho.max()), 1e-300))
        phi = -self.slope(rho) - self.potential
        finite = np.isfinite(phi)
        return np.where(finite, phi, phi[finite].max() if finite.any() else 0.0)


def _closed_form(energy: LocalEnergy) -> tuple[float, float, float] | None:
    """(e, q, m) of an entropy alone (q = 0) or of one power alone (e = 0); None otherwise."""
    if not energy.powers:
        return energy.entropy, 0.0, 2.0
    if energy.entropy == 0 and len(energy.powers) == 1:
        return 0.0, energy.powers[0][0], energy.powers[0][1]
    return None


@njit(cache=True)
def _conjugate_at(s, e, q, m):
    """(rho = (u*)'(s), (u*)''(s), u*(s)) for u = e rho log rho (q = 0) or u = q rho^m / (m - 1) (e = 0)."""
    if not s > -np.inf:
        return 0.0, 0.0, 0.0
    if q == 0.0:
        r = np.exp(min(s / e - 1.0, 700.0))
        return r, r / e, e * r
    if s > 0.0:
        base = (m - 1.0) / (q * m) * s
        if m == 2.0:  # rho linear in s: the curvature is the constant 1 / (2 q), no division
            return base, 0.5 / q, 0.5 * base * s
        r = base ** (1.0 / (m - 1.0))
        return r, r / ((m - 1.0) * s), r * s * (m - 1.0) / m
    return 0.0, 0.0, 0.0


@njit(cache=True)
def _pointwise_closed(phi, potential, cell, e, q, m):
    """sum u*(s), the masses cell (u*)'(s) and (u*)''(s) at s = -phi - W (``_conjugate_at``)."""
    n = phi.size
    masses = np.empty(n)
    curvature = np.empty(n)
    total = 0.0
    for i in range(n):
        rho, curvature[i], conjugate = _conjugate_at(-phi[i] - potential[i], e, q, m)
        masses[i] = rho * cell
        total += conjugate
    return total, masses, curvature


def _decreasing_root(function, start: float, width: float, scale: float) -> float:
    """The root of a decreasing function of c given as c -> (value, -derivative): a bracket
    grown from ``start`` by doubling ``width``, then Newton steps kept inside it (bisection
    otherwise), to 1e-14 of the bracket's scale."""
    low, high = start, start
    while function(low)[0] < 0:
        low -= width
        width *= 2
    while function(high)[0] > 0:
        high += width
        width *= 2
    c = 0.5 * (low + high)
    for _ in range(200):
        value, slope = function(c)
        if abs(value) <= MASS_BALANCE_RTOL * scale:
            break
        if value > 0:
            low = c
        else:
            high = c
        if high - low <= 1e-14 * max(1.0, abs(c)):
            break
        step = c + value / slope if slope > 0 else np.nan
        c = step if low < step < high else 0.5 * (low + high)
    return c


@njit(cache=True)
def _value_closed(masses, cell, potential, constant, e, q, m):
    """sum_i u(rho_i) + W_i rho_i + C_i, rho = masses / cell, for u = e rho log rho (q = 0) or
    q rho^m / (m - 1) (e = 0); +inf where rho > 0 on an excluded cell (W = +inf)."""
    total = 0.0
    for i in range(masses.size):
        total, excluded = _add_cell(total, masses[i] / cell, potential[i], constant[i], e, q, m)
        if excluded:
            return np.inf
    return total


@njit(cache=True)
def _blend_value(average, new, keep, weight, cell, potential, constant, e, q, m):
    """average = keep * average + weight * new in place, and ``_value_closed`` of the result."""
    total, excluded = 0.0, False
    for i in range(average.size):
        average[i] = keep * average[i] + weight * new[i]
        if not excluded:
            total, excluded = _add_cell(total, average[i] / cell, potential[i], constant[i], e, q, m)
    return np.inf if excluded else total


@njit(cache=True)
def _add_cell(total, r, potential, constant, e, q, m):
    """(total + C + W r + u(r), False) for one cell, (total, True) where r > 0 on an excluded cell."""
    total += constant
    if r > 0.0:
        if potential == np.inf:
            return total, True
        total += potential * r
        if q == 0.0:
            total += e * r * np.log(r)
        else:
            total += q * (r * r if m == 2.0 else r**m) / (m - 1.0)
    return total, False


@njit(cache=True)
def _feasible_closed(phi, direction, sigma, potential, cell, q, m, target, rtol):
    """For one power alone, in one pass after the root: phi' = phi + sigma direction (phi alone
    where direction is empty) balanced (``_power_root`` on s = -phi' - W), then lowered to -W
    where above; and ``_pointwise_closed`` at the result. Returns (phi'', sum u*, masses, curvature)."""
    n = phi.size
    moved = direction.size > 0
    s = np.empty(n)
    buffers = np.empty((2, n))
    top, total, slope, kept = -np.inf, 0.0, 0.0, 0  # and the root's first pass, at c = 0
    for i in range(n):
        s[i] = -(phi[i] + sigma * direction[i] if moved else phi[i]) - potential[i]
        if s[i] > top:
            top = s[i]
        if s[i] > 0.0:
            buffers[0, kept] = s[i]
            kept += 1
            r, dr = _power_term(s[i], 0.0, q, m)
            total += r
            slope += dr
    c = _power_root(s, top, q, m, target, rtol, buffers, (total, slope, kept))
    out, masses, curvature = s, np.empty(n), np.empty(n)  # s is spent: its memory holds phi''
    total = 0.0
    for i in range(n):
        value = (phi[i] + sigma * direction[i] if moved else phi[i]) + c
        ceiling = -potential[i]
        out[i] = value if not (value > ceiling and np.isfinite(ceiling)) else ceiling
        rho, curvature[i], conjugate = _conjugate_at(-out[i] - potential[i], 0.0, q, m)
        masses[i] = rho * cell
        total += conjugate
    return out, total, masses, curvature


@njit(cache=True)
def _feasible_general(phi, direction, sigma, potential, cell, e, q, m, target, rtol):
    """``_feasible_closed`` for an entropy and powers, or several powers: the balance c with
    sum_i rho(s_i - c) = target by Newton steps on c (d rho / ds = rho / g'(y), ``_log_density``)
    kept inside a bracket, each rho by Newton steps on y = log rho warm-started from the last c;
    without entropy, phi lowered to -W where above. Returns (phi'', sum u*, masses, curvature)."""
    n = phi.size
    moved = direction.size > 0
    s = np.empty(n)
    y = np.empty(n)
    for i in range(n):
        s[i] = -(phi[i] + sigma * direction[i] if moved else phi[i]) - potential[i]
        y[i] = np.nan  # no guess yet
    low, high, width, c = -np.inf, np.inf, 1.0, 0.0
    for _ in range(200):
        total, slope = 0.0, 0.0
        for i in range(n):
            y[i], rho, dy = _log_density(s[i] - c, e, q, m, y[i])
            total += rho
            slope += rho / dy if rho > 0.0 else 0.0
        excess = total - target
        if abs(excess) <= rtol * target:
            break
        c, low, high, width, done = _next_shift(c, excess, slope, low, high, width, np.inf)
        if done:
            break
    out, masses, curvature = np.empty(n), np.empty(n), np.empty(n)
    total = 0.0
    for i in range(n):
        value = (phi[i] + sigma * direction[i] if moved else phi[i]) + c
        ceiling = -potential[i]
        lower = e == 0.0 and value > ceiling and np.isfinite(ceiling)
        out[i] = ceiling if lower else value
        shifted = -out[i] - potential[i]
        _, rho, dy = _log_density(shifted, e, q, m, y[i])
        masses[i] = rho * cell
        curvature[i] = rho / dy if rho > 0.0 else 0.0
        if rho > 0.0:
            total += rho * shifted - _internal(rho, e, q, m)
    return out, total, masses, curvature


@njit(cache=True)
def _log_density(s, e, q, m, guess):
    """(y, rho = e^y, g'(y)) with g(y) = u'(e^y) = e (y + 1) + sum_k q_k m_k / (m_k - 1) e^{(m_k - 1) y}
    equal to s (rho = 0 where s = -inf, or s <= 0 without entropy). g is increasing and convex,
    so Newton steps from any start reach the root from its right and then fall to it; a step up
    is capped at 50 (a factor e^50 in rho). guess: the last y (NaN: none; then the least root of
    the terms alone, near the root where one term dominates). An inexact rho only lowers the
    dual value computed from it (rho s - u(rho) <= u*(s)): the certificate stays a bound."""
    if not s > -np.inf or (e == 0.0 and s <= 0.0):
        return guess, 0.0, 1.0
    if s == np.inf:
        return guess, np.inf, np.inf
    if guess == guess:
        x = guess
    else:  # the least of the roots of the terms alone: at or right of the root where all are >= 0
        x = min(s / e - 1.0, 700.0) if e > 0.0 else 700.0
        for k in range(q.size):
            if s > 0.0:
                x = min(x, np.log(s * (m[k] - 1.0) / (q[k] * m[k])) / (m[k] - 1.0))
    for _ in range(100):
        g, dg = e * (x + 1.0), e
        for k in range(q.size):
            power = q[k] * m[k] / (m[k] - 1.0) * np.exp(min((m[k] - 1.0) * x, 700.0))
            g += power
            dg += (m[k] - 1.0) * power
        step = (g - s) / dg
        x -= max(step, -50.0)
        if abs(step) <= 1e-14 * max(1.0, abs(x)):
            break
    rho = np.exp(min(x, 700.0))
    dg = e
    for k in range(q.size):
        dg += q[k] * m[k] * np.exp(min((m[k] - 1.0) * x, 700.0))
    return x, rho, dg


@njit(cache=True)
def _internal(rho, e, q, m):
    """u(rho) = e rho log rho + sum_k q_k rho^m_k / (m_k - 1) for rho > 0."""
    value = e * rho * np.log(rho)
    for k in range(q.size):
        value += q[k] * rho ** m[k] / (m[k] - 1.0)
    return value


@njit(cache=True)
def _power_root(s, top, q, m, target, rtol, buffers, first):
    """The shift c with sum_i rho(s_i - c) = target, rho(s) = ((m - 1) s_+ / (q m))^(1/(m - 1)):
    Newton steps from c = 0 (the balance of a potential moved by one ascent step is near 0),
    kept inside a bracket grown by doubling, bisection otherwise. Once c has a lower bracket,
    the sums run over the cells above it alone, in their order (the others add nothing: the
    same sums, fewer cells). top: the largest s_i (``_top``); buffers: (2, n) work array; first:
    ``_power_sum`` at c = 0 into buffers[0] if the caller made that pass (k >= 0), else k < 0."""
    low, high, width = -np.inf, np.inf, 1.0
    if not top > -np.inf:
        return 0.0
    active, spare = s, 0  # the cells that may contribute; the buffer the next pass fills
    c = 0.0
    for iteration in range(400):
        if iteration == 0 and first[2] >= 0:
            total, slope, kept = first
        else:
            total, slope, kept = _power_sum(active, q, m, c, buffers[spare])
        excess = total - target
        if abs(excess) <= rtol * target:
            break
        if excess > 0:
            active, spare = buffers[spare, :kept], 1 - spare  # the cells above the new low
        c, low, high, width, done = _next_shift(c, excess, slope, low, high, width, top)
        if done:
            break
    return c


@njit(cache=True)
def _next_shift(c, excess, slope, low, high, width, top):
    """One step of the search of the balance c (sum_i rho(s_i - c) = target, decreasing in c):
    the bracket [low, high] updated by the sign of excess = sum - target, then a Newton step
    (slope = -d excess / dc) if it stays inside, bisection once both ends are finite, else a
    doubling step down, or up to ``top`` (where no mass is left; +inf: a doubling step up).
    Returns (c, low, high, width, done: the bracket has closed)."""
    if excess > 0:
        low = c
    else:
        high = min(c, top)
    if high - low <= 1e-14 * max(1.0, abs(c)):
        return c, low, high, width, True
    step = c + excess / slope if slope > 0 else np.nan
    if low < step < high:
        c = step
    elif low > -np.inf and high < np.inf:
        c = 0.5 * (low + high)
    elif high < np.inf:  # no lower bracket yet: step down by a doubling width
        c, width = high - width, 2.0 * width
    elif top < np.inf:
        c = top
    else:
        c, width = low + width, 2.0 * width
    return c, low, high, width, False


@njit(cache=True)
def _top(s):
    """The largest of the values s (NaN ignored; -inf where there is none)."""
    top = -np.inf
    for value in s:
        if value > top:
            top = value
    return top


@njit(cache=True)
def _power_sum(s, q, m, c, above):
    """(sum rho(s_i - c), sum rho'(s_i - c), k) with the k values s_i > c copied, in order, to above."""
    total, slope, kept = 0.0, 0.0, 0
    for value in s:
        if value > c:
            above[kept] = value
            kept += 1
            r, dr = _power_term(value, c, q, m)
            total += r
            slope += dr
    return total, slope, kept


@njit(cache=True)
def _power_term(value, c, q, m):
    """(rho(s - c), rho'(s - c)) for s = value > c, rho(s) = ((m - 1) s / (q m))^(1/(m - 1))."""
    base = (m - 1.0) / (q * m) * (value - c)
    if m == 2.0:  # rho linear in s: its slope is the constant 1 / (2 q), no division
        return base, 0.5 / q
    r = base ** (1.0 / (m - 1.0))
    return r, r / ((m - 1.0) * (value - c))


@njit(cache=True)
def _solve_slope(s, e, q, m):
    """Per cell, the rho >= 0 with e (log rho + 1) + sum_k q_k m_k/(m_k - 1) rho^(m_k - 1) = s
    (``_log_density`` from its default start)."""
    out = np.empty(s.size)
    for i in range(s.size):
        out[i] = _log_density(s[i], e, q, m, np.nan)[1]
    return out


def local_energy(F, mu: Measure, method: str) -> LocalEnergy:
    """F as a ``LocalEnergy`` on the grid of mu, or UnsupportedEnergyError naming what to use."""
    parts = {"entropy": 0.0, "powers": {}, "potential": np.zeros(mu.n), "constant": np.zeros(mu.n)}
    h = mu.cell_volume
    _collect(F, 1.0, mu, parts, method)
    powers = tuple(sorted((q, m) for m, q in parts["powers"].items()))
    if parts["entropy"] == 0 and not powers:
        raise UnsupportedEnergyError(
            f"{method} needs an internal energy term (Entropy, PorousMedium or KL) with a positive "
            "coefficient: without one the step's new measure is not a density (a pure potential "
            "pushes mass into points). Add a small jk.Entropy() term, or use jk.ParticleJKO")
    return LocalEnergy(parts["entropy"], powers, parts["potential"], parts["constant"], h)


def _collect(F, factor: float, mu: Measure, parts: dict, method: str) -> None:
    if isinstance(F, Sum):
        for term in F.terms:
            _collect(term, factor, mu, parts, method)
    elif isinstance(F, Scaled):
        _collect(F.energy, factor * F.factor, mu, parts, method)
    elif isinstance(F, Potential):
        parts["potential"] = parts["potential"] + factor * F.first_variation(mu)
    elif isinstance(F, (Interaction, MMD2)):
        raise UnsupportedEnergyError(f"{method} " + _NONLOCAL.format(name=type(F).__name__))
    elif isinstance(F, (Entropy, PorousMedium, KL)):
        if factor <= 0:
            raise UnsupportedEnergyError(
                f"{method} needs a positive coefficient on {type(F).__name__} (a convex energy), "
                f"got {factor:g}; a concave energy has no JKO step of this kind")
        _collect_internal(F, factor, mu, parts)
    else:
        raise UnsupportedEnergyError(f"{method} " + _NONLOCAL.format(name=type(F).__name__)
                                     .replace("couples the cells, so it has none", "is not one of them"))


def _collect_internal(F, factor: float, mu: Measure, parts: dict) -> None:
    if isinstance(F, Entropy):
        parts["entropy"] += factor
    elif isinstance(F, PorousMedium):
        parts["powers"][float(F.m)] = parts["powers"].get(float(F.m), 0.0) + factor
    else:  # KL: c [rho log rho - rho (log pi + 1) + pi], pi = b / h^d
        target = F.reference_weights(mu) / mu.cell_volume
        with np.errstate(divide="ignore"):
            log_target = np.log(target)
        parts["entropy"] += factor
        parts["potential"] = parts["potential"] - factor * (log_target + 1.0)
        parts["constant"] = parts["constant"] + factor * target
