"""Every backend of the fused projection against a float64 run of the eager composition."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hires_kernels
from hires_kernels.projection import fused_projection, projection_reference
from projection_cases import CASES, Case, backend_params, eager_lowp, errors, make_inputs, oracle, rel_err, run

BACKENDS = backend_params()


def check(errs: dict, tol: dict | float):
    bad = {k: v for k, v in errs.items() if v > (tol[k] if isinstance(tol, dict) else tol)}
    assert not bad, f"errors above tolerance: {bad} (all: {errs})"


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_float32_matches_float64_oracle(backend, device, case):
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    result = run(fused_projection, case, make_inputs(case, torch.float32, device), backend=backend)
    assert result[0].dtype == torch.float32
    check(errors(result, oracle(case)), 1e-5)


@pytest.mark.parametrize("case", CASES[::3], ids=str)
@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[1] == "cuda"])
def test_float32_in_tf32_where_torch_allows_it(backend, device, case):
    """torch.backends.cuda.matmul.allow_tf32: the GPU backends may run float32 GEMMs in TF32
    (the cuda backend on the tensor cores), within SPEC §3's 2e-3."""
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        result = run(fused_projection, case, make_inputs(case, torch.float32, device), backend=backend)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    check(errors(result, oracle(case)), 2e-3)


@pytest.mark.skipif(not torch.cuda.is_available() or "cuda" not in hires_kernels.available_backends(),
                    reason="needs the cuda backend on a GPU")
