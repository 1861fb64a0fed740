"""Array backends of the kernel sums: NumPy (the default) and PyTorch, on CPU or CUDA.

The particle schemes spend their time in the kernel sums (O(n m d) for n particles against m
points); everything else they do is O((n + m) d). So the device is a property of the kernel,
not a second copy of the schemes: ``on_device(kernel, "cuda", "float32")`` is a kernel whose
``apply``, ``grad_sum`` and Gram matrix run blocked on that device (PyTorch) and hand NumPy
arrays back, and every method that sums the kernel (``MMD2``'s witness and its gradient, the
explicit flows, ``problems.paper_scheme``, the MMD weight steps) runs on it unchanged.

The sums themselves are written once against the Python array API standard
(``array-api-compat``): ``generic_apply``, ``generic_grad_sum`` and ``generic_matrix`` take
NumPy arrays or PyTorch tensors and return the array type they were given, on its device.
``Kernel.apply`` / ``grad_sum`` / ``__call__`` send tensors here; NumPy arrays keep the NumPy
path of ``kernels.py`` with its refinements (k-d tree near pairs, kept small-pair matrices,
BLAS threading heuristics), which agrees with the generic path to round-off.

Both paths compute a block of squared distances by one lifted matrix product on centred points
and recompute from differences the near pairs whose lifted value carries too much round-off
(the threshold is the kernel's ``_refine_below`` of the float64 bound, in float32 too: the same
pairs are refined in both precisions). A block has at most ``BLOCK_ENTRIES`` entries on CPU;
on CUDA its size follows the device's free memory (``FREE_MEMORY_FRACTION``): no (n, m) matrix
is formed by a sum, so n = 10^5 in d = 100 fits.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import keops
from .kernels import BLOCK_ENTRIES, EPS, IMQ, EnergyKernel, Gaussian, Kernel, Laplace
from .measures import ArrayType, Measure, _is_frozen_here

DTYPES = ("float64", "float32")

#: Share of a CUDA device's free memory that the temporaries of one block may take.
FREE_MEMORY_FRACTION = 0.25

#: Block-sized temporaries alive at once in a generic sum: the distances, the comparison mask
#: of the near pairs, the profile (or its derivative).
BLOCK_TEMPORARIES = 3

#: Uploaded copies of frozen NumPy arrays (points of measures, never changed) kept per device
#: kernel, so that a step's repeated sums over the same measure upload it once.
UPLOAD_SLOTS = 8

#: What a float32 device kernel means for the steps that certify their result.
FLOAT32_CERTIFICATES = (
    "on_device(..., dtype='float32'): the kernel sums are accurate to about 1e-7 relative, and the "
    "steps that certify their result (ParticleJKO, ConicJKO, EntropicJKO, the exact weight steps) "
    "compute their certificates from these sums, so a certificate does not bound errors below that "
    "level (a ParticleJKO step certified to 5e-11 differed from the float64 step by 6e-8). The "
    "explicit flows are unaffected beyond the sums' own rounding. Use dtype='float64' for certified steps")

INSTALL_HINT = 'install the extra: pip install -e ".[torch]" (PyTorch and array-api-compat)'


def is_torch(array) -> bool:
    """Whether ``array`` is a PyTorch tensor (checked without importing torch)."""
    return type(array).__module__.split(".")[0] == "torch"


def namespace(*arrays):
    """The array-API namespace of ``arrays`` (array-api-compat's wrapper of NumPy or PyTorch)."""
    try:
        import array_api_compat
    except ImportError:
        raise ValueError(f"sums over PyTorch tensors need array-api-compat; {INSTALL_HINT}") from None
    return array_api_compat.array_namespace(*arrays)


def _torch():
    try:
        import torch
    except ImportError:
        raise ValueError(f"this backend needs PyTorch; {INSTALL_HINT}") from None
    return torch


def to_numpy(array) -> np.ndarray:
    """A NumPy float64 copy of a tensor on any device (or ``array`` itself, as float64)."""
    if is_torch(array):
        array = array.detach().to("cpu").double().numpy()
    return np.asarray(array, dtype=float)


@dataclass(frozen=True)
class Backend:
    """Where the generic kernel sums run: PyTorch on ``device`` ("cpu", "cuda", "cuda:1") in
    ``dtype`` ("float64" or "float32").

    Raises
    ------
    ValueError
        For an unknown dtype, a device PyTorch does not know or CUDA without a GPU.
    """

    device: str = "cpu"
    dtype: str = "float64"
    keops: bool = False  # the Gaussian and IMQ sums by KeOps (``jko_ift.keops``)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        torch = _torch()
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:<index>', got {self.device!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} asked for, but PyTorch sees no CUDA device on "
                             "this machine; pass device='cpu'")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")

    def asarray(self, array):
        """``array`` (NumPy or tensor) as a tensor of this dtype on this device."""
        torch = _torch()
        dtype = getattr(torch, self.dtype)
        if is_torch(array):
            return array.detach().to(device=self.device, dtype=dtype)
        array = np.ascontiguousarray(array)
        if not array.flags.writeable:  # a measure's frozen array: a tensor never shares it
            array = array.copy()
        return torch.as_tensor(array, dtype=dtype, device=self.device)


