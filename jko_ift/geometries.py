"""The geometries of dissipation, each given by the squared distance D^2 of its JKO step.

=====================  ==================================================  ==========================
geometry               D^2(mu, nu) in the step                            flow as tau -> 0
=====================  ==================================================  ==========================
Wasserstein()          W2^2, cost |x - y|^2                                d_t mu = div(mu grad f)
Hellinger()            4 sum_i (sqrt a_i - sqrt b_i)^2                     d_t mu = -mu f
MMD(k, ridge)          (a - b)^T (K + ridge I) (a - b)                     d_t mu = -K^{-1} f
WFR(alpha, beta)       inf_nu W2^2(mu, nu)/alpha + He^2(nu, nu')/beta     alpha W2 + beta He
IFT(k, alpha, beta)    inf_nu W2^2(mu, nu)/alpha + MMD^2(nu, nu')/beta    alpha W2 + beta MMD
=====================  ==================================================  ==========================

Every geometry is read by the methods through the same attributes: the weight of its
transport part (``alpha``, None without transport), its ``reaction`` part (a
``ReactionGeometry``, or None) with weight ``beta``, ``conserve_mass``, and the squared distance
of a step through an intermediate measure (``step_distance``). WFR and IFT are the one
``InfConvolution`` of W2 with a reaction geometry.

A reaction geometry states its own mathematics, so that the methods never ask for its class:
its squared distance between weights on common points (``weight_distance_sq``), whether it is
a quadratic form R^2 = (a - b)^T G (a - b) and then its metric G (``metric_parts``: the matrix,
centred for a conditionally positive definite kernel, and the ridge), the force on moving
points (``position_force``) and whether its steps keep positive weights positive. A new
quadratic reaction is one class (``metric_parts``); its proximal map is the weight QP of
methods/weights.py. Hellinger is the non-quadratic one, with its own proximal maps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .kernels import GramCache, Kernel, centred, squared_distances
from .measures import Measure

#: Default ridge lambda of the MMD geometry, K + lambda I (paper, Remark 3.1): the Gram of a
#: smooth kernel has eigenvalues down to round-off, so the step needs a floor. Kernels here
#: have k(x, x) = 1 or are scale-free; 1e-8 keeps the geometry within 1e-8 of pure MMD.
DEFAULT_RIDGE = 1e-8


def _positive(name: str, value) -> float:
    value = float(value)
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def _common_support(mu: Measure, nu: Measure, what: str) -> None:
    if not mu.same_support(nu):
        raise ValueError(f"{what} compares weights on a common support; got measures on "
                         f"{mu.n} and {nu.n} points (or different points)")


def _positive_finite_mass(mu: Measure, name: str) -> float:
    mass = mu.mass
    if not (np.isfinite(mass) and mass > 0):
        raise ValueError(f"W2 needs measures of positive finite mass; {name} has mass {mass!r}; "
                         "pass a measure with some positive weight (and a finite total)")
    return mass


def exact_w2_squared(mu: Measure, nu: Measure) -> float:
    """W2^2(mu, nu) = min_P sum_ij P_ij |x_i - y_j|^2 by POT's network simplex, for equal masses m.

    W2^2 is 1-homogeneous in the masses, so it is m W2^2(mu / m, nu / m): POT only sees
    probability vectors (it crashed the interpreter for masses below ~1e-200 and lost digits
    near 1e-160). The cost comes from the centred ``squared_distances`` (translation invariant).
    Zero or non-finite masses raise a ValueError.
    """
    mass = _positive_finite_mass(mu, "the first measure")
    other = _positive_finite_mass(nu, "the second measure")
    import ot  # POT imports every array library it finds (PyTorch: seconds): only when needed

    a, b = mu.weights / mass, nu.weights / other
    cost = squared_distances(mu.points, nu.points)
    return mass * float(ot.emd2(a / a.sum(), b / b.sum(), cost, numItermax=10_000_000))


class Geometry:
    r"""Base class of the geometries: how mass may move in a JKO step.

    A geometry is read by the methods through its attributes only: the mobility ``alpha`` of
    its transport part (None without transport), its ``reaction`` part (a
    :class:`ReactionGeometry`, or None) with rate ``beta``, and ``conserve_mass``. The base
    class has no transport and no reaction; subclass :class:`ReactionGeometry` for a new
    reaction, or combine one with transport through :class:`~jko_ift.InfConvolution`.

    Attributes
    ----------
    alpha : float or None
        Weight of the transport part, :math:`W_2^2 / \alpha` in :math:`D^2`.
    beta : float or None
        Weight of the reaction part, :math:`R^2 / \beta` in :math:`D^2`.
    reaction : Geometry or None
        The reaction part.
    conserve_mass : bool
        Whether a step keeps the total mass.
    """

    alpha: float | None = None
    beta: float | None = None
    reaction: Geometry | None = None
    conserve_mass: bool = True

    @property
    def has_transport(self) -> bool:
        return self.alpha is not None

    def step_distance(self, transport_cost: float, points: np.ndarray, intermediate: np.ndarray,
                      new: np.ndarray) -> float:
        """D^2 of a step through an intermediate measure nu on the new support (the one formula
        every method evaluates): C / alpha + R^2(nu, mu^{k+1}) / beta.

        transport_cost: C, the cost of a coupling of mu^k and nu (W2^2(mu^k, nu) or any plan's
        cost, which bounds it; 0 without transport); points: (n, d), the support of nu and of
        mu^{k+1}; intermediate, new: their weights (n,). An upper bound of D^2, and D^2 itself at
        the best nu and coupling."""
        total = transport_cost / self.alpha if self.has_transport else 0.0
        if self.reaction is not None:
            total += self.reaction.weight_distance_sq(points, intermediate, new) / self.beta
        return total


@dataclass(frozen=True)
class Wasserstein(Geometry):
    r"""The quadratic Wasserstein geometry :math:`W_2`: mass moves, weights are carried along.

    Notes
    -----
    Between :math:`\mu = \sum_i a_i\delta_{x_i}` and :math:`\nu = \sum_j b_j\delta_{y_j}` of
    equal mass,

    .. math::

        W_2^2(\mu, \nu) = \min_{P \ge 0,\; P\mathbf 1 = a,\; P^\top \mathbf 1 = b}
        \sum_{ij} P_{ij} |x_i - y_j|^2 ,

    and the JKO step :math:`\mu^{k+1} \in \mathop{\mathrm{argmin}}_\mu F(\mu) +
    W_2^2(\mu, \mu^k)/(2\tau)` approximates the flow
    :math:`\partial_t\mu = \operatorname{div}(\mu\nabla f)`, :math:`f = \delta F/\delta\mu`.

    References
    ----------
    * R. Jordan, D. Kinderlehrer, F. Otto, "The variational formulation of the
      Fokker-Planck equation", SIAM J. Math. Anal. 29 (1998).

    Examples
    --------
    >>> mu = jk.Measure([[0.0], [1.0]], [0.5, 0.5])
    >>> nu = jk.Measure([[2.0], [3.0]], [0.5, 0.5])
    >>> round(jk.Wasserstein().squared_distance(mu, nu), 12)
    4.0
    """

    @property
    def alpha(self) -> float:
        return 1.0

    @property
    def conserve_mass(self) -> bool:
        return True

    def squared_distance(self, mu: Measure, nu: Measure) -> float:
        """Exact W2^2 by the network simplex (POT); masses must agree."""
        if not np.isclose(mu.mass, nu.mass, rtol=1e-9, atol=0):
            raise ValueError(f"W2 needs equal masses, got {mu.mass:.12g} and {nu.mass:.12g}; "
                             "normalize both measures or use an unbalanced geometry (WFR)")
        return exact_w2_squared(mu, nu)


class ReactionGeometry(Geometry):
    """A reaction part: weights change on fixed points, D^2 = R^2(a, b) on a common support.

    Subclasses give ``weight_distance_sq``; a quadratic one (``quadratic = True``) gives its
    metric through ``metric_parts``, and a metric that depends on the points its
    ``position_force``.
    """

    #: R^2(a, b) = (a - b)^T G (a - b) with G from ``metric_parts`` (MMD); False: Hellinger.
    quadratic = True
    #: The distance that the methods' non-quadratic reaction maps (Hellinger's cones, envelopes
    #: and Newton steps) solve: only Hellinger's.
    _solved_distance = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.quadratic and cls._solved_distance is not cls.weight_distance_sq:
            raise TypeError(
                f"{cls.__name__} is a reaction that is not quadratic and not Hellinger's: no method "
                "has its proximal maps. Give a metric (quadratic = True and metric_parts), or "
                "keep Hellinger's distance")
    #: Its steps keep positive weights positive (the Hellinger flow multiplies them).
    positivity_preserving = False

    @property
    def reaction(self) -> ReactionGeometry:
        return self

    @property
    def beta(self) -> float:
        return 1.0

    def weight_distance_sq(self, points: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
        """R^2 between weights a and b (n,) on the same points (n, d)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def squared_distance(self, mu: Measure, nu: Measure) -> float:
        _common_support(mu, nu, type(self).__name__)
        return self.weight_distance_sq(mu.points, mu.weights, nu.weights)

    def metric_parts(self, points: np.ndarray, grams: GramCache | None = None
                     ) -> tuple[np.ndarray, float]:
        """(M, ridge) with the metric G = M + ridge I on points (n, d), M positive semidefinite
        (on zero-sum vectors, centred, when only conditionally so: see ``metric_definite``);
        quadratic reactions only."""
        raise ValueError(f"{type(self).__name__} is not a quadratic reaction: it has no metric")

    def metric(self, points: np.ndarray, grams: GramCache | None = None) -> np.ndarray:
        """G = M + ridge I (``metric_parts``): (n, n)."""
        matrix, ridge = self.metric_parts(points, grams)
        metric = matrix.copy()
        metric[np.diag_indices_from(metric)] += ridge
        return metric

    #: G is definite on all vectors (False: only on zero-sum ones, a centred metric).
    metric_definite = True

    def position_force(self, y: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
        """1/2 grad_y R^2(a, b on the points y): (n, d), or None when R^2 does not depend on
        the points."""
        return None


@dataclass(frozen=True)
class Hellinger(ReactionGeometry):
    r"""The Hellinger (Fisher-Rao) geometry: weights grow and shrink in place.

    Parameters
    ----------
    conserve_mass : bool, default False
        Keep :math:`\sum_i b_i = \sum_i a_i` in every step (the spherical Hellinger geometry).

    Notes
    -----
    On a common support, :math:`\mathrm{He}^2(\mu, \nu) = 4\sum_i (\sqrt{a_i} -
    \sqrt{b_i})^2`; the factor 4 makes the flow of the JKO step exactly
    :math:`\partial_t\mu = -\mu f` (theory, section 1). Steps keep positive weights positive.

    Examples
    --------
    >>> mu = jk.Measure([[0.0], [1.0]], [0.25, 0.25])
    >>> nu = mu.with_weights([1.0, 0.25])
    >>> jk.Hellinger().squared_distance(mu, nu)
    1.0
    """

    conserve_mass: bool = False
    positivity_preserving = True
    quadratic = False

    def weight_distance_sq(self, points, a, b):
        return float(4.0 * np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))

    _solved_distance = weight_distance_sq


