"""Splitting of densities on a grid: BackAndForthJKO as the transport piece, the pointwise
Hellinger and separable MMD reaction pieces (never a Gram matrix), configs and studies."""

import warnings

import numpy as np
import pytest

import jko_ift as jk
from jko_ift import config, studies
from jko_ift.methods.grid_reaction import SeparableGaussian, grid_mmd_step
from jko_ift.methods.weights import mmd_step

FOKKER_PLANCK = jk.Entropy() + jk.Potential(lambda x: np.sum(x**2, 1) / (2 * 0.5))


def gaussian(grid, centre, width):
    return grid.measure(lambda x: np.exp(-np.sum((x - np.asarray(centre)) ** 2, 1) / (2 * width**2)),
                        normalize=True)


@pytest.mark.parametrize("shape", [(7,), (5, 6), (3, 4, 5)])
def test_separable_gaussian_is_the_dense_gram(shape):
    d = len(shape)
    grid = jk.Grid([-1.0] * d, [1.5] * d, shape)
    kernel = jk.Gaussian(0.6)
    gram = SeparableGaussian(kernel, grid)
    v = np.random.default_rng(0).normal(size=grid.size)
    dense = kernel(grid.points, grid.points)
    assert np.allclose(gram.apply(v), dense @ v, rtol=1e-12, atol=1e-12)
    eigen = gram.from_eigen(gram.eigenvalues() * gram.to_eigen(v))
    assert np.allclose(eigen, dense @ v, atol=1e-10)


@pytest.mark.parametrize("conserve", [False, True])
@pytest.mark.parametrize("eta, energy", [(0.1, "sparse"), (10.0, "sparse"), (0.1, "interior"),
                                         (10.0, "interior")])
def test_separable_mmd_reaction_matches_the_dense_step(conserve, eta, energy):
    """Active constraints (a linear potential empties cells: the lazy active set) and none (the
    conjugate gradients), against the dense active-set step of ``weights.mmd_step``."""
    if energy == "sparse":
        grid = jk.Grid((-2, -2), (2, 2), (12, 12))
        mu, target = gaussian(grid, (0.3, 0.3), 0.5), gaussian(grid, (-0.3, -0.3), 0.4)
    else:  # wide measures: the minimizer keeps every cell
        grid = jk.Grid((-1, -1), (1, 1), (12, 12))
        mu, target = gaussian(grid, (0.2, 0.2), 0.8), gaussian(grid, (-0.2, -0.2), 0.8)
    kernel = jk.Gaussian(0.7)
    F = 0.5 * jk.MMD2(target, kernel)
    if energy == "sparse":
        F = F + jk.Potential(lambda x: 0.1 * x[:, 0])
    geometry = jk.MMD(kernel, conserve_mass=conserve)
    ours = grid_mmd_step(F, geometry, mu, eta, conserve, 1e-13, 1.0)
    dense = mmd_step(F, geometry, mu.points, mu.weights, eta, conserve, rtol=1e-13, energy_scale=1.0)
    assert ours.ok and dense.ok
    assert ours.info["weight_solver"] == ("active_set" if energy == "sparse" else "conjugate_gradients")
    assert ours.info["weight_support"] < grid.size if energy == "sparse" else True
    metric = geometry.metric(grid.points)

    def objective(b):
        return F.value(mu.with_weights(b)) + (b - mu.weights) @ metric @ (b - mu.weights) / (2 * eta)

    # the objective to 1e-10; the weights to 1e-10 where both end on the same sparse face (on a
    # full support, the ridge 1e-8 leaves directions that barely change the objective: 1e-6 to 1e-4)
    assert abs(objective(ours.weights) - objective(dense.weights)) <= 1e-10 * abs(objective(dense.weights))
    if energy == "sparse":
        assert np.abs(ours.weights - dense.weights).max() <= 1e-10 * dense.weights.max()


@pytest.mark.parametrize("geometry", [jk.Hellinger(), jk.Hellinger(conserve_mass=True),
                                      jk.MMD(jk.Gaussian(1.0)), jk.MMD(jk.Gaussian(1.0), conserve_mass=True)])
