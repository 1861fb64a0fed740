"""The PyTorch backend of the kernel sums against the NumPy path: the sums, the MMD witness and
its gradient, explicit flows and the IFT paper's scheme (extra [torch]; skipped without it)."""

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("array_api_compat")

import jko_ift as jk  # noqa: E402
from jko_ift import backends, keops, problems  # noqa: E402
from jko_ift.measures import ArrayType  # noqa: E402

#: float64: the two paths sum the same terms in other orders and blocks (n, m <= 300).
FLOAT64_RTOL = 1e-12
#: float32: the lifted product and the sums round to float32 (eps 1.2e-7) over d + 2 and m
#: terms, relative to the largest entry.
FLOAT32_RTOL = 1e-5
#: float32 along 20 explicit steps: each step's float32 error is carried by the next.
FLOAT32_RUN_RTOL = 1e-4

#: Kernels at the bandwidth of unit data in d = 1, scaled by sqrt(d) below (the data's spread).
@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One PyTorch thread for these small sums: on two shared cores its spinning worker threads
    made a 50 x 50 sum 75 ms instead of 1 ms (the NumPy path keeps its BLAS to one thread
    for the same reason)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


KERNELS = [jk.Gaussian(1.0), jk.IMQ(0.5), jk.Laplace(2.0), jk.EnergyKernel()]
DTYPES = {"float64": (torch.float64, FLOAT64_RTOL), "float32": (torch.float32, FLOAT32_RTOL)}
#: Every device PyTorch sees: CUDA where present (the same checks run on the GPU).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def relative_error(reference, other) -> float:
    """max |reference - other| / max |reference| (other: NumPy or tensor)."""
    other = backends.to_numpy(other)
    return float(np.max(np.abs(reference - other)) / max(np.max(np.abs(reference)), 1e-300))


def points(seed: int, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)) + shift


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: type(k).__name__)
@pytest.mark.parametrize("d", [2, 30])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("device", DEVICES)
def test_kernel_sums_match_numpy(kernel, d, dtype, device):
    """At a bandwidth of the data's spread (the gradient does not cancel to round-off)."""
    torch_dtype, rtol = DTYPES[dtype]
    if not isinstance(kernel, jk.EnergyKernel):
        kernel = type(kernel)(np.sqrt(d) * getattr(kernel, kernel._scale_name))
    x, y = points(0, 120, d), points(1, 90, d, shift=0.5)
    w = np.random.default_rng(2).random(90)
    tx, ty, tw = (torch.tensor(a, dtype=torch_dtype, device=device) for a in (x, y, w))
    assert relative_error(kernel.apply(x, y, w), kernel.apply(tx, ty, tw)) < rtol
    assert relative_error(kernel.grad_sum(x, y, w), kernel.grad_sum(tx, ty, tw)) < rtol
    assert relative_error(kernel(x, y), kernel(tx, ty)) < rtol
    ones = np.ones(120)  # x against itself: every diagonal pair is a near pair
    assert relative_error(kernel.grad_sum(x, x, ones), kernel.grad_sum(tx, tx, torch.tensor(
        ones, dtype=torch_dtype, device=device))) < rtol


def test_results_keep_the_type_device_and_dtype_that_came_in():
    x = torch.tensor(points(0, 10, 3), dtype=torch.float32)
    k = jk.Gaussian(1.0)
    for result in (k.apply(x, x, torch.ones(10)), k.grad_sum(x, x, np.ones(10)), k(x, x)):
        assert isinstance(result, torch.Tensor) and result.dtype == torch.float32
        assert result.device == x.device
    device_kernel = backends.on_device(k, "cpu", "float32")
    out = device_kernel.grad_sum(points(0, 10, 3), points(1, 5, 3), np.ones(5))
    assert type(out) is np.ndarray and out.dtype == np.float64 and out.shape == (10, 3)
    assert isinstance(device_kernel.apply(x, x, torch.ones(10)), torch.Tensor)


