"""The c-transform of a grid function for the quadratic cost, and the pushforward it defines.

On a regular grid with nodes x_i = x_0 + i h (one axis, n nodes), a function given by its node
values f_i is extended to the segment [x_0, x_{n-1}] by linear interpolation, PL(f). Its
c-transform for the cost |z - y|^2 / (2 tau) is, at the nodes y_j,

    T(f)(y_j) = min over z in [x_0, x_{n-1}] of (z - y_j)^2 / (2 tau) - PL(f)(z).

The minimum is attained either at a node z = x_i (the lower envelope of the parabolas
(y - x_i)^2 / (2 tau) - f_i, found in linear time) or inside a segment [x_i, x_{i+1}], where
the stationary point is z = y + tau s_i with the segment's slope s_i: for a given segment this
holds for y in a window of length h, hence for exactly one node, so all segments are checked in
one more linear pass. The result is exact (no sampling of z), and the argmin z_j, stored as a
position in index units, tells where the mass of node j goes: it is split between the two nodes
around z_j in proportion to the interpolation weights (``deposit_lines``), so that the
pushforward conserves mass exactly and moves it by less than a cell.

In d dimensions the transforms along the axes are composed (``back_and_forth`` docs/theory.md
§10): each 1-D pass runs over all lines of an array at once, compiled with numba.
"""

from __future__ import annotations

import numpy as np
from numba import njit

#: Rows of a pass written out transposed together (8 doubles: one 64-byte cache line of the output).
FLIP_BLOCK = 8


@njit(cache=True)
def envelope_line(f, h, tau, best, where):
    """Lower envelope of the parabolas (y - i h)^2 / (2 tau) - f_i at the nodes y_j = j h."""
    n = f.size
    hull = np.empty(n, np.int64)
    edges = np.empty(n + 1)
    k = 0
    hull[0] = 0
    edges[0] = -np.inf
    edges[1] = np.inf
    for q in range(1, n):
        cross = 0.5 * (q + hull[k]) * h - tau * (f[q] - f[hull[k]]) / ((q - hull[k]) * h)
        while cross <= edges[k]:  # edges[0] = -inf stops this at k = 0
            k -= 1
            cross = 0.5 * (q + hull[k]) * h - tau * (f[q] - f[hull[k]]) / ((q - hull[k]) * h)
        k += 1
        hull[k] = q
        edges[k] = cross
        edges[k + 1] = np.inf
    k = 0
    for j in range(n):
        y = j * h
        while edges[k + 1] < y:
            k += 1
        i = hull[k]
        best[j] = (y - i * h) ** 2 / (2.0 * tau) - f[i]
        where[j] = i


@njit(cache=True)
def _segments_line(f, h, tau, best, where):
    """Minima inside the segments: segment i at the single node y_j of its window."""
    n = f.size
    last = (n - 1) * h
    for i in range(n - 1):
        slope = (f[i + 1] - f[i]) / h
        shift = tau * slope
        low = i * h - shift  # the window of y whose stationary point z = y + shift is in segment i
        if not (low <= last and low + h >= 0.0):
            continue
        j = int(np.ceil(low / h - 1e-12)) if low > 0 else 0
        if j > n - 1:
            continue
        y = j * h
        z = y + shift
        if z < i * h or z > (i + 1) * h:
            continue
        t = (z - i * h) / h
        value = shift * shift / (2.0 * tau) - (f[i] + t * (f[i + 1] - f[i]))
        if value < best[j]:
            best[j] = value
            where[j] = i + t


@njit(cache=True)
def c_transform_lines(f, h, tau):
    """T(f) along the last axis of f: (lines, n) -> (values (lines, n), argmin positions (lines, n)
    in index units, in [0, n - 1])."""
    lines, n = f.shape
    best, where = np.empty((lines, n)), np.empty((lines, n))
    _c_transform_lines(f, h, tau, False, best, where)
    return best, where


@njit(cache=True)
def _c_transform_lines(f, h, tau, flip, best, where):
    """``c_transform_lines`` into the arrays best and where; with ``flip`` the values negated and
    transposed, best (n, lines): the input of the next axis's pass in 2-D, without a copy in
    between (the argmins keep their layout)."""
    lines, n = f.shape
    block = np.empty((FLIP_BLOCK, n))  # rows of a flipped pass, written out a block at a time
    for row in range(lines):
        values = block[row % FLIP_BLOCK] if flip else best[row]
        if n == 1:
            values[0] = -f[row, 0]
            where[row, 0] = 0.0
        else:
            envelope_line(f[row], h, tau, values, where[row])
            _segments_line(f[row], h, tau, values, where[row])
        if flip and (row % FLIP_BLOCK == FLIP_BLOCK - 1 or row == lines - 1):
            _write_flipped(block, row - row % FLIP_BLOCK, row + 1, best)


@njit(cache=True)
def _write_flipped(block, first, stop, best):
    """best[j, first:stop] = -block[:stop - first, j]: consecutive rows land in one cache line."""
    n = block.shape[1]
    for j in range(n):
        for row in range(first, stop):
            best[j, row] = -block[row - first, j]


