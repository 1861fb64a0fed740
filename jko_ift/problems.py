"""Named problems: closed-form flows for tests and studies, and the paper's 2-D targets.

The Fokker-Planck flow on 1-D particles (``ornstein_uhlenbeck_particles``) carries two
references: the exact flow at the particles' quantiles and the particle ODE integrated by Radau
(``particle_flow``), which separate the time error of a scheme from its spatial floor."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np
from scipy import sparse, special

from .diagnostics import mmd
from .energies import MMD2, Energy, Entropy, PorousMedium, Potential, line_terms, position_derivatives
from .geometries import IFT, MMD, WFR, Geometry, Wasserstein
from .kernels import Gaussian, Kernel
from .measures import Grid, Measure
from .methods.base import Method, MethodState, relatively_close
from .methods.options import positive

#: The paper's 2-D mixture target (Gladin et al. 2024, section 5): equal weights.
PAPER_MIXTURE = (
    ((0.0, 0.0), ((1.0, 0.5), (0.5, 2.0))),
    ((3.0, -1.0), ((1.0, 0.0), (0.0, 1.0))),
    ((1.0, 4.0), ((3.0, 0.5), (0.5, 1.0))),
)


@dataclass(frozen=True)
class Problem:
    """An energy, a geometry, an initial measure and a horizon; ``error(trajectory)`` is the
    largest distance of the saved measures to the reference (a closed form if there is one)."""

    name: str
    energy: Energy
    geometry: Geometry
    initial: Measure
    t_final: float
    error: Callable | None = None


def gaussian_density(mean, covariance) -> Callable[[np.ndarray], np.ndarray]:
    """The normal density N(mean, covariance) as a callable on points (n, d)."""
    mean, covariance = np.atleast_1d(mean).astype(float), np.atleast_2d(covariance).astype(float)
    precision = np.linalg.inv(covariance)
    norm = np.sqrt(np.linalg.det(2 * np.pi * covariance))

    def density(x):
        centred = x - mean
        return np.exp(-0.5 * np.einsum("ni,ij,nj->n", centred, precision, centred)) / norm

    return density


def paper_mixture_density(x: np.ndarray) -> np.ndarray:
    """The paper's equal-weight mixture of three 2-D Gaussians, on points (n, 2)."""
    return sum(gaussian_density(m, c)(x) for m, c in PAPER_MIXTURE) / len(PAPER_MIXTURE)


def mmd_flow(cells: int = 30, kernel_width: float = 1.0, t_final: float = 5.0) -> Problem:
    """1/2 MMD^2 in the MMD geometry on a 1-D grid: mu_t = pi + e^{-t}(mu_0 - pi) exactly."""
    grid = Grid(-3, 3, cells)
    kernel = Gaussian(kernel_width)
    mu0 = grid.measure(gaussian_density(1.5, 0.25), normalize=True)
    target = grid.measure(gaussian_density(-1.0, 0.4), normalize=True)

    def error(trajectory):
        return max(mmd(mu, target.with_weights(target.weights + np.exp(-t) * (mu0.weights - target.weights)),
                       kernel) for t, mu in zip(trajectory.times, trajectory.measures, strict=True))

    return Problem("mmd_flow", MMD2(target, kernel), MMD(kernel), mu0, t_final, error)