def test_a_device_kernel_pickles_and_compares_by_value():
    import pickle

    kernel = backends.on_device(jk.IMQ(2.0), "cpu", "float32")
    kernel.apply(points(0, 4, 2), points(1, 3, 2), np.ones(3))
    copy = pickle.loads(pickle.dumps(kernel))
    assert copy == kernel and hash(copy) == hash(kernel) and copy != backends.on_device(jk.IMQ(2.0))
    x = points(2, 5, 2)
    assert np.array_equal(copy.apply(x, x, np.ones(5)), kernel.apply(x, x, np.ones(5)))


def test_blocks_and_the_generic_path_on_numpy_agree(monkeypatch):
    """Several row blocks give the same sums as one; the array-API path run on NumPy arrays
    agrees with the NumPy path (its k-d tree near pairs against the comparison pass)."""
    x, y, w = points(3, 200, 2), points(4, 150, 2), np.linspace(0.1, 1.0, 150)
    kernel = jk.IMQ(0.05)  # many near pairs
    reference = kernel.grad_sum(x, y, w)
    assert relative_error(reference, backends.generic_grad_sum(kernel, x, y, w)) < FLOAT64_RTOL
    monkeypatch.setattr(backends, "BLOCK_ENTRIES", 7 * 150)
    assert backends.block_rows(torch.zeros(1), 150) == 7
    assert relative_error(reference, kernel.grad_sum(*(torch.tensor(a) for a in (x, y, w)))) < FLOAT64_RTOL
    assert relative_error(kernel.apply(x, y, w), kernel.apply(torch.tensor(x), torch.tensor(y),
                                                              torch.tensor(w))) < FLOAT64_RTOL


def mixture_problem(n=60, d=3, seed=5):
    mu = jk.Measure(points(seed, n, d), np.full(n, 1.0 / n))
    target = jk.Measure(points(seed + 1, 50, d, shift=1.0), np.full(50, 1.0 / 50))
    return mu, target


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("device", DEVICES)
def test_witness_and_its_gradient_on_device(dtype, device):
    mu, target = mixture_problem()
    kernel = jk.Gaussian(1.5)
    F, G = jk.MMD2(target, kernel), jk.MMD2(target, backends.on_device(kernel, device, dtype))
    rtol = DTYPES[dtype][1]
    assert relative_error(F.first_variation(mu), G.first_variation(mu)) < rtol
    assert relative_error(F.grad_first_variation(mu), G.grad_first_variation(mu)) < rtol
    z = points(9, 7, 3)
    assert relative_error(F.first_variation_at(mu, z, gradient=True),
                          G.first_variation_at(mu, z, gradient=True)) < rtol
    assert abs(F.value(mu) - G.value(mu)) <= rtol * F.value_magnitude(mu)


def run_pair(kernel, dtype, make_run, device="cpu"):
    """The same run with ``kernel`` and with it on a torch backend."""
    return make_run(kernel), make_run(backends.on_device(kernel, device, dtype))


def assert_runs_agree(numpy_run, torch_run, rtol):
    assert len(numpy_run.measures) == len(torch_run.measures)
    last, other = numpy_run.measures[-1], torch_run.measures[-1]
    assert type(other.points) is np.ndarray
    assert relative_error(last.points, other.points) < rtol
    assert relative_error(last.weights, other.weights) < rtol
    assert relative_error(np.asarray(numpy_run.energies), np.asarray(torch_run.energies)) < rtol


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_explicit_euler_twenty_steps(dtype):
    mu, target = mixture_problem()

    def run(kernel):
        return jk.solve(jk.MMD2(target, kernel), jk.Wasserstein(), mu, tau=0.5, steps=20,
                        method=jk.ExplicitEuler(), progress=False)

    rtol = FLOAT64_RTOL if dtype == "float64" else FLOAT32_RUN_RTOL
    assert_runs_agree(*run_pair(jk.Gaussian(1.5), dtype, run), rtol)


