"""The figures: one style (labelled axes, log axes where the data span decades, equal aspect for
particles, one style per curve, failed schemes named) checked on the Axes' contents, not pixels."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import jko_ift as jk  # noqa: E402
from jko_ift import plotting  # noqa: E402
from jko_ift.diagnostics import convergence_order  # noqa: E402
from jko_ift.studies import ConvergenceStudy  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


class Run:
    """A duck-typed trajectory: what the drawing functions read."""

    def __init__(self, energies, scheme="", stats=()):
        self.energies = np.asarray(energies, float)
        self.times = np.arange(self.energies.size) * 0.1
        self.scheme, self.stats = scheme, list(stats)


def axes():
    return Figure().subplots()


def test_energy_plot_labels_and_log_axis_when_decades():
    ax = plotting.draw_energy(Run(np.exp(-np.arange(30.0)), scheme="ConicJKO in IFT(alpha=1)"), axes())
    assert ax.get_xlabel() == "time $t$" and "F" in ax.get_ylabel()
    assert ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["ConicJKO in IFT(alpha=1)"]
    flat = plotting.draw_energy(Run([2.0, 1.9, 1.8]), axes())
    assert flat.get_yscale() == "linear" and flat.get_legend() is None  # one decade: linear
    negative = plotting.draw_energy(Run([1.0, -1.0, -50.0]), axes())
    assert negative.get_yscale() == "linear"


def test_trajectory_plot_returns_its_axes_and_draws_into_a_given_one():
    rng = np.random.default_rng(1)
    target = jk.Measure(rng.standard_normal((8, 2)), np.full(8, 1 / 8))
    mu0 = jk.Measure(rng.standard_normal((8, 2)) + 1.0, np.full(8, 1 / 8))
    run = jk.solve(jk.MMD2(target, jk.Gaussian(1.0)), jk.Wasserstein(), mu0, tau=0.5, steps=3,
                   method=jk.ExplicitEuler(), progress=False)
    ax = axes()
    assert run.plot(ax=ax) is ax
    run.plot(ax=ax, label="again")
    assert len(ax.get_lines()) == 2
    styles = {(line.get_marker(), line.get_linestyle()) for line in ax.get_lines()}
    assert len(styles) == 2  # one curve cannot hide the other
    new = run.plot()  # a new pyplot figure (a notebook shows it)
    assert new is not ax and new.get_xlabel() == "time $t$"


def test_energy_decay_styles_every_curve_and_names_failed_schemes():
    runs = {f"scheme {k}": Run(np.exp(-np.arange(20.0) / (k + 1))) for k in range(3)}
    failed = {"WFR, tau=1": "step 3 diverged: take a smaller tau"}
    ax = plotting.draw_energy_decay(runs, axes(), failed=failed)
    drawn = [line for line in ax.get_lines() if len(line.get_xdata())]
    assert len(drawn) == 3 and len({(ln.get_marker(), ln.get_linestyle()) for ln in drawn}) == 3
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:3] == list(runs) and labels[3].startswith("WFR, tau=1: failed (step 3 diverged")
    assert ax.get_yscale() == "log"


def test_convergence_plot_anchors_its_slope_guide_at_the_data():
    taus = np.array([0.4, 0.2, 0.1, 0.05])
    errors = 3.0 * taus**0.5  # order 1/2: a guide through the last point would float above
    rows = [{"tau": t, "error": e, "flags": []} for t, e in zip(taus, errors, strict=True)]
    rows.append({"tau": 0.025, "error": 1.0, "flags": ["grid_locking in 3/40 steps"]})
    order = convergence_order(taus, errors)
    study = ConvergenceStudy(rows, order, order, "closed form", "mmd")
    ax = study.plot(ax=axes())
    assert ax.get_xscale() == ax.get_yscale() == "log"
    assert "tau" in ax.get_xlabel() and "mmd" in ax.get_ylabel()
    guide = next(line for line in ax.get_lines() if line.get_label().startswith("slope 1"))
    y = guide.get_ydata()
    assert errors.min() <= np.exp(np.mean(np.log(y))) <= errors.max()  # through the data's middle
    assert np.min(y) < errors.max() and np.max(y) > errors.min()
    assert [t.get_text() for t in ax.texts] == ["grid_locking in 3/40 steps"]


def test_particles_area_is_weight_and_aspect_equal():
    measure = jk.Measure(np.array([[0.0, 0.0], [1.0, 2.0]]), np.array([0.25, 0.75]))
    ax = plotting.draw_particles(measure, axes(), size=10.0)
    sizes = ax.collections[-1].get_sizes()
    assert sizes == pytest.approx([5.0, 15.0])  # size * n * a_i / sum(a)
    assert ax.get_aspect() == 1.0
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("$x_1$", "$x_2$")


def test_png_files_share_one_dpi(tmp_path):
    from PIL import Image

    run = Run(np.exp(-np.arange(10.0)))
    energy = plotting.plot_energy(run, tmp_path / "energy.png")
    decay = plotting.plot_energy_decay({"a": run}, tmp_path / "decay.png")
    curves = plotting.plot_seed_curves({"panel": {"a": np.exp(-np.arange(20.0))[None].repeat(3, 0)}},
                                       tmp_path / "curves.png", log_x=True)
    for path in (energy, decay, curves):
        dpi = Image.open(path).info.get("dpi")
        assert dpi is not None and round(dpi[0]) == plotting.DPI


def test_seed_curves_explain_their_band(tmp_path, monkeypatch):
    drawn = {}
    original = plotting._save
    monkeypatch.setattr(plotting, "_save",
                        lambda fig, path: drawn.setdefault("fig", fig) and original(fig, path))
    values = np.exp(-np.arange(50.0))[None] * np.array([[1.0], [1.2], [0.9]])
    plotting.plot_seed_curves({"p": {"IFT": values, "WFR": values * 2}}, tmp_path / "c.png", log_x=True)
    ax = drawn["fig"].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:2] == ["IFT", "WFR"] and "1 s.d. over 3 seeds" in labels[2]
    assert ax.get_xscale() == "symlog" and ax.get_yscale() == "log"
    assert ax.get_xlabel().startswith("iteration")


def test_seed_curves_keep_counts_on_a_linear_axis(tmp_path, monkeypatch):
    drawn = {}
    original = plotting._save
    monkeypatch.setattr(plotting, "_save",
                        lambda fig, path: drawn.setdefault("fig", fig) and original(fig, path))
    counts = {"exact": np.array([100, 80, 60, 40]), "pg": np.array([100, 90, 85, 84])}
    plotting.plot_seed_curves({"mmd": {"exact": np.exp(-np.arange(4.0) * 3)}, "support": counts},
                              tmp_path / "w.png", ylabel={"mmd": "MMD", "support": "particles"})
    mmd, support = drawn["fig"].axes[:2]
    assert mmd.get_yscale() == "log" and support.get_yscale() == "linear"
    assert support.get_ylabel() == "particles"


def test_seed_curves_take_the_value_scale_per_panel(tmp_path, monkeypatch):
    drawn = {}
    original = plotting._save
    monkeypatch.setattr(plotting, "_save",
                        lambda fig, path: drawn.setdefault("fig", fig) and original(fig, path))
    counts = {"exact": np.array([100, 10, 2, 2])}  # spans decades, but a count
    plotting.plot_seed_curves({"mmd": {"exact": np.exp(-np.arange(4.0) * 3)}, "support": counts},
                              tmp_path / "w.png", log_y={"support": False})
    mmd, support = drawn["fig"].axes[:2]
    assert mmd.get_yscale() == "log" and support.get_yscale() == "linear"