def ornstein_uhlenbeck(cells: int = 300, mean: float = 3.0, sd: float = 1.0, kappa: float = 1.0,
                       t_final: float = 3.0) -> Problem:
    """Fokker-Planck F = Entropy + kappa |x|^2 / 2 under W2 on a 1-D grid, from N(mean, sd^2):
    N(mean e^{-kappa t}, 1/kappa + (sd^2 - 1/kappa) e^{-2 kappa t}) exactly (docs/theory.md §5).
    The error is |mean - m(t)| + |sd - s(t)| (grid error about h^2 below it)."""
    grid = Grid(mean - 6 * sd - 2, mean + 6 * sd, cells)
    mu0 = grid.measure(gaussian_density(mean, sd**2), normalize=True)
    energy = Entropy() + Potential(lambda x: 0.5 * kappa * x[:, 0] ** 2, lambda x: kappa * x)

    def error(trajectory):
        worst = 0.0
        for t, mu in zip(trajectory.times, trajectory.measures, strict=True):
            m_t = mean * np.exp(-kappa * t)
            s_t = np.sqrt(1 / kappa + (sd**2 - 1 / kappa) * np.exp(-2 * kappa * t))
            worst = max(worst, abs(mu.mean()[0] - m_t) + abs(np.sqrt(mu.covariance()[0, 0]) - s_t))
        return worst

    return Problem("ornstein_uhlenbeck", energy, Wasserstein(), mu0, t_final, error)


def porous_medium(cells: int = 200, t0: float = 1.0, t_final: float = 1.0) -> Problem:
    """Porous medium F = PorousMedium(2) under W2 on a 1-D grid, from the Barenblatt profile at
    time t0: rho(t, x) = A(t) (r(t)^2 - x^2)_+ with r(t)^3 = 9 t and A = 3 / (4 r^3) (mass 1,
    docs/theory.md §6), so the profile at time t0 + t has the spread r(t0 + t) / sqrt(5). The
    error is |sd(mu) - r / sqrt(5)| (grid error of order h^2 below it)."""
    def radius(t):
        return (9.0 * t) ** (1.0 / 3.0)

    half_width = radius(t0 + t_final) + 0.5
    grid = Grid(-half_width, half_width, cells)
    mu0 = grid.measure(lambda x: np.maximum(radius(t0) ** 2 - x[:, 0] ** 2, 0.0), normalize=True)

    def error(trajectory):
        return max(abs(np.sqrt(mu.covariance()[0, 0]) - radius(t0 + t) / np.sqrt(5.0))
                   for t, mu in zip(trajectory.times, trajectory.measures, strict=True))

    return Problem("porous_medium", PorousMedium(2.0), Wasserstein(), mu0, t_final, error)


def ift_paper_mixture(cells: int = 14, kernel_width: float = 2.0, alpha: float = 5.0,
                      beta: float = 1.0, t_final: float = 2.0) -> Problem:
    """IFT flow of 1/2 MMD^2 to the paper's 2-D mixture target, from N((3, 3), I), on a grid of
    [-4, 7]^2. No closed form: ``error`` is None; compare with a run of much smaller tau.
    (The paper's particles start at (5, 5) with kernel width 10; a grid holding both and a
    Gram matrix that is not numerically of rank one need a closer start and a narrower kernel.)
    """
    grid = Grid([-4.0, -4.0], [7.0, 7.0], [cells, cells])
    target = grid.measure(paper_mixture_density, normalize=True)
    mu0 = grid.measure(gaussian_density([3.0, 3.0], np.eye(2)), normalize=True)
    kernel = Gaussian(kernel_width)
    return Problem("ift_paper_mixture", MMD2(target, kernel), IFT(kernel, alpha, beta), mu0, t_final)


# ------------------------------------------------------------------ the Fokker-Planck flow on particles
#: Relative tolerance of the Radau integration of the particle ODE (``particle_flow``): far below
#: the O(tau) errors of the schemes it is the reference for (>= 1e-5 at tau >= 1e-3).
SEMI_DISCRETE_RTOL = 1e-10


@dataclass(frozen=True)
class ParticleProblem(Problem):
    """A Problem on 1-D particles with two references for the error of a scheme.

    exact(t): the particles of the exact flow at time t (a Measure with the weights of
    ``initial``); ``error(trajectory)`` is the largest ``line_w2`` to them over the saved times.
    ``semi_discrete(times)``: the particle ODE x_i' = -(1/a_i) dF_n/dx_i of the same particles,
    integrated by Radau (``particle_flow``). scheme - semi_discrete is the time error, and
    semi_discrete - exact the spatial floor. method_factory: a fresh method of the kind the
    problem is posed for.
    """

    exact: Callable[[float], Measure] | None = None
    method_factory: Callable[[], object] | None = None

    def semi_discrete(self, times, rtol: float = SEMI_DISCRETE_RTOL) -> list[Measure]:
        """The particle ODE from ``initial`` at ``times`` (nondecreasing, >= 0): [Measure]."""
        return particle_flow(self.energy, self.initial, times, rtol)


