"""
Explicit and implicit schemes compared on one problem
=====================================================

The energy :math:`F(\\mu) = \\sum_i a_i V(x_i)` with the anisotropic quadratic
:math:`V(x) = (x_1^2 + 4 x_2^2)/2` has :math:`\\mathrm{Lip}(\\nabla V) = 4`. In :math:`W_2` the
explicit (forward Euler) step multiplies :math:`x_2` by :math:`1 - 4\\tau`: it is stable only
for :math:`\\tau < 1/2`. The implicit JKO step

.. math::

    \\mu^{k+1} \\in \\mathop{\\mathrm{argmin}}_{\\mu} \\; F(\\mu) + \\frac{1}{2\\tau} W_2^2(\\mu, \\mu^k)

divides by :math:`1 + 4\\tau` instead and dissipates energy at every step size. The same holds
in the Wasserstein-Fisher-Rao geometry for :class:`~jko_ift.ExplicitEuler` against the
splitting with implicit pieces, :class:`~jko_ift.Splitting`.
"""

# %%
# 30 particles from N((2, 2), I), four schemes, a step size below the explicit limit and one
# beyond it.
import warnings

import matplotlib.pyplot as plt
import numpy as np

import jko_ift as jk

N, STEPS, TAUS = 30, 12, (0.4, 0.6)
scale = np.array([1.0, 4.0])
F = jk.Potential(lambda x: 0.5 * (x**2 @ scale), lambda x: x * scale)
rng = np.random.default_rng(0)
mu0 = jk.Measure(rng.standard_normal((N, 2)) + 2.0, np.full(N, 1.0 / N))

schemes = {
    "explicit, W2": (jk.ExplicitEuler, jk.Wasserstein),
    "ParticleJKO (implicit), W2": (jk.ParticleJKO, jk.Wasserstein),
    "explicit, WFR": (jk.ExplicitEuler, lambda: jk.WFR(conserve_mass=True)),
    "Splitting (implicit), WFR": (lambda: jk.Splitting(order=1), lambda: jk.WFR(conserve_mass=True)),
}

# %%
# ``throw=False``: a step that fails (an explicit step past its stability limit is flagged
# ``unstable``) ends the run early instead of raising; ``stop_reason`` and the last step's
# ``status`` say why.
runs = {}
for tau in TAUS:
    for label, (make_method, make_geometry) in schemes.items():
        with warnings.catch_warnings():
            # the unstable explicit steps overflow and break the dissipation inequality; their
            # status says so, the warnings would only repeat it
            warnings.simplefilter("ignore", RuntimeWarning)
            warnings.simplefilter("ignore", jk.DissipationWarning)
            tr = jk.solve(F, make_geometry(), mu0, tau=tau, steps=STEPS, method=make_method(),
                          progress=False, throw=False)
        runs[tau, label] = tr
        status = tr.stats[-1]["status"] if tr.stats else "-"
        print(f"tau = {tau:g}  {label:28s} steps = {len(tr) - 1:2d}  stop = {tr.stop_reason:7s}  "
              f"last status = {status:10s} F = {tr.energies[-1]:.3e}")

# %%
# Energy against step number. Below the limit all four decay; beyond it the explicit runs stop
# at their first unstable step, while the implicit ones still decay geometrically.
fig, axes = plt.subplots(1, len(TAUS), figsize=(10, 4), sharey=True)
for ax, tau in zip(axes, TAUS, strict=True):
    for label in schemes:
        tr = runs[tau, label]
        style = "--" if label.startswith("explicit") else "-"
        ax.semilogy(np.arange(len(tr.energies)), tr.energies, style, marker=".", label=label)
    ax.set_xlabel("step k")
    ax.set_title(rf"$\tau = {tau:g}$ (explicit W2 stable for $\tau < 1/2$)")
axes[0].set_ylabel(r"$F(\mu^k)$")
axes[0].legend(fontsize="small")
fig.tight_layout()
