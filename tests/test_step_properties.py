"""Properties every step must have, over generated supports, weights and tau, for every
geometry x method pair that applies: a correct result (weights finite and >= 0, the mass kept
where the geometry keeps it, the discrete dissipation inequality of the JKO step) or a clear
error (``jk.SolverError`` with a message). The examples are derandomized, so that the suite is
reproducible; ``-m slow`` runs more of them."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jko_ift as jk
from jko_ift.diagnostics import dissipation_slack
from jko_ift.solve import DISSIPATION_RTOL

KERNEL = jk.Gaussian(0.7)

#: A step keeps the mass of mu to the accuracy its solver certifies (Clarabel, Sinkhorn
#: marginals and the particle weight QP all resolve 1e-7 relative or better).
MASS_RTOL = 1e-6

GRID_PAIRS = [(jk.ConicJKO, g) for g in ("W2", "He", "MMD", "WFR", "IFT")] + \
             [(lambda: jk.EntropicJKO(eps=5e-2), g) for g in ("W2", "IFT")]
PARTICLE_PAIRS = [(m, g) for m in (jk.ParticleJKO, jk.Splitting) for g in ("W2", "WFR", "IFT")]


def geometry(name: str, conserve_mass: bool):
    return {"W2": lambda: jk.Wasserstein(),
            "He": lambda: jk.Hellinger(conserve_mass=conserve_mass),
            "MMD": lambda: jk.MMD(KERNEL, conserve_mass=conserve_mass),
            "WFR": lambda: jk.WFR(1.0, 1.0, conserve_mass=conserve_mass),
            "IFT": lambda: jk.IFT(KERNEL, 1.0, 1.0, conserve_mass=conserve_mass)}[name]()


def energy(target):
    return jk.MMD2(target, KERNEL) + 0.3 * jk.Potential(lambda x: 0.5 * (x**2).sum(1), lambda x: x)


weights_of = st.lists(st.floats(0.05, 1.0), min_size=8, max_size=8).map(lambda w: np.array(w) / sum(w))
taus = st.floats(0.02, 1.0)


def check_step(F, g, mu, tau, method):
    try:
        result = jk.jko_step(F, g, mu, tau, method=method)
    except jk.SolverError as error:  # a clear error is an allowed outcome
        assert str(error) and error.status != "optimal"
        return
    new = result.measure.weights
    assert np.all(np.isfinite(new)) and np.all(new >= 0)
    if g.conserve_mass or isinstance(g, jk.Wasserstein):
        assert new.sum() == pytest.approx(mu.mass, rel=MASS_RTOL)
    # the inequality holds for what the step minimizes (entropic: with its term, in info)
    slack = dissipation_slack(F, mu, result.info.get("regularized_objective", result.objective))
    assert slack >= -DISSIPATION_RTOL * max(1.0, abs(F.value(mu)))


def fixed_support_step(make_method, name, conserve_mass, start, target, tau):
    grid = jk.Grid([-2.0], [2.0], [8])
    F = energy(grid.measure(target, normalize=True))
    check_step(F, geometry(name, conserve_mass), grid.measure(start, normalize=True), tau, make_method())


def particle_step(make_method, name, conserve_mass, start, target, tau, points):
    x = np.array(points)[:, None]
    F = energy(jk.Measure(np.linspace(-1.0, 1.0, 8)[:, None], target))
    check_step(F, geometry(name, conserve_mass), jk.Measure(x, start), tau, make_method())


points_of = st.lists(st.floats(-2.0, 2.0), min_size=8, max_size=8, unique=True)
#: The regimes these steps may enter are reported by their own warnings (tested elsewhere).
CLIPPING = "ignore::jko_ift.WeightClippingWarning"
LOCKING = "ignore::jko_ift.GridLockingWarning"
BOTH_VARIANTS = pytest.mark.parametrize("conserve_mass", [False, True], ids=["M+", "spherical"])
ON_GRIDS = pytest.mark.parametrize(("make_method", "name"), GRID_PAIRS,
                                   ids=[f"grid-{i}-{g}" for i, (_, g) in enumerate(GRID_PAIRS)])
ON_PARTICLES = pytest.mark.parametrize(("make_method", "name"), PARTICLE_PAIRS,
                                       ids=[f"{m.__name__}-{g}" for m, g in PARTICLE_PAIRS])


@pytest.mark.filterwarnings(CLIPPING, LOCKING)
@BOTH_VARIANTS
@ON_GRIDS
@settings(derandomize=True, max_examples=4, deadline=None)
@given(start=weights_of, target=weights_of, tau=taus)
def test_fixed_support_steps(make_method, name, conserve_mass, start, target, tau):
    fixed_support_step(make_method, name, conserve_mass, start, target, tau)


@pytest.mark.filterwarnings(CLIPPING, LOCKING)
@BOTH_VARIANTS
@ON_PARTICLES
@settings(derandomize=True, max_examples=4, deadline=None)
@given(start=weights_of, target=weights_of, tau=taus, points=points_of)
def test_particle_steps(make_method, name, conserve_mass, start, target, tau, points):
    particle_step(make_method, name, conserve_mass, start, target, tau, points)


@pytest.mark.slow
@pytest.mark.filterwarnings(CLIPPING, LOCKING)
@BOTH_VARIANTS
@ON_GRIDS
@settings(max_examples=40, deadline=None)
@given(start=weights_of, target=weights_of, tau=taus)
def test_fixed_support_steps_many(make_method, name, conserve_mass, start, target, tau):
    fixed_support_step(make_method, name, conserve_mass, start, target, tau)


@pytest.mark.slow
@pytest.mark.filterwarnings(CLIPPING, LOCKING)
@BOTH_VARIANTS
@ON_PARTICLES
@settings(max_examples=40, deadline=None)
@given(start=weights_of, target=weights_of, tau=taus, points=points_of)
def test_particle_steps_many(make_method, name, conserve_mass, start, target, tau, points):
    particle_step(make_method, name, conserve_mass, start, target, tau, points)


#: Forward Euler's steps: small enough to sit within its stability limit tau |F''| < 2 on these
#: problems (kernel width 0.7, unit weights), where the status is "explicit".
explicit_taus = st.floats(0.002, 0.03)
EXPLICIT_GEOMETRIES = pytest.mark.parametrize("name", ["W2", "He", "MMD", "WFR", "IFT"])


def explicit_step(name, conserve_mass, start, target, tau, points):
    """ExplicitEuler: the energy does not rise, the mass is kept where the geometry keeps it,
    and the weights stay nonnegative (finite everywhere); past the stability limit a clear
    error ("unstable") is the allowed outcome."""
    x = np.array(points)[:, None]
    F = energy(jk.Measure(np.linspace(-1.0, 1.0, 8)[:, None], target))
    g, mu = geometry(name, conserve_mass), jk.Measure(x, start)
    try:
        result = jk.jko_step(F, g, mu, tau, method=jk.ExplicitEuler())
    except jk.SolverError as error:
        assert error.status == "unstable" and str(error)
        return
    assert result.status == "explicit" and result.certificate == 0
    new = result.measure
    assert np.all(np.isfinite(new.points)) and np.all(np.isfinite(new.weights))
    assert np.all(new.weights >= 0)
    if g.conserve_mass or isinstance(g, jk.Wasserstein):
        assert new.mass == pytest.approx(mu.mass, rel=MASS_RTOL)
    start_energy = F.value(mu)
    assert F.value(new) <= start_energy + 1e-12 * max(1.0, abs(start_energy))


@pytest.mark.filterwarnings(CLIPPING)
@BOTH_VARIANTS
@EXPLICIT_GEOMETRIES
@settings(derandomize=True, max_examples=4, deadline=None)
@given(start=weights_of, target=weights_of, tau=explicit_taus, points=points_of)
def test_explicit_steps(name, conserve_mass, start, target, tau, points):
    explicit_step(name, conserve_mass, start, target, tau, points)


@pytest.mark.slow
@pytest.mark.filterwarnings(CLIPPING)
@BOTH_VARIANTS
@EXPLICIT_GEOMETRIES
@settings(max_examples=40, deadline=None)
@given(start=weights_of, target=weights_of, tau=explicit_taus, points=points_of)
def test_explicit_steps_many(name, conserve_mass, start, target, tau, points):
    explicit_step(name, conserve_mass, start, target, tau, points)
