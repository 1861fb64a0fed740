"""A deliverable new measure near the wanted masses, from a dual potential (docs/theory.md §10).

``BackAndForthJKO`` certifies a step by the duality gap F(a) + C/(2 tau) - D(phi) of a measure a
that an explicit plan delivers at cost C. Its pushforward P(phi) sends each node's mass to one
argmin of the c-transform; where the argmin is tied between several points (a fan where the
density jumps to zero, and many 2-way ties elsewhere), no single P(phi) delivers the optimal
measure a(phi) of the optimal dual. This module builds a plan that splits tied mass.

For each 1-D pass of the move (theory §10: along axis 0 to a point z, split linearly between
the nodes around z; then along axis 1), the candidate destinations of a node y_j are the points
z whose value c(z, y_j) - PL(f)(z) is within ``slack`` of the minimum psi_j (nodes of the lower
envelope, and the stationary points z = y_j + tau s_i inside segments). The mass of y_j is split
between its candidates by weights w >= 0 that sum to its mass, chosen per line (projected
accelerated gradient, FISTA) to minimize

    1/2 |A w - b|^2 + lam * sum_e w_e gap_e,

A the linear split of each destination to its two nodes, b the masses the next pass needs,
gap_e = value - psi_j >= 0 the edge's excess cost (what it adds to the duality gap). In 2-D the
masses the inner pass needs are found first (the inner pass fitted to a(phi) with free source
masses), then the outer pass delivers them as well as it can from mu^k, then the inner pass
delivers a(phi) as well as it can from what arrived. Whatever the fit leaves, the measure and
the plan's cost are exact: every node's mass is sent in full (the weights of a node sum to its
mass), and the cost is sum_e w_e |z_e - y_j|^2 of the edges used, so weak duality holds for the
returned measure whatever phi is.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .legendre import c_transform_lines, envelope_line

#: Candidates are the destinations within this fraction of h^2 / tau of a node's minimum (a tie at
#: the grid's resolution). Measured on the porous-medium example (benchmarks/fine_grid.py, cold
#: step, converged dual): at 128^2 certificate 8.3e-5 at 1e-7 (absolute), 3.2e-5 at 1e-5 (1/61 of
#: h^2/tau), 3.7e-5 at 1e-4; at 256^2 9.0e-5 at 3e-6 (1/51), 1.0e-4 at 1e-5.
SLACK_FRACTION = 1.0 / 64.0
#: Projected-gradient iterations per line and fit.
FIT_ITERATIONS = 200


@njit(cache=True)
def _line_candidates(f, h, tau, slack, z_out, gap_out, source_out):
    """Candidate edges (source j, destination z in index units, gap) of one line with target
    potential f, sorted by source then z; each source has at least its exact argmin. Returns the
    number of edges (at most the length of the outputs; ties beyond it are dropped)."""
    n = f.size
    cap = z_out.size
    best = np.empty(n)
    where = np.empty(n)
    envelope_line(f, h, tau, best, where)
    psi = best.copy()
    argmin = where.copy()
    seg_source = np.empty(2 * n, np.int64)
    seg_z = np.empty(2 * n)
    seg_value = np.empty(2 * n)
    count = 0
    for i in range(n - 1):
        shift = tau * (f[i + 1] - f[i]) / h
        low = i * h - shift  # the sources y whose stationary point y + shift lies in segment i
        first = max(0, int(np.ceil(low / h - 1e-12)))
        last = min(n - 1, int(np.floor((low + h) / h + 1e-12)))
        for j in range(first, last + 1):
            t = (j * h + shift - i * h) / h
            if t <= 1e-12 or t >= 1.0 - 1e-12:
                continue  # at a node: a node candidate
            value = shift * shift / (2.0 * tau) - (f[i] + t * (f[i + 1] - f[i]))
            seg_source[count], seg_z[count], seg_value[count] = j, i + t, value
            count += 1
            if value < psi[j]:
                psi[j], argmin[j] = value, i + t
    # the segment points grouped by source (counting sort)
    offsets = np.zeros(n + 1, np.int64)
    for q in range(count):
        offsets[seg_source[q] + 1] += 1
    for j in range(n):
        offsets[j + 1] += offsets[j]
    order = np.empty(count, np.int64)
    fill = offsets[:n].copy()
    for q in range(count):
        order[fill[seg_source[q]]] = q
        fill[seg_source[q]] += 1
    k = 0
    for j in range(n):
        start = k
        z_out[k], gap_out[k], source_out[k] = argmin[j], 0.0, j  # always kept
        k += 1
        low = max(int(where[max(j - 1, 0)]) - 1, 0)
        high = min(int(where[min(j + 1, n - 1)]) + 1, n - 1)
        for i in range(low, high + 1):
            gap = ((j - i) * h) ** 2 / (2.0 * tau) - f[i] - psi[j]
            if gap <= slack and i != argmin[j] and k < cap - (n - j):
                z_out[k], gap_out[k], source_out[k] = i, max(gap, 0.0), j
                k += 1
        for c in range(offsets[j], offsets[j + 1]):
            q = order[c]
            gap = seg_value[q] - psi[j]
            if gap <= slack and seg_z[q] != argmin[j] and k < cap - (n - j):
                z_out[k], gap_out[k], source_out[k] = seg_z[q], max(gap, 0.0), j
                k += 1
        for a in range(start + 1, k):  # insertion sort by z (a few edges)
            b = a
            while b > start and z_out[b - 1] > z_out[b]:
                z_out[b - 1], z_out[b] = z_out[b], z_out[b - 1]
                gap_out[b - 1], gap_out[b] = gap_out[b], gap_out[b - 1]
                b -= 1
    return k


@njit(cache=True)
def _deliver(z, w, n, out):
    """out = A w: each edge's mass split linearly between the nodes around its z."""
    out[:] = 0.0
    for e in range(z.size):
        i = min(int(np.floor(z[e])), n - 2) if n > 1 else 0
        t = z[e] - i
        out[i] += (1.0 - t) * w[e]
        if n > 1:
            out[i + 1] += t * w[e]