def fresh_mixture(count, rng):
    return rng.standard_normal((count, 3)) + 1.0


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("scheme", ["ift", "mmd_flow_noise"])
@pytest.mark.parametrize("device", DEVICES)
def test_paper_scheme_on_device(scheme, dtype, device):
    """IFT (projected-gradient weight step, fresh target samples) and the noisy MMD flow: the
    noise and the target draws come from the method's NumPy generators, so the same seed gives
    the same draws on every backend and the runs agree to round-off."""
    mu, target = mixture_problem()
    options = dict(weight_lr=0.002) if scheme == "ift" else dict(noise=0.1, noise_steps=10)

    def run(kernel):
        s = problems.paper_scheme(kernel, lr=1.0, n_particles=mu.n, seed=7,
                                  fresh_target=fresh_mixture, **options)
        return jk.solve(jk.MMD2(target, kernel), s.geometry, mu, tau=s.tau, steps=20,
                        method=s.method, progress=False)

    rtol = FLOAT64_RTOL if dtype == "float64" else FLOAT32_RUN_RTOL
    with warnings.catch_warnings():  # IFT clips weights at this step (the same on both backends)
        warnings.simplefilter("ignore")
        numpy_run, torch_run = run_pair(jk.Gaussian(1.5), dtype, run, device)
    assert_runs_agree(numpy_run, torch_run, rtol)


def test_conic_step_converts_a_device_kernel_and_refuses_a_tensor():
    mu, target = mixture_problem(n=8, d=2)
    kernel = jk.Gaussian(1.0)
    F = jk.MMD2(target, kernel)
    with pytest.raises(ValueError, match="jk.Measure"):
        jk.ConicJKO().step(F, jk.MMD(kernel), torch.tensor(mu.points), 0.1)
    on_device = backends.on_device(kernel)
    numpy_step = jk.ConicJKO().step(F, jk.MMD(kernel), mu, 0.1)
    torch_step = jk.ConicJKO().step(jk.MMD2(target, on_device), jk.MMD(on_device), mu, 0.1)
    assert relative_error(numpy_step.measure.weights, torch_step.measure.weights) < 1e-6


def test_a_measure_of_tensors_holds_their_values_in_numpy_and_hands_tensors_back():
    x = torch.tensor(points(0, 5, 2), requires_grad=True)
    mu = jk.Measure(x, torch.full((5,), 0.2))
    assert type(mu.points) is np.ndarray and np.array_equal(mu.points, x.detach().numpy())
    assert mu.array_type == ArrayType("cpu", "float64")
    x_back, a_back = mu.with_weights(np.full(5, 0.1)).arrays()
    assert isinstance(x_back, torch.Tensor) and x_back.dtype == torch.float64 and not x_back.requires_grad
    assert torch.equal(x_back, x.detach()) and torch.equal(a_back, torch.full((5,), 0.1, dtype=torch.float64))
    x_back[0, 0] = 99.0  # a copy: the measure does not change
    assert mu.points[0, 0] != 99.0
    single = jk.Measure(x.detach().float(), np.full(5, 0.2))  # the points' type decides
    assert single.array_type == ArrayType("cpu", "float32") and single.arrays()[1].dtype == torch.float32
    numpy_mu = jk.Measure(points(0, 5, 2), np.full(5, 0.2))
    assert numpy_mu.array_type is None and numpy_mu.arrays()[0] is numpy_mu.points
    with pytest.raises(ValueError, match="array_type"):
        jk.Measure(points(0, 5, 2), np.full(5, 0.2), array_type="torch")


def summed_on_device(monkeypatch) -> list:
    """Records each device sum (the generic sums a device kernel runs)."""
    calls = []
    for name in ("generic_apply", "generic_grad_sum"):
        original = getattr(backends, name)

        def counted(*args, _original=original, _name=name):
            calls.append(_name)
            return _original(*args)
        monkeypatch.setattr(backends, name, counted)
    return calls


@pytest.mark.parametrize("device", DEVICES)
def test_a_run_from_tensors_sums_on_their_device_and_returns_tensors(monkeypatch, device):
    """jk.solve from a measure of tensors: the plain kernels of F sum on the tensors' device
    (the geometry's too: test_kernels_on_...), and every saved measure hands back tensors of
    their type; the run is the NumPy run to round-off."""
    mu, target = mixture_problem()
    kernel = jk.Gaussian(1.5)
    F, G = jk.MMD2(target, kernel), jk.Wasserstein()
    numpy_run = jk.solve(F, G, mu, tau=0.2, steps=5, method=jk.ExplicitEuler(), progress=False)
    calls = summed_on_device(monkeypatch)
    tensor_mu = jk.Measure(torch.tensor(mu.points, device=device), torch.tensor(mu.weights, device=device))
    torch_run = jk.solve(F, G, tensor_mu, tau=0.2, steps=5, method=jk.ExplicitEuler(), progress=False)
    assert calls, "no kernel sum ran on the device"
    assert_runs_agree(numpy_run, torch_run, FLOAT64_RTOL)
    for measure in torch_run.measures:
        x, a = measure.arrays()
        assert x.device.type == device and x.dtype == torch.float64 and a.shape == (mu.n,)
    assert F.kernel is kernel and numpy_run.final.array_type is None  # the caller's objects unchanged


