"""Kernel sums by KeOps, an optional accelerator of the PyTorch backend (never required).

KeOps (``pykeops``) compiles each reduction sum_j w_j phi(|x_i - y_j|^2) once into a kernel
that streams over j without storing a block of the matrix, which is what it is for on a GPU;
on CPU it compiles C++ (about 10 s per formula the first time, cached on disk afterwards) and
is no faster than the blocked BLAS path. Distances are summed from differences, so no
cancellation guard is needed. Formulas exist for the smooth profiles: ``Gaussian`` and ``IMQ``
(``Laplace`` and ``EnergyKernel`` are not differentiable at 0: their sums stay on the
blocked path).
"""

from __future__ import annotations

import importlib.util

from .kernels import IMQ, Gaussian, Kernel

INSTALL_HINT = 'install it with: pip install -e ".[keops]" (pykeops; a C++ compiler, and CUDA for GPUs)'


def installed() -> bool:
    """Whether pykeops can be imported (checked without importing it: its import prints)."""
    return importlib.util.find_spec("pykeops") is not None


def supports(kernel: Kernel) -> bool:
    """Whether KeOps formulas exist here for ``kernel``: Gaussian and IMQ."""
    return isinstance(kernel, (Gaussian, IMQ))


def _lazy(x, y):
    from pykeops.torch import LazyTensor

    return LazyTensor(x[:, None, :].contiguous()), LazyTensor(y[None, :, :].contiguous())


def _profile(kernel: Kernel, squared):
    """(phi(s), phi'(s)) as KeOps formulas of the symbolic squared distance s."""
    if isinstance(kernel, Gaussian):
        rate = 0.5 / kernel.sigma**2
        value = (-rate * squared).exp()
        return value, -rate * value
    root = (squared + kernel.c**2).rsqrt()  # IMQ: (c^2 + s)^(-1/2)
    return root, -0.5 * root * root * root


def apply(kernel: Kernel, x, y, w):
    """sum_j k(x_i, y_j) w_j for tensors x (n, d), y (m, d), w (m,) on one device: (n,)."""
    from pykeops.torch import LazyTensor

    xi, yj = _lazy(x, y)
    value, _ = _profile(kernel, xi.sqdist(yj))
    return (value * LazyTensor(w[None, :, None].contiguous())).sum(dim=1).reshape(-1)


def grad_sum(kernel: Kernel, x, y, w):
    """sum_j w_j grad_x k(x_i, y_j) = 2 sum_j w_j phi'(s_ij) (x_i - y_j): (n, d)."""
    from pykeops.torch import LazyTensor

    xi, yj = _lazy(x, y)
    _, derivative = _profile(kernel, xi.sqdist(yj))
    weighted = derivative * LazyTensor(w[None, :, None].contiguous())
    return 2.0 * (weighted * (xi - yj)).sum(dim=1)
