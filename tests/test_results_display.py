"""Results show themselves: short text reprs and escaped HTML summaries of runs, steps and
studies; tables as plain data that become pandas DataFrames on request."""

import sys
import types

import numpy as np
import pytest

import jko_ift as jk
from jko_ift import problems
from jko_ift.display import MAX_ROWS, Table, html_summary, shorten, text_summary
from jko_ift.run_warnings import RunWarning
from jko_ift.studies import SchemeComparison, compare_schemes, convergence_study


@pytest.fixture(scope="module")
def particles():
    rng = np.random.default_rng(0)
    target = jk.Measure(rng.standard_normal((12, 2)), np.full(12, 1 / 12))
    mu0 = jk.Measure(rng.standard_normal((12, 2)) + 2.0, np.full(12, 1 / 12))
    return jk.MMD2(target, jk.Gaussian(1.0)), mu0


@pytest.fixture(scope="module")
def run(particles):
    F, mu0 = particles
    return jk.solve(F, jk.Wasserstein(), mu0, tau=0.5, steps=4, method=jk.ParticleJKO(), progress=False)


def test_trajectory_repr_names_scheme_steps_energy_and_timings(run):
    text = repr(run)
    assert text.startswith("Trajectory: ParticleJKO in Wasserstein()")
    for field in ("stop reason", "4 accepted", "energy", "tau", "statuses", "wall time"):
        assert field in text
    assert f"{run.energies[-1]:.4g}" in text
    assert len(text.splitlines()) < 20  # short, whatever the run's length


def test_trajectory_html_is_escaped_and_shows_warnings(run):
    import dataclasses

    warned = dataclasses.replace(run, scheme="<b>bold</b> & co",
                                 warnings=(RunWarning("DissipationWarning", "F rose <by> 1e-3", 2, 1, 3),))
    page = warned._repr_html_()
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; co" in page and "<b>bold" not in page
    assert "F rose &lt;by&gt; 1e-3" in page
    assert "DissipationWarning" in repr(warned)


def test_trajectory_stats_table(run):
    table = run.stats_table()
    assert len(table) == 4 and {"step", "tau", "wall_time", "status"} <= set(table.columns)


def test_step_result_summary_and_failure_advice(particles):
    F, mu0 = particles
    result = jk.jko_step(F, jk.Wasserstein(), mu0, 0.5, method=jk.ParticleJKO())
    text = repr(result)
    assert text.startswith("StepResult (optimal)")
    assert "12 points in 2-D" in text and "certificate" in text
    failed = jk.StepResult.failed("max_iterations", {"iterations": 500})
    assert "raise max_iter" in repr(failed) and "none" in repr(failed)
    assert "<li>max_iterations: " in failed._repr_html_()


def test_comparison_unpacks_as_before_and_names_failures(particles):
    F, mu0 = particles

    class Broken:  # a duck-typed method whose step raises
        def step(self, *args, **kwargs):
            raise ValueError("this scheme <fails> on purpose")

    comparison = compare_schemes(F, mu0, {"particle": (jk.ParticleJKO, jk.Wasserstein()),
                                          "broken": (Broken(), jk.Wasserstein())}, tau=0.5, steps=2)
    assert isinstance(comparison, SchemeComparison)
    rows, trajectories = comparison
    assert [row["label"] for row in rows] == ["particle", "broken"] and list(trajectories) == ["particle"]
    assert comparison.failed == {"broken": "this scheme <fails> on purpose"}
    text = repr(comparison)
    assert "failed  : 1" in text and "broken failed: this scheme <fails> on purpose" in text
    assert "&lt;fails&gt;" in comparison._repr_html_()


def test_convergence_study_summary_and_table():
    study = convergence_study(problems.mmd_flow(cells=12, t_final=0.5), [0.25, 0.125])
    text = repr(study)
    assert text.startswith("ConvergenceStudy") and "order (clean rows)" in text and "closed form" in text
    assert "<table>" in study._repr_html_()
    assert [row["tau"] for row in study.table()] == [0.25, 0.125]


def test_table_is_a_list_of_dicts_with_a_frame_on_request(monkeypatch):
    table = Table([{"a": 1, "b": [1, 2]}, {"a": 2.5, "c": None}])
    assert table == [{"a": 1, "b": [1, 2]}, {"a": 2.5, "c": None}] and table.columns == ["a", "b", "c"]
    assert "Table of 2 rows" in repr(table)
    fake = types.ModuleType("pandas")
    fake.DataFrame = lambda rows, columns=None: ("frame", rows, columns)
    monkeypatch.setitem(sys.modules, "pandas", fake)
    assert table.to_frame() == ("frame", list(table), ["a", "b", "c"])
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if pandas were not installed
    with pytest.raises(ImportError, match="pip install pandas"):
        table.to_frame()


def test_summaries_stay_short():
    long = "x" * 1000
    assert len(shorten(long)) <= 160
    table = Table({"i": i} for i in range(MAX_ROWS + 5))
    assert "... 5 more rows" in table.to_text() and "5 more rows" in table._repr_html_()
    assert len(text_summary("t", [("m", long)]).splitlines()[1]) < 200
    assert "x" * 200 not in html_summary("t", [("m", long)], notes=[long])