def gaussian_quantile_particles(n: int, mean: float, sd: float) -> Measure:
    """n equal-weight 1-D particles at the quantile midpoints mean + sd Phi^{-1}((i + 1/2) / n),
    i = 0 .. n - 1 (points (n, 1), weights 1/n)."""
    quantiles = special.ndtri((np.arange(n) + 0.5) / n)
    return Measure((mean + sd * quantiles)[:, None], np.full(n, 1.0 / n))


def line_w2(mu: Measure, nu: Measure) -> float:
    """W2 between two 1-D measures of n particles with the same weights (up to sorting):
    sqrt(sum_i a_i (x_(i) - y_(i))^2) over the sorted points, exact for equal weights."""
    if mu.dim != 1 or nu.dim != 1 or mu.n != nu.n:
        raise ValueError(f"line_w2 needs two 1-D measures with the same number of particles, got "
                         f"points {mu.points.shape} and {nu.points.shape}")
    if not np.allclose(mu.weights, mu.weights[0], rtol=1e-12, atol=0) or not np.allclose(
            nu.weights, mu.weights[0], rtol=1e-12, atol=0):
        raise ValueError("line_w2 needs equal weights on both measures (the sorted coupling is "
                         "optimal only then); use jk.w2 for other weights")
    gap = np.sort(mu.points[:, 0]) - np.sort(nu.points[:, 0])
    return float(np.sqrt(mu.weights @ gap**2))


def particle_flow(F: Energy, mu0: Measure, times, rtol: float = SEMI_DISCRETE_RTOL) -> list[Measure]:
    """The W2 particle ODE x_i' = -(1/a_i) dF_n/dx_i of 1-D particles (weights fixed), by
    SciPy's Radau (implicit, order 5) with its analytic tridiagonal Jacobian -diag(1/a) H
    (``energies.position_derivatives``; stiff: the entropy's eigenvalues grow like n^2).

    F: Potential, Entropy and PorousMedium terms (``energies.line_terms``); mu0: particles
    (n, 1) with positive weights; times: nondecreasing, >= 0. Returns one Measure per time.
    Tolerances rtol and atol = rtol max(1, max |x_0|).
    """
    terms = line_terms(F)
    if terms is None or mu0.dim != 1 or np.any(mu0.weights <= 0):
        raise ValueError("particle_flow integrates 1-D particles with positive weights under "
                         "Potential, Entropy and PorousMedium terms; got points "
                         f"{mu0.points.shape} and {type(F).__name__}")
    times = np.atleast_1d(np.asarray(times, dtype=float))
    if times.ndim != 1 or np.any(times < 0) or np.any(np.diff(times) < 0):
        raise ValueError(f"times must be nondecreasing and >= 0, got {times}")
    a, x0 = mu0.weights, mu0.points[:, 0].copy()

    def velocity(_, x):
        return -position_derivatives(terms, x, a, hessian=False).gradient / a

    def jacobian(_, x):
        derivatives = position_derivatives(terms, x, a)
        hessian = sparse.diags([derivatives.upper, derivatives.diagonal, derivatives.upper],
                               [-1, 0, 1], format="csc")
        return -sparse.diags(1.0 / a) @ hessian

    if times[-1] == 0:
        return [mu0 for _ in times]
    from scipy.integrate import solve_ivp  # the reference solutions only

    solution = solve_ivp(velocity, (0.0, times[-1]), x0, method="Radau", t_eval=times, rtol=rtol,
                         atol=rtol * max(1.0, float(np.abs(x0).max())), jac=jacobian)
    if not solution.success:
        raise RuntimeError(f"Radau failed on the particle ODE: {solution.message}")
    return [Measure(x[:, None], a) for x in solution.y.T]