@pytest.mark.parametrize("F", [FOKKER_PLANCK, 2.0 * jk.PorousMedium(2) + jk.Potential(lambda x: x[:, 0])])
def test_grid_reaction_pieces_match_conic_reaction_steps(geometry, F):
    """A pure reaction geometry: the splitting is its reaction piece alone, the exact step."""
    grid = jk.Grid((-3, -3), (3, 3), (10, 10))
    mu = gaussian(grid, (0.8, 0.8), 0.6)
    ours = jk.Splitting(transport=jk.BackAndForthJKO(tol=1e-8)).step(F, geometry, mu, 0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the MMD step of a porous medium empties cells: said, expected
        conic = jk.ConicJKO().step(F, geometry, mu, 0.3)
    change = np.abs(conic.measure.weights - mu.weights).sum()
    assert np.abs(ours.measure.weights - conic.measure.weights).sum() <= 1e-4 * change
    if geometry.conserve_mass:
        assert ours.measure.mass == pytest.approx(mu.mass, rel=1e-12)


@pytest.mark.parametrize("geometry", [jk.WFR(1.0, 1.0), jk.IFT(jk.Gaussian(1.0), 1.0, 1.0)])
def test_splitting_agrees_with_the_exact_conic_step_where_it_does_not_lock(geometry):
    """Lie splitting against ConicJKO's inf-convolution step, 1-D, h = 0.03, tau large enough
    that ConicJKO moves mass: they differ by the splitting's O(tau) and the grids' O(h) (measured
    at tau = 0.2, 0.1, 0.05: WFR 12 %, 9 %, 13 %; IFT 9 %, 7 %, 4 % of the step's change)."""
    grid = jk.Grid((-3,), (3,), (200,))
    mu = gaussian(grid, (0.8,), 0.6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = jk.Splitting(transport=jk.BackAndForthJKO(tol=1e-4)).step(FOKKER_PLANCK, geometry, mu, 0.1,
                                                                           throw=False)
        conic = jk.ConicJKO().step(FOKKER_PLANCK, geometry, mu, 0.1)
    change = np.abs(conic.measure.weights - mu.weights).sum()
    assert np.isfinite(ours.objective) and ours.certificate < 1e-3
    assert np.abs(ours.measure.weights - conic.measure.weights).sum() <= 0.15 * change


def test_nonlocal_energy_linearized_in_the_transport_piece_and_said():
    grid = jk.Grid((-3, -3), (3, 3), (24, 24))
    mu, target = gaussian(grid, (1.0, 0.5), 0.5), gaussian(grid, (-0.5, -0.5), 0.7)
    kernel = jk.Gaussian(0.5)
    F = jk.MMD2(target, kernel) + 0.01 * jk.Entropy()
    result = jk.Splitting(transport="back_and_forth").step(F, jk.IFT(kernel, conserve_mass=True), mu, 0.1)
    assert result.ok and result.info["transport_linearized"] == ("MMD2",)
    assert result.measure.mass == pytest.approx(1.0, rel=1e-12)
    assert result.energy < F.value(mu)
    assert result.energy == pytest.approx(F.value(result.measure), rel=1e-9)


def test_back_and_forth_names_the_splitting_call_that_works():
    grid = jk.Grid((-3, -3), (3, 3), (12, 12))
    mu = gaussian(grid, (0.5, 0.0), 0.6)
    with pytest.raises(ValueError) as error:
        jk.BackAndForthJKO().step(FOKKER_PLANCK, jk.WFR(), mu, 0.1)
    call = "jk.Splitting(transport=jk.BackAndForthJKO()).step(F, geometry, mu, tau)"
    assert call in str(error.value)
    F, geometry, tau = FOKKER_PLANCK, jk.WFR(), 0.1
    assert eval(call.replace("jk.", "jk."), {"jk": jk, "F": F, "geometry": geometry, "mu": mu,
                                            "tau": tau}).ok


def test_grid_transport_options_are_validated():
    with pytest.raises(ValueError, match="reaction='exact'"):
        jk.Splitting(transport=jk.BackAndForthJKO(), reaction="explicit")
    with pytest.raises(ValueError, match="symmetric=False"):
        jk.Splitting(order=2, transport="back_and_forth")
    with pytest.raises(ValueError, match="transport"):
        jk.Splitting(transport=jk.ConicJKO())
    assert jk.Splitting(order=2, symmetric=False, transport="back_and_forth").grid_transport is not None
    particles = jk.Measure(np.random.default_rng(0).normal(size=(5, 2)), np.ones(5))
    with pytest.raises(ValueError, match="grid"):
        jk.Splitting(transport="back_and_forth").step(FOKKER_PLANCK, jk.WFR(), particles, 0.1)
    mu = gaussian(jk.Grid((-3, -3), (3, 3), (6, 6)), (0, 0), 1.0)
    with pytest.raises(ValueError, match="Gaussian"):
        jk.Splitting(transport="back_and_forth").step(FOKKER_PLANCK, jk.IFT(jk.IMQ()), mu, 0.1)


def test_strang_arrangement_on_a_grid_runs():
    grid = jk.Grid((-3, -3), (3, 3), (16, 16))
    mu = gaussian(grid, (0.8, 0.3), 0.6)
    method = jk.Splitting(order=2, symmetric=False, transport=jk.BackAndForthJKO())
    result = method.step(FOKKER_PLANCK, jk.WFR(conserve_mass=True), mu, 0.1)
    assert result.ok and result.measure.mass == pytest.approx(1.0, rel=1e-12)
    assert result.info["transport_iterations"] > 0


def test_splitting_keeps_the_grid_with_a_grid_transport_only():
    assert jk.Splitting(transport=jk.BackAndForthJKO()).keeps_support is True
    assert jk.Splitting(transport="back_and_forth").keeps_support is True
    assert jk.Splitting().keeps_support is False and jk.Splitting.keeps_support is False


def test_config_kinds_accept_the_grid_methods():
    assert config.keeps_support("back_and_forth")
    assert config._method({"kind": "back_and_forth", "tol": 1e-5}) == ("back_and_forth", {"tol": 1e-5})
    kind, options = config._method({"kind": "splitting", "transport": "back_and_forth"})
    assert config.METHODS[kind][0](**options).grid_transport is not None


def test_convergence_study_never_flags_back_and_forth_as_locked():
    """tau * |grad f| far below h: ConicJKO would lock; BackAndForthJKO moves mass by less than
    a cell, and the study's locking detection stays silent."""
    problem = jk.problems.ornstein_uhlenbeck(cells=24, t_final=0.02) if hasattr(jk, "problems") else None
    if problem is None:
        from jko_ift import problems
        problem = problems.ornstein_uhlenbeck(cells=24, t_final=0.02)
    study = studies.convergence_study(problem, [0.01, 0.005], method_factory=jk.BackAndForthJKO)
    for row in study.rows:
        assert row["locked_steps"] == 0
        assert not any("grid_locking" in flag or "grid_rounding" in flag for flag in row["flags"])


def test_fine_grid_example_runs_at_tiny_sizes(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "fine_grid_tau_limit.py"
    spec = importlib.util.spec_from_file_location("example_fine_grid_tau_limit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(cells=16, conic_cells=8, t_final=0.05, taus=(0.05, 0.025), out=tmp_path,
                         entropic_cells=16)
    assert (tmp_path / "fine_grid_tau_limit.png").stat().st_size > 1000
    studies_run = result["studies"]
    conic = next(study for label, (study, _) in studies_run.items() if label.startswith("ConicJKO"))
    exact = next(study for label, (study, _) in studies_run.items() if label.startswith("BackAndForth"))
    assert any("grid_locking" in flag for row in conic.rows for flag in row["flags"])
    assert all(row["locked_steps"] == 0 for row in exact.rows)