@njit(cache=True)
def deposit_lines(mass, where, h):
    """Push masses (lines, n) along the last axis to the positions ``where`` (index units), split
    linearly between the two nodes around each position. Returns (the pushed masses (lines, n),
    sum of mass * displacement^2)."""
    return _deposit(mass, where, h, False)


@njit(cache=True)
def deposit_transposed(mass, where, h):
    """``deposit_lines`` with its output written transposed, (n, lines): the layout of the next
    axis's pass, without a copy in between (each output cell gets its contributions in the same
    order, so the same rounding)."""
    return _deposit(mass, where, h, True)


@njit(cache=True)
def _deposit(mass, where, h, transposed):
    lines, n = mass.shape
    out = np.zeros(lines * n)
    stride = lines if transposed else 1  # of the node index in the output
    cost = 0.0
    for row in range(lines):
        first = row if transposed else row * n
        for j in range(n):
            m = mass[row, j]
            if m == 0.0:
                continue
            z = where[row, j]
            cost += m * ((z - j) * h) ** 2
            i = int(np.floor(z))
            if i >= n - 1:
                i = n - 2 if n > 1 else 0
            t = z - i
            if n == 1 or t <= 0.0:
                out[first + i * stride] += m
            elif t >= 1.0:
                out[first + (i + 1) * stride] += m
            else:
                out[first + i * stride] += (1.0 - t) * m
                out[first + (i + 1) * stride] += t * m
    return (out.reshape((n, lines)) if transposed else out.reshape((lines, n))), cost


def along(function, array: np.ndarray, axis: int, *args):
    """Apply a line kernel along ``axis`` of ``array``; returns the outputs in the same layout."""
    moved = np.ascontiguousarray(np.moveaxis(array, axis, -1))
    shape = moved.shape
    outputs = function(moved.reshape(-1, shape[-1]), *args)
    return outputs, shape


def c_transform_buffers(shape) -> tuple[np.ndarray, ...] | None:
    """Work arrays for ``c_transform`` on a 2-D grid of this shape (None in other dimensions)."""
    if len(shape) != 2:
        return None
    n0, n1 = shape
    return np.empty((n1, n0)), np.empty((n0, n1)), np.empty((n1, n0)), np.empty((n1, n0))


def c_transform(phi: np.ndarray, spacing, tau: float, buffers: tuple | None = None):
    """psi = phi^c on the grid for the axis-by-axis problem (docs/theory.md §10).

    phi: the node values, shape ``grid.shape``. Returns (psi, argmins) where argmins[k] holds
    the argmin positions (index units) of the pass along axis k, in that pass's layout.
    Composition: psi = T_0(-T_1(... -T_{d-1}(phi))), the innermost pass along the last axis.
    ``buffers`` (2-D, from ``c_transform_buffers``): the arrays that psi and the argmins are
    written to, reused from call to call (the caller is done with the previous results).
    """
    d = phi.ndim
    if d == 2:  # the first pass hands its values to the second already negated and transposed
        flipped, inner, best, outer = c_transform_buffers(phi.shape) if buffers is None else buffers
        values = np.ascontiguousarray(phi, dtype=float)
        _c_transform_lines(values, float(spacing[1]), tau, True, flipped, inner)
        _c_transform_lines(flipped, float(spacing[0]), tau, False, best, outer)
        return best.T, [outer, inner]
    values = phi
    argmins = [None] * d
    for axis in range(d - 1, -1, -1):
        moved = np.ascontiguousarray(values.swapaxes(axis, -1))  # its own inverse
        best, where = c_transform_lines(moved.reshape(-1, moved.shape[-1]), float(spacing[axis]), tau)
        argmins[axis] = where.reshape(moved.shape)
        best = best.reshape(moved.shape).swapaxes(-1, axis)
        values = best if axis == 0 else -best
    return values, argmins


def push_forward(mass: np.ndarray, argmins, spacing, mass_last: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The masses (grid.shape) moved by the argmins of ``c_transform``: first along axis 0 (the
    outermost transform), then along axis 1, ... Returns (pushed masses, the displacement
    cost sum m |z - y|^2 per axis (d,)). ``mass_last``: optionally, the masses already in the
    layout of the axis-0 pass (``mass.swapaxes(0, -1)``, contiguous), which saves a copy; in
    2-D the two passes are then fused (no transpose in between)."""
    d = mass.ndim
    costs = np.zeros(d)
    if d == 2:
        first = np.ascontiguousarray(mass.T) if mass_last is None else mass_last.reshape(mass.T.shape)
        between, costs[0] = deposit_transposed(first, argmins[0].reshape(first.shape), float(spacing[0]))
        current, costs[1] = deposit_lines(between, argmins[1].reshape(mass.shape), float(spacing[1]))
        return current, costs
    current = mass
    for axis in range(d):
        moved = np.ascontiguousarray(current.swapaxes(axis, -1))  # the layout of c_transform's pass
        pushed, cost = deposit_lines(moved.reshape(-1, moved.shape[-1]),
                                     argmins[axis].reshape(-1, moved.shape[-1]), float(spacing[axis]))
        costs[axis] = cost
        current = pushed.reshape(moved.shape).swapaxes(-1, axis)
    return current, costs