def quadratic_w2_particles(minimum=(1.0, 0.5), center=(3.0, 2.0), t_final: float = 8.0, n: int = 20,
                           seed: int = 0) -> Problem:
    """V = |x - m|^2 / 2 under W2 on n equal particles from N(center, 0.5^2 I) in 2-D: each
    particle follows x(t) = m + e^{-t} (x0 - m); the error is the largest
    sqrt(sum_i a_i |x_i - x_i(t)|^2) over the saved times."""
    minimum = np.asarray(minimum, float)
    rng = np.random.default_rng(seed)
    mu0 = Measure(rng.normal(size=(n, 2)) * 0.5 + np.asarray(center, float), np.full(n, 1 / n))
    energy = Potential(lambda x: 0.5 * ((x - minimum) ** 2).sum(1), lambda x: x - minimum)

    def error(trajectory):
        return max(np.sqrt(mu.weights @ ((mu.points - minimum - np.exp(-t) * (mu0.points - minimum))
                                         ** 2).sum(1))
                   for t, mu in zip(trajectory.times, trajectory.measures, strict=True))

    name = f"w2_quadratic (m = {minimum.tolist()}, x0 ~ N({list(center)}, 0.25 I), {n} particles)"
    return Problem(name, energy, Wasserstein(), mu0, t_final, error)


def ornstein_uhlenbeck_particles(n: int = 200, m0: float = 3.0, s0: float = 0.5,
                                 t_final: float = 3.0) -> ParticleProblem:
    """Fokker-Planck F = Entropy + |x|^2 / 2 under W2 on n equal-weight 1-D particles, for
    jk.ParticleJKO: the flow of N(m0, s0^2) is N(m(t), s(t)^2) with m(t) = m0 e^{-t} and
    s(t)^2 = 1 + (s0^2 - 1) e^{-2t} (docs/theory.md §5). The particles start at the quantile
    midpoints of N(m0, s0^2) (``gaussian_quantile_particles``); ``exact(t)`` is the same
    quantile particles of N(m(t), s(t)^2), and the error is sqrt(sum_i a_i (x_i - x_i^exact)^2),
    the W2 between the two particle measures. The entropy is the Lagrangian one
    (``energies.InternalEnergy``); its spatial floor is about 0.023 n^{-1/2} in W2 at the
    stationary state, whose variance is exactly (n - 1) / n (docs/particles.md §8)."""
    energy = Entropy() + Potential(lambda x: 0.5 * x[:, 0] ** 2, lambda x: x)

    def exact(t: float) -> Measure:
        return gaussian_quantile_particles(n, m0 * np.exp(-t), np.sqrt(1 + (s0**2 - 1) * np.exp(-2 * t)))

    def error(trajectory):
        return max(line_w2(mu, exact(t)) for t, mu in zip(trajectory.times, trajectory.measures,
                                                          strict=True))

    from .methods import ParticleJKO

    return ParticleProblem("ornstein_uhlenbeck_particles", energy, Wasserstein(),
                           gaussian_quantile_particles(n, m0, s0), t_final, error, exact, ParticleJKO)


PROBLEMS = {"mmd_flow": mmd_flow, "ornstein_uhlenbeck": ornstein_uhlenbeck,
            "porous_medium": porous_medium,
            "ornstein_uhlenbeck_particles": ornstein_uhlenbeck_particles,
            "ift_paper_mixture": ift_paper_mixture}


# ------------------------------------------------------------------ the paper's particle experiments
#: Draws target points: sample_target(count, rng) -> points (count, d).
TargetSampler = Callable[[int, np.random.Generator], np.ndarray]