@dataclass(frozen=True)
class MMD(ReactionGeometry):
    r"""The MMD geometry of a kernel: weights change on fixed points, coupled by the kernel.

    Parameters
    ----------
    kernel : Kernel
        A :class:`~jko_ift.kernels.Kernel` such as :class:`~jko_ift.Gaussian`.
    ridge : float, default ``DEFAULT_RIDGE`` (1e-8)
        :math:`\lambda \ge 0` in :math:`K + \lambda I`. It makes the step unique in the
        weights: the Gram matrix of a smooth kernel is numerically singular.
    conserve_mass : bool, default False
        Keep the total mass in every step; required for a conditionally positive definite
        kernel (:class:`~jko_ift.EnergyKernel`).

    Raises
    ------
    ValueError
        If ``kernel`` is not a kernel or ``ridge`` is negative or not finite.

    Notes
    -----
    On a common support :math:`x_1, \dots, x_n` with Gram matrix
    :math:`K_{ij} = k(x_i, x_j)`,

    .. math::

        \mathrm{MMD}^2(\mu, \nu) = (a - b)^\top (K + \lambda I)(a - b),

    and the JKO step approximates :math:`\partial_t\mu = -(K + \lambda I)^{-1} f`.

    Examples
    --------
    >>> mu = jk.Measure([[0.0], [5.0]], [0.5, 0.5])
    >>> nu = mu.with_weights([1.0, 0.0])
    >>> d2 = jk.MMD(jk.Gaussian(1.0), ridge=0.0).squared_distance(mu, nu)
    >>> bool(abs(d2 - (0.5 - 0.5 * np.exp(-12.5))) < 1e-12)  # (a - b)^T K (a - b), k(0, 5) = e^{-12.5}
    True
    """

    kernel: Kernel
    ridge: float = DEFAULT_RIDGE
    conserve_mass: bool = False

    def __post_init__(self):
        if not isinstance(self.kernel, Kernel):
            raise ValueError(f"MMD needs a kernel such as jk.Gaussian(1.0), got {self.kernel!r}")
        if not (np.isfinite(self.ridge) and self.ridge >= 0):
            raise ValueError(f"MMD ridge must be a finite number >= 0, got {self.ridge!r}")

    @property
    def metric_definite(self) -> bool:
        return self.kernel.positive_definite

    def weight_distance_sq(self, points, a, b):
        diff = a - b
        return float(diff @ self.kernel.apply(points, points, diff) + self.ridge * diff @ diff)

    def metric_parts(self, points, grams=None):
        """(K, ridge); P K P for a conditionally positive definite kernel, a metric only on
        zero-sum differences, so only where the mass is conserved."""
        gram = self.kernel(points, points) if grams is None else grams.gram(self.kernel)
        if not self.kernel.positive_definite:
            if not self.conserve_mass:
                raise ValueError(
                    f"{type(self.kernel).__name__} is only conditionally positive definite, so "
                    "its MMD is a distance only between measures of equal mass; pass "
                    "conserve_mass=True to the geometry or use a positive definite kernel")
            gram = centred(gram)
        return gram, self.ridge

    def position_force(self, y, a, b):
        c = b - a
        return c[:, None] * self.kernel.grad_sum(y, y, c)