@pytest.mark.parametrize("c_in,c_out", [(256, 512), (64, 128)], ids=["tiles", "z_ranks"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_clusters_equal_single_blocks(monkeypatch, dtype, c_in, c_out):
    """On sm_90 the cuda backend's dW kernel runs its tiles in thread-block clusters (256 -> 512:
    4 x 4 tiles) that share their operands through distributed shared memory, with z-ranks
    that sum parts of a split in shared memory where the tiles are few (64 -> 128: 1 x 1 x 4
    in bf16, 2 x 1 x 2 in float32), and its row kernels share each of this batch's few row
    tiles among a cluster of blocks; the gradients are bitwise those of single blocks
    ($HIRES_CUDA_CLUSTERS=0) and match the float64 oracle."""
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(6, c_in, 16, 16, device="cuda", generator=gen).to(dtype).to(memory_format=torch.channels_last)
    w = torch.randn(c_out, c_in, device="cuda", generator=gen) / c_in ** 0.5
    gamma = torch.rand(c_out, device="cuda", generator=gen) + 0.5
    beta = torch.randn(c_out, device="cuda", generator=gen)
    g = torch.randn(6, c_out, 8, 8, device="cuda", generator=gen).to(dtype).to(memory_format=torch.channels_last)

    def grads(fn, *args):
        leaves = [t.detach().clone().requires_grad_() for t in args]
        out = fn(*leaves, None, None, stride=2, training=True)
        return torch.autograd.grad(out, leaves, g.to(out.dtype))

    clustered = grads(lambda *a, **k: fused_projection(*a, **k, backend="cuda"), x, w, gamma, beta)
    monkeypatch.setenv("HIRES_CUDA_CLUSTERS", "0")
    single = grads(lambda *a, **k: fused_projection(*a, **k, backend="cuda"), x, w, gamma, beta)
    assert all(torch.equal(a, b) for a, b in zip(clustered, single))
    ref = grads(projection_reference, *(t.double() for t in (x, w, gamma, beta)))
    assert rel_err(clustered[1], ref[1]) < (2e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("case", [c for c in CASES if c.offset == 0][::2], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_low_precision_within_twice_eager_error(backend, device, dtype, case):
    ref = oracle(case, dtype)
    eager_errs = errors(eager_lowp(case, dtype, device), ref)
    fused = run(fused_projection, case, make_inputs(case, dtype, device), backend=backend)
    assert fused[0].dtype == dtype
    # 2x the eager error (SPEC §3), with a floor of one rounding step of the dtype
    # for quantities the eager run happens to get (nearly) exact.
    floor = torch.finfo(dtype).eps
    check(errors(fused, ref), {k: max(2 * v, floor) for k, v in eager_errs.items()})


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_output_keeps_memory_format(backend, device):
    x = torch.randn(2, 4, 8, 8, device=device).to(memory_format=torch.channels_last)
    w = torch.randn(6, 4, device=device)
    out = fused_projection(x, w, None, None, None, None, stride=2, backend=backend)
    assert out.is_contiguous(memory_format=torch.channels_last)
    out = fused_projection(x.contiguous(), w, None, None, None, None, stride=2, backend=backend)
    assert out.is_contiguous()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nan_propagates_like_eager(backend, device):
    case = Case(training=False)
    inp = make_inputs(case, torch.float32, device)
    inp["x"][0, 0, 0, 0] = float("nan")
    with torch.no_grad():
        out = fused_projection(inp["x"], inp["weight"], inp["bn_weight"], inp["bn_bias"], inp["running_mean"],
                               inp["running_var"], inp["residual"], stride=2, training=False, backend=backend)
        ref = projection_reference(inp["x"], inp["weight"], inp["bn_weight"], inp["bn_bias"], inp["running_mean"],
                                   inp["running_var"], inp["residual"], stride=2, training=False)
    assert torch.equal(out.isnan(), ref.isnan())


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] in ("reference", "cpu")
                                             and p.values[1] == "cpu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("stride,ceil_mode", [(1, False), (2, True), (3, False)])
def test_gradcheck_float64(backend, device, training, stride, ceil_mode):
    case = Case(n=2, c_in=3, c_out=4, h=5, w=7, stride=stride, ceil_mode=ceil_mode, training=training)
    inp = make_inputs(case, torch.float64, device)
    leaves = [inp[k].requires_grad_() for k in ("x", "weight", "bn_weight", "bn_bias", "residual")]

    def f(x, w, g, b, r):
        return fused_projection(x, w, g, b, inp["running_mean"].clone(), inp["running_var"].clone(), r,
                                stride=stride, ceil_mode=ceil_mode, training=training, backend=backend)

    assert torch.autograd.gradcheck(f, leaves)


def _raw_forward(backend, x, weight, bn_weight, bn_bias, running_mean, running_var, residual, stride, ceil_mode,
                 training, eps=1e-5):
    """(op, args) of the op that runs ``backend``'s forward: the compiled op (which takes
    the running statistics and updates them) or the Python backends' op (which takes an
    explicit shift and eval statistics)."""
    from hires_kernels.backends import COMPILED
    from hires_kernels.shapes import data_shift
    if backend in COMPILED:
        return torch.ops.hires.projection.default, (x, weight, bn_weight, bn_bias, running_mean, running_var,
                                                    residual, stride, ceil_mode, training, 0.1, eps)
    stats = (None, None) if training else (running_mean, running_var)
    return torch.ops.hires_py.projection_forward.default, (
        x, data_shift(x, stride, torch.float32), weight, bn_weight, bn_bias, residual, *stats, stride, ceil_mode,
        training, eps, backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", [Case(), Case(training=False, layout="channels_last", ceil_mode=True),
                                  Case(stride=1, residual=False, affine=False)], ids=str)
def test_opcheck(backend, device, case):
    inp = make_inputs(case, torch.float32, device)
    from projection_cases import layout
    x = layout(inp["x"], case.layout).requires_grad_()
    w = inp["weight"].requires_grad_()
    res = layout(inp["residual"], case.layout) if inp["residual"] is not None else None
    op, args = _raw_forward(backend, x, w, inp["bn_weight"], inp["bn_bias"], inp["running_mean"],
                            inp["running_var"], res, case.stride, case.ceil_mode, case.training)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_conv_output_kept_only_where_declared(backend, device, training):
    """Forward returns y = W (pool(x) - shift) in float32 for the backends that keep it
    for backward (training only), and an empty tensor otherwise."""
    from hires_kernels.backends import keeps_conv_output
    from hires_kernels.shapes import data_shift
    case = Case(training=training, layout="channels_last", ceil_mode=True)
    inp = make_inputs(case, torch.float32, device)
    x = inp["x"].contiguous(memory_format=torch.channels_last)
    op, args = _raw_forward(backend, x, inp["weight"], inp["bn_weight"], inp["bn_bias"], inp["running_mean"],
                            inp["running_var"], None, case.stride, case.ceil_mode, training)
    y = op(*args)[2]
    if not (training and keeps_conv_output(backend)):
        assert y.numel() == 0
        return
    shift = data_shift(x, case.stride, torch.float32)
    p = torch.nn.functional.avg_pool2d(x - shift[:, None, None], case.stride, ceil_mode=case.ceil_mode,
                                       count_include_pad=False)
    expected = torch.nn.functional.conv2d(p, inp["weight"][:, :, None, None])
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


class _RecordOps(TorchDispatchMode):
    """Records, in order, the ops that reach the Python dispatcher at the top level (what
    a call costs in dispatches: ops that a kernel calls inside itself do not show)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] in ("cpu", "cuda")])
@pytest.mark.parametrize("case", [Case(), Case(stride=1, residual=False, affine=False, layout="channels_last")],
                         ids=str)
def test_compiled_backend_is_one_op_per_direction(backend, device, case):
    """A training forward + backward through fused_projection dispatches the forward op
    and the backward op and nothing else (the gradient is seeded explicitly, and
    autograd.grad leaves out the leaves' gradient accumulation); an eval forward
    dispatches one op. Every per-call step runs inside them."""
    inp = make_inputs(case, torch.float32, device)
    leaves = [inp[k].requires_grad_() for k in ("x", "weight", "bn_weight", "bn_bias", "residual") if inp[k] is not None]
    with _RecordOps() as mode:
        out = fused_projection(inp["x"], inp["weight"], inp["bn_weight"], inp["bn_bias"], inp["running_mean"],
                               inp["running_var"], inp["residual"], stride=case.stride, backend=backend)
        grads = torch.autograd.grad(out, leaves, inp["grad"])
    assert mode.ops == ["hires.projection", "hires.projection_backward"]
    assert all(g is not None for g in grads)
    with _RecordOps() as mode, torch.no_grad():
        fused_projection(inp["x"], inp["weight"], inp["bn_weight"], inp["bn_bias"], inp["running_mean"],
                         inp["running_var"], inp["residual"], stride=case.stride, training=False, backend=backend)
    assert mode.ops == ["hires.projection"]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_statistics_under_bf16_autocast_are_float32(backend, device):
    """Under bf16 autocast the activations run in bf16, but the shift correction W @ shift
    and the running statistics stay float32: with x = 1000 + noise (|W shift| ~ 1e3) the
    running mean and variance are within float32 error of a float64 run on the same
    bf16-rounded activations."""
    case = Case(training=True, residual=False, offset=1000.0)
    inp = make_inputs(case, torch.float32, device)
    x = inp["x"]
    w = inp["weight"] * 8  # |W x| of several thousand, as in a wide layer
    rm, rv = inp["running_mean"].clone(), inp["running_var"].clone()
    with torch.autocast(device, dtype=torch.bfloat16):
        fused_projection(x, w, inp["bn_weight"], inp["bn_bias"], rm, rv, stride=2, backend=backend)
    rm64, rv64 = inp["running_mean"].double(), inp["running_var"].double()
    projection_reference(x.to(torch.bfloat16).double(), w.double(), None, None, rm64, rv64, stride=2)
    # triton's GEMM takes bf16 operands, as eager's bf16 conv does, and so does cuda's (the
    # weight rounded to bf16 for the tensor cores): their variance carries that rounding, so
    # they get the SPEC's low-precision bound (2x eager's error).
    var_tol = 1e-5
    if backend in ("triton", "cuda"):
        rm_e, rv_e = inp["running_mean"].clone(), inp["running_var"].clone()
        with torch.autocast(device, dtype=torch.bfloat16):
            projection_reference(x, w, None, None, rm_e, rv_e, stride=2)
        var_tol = 2 * rel_err(rv_e, rv64)
    assert rel_err(rm, rm64) < 1e-6 and rel_err(rv, rv64) < var_tol, (rel_err(rm, rm64), rel_err(rv, rv64))


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] in ("cpu", "cuda")])
def test_huge_activations_stay_finite_like_eager(backend, device):
    """x * 1e30 in float32, training: (y - mean)^2 overflows float32 sums, but eager's
    batch norm (sums of squares in double on the CPU) still gives the right output. The
    compiled backends must too where eager does, and match the float64 oracle (the Python
    backends keep float32 statistics). On CUDA eager's statistics are float32: the variance
    (~1e60) overflows, and eager's output is beta or not finite."""
    inp = make_inputs(Case(residual=False), torch.float32, device)
    args = (inp["x"] * 1e30, inp["weight"], inp["bn_weight"], inp["bn_bias"])
    expected = projection_reference(*(a.double() for a in args), None, None, stride=2)
    eager = projection_reference(*args, None, None, stride=2)
    if not eager.isfinite().all() or rel_err(eager, expected) > 1e-5:
        pytest.skip("eager itself overflows on this device")
    out = fused_projection(*args, None, None, stride=2, backend=backend)
    assert out.isfinite().all()
    assert rel_err(out, expected) < 1e-5


@pytest.mark.skipif(not hasattr(torch.ops.hires, "projection"), reason="the C++ extension is not built")
def test_raw_ops_check_their_arguments():
    """The raw ops reject mismatched tensors with ValueError naming the argument (before
    any kernel: a short parameter vector or a mismatched residual must not be read out of
    bounds), and leave the running statistics untouched."""
    x, w = torch.randn(2, 4, 6, 6), torch.randn(5, 4)
    rm, rv = torch.zeros(5), torch.ones(5)
    op = torch.ops.hires.projection.default
    bad = {
        "residual must have shape": dict(residual=torch.randn(2, 5, 2, 2)),
        "bn_weight must have shape": dict(bn_weight=torch.ones(3)),
        "running_var must have shape": dict(running_var=torch.ones(2)),
        "weight has 3 input channels": dict(weight=torch.randn(5, 3)),
        "stride=2 is larger than the input 1x6": dict(x=torch.randn(2, 4, 1, 6)),
    }
    for message, over in bad.items():
        a = dict(x=x, weight=w, bn_weight=None, residual=None, running_var=rv, **{})
        a.update(over)
        with pytest.raises(ValueError, match=message):
            op(a["x"], a["weight"], a["bn_weight"], None, rm, a["running_var"], a["residual"], 2, False, True, 0.1, 1e-5)
        assert torch.equal(rm, torch.zeros(5)) and torch.equal(rv, torch.ones(5))
    out, saved, y, shift, mean, var = op(x, w, None, None, rm, rv, None, 2, False, True, 0.1, 1e-5)
    back = torch.ops.hires.projection_backward.default
    g = torch.randn_like(out)
    with pytest.raises(ValueError, match="mean must be a \\[5\\]"):
        back(g, saved, y, shift, w, None, mean[:2], var, 2, False, 6, 6, True, 1e-5)
    with pytest.raises(ValueError, match="saved must be"):
        back(g, saved[:, :2], y, shift, w, None, mean, var, 2, False, 6, 6, True, 1e-5)
    with pytest.raises(ValueError, match="grad_out's spatial size"):
        back(g, saved, y, shift, w, None, mean, var, 2, False, 9, 9, True, 1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_shared_memory_running_stats_are_refused_before_any_update(backend, device):
    """A stride-0 running_var (an expanded view) cannot be updated element by element:
    refused before running_mean is touched."""
    inp = make_inputs(Case(), torch.float32, device)
    rm = inp["running_mean"].clone()
    rv = torch.ones(1, device=device).expand(rm.shape[0])
    with pytest.raises(ValueError, match="running_var has elements that share memory"):
        fused_projection(inp["x"], inp["weight"], None, None, rm, rv, stride=2, backend=backend)
    assert torch.equal(rm, inp["running_mean"])


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] == "cpu"])
@pytest.mark.parametrize("threads", [1, 3])
def test_wide_layer_matches_float64_oracle(backend, device, threads):
    """A wide layer: with 3 threads the CPU backward's per-thread dW partials (13.5 MB)
    outgrow the scratch it keeps between calls (8 MB) and take a buffer of their own;
    with 1 thread (4.5 MB) they stay in the scratch."""
    case = Case(n=2, c_in=1024, c_out=1100, h=4, w=4)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = run(fused_projection, case, make_inputs(case, torch.float32, device), backend=backend)
    finally:
        torch.set_num_threads(before)
    check(errors(result, oracle(case)), 1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_double_backward_is_refused(backend, device):
    """The op has no second-order formula: differentiating its backward must end in a
    clear error, not in a wrong or empty gradient."""
    inp = make_inputs(Case(), torch.float32, device)
    x = inp["x"].requires_grad_()
    out = fused_projection(x, inp["weight"], inp["bn_weight"], inp["bn_bias"], None, None, inp["residual"],
                           stride=2, backend=backend)
    (grad_x,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="cannot be differentiated"):
        grad_x.sum().backward()


def _func_grads(fn, case, inp, **kwargs):
    """torch.func.grad of <fn(...), grad> with respect to x, weight, bn_weight and bn_bias."""
    def loss(x, weight, bn_weight, bn_bias):
        rm = inp["running_mean"].clone() if inp["running_mean"] is not None else None
        rv = inp["running_var"].clone() if inp["running_var"] is not None else None
        out = fn(x, weight, bn_weight, bn_bias, rm, rv, inp["residual"], stride=case.stride,
                 training=case.training, ceil_mode=case.ceil_mode, **kwargs)
        return (out * inp["grad"]).sum()
    return torch.func.grad(loss, argnums=(0, 1, 2, 3))(inp["x"], inp["weight"], inp["bn_weight"], inp["bn_bias"])


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", [Case(), Case(training=False, ceil_mode=True), Case(stride=1)], ids=str)
def test_torch_func_grad_matches_reference(backend, device, case):
    """torch.func.grad works through the op (torch.library's own autograd for custom ops
    does not support it: pytorch/pytorch#168393) and gives the reference's gradients."""
    dtype = torch.float64 if torch.float64 in hires_kernels.backends.get(backend).DTYPES else torch.float32
    inp = make_inputs(case, dtype, device)
    got = _func_grads(fused_projection, case, inp, backend=backend)
    expected = _func_grads(projection_reference, case, {k: v if v is None else v.double() for k, v in inp.items()})
    for g, e in zip(got, expected):
        assert rel_err(g, e) < (1e-10 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_func_vjp_matches_autograd(backend, device):
    inp = make_inputs(Case(), torch.float32, device)

    def f(x, weight):
        return fused_projection(x, weight, inp["bn_weight"], inp["bn_bias"], None, None, inp["residual"],
                                stride=2, backend=backend)
    out, vjp = torch.func.vjp(f, inp["x"], inp["weight"])
    got = vjp(inp["grad"])
    leaves = (inp["x"].clone().requires_grad_(), inp["weight"].clone().requires_grad_())
    expected = torch.autograd.grad(f(*leaves), leaves, inp["grad"])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nested_torch_func_grad_is_refused(backend, device):
    inp = make_inputs(Case(), torch.float32, device)

    def loss(x):
        return fused_projection(x, inp["weight"], None, None, None, None, stride=2, backend=backend).square().sum()
    with pytest.raises(RuntimeError, match="cannot be differentiated"):
        torch.func.grad(lambda x: torch.func.grad(loss)(x).sum())(inp["x"])


def test_compiled_torch_func_grad():
    case = Case()
    inp = make_inputs(case, torch.float64)
    compiled = torch.compile(lambda *a: _func_grads(fused_projection, case, inp, backend="cpu"), fullgraph=True)
    for g, e in zip(compiled(), _func_grads(projection_reference, case, inp)):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_strided_running_stats_in_eval(backend, device):
    """Running statistics may be views (e.g. slices of a larger buffer), as F.batch_norm allows."""
    inp = make_inputs(Case(training=False), torch.float32, device)
    rm, rv = (torch.stack([t, t], 1)[:, 0] for t in (inp["running_mean"], inp["running_var"]))
    assert not rv.is_contiguous()
    args = (inp["x"], inp["weight"], inp["bn_weight"], inp["bn_bias"])
    out = fused_projection(*args, rm, rv, stride=2, training=False, backend=backend)
    expected = projection_reference(*args, rm.clone(), rv.clone(), stride=2, training=False)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_auto_backend_skips_backends_without_the_dtype(monkeypatch):
    """float64 on a device whose fastest backend has no float64 kernels (triton) falls
    back to one that has them instead of failing."""
    from hires_kernels import backends

    monkeypatch.setitem(backends._PREFERENCE, "cpu", ("triton", "reference"))
    backends._resolve_cached.cache_clear()
    try:
        assert backends.resolve_backend(None, torch.device("cpu"), torch.float64) == "reference"
        if backends.unavailable_reason("triton", "cpu") is None:
            assert backends.resolve_backend(None, torch.device("cpu"), torch.float32) == "triton"
    finally:
        backends._resolve_cached.cache_clear()


def test_triton_reads_tf32_flag_of_either_api():
    """torch >= 2.9 raises on reading the legacy allow_tf32 once fp32_precision is set."""
    triton_backend = pytest.importorskip("hires_kernels.backends.triton")
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has only the legacy TF32 flag")
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert triton_backend._tf32_allowed()
        matmul.fp32_precision = "ieee"
        assert not triton_backend._tf32_allowed()
    finally:
        matmul.fp32_precision = before


def test_available_backends_lists_reference():
    assert "reference" in hires_kernels.available_backends()
    assert "reference" in hires_kernels.available_backends("cpu")


def test_backend_choice_by_env_and_argument(monkeypatch):
    x = torch.randn(2, 3, 4, 4)
    w = torch.randn(5, 3)
    monkeypatch.setenv("HIRES_BACKEND", "nonexistent")
    with pytest.raises(RuntimeError, match="HIRES_BACKEND"):
        fused_projection(x, w, None, None, None, None)
    out = fused_projection(x, w, None, None, None, None, backend="reference")
    assert out.shape == (2, 5, 4, 4)
    with pytest.raises(RuntimeError, match="backend="):
        fused_projection(x, w, None, None, None, None, backend="bogus")
