"""Host cost: the time of a call whose kernels cost almost nothing, fused against eager.

On tiny CPU tensors with one thread, what a call costs is its host work: Python, the
dispatcher, autograd, allocation. That work is the same on a GPU, where it decides
whether the fused op beats the eager modules it replaces (BENCHMARKS.md "Host cost").

* op: N=2, 4 -> 8 channels, 4x4, stride 2, with a residual: training forward + backward
  and eval forward, ``fused_projection(backend="cpu")`` against the eager composition.
* step: one SGD train step of a narrow ResNet-18 and HiResNet-18 (planes 4/8/16/32,
  stem 4, sources "all" and "stem", fused and eager) on a 2x3x8x8 batch.

report: ``x_eager`` (op) and ``ratio_to_resnet18`` (step) are filled in from the run's
own eager / ResNet-18 case, which runs first.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import _util

try:
    import hires
    import hires_kernels

    _IMPORT_ERROR = None
except Exception as e:  # noqa: BLE001
    _IMPORT_ERROR = f"hires cannot be imported: {e}"

pytestmark = [pytest.mark.cpu, pytest.mark.host]

NARROW = {"planes": [4, 8, 16, 32], "stem_width": 4}
_BASELINE: dict[str, float] = {}


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _op_inputs(requires_grad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 4, 4, generator=g)
    residual = torch.randn(2, 8, 2, 2, generator=g)
    proj = hires_kernels.HierarchicalProjection(4, 8, stride=2)
    leaves = (x, residual, proj.conv.weight, proj.bn.weight, proj.bn.bias)
    for t in leaves[:2]:
        t.requires_grad_(requires_grad)
    args = (x, proj.conv.weight, proj.bn.weight, proj.bn.bias, proj.bn.running_mean, proj.bn.running_var, residual)
    return args, leaves, torch.randn(2, 8, 2, 2, generator=g)


@pytest.mark.parametrize("mode", ["train-fwdbwd", "eval-fwd"])
@pytest.mark.parametrize("provider", ["eager", "cpu"])
def test_host_projection(benchmark, request, one_thread, mode, provider):
    if _IMPORT_ERROR:
        pytest.skip(_IMPORT_ERROR)
    training = mode.startswith("train")
    args, leaves, grad_out = _op_inputs(requires_grad=training)
    op = (hires_kernels.projection_reference if provider == "eager"
          else functools.partial(hires_kernels.fused_projection, backend=provider))
    if training:
        def fn():
            return torch.autograd.grad(op(*args, stride=2, training=True), leaves, grad_out)
    else:
        def fn():
            with torch.no_grad():
                return op(*args, stride=2, training=False)
    info = benchmark.extra_info
    info.update(level="host", device="cpu", case="N=2, 4->8, 4x4, s2", mode=mode, provider=provider, threads=1)
    info.update(_util.run_benchmark(benchmark, fn, "cpu", request.config, warmup_calls=20))
    info["us"] = info["ms"] * 1e3
    key = f"op-{mode}"
    if provider == "eager":
        _BASELINE[key] = info["ms"]
    elif key in _BASELINE:
        info["x_eager"] = info["ms"] / _BASELINE[key]


STEP_MODELS = [("resnet18", None, False)] + [("hiresnet18", s, f) for s in ("all", "stem") for f in (False, True)]


@pytest.mark.parametrize("name,sources,fused", STEP_MODELS,
                         ids=[n if s is None else f"{n}-{s}-{'fused' if f else 'eager'}" for n, s, f in STEP_MODELS])
def test_host_model_step(benchmark, request, one_thread, name, sources, fused):
    if _IMPORT_ERROR:
        pytest.skip(_IMPORT_ERROR)
    torch.manual_seed(0)
    kwargs = dict(NARROW, sources=sources, fused=fused) if name == "hiresnet18" else dict(NARROW)
    model = hires.create_model(name, num_classes=10, **kwargs).train()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 8, 8, generator=g), torch.randint(0, 10, (2,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    info = benchmark.extra_info
    label = name if name == "resnet18" else f"{name}-{sources}-{'fused' if fused else 'eager'}"
    info.update(level="host-step", device="cpu", model=label, input="2x3x8x8", threads=1,
                params=sum(p.numel() for p in model.parameters()))
    info.update(_util.run_benchmark(benchmark, step, "cpu", request.config, warmup_calls=10))
    if name == "resnet18":
        _BASELINE["step"] = info["ms"]
    elif "step" in _BASELINE:
        info["ratio_to_resnet18"] = info["ms"] / _BASELINE["step"]