@dataclass(frozen=True)
class InfConvolution(Geometry):
    r"""Transport inf-convolved with a reaction: mass moves and changes on the way.

    Parameters
    ----------
    reaction : ReactionGeometry
        The reaction part :math:`R` (:class:`~jko_ift.Hellinger` gives WFR,
        :class:`~jko_ift.MMD` gives IFT).
    alpha : float, default 1.0
        Mobility of the transport part, positive.
    beta : float, default 1.0
        Rate of the reaction part, positive.

    Raises
    ------
    ValueError
        If ``reaction`` is not a reaction geometry, or ``alpha`` or ``beta`` is not a positive
        finite number.

    Notes
    -----
    .. math::

        D^2(\mu, \mu') = \inf_\nu \; \frac{1}{\alpha} W_2^2(\mu, \nu)
        + \frac{1}{\beta} R^2(\nu, \mu').

    For small steps the inf-convolution of two quadratic forms is the quadratic form of the
    sum of their inverses, so the JKO step approximates
    :math:`\partial_t\mu = \alpha\operatorname{div}(\mu\nabla f) - \beta G_R^{-1} f`, with
    :math:`G_R` the metric of the reaction. ``conserve_mass`` is the reaction's.

    Examples
    --------
    >>> g = jk.InfConvolution(jk.Hellinger(), alpha=2.0, beta=0.5)
    >>> g.alpha, g.beta, g.conserve_mass
    (2.0, 0.5, False)
    """

    reaction: ReactionGeometry
    alpha: float = 1.0
    beta: float = 1.0

    def __post_init__(self):
        if not isinstance(self.reaction, ReactionGeometry):
            raise ValueError(f"the reaction part must be a reaction geometry such as jk.Hellinger() "
                             f"or jk.MMD(kernel), got {self.reaction!r}")
        object.__setattr__(self, "alpha", _positive("alpha", self.alpha))
        object.__setattr__(self, "beta", _positive("beta", self.beta))

    @property
    def conserve_mass(self) -> bool:
        return self.reaction.conserve_mass