def block_rows(x, m: int) -> int:
    """Rows per block of a sum over m columns: BLOCK_ENTRIES entries on CPU; on CUDA the share
    FREE_MEMORY_FRACTION of the device's free memory, over BLOCK_TEMPORARIES temporaries."""
    entries = BLOCK_ENTRIES
    if is_torch(x) and x.device.type == "cuda":
        free, _ = _torch().cuda.mem_get_info(x.device)
        entries = int(FREE_MEMORY_FRACTION * free) // (BLOCK_TEMPORARIES * x.element_size())
    return max(1, entries // max(m, 1))


@dataclass(frozen=True)
class _Profile:
    """A kernel's profile in array-API operations: the sums hand ``value`` and ``derivative``
    blocks of ``scale`` |x - y|^2 (the scale folded into the lifted product, as kernels.py
    does); ``derivative`` returns phi'(s) / ``factor``. Same formulas as the NumPy profiles."""

    scale: float
    value: Callable
    derivative: Callable
    factor: float = 1.0


def _profiles(kernel: Kernel) -> _Profile:
    """The array-API profile of a Gaussian, IMQ, Laplace or energy kernel (ValueError else)."""
    if isinstance(kernel, Gaussian) and kernel.sigma**2 > 0:
        # blocks of exponents -|x - y|^2 / (2 sigma^2), <= 0 outside the refined near pairs
        rate = 0.5 / kernel.sigma / kernel.sigma
        return _Profile(-rate, lambda xp, s: _exp_inplace(s), lambda xp, s: _exp_inplace(s), -rate)
    if isinstance(kernel, IMQ) and kernel.c**2 > 0:
        c2 = kernel.c**2
        return _Profile(1.0, lambda xp, s: (c2 + _clipped(xp, s)) ** -0.5,
                        lambda xp, s: (c2 + _clipped(xp, s)) ** -1.5, -0.5)
    if isinstance(kernel, Laplace):
        sigma = kernel.sigma
        return _Profile(1.0, lambda xp, s: xp.exp(-xp.sqrt(_clipped(xp, s)) / sigma),
                        lambda xp, s: _over_root(xp, xp.exp(-xp.sqrt(_clipped(xp, s)) / sigma), s),
                        -1.0 / sigma)
    if isinstance(kernel, EnergyKernel):
        return _Profile(1.0, lambda xp, s: -xp.sqrt(_clipped(xp, s)),
                        lambda xp, s: _over_root(xp, xp.ones_like(s), s), -1.0)
    raise ValueError(f"the array-API kernel sums know jk.Gaussian, jk.IMQ, jk.Laplace and "
                     f"jk.EnergyKernel (bandwidths whose square is a normal float), got {kernel!r}; "
                     "pass NumPy arrays for other kernels")


def _clipped(xp, s):
    """max(s, 0): float32 lifted values of pairs the float64 threshold left alone may dip below 0."""
    return xp.clip(s, min=0.0)


def _exp_inplace(block):
    """exp(block), overwriting it (in-place updates are not in the array API standard)."""
    if is_torch(block):
        return block.exp_()
    return np.exp(block, out=block)


def _over_root(xp, scale, s):
    """scale / (2 sqrt(s)), 0 at s <= 0 (the symmetric subgradient of |x - y|)."""
    root = xp.sqrt(_clipped(xp, s))
    positive = root > 0
    return xp.where(positive, scale / (2.0 * xp.where(positive, root, xp.ones_like(root))),
                    xp.zeros_like(s))


def _operands(x, y, w=None):
    """(xp, x, y, w) checked: x (n, d), y (m, d), w (m,), y and w brought to x's dtype and device."""
    xp = namespace(x)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or x.shape[0] == 0:
        raise ValueError(f"kernel sums need points x (n, d) with n >= 1 and y (m, d) of the same d, "
                         f"got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    device = _device(x)
    y = y if y is x else _like(xp, y, x, device)
    if w is not None:
        w = _like(xp, w, x, device)
        if tuple(w.shape) != (y.shape[0],):
            raise ValueError(f"kernel sums need one weight per point of y: shape ({y.shape[0]},), "
                             f"got {tuple(w.shape)}")
    return xp, x, y, w


def _device(x):
    import array_api_compat

    return array_api_compat.device(x)


def _like(xp, array, x, device):
    if is_torch(x) and not is_torch(array):
        array = np.ascontiguousarray(array)
    return xp.asarray(array, dtype=x.dtype, device=device)


def _centred(xp, x, y):
    """x - c, y - c with c the centre of the bounding box of both sets (as ``centred_pair``)."""
    lo = xp.minimum(xp.min(x, axis=0), xp.min(y, axis=0))
    hi = xp.maximum(xp.max(x, axis=0), xp.max(y, axis=0))
    centre = lo + 0.5 * (hi - lo)
    return (x - centre, x - centre) if y is x else (x - centre, y - centre)


def _refine_below(xp, kernel: Kernel, x, y) -> float:
    """Squared distance under which pairs are recomputed from their differences: the kernel's
    rule on the float64 round-off bound of the lifted product, (d + 3) eps (max|x| + max|y|)^2
    (``kernels.lifted_roundoff``), in float32 too."""
    radius = float(xp.sqrt(xp.max(xp.sum(x * x, axis=1)))) + float(xp.sqrt(xp.max(xp.sum(y * y, axis=1))))
    return kernel._refine_below((x.shape[1] + 3) * EPS * radius**2)


def _distance_blocks(xp, kernel: Kernel, x, y, scale: float = 1.0):
    """(rows, block, near) per row block of centred x against y: block = scale |x_i - y_j|^2 by
    the lifted product, its near pairs (block rows, columns) recomputed from differences."""
    n, d = x.shape
    ones_x = xp.ones((n, 1), dtype=x.dtype, device=_device(x))
    ones_y = xp.ones((1, y.shape[0]), dtype=x.dtype, device=_device(x))
    lifted_x = xp.concat([x, xp.sum(x * x, axis=1)[:, None], ones_x], axis=1)
    lifted_y = scale * xp.concat([-2.0 * y.T, ones_y, xp.sum(y * y, axis=1)[None, :]], axis=0)
    limit = scale * _refine_below(xp, kernel, x, y)
    step = block_rows(x, y.shape[0])
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        block = xp.matmul(lifted_x[rows], lifted_y)
        near = xp.nonzero(block > limit if scale < 0 else block < limit) if limit != 0 else None
        if near is not None and near[0].shape[0]:
            difference = x[rows][near[0]] - y[near[1]]
            block[near] = scale * xp.sum(difference * difference, axis=1)
        else:
            near = None
        yield rows, block, near


def generic_apply(kernel: Kernel, x, y, w):
    """sum_j k(x_i, y_j) w_j: (n,), blocked, in the array type and on the device of x."""
    xp, x, y, w = _operands(x, y, w)
    profile = _profiles(kernel)
    out = xp.empty((x.shape[0],), dtype=x.dtype, device=_device(x))
    for rows, block, _ in _distance_blocks(xp, kernel, *_centred(xp, x, y), profile.scale):
        out[rows] = xp.matmul(profile.value(xp, block), w)
    return out


def generic_matrix(kernel: Kernel, x, y):
    """The Gram matrix k(x_i, y_j): (n, m), in the array type and on the device of x."""
    xp, x, y, _ = _operands(x, y)
    profile = _profiles(kernel)
    out = xp.empty((x.shape[0], y.shape[0]), dtype=x.dtype, device=_device(x))
    for rows, block, _ in _distance_blocks(xp, kernel, *_centred(xp, x, y), profile.scale):
        out[rows] = profile.value(xp, block)
    return out


def generic_grad_sum(kernel: Kernel, x, y, w):
    """sum_j w_j grad_x k(x_i, y_j) = 2 [x_i (D w)_i - D (w y)]_i, D = phi'(|x_i - y_j|^2): (n, d).

    Per block one product D [w, w y]; the near pairs (where that difference cancels to
    round-off) are summed from their differences w_j phi'(s_ij) (x_i - y_j) instead."""
    xp, x, y, w = _operands(x, y, w)
    profile = _profiles(kernel)
    x, y = _centred(xp, x, y)
    columns = xp.concat([w[:, None], w[:, None] * y], axis=1)  # (m, d + 1)
    out = xp.zeros(x.shape, dtype=x.dtype, device=_device(x))
    for rows, block, near in _distance_blocks(xp, kernel, x, y, profile.scale):
        derivative = profile.derivative(xp, block)
        if near is not None:
            at = near[0] + rows.start
            terms = (derivative[near] * w[near[1]])[:, None] * (x[at] - y[near[1]])
            derivative[near] = 0.0
            _scatter_add(out, at, terms)
        sums = xp.matmul(derivative, columns)
        out[rows] += x[rows] * sums[:, :1] - sums[:, 1:]
    return (2.0 * profile.factor) * out


def _scatter_add(out, rows, terms) -> None:
    """out[rows[k]] += terms[k], repeated rows accumulated (not in the array API standard)."""
    if is_torch(out):
        out.index_add_(0, rows, terms)
    else:
        np.add.at(out, rows, terms)


@dataclass(frozen=True, eq=False)
class DeviceKernel(Kernel):
    """``kernel`` with its sums on a PyTorch ``backend``: NumPy arrays in, NumPy float64 out
    (tensors in, tensors on the backend's device out). Made by ``on_device``."""

    kernel: Kernel
    backend: Backend

    def __post_init__(self):
        if not isinstance(self.kernel, Kernel) or isinstance(self.kernel, DeviceKernel):
            raise ValueError(f"on_device needs a kernel such as jk.Gaussian(1.0), got {self.kernel!r}")
        _profiles(self.kernel)  # refuses kernels without array-API profiles now, not in a step
        object.__setattr__(self, "_uploads", {})
        object.__setattr__(self, "_lock", threading.Lock())

    def __getstate__(self):  # pickled (copied to workers) without its uploads and lock
        return {"kernel": self.kernel, "backend": self.backend}

    def __setstate__(self, state):
        for name, value in state.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_uploads", {})
        object.__setattr__(self, "_lock", threading.Lock())

    def __eq__(self, other):
        return isinstance(other, DeviceKernel) and (self.kernel, self.backend) == (
            other.kernel, other.backend)

    def __hash__(self):
        return hash((self.kernel, self.backend))

    @property
    def positive_definite(self) -> bool:
        return self.kernel.positive_definite

    def profile(self, s):
        return self.kernel.profile(s)

    def profile_derivative(self, s):
        return self.kernel.profile_derivative(s)

    def _refine_below(self, roundoff):
        return self.kernel._refine_below(roundoff)

    def __call__(self, x, y):
        return self._run(generic_matrix, x, y)

    def apply(self, x, y, w):
        return self._run(_by_keops(keops.apply) if self.backend.keops else generic_apply, x, y, w)

    def grad_sum(self, x, y, w):
        return self._run(_by_keops(keops.grad_sum) if self.backend.keops else generic_grad_sum, x, y, w)

    def _run(self, sum_, x, *rest):
        result = sum_(self.kernel, *(self._upload(a) for a in (x, *rest)))
        return result if is_torch(x) else to_numpy(result)

    def _upload(self, array):
        """The array on the backend; frozen arrays (measures' points) are uploaded once and
        kept (UPLOAD_SLOTS, oldest dropped), keyed by identity and holding the array."""
        if is_torch(array) or not (isinstance(array, np.ndarray) and _is_frozen_here(array)):
            return self.backend.asarray(array if is_torch(array) else np.asarray(array, dtype=float))
        kept = self._uploads.get(id(array))
        if kept is not None and kept[0] is array:
            return kept[1]
        tensor = self.backend.asarray(array)
        with self._lock:
            self._uploads[id(array)] = (array, tensor)
            while len(self._uploads) > UPLOAD_SLOTS:
                del self._uploads[next(iter(self._uploads))]
        return tensor


def _by_keops(sum_):
    """``sum_`` of ``jko_ift.keops`` on operands checked and brought to x's device and dtype."""
    def checked(kernel, x, y, w):
        _, x, y, w = _operands(x, y, w)
        return sum_(kernel, x, y, w)
    return checked


def _use_keops(kernel: Kernel, device: str, wanted: bool | None) -> bool:
    """Whether a device kernel sums by KeOps: by default where it is installed, on CUDA, for
    the kernels it has formulas for; ``wanted=True`` insists (ValueError where it cannot)."""
    if wanted is None:
        return device.startswith("cuda") and keops.installed() and keops.supports(kernel)
    if wanted and not keops.installed():
        raise ValueError(f"keops=True asked for KeOps, which is not installed; {keops.INSTALL_HINT}, "
                         "or pass keops=None (use it where installed)")
    if wanted and not keops.supports(kernel):
        raise ValueError(f"keops=True: KeOps formulas exist for jk.Gaussian and jk.IMQ, got {kernel!r}; "
                         "pass keops=None for the blocked sums")
    return bool(wanted)


def on_device(kernel: Kernel, device: str = "cpu", dtype: str = "float64",
              keops: bool | None = None) -> DeviceKernel:
    """``kernel`` with its blocked sums on PyTorch ``device`` in ``dtype``.

    Parameters
    ----------
    kernel : Kernel
        jk.Gaussian, jk.IMQ, jk.Laplace or jk.EnergyKernel.
    device : str, default "cpu"
        "cpu", "cuda" or "cuda:<index>".
    dtype : {"float64", "float32"}, default "float64"
        The precision of the sums; NumPy results are float64 either way.
    keops : bool, optional
        Sum a Gaussian or IMQ kernel's ``apply`` and ``grad_sum`` with KeOps (``pykeops``, the
        ``keops`` extra). By default it is used where it is installed and ``device`` is CUDA;
        True insists (on CPU too: it compiles C++), False never uses it. The Gram matrix is
        always the blocked path's.

    Returns
    -------
    DeviceKernel
        A kernel for jk.MMD2, jk.MMD, jk.IFT: every method summing it runs its sums there.

    Raises
    ------
    ValueError
        Without PyTorch, for CUDA without a GPU, a kernel with no array-API profile, or
        ``keops=True`` without pykeops or for a kernel it has no formula for.

    Warns
    -----
    UserWarning
        For float32: the certificates of implicit steps computed from its sums do not bound
        errors below its precision (``FLOAT32_CERTIFICATES``).

    Examples
    --------
    >>> k = on_device(jk.Gaussian(10.0), "cpu")          # doctest: +SKIP
    >>> F = jk.MMD2(target, k)                            # doctest: +SKIP
    """
    if not isinstance(kernel, Kernel) or isinstance(kernel, DeviceKernel):
        raise ValueError(f"on_device needs a kernel such as jk.Gaussian(1.0), got {kernel!r}")
    made = DeviceKernel(kernel, Backend(device, dtype, _use_keops(kernel, device, keops)))
    if dtype == "float32":
        warnings.warn(FLOAT32_CERTIFICATES, UserWarning, stacklevel=2)
    return made


def kernels_on(problem, array_type: ArrayType):
    """``problem`` (an energy, a geometry, or a tuple of them) with each plain kernel it holds
    summed where ``array_type`` says: ``on_device(kernel, device, dtype)``, float32 for float32
    tensors and float64 otherwise. Kernels already on a device, kernels without an array-API
    profile and the measures inside (targets) are left as they are.

    This is how a measure made from tensors chooses the backend: ``jk.solve`` and
    ``jk.jko_step`` call it on their energy and geometry."""
    dtype = "float32" if array_type.dtype == "float32" else "float64"
    made: dict[int, DeviceKernel] = {}  # one device kernel (shared uploads) per kernel object

    def moved(kernel: Kernel) -> Kernel:
        try:
            _profiles(kernel)
        except ValueError:
            return kernel
        if id(kernel) not in made:
            keops_sums = _use_keops(kernel, array_type.device, None)
            made[id(kernel)] = DeviceKernel(kernel, Backend(array_type.device, dtype, keops_sums))
        return made[id(kernel)]

    def walk(obj):
        if isinstance(obj, DeviceKernel) or isinstance(obj, Measure):
            return obj
        if isinstance(obj, Kernel):
            return moved(obj)
        if isinstance(obj, (list, tuple)):
            items = [walk(item) for item in obj]
            unchanged = all(new is old for new, old in zip(items, obj, strict=True))
            return obj if unchanged else type(obj)(items)
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            changes = {f.name: new for f in dataclasses.fields(obj)
                       for new in [walk(getattr(obj, f.name))] if new is not getattr(obj, f.name)}
            if not changes:
                return obj
            # a copy with the fields set, not a new construction: some classes (jk.IFT, jk.WFR)
            # take other arguments than their fields; what __post_init__ derived stays valid,
            # the device kernel being the same kernel
            changed = copy.copy(obj)
            for name, value in changes.items():
                object.__setattr__(changed, name, value)
            return changed
        return obj

    moved_problem = walk(problem)
    if made and dtype == "float32":
        warnings.warn(FLOAT32_CERTIFICATES.replace("on_device(..., dtype='float32')", "float32 tensors"),
                      UserWarning, stacklevel=3)
    return moved_problem