def test_a_step_from_float32_tensors_warns_and_returns_float32(monkeypatch):
    mu, target = mixture_problem(n=40, d=2)
    kernel = jk.Gaussian(1.0)
    F = jk.MMD2(target, kernel)
    calls = summed_on_device(monkeypatch)
    tensor_mu = jk.Measure(torch.tensor(mu.points, dtype=torch.float32), torch.tensor(mu.weights))
    with pytest.warns(UserWarning, match="float32 tensors: the kernel sums are accurate to about 1e-7"):
        step = jk.jko_step(F, jk.Wasserstein(), tensor_mu, 0.5, method=jk.ParticleJKO())
    exact = jk.jko_step(F, jk.Wasserstein(), mu, 0.5, method=jk.ParticleJKO())
    assert calls and step.status == "optimal"
    assert step.measure.arrays()[0].dtype == torch.float32
    assert relative_error(exact.measure.points, step.measure.points) < FLOAT32_RUN_RTOL


def test_kernels_on_leaves_device_kernels_and_kernels_without_a_profile():
    chosen = backends.on_device(jk.Gaussian(1.0))
    target = jk.Measure(points(0, 4, 2), np.full(4, 0.25))
    F = jk.MMD2(target, chosen) + jk.Interaction(lambda r: r**2, lambda r: 2 * r)
    G = jk.IFT(jk.Gaussian(2.0), 1.0, 1.0)
    moved_F, moved_G = backends.kernels_on((F, G), ArrayType("cpu", "float64"))
    assert moved_F.terms[0].kernel is chosen and moved_F.terms[0].target is target
    assert isinstance(moved_G.reaction.kernel, backends.DeviceKernel)
    assert moved_G.reaction.kernel.kernel == jk.Gaussian(2.0) and G.reaction.kernel == jk.Gaussian(2.0)


def test_bad_backend_input_is_refused():
    with pytest.raises(ValueError, match="dtype"):
        backends.on_device(jk.Gaussian(1.0), "cpu", "float16")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            backends.on_device(jk.Gaussian(1.0), "cuda")
    with pytest.raises(ValueError, match="device"):
        backends.on_device(jk.Gaussian(1.0), "tpu")
    with pytest.raises(ValueError, match="kernel"):
        backends.on_device("gaussian")
    with pytest.raises(ValueError, match="same d"):
        jk.Gaussian(1.0).apply(torch.zeros(3, 2), torch.zeros(4, 3), torch.ones(4))
    with pytest.raises(ValueError, match="one weight per point"):
        jk.Gaussian(1.0).apply(torch.zeros(3, 2), torch.zeros(4, 2), torch.ones(3))


