"""The entropic JKO step: generalized Sinkhorn iterations on a fixed support (Peyre 2015).

On the points x_1..x_n of mu^k = sum_i a_i delta_{x_i} the step solves

    min_{P >= 0, b}  F(b) + [ <C, P> + eps sum_ij P_ij log(P_ij / a_i) ] / (2 tau alpha)
                          + R^2(nu, b) / (2 tau beta)
    s.t.  P 1 = a,  nu = P^T 1          (W2: b = nu, alpha = 1; WFR: R = He; IFT: R = MMD)

with C_ij = |x_i - x_j|^2. The plan is P = diag(u) xi diag(v), xi = exp(-C / eps) (module
``gibbs``), and the iterations alternate the two KL-proximal maps

    u = a / (xi v),          nu = prox^KL_{sigma G}(xi u),  v = nu / (xi u),

sigma = 2 tau alpha / eps, where G = F for W2 and G(nu) = min_b F(b) + R^2(nu, b) / (2 tau beta)
(the reaction envelope of F) for WFR and IFT (module ``entropic_prox``). They are block
coordinate ascent on the dual and converge for convex F (docs/entropic.md). The kernel
domain stores u, v; the log domain stores eps log u, eps log v and never exponentiates them.

At eps -> 0 the step tends to the exact JKO step (``ConicJKO``); the entropic term acts like
an extra diffusion of order eps / tau (docs/theory.md §7), which ``EntropicBlurWarning``
reports when it is not small against the step.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, replace

import numpy as np

from ..energies import Energy
from ..geometries import Geometry
from ..measures import Measure
from .base import (
    Method,
    Same,
    SolverError,
    StepResult,
    check_step_input,
    support_key,
    warn_user,
    without_excluded,
)
from .entropic_prox import (
    EnvelopeProx,
    HellingerEnvelopeProx,
    KLProx,
    LETEnvelopeProx,
    MMDEnvelope,
    UnsupportedEnergyError,
    energy_form,
)
from .gibbs import DENSE_CACHE_ENTRIES, HKGibbs, PlanProducts, gibbs_operator, transport_cost
from .grid_motion import SUBCELL_BLUR, barycentric_motion, check_step
from .options import count, flag, fraction, is_real
from .scaling import (
    ClosedKernelScalings,
    HardRows,
    KernelScalings,
    LogScalings,
    Relaxation,
    SoftRelaxation,
    SoftRows,
    eps_levels,
    eps_schedule,
    futile,
    iterate,
    level_budget,
    out_of_range,
)

DOMAINS = ("auto", "kernel", "log")

#: The cheap kernel-domain iteration approximates its column scaling (``ClosedKernelScalings``)
#: only while the marginal violation is above this many times the level's tolerance.
EXACT_BELOW = 10.0

#: The over-relaxation a cold W2 step starts from (``relaxation="auto"``), then tuned on the fly
#: (``scaling.Relaxation``); warm steps start from the omega tuned in the last step.
COLD_RELAXATION = 1.5

#: How EntropicJKO measures WFR: the inf-convolution of W2 / alpha and He^2 / beta (DESIGN.md),
#: or the exact Hellinger-Kantorovich distance in its logarithmic-entropy-transport form.
WFR_COSTS = ("inf_convolution", "hellinger_kantorovich")

#: Default tolerance on the marginal violation |P 1 - a|_1 / sum(a) (the issue's benchmark
#: asks for 1e-6).
DEFAULT_TOL = 1e-6

#: The blur warning: the Gibbs kernel spreads every plan row with variance eps / 2 per
#: coordinate, a mean-square displacement d eps / 2 that the flow does not make. It warns
#: when sqrt(d eps / 2) exceeds this fraction of the step's own rms displacement (drift
#: tau alpha |grad f| and, for F with an entropy, the Brownian spread sqrt(2 d tau alpha)):
#: for the heat flow that is eps > tau, where the spurious diffusion eps / (4 tau) reaches
#: a quarter of the true one.
BLUR_WARN_RATIO = 0.5

_OPTIONS = ("tol", "max_iter", "domain", "eps_scaling", "eps_start", "scaling_factor",
            "separable", "warm_start", "relaxation", "cache_size", "dense_cache_entries", "conic",
            "wfr_cost")


@dataclass(frozen=True)
class _Warm:
    """What a step leaves for the next one on the same support: the column potential psi =
    eps log v, the over-relaxation tuned last, and (IFT) the zero set of the envelope."""

    psi: np.ndarray
    omega: float | None = None
    zero: np.ndarray | None = None


class EntropicBlurWarning(UserWarning):
    """The entropic blur sqrt(d eps / 2) is not small against the displacement of the step."""


class EntropicJKO(Method):
    r"""Entropic JKO step on a fixed support: the transport cost regularized, solved by
    Sinkhorn scaling.

    The points of :math:`\mu^k` stay; the weights change.

    Parameters
    ----------
    eps : float, default 0.01
        Entropic regularization, in units of squared length: the Gibbs kernel is
        :math:`\exp(-|x - y|^2/\varepsilon)`, a blur of variance :math:`\varepsilon/2` per
        coordinate.
    tol : float, default ``DEFAULT_TOL``
        Accepted marginal violation :math:`\|P\mathbf 1 - a\|_1 / \sum_i a_i` (the step's
        certificate).
    max_iter : int, default 20000
        Sinkhorn iterations per step, over all :math:`\varepsilon` levels.
    domain : {"auto", "kernel", "log"}, default "auto"
        "kernel" (scalings :math:`u, v`; fastest, overflows at small :math:`\varepsilon`),
        "log" (stabilized potentials) or "auto" (kernel domain, moving to the log domain when
        the scalings leave the float range).
    eps_scaling : {"auto", True, False}, default "auto"
        Anneal :math:`\varepsilon` from ``eps_start`` down to ``eps`` by ``scaling_factor``
        ("auto": only for steps without a warm start).
    eps_start : float or None, default None
        First level of the annealing; None: the squared diameter of the support / 4.
    scaling_factor : float, default 0.5
        Ratio of consecutive :math:`\varepsilon` levels.
    separable : bool, default True
        Apply grid kernels as 1-D products (False: the dense :math:`n \times n` kernel, for
        comparisons).
    warm_start : bool, default True
        Start each step from the potentials of the last step on the same support.
    relaxation : "auto" or float, default "auto"
        Over-relaxation of the scaling updates.
    cache_size : int, default 4
        Supports whose potentials are kept.
    dense_cache_entries : int, default ``DENSE_CACHE_ENTRIES``
        The largest :math:`n^2` for which a point-cloud kernel is stored.
    conic : Method or None, default None
        The method the pure reaction geometries (Hellinger, MMD) are delegated to (default
        :class:`~jko_ift.ConicJKO`).
    wfr_cost : {"inf_convolution", "hellinger_kantorovich"}, default "inf_convolution"
        For WFR geometries: the inf-convolution :math:`\inf_\nu W_2^2/\alpha +
        \mathrm{He}^2/\beta`, or the exact Hellinger-Kantorovich distance as logarithmic
        entropy transport, cost :math:`-\log\cos^2(\min(|x - y|/\ell, \pi/2))`,
        :math:`\ell = 2\sqrt{\alpha/\beta}` (dense kernel, log domain, separable energies).
        Other geometries ignore it.

    Raises
    ------
    ValueError
        For an unknown option (the message lists the options) or a non-positive ``eps`` or
        ``tol``.

    Notes
    -----
    For :math:`W_2` the step solves, over plans :math:`P \ge 0` with first marginal
    :math:`a`,

    .. math::

        \min_{P \ge 0,\; P\mathbf 1 = a}\; F(P^\top\mathbf 1) + \frac{1}{2\tau}
        \Big(\sum_{ij} P_{ij}|x_i - x_j|^2 + \varepsilon\,\mathrm{KL}(P \,|\, a\otimes\mathbf 1)\Big),

    and the new weights are :math:`b = P^\top\mathbf 1`; the entropy adds a spurious diffusion
    of order :math:`\varepsilon/\tau` per step (``EntropicBlurWarning`` when it dominates).
    WFR and IFT use the inf-convolution with their reaction.

    References
    ----------
    * G. Peyré, "Entropic approximation of Wasserstein gradient flows", SIAM J.
      Imaging Sci. 8 (2015).

    Examples
    --------
    >>> grid = jk.Grid(-2.0, 2.0, 20)
    >>> mu = grid.measure(lambda x: np.exp(-(x[:, 0] - 1) ** 2), normalize=True)
    >>> F = jk.Potential(lambda x: 0.5 * x[:, 0] ** 2)
    >>> r = jk.EntropicJKO(eps=0.05).step(F, jk.Wasserstein(), mu, tau=0.5)
    >>> bool(r.energy < F.value(mu)), bool(abs(r.measure.mass - 1) < 1e-6)
    (True, True)
    """

    keeps_support = True  # the points of mu^k, new weights
    local_error_order = 2  # O(tau^2) per step: implicit Euler (jko_ift.control)

    def __init__(self, eps: float = 1e-2, *, tol: float = DEFAULT_TOL, max_iter: int = 20_000,
                 domain: str = "auto", eps_scaling="auto", eps_start: float | None = None,
                 scaling_factor: float = 0.5, separable: bool = True, warm_start: bool = True,
                 relaxation="auto", cache_size: int = 4,
                 dense_cache_entries: int = DENSE_CACHE_ENTRIES, conic=None,
                 wfr_cost: str = "inf_convolution", **unknown):
        if unknown:
            raise ValueError(f"unknown EntropicJKO option(s) {sorted(unknown)}; the options are "
                             f"eps, {', '.join(_OPTIONS)}")
        self.eps = _positive("eps", eps, "e.g. EntropicJKO(eps=1e-3); eps is a squared length")
        self.tol = _positive("tol", tol, "e.g. tol=1e-6")
        self.max_iter = count("EntropicJKO", "max_iter", max_iter)
        if domain not in DOMAINS:
            raise ValueError(f"unknown domain {domain!r}; EntropicJKO supports {DOMAINS}")
        self.domain = domain
        if eps_scaling not in ("auto", True, False):
            raise ValueError(f"eps_scaling must be 'auto', True or False, got {eps_scaling!r}")
        self.eps_scaling = eps_scaling
        self.eps_start = None if eps_start is None else _positive("eps_start", eps_start, "")
        self.scaling_factor = fraction("EntropicJKO", "scaling_factor", scaling_factor, closed_high=False)
        if relaxation != "auto":
            relaxation = float(relaxation) if is_real(relaxation) else np.nan
            if not 1.0 <= relaxation < 2.0:
                raise ValueError(f"relaxation must be 'auto' or a number in [1, 2), got "
                                 f"{relaxation!r}; 1 is the plain Sinkhorn iteration")
        self.relaxation = relaxation
        self.separable = flag("EntropicJKO", "separable", separable)
        self.warm_start = flag("EntropicJKO", "warm_start", warm_start)
        self.cache_size = count("EntropicJKO", "cache_size", cache_size)
        self.dense_cache_entries = count("EntropicJKO", "dense_cache_entries", dense_cache_entries,
                                         minimum=0)
        if conic is not None and not callable(getattr(conic, "step", None)):
            raise ValueError(f"EntropicJKO conic must be a method with a step (e.g. jk.ConicJKO()) or "
                             f"None, got {conic!r}")
        self.conic = conic
        if wfr_cost not in WFR_COSTS:
            raise ValueError(f"unknown wfr_cost {wfr_cost!r}; EntropicJKO supports {WFR_COSTS}")
        self.wfr_cost = wfr_cost
        # Gibbs operators by support and eps: a pure cache (it never changes a result), shared
        # by the runs of this method; the warm starts live in the run's state
        self._operators: OrderedDict = OrderedDict()
        self._freeze()

    def __repr__(self) -> str:
        return (f"EntropicJKO(eps={self.eps:g}, tol={self.tol:g}, max_iter={self.max_iter}, "
                f"domain={self.domain!r}, eps_scaling={self.eps_scaling!r})")

    # -----------------------------------------------------------------------------------------
    def _step(self, F: Energy, geometry: Geometry, mu: Measure, tau: float, state,
              throw: bool = True) -> StepResult:
        """mu^{k+1} = argmin F(mu) + D_eps^2(mu, mu^k) / (2 tau), by entropic transport."""
        tau = check_step_input(F, geometry, mu, tau)
        if not geometry.has_transport:
            return self._delegate(F, geometry, mu, tau, throw, state)
        start = time.perf_counter()
        potentials = state.warm.setdefault("potentials", OrderedDict())
        if (self.wfr_cost == "hellinger_kantorovich" and geometry.reaction is not None
                and not geometry.reaction.quadratic):
            return self._hk_step(F, geometry, mu, tau, throw, start, potentials)
        key = (support_key(mu), Same(F), Same(geometry))
        last = potentials.get(key) if self.warm_start else None
        try:
            column = _ColumnFunction(F, geometry, mu, tau, last.zero if last is not None else None)
        except UnsupportedEnergyError as error:
            raise ValueError(str(error)) from None
        blur_ratio = self._check_blur(F, geometry, mu, tau, column.form.log_coef)
        levels = self._levels(mu, last is not None, column.kind)
        solver = _Sinkhorn(self, mu, column, tau * geometry.alpha,
                           last.omega if last is not None else None)
        state = solver.run(levels, last.psi if last is not None else None)
        result = column.result(mu, tau, geometry, solver, state)
        info = {**result.info, "eps": self.eps, "tau": float(tau), "alpha": float(geometry.alpha),
                "warm_start": last is not None, "levels": len(levels), "blur_ratio": blur_ratio}
        if result.ok and state.plan_times is not None:
            _check_grid_motion(F, geometry, mu, tau, result, state.plan_times, info)
        info["wall_time"] = time.perf_counter() - start
        result = replace(result, info=info)
        if result.measure is not None and not np.any(np.isnan(state.psi)):
            zero = column.envelope.zero.copy() if column.envelope is not None else None
            self._remember(potentials, key, _Warm(state.psi, solver.omega_start, zero))
        if throw and not result.ok:
            raise SolverError(_failure_message(result, self), result.status, result)
        return result

    # -----------------------------------------------------------------------------------------
    def _hk_step(self, F, geometry, mu, tau, throw, start, potentials):
        """The WFR step with the exact HK distance (LET form): docs/entropic.md §2b."""
        try:
            form = energy_form(F, mu)
            LETEnvelopeProx(form, 1.0, 1.0, None)  # refuses coupled energies
        except UnsupportedEnergyError as error:
            raise ValueError(str(error)) from None
        alpha, beta = geometry.alpha, geometry.beta
        key = (support_key(mu), Same(F), Same(geometry), "hellinger_kantorovich")
        blur_ratio = self._check_blur(F, geometry, mu, tau, form.log_coef)
        last = potentials.get(key) if self.warm_start else None
        psi, warm = (last.psi, True) if last is not None else (None, False)
        levels = self._levels(mu, warm, "WFR")
        mass = mu.mass if geometry.conserve_mass else None
        rho = tau * beta / 2.0

        def make_prox(eps_prime):
            return LETEnvelopeProx(form, rho, eps_prime, mass)

        solver = _LETSinkhorn(self, mu, alpha, beta)
        try:
            state = solver.run(levels, make_prox, psi)
        except UnsupportedEnergyError as error:
            raise ValueError(str(error)) from None
        info = dict(state.info)
        info.update(kind="WFR", wfr_cost="hellinger_kantorovich", eps=self.eps, tau=float(tau),
                    warm_start=warm, levels=len(levels), blur_ratio=blur_ratio,
                    length_scale=solver.ell)
        if state.log_b is None or not np.all(np.isfinite(state.gamma2)):
            info["wall_time"] = time.perf_counter() - start
            result = StepResult.failed("failed", info)
        else:
            weights = np.where(np.isfinite(state.log_b), np.exp(state.log_b), 0.0)
            weights = without_excluded(F, mu, weights)
            if mass is not None:
                weights *= mass / weights.sum()
            new = mu.with_weights(weights)
            energy = F.value(new)
            lam = 2.0 / (tau * beta)  # (4 / beta) / (2 tau)
            distance_sq = (4.0 / beta) * state.let_value(weights)
            entropic = lam * state.entropic
            info.update(entropic_term=float(entropic), intermediate=state.gamma2,
                        regularized_objective=float(energy + distance_sq / (2.0 * tau) + entropic),
                        wall_time=time.perf_counter() - start)
            status = "optimal" if state.violation <= self.tol else "max_iterations"
            result = StepResult.build(F, new, tau, distance_sq, status, state.violation, info,
                                      energy)
            if result.ok:
                op = self.hk_operator(mu, state.eps, solver.ell)
                f, g = state.f, state.g
                info = dict(info)
                _check_grid_motion(F, geometry, mu, tau, result,
                                   lambda w: np.exp(f + op.log_apply(g + np.log(w))), info)
                result = replace(result, info=info)
            if np.all(np.isfinite(state.g)):
                self._remember(potentials, key, _Warm(state.eps * state.g))
        if throw and not result.ok:
            raise SolverError(_failure_message(result, self), result.status, result)
        return result

    def hk_operator(self, mu: Measure, eps: float, ell: float) -> HKGibbs:
        return self._cached_operator((support_key(mu), eps, "hk", ell),
                                     lambda: HKGibbs(mu.points, eps, ell, self.dense_cache_entries))

    def _delegate(self, F, geometry, mu, tau, throw, state):
        """Pure reaction geometries: no transport, no entropic term; the exact step is cheap."""
        conic = self.conic
        if conic is None:
            from .conic import ConicJKO

            conic = state.cache.setdefault("conic", ConicJKO())
        if isinstance(conic, Method):  # its state is part of this run's
            inner = state.warm.get("conic_state") or conic.init_state(F, geometry, mu)
            result, state.warm["conic_state"] = conic.advance(F, geometry, mu, tau, inner, throw)
        else:
            result = conic.step(F, geometry, mu, tau, throw=throw)
        return replace(result, info={**result.info, "delegated_to": type(conic).__name__})

    def _levels(self, mu: Measure, warm: bool, kind: str = "W2") -> list[float]:
        """The eps levels of the step. "auto" anneals cold steps, except W2 steps on a grid
        with eps >= h^2 (the largest squared spacing): there the relaxed iteration started at
        the target eps converges in fewer iterations than the levels cost (measured on the
        Fokker-Planck benchmark: 23-54 iterations cold against 86-103 annealed)."""
        scaling = self.eps_scaling if self.eps_scaling != "auto" else not warm
        if self.eps_scaling == "auto" and kind == "W2" and mu.grid is not None:
            scaling = scaling and self.eps < float(np.max(mu.grid.spacing)) ** 2
        if not scaling:
            return [self.eps]
        if self.eps_start is not None:
            top = self.eps_start
        else:
            extent = mu.points.max(axis=0) - mu.points.min(axis=0)
            top = float(extent @ extent) / 4.0
        return eps_schedule(top, self.eps, self.scaling_factor)

    def operator(self, mu: Measure, eps: float):
        return self._cached_operator(
            (support_key(mu), eps, self.separable),
            lambda: gibbs_operator(mu, eps, self.separable, self.dense_cache_entries))

    def _cached_operator(self, key, build):
        """The Gibbs operator under ``key``, built once (least recently used evicted)."""
        op = self._operators.get(key)
        if op is None:
            op = self._operators[key] = build()
            while len(self._operators) > 2 * self.cache_size:
                self._operators.popitem(last=False)
        else:
            self._operators.move_to_end(key)
        return op

    def _remember(self, potentials: OrderedDict, key, warm: _Warm):
        potentials[key] = warm
        potentials.move_to_end(key)
        while len(potentials) > self.cache_size:
            potentials.popitem(last=False)

    def _check_blur(self, F, geometry, mu, tau, diffusion) -> float:
        """Blur / motion of the step (module constant BLUR_WARN_RATIO), warned once per step.

        blur^2 = d eps / 2 is the mean-square displacement the Gibbs kernel adds; the step's own
        is motion^2 = (tau alpha)^2 int |grad f|^2 dmu + 2 d tau alpha D, the drift plus the
        Brownian spread of the diffusion coefficient D of F (its log coefficient: 1 for
        Entropy and KL). For a diffusion the ratio is about sqrt(eps / (4 tau D)).
        """
        try:
            with np.errstate(all="ignore"):
                grad = F.grad_first_variation(mu)
                speed_sq = np.einsum("ij,ij->i", grad, grad)  # a row sum of (n, d) is slow in NumPy
                ok = np.isfinite(speed_sq) & (mu.weights > 0)
                drift_sq = np.sum(mu.weights[ok] * speed_sq[ok]) / mu.mass
        except (ValueError, NotImplementedError):
            drift_sq = 0.0
        tau_alpha = np.float64(tau) * geometry.alpha  # numpy: a huge tau gives inf, not OverflowError
        with np.errstate(over="ignore"):
            motion = float(np.sqrt(tau_alpha**2 * drift_sq + 2 * mu.dim * tau_alpha * diffusion))
        blur = np.sqrt(mu.dim * self.eps / 2.0)
        ratio = float(blur / motion) if motion > 0 else float("inf")
        if ratio > BLUR_WARN_RATIO:  # every step where it holds: jk.solve counts them once per run
            warn_user(
                f"entropic blur sqrt(d eps / 2) = {blur:.3g} is {ratio:.2g} times the rms "
                f"displacement of the step ({motion:.3g}, drift and diffusion): the entropic term "
                f"adds a diffusion of order eps / (4 tau) = {self.eps / (4 * tau):.3g} that is not "
                "small against the flow. Decrease eps (with domain='log' or 'auto') or take "
                "larger steps tau", EntropicBlurWarning)
        return ratio


def _check_grid_motion(F, geometry, mu, tau, result, plan_times, info: dict) -> None:
    """On a grid: the fraction of mass the plan moved and its mean displacement, from its
    barycentric map T(x_i) = (P x)_i / (P 1)_i (the Gibbs blur is symmetric: it puts mass off the
    diagonal but does not move barycentres, so a locked entropic step has T = id), against the
    flow (``grid_motion``); warns ``GridLockingWarning`` when the step is locked or rounds.
    Products with the plan only: separable kernels on grids, no n x n matrix."""
    if mu.grid is None:
        return
    moved, displacement = barycentric_motion(mu, plan_times)
    info["moved_fraction"] = moved
    blurred = (info.get("blur_ratio", 0.0) > BLUR_WARN_RATIO
               or info["eps"] >= SUBCELL_BLUR * float(np.max(mu.grid.spacing)) ** 2)
    check_step(F, geometry, mu, result.measure, tau, moved, displacement, info,
               judge_rounding=not blurred)


def _positive(name, value, hint) -> float:
    if not is_real(value):  # not True, not "1e-3"
        raise ValueError(f"{name} must be a positive number, got {value!r}; {hint}")
    value = float(value)
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}; {hint}")
    return value


def _failure_message(result: StepResult, method: EntropicJKO) -> str:
    info = result.info
    what = {
        "max_iterations": (f"the marginal violation reached {result.certificate:.3g} after "
                          f"{info.get('iterations')} iterations, above tol = {method.tol:.3g}"),
        "overflow": ("the kernel-domain scalings left the float range at "
                     f"eps = {info.get('eps_reached', method.eps):.3g}"),
    }.get(result.status, f"status {result.status!r}")
    stopped = info.get("stopped")
    reached = info.get("marginal_violation", np.inf)
    violation = (f", marginal violation {reached:.3g} (tol {method.tol:.3g}),"
                 if np.isfinite(reached) else "")
    if stopped:
        return (
            f"entropic JKO step failed: the iterations stopped at eps = "
            f"{info.get('eps_reached', method.eps):.3g} after {info.get('iterations')} iterations"
            f"{violation} because {stopped} (target eps = {method.eps:.3g}, "
            f"tau = {info.get('tau', np.nan):.3g}, "
            f"{info.get('domain')} domain). Sinkhorn is slow when eps is far below the squared "
            "spacing of the support, and when the energy pins the new measure: its mass mode "
            "contracts only like 1 - 1 / (1 + sigma) per iteration, sigma = 2 tau alpha / eps = "
            f"{2 * info.get('tau', np.nan) * info.get('alpha', 1.0) / method.eps:.3g}. Increase eps "
            "(eps near h^2 on a grid of spacing h), take a smaller tau, or use jk.ConicJKO (the exact "
            "step, no eps); pass throw=False to get the StepResult instead"
        )
    return (
        f"entropic JKO step failed: {what} (eps = {method.eps:.3g}, {info.get('domain')} domain). "
        "Raise max_iter (iterations grow like 1/eps), loosen tol, increase eps, or use "
        "domain='log' for small eps; pass throw=False to get the StepResult instead"
    )


# ---------------------------------------------------------------------------------------------
# The column function: W2 (F itself), WFR and IFT (reaction envelopes of F)
# ---------------------------------------------------------------------------------------------


class _ColumnFunction:
    """What the second marginal of the plan pays, and how the new measure is read off it."""

    def __init__(self, F: Energy, geometry: Geometry, mu: Measure, tau: float, zero=None):
        if not geometry.has_transport:
            raise UnsupportedEnergyError(f"EntropicJKO does not know the geometry {geometry!r}")
        self.F, self.geometry = F, geometry
        self.form = energy_form(F, mu)
        # the reaction declares its kind: Hellinger (an envelope of its own) or a quadratic
        # metric (the MMD envelope, any metric G = M + ridge I)
        reaction = geometry.reaction
        self.kind = "W2" if reaction is None else ("IFT" if reaction.quadratic else "WFR")
        self.envelope = MMDEnvelope(self.form, geometry, mu, tau, zero) if self.kind == "IFT" else None
        self.mass = mu.mass if geometry.conserve_mass else None
        self.tau_beta = None if self.kind == "W2" else tau * geometry.beta
        self._proxes: dict = {}

    def prox(self, eps: float, tau_alpha: float):
        """The KL-proximal map log q -> log nu of sigma G, sigma = 2 tau alpha / eps."""
        prox = self._proxes.get(eps)
        if prox is None:
            sigma = 2.0 * tau_alpha / eps
            if self.kind == "W2":
                prox = KLProx(self.form, sigma)
            elif self.kind == "IFT":
                prox = EnvelopeProx(self.envelope, sigma)
            else:
                prox = HellingerEnvelopeProx(self.form, sigma, self.tau_beta, self.mass)
            self._proxes[eps] = prox
        return prox

    def result(self, mu, tau, geometry, solver, state) -> StepResult:
        a, alpha = mu.weights, geometry.alpha
        info = {"kind": self.kind, "domain": state.domain, "iterations": state.iterations,
                "marginal_violation": state.violation, "kernel": solver.kernel_kind,
                "newton_steps": state.newton_steps, "eps_reached": state.eps,
                "relaxation": state.relaxation, "iteration_time": state.iteration_time}
        if state.stopped is not None:
            info["stopped"] = state.stopped
        if state.status == "overflow" or state.nu is None or not np.all(np.isfinite(state.nu)):
            status = ("overflow" if state.status == "overflow"
                      else "max_iterations" if state.stopped else "failed")
            return StepResult.failed(status, info)
        nu = np.maximum(state.nu, 0.0)  # the column marginal of the plan, whose rows are a
        if self.kind == "W2":
            weights = nu * (mu.mass / nu.sum())  # removes round-off only: sum(nu) = sum(a)
        elif self.kind == "IFT":
            weights = self.envelope.minimizer(nu)
        else:
            weights = np.exp(state.prox.log_b)
        negative = float(-weights[weights < 0].sum())
        weights = without_excluded(self.F, mu, np.maximum(weights, 0.0))
        if self.mass is not None and self.kind != "W2":
            weights *= self.mass / weights.sum()
        new = mu.with_weights(weights)
        energy = self.F.value(new)
        # eps sum P log(P / a) = eps [sum_i a_i log(u_i / a_i) + sum_j nu_j log v_j] - <C, P>
        cost = state.transport_cost
        with np.errstate(invalid="ignore"):
            entropic = state.eps * (np.sum(np.where(a > 0, a * state.log_u_over_a, 0.0))
                                    + np.sum(np.where(nu > 0, nu * state.log_v, 0.0))) - cost
        distance_sq = geometry.step_distance(cost, mu.points, nu, weights)
        # the problem solved: the JKO objective plus the entropic term (in info, not objective)
        objective = energy + (distance_sq + entropic / alpha) / (2 * tau)
        gap = self._gap(mu, state, nu, tau)
        info.update(transport_cost=float(cost), entropic_term=float(entropic),
                    regularized_objective=float(objective),
                    dual_gap=gap, relative_dual_gap=(gap / max(1.0, abs(objective))
                                                     if gap is not None else None),
                    intermediate=nu, negative_mass_clipped=negative)
        converged = (state.violation <= solver.tol and state.stopped is None
                     and getattr(state.prox, "settled", True))
        status = "optimal" if converged else "max_iterations"
        return StepResult.build(self.F, new, tau, distance_sq, status, state.violation, info, energy)

    def _gap(self, mu, state, nu, tau) -> float | None:
        """Primal minus dual value at the final potentials (docs/entropic.md, §3).

        With u updated last, the plan is feasible and the dual at (u, v) is attained by the
        prox output nu_p; the gap is the Bregman divergence of the column function G between
        the plan's marginal nu and nu_p: G(nu) - G(nu_p) - <grad G(nu_p), nu - nu_p>.
        """
        nu_p = state.nu_prox
        if nu_p is None:
            return None
        if self.kind == "W2":
            try:
                with np.errstate(all="ignore"):
                    new, old = mu.with_weights(nu), mu.with_weights(nu_p)
                    f = self.F.first_variation(old)
                    diff = nu - nu_p
                    inner = np.sum(np.where(diff != 0, f * diff, 0.0))
                    gap = self.F.value(new) - self.F.value(old) - inner
            except ValueError:
                return None
            return float(max(gap, 0.0)) if np.isfinite(gap) else None
        if self.kind == "IFT":
            return max(self.envelope.bregman(nu, nu_p), 0.0)
        return None


# ---------------------------------------------------------------------------------------------
# The iterations
# ---------------------------------------------------------------------------------------------


class _State:
    def __init__(self):
        self.iterations = 0
        self.newton_steps = 0
        self.violation = np.inf
        self.domain = None
        self.status = "max_iterations"
        self.psi = None
        self.nu = self.nu_prox = None
        self.log_u_over_a = self.log_v = None
        self.transport_cost = np.nan
        self.eps = None
        self.prox = None
        self.relaxation = 1.0
        self.plan_times = None  # P w for w > 0, of the final plan
        self.stopped = None  # why the iterations stopped before max_iter without converging
        self.iteration_time = 0.0  # seconds in the scaling iterations (the rest: set-up, checks)


class _Sinkhorn:
    """Generalized Sinkhorn on the levels of eps, kernel or log domain (engine: ``scaling``)."""

    def __init__(self, method: EntropicJKO, mu: Measure, column: _ColumnFunction, tau_alpha: float,
                 omega_start: float | None = None):
        self.method, self.mu, self.column, self.tau_alpha = method, mu, column, tau_alpha
        self.omega_start = omega_start  # updated to the omega tuned on each level
        self.rows = HardRows(mu.weights)
        self.a, self.positive, self.log_a = mu.weights, self.rows.positive, self.rows.log_a
        self.tol = method.tol
        self.kernel_kind = ("separable" if (mu.grid is not None and method.separable)
                            else "dense")

    def run(self, levels, psi) -> _State:
        state = _State()
        psi = np.zeros(self.mu.n) if psi is None else psi.copy()
        domain = "kernel" if self.method.domain in ("auto", "kernel") else "log"
        for level in eps_levels(levels, self.method.max_iter, self.tol, lambda: state.iterations):
            op = self.method.operator(self.mu, level.eps)
            prox = self.column.prox(level.eps, self.tau_alpha)
            state.eps, state.prox = level.eps, prox
            budget = level.budget
            if domain == "kernel" and not self._kernel(op, prox, level, psi, state):
                if self.method.domain == "kernel":
                    state.status, state.domain = "overflow", "kernel"
                    return state
                domain = "log"
                psi = state.psi
                budget = max(level_budget(self.method.max_iter, state.iterations, level.last), 1)
            if domain == "log":
                self._log(op, prox, level, budget, psi, state)
            psi = state.psi
            if state.stopped is not None:
                break
        state.newton_steps = sum(getattr(p, "newton_steps", 0) for p in self._proxes())
        return state

    def _proxes(self):
        for prox in self.column._proxes.values():
            yield prox if isinstance(prox, EnvelopeProx) else getattr(prox, "equation", prox)

    # -- relaxation ----------------------------------------------------------------------------
    def _relaxation(self, last: bool) -> Relaxation:
        """"auto": adaptive on every level, started at the omega tuned last (on this support
        in the previous step, or on the previous level); the first level of a cold W2 step at
        COLD_RELAXATION, IFT's after a plain probe."""
        setting = self.method.relaxation
        if setting == "auto":
            start = self.omega_start
            if start is None and self.column.kind == "W2":
                start = COLD_RELAXATION
            return Relaxation(1.0, adaptive=True, start=start)
        if not last or setting == 1.0:
            return Relaxation(1.0, adaptive=False)
        return Relaxation(float(setting), adaptive=False)

    # -- kernel domain -------------------------------------------------------------------------
    def _kernel(self, op, prox, level, psi, state) -> bool:
        """One level in the kernel domain; False: continue in the log domain from state.psi."""
        eps = level.eps
        with np.errstate(all="ignore"):
            log_v = psi / eps
            if out_of_range(np.exp(log_v), log_v):
                state.psi = psi
                return False
        if getattr(prox, "closed", False):
            scalings = ClosedKernelScalings(op, self.rows, prox, log_v, check=lambda: _unresolved(prox),
                                            exact_below=EXACT_BELOW * level.tol)
        else:
            scalings = KernelScalings(op, self.rows, prox, log_v, check=lambda: _unresolved(prox))
        relax = self._relaxation(level.last)
        started = time.perf_counter()
        outcome = iterate(scalings, relax, level.tol, level.budget, futile,
                          f"eps {level.eps:.2g}", settle=level.last)
        state.iteration_time += time.perf_counter() - started
        state.iterations += outcome.iterations
        state.stopped = outcome.stopped
        with np.errstate(all="ignore"):
            if outcome.broken:
                state.psi = eps * np.log(scalings.good_v)
                state.domain = "log"
                return False
            state.violation, state.domain, state.relaxation = outcome.violation, "kernel", relax.peak
            self.omega_start = relax.tuned if relax.adaptive else self.omega_start
            state.psi = eps * scalings.log_v
            return self._kernel_plan(op, scalings, state) if level.last else True

    def _kernel_plan(self, op, scalings, state) -> bool:
        """Finish with a u-update: the plan is then feasible (rows a) and its columns nu."""
        v, kv = scalings.v, scalings.kv
        nu_prox = v * scalings.q
        u = np.where(self.positive, self.a / kv, 0.0)
        nu = v * op.apply(u)
        if not (np.all(np.isfinite(nu)) and np.all(np.isfinite(u))):
            state.psi = state.eps * np.log(scalings.good_v)
            return False
        state.nu, state.nu_prox = nu, nu_prox
        state.log_u_over_a = -np.log(kv)
        state.log_v = scalings.log_v
        state.plan_times = PlanProducts(lambda w: u * op.apply(v * w))
        state.transport_cost = transport_cost(self.mu.points, self.a, nu, state.plan_times)
        return True

    # -- log domain ----------------------------------------------------------------------------
    def _log(self, op, prox, level, budget, psi, state) -> None:
        with np.errstate(all="ignore"):
            g = psi / level.eps
        scalings = LogScalings(op, self.rows, prox, g, check=lambda: _unresolved(prox))
        relax = self._relaxation(level.last)
        started = time.perf_counter()
        outcome = iterate(scalings, relax, level.tol, budget, futile, f"eps {level.eps:.2g}",
                          settle=level.last)
        state.iteration_time += time.perf_counter() - started
        state.iterations += outcome.iterations
        state.stopped = outcome.stopped
        state.violation, state.domain, state.relaxation = outcome.violation, "log", relax.peak
        self.omega_start = relax.tuned if relax.adaptive else self.omega_start
        state.psi = level.eps * scalings.log_v
        if level.last:
            with np.errstate(all="ignore"):
                self._log_plan(op, scalings, state)

    def _log_plan(self, op, scalings, state) -> None:
        """Finish with an f-update: the plan is then feasible (rows a) and its columns nu."""
        g, log_kv = scalings.log_v, scalings.log_kv
        nu_prox = np.exp(g + scalings.log_q)
        f = scalings.f_next  # log a - log K v: the rows of the plan are a
        nu = np.exp(g + op.log_apply(f))
        state.nu, state.nu_prox = nu, nu_prox
        state.log_u_over_a = -log_kv
        state.log_v = g
        state.plan_times = PlanProducts(lambda w: np.exp(f + op.log_apply(g + np.log(w))))
        state.transport_cost = transport_cost(self.mu.points, self.a, nu, state.plan_times)