class WFR(InfConvolution):
    r"""Wasserstein-Fisher-Rao: :math:`W_2` inf-convolved with :class:`~jko_ift.Hellinger`.

    Parameters
    ----------
    alpha : float, default 1.0
        Mobility of the transport part.
    beta : float, default 1.0
        Rate of the Hellinger reaction.
    conserve_mass : bool, default False
        The spherical variant: every step keeps the total mass.

    Notes
    -----
    The inf-convolution of :math:`W_2` with Hellinger,

    .. math::

        D^2(\mu, \mu') = \inf_\nu \; \frac{1}{\alpha} W_2^2(\mu, \nu)
        + \frac{1}{\beta}\mathrm{He}^2(\nu, \mu'),

    has the flow :math:`\partial_t\mu = \alpha\operatorname{div}(\mu\nabla f) -
    \beta\mu f`. This inf-convolution form differs from the Hellinger-Kantorovich cost of
    Liero, Mielke and Savaré (2018) at finite step; both give the same flow.

    References
    ----------
    * M. Liero, A. Mielke, G. Savaré, "Optimal entropy-transport problems and a new
      Hellinger-Kantorovich distance between positive measures", Invent. Math. 211 (2018).

    Examples
    --------
    >>> g = jk.WFR(alpha=1.0, beta=0.2, conserve_mass=True)
    >>> type(g.reaction).__name__, g.beta, g.conserve_mass
    ('Hellinger', 0.2, True)
    """

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, conserve_mass: bool = False):
        super().__init__(Hellinger(conserve_mass=conserve_mass), alpha, beta)