@dataclass(frozen=True)
class ParticleExperiment:
    """A particle experiment of the IFT paper: F = 1/2 MMD^2(mu, target samples) with ``kernel``,
    the initial particles ``initial`` (uniform weights, mass 1) and the samples ``target``.
    ``sample_target(count, rng)`` draws fresh target points (count, d) from the target
    distribution (for ``paper_scheme(..., fresh_target=...)``, as the authors' code does)."""

    name: str
    energy: MMD2
    initial: Measure
    target: Measure
    kernel: Gaussian
    sample_target: TargetSampler | None = field(default=None, compare=False)


#: The paper's 2-D single-Gaussian target N(0, [[1, 1/2], [1/2, 2]]).
PAPER_GAUSSIAN = (((0.0, 0.0), ((1.0, 0.5), (0.5, 2.0))),)


def sample_mixture(components, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` samples of the equal-weight mixture of N(mean, covariance) over ``components``
    (a sequence of (mean, covariance)); the component of each sample is drawn uniformly."""
    labels = rng.integers(len(components), size=count)
    points = np.empty((count, len(components[0][0])))
    for j, (mean, covariance) in enumerate(components):
        chosen = labels == j
        points[chosen] = rng.multivariate_normal(np.asarray(mean, float),
                                                 np.asarray(covariance, float), int(chosen.sum()))
    return points


def _uniform(points: np.ndarray) -> Measure:
    return Measure(points, np.full(points.shape[0], 1.0 / points.shape[0]))


def paper_2d(target: str = "gaussian", particles: int = 100, samples: int = 100, seed: int = 0,
             bandwidth: float = 10.0, start=(5.0, 5.0)) -> ParticleExperiment:
    """The 2-D experiment of Gladin et al. (2024, section 5): ``particles`` points from
    N(start, I), ``samples`` points of the target ("gaussian": N(0, [[1, .5], [.5, 2]]);
    "mixture": PAPER_MIXTURE), uniform weights, F = 1/2 MMD^2 with the Gaussian kernel
    exp(-|x - y|^2 / (2 bandwidth^2)) (jk.Gaussian(bandwidth); the convention of the authors'
    code, whose high-dimensional kernel exp(-|x - y|^2/200) is bandwidth 10 too)."""
    components = {"gaussian": PAPER_GAUSSIAN, "mixture": PAPER_MIXTURE}
    if target not in components:
        raise ValueError(f"unknown 2-D target {target!r}; choose 'gaussian' or 'mixture'")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((int(particles), 2)) + np.asarray(start, float)
    y = sample_mixture(components[target], int(samples), rng)
    kernel = Gaussian(bandwidth)
    target_measure = _uniform(y)
    return ParticleExperiment(f"paper_2d_{target}", MMD2(target_measure, kernel), _uniform(x),
                              target_measure, kernel, partial(sample_mixture, components[target]))


def paper_highdim_mixture(dim: int, rank: int = 10, mean_norm: float = 20.0,
                          seed: int = 0) -> tuple:
    """The high-dimensional target of the authors' code: three components with means of norm
    ``mean_norm`` in uniformly random directions and covariances diag(U[0.5, 5]) + P P^T,
    P of size dim x rank with entries U[0, 1]. Returns ((mean, covariance), ...)."""
    rng = np.random.default_rng(seed)
    components = []
    for _ in range(3):
        direction = rng.standard_normal(dim)
        mean = mean_norm * direction / np.linalg.norm(direction)
        factor = rng.uniform(0.0, 1.0, (dim, min(rank, dim)))
        components.append((mean, np.diag(rng.uniform(0.5, 5.0, dim)) + factor @ factor.T))
    return tuple(components)


def paper_highdim(dim: int = 10, particles: int = 500, samples: int | None = None, seed: int = 0,
                  mixture_seed: int = 0, bandwidth: float = 10.0) -> ParticleExperiment:
    """The high-dimensional experiment: particles from N(0, I_dim), ``samples`` (default: as many
    as particles) from the mixture of ``paper_highdim_mixture(dim, seed=mixture_seed)`` (fixed
    over runs; ``seed`` draws the particles and samples), kernel exp(-|x - y|^2/200) =
    jk.Gaussian(10). The samples are the fixed target of F (the authors' test samples, on
    which they measure the MMD); the authors' fresh training samples of every iteration are
    ``paper_scheme(..., fresh_target=experiment.sample_target)``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((int(particles), int(dim)))
    components = paper_highdim_mixture(int(dim), seed=mixture_seed)
    y = sample_mixture(components, int(particles if samples is None else samples), rng)
    kernel = Gaussian(bandwidth)
    target_measure = _uniform(y)
    return ParticleExperiment(f"paper_highdim_{dim}", MMD2(target_measure, kernel), _uniform(x),
                              target_measure, kernel, partial(sample_mixture, components))


# ------------------------------------------------------------------ the authors' update loop
#: Weight updates of the authors' IFT loop (``paper_scheme``): "mmd" is w += lr_w (-d/dw MMD^2)
#: then the Euclidean projection onto the simplex; "kl" is w *= exp(-lr_w f), then the same
#: projection.
PAPER_WEIGHT_UPDATES = ("mmd", "kl")

#: The mass of the particles must be the one the steps were mapped for (tau alpha = 2 lr M / n):
#: a relative mismatch is carried into the step sizes. The projections keep the mass to
#: round-off (drift below 1e-12 over 10^4 steps), so 1e-6 only catches a wrong measure.
PAPER_MASS_RTOL = 1e-6


@dataclass(frozen=True)
class PaperScheme:
    """The authors' update loop in the library's units (``paper_scheme``).

    ``jk.solve(F, s.geometry, mu0, tau=s.tau, steps=K, method=s.method)`` with
    F = jk.MMD2(target samples, kernel) and mu0 = n equal-weight particles of mass ``mass``
    runs K iterations of their loop. The other fields record the authors' numbers.
    """

    method: object
    geometry: Geometry
    tau: float
    lr: float
    weight_lr: float | None
    weight_update: str
    n_particles: int
    mass: float

    def __iter__(self):  # (method, geometry, tau): what studies.run_over_seeds' make_scheme returns
        return iter((self.method, self.geometry, self.tau))


@dataclass(frozen=True, eq=False)
class PaperMethod(Method):
    """The method of a ``paper_scheme``: ``inner`` takes the steps; this wrapper checks that
    the particles are the n of mass M the step sizes were mapped for, and with
    ``sample_target`` redraws the target of F before every step, as the authors' code does.

    Fresh targets: a step on F = jk.MMD2(pi_test, k) moves the particles with
    F_k = jk.MMD2(pi_k, k), pi_k = ``target_samples`` equal-weight points of
    ``sample_target(target_samples, rng)`` (mass of pi_test), one draw per step shared by the
    position and weight updates; F itself stays one immutable energy and the StepResult's
    energy and objective are evaluated with it, so ``Trajectory.energies`` is
    1/2 MMD^2(mu^k, pi_test), the authors' loss on their fixed test samples. The generator,
    seeded by ``seed``, is the run's state (``MethodState.rng``, with ``inner``'s state among its
    warm starts): every ``jk.solve`` starts from the seed, and a resumed run continues the draws;
    ``step`` uses the object's own state, which ``reset()`` restarts. Every step draws, so use
    fixed steps, not a controller.
    """

    keeps_support = False  # the particles move
    inner: object
    n_particles: int
    mass: float
    sample_target: TargetSampler | None = None
    target_samples: int | None = None
    seed: int | None = None

    def __post_init__(self):
        if self.sample_target is not None and not callable(self.sample_target):
            raise ValueError(f"sample_target must be a callable (count, rng) -> points (count, d), "
                             f"got {self.sample_target!r}")

    @property
    def local_error_order(self) -> float:
        return getattr(self.inner, "local_error_order", 2)

    @property
    def steps_taken(self) -> int:
        """Steps taken by ``step`` since the last ``reset()``."""
        state = self.__dict__.get("_default_state")
        return 0 if state is None else state.steps

    def init_state(self, F=None, geometry=None, mu0=None) -> MethodState:
        """A run's state: step counter 0, a generator seeded by ``seed`` (none without fresh
        targets), ``inner``'s own state."""
        inner = self.inner.init_state(F, geometry, mu0) if isinstance(self.inner, Method) else None
        # without fresh targets nothing is drawn: no generator to copy at every step
        rng = None if self.sample_target is None else np.random.default_rng(self.seed)
        return MethodState(rng=rng, warm={"inner": inner})

    def _step(self, F: Energy, geometry: Geometry, mu: Measure, tau: float, state: MethodState,
              throw: bool = True):
        self._check_particles(mu)
        state.steps += 1
        drawn = F if self.sample_target is None else self._drawn_energy(F, mu, state.rng)
        inner = state.warm.get("inner")
        if inner is None:  # an inner method without the protocol keeps its own state
            result = self.inner.step(drawn, geometry, mu, tau, throw=throw)
        else:
            result, state.warm["inner"] = self.inner.advance(drawn, geometry, mu, tau, inner, throw=throw)
        if self.sample_target is None or result.measure is None:
            return result
        energy = F.value(result.measure)
        return replace(result, energy=energy, objective=energy + result.distance_sq / (2 * float(tau)),
                       info={**result.info, "step_energy": result.energy})

    def _check_particles(self, mu: Measure) -> None:
        if mu.n != self.n_particles or not relatively_close(mu.mass, self.mass, PAPER_MASS_RTOL):
            raise ValueError(f"this paper_scheme was mapped for {self.n_particles} particles of mass "
                             f"{self.mass:g} (tau alpha = 2 lr M / n), got {mu.n} of mass {mu.mass:.6g}; "
                             "build it with paper_scheme(kernel, lr, n_particles=mu.n, mass=mu.mass)")

    def _drawn_energy(self, F: Energy, mu: Measure, rng: np.random.Generator) -> MMD2:
        if not isinstance(F, MMD2):
            raise ValueError(f"fresh target samples replace the target of jk.MMD2(target, kernel); "
                             f"got {type(F).__name__}")
        count = self.n_particles if self.target_samples is None else int(self.target_samples)
        points = np.asarray(self.sample_target(count, rng), dtype=float)
        if points.shape != (count, mu.dim):
            raise ValueError(f"sample_target(count, rng) must return points of shape ({count}, "
                             f"{mu.dim}), got {points.shape}")
        return MMD2(Measure(points, np.full(count, F.target.mass / count)), F.kernel)


def paper_scheme(kernel: Kernel, lr: float, n_particles: int, weight_lr: float | None = None,
                 weight_update: str = "mmd", mass: float = 1.0, *, noise: float = 0.0,
                 noise_steps: int | None = None, seed: int | None = None,
                 fresh_target: Callable | None = None, target_samples: int | None = None,
                 exact_weight_step: bool = False) -> PaperScheme:
    """The update loop of Gladin et al.'s code (``ift_flow``, file ift_experiment.py) for F =
    1/2 MMD^2(mu, target) with ``kernel``, as (method, geometry, tau) of this library.

    Their code, with n particles x_i of weights w_i (initially M / n, their M = 1), target
    samples y_j and f = dF/dmu = sum_j w_j k(., x_j) - sum_j k(., y_j) / m:

    * positions: x_i <- x_i + lr (-d/dx_i MMD^2) = x_i - 2 lr w_i grad f(x_i)  (with the
      weights before the step; MMD^2 = 2F gives the factor 2);
    * weights (``weight_lr`` = lr_w, on the new positions, same target samples):
      "mmd":  w <- P(w + lr_w (-d/dw MMD^2)) = P(w - 2 lr_w f);
      "kl":   w <- P(w exp(-lr_w f)),
      P the Euclidean projection onto the simplex {w >= 0, sum w = M};
    * ``weight_lr=None``: their MMD-flow baseline (Arbel et al.), positions only, with noise
      injection for the first ``noise_steps`` iterations if ``noise`` > 0: the gradient of the
      witness of the perturbed particles x_i + noise u_i at the perturbed particles (their
      code perturbs both, ExplicitEuler(perturb_measure=True)), u_i ~ N(0, I).

    In the library's units, with the W2 time step tau = 2 lr M / n and alpha = 1: the transport
    is the explicit step x_i - tau alpha (n w_i / M) grad f (``velocity="euclidean"``, equal
    to the W2 step for uniform weights); "mmd" is the reaction "projected_gradient" with
    tau beta = 2 lr_w under jk.IFT(kernel, 1, beta, conserve_mass=True); "kl" is the reaction
    "projected_multiplicative" with tau beta = lr_w under jk.WFR(1, beta, conserve_mass=True);
    the baseline is jk.ExplicitEuler under jk.Wasserstein(). Their 2-D "position step 50,
    weight step 0.1" with 100 particles is tau = 1, beta = 0.2; their 100-D lr = 10^4 with 10^4
    particles is tau = 2.

    fresh_target: a callable (count, rng) -> points (count, d) of the target distribution
    (``ParticleExperiment.sample_target``): a new target sample of ``target_samples`` points
    (default n_particles, as theirs) before every step, see ``PaperMethod``. seed: of the
    noise and of the target draws (independent streams). exact_weight_step: replace their
    single projected-gradient step ("mmd") by the exact MMD weight step (the QP) with the same
    tau beta, all else as their code (the "euclidean" velocity included; the paper's algorithm
    as written moves particles with the W2 velocity: ift_particle_method()).

    Returns a PaperScheme; its method is a fresh ``PaperMethod`` (one per run: it owns the
    random generators) that refuses particles other than n_particles of mass ``mass``.
    """
    from .methods import ExplicitEuler, Splitting

    if not isinstance(kernel, Kernel):
        raise ValueError(f"paper_scheme needs a kernel such as jk.Gaussian(10.0), got {kernel!r}")
    lr, mass = positive("paper_scheme", "lr", lr), positive("paper_scheme", "mass", mass)
    if isinstance(n_particles, bool) or int(n_particles) != n_particles or n_particles < 1:
        raise ValueError(f"n_particles must be a positive whole number, got {n_particles!r}")
    n_particles = int(n_particles)
    if weight_update not in PAPER_WEIGHT_UPDATES:
        raise ValueError(f"unknown weight_update {weight_update!r}; choose one of "
                         f"{PAPER_WEIGHT_UPDATES} (their code's 'MMD' and 'KL' branches)")
    tau = 2.0 * lr * mass / n_particles
    noise_seed, target_seed = (None, None) if seed is None else (
        int(s) for s in np.random.SeedSequence(seed).generate_state(2))
    if weight_lr is None:
        if exact_weight_step or weight_update != "mmd":
            raise ValueError("the MMD-flow baseline (weight_lr=None) has no weight step; give "
                             "weight_lr for the IFT loop")
        inner = ExplicitEuler(noise=noise, noise_steps=noise_steps, seed=noise_seed,
                              perturb_measure=True)
        geometry = Wasserstein()
    else:
        weight_lr = positive("paper_scheme", "weight_lr", weight_lr)
        if noise:
            raise ValueError("the authors' IFT loop injects no noise; noise is an option of the "
                             "MMD-flow baseline (weight_lr=None)")
        if weight_update == "kl":
            if exact_weight_step:
                raise ValueError("exact_weight_step replaces the 'mmd' weight update; the 'kl' "
                                 "branch has no exact counterpart here")
            reaction, geometry = "projected_multiplicative", WFR(1.0, weight_lr / tau, conserve_mass=True)
        else:
            reaction = "exact" if exact_weight_step else "projected_gradient"
            geometry = IFT(kernel, 1.0, 2.0 * weight_lr / tau, conserve_mass=True)
        inner = Splitting(order=1, transport="explicit", reaction=reaction, velocity="euclidean")
    method = PaperMethod(inner, n_particles, mass, fresh_target, target_samples, target_seed)
    return PaperScheme(method, geometry, tau, lr, weight_lr, weight_update, n_particles, mass)
