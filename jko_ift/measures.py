"""Measures on weighted supports: ``Measure`` (points and weights) and ``Grid``.

A measure is mu = sum_i a_i delta_{x_i} with points x: (n, d) and weights a: (n,) >= 0.
A measure made by ``Grid.measure`` remembers its grid, hence its cell volume h^d,
which the densities of ``Entropy`` and ``PorousMedium`` need (rho_i = a_i / h^d).
A measure made from PyTorch tensors holds float64 NumPy copies (the schemes' state lives on
the host) and remembers the tensors' ``ArrayType``, in which ``Measure.arrays()`` and the
driver's results hand its points and weights back.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, field

import numpy as np

#: Arrays this module made read-only (Grid and Measure points): a Measure shares these
#: instead of copying them. Keyed by id, holding the array, so an id is never reused while
#: it is listed. Any other array is copied, even a read-only one: a read-only view of the
#: caller's writable array would still change under the measure.
_FROZEN: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _freeze(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    _FROZEN[id(array)] = array
    return array


def _is_frozen_here(array: np.ndarray) -> bool:
    return _FROZEN.get(id(array)) is array


def _is_tensor(values) -> bool:
    """Whether ``values`` is a PyTorch tensor (checked without importing torch)."""
    return type(values).__module__.split(".")[0] == "torch"


def _real_array(values, name: str, what: str) -> np.ndarray:
    """``values`` as float, refusing complex numbers (a cast would drop the imaginary part)."""
    if _is_tensor(values):  # a PyTorch tensor, on any device: its values
        values = values.detach().cpu().numpy()
    raw = np.asarray(values)
    if np.iscomplexobj(raw):
        raise ValueError(f"{name} must be real {what}, got complex values; pass their real part "
                         "(np.real) if the imaginary part is round-off")
    if raw.dtype.kind not in "biuf":
        try:
            return raw.astype(float)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be {what}, got an array of {raw.dtype}") from None
    return raw.astype(float, copy=False)


def as_points(points, name: str = "points") -> np.ndarray:
    """Return ``points`` as a finite float array of shape (n, d); 1-D input means d = 1."""
    x = _real_array(points, name, "coordinates")
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(
            f"{name} must be an array of shape (n, d) with n >= 1, got shape {x.shape}; "
            "pass one row per point"
        )
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or inf; pass finite coordinates")
    return x


def as_weights(weights, n: int, name: str = "weights") -> np.ndarray:
    """Return ``weights`` as a finite, nonnegative float array of shape (n,)."""
    a = _real_array(weights, name, "nonnegative numbers")
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(
            f"{name} must have shape ({n},) to match {n} points, got shape {a.shape}"
        )
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf; pass finite nonnegative weights")
    if np.any(a < 0):
        raise ValueError(
            f"{name} must be nonnegative, got min {a.min():.3g}; "
            "clip tiny negative round-off with np.maximum(weights, 0)"
        )
    return a


@dataclass(frozen=True)
class ArrayType:
    """The PyTorch device and dtype of the tensors a measure was made from.

    A measure holds float64 NumPy copies of its tensors; this is where its points and weights
    go back to: ``Measure.arrays()`` converts them, and ``jk.solve`` / ``jk.jko_step``, given a
    measure made from tensors, run their kernel sums on ``device`` and hand every result
    measure this type.
    """

    device: str
    dtype: str

    @classmethod
    def of(cls, *arrays) -> ArrayType | None:
        """The type of the first tensor among ``arrays``; None when none is a tensor."""
        for array in arrays:
            if _is_tensor(array):
                return cls(str(array.device), str(array.dtype).removeprefix("torch."))
        return None

    def convert(self, array: np.ndarray):
        """A tensor copy of ``array`` on this device, in this dtype."""
        import torch

        return torch.tensor(array, dtype=getattr(torch, self.dtype), device=self.device)

    def __str__(self) -> str:
        return f"torch {self.dtype} on {self.device}"


@dataclass(frozen=True, eq=False)
class Grid:
    r"""A cell-centred regular grid on the box :math:`[lo, hi]` in 1, 2 or 3 dimensions.

    Parameters
    ----------
    lo, hi : float or sequence of float
        Lower and upper corners of the box, one number per axis, ``lo < hi``.
    shape : int or sequence of int
        Number of cells along each axis, positive.

    Attributes
    ----------
    points : ndarray, shape (n, d)
        The cell centres in C order (the last axis varies fastest), so that
        ``values.reshape(grid.shape)`` recovers the image of a field on the grid. Read-only.
        The cell widths are ``spacing``, :math:`h_k = (hi_k - lo_k) / shape_k`, and
        ``cell_volume`` is :math:`\prod_k h_k`, which turns densities into weights.

    Raises
    ------
    ValueError
        If the lengths of ``lo``, ``hi`` and ``shape`` differ or are not 1, 2 or 3, if
        ``lo >= hi`` somewhere, or if ``shape`` is not made of positive integers.

    Examples
    --------
    >>> grid = jk.Grid([0, 0], [1, 2], [2, 4])
    >>> grid.size, grid.spacing.tolist(), grid.cell_volume
    (8, [0.5, 0.5], 0.25)
    >>> grid.points[:2].tolist()
    [[0.25, 0.25], [0.25, 0.75]]
    """

    lo: tuple[float, ...]
    hi: tuple[float, ...]
    shape: tuple[int, ...]
    points: np.ndarray = field(init=False, repr=False)

    def __init__(self, lo, hi, shape):
        lo_, hi_ = np.atleast_1d(np.asarray(lo, float)), np.atleast_1d(np.asarray(hi, float))
        shape_ = np.atleast_1d(np.asarray(shape))
        d = shape_.size
        if d not in (1, 2, 3) or lo_.size != d or hi_.size != d:
            raise ValueError(
                f"Grid needs lo, hi and shape of the same length 1, 2 or 3, got "
                f"lo={lo_.tolist()}, hi={hi_.tolist()}, shape={shape_.tolist()}"
            )
        if not (np.all(np.isfinite(lo_)) and np.all(np.isfinite(hi_)) and np.all(hi_ > lo_)):
            raise ValueError(f"Grid needs finite lo < hi, got lo={lo_.tolist()}, hi={hi_.tolist()}")
        if not np.all(shape_ == np.round(shape_)) or np.any(shape_ < 1):
            raise ValueError(f"Grid shape must be positive integers, got {shape_.tolist()}")
        object.__setattr__(self, "lo", tuple(lo_.tolist()))
        object.__setattr__(self, "hi", tuple(hi_.tolist()))
        object.__setattr__(self, "shape", tuple(int(s) for s in shape_))
        axes = [lo_[k] + (np.arange(self.shape[k]) + 0.5) * self.spacing[k] for k in range(d)]
        mesh = np.meshgrid(*axes, indexing="ij")
        points = _freeze(np.stack([m.ravel() for m in mesh], axis=1))
        object.__setattr__(self, "points", points)

    @property
    def dim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def spacing(self) -> np.ndarray:
        """Cell widths h: (d,)."""
        return (np.asarray(self.hi) - np.asarray(self.lo)) / np.asarray(self.shape)

    @property
    def cell_volume(self) -> float:
        return float(np.prod(self.spacing))

    def measure(self, density, normalize: bool = False) -> Measure:
        r"""The measure on this grid with weights :math:`a_i = \rho(x_i)\, h^d`.

        Parameters
        ----------
        density : callable or array_like
            A function of the points ``(n, d)`` returning ``(n,)`` values, or the values
            themselves, of shape ``(n,)`` or ``self.shape``; nonnegative.
        normalize : bool, default False
            Rescale the weights to total mass 1.

        Returns
        -------
        Measure
            A measure on ``self.points`` that remembers this grid (its cell volume).

        Raises
        ------
        ValueError
            If the values are negative, not finite or of the wrong shape, or if
            ``normalize=True`` and they are zero everywhere.

        Examples
        --------
        >>> grid = jk.Grid(-3.0, 3.0, 60)
        >>> mu = grid.measure(lambda x: np.exp(-x[:, 0] ** 2 / 2), normalize=True)
        >>> round(mu.mass, 12), round(float(mu.mean()[0]), 12)
        (1.0, 0.0)
        """
        values = density(self.points) if callable(density) else density
        values = np.asarray(values, dtype=float)
        if values.shape == self.shape:
            values = values.ravel()
        weights = as_weights(values, self.size, name="density values") * self.cell_volume
        if normalize:
            mass = weights.sum()
            if mass <= 0:
                raise ValueError("cannot normalize a density that is zero on every grid point")
            weights = weights / mass
        return Measure(self.points, weights, grid=self)


@dataclass(frozen=True, eq=False)
class Measure:
    r"""A weighted sum of Dirac masses, :math:`\mu = \sum_{i=1}^n a_i \delta_{x_i}`.

    The points and weights are validated and copied at construction and read-only after it, so
    a measure never changes.

    Parameters
    ----------
    points : array_like, shape (n, d) or (n,)
        The support :math:`x_1, \dots, x_n`; a 1-D array means :math:`d = 1`. Finite.
    weights : array_like, shape (n,)
        The weights :math:`a_i \ge 0`, finite.
    grid : Grid, optional
        Set for measures on a :class:`Grid` (then ``points`` must be the grid's points); it
        gives the cell volume :math:`h^d` that densities need (:class:`~jko_ift.Entropy`,
        :class:`~jko_ift.PorousMedium`: :math:`\rho_i = a_i / h^d`).
    array_type : ArrayType, optional
        Recorded from ``points`` (or ``weights``) when they are PyTorch tensors: the measure
        keeps float64 NumPy copies, and :meth:`arrays` hands them back as tensors of that
        device and dtype (so do the results of ``jk.solve`` and ``jk.jko_step``).

    Raises
    ------
    ValueError
        If the shapes do not match, a value is complex, NaN or infinite, a weight is negative,
        or the points are not the grid's.

    See Also
    --------
    Grid.measure : a measure from a density on a grid.

    Examples
    --------
    >>> mu = jk.Measure([[0.0, 0.0], [2.0, 0.0]], [0.25, 0.75])
    >>> mu.n, mu.dim, mu.mass
    (2, 2, 1.0)
    >>> mu.mean().tolist()
    [1.5, 0.0]
    >>> mu.with_weights([1.0, 1.0]).normalized().weights.tolist()
    [0.5, 0.5]
    """

    points: np.ndarray
    weights: np.ndarray
    grid: Grid | None = None
    array_type: ArrayType | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.array_type is None:
            object.__setattr__(self, "array_type", ArrayType.of(self.points, self.weights))
        elif not isinstance(self.array_type, ArrayType):
            raise ValueError(f"array_type must be a jko_ift.measures.ArrayType or None, got "
                             f"{self.array_type!r}; leave it out: tensors given as points set it")
        x = as_points(self.points)
        a = as_weights(self.weights, x.shape[0])
        if self.grid is not None and not (x is self.grid.points or (
                x.shape == self.grid.points.shape and np.array_equal(x, self.grid.points))):
            raise ValueError(
                f"points of shape {x.shape} are not the points of the grid of shape "
                f"{self.grid.shape}; pass grid=None for a measure off the grid"
            )
        if not _is_frozen_here(x):  # the caller's array, even read-only, may change: copy it
            x = _freeze(x.copy())
        a = a.copy()  # weights are never shared (with_weights makes new ones)
        a.setflags(write=False)
        object.__setattr__(self, "points", x)
        object.__setattr__(self, "weights", a)

    @property
    def n(self) -> int:
        return self.points.shape[0]

    @property
    def dim(self) -> int:
        return self.points.shape[1]

    @property
    def mass(self) -> float:
        return float(self.weights.sum())

    @property
    def cell_volume(self) -> float | None:
        return None if self.grid is None else self.grid.cell_volume

    def density(self) -> np.ndarray:
        """rho_i = a_i / h^d on a grid: (n,)."""
        return self.weights / require_cell_volume(self, "a density")

    def with_weights(self, weights) -> Measure:
        """The same support with new weights."""
        return Measure(self.points, np.asarray(weights, dtype=float), grid=self.grid,
                       array_type=self.array_type)

    def arrays(self):
        """(points, weights) in the array type the measure was made from: tensors on its
        ``array_type``'s device and dtype (fresh copies), or the NumPy arrays (read-only)."""
        if self.array_type is None:
            return self.points, self.weights
        return self.array_type.convert(self.points), self.array_type.convert(self.weights)

    def normalized(self) -> Measure:
        if self.mass <= 0:
            raise ValueError("cannot normalize a measure of zero mass")
        return self.with_weights(self.weights / self.mass)

    def mean(self) -> np.ndarray:
        return self.weights @ self.points / self.mass

    def covariance(self) -> np.ndarray:
        centred = self.points - self.mean()
        return (centred * self.weights[:, None]).T @ centred / self.mass

    def same_support(self, other: Measure) -> bool:
        return self.points is other.points or (
            self.points.shape == other.points.shape and np.array_equal(self.points, other.points)
        )


def with_array_type(mu: Measure, array_type: ArrayType | None) -> Measure:
    """``mu`` handed ``array_type`` (its arrays shared, not copied: they are read-only)."""
    if mu.array_type == array_type:
        return mu
    stamped = copy.copy(mu)
    object.__setattr__(stamped, "array_type", array_type)
    return stamped


def require_cell_volume(mu: Measure, what: str) -> float:
    if mu.cell_volume is None:
        raise ValueError(
            f"{what} needs a cell volume, but this measure has no grid; "
            "build it with jk.Grid(lo, hi, shape).measure(density)"
        )
    return mu.cell_volume


def grid_gradient(mu: Measure, values: np.ndarray) -> np.ndarray:
    """Central-difference gradient of grid values (n,) -> (n, d)."""
    grid = mu.grid
    if grid is None:
        raise ValueError("a finite-difference gradient needs a measure on a Grid")
    image = np.asarray(values, float).reshape(grid.shape)
    if min(grid.shape) < 2:
        raise ValueError(f"a gradient needs at least 2 cells per axis, grid has {grid.shape}")
    parts = np.gradient(image, *grid.spacing)
    parts = [parts] if grid.dim == 1 else parts
    return np.stack([p.ravel() for p in parts], axis=1)