@njit(cache=True)
def _project(w, starts, masses, out):
    """Each group [starts[g], starts[g + 1]) onto {x >= 0, sum x = masses[g]}; where masses[g] < 0
    (a free source) onto x >= 0 only."""
    for g in range(starts.size - 1):
        a, b = starts[g], starts[g + 1]
        m = masses[g]
        if m < 0.0:
            for e in range(a, b):
                out[e] = max(w[e], 0.0)
            continue
        if b - a == 1:
            out[a] = m
            continue
        if b - a == 2:  # the common tie, in closed form
            low = min(max(0.5 * (w[a] - w[a + 1] + m), 0.0), m)
            out[a], out[a + 1] = low, m - low
            continue
        # the level with sum max(w - level, 0) = m: scan the values in decreasing order
        total, count = 0.0, 0
        ordered = np.empty(b - a)
        for e in range(a, b):
            ordered[e - a] = w[e]
        ordered.sort()
        level = ordered[-1] - m
        for k in range(b - a - 1, -1, -1):
            total += ordered[k]
            count += 1
            candidate = (total - m) / count
            if ordered[k] - candidate > 0.0:
                level = candidate
        for e in range(a, b):
            out[e] = max(w[e] - level, 0.0)


@njit(cache=True)
def _norm_squared(z, n):
    """|A|_2^2 of the line's split map, by power iteration, with a margin (at most the max row
    sum, since the columns sum to 1)."""
    row = np.zeros(n)
    _deliver(z, np.ones(z.size), n, row)
    bound = max(row.max(), 1e-300)
    x = np.ones(z.size)
    image = np.empty(n)
    estimate = 0.0
    for _ in range(12):
        _deliver(z, x, n, image)
        total = 0.0
        for e in range(z.size):  # x = A^T A x
            i = min(int(np.floor(z[e])), n - 2) if n > 1 else 0
            s = z[e] - i
            x[e] = (1.0 - s) * image[i] + (s * image[i + 1] if n > 1 else 0.0)
            total += x[e] * x[e]
        estimate = np.sqrt(total)
        if estimate == 0.0:
            return bound
        for e in range(z.size):
            x[e] /= estimate
    return min(1.2 * estimate, bound)


