"""
A tau -> 0 convergence study and its flags
==========================================

How fast does a JKO scheme converge to the gradient flow as the step :math:`\\tau` shrinks?
:func:`jko_ift.studies.convergence_study` runs one problem at several step sizes, measures the
error against a reference (here the closed form of the Ornstein-Uhlenbeck flow) and fits
:math:`\\mathrm{error} \\approx C \\tau^{p}`. The minimizing-movement scheme is of first order,
:math:`p = 1`.

The fit is only taken over the **clean** rows: each row is flagged when a known regime spoils
the order. On a fixed grid of spacing :math:`h`, a :math:`W_2` step cannot move mass by less
than a cell, so once :math:`\\tau\\,|\\nabla f| < h` the steps lock (``grid_locking``) or round
the displacement to whole cells (``grid_rounding``), and the error stops shrinking.
"""

# %%
# Fokker-Planck energy :math:`F = \int \rho\log\rho + \int |x|^2/2` under :math:`W_2`, from
# :math:`N(3, 0.5^2)`: the flow stays Gaussian with known mean and variance. First on 50
# particles (Lagrangian steps, :class:`~jko_ift.ParticleJKO`), which have no grid to lock on.
import warnings

import matplotlib.pyplot as plt

import jko_ift as jk
from jko_ift import problems, studies

TAUS = [0.5, 0.25, 0.125, 0.0625]

particles = problems.ornstein_uhlenbeck_particles(n=50, t_final=1.0)
study = studies.convergence_study(particles, TAUS, method_factory=jk.ParticleJKO)
for row in study.rows:
    print(f"tau = {row['tau']:<7g} error = {row['error']:.3e}  flags = {row['flags']}")
print(f"fitted order on clean rows: {study.order.order:.2f} +- {study.order.stderr:.2f}")

# %%
# The same flow on a coarse 40-cell grid with exact conic JKO steps
# (:class:`~jko_ift.ConicJKO`, the default): the displacement per step,
# :math:`\tau|\nabla f|`, is soon below the cell width and every row is flagged. No order is
# fitted from flagged rows (``study.order`` is None); ``order_all`` shows what a naive fit
# over all rows would claim.
grid_problem = problems.ornstein_uhlenbeck(cells=40, t_final=0.4)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", jk.GridLockingWarning)  # the study's flags say it per row
    grid_study = studies.convergence_study(grid_problem, [0.2, 0.1, 0.05, 0.025])
for row in grid_study.rows:
    print(f"tau = {row['tau']:<7g} error = {row['error']:.3e}  flags = {row['flags']}")
print("order on clean rows:", grid_study.order,
      f"| naive order over all rows: {grid_study.order_all.order:.2f}")

# %%
# Error against step size on log axes, with a slope-1 guide through the particle study's
# smallest step; flagged rows are drawn hollow.
fig, ax = plt.subplots(figsize=(6, 4))
for name, s in (("50 particles (ParticleJKO)", study), ("40-cell grid (ConicJKO)", grid_study)):
    taus = [r["tau"] for r in s.rows]
    errors = [r["error"] for r in s.rows]
    line, = ax.loglog(taus, errors, label=name)
    for r in s.rows:
        ax.plot(r["tau"], r["error"], "o", color=line.get_color(),
                fillstyle="none" if r["flags"] else "full")
tau0, e0 = study.rows[-1]["tau"], study.rows[-1]["error"]
ax.loglog(TAUS, [e0 * t / tau0 for t in TAUS], "k:", label=r"slope 1 ($\propto \tau$)")
ax.set_xlabel(r"step size $\tau$")
ax.set_ylabel("largest error over the run")
ax.set_title("hollow markers: flagged rows (grid locking / rounding)")
ax.legend()
fig.tight_layout()