def test_paper_highdim_example_on_the_torch_cpu_backend(tmp_path):
    """examples/paper_highdim.py --device cpu, tiny: the same MMD curves as on NumPy."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "paper_highdim.py"
    spec = importlib.util.spec_from_file_location("example_paper_highdim_backends", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    sizes = dict(dim=3, particles=12, steps=3, seeds=1)
    on_torch = example.main(**sizes, out=tmp_path / "torch", device="cpu")
    on_numpy = example.main(**sizes, out=tmp_path / "numpy")
    assert "kernel sums on PyTorch cpu float64" in (tmp_path / "torch" / "summary_highdim.txt").read_text()
    for label in ("IFT", "IFT, KL weight step"):
        assert relative_error(on_numpy[label].mmd, on_torch[label].mmd) < FLOAT64_RTOL


def test_float32_kernels_say_that_certificates_do_not_bound_errors_below_their_precision():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backends.on_device(jk.Gaussian(1.0), "cpu", "float64")  # silent
    with pytest.warns(UserWarning, match="dtype='float64' for certified steps"):
        single = backends.on_device(jk.Gaussian(1.0), "cpu", "float32")
    rng = np.random.default_rng(0)
    target = jk.Measure(rng.normal(size=(200, 2)), np.full(200, 1 / 200))
    mu = jk.Measure(rng.normal(size=(200, 2)) + 1, np.full(200, 1 / 200))
    step = jk.ParticleJKO().step(jk.MMD2(target, single), jk.Wasserstein(), mu, 0.5)
    exact = jk.ParticleJKO().step(jk.MMD2(target, jk.Gaussian(1.0)), jk.Wasserstein(), mu, 0.5)
    # what the warning says: certified far below the float32 error that the step actually has
    error = abs(step.objective - exact.objective) / abs(exact.objective)
    assert step.status == "optimal" and step.certificate < 1e-9
    assert 1e-8 < error < 1e-6


def test_keops_is_used_only_where_asked_or_installed_on_cuda(monkeypatch):
    assert not backends.on_device(jk.Gaussian(1.0)).backend.keops  # CPU: the blocked sums
    monkeypatch.setattr(keops, "installed", lambda: False)
    with pytest.raises(ValueError, match="not installed"):
        backends.on_device(jk.Gaussian(1.0), keops=True)
    assert not backends._use_keops(jk.Gaussian(1.0), "cuda:0", None)  # not installed
    monkeypatch.setattr(keops, "installed", lambda: True)
    with pytest.raises(ValueError, match="jk.Gaussian and jk.IMQ"):
        backends.on_device(jk.Laplace(1.0), keops=True)
    # the default where installed: KeOps on CUDA for the kernels it has formulas for, not on CPU
    assert backends._use_keops(jk.Gaussian(1.0), "cuda:0", None)
    assert backends._use_keops(jk.IMQ(1.0), "cuda", None)
    assert not backends._use_keops(jk.Laplace(1.0), "cuda", None)
    assert not backends._use_keops(jk.Gaussian(1.0), "cpu", None)


#: Each case compiles two KeOps formulas on a fresh machine (about 20 s): the quick suite
#: checks the Gaussian in float64, the slow suite the rest.
KEOPS_CASES = [(jk.Gaussian(1.5), "float64")] + [
    pytest.param(kernel, dtype, marks=pytest.mark.slow)
    for kernel, dtype in [(jk.Gaussian(1.5), "float32"), (jk.IMQ(0.8), "float64"), (jk.IMQ(0.8), "float32")]]


@pytest.mark.parametrize(("kernel", "dtype"), KEOPS_CASES)
def test_keops_sums_match_numpy(kernel, dtype):
    """Where pykeops is installed (the keops extra): its sums against NumPy's. The first run
    compiles each formula (seconds; cached on disk)."""
    pytest.importorskip("pykeops")
    x, y, w = points(0, 70, 3), points(1, 50, 3, shift=0.5), np.random.default_rng(2).random(50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # float32's certificate warning
        device_kernel = backends.on_device(kernel, "cpu", dtype, keops=True)
    assert device_kernel.backend.keops
    rtol = DTYPES[dtype][1]
    assert relative_error(kernel.apply(x, y, w), device_kernel.apply(x, y, w)) < rtol
    assert relative_error(kernel.grad_sum(x, y, w), device_kernel.grad_sum(x, y, w)) < rtol
    tensor_sum = device_kernel.apply(torch.tensor(x), torch.tensor(y), torch.tensor(w))
    assert isinstance(tensor_sum, torch.Tensor) and tensor_sum.shape == (70,)


def test_a_method_step_from_tensors_returns_their_type():
    """Method.step, not only the driver: the result measure carries the tensors' type."""
    mu, target = mixture_problem(n=20, d=2)
    tensor_mu = jk.Measure(torch.tensor(mu.points), torch.tensor(mu.weights))
    step = jk.ExplicitEuler().step(jk.MMD2(target, jk.Gaussian(1.0)), jk.Wasserstein(), tensor_mu, 0.1)
    assert isinstance(step.measure.arrays()[0], torch.Tensor)
