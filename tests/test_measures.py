"""Measures and grids: construction, validation, densities."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jko_ift as jk


def test_grid_is_cell_centred_with_cell_volume():
    grid = jk.Grid([0, 0], [1, 2], [4, 5])
    assert grid.points.shape == (20, 2)
    np.testing.assert_allclose(grid.spacing, [0.25, 0.4])
    assert grid.cell_volume == pytest.approx(0.1)
    np.testing.assert_allclose(grid.points[0], [0.125, 0.2])
    np.testing.assert_allclose(grid.points[-1], [0.875, 1.8])
    # C order: the last axis varies fastest, so reshape(shape) recovers the image
    np.testing.assert_allclose(grid.points[:, 0].reshape(grid.shape)[:, 0], [0.125, 0.375, 0.625, 0.875])


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_grid_measure_integrates_the_density(dim):
    grid = jk.Grid([-1] * dim, [1] * dim, [6] * dim)
    mu = grid.measure(lambda x: np.ones(len(x)))
    assert mu.mass == pytest.approx(2.0**dim)  # volume of the box
    assert mu.cell_volume == pytest.approx(grid.cell_volume)
    assert grid.measure(np.ones(grid.shape), normalize=True).mass == pytest.approx(1.0)


def test_density_values_and_image_shapes_agree():
    grid = jk.Grid([0, 0], [1, 1], [3, 4])
    values = np.arange(12.0)
    a = grid.measure(values).weights
    b = grid.measure(values.reshape(3, 4)).weights
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("points", "weights", "match"),
    [
        (np.zeros((3, 2)), [1.0, np.nan, 1.0], "NaN"),
        (np.zeros((3, 2)), [1.0, -0.5, 1.0], "nonnegative"),
        (np.zeros((3, 2)), [1.0, 1.0], r"shape \(3,\)"),
        ([[0.0, np.inf]], [1.0], "NaN or inf"),
        (np.zeros((2, 2, 2)), [1.0, 1.0], r"shape \(n, d\)"),
    ],
)
def test_measure_rejects_bad_input_with_a_clear_message(points, weights, match):
    with pytest.raises(ValueError, match=match):
        jk.Measure(points, weights)


@pytest.mark.parametrize(
    ("lo", "hi", "shape", "match"),
    [([0], [1, 2], [3], "same length"), ([1], [0], [3], "lo < hi"), ([0], [1], [0], "positive integers"),
     ([0] * 4, [1] * 4, [2] * 4, "1, 2 or 3")],
)
def test_grid_rejects_bad_input(lo, hi, shape, match):
    with pytest.raises(ValueError, match=match):
        jk.Grid(lo, hi, shape)


def test_measure_is_immutable_and_copies_its_input():
    weights = np.ones(3)
    mu = jk.Measure(np.zeros((3, 1)), weights)
    weights[0] = 5.0
    assert mu.weights[0] == 1.0
    with pytest.raises(ValueError):
        mu.weights[0] = 2.0


def test_density_needs_a_grid():
    mu = jk.Measure(np.zeros((2, 1)), [1.0, 1.0])
    with pytest.raises(ValueError, match="cell volume"):
        mu.density()


@given(st.lists(st.floats(0, 1e6), min_size=1, max_size=20))
def test_mean_and_mass_of_random_weights(values):
    weights = np.asarray(values)
    points = np.arange(len(values), dtype=float)[:, None]
    mu = jk.Measure(points, weights)
    assert mu.mass == pytest.approx(weights.sum())
    if weights.sum() > 0:
        assert mu.mean()[0] == pytest.approx(weights @ points[:, 0] / weights.sum())


def test_the_callers_points_stay_writeable():
    points = np.zeros((3, 2))
    mu = jk.Measure(points, np.ones(3))
    assert points.flags.writeable and not mu.points.flags.writeable
    points[0, 0] = 1.0
    assert mu.points[0, 0] == 0.0


def test_a_measure_on_a_grid_must_sit_on_its_points():
    grid = jk.Grid([0], [1], [4])
    with pytest.raises(ValueError, match="not the points of the grid"):
        jk.Measure(grid.points + 0.1, np.ones(4), grid=grid)


def test_measure_does_not_alias_a_read_only_view_of_the_callers_array():
    """A read-only view shares the caller's memory: changing the base afterwards used to change
    (and could put NaN into) a validated measure."""
    base = np.linspace(0.0, 1.0, 5)[:, None].copy()
    view = base.view()
    view.setflags(write=False)
    mu = jk.Measure(view, np.ones(5))
    base[0, 0] = np.nan
    assert np.all(np.isfinite(mu.points))
    assert not mu.points.flags.writeable
    # its own frozen arrays are shared, not copied, by measures on the same support
    assert mu.with_weights(np.full(5, 2.0)).points is mu.points
    grid = jk.Grid(0, 1, 4)
    assert grid.measure(np.ones(4)).points is grid.points


@pytest.mark.parametrize("weights", [np.array([1.0, 1.0, 1j]), np.array([1.0, 1.0, 1.0 + 0j])])
def test_complex_weights_are_refused(weights):
    with pytest.raises(ValueError, match="weights must be real"):
        jk.Measure(np.zeros(3), weights)
