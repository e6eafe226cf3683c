"""Every projection of one source (``pool_source``, ``fused_projections``, ``project_source``):
the source pooled once by ``torch.ops.hires.pool_source``, each target projected at stride 1,
against a float64 run of the eager composition per target."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hires_kernels
from hires_kernels import HierarchicalProjection, fused_projections, pool_source, project_source
from hires_kernels.projection import projection_reference
from hires_kernels.shapes import pooled_size
from projection_cases import backend_params, layout, rel_err
from test_projection import _RecordOps, check

# Triton (interpreted in CI) takes the same per-target path as reference, which runs here.
BACKENDS = [p for p in backend_params() if p.values[0] != "triton"]
COMPILED = [p for p in BACKENDS if p.values[0] in ("cpu", "cuda")]
needs_op = pytest.mark.skipif(not hasattr(torch.ops.hires, "pool_source"), reason="the C++ extension is not built")


@dataclass(frozen=True)
class Source:
    """A source x [n, c_in, h, w] and its targets: (c_out, stride) each."""

    h: int = 8
    w: int = 8
    targets: tuple = ((6, 2), (7, 4), (5, 8))
    ceil_mode: bool = True
    training: bool = True
    layout: str = "nchw"
    n: int = 3
    c_in: int = 5
    offset: float = 0.0  # added to x: a large mean tests the statistics' stability

    def __str__(self):
        t = ",".join(f"{c}s{s}" for c, s in self.targets)
        return (f"{self.n}x{self.c_in}x{self.h}x{self.w}->{t}{'-ceil' if self.ceil_mode else ''}"
                f"-{'train' if self.training else 'eval'}-{self.layout}")

    def sizes(self, s):
        return pooled_size(self.h, s, self.ceil_mode), pooled_size(self.w, s, self.ceil_mode)


SOURCES = [
    Source(),
    Source(h=7, w=9, targets=((6, 2), (4, 4)), layout="channels_last"),
    Source(h=7, w=9, targets=((6, 2), (4, 4)), ceil_mode=False),
    Source(h=9, w=7, targets=((3, 1), (6, 2), (4, 4)), layout="strided"),
    Source(targets=((6, 4), (7, 2), (5, 2)), training=False),
    Source(h=13, w=11, targets=((6, 2), (7, 4), (9, 8)), ceil_mode=False, training=False, layout="channels_last"),
    Source(h=5, w=6, targets=((8, 2),), n=2, c_in=33),
    Source(h=9, w=7, targets=((8, 2), (16, 4), (24, 8)), n=2, c_in=16, layout="channels_last"),  # CUDA vectors
]


def make(src: Source, dtype=torch.float64, device="cpu", seed=0, rounded_as=None):
    """x, grads of the outputs, and per target (weight, bn_weight, bn_bias, running_mean,
    running_var), drawn in float64 so that every dtype sees the same values."""
    g = torch.Generator().manual_seed(seed)
    act = rounded_as or dtype
    param = torch.float64 if act == torch.float64 else torch.float32

    def rnd(*shape, scale=1.0, kind="param"):
        t = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
        t = t.to(act if kind == "act" else param)
        return t.to(device=device, dtype=torch.float64 if rounded_as is not None else t.dtype)

    x = (torch.randn(src.n, src.c_in, src.h, src.w, generator=g, dtype=torch.float64) + src.offset).to(act)
    x = x.to(device=device, dtype=torch.float64 if rounded_as is not None else x.dtype)
    params = [(rnd(c, src.c_in, scale=src.c_in ** -0.5), 1 + 0.5 * rnd(c), 0.5 * rnd(c), rnd(c),
               0.5 + rnd(c).abs()) for c, _ in src.targets]
    grads = [rnd(src.n, c, *src.sizes(s), kind="act") for c, s in src.targets]
    return x, grads, params


def run_all(fn, src: Source, x, grads, params, **kwargs):
    """(outputs, grad of x, grads of every parameter, running statistics after the call)."""
    x = layout(x.detach().clone(), src.layout).requires_grad_()
    leaves = [[t.detach().clone().requires_grad_() for t in p[:3]] for p in params]
    stats = [[t.clone() for t in p[3:]] for p in params]
    outs = fn(x, [l[0] for l in leaves], [l[1] for l in leaves], [l[2] for l in leaves], [s[0] for s in stats],
              [s[1] for s in stats], strides=[s for _, s in src.targets], training=src.training,
              ceil_mode=src.ceil_mode, **kwargs)
    torch.autograd.backward(outs, [layout(g, src.layout) for g in grads])
    return outs, x.grad, [t.grad for l in leaves for t in l], [t for s in stats for t in s]


def per_target_reference(x, weights, bn_weights, bn_biases, running_means, running_vars, *, strides, **kwargs):
    """The eager composition per target; in a low-precision dtype the conv runs in it, as
    under autocast."""
    return [projection_reference(x, w.to(x.dtype), *p, stride=s, **kwargs)
            for w, *p, s in zip(weights, bn_weights, bn_biases, running_means, running_vars, strides)]


def errors(result, reference) -> dict:
    outs, gx, gp, stats = result
    r_outs, r_gx, r_gp, r_stats = reference
    errs = {f"out{i}": rel_err(a, b) for i, (a, b) in enumerate(zip(outs, r_outs))}
    errs["grad_x"] = rel_err(gx, r_gx)
    errs.update({f"grad_param{i}": rel_err(a, b) for i, (a, b) in enumerate(zip(gp, r_gp))})
    errs.update({f"stat{i}": rel_err(a, b) for i, (a, b) in enumerate(zip(stats, r_stats))})
    return errs


def oracle(src: Source, dtype):
    return run_all(per_target_reference, src, *make(src, rounded_as=dtype))


@pytest.mark.parametrize("src", SOURCES, ids=str)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_matches_float64_oracle(backend, device, src):
    """Outputs, grad_x (every target's contribution), every parameter's gradient and the
    running statistics: float64 to rounding, float32 within SPEC §3's 1e-5."""
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        if device == "cuda" and dtype == torch.float64:
            continue
        got = run_all(fused_projections, src, *make(src, dtype, device), backend=backend)
        check(errors(got, oracle(src, dtype)), tol)


@pytest.mark.parametrize("src", SOURCES[:3], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_low_precision_within_twice_eager_error(backend, device, dtype, src):
    ref = oracle(src, dtype)
    eager = run_all(per_target_reference, src, *make(src, dtype, device))
    got = run_all(fused_projections, src, *make(src, dtype, device), backend=backend)
    bound = {k: 2 * v + 1e-3 for k, v in errors(eager, ref).items()}
    check(errors(got, ref), bound)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_large_mean_as_accurate_as_eager(backend, device):
    """x = 1000 + noise in float32: the statistics stay accurate (the kernels shift the
    pooled inputs); the pooled inputs are rounded to float32 as eager's avg_pool2d rounds
    them, so the bound is eager's error."""
    src = Source(offset=1000.0, n=4)
    ref = oracle(src, torch.float32)
    eager = run_all(per_target_reference, src, *make(src, torch.float32, device))
    got = run_all(fused_projections, src, *make(src, torch.float32, device), backend=backend)
    check(errors(got, ref), {k: 2 * v + 1e-5 for k, v in errors(eager, ref).items()})


@pytest.mark.parametrize("backend,device", COMPILED)
def test_source_read_by_one_pooling_call(backend, device):
    """A training forward + backward of three targets dispatches one pooling call, the three
    stride-1 projections, their backwards and one pooling backward (one grad_x), nothing
    else; an eval forward, the pooling call and the projections."""
    src = Source()
    x, grads, params = make(src, torch.float32, device)
    x.requires_grad_()
    leaves = [x] + [t.requires_grad_() for p in params for t in p[:3]]
    args = (x, *(list(ts) for ts in zip(*params)))
    with _RecordOps() as mode:
        outs = fused_projections(*args, strides=[2, 4, 8], ceil_mode=True, backend=backend)
    assert mode.ops == ["hires.pool_source"] + ["hires.projection"] * 3
    with _RecordOps() as mode:
        torch.autograd.grad(outs, leaves, grads)
    assert mode.ops == ["hires.projection_backward"] * 3 + ["hires.pool_source_backward"]
    with _RecordOps() as mode, torch.no_grad():
        fused_projections(*args, strides=[2, 4, 8], ceil_mode=True, training=False, backend=backend)
    assert mode.ops == ["hires.pool_source"] + ["hires.projection"] * 3


@pytest.mark.parametrize("layout_name", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("ceil_mode", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_pool_source_is_avg_pool2d_per_stride(dtype, ceil_mode, layout_name):
    """Each result is avg_pool2d of x (count_include_pad=False) in x's dtype and layout:
    floor mode's trailing pixels and ceil mode's partial windows included; a stride of 1
    gives x itself and a repeated stride one shared tensor. Its gradient is the sum of the
    strides' avg_pool2d gradients."""
    torch.manual_seed(0)
    x = layout(torch.randn(2, 5, 13, 11, dtype=torch.float64).to(dtype), layout_name).requires_grad_()
    strides = [4, 1, 2, 8, 2]
    got = pool_source(x, strides, ceil_mode=ceil_mode)
    assert got[1] is x and got[2] is got[4]
    want = [torch.nn.functional.avg_pool2d(x, s, s, ceil_mode=ceil_mode, count_include_pad=False) if s > 1 else x
            for s in strides]
    tol = {"rtol": 0, "atol": 0} if dtype == torch.float64 else {}
    fmt = torch.channels_last if layout_name == "channels_last" else torch.contiguous_format
    for g, w in zip(got, want):
        assert g.dtype == dtype and (g is x or g.is_contiguous(memory_format=fmt))
        torch.testing.assert_close(g, w, **(tol if dtype != torch.float64 else {"rtol": 1e-15, "atol": 1e-15}))
    grads = [torch.randn_like(w) for w in want]
    gx_got, = torch.autograd.grad(got, x, grads)
    gx_want, = torch.autograd.grad(want, x, grads)
    assert gx_got.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(gx_got, gx_want, **({"rtol": 1e-15, "atol": 1e-15} if dtype == torch.float64 else
                                                   {"rtol": 1e-2, "atol": 1e-2}))


@needs_op
@pytest.mark.parametrize("ceil_mode", [True, False])
def test_pool_source_gradcheck_and_gradgradcheck(ceil_mode):
    """The op and its backward are each other's adjoint, so double backward works too."""
    x = torch.randn(2, 3, 9, 17, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: tuple(pool_source(x, [2, 4, 8], ceil_mode=ceil_mode)), (x,))
    assert torch.autograd.gradgradcheck(lambda x: tuple(pool_source(x, [2, 4, 8], ceil_mode=ceil_mode)), (x,))


@needs_op
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("strides", [[2, 4], [1, 2]], ids=str)
def test_gradcheck_float64(training, strides):
    src = Source(h=5, w=4, targets=tuple((3, s) for s in strides), training=training, n=2, c_in=3)
    x, _, params = make(src)
    x.requires_grad_()
    leaves = [t.requires_grad_() for p in params for t in p[:3]]

    def f(x, *flat):
        ws, gs, bs = flat[0::3], flat[1::3], flat[2::3]
        # Fresh statistics per call: gradcheck calls f many times.
        rms, rvs = [p[3].clone() for p in params], [p[4].clone() for p in params]
        return tuple(fused_projections(x, ws, gs, bs, rms, rvs, strides=strides, training=training, ceil_mode=True,
                                       backend="cpu"))

    assert torch.autograd.gradcheck(f, (x, *leaves))


@needs_op
@pytest.mark.parametrize("how", ["nchw", "channels_last"])
@pytest.mark.parametrize("ceil_mode", [True, False])
def test_opcheck(how, ceil_mode):
    x = layout(torch.randn(2, 3, 9, 7), how).requires_grad_()
    torch.library.opcheck(torch.ops.hires.pool_source.default, (x, [4, 2], ceil_mode))
    grads = [layout(torch.randn(2, 3, pooled_size(9, s, ceil_mode), pooled_size(7, s, ceil_mode)), how)
             for s in (4, 2)]
    torch.library.opcheck(torch.ops.hires.pool_source_backward.default,
                          (grads, [4, 2], ceil_mode, 9, 7, how == "channels_last"))


@needs_op
def test_bad_arguments_are_refused_before_any_update():
    src = Source()
    x, _, params = make(src, torch.float32)
    ws, gs, bs, rms, rvs = (list(ts) for ts in zip(*params))
    before = [t.clone() for t in rms + rvs]
    with pytest.raises(ValueError, match="strides needs one entry per target"):
        fused_projections(x, ws, gs, bs, rms, rvs, strides=[2, 4])
    with pytest.raises(ValueError, match="momentum needs one value per target"):
        fused_projections(x, ws, gs, bs, rms, rvs, strides=[2, 4, 8], momentum=[0.1, 0.1])
    # The last target is wrong: the first two must not have updated their statistics.
    bad = ws[:2] + [torch.randn(5, 4)]
    with pytest.raises(ValueError, match="weight has 4 input channels but x has C_in=5"):
        fused_projections(x, bad, gs, bs, rms, rvs, strides=[2, 4, 8])
    for a, b in zip(before, rms + rvs):
        assert torch.equal(a, b)
    op = torch.ops.hires.pool_source.default
    for strides, match in (([2, 3], "every stride must divide the larger ones"), ([2, 2], "strides must be distinct"),
                           ([1, 2], "every stride must be > 1"), ([], "no strides")):
        with pytest.raises(ValueError, match=match):
            op(x, strides, True)
    with pytest.raises(ValueError, match="is larger than the input"):
        op(x, [16], False)
    with pytest.raises(ValueError, match="one gradient per stride"):
        torch.ops.hires.pool_source_backward(op(x, [2, 4], True)[:1], [2, 4], True, 8, 8, False)
    with pytest.raises(ValueError, match=r"grad\[0\] .* is not the input 8x8 pooled with stride 2"):
        torch.ops.hires.pool_source_backward(op(x, [2, 4], True)[::-1], [2, 4], True, 8, 8, False)
    with pytest.raises(ValueError, match="every stride must be an integer >= 1"):
        pool_source(x, [2, 0])
    with pytest.raises(ValueError, match=r"grad\[0\] must be a 4-D tensor"):
        torch.ops.hires.pool_source_backward([torch.randn(3, 5)], [2], True, 8, 8, False)
    with pytest.raises(ValueError, match="stride 4294967296 is too large"):
        op(x, [2, 2 ** 32], True)


def test_project_source_checks_every_target_before_the_first_runs():
    src = Source()
    mods = _projections(src)
    x = torch.randn(3, 5, 8, 8)
    residuals = [None, torch.randn(3, 7, 3, 3), None]  # target 1's output is 2x2
    before = [m.state_dict() for m in mods]
    with pytest.raises(ValueError, match="residual must have shape"):
        project_source(x, mods, residuals)
    for m, b in zip(mods, before):
        torch.testing.assert_close(m.state_dict(), b)


class _Casts(TorchDispatchMode):
    """The shapes of the tensors that dtype casts (aten._to_copy) take."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten._to_copy:
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def test_fused_projections_under_autocast_take_what_fused_projection_takes():
    """An fp32 x with bf16 residuals under bf16 autocast: each target runs in bf16, as a
    fused_projection call of the same arguments does. x itself is never cast: the targets'
    checks take it as autocast will give it, and it is pooled in its own dtype."""
    src = Source()
    x, _, params = make(src, torch.float32)
    ws, gs, bs, rms, rvs = (list(ts) for ts in zip(*params))
    residuals = [torch.randn(src.n, c, *src.sizes(s)).bfloat16() for c, s in src.targets]
    strides = [s for _, s in src.targets]
    with torch.autocast("cpu", dtype=torch.bfloat16), _Casts() as casts:
        outs = fused_projections(x, ws, gs, bs, [t.clone() for t in rms], [t.clone() for t in rvs], residuals,
                                 strides=strides, ceil_mode=True)
    assert casts.shapes and tuple(x.shape) not in casts.shapes
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = [hires_kernels.fused_projection(x, w, g, b, rm.clone(), rv.clone(), r, stride=s, ceil_mode=True)
                for w, g, b, rm, rv, r, s in zip(ws, gs, bs, rms, rvs, residuals, strides)]
    for o, w in zip(outs, want):
        assert o.dtype == w.dtype == torch.bfloat16
        torch.testing.assert_close(o, w, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend,device", COMPILED)
def test_strides_that_do_not_nest_run_per_target(backend, device):
    """Pooling sums are shared only between strides that divide one another; 2 and 3 are
    pooled by avg_pool2d each, with the same results."""
    src = Source(h=12, w=12, targets=((4, 2), (5, 3)))
    with _RecordOps() as mode:
        got = run_all(fused_projections, src, *make(src, torch.float32, device), backend=backend)
    assert "hires.pool_source" not in mode.ops
    check(errors(got, oracle(src, torch.float32)), 1e-5)


def _projections(src: Source, **kwargs):
    torch.manual_seed(0)
    mods = [HierarchicalProjection(src.c_in, c, stride=s, ceil_mode=src.ceil_mode, **kwargs) for c, s in src.targets]
    for m in mods:  # statistics and affine parameters away from their defaults
        if m.bn.track_running_stats:
            m.bn.running_mean.normal_()
            m.bn.running_var.uniform_(0.5, 1.5)
        if m.bn.affine:
            m.bn.weight.data.uniform_(0.5, 1.5)
            m.bn.bias.data.normal_()
    return mods


@pytest.mark.parametrize("kwargs", [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False},
                                    {"fused": False}], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_project_source_equals_separate_calls(kwargs, training):
    """project_source gives what calling each module gives: outputs, gradients, running
    statistics and num_batches_tracked (cumulative momentum included), whatever path runs."""
    src = Source()
    a, b = ([m.double() for m in _projections(src, **kwargs)] for _ in range(2))
    x = torch.randn(3, 5, 8, 8, dtype=torch.float64, requires_grad=True)
    xb = x.detach().clone().requires_grad_()
    for mods in (a, b):
        for m in mods:
            m.train(training)
    for _ in range(2):
        outs_a = [m(x) for m in a]
        outs_b = project_source(xb, b)
        torch.testing.assert_close(outs_b, outs_a)
        torch.autograd.backward(outs_a, [o.detach() for o in outs_a])
        torch.autograd.backward(outs_b, [o.detach() for o in outs_a])
    torch.testing.assert_close(xb.grad, x.grad)
    for ma, mb in zip(a, b):
        torch.testing.assert_close(mb.state_dict(), ma.state_dict())
        torch.testing.assert_close([p.grad for p in mb.parameters()], [p.grad for p in ma.parameters()])


@needs_op
def test_under_torch_func_grad_matches_reference():
    """Under torch.func transforms x is pooled by avg_pool2d per stride, and each fused call
    serves its target."""
    src = Source(targets=((6, 2), (7, 4)))
    x, _, params = make(src)
    ws, gs, bs, rms, rvs = (list(ts) for ts in zip(*params))

    def loss(fn, x, ws):
        outs = fn(x, ws, gs, bs, [t.clone() for t in rms], [t.clone() for t in rvs], strides=[2, 4],
                  ceil_mode=True)
        return sum((o * o).sum() for o in outs)

    got = torch.func.grad(lambda x, ws: loss(fused_projections, x, ws), argnums=(0, 1))(x, ws)
    want = torch.func.grad(lambda x, ws: loss(per_target_reference, x, ws), argnums=(0, 1))(x, ws)
    torch.testing.assert_close(got, want)


@needs_op
def test_compiles_fullgraph():
    src = Source()
    mods = _projections(src)
    ref_mods = _projections(src)
    x = torch.randn(3, 5, 8, 8)
    compiled = torch.compile(lambda x: project_source(x, mods), fullgraph=True, backend="aot_eager")
    xc, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    outs = compiled(xc)
    want = [m(xr) for m in ref_mods]
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    torch.autograd.backward(want, [torch.ones_like(o) for o in want])
    for o, w in zip(outs, want):
        torch.testing.assert_close(o, w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xc.grad, xr.grad, rtol=1e-5, atol=1e-5)
    for m, r in zip(mods, ref_mods):
        torch.testing.assert_close(m.bn.running_mean, r.bn.running_mean)
        assert m.bn.num_batches_tracked.item() == r.bn.num_batches_tracked.item() == 1


def test_exported_names():
    assert {"fused_projections", "pool_source", "project_source"} <= set(hires_kernels.__all__)


@needs_op
def test_training_forward_under_inference_mode_updates_statistics():
    """A training-mode forward without autograd (BatchNorm recalibration under
    torch.inference_mode) still moves the running statistics, as nn.BatchNorm2d does."""
    src = Source()
    mods, ref = _projections(src), _projections(src)
    x = torch.randn(3, 5, 8, 8)
    with torch.inference_mode():
        project_source(x, mods)
        for m in ref:
            m(x)
    for m, r in zip(mods, ref):
        torch.testing.assert_close(m.bn.running_var, r.bn.running_var)
        assert m.bn.num_batches_tracked.item() == 1


@needs_op
def test_under_bf16_autocast_like_separate_calls():
    """Under autocast each target's projection runs in the autocast dtype (x is pooled in
    its own dtype, as eager's avg_pool2d pools it); statistics stay float32."""
    src = Source()
    mods, ref = _projections(src), _projections(src)
    x = torch.randn(3, 5, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = project_source(x, mods)
        want = [m(x) for m in ref]
    assert all(o.dtype == torch.bfloat16 for o in outs)
    torch.testing.assert_close(outs, want, rtol=2e-2, atol=2e-2)
    for m, r in zip(mods, ref):
        assert m.bn.running_mean.dtype == torch.float32
        torch.testing.assert_close(m.bn.running_var, r.bn.running_var, rtol=1e-2, atol=1e-3)