@njit(cache=True)
def _fit_line(z, gap, starts, masses, target, lam, iterations, w):
    """FISTA on 1/2 |A w - target|^2 + lam <gap, w> over the groups' simplices (``_project``); w
    holds the start (projected here) and the result. Only the edges of groups with a choice
    (several edges, or a free mass) move; the others' delivery is a constant of the fit."""
    n = target.size
    _project(w.copy(), starts, masses, w)
    moving = np.zeros(z.size, np.bool_)
    free_starts = [0]
    free_masses = []
    for g in range(starts.size - 1):
        if starts[g + 1] - starts[g] > 1 or masses[g] < 0.0:
            moving[starts[g]:starts[g + 1]] = True
            free_starts.append(free_starts[-1] + starts[g + 1] - starts[g])
            free_masses.append(masses[g])
    if len(free_masses) == 0:
        return
    index = np.nonzero(moving)[0]
    fixed = np.nonzero(~moving)[0]
    zf, gapf = z[index], gap[index]
    sub_starts, sub_masses = np.array(free_starts), np.array(free_masses)
    rest = target.copy()  # what the moving edges are to deliver
    base = np.zeros(n)
    _deliver(z[fixed], w[fixed], n, base)
    rest -= base
    x = w[index]
    step = 1.0 / _norm_squared(zf, n)
    previous = x.copy()
    y = x.copy()
    delivered = np.empty(n)
    trial = np.empty(x.size)
    t = 1.0
    for _ in range(iterations):
        _deliver(zf, y, n, delivered)
        for e in range(zf.size):
            i = min(int(np.floor(zf[e])), n - 2) if n > 1 else 0
            s = zf[e] - i
            grad = (1.0 - s) * (delivered[i] - rest[i]) + lam * gapf[e]
            if n > 1:
                grad += s * (delivered[i + 1] - rest[i + 1])
            trial[e] = y[e] - step * grad
        _project(trial, sub_starts, sub_masses, x)
        t_next = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
        momentum = (t - 1.0) / t_next
        for e in range(x.size):
            y[e] = x[e] + momentum * (x[e] - previous[e])
            previous[e] = x[e]
        t = t_next
    w[index] = x


@njit(cache=True)
def _fit_pass(potential, h, tau, slack, source, free, target, lam, iterations, seed):
    """One 1-D pass over all lines (rows of the arrays): each line's sources split between their
    candidates to deliver ``target``. ``free``: the source masses are unknowns (``source`` only
    seeds the start); else each source sends exactly its mass. ``seed`` (lines, 4 n + 8): the
    weights of an earlier pass on the same potential (the same edges) to start from, scaled to
    each source's mass; empty: each source's mass split evenly. Returns (delivered (lines, n),
    the masses the sources sent (lines, n), sum of w |z - y|^2, sum of w gap, the weights)."""
    lines, n = potential.shape
    delivered = np.zeros((lines, n))
    sent = np.zeros((lines, n))
    cost, excess = 0.0, 0.0
    cap = 4 * n + 8
    weights = np.zeros((lines, cap))
    z = np.empty(cap)
    gap = np.empty(cap)
    owner = np.empty(cap, np.int64)
    for r in range(lines):
        if not free and source[r].sum() == 0.0:
            continue
        if free and target[r].sum() == 0.0:
            continue
        k = _line_candidates(potential[r], h, tau, slack, z, gap, owner)
        starts = np.empty(n + 1, np.int64)
        g = 0
        for e in range(k):
            if e == 0 or owner[e] != owner[e - 1]:
                starts[g] = e
                g += 1
        starts[g] = k
        starts = starts[:g + 1]
        masses = np.empty(g)
        w = np.empty(k)
        for q in range(g):
            j = owner[starts[q]]
            masses[q] = -1.0 if free else source[r, j]
            total = 0.0
            if seed.shape[0] > 0:
                for e in range(starts[q], starts[q + 1]):
                    total += seed[r, e]
            for e in range(starts[q], starts[q + 1]):
                w[e] = (seed[r, e] * source[r, j] / total if total > 0.0
                        else source[r, j] / (starts[q + 1] - starts[q]))
        _fit_line(z[:k], gap[:k], starts, masses, target[r], lam, iterations, w)
        weights[r, :k] = w
        _deliver(z[:k], w, n, delivered[r])
        for e in range(k):
            j = owner[e]
            sent[r, j] += w[e]
            cost += w[e] * ((z[e] - j) * h) ** 2
            excess += w[e] * gap[e]
    return delivered, sent, cost, excess, weights


