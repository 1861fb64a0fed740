"""A new energy and a new reaction geometry, defined here only, run through every method.

The energy is one class (value, first variation, its gradient, its normal form in the weights
and its first variation at other points); the geometry is one class (its squared distance on
weights and its metric). No method knows either by name: each reads what they state
(``Energy.form``, ``ReactionGeometry.metric_parts``, ...). Every step is checked against a
closed form or against the same step of an equivalent built-in piece.
"""

import ast
import pathlib
from dataclasses import dataclass

import numpy as np
import pytest

import jko_ift as jk
from jko_ift.energies import Energy, WeightForm
from jko_ift.geometries import InfConvolution, ReactionGeometry

#: Clarabel certifies the conic steps to a relative gap of 1e-8 (tau >= 0.05): weights to ~1e-7.
CONIC_RTOL = 1e-6
#: ParticleJKO and Splitting stop at a relative stationarity of 1e-10 of the step objective:
#: positions within ~1e-6 of the exact proximal point.
PARTICLE_ATOL = 1e-6
#: The exact weight QP and the Hellinger Newton solve are certified to 1e-12 relative.
WEIGHT_RTOL = 1e-9
#: The entropic step differs from the exact one by its blur (eps = 1e-3 on a grid of spacing
#: 0.13, tau = 0.1): weights within a few per cent, objectives within 1e-2 relative.
ENTROPIC_OBJECTIVE_RTOL = 1e-2

TAU = 0.1


@dataclass(frozen=True)
class Harmonic(Energy):
    """F(mu) = k/2 sum_i a_i |x_i - m|^2; f = k |x - m|^2 / 2, grad f = k (x - m)."""

    stiffness: float = 1.0
    centre: float = 0.3

    def _potential(self, x):
        return 0.5 * self.stiffness * np.sum((x - self.centre) ** 2, axis=1)

    def value(self, mu):
        return float(mu.weights @ self._potential(mu.points))

    def first_variation(self, mu):
        return self._potential(mu.points)

    def grad_first_variation(self, mu):
        return self.stiffness * (mu.points - self.centre)

    def form(self, mu, grams=None):
        return WeightForm(mu.n, offset=self._potential(mu.points))  # linear in the weights

    def first_variation_at(self, mu, z, gradient=False):
        return self.stiffness * (z - self.centre) if gradient else self._potential(z)


@dataclass(frozen=True)
class DiagonalReaction(ReactionGeometry):
    """R^2(a, b) = sum_i w(x_i) (a_i - b_i)^2 with w(x) = 1 + |x|^2 / 2: a diagonal metric.

    Its flow is d_t a = -f / w; a step of a linear energy is b = max(a - tau f / w, 0)."""

    conserve_mass: bool = False
    quadratic = True

    @staticmethod
    def _w(points):
        return 1.0 + 0.5 * np.sum(points**2, axis=1)

    def weight_distance_sq(self, points, a, b):
        return float(self._w(points) @ (a - b) ** 2)

    def metric_parts(self, points, grams=None):
        return np.diag(self._w(points)), 0.0

    def position_force(self, y, a, b):
        return 0.5 * ((a - b) ** 2)[:, None] * y  # 1/2 grad_y sum w(y_i) (a_i - b_i)^2


def grid_measure():
    grid = jk.Grid([-2.0], [2.0], [30])
    return grid.measure(lambda x: np.exp(-((x[:, 0] - 0.4) ** 2)), normalize=True)


def particles():
    rng = np.random.default_rng(3)
    return jk.Measure(rng.normal(size=(12, 2)), rng.uniform(0.5, 1.5, 12) / 12)


def reaction_closed_form(mu, tau):
    """The step of the Harmonic energy under DiagonalReaction: separable, b = (a - tau f / w)_+."""
    f = Harmonic().first_variation(mu)
    return np.maximum(mu.weights - tau * f / DiagonalReaction._w(mu.points), 0.0)


def hellinger_closed_form(mu, tau):
    """The Hellinger step of a linear energy: V + (2 / tau)(1 - sqrt(a / b)) = 0."""
    return mu.weights / (1 + tau * Harmonic().first_variation(mu) / 2) ** 2