def _unresolved(prox) -> str | None:
    """Why the last KL-proximal map of a coupled energy (MMD2, Interaction, the IFT envelope)
    is not trustworthy (its Newton solve ended above PROX_FAIL_RESIDUAL), or None."""
    source = prox if hasattr(prox, "unresolved") else getattr(prox, "equation", None)
    if source is None or not getattr(source, "unresolved", 0):
        return None
    return (f"the KL-proximal map of the coupled energy did not converge (Newton residual "
            f"{source.worst_residual:.3g}): the column function is too stiff at this eps "
            "(sigma = 2 tau alpha / eps times its curvature)")


# ---------------------------------------------------------------------------------------------
# The Hellinger-Kantorovich option: scaling iterations with two soft (KL) marginals
# ---------------------------------------------------------------------------------------------


def _kl(x: np.ndarray, y: np.ndarray) -> float:
    """sum x log(x / y) - x + y, with 0 log 0 = 0 (inf where x > 0 = y)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(x > 0, x * np.log(x / y), 0.0) - x + y
    return float(np.sum(terms))


class _LETState:
    def __init__(self):
        self.iterations = 0
        self.violation = np.inf
        self.log_b = self.g = self.f = None
        self.gamma1 = self.gamma2 = None
        self.eps = None
        self.info: dict = {}
        self.entropic = np.nan
        self.plan_cost = np.nan
        self.a = None
        self.relaxation = 1.0

    def let_value(self, b: np.ndarray) -> float:
        """KL(gamma_1 | a) + KL(gamma_2 | b) + <c, gamma> of the plan (dimensionless LET)."""
        return _kl(self.gamma1, self.a) + _kl(self.gamma2, b) + self.plan_cost


class _LETSinkhorn:
    """Log-domain scaling iterations (Chizat et al. 2018) for the entropic LET problem

        min_gamma  KL(gamma_1 | a) + G(gamma_2) + <c, gamma> + eps' KL(gamma | R),

    c = -log cos^2(min(|x - y| / ell, pi / 2)), eps' = eps / ell^2, R_ij = a_i / Z_i with
    Z_i = sum_j exp(-c_ij / eps') (rows of the reference Gibbs plan sum to a), and G given by
    ``make_prox(eps')``, a callable log q -> log nu (the KL-prox of G / eps') with an attribute
    ``log_b`` (the measure read off the column). gamma_ij = exp(f_i + g_j - c_ij / eps').
    """

    def __init__(self, method: EntropicJKO, mu: Measure, alpha: float, beta: float):
        self.method, self.mu = method, mu
        self.ell = 2.0 * np.sqrt(alpha / beta)
        self.a = mu.weights
        self.mass = mu.mass
        with np.errstate(divide="ignore"):
            self.log_a = np.log(self.a)

    def _relaxation(self, last: bool) -> Relaxation:
        """Over-relaxation as in ``_Sinkhorn``: here it matters more, the soft marginals make
        the plain iteration contract only like (1 + eps')^-2 in the mass direction."""
        setting = self.method.relaxation
        if not last or setting == 1.0:
            return SoftRelaxation(1.0, adaptive=setting == "auto" and not last)
        if setting == "auto":
            return SoftRelaxation(1.0, adaptive=True)
        return SoftRelaxation(float(setting), adaptive=False)

    def run(self, levels, make_prox, psi) -> _LETState:
        state = _LETState()
        state.a = self.a
        n = self.mu.n
        g = np.zeros(n) if psi is None else psi / levels[0]
        ell2 = self.ell**2
        positive = self.a > 0
        for level in eps_levels(levels, self.method.max_iter, self.method.tol,
                                lambda: state.iterations):
            op = self.method.hk_operator(self.mu, level.eps, self.ell)
            eps_prime = level.eps / ell2
            theta = 1.0 / (1.0 + eps_prime)
            prox = make_prox(eps_prime)
            with np.errstate(all="ignore"):
                log_z = op.log_apply(np.zeros(n))
                log_w = np.where(positive, self.log_a - log_z, -np.inf)
                # f = log u: the KL-prox of KL(. | a) / eps' at p = w (k v), divided by k v
                row_const = np.where(positive, theta * self.log_a + (1 - theta) * log_w, -np.inf)
            rows = SoftRows(positive, row_const, theta, self.mass)
            scalings = LogScalings(op, rows, prox, g, stop_if_not_finite=True)
            relax = self._relaxation(level.last)
            outcome = iterate(scalings, relax, level.tol, level.budget, stage=f"eps {level.eps:.2g}")
            state.iterations += outcome.iterations
            f, g = scalings.log_u, scalings.log_v
            state.violation, state.relaxation = outcome.violation, relax.peak
            state.eps = level.eps
        # the plan at (f, g): gamma_2 is the prox output nu, gamma_1 within tol of its prox
        with np.errstate(all="ignore"):
            state.f, state.g = f, g
            state.gamma1 = np.where(positive, np.exp(f + op.log_apply(g)), 0.0)
            state.gamma2 = np.exp(g + op.log_apply(f))
            state.log_b = prox.log_b
            cost = op.plan_cost(f, g)  # <ell^2 c, gamma>
            state.plan_cost = cost / ell2
            g1, g2 = state.gamma1, state.gamma2
            # eps' [sum gamma (log(gamma Z_i / a_i) - 1) + sum a]; log gamma = f + g - ell^2 c/eps
            row = np.sum(np.where(g1 > 0, g1 * (f + log_z - self.log_a), 0.0))
            col = np.sum(np.where(g2 > 0, g2 * g, 0.0))
            state.entropic = float(eps_prime * (row + col - g1.sum() + self.a.sum())
                                   - cost / ell2)
        state.info = {"domain": "log", "kernel": "dense_hk", "iterations": state.iterations,
                      "marginal_violation": state.violation, "eps_reached": state.eps,
                      "relaxation": state.relaxation, "newton_steps": getattr(prox, "newton_steps", 0),
                      "transport_cost": float(cost), "dual_gap": None}
        return state