def recover(phi: np.ndarray, source: np.ndarray, wanted: np.ndarray, between: np.ndarray | None,
            spacing, tau: float, lam: float, slack: float | None = None,
            iterations: int = FIT_ITERATIONS) -> tuple[np.ndarray, float, float] | None:
    """A measure near ``wanted`` delivered from ``source`` by an explicit plan on the near-argmins
    of the c-transform of ``phi`` (module docstring).

    Parameters
    ----------
    phi, source, wanted : arrays of the grid's shape (1-D or 2-D)
        The dual potential, mu^k's masses, the masses a(phi) the energy asks for.
    between : array of the grid's shape or None
        2-D: mu^k after the outer pass of P(phi) (seeds the fit of the intermediate masses).
    spacing, tau : the grid's spacing per axis, the step.
    lam : float
        Weight of the plan's excess cost against the squared mismatch (h^d times the energy's
        curvature (u*)'' makes both terms second-order pieces of the duality gap).
    slack : float, optional
        Candidates within this excess of a node's minimum (default SLACK_FRACTION h^2 / tau).

    Returns
    -------
    (masses (grid shape), the plan's cost sum m |z - y|^2, its excess cost sum w gap), or None
    in 3-D.
    """
    spacing = np.asarray(spacing, dtype=float)
    if slack is None:
        slack = SLACK_FRACTION * float(spacing.min()) ** 2 / tau
    phi = np.ascontiguousarray(phi, dtype=float)
    none = np.zeros((0, 0))
    if phi.ndim == 1:
        delivered, _, cost, excess, _ = _fit_pass(phi[None], spacing[0], tau, slack,
                                                  source[None].astype(float), False,
                                                  wanted[None].astype(float), lam, iterations, none)
        return delivered[0], cost, excess
    if phi.ndim != 2:
        return None
    h0, h1 = float(spacing[0]), float(spacing[1])
    inner, _ = c_transform_lines(phi, h1, tau)  # T_1(phi) on the intermediate nodes
    seed = np.ascontiguousarray(source if between is None else between, dtype=float)
    wanted = np.ascontiguousarray(wanted, dtype=float)
    _, needed, _, _, split = _fit_pass(phi, h1, tau, slack, seed, True, wanted, lam, iterations, none)
    arrived, _, cost0, excess0, _ = _fit_pass(np.ascontiguousarray(-inner.T), h0, tau, slack,
                                              np.ascontiguousarray(source.T, dtype=float), False,
                                              np.ascontiguousarray(needed.T), lam, iterations, none)
    delivered, _, cost1, excess1, _ = _fit_pass(phi, h1, tau, slack, np.ascontiguousarray(arrived.T), False,
                                                wanted, lam, iterations, split)
    return delivered, cost0 + cost1, excess0 + excess1
