"""
Error-controlled steps
======================

A flow that is fast at first and slow later wastes work at a fixed step size: small enough for
the start, far too small for the end. :class:`~jko_ift.StepController` chooses each
:math:`\\tau_k` from an estimate :math:`e_k` of the local error of the step (here by
extrapolation: an implicit Euler step has local error :math:`O(\\tau^2)`), measured
componentwise on positions and weights in the root-mean-square norm weighted by
:math:`\\mathrm{atol} + \\mathrm{rtol}\\,|\\text{state}|`. A step is accepted when
:math:`e_k \\le 1`, and the next one is scaled by a PI controller,

.. math::

    \\tau_{k+1} = \\tau_k \\cdot \\mathrm{safety} \\cdot
    e_k^{-(p + i)/q}\\, e_{k-1}^{\\,p/q},

within the factors ``shrink`` and ``growth``, with :math:`p, i` the gains ``pcoeff``,
``icoeff`` and :math:`q = 2` the order of the local error (see :doc:`../adaptive`). The problem
is the Fokker-Planck flow of 60 particles (:math:`F = \\int\\rho\\log\\rho + \\int|x|^2/2`,
Lagrangian JKO steps), whose exact solution stays Gaussian.
"""

# %%
import matplotlib.pyplot as plt

import jko_ift as jk
from jko_ift import problems

problem = problems.ornstein_uhlenbeck_particles(n=60, m0=3.0, s0=0.5, t_final=4.0)
adaptive = jk.solve(problem.energy, problem.geometry, problem.initial, t_final=problem.t_final,
                    method=jk.ParticleJKO(), controller=jk.StepController(rtol=1e-3, atol=1e-4),
                    progress=False)
print(f"adaptive: {len(adaptive.taus)} accepted steps, tau from {adaptive.taus.min():.3g} "
      f"to {adaptive.taus.max():.3g}, error {problem.error(adaptive):.2e}")

# %%
# The same number of fixed steps, for comparison: the error is measured against the exact
# flow at every saved time (``problem.error``).
steps = len(adaptive.taus)
fixed = jk.solve(problem.energy, problem.geometry, problem.initial, tau=problem.t_final / steps,
                 steps=steps, method=jk.ParticleJKO(), progress=False)
print(f"fixed:    {steps} steps of tau = {problem.t_final / steps:.3g}, "
      f"error {problem.error(fixed):.2e}")

# %%
# The chosen step sizes grow as the flow slows down.
fig, ax = plt.subplots(figsize=(6, 4))
ax.semilogy(adaptive.times[1:], adaptive.taus, "o-", label="adaptive steps")
ax.axhline(problem.t_final / steps, color="0.5", ls="--", label="fixed step, same count")
ax.set_xlabel("time t")
ax.set_ylabel(r"step size $\tau_k$")
ax.legend()
fig.tight_layout()