class IFT(InfConvolution):
    r"""Interaction-Force Transport: :math:`W_2` inf-convolved with the MMD geometry (Gladin et al. 2024).

    Parameters
    ----------
    kernel : Kernel
        The kernel of the MMD reaction, e.g. :class:`~jko_ift.Gaussian`.
    alpha : float, default 1.0
        Mobility of the transport part.
    beta : float, default 1.0
        Rate of the MMD reaction.
    ridge : float, default 1e-8
        :math:`\lambda` in :math:`K + \lambda I` (see :class:`~jko_ift.MMD`).
    conserve_mass : bool, default False
        Keep the total mass in every step.

    Notes
    -----
    .. math::

        D^2(\mu, \mu') = \inf_\nu \; \frac{1}{\alpha} W_2^2(\mu, \nu)
        + \frac{1}{\beta}\mathrm{MMD}^2(\nu, \mu'),

    whose flow is :math:`\partial_t\mu = \alpha\operatorname{div}(\mu\nabla f) -
    \beta (K + \lambda I)^{-1} f`: the reaction moves weight between points through the
    kernel. For :math:`F = \frac12\mathrm{MMD}^2(\cdot, \nu)` the energy decays at least like
    :math:`(1 + \beta\tau)^{-2k}` along the JKO steps.

    References
    ----------
    * E. Gladin, P. Dvurechensky, A. Mielke, J.-J. Zhu, "Interaction-Force Transport
      gradient flows", NeurIPS 2024.

    Examples
    --------
    >>> g = jk.IFT(jk.Gaussian(1.0), alpha=5.0, beta=1.0)
    >>> g.kernel, g.alpha, g.beta
    (Gaussian(sigma=1.0), 5.0, 1.0)
    """

    def __init__(self, kernel: Kernel, alpha: float = 1.0, beta: float = 1.0,
                 ridge: float = DEFAULT_RIDGE, conserve_mass: bool = False):
        super().__init__(MMD(kernel, ridge=ridge, conserve_mass=conserve_mass), alpha, beta)

    @property
    def kernel(self) -> Kernel:
        return self.reaction.kernel