# ---------------------------------------------------------------------------------------------
# The new reaction geometry: every method's pure reaction step against the closed form
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", [jk.ConicJKO(), jk.EntropicJKO(eps=1e-3)], ids=["conic", "entropic"])
def test_fixed_support_methods_take_the_new_reaction(method):
    mu = grid_measure()
    result = method.step(Harmonic(), DiagonalReaction(), mu, TAU)
    np.testing.assert_allclose(result.measure.weights, reaction_closed_form(mu, TAU),
                               rtol=CONIC_RTOL, atol=CONIC_RTOL * mu.weights.max())


@pytest.mark.parametrize("method", [jk.ParticleJKO(tol=1e-12), jk.Splitting(tol=1e-12), jk.ExplicitEuler()],
                         ids=["particle", "splitting", "explicit"])
def test_particle_methods_take_the_new_reaction(method):
    """For a linear energy the exact step and the forward (G-projected) step coincide."""
    mu = particles()
    result = method.step(Harmonic(), DiagonalReaction(), mu, TAU)
    np.testing.assert_allclose(result.measure.points, mu.points)
    np.testing.assert_allclose(result.measure.weights, reaction_closed_form(mu, TAU),
                               rtol=WEIGHT_RTOL, atol=WEIGHT_RTOL * mu.weights.max())
    assert result.distance_sq == pytest.approx(
        DiagonalReaction().weight_distance_sq(mu.points, mu.weights, result.measure.weights),
        rel=1e-12)


def test_inf_convolution_with_the_new_reaction_conic_against_entropic():
    """W2 inf-convolved with the diagonal reaction on a grid: the entropic step (MMD envelope of
    the metric) against the exact conic step."""
    mu = grid_measure()
    geometry = InfConvolution(DiagonalReaction(), alpha=1.0, beta=1.0)
    exact = jk.ConicJKO().step(Harmonic(), geometry, mu, TAU)
    entropic = jk.EntropicJKO(eps=1e-3).step(Harmonic(), geometry, mu, TAU)
    assert exact.ok and entropic.ok
    start = Harmonic().value(mu)
    assert exact.objective <= start  # no worse than not moving
    assert entropic.objective == pytest.approx(exact.objective, rel=ENTROPIC_OBJECTIVE_RTOL)


@pytest.mark.parametrize("method", [jk.ParticleJKO(tol=1e-12), jk.Splitting(tol=1e-12), jk.ExplicitEuler()],
                         ids=["particle", "splitting", "explicit"])
def test_particle_methods_take_the_new_reaction_inside_an_inf_convolution(method):
    """Positions move by the Harmonic force, weights by the diagonal reaction. Splitting (order
    1): the implicit transport, then the closed-form reaction at the new points; ExplicitEuler:
    both parts at mu^k; the joint ParticleJKO step: at its points y the weights are the exact
    reaction step (b = (a - tau f(y) / w(y))_+ minimizes the step objective for fixed y), the
    metric's force pulls y off the pure transport step, and the step dissipates."""
    mu = particles()
    geometry = InfConvolution(DiagonalReaction(), alpha=1.0, beta=1.0)
    tau = 0.01
    result = method.step(Harmonic(), geometry, mu, tau)
    assert result.ok
    moved = result.measure
    if isinstance(method, jk.ExplicitEuler):
        expected_points = mu.points - tau * (mu.points - 0.3)
        expected = reaction_closed_form(mu, tau)  # all parts at mu^k
    elif isinstance(method, jk.Splitting):
        expected_points = (mu.points + tau * 0.3) / (1 + tau)  # implicit Euler of x' = -(x - m)
        expected = reaction_closed_form(jk.Measure(expected_points, mu.weights), tau)
    else:
        expected_points = moved.points
        expected = reaction_closed_form(jk.Measure(moved.points, mu.weights), tau)
        assert not np.allclose(moved.points, (mu.points + tau * 0.3) / (1 + tau), atol=1e-4)
    np.testing.assert_allclose(moved.points, expected_points, atol=PARTICLE_ATOL)
    np.testing.assert_allclose(moved.weights, expected, rtol=1e-6)
    assert result.objective <= Harmonic().value(mu) + 1e-12


# ---------------------------------------------------------------------------------------------
# The new energy under the library's geometries
# ---------------------------------------------------------------------------------------------

def equivalent_potential():
    return jk.Potential(lambda x: Harmonic()._potential(x), lambda x: Harmonic().grad_first_variation(
        jk.Measure(x, np.ones(len(x)))))


