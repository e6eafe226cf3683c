"""HierarchicalProjection: the fused module matches the eager one, state for state."""

from __future__ import annotations

import copy

import pytest
import torch

from hires_kernels import HierarchicalProjection, available_backends, fused_projection, projection_reference
from hires_kernels.shapes import pooled_size


@pytest.mark.parametrize("kwargs", [
    {}, {"momentum": None}, {"affine": False}, {"track_running_stats": False},
    {"stride": 3, "ceil_mode": True}, {"stride": 1},
], ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default")
def test_fused_module_matches_eager_over_steps(kwargs):
    torch.manual_seed(0)
    kw = {"stride": 2, **kwargs}
    eager = HierarchicalProjection(4, 6, fused=False, **kw).double()
    fused = copy.deepcopy(eager)
    fused.fused = True
    for step in range(3):
        x = torch.randn(3, 4, 8, 7, dtype=torch.float64)
        ho = [pooled_size(n, kw["stride"], kw.get("ceil_mode", False)) for n in x.shape[2:]]
        res = torch.randn(3, 6, *ho, dtype=torch.float64)
        for m in (eager, fused):
            m.zero_grad()
            (m(x, res) * torch.linspace(-1, 1, 6, dtype=torch.float64)[:, None, None]).sum().backward()
        for (name, a), b in zip(eager.state_dict().items(), fused.state_dict().values()):
            assert torch.allclose(a.double(), b.double(), rtol=1e-10, atol=1e-12), f"step {step}: {name}"
        for (name, a), b in zip(eager.named_parameters(), fused.parameters()):
            assert torch.allclose(a.grad, b.grad, rtol=1e-9, atol=1e-12), f"step {step}: grad of {name}"
    eager.eval(), fused.eval()
    x = torch.randn(2, 4, 8, 7, dtype=torch.float64)
    assert torch.allclose(eager(x), fused(x), rtol=1e-10, atol=1e-12)


def test_state_dict_is_the_same_fused_or_eager():
    a, b = HierarchicalProjection(8, 16, stride=2, fused=True), HierarchicalProjection(8, 16, stride=2, fused=False)
    assert a.state_dict().keys() == b.state_dict().keys()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 8, 8, 8)
    a.eval(), b.eval()
    torch.testing.assert_close(a(x), b(x))


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_torch_compile_fullgraph_train_step(backend):
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.proj = HierarchicalProjection(3, 8, stride=2, backend=backend)

        def forward(self, x):
            return self.proj(x, torch.relu(self.conv(x))[:, :, ::2, ::2]).mean()

    net = Net()
    ref = copy.deepcopy(net)
    compiled = torch.compile(net, fullgraph=True)
    x = torch.randn(4, 3, 8, 8)
    compiled(x).backward()
    ref(x).backward()
    for (name, a), b in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(net.proj.bn.running_var, ref.proj.bn.running_var)
    assert int(net.proj.bn.num_batches_tracked) == 1


def test_autocast_runs_in_the_autocast_dtype():
    x = torch.randn(2, 4, 8, 8)
    w = torch.randn(6, 4, requires_grad=True)
    rm, rv = torch.zeros(6), torch.ones(6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_projection(x, w, None, None, rm, rv, stride=2)
        ref = projection_reference(x, w, None, None, rm.clone(), rv.clone(), stride=2)
    assert out.dtype == torch.bfloat16
    assert rm.dtype == torch.float32 and rv.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=3e-2)
    out.float().sum().backward()
    assert w.grad.dtype == torch.float32
