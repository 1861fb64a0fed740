"""Translation invariance of the kernel sums, MMD, the witness gradient and one JKO step.

Shifting every point by s changes nothing mathematically; in float64 the shifted inputs x + s
are rounded to eps |s|, so results may move by the inputs' own precision, eps |s| / spread
relative (in units of the bandwidth, which the tests set to the data's spread), and by the
kernel sums' own round-off bound ``kernels.MAX_ROUNDOFF`` -- not more. Before the sums were
centred, a shift of 1e8 moved jk.mmd by 40 % (issue 13, finding 1).
"""

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jko_ift as jk
from jko_ift import kernels

EPS = np.finfo(float).eps

#: Input-precision factor: each coordinate is rounded twice (x + s, then the centring), a
#: distance involves two points in d <= 3 coordinates, and the profiles are 1-Lipschitz in
#: units of the bandwidth (Gaussian e^-1/2, IMQ 0.39, Laplace and EnergyKernel 1): 2 * 2 * 3 = 12,
#: doubled for the summation order.
INPUT_FACTOR = 24.0

#: Each kernel value of either computation errs by at most MAX_ROUNDOFF relative (kernels.py);
#: the sum of two such errors plus the summation's eps per term.
COMPUTE_FACTOR = 2.0


def tolerance(shift: float, spread: float, terms: int) -> float:
    """Relative tolerance of a kernel sum (relative to sum |w| max |k|) after a shift."""
    return (INPUT_FACTOR * EPS * (1.0 + shift / spread) + COMPUTE_FACTOR * kernels.MAX_ROUNDOFF
            + terms * EPS)


def scaled_kernels(spread: float):
    """The four kernels with their bandwidth at the data's spread, and max |k| on the data."""
    return [(jk.Gaussian(spread), 1.0), (jk.IMQ(spread), 1.0 / spread),
            (jk.Laplace(spread), 1.0), (jk.EnergyKernel(), 4.0 * spread)]


@st.composite
def shifted_problem(draw):
    """Points of spread ``spread`` in d <= 3, positive weights, and a shift up to 1e8 spread."""
    d = draw(st.integers(1, 3))
    n, m = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    unit = st.floats(-1.0, 1.0, allow_nan=False)
    x = draw(hnp.arrays(float, (n, d), elements=unit))
    y = draw(hnp.arrays(float, (m, d), elements=unit))
    w = draw(hnp.arrays(float, (m,), elements=st.floats(0.01, 1.0)))
    spread = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    exponent = draw(st.floats(0.0, 8.0))
    direction = draw(hnp.arrays(float, (d,), elements=unit))
    shift = spread * 10.0**exponent * direction
    return spread * x, spread * y, w, spread, shift


@settings(max_examples=60, deadline=None)
@given(shifted_problem())
def test_kernel_sums_are_translation_invariant(problem):
    x, y, w, spread, shift = problem
    size = float(np.abs(shift).max())
    for kernel, largest in scaled_kernels(spread):
        reference = kernel.apply(x, y, w)
        shifted = kernel.apply(x + shift, y + shift, w)
        scale = w.sum() * largest
        assert np.abs(shifted - reference).max() <= tolerance(size, spread, y.shape[0]) * scale, kernel


@settings(max_examples=60, deadline=None)
@given(shifted_problem())
def test_mmd_is_translation_invariant(problem):
    x, y, w, spread, shift = problem
    a = np.ones(x.shape[0]) / x.shape[0]
    size = float(np.abs(shift).max())
    for kernel, largest in scaled_kernels(spread):
        mu, nu = jk.Measure(x, a), jk.Measure(y, w)
        moved = jk.Measure(x + shift, a), jk.Measure(y + shift, w)
        reference = jk.mmd(mu, nu, kernel, squared=True)
        shifted = jk.mmd(*moved, kernel, squared=True)
        scale = (a.sum() + w.sum()) ** 2 * largest  # |(a, -b)^T K (a, -b)| <= (sum a + sum b)^2 max|k|
        terms = x.shape[0] + y.shape[0]
        assert abs(shifted - reference) <= 4 * tolerance(size, spread, terms) * scale, kernel


@settings(max_examples=60, deadline=None)
@given(shifted_problem())
def test_witness_gradient_is_translation_invariant(problem):
    """grad f = K'(mu - pi) for the smooth kernels (Laplace and EnergyKernel have gradients
    that jump at coincident points, where no tolerance in the inputs' precision holds)."""
    x, y, w, spread, shift = problem
    a = np.ones(x.shape[0]) / x.shape[0]
    size = float(np.abs(shift).max())
    for kernel, largest in scaled_kernels(spread)[:2]:
        F = jk.MMD2(jk.Measure(y, w / w.sum()), kernel)
        moved = jk.MMD2(jk.Measure(y + shift, w / w.sum()), kernel)
        reference = F.grad_first_variation(jk.Measure(x, a))
        shifted = moved.grad_first_variation(jk.Measure(x + shift, a))
        scale = 2.0 * largest / spread  # |grad k| <= max|k| / bandwidth, two measures of mass 1
        terms = x.shape[0] + y.shape[0]
        assert np.abs(shifted - reference).max() <= 4 * tolerance(size, spread, terms) * scale, kernel


#: A shift of 1e8 times the data's spread: the inputs keep eps * 1e8 = 2.2e-8 relative.
STEP_SHIFT = 1e8

#: One JKO step amplifies the inputs' precision by its conditioning: measured 0.06 to 0.16
#: times eps * STEP_SHIFT for these five methods (energies 0.1385 to 0.1434, tau = 0.1); 4 leaves
#: room for other BLAS builds, and stays 1e6 times under the 40 % of the uncentred sums.
STEP_CONDITION = 4.0


def _small_ift_problem(shift: float):
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(12, 2)), rng.normal(size=(12, 2)) + 0.7
    a = np.full(12, 1.0 / 12)
    kernel = jk.Gaussian(1.0)
    return jk.MMD2(jk.Measure(y + shift, a), kernel), jk.IFT(kernel, 1.0, 1.0), jk.Measure(x + shift, a)


@pytest.mark.parametrize("method", [jk.ConicJKO(), jk.EntropicJKO(eps=1e-2), jk.ParticleJKO(),
                                    jk.Splitting(order=1), jk.ExplicitEuler()],
                         ids=lambda m: type(m).__name__)
def test_one_step_is_translation_invariant(method):
    """Uncentred, a shift of 1e8 made ConicJKO refuse the Gaussian ("only conditionally
    positive definite"), EntropicJKO raise a LinAlgError, the particle methods fail their
    tolerance, and ExplicitEuler reach energy 228 instead of 0.139."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # regime warnings are the same at both places
        reference = jk.jko_step(*_small_ift_problem(0.0), 0.1, method=method)
        shifted = jk.jko_step(*_small_ift_problem(STEP_SHIFT), 0.1, method=method)
    assert shifted.status == reference.status
    tol = STEP_CONDITION * EPS * STEP_SHIFT
    assert shifted.energy == pytest.approx(reference.energy, rel=tol)
    assert shifted.objective == pytest.approx(reference.objective, rel=tol)
    np.testing.assert_allclose(shifted.measure.points - STEP_SHIFT, reference.measure.points,
                               atol=tol * 10)  # points of spread ~3: tol relative to it