@pytest.mark.parametrize("method", [jk.ConicJKO(), jk.EntropicJKO(eps=1e-3)], ids=["conic", "entropic"])
def test_new_energy_hellinger_step_matches_the_closed_form(method):
    """Within the step's certified error bound (docs/conic.md §8), 1 % slack for the bound."""
    mu = grid_measure()
    result = method.step(Harmonic(), jk.Hellinger(), mu, TAU)
    expected = hellinger_closed_form(mu, TAU)
    hellinger = 2 * np.sqrt(np.sum((np.sqrt(result.measure.weights) - np.sqrt(expected)) ** 2))
    assert hellinger <= 1.01 * result.info["error_bound"]
    np.testing.assert_allclose(result.measure.weights, expected, rtol=1e-3)


@pytest.mark.parametrize(("method", "geometry"), [
    (jk.ConicJKO(), jk.Wasserstein()), (jk.ConicJKO(), jk.WFR(1.0, 1.0)),
    (jk.ConicJKO(), jk.IFT(jk.Gaussian(0.5))),
    (jk.EntropicJKO(eps=1e-2), jk.Wasserstein()), (jk.EntropicJKO(eps=1e-2), jk.WFR(1.0, 1.0))],
    ids=["conic-W2", "conic-WFR", "conic-IFT", "entropic-W2", "entropic-WFR"])
def test_new_energy_on_a_grid_equals_the_builtin_potential(method, geometry):
    """Entropy + Harmonic against Entropy + the same jk.Potential: the methods read the form."""
    mu = grid_measure()
    energy, builtin = jk.Entropy() + Harmonic(), jk.Entropy() + equivalent_potential()
    new = method.step(energy, geometry, mu, TAU)
    reference = method.step(builtin, geometry, mu, TAU)
    np.testing.assert_allclose(new.measure.weights, reference.measure.weights, rtol=1e-6,
                               atol=1e-9 * mu.weights.max())
    assert new.objective == pytest.approx(reference.objective, rel=1e-8)


@pytest.mark.parametrize("method", [jk.ParticleJKO(tol=1e-12), jk.Splitting(tol=1e-12), jk.ExplicitEuler()],
                         ids=["particle", "splitting", "explicit"])
def test_new_energy_w2_particle_steps_match_the_closed_form(method):
    """x' = -k (x - m): implicit Euler x / (1 + tau k) about m; explicit x - tau k (x - m)."""
    mu = particles()
    result = method.step(Harmonic(), jk.Wasserstein(), mu, TAU)
    centre = 0.3
    if isinstance(method, jk.ExplicitEuler):
        expected = mu.points - TAU * (mu.points - centre)
    else:
        expected = centre + (mu.points - centre) / (1 + TAU)
    np.testing.assert_allclose(result.measure.points, expected, atol=PARTICLE_ATOL)


def test_new_energy_with_noise_injection_reads_its_first_variation_at_other_points():
    mu = particles()
    method = jk.ExplicitEuler(noise=0.1, seed=0)
    result = method.step(Harmonic(), jk.Wasserstein(), mu, TAU)
    noise = result.measure.points - (mu.points - TAU * (mu.points - 0.3))
    # the gradient k (x + noise - m) moves each point by tau times the noise (k = 1)
    assert 0 < np.abs(noise).max() < 1.0


@pytest.mark.parametrize("method", [jk.ParticleJKO(tol=1e-12), jk.Splitting(tol=1e-12)],
                         ids=["particle", "splitting"])
def test_new_energy_hellinger_particle_steps_match_the_closed_form(method):
    mu = particles()
    result = method.step(Harmonic(), jk.Hellinger(), mu, TAU)
    np.testing.assert_allclose(result.measure.weights, hellinger_closed_form(mu, TAU), rtol=WEIGHT_RTOL)


def test_a_non_quadratic_reaction_other_than_hellinger_is_refused_at_definition():
    """The methods have proximal maps for Hellinger's distance only: a reaction that changes
    it without a metric would otherwise be solved as Hellinger, silently."""
    with pytest.raises(TypeError, match="not quadratic"):
        @dataclass(frozen=True)
        class WeightedHellinger(jk.Hellinger):
            def weight_distance_sq(self, points, a, b):
                return 2.0 * super().weight_distance_sq(points, a, b)
    with pytest.raises(TypeError, match="metric_parts"):
        class Unknown(ReactionGeometry):
            quadratic = False


def test_energies_module_does_not_import_cvxpy():
    """The CVXPY translation lives in methods/conic.py: particle-only code needs no cvxpy."""
    source = pathlib.Path(jk.energies.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert "cvxpy" not in imported