def test_progress_bar_in_a_log_file_writes_lines_not_carriage_returns(monkeypatch):
    import io

    from jko_ift import display

    monkeypatch.setattr(display, "LOG_INTERVAL", 0.0)  # a line per update
    log = io.StringIO()  # not a terminal, as a batch job's log file
    with display.progress_bar(total=3, desc="run", unit="step", file=log) as bar:
        for _ in range(3):
            bar.update(1)
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) >= 2 and lines[-1].startswith("run: 100%") and "3/3" in lines[-1]


def test_solve_bar_off_a_terminal_is_lines_with_the_step_statistics(particles, capsys):
    F, mu0 = particles
    jk.solve(F, jk.Wasserstein(), mu0, tau=0.5, steps=3, method=jk.ParticleJKO(), progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    last = err.strip().splitlines()[-1]
    assert "3/3" in last and "energy=" in last and "step=" in last  # the last step's wall time


# ---------------------------------------------------------------------------- inside a long step

class _Terminal:
    """A text stream that says it is a terminal, so the bar redraws in place."""

    def __init__(self):
        import io
        self.text = io.StringIO()

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> None:
        self.text.write(text)

    def flush(self) -> None:
        pass


def test_inner_iterations_appear_on_the_bar_after_its_own_postfix(monkeypatch):
    from jko_ift import display

    monkeypatch.setattr(display, "INNER_INTERVAL", 0.0)
    display.report_iteration(1, 0.5)  # nobody listens: nothing happens
    stream = _Terminal()
    with display.progress_bar(total=2, desc="run", file=stream, mininterval=0.0) as bar:
        bar.set_postfix_str("energy=1.5")
        with display.showing_iterations(bar):
            display.report_iteration(7, 1.5e-3, "eps 0.01")
            assert bar.postfix == "energy=1.5 | in step: iteration 7, residual 0.0015 (eps 0.01)"
            display.report_iteration(8)  # replaces the last report, keeps the bar's own postfix
            assert bar.postfix == "energy=1.5 | in step: iteration 8"
        display.report_iteration(9, 1.0)  # the block has ended: nothing shows
        assert bar.postfix == "energy=1.5 | in step: iteration 8"
    assert "iteration 7, residual 0.0015 (eps 0.01)" in stream.text.getvalue()


def test_inner_iterations_redraw_a_log_file_no_more_often_than_its_lines(monkeypatch):
    import io

    from jko_ift import display

    monkeypatch.setattr(display, "INNER_INTERVAL", 0.0)
    log = io.StringIO()  # a batch job's log: one line per LOG_INTERVAL at most
    with display.progress_bar(total=2, desc="run", file=log) as bar:
        with display.showing_iterations(bar):
            for k in range(1000):
                display.report_iteration(k, 1.0 / (k + 1))
    assert "in step" not in log.getvalue()


def test_a_disabled_bar_listens_to_nothing():
    from jko_ift import display

    with display.progress_bar(total=2, disable=True) as bar:
        with display.showing_iterations(bar):
            assert display._INNER_PROGRESS.get() is None


def inner_progress_lines(capsys, monkeypatch, run) -> list[str]:
    """The log lines of ``run()``'s bar that show a step's inner iterations (a line per redraw)."""
    from jko_ift import display

    monkeypatch.setattr(display, "LOG_INTERVAL", 0.0)
    monkeypatch.setattr(display, "INNER_INTERVAL", 0.0)
    run()
    return [line for line in capsys.readouterr().err.splitlines() if "in step: iteration" in line]


def grid_fokker_planck(n: int):
    grid = jk.Grid([-2, -2], [2, 2], (n, n))
    mu0 = grid.measure(lambda x: np.exp(-np.sum((x - 0.5) ** 2, 1)), normalize=True)
    return jk.Entropy() + jk.Potential(lambda x: np.sum(x**2, 1)), mu0


def test_a_long_particle_step_shows_its_iterations_on_the_run_bar(particles, capsys, monkeypatch):
    F, mu0 = particles
    lines = inner_progress_lines(capsys, monkeypatch, lambda: jk.solve(
        F, jk.Wasserstein(), mu0, tau=0.5, steps=2, method=jk.ParticleJKO(), progress=True))
    assert lines and "residual" in lines[0] and "(positions)" in lines[0]


def test_an_entropic_step_shows_its_eps_level_and_violation_on_the_run_bar(capsys, monkeypatch):
    F, mu0 = grid_fokker_planck(12)
    lines = inner_progress_lines(capsys, monkeypatch, lambda: jk.solve(
        F, jk.Wasserstein(), mu0, tau=0.2, steps=1, method=jk.EntropicJKO(eps=0.1), progress=True))
    assert lines and "residual" in lines[-1] and "(eps 0.1)" in lines[-1]


def test_a_back_and_forth_step_shows_its_duality_gap_on_the_run_bar(capsys, monkeypatch):
    F, mu0 = grid_fokker_planck(16)
    lines = inner_progress_lines(capsys, monkeypatch, lambda: jk.solve(
        F, jk.Wasserstein(), mu0, tau=0.1, steps=1, method=jk.BackAndForthJKO(), progress=True))
    assert lines and "(duality gap)" in lines[-1]
