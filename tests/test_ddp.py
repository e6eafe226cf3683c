"""Distributed (2-process gloo on CPU): synced statistics equal one process on the full batch."""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from hires_kernels import HierarchicalProjection
from hires_kernels.projection import projection_reference
from hires_kernels.sync import convert_sync_projection, sync_projection

pytestmark = pytest.mark.skipif(not dist.is_available() or sys.platform == "win32",
                                reason="needs torch.distributed with gloo")

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, tmp_path, *args):
    port = _free_port()
    mp.spawn(_entry, args=(fn, port, str(tmp_path), args), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def _entry(rank, fn, port, out, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.save(fn(rank, *args), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _inputs(dtype, stride, large_mean=False):
    g = torch.Generator().manual_seed(0)
    n, c_in, c_out, h = 6, 5, 7, 9
    h_out = (h - stride) // stride + 1 if stride > 1 else h
    x = torch.randn(n, c_in, h, h, generator=g, dtype=torch.float64) + (100.0 if large_mean else 0.0)
    t = dict(x=x, weight=torch.randn(c_out, c_in, generator=g, dtype=torch.float64),
             gamma=torch.rand(c_out, generator=g, dtype=torch.float64) + 0.5,
             beta=torch.randn(c_out, generator=g, dtype=torch.float64),
             residual=torch.randn(n, c_out, h_out, h_out, generator=g, dtype=torch.float64),
             grad=torch.randn(n, c_out, h_out, h_out, generator=g, dtype=torch.float64))
    return {k: v.to(dtype) for k, v in t.items()}


def _op(rank, dtype, stride, large_mean, fn=None):
    """Forward + backward of the projection on this rank's half of the batch (rank None: all)."""
    t = _inputs(dtype, stride, large_mean)
    sl = slice(None) if rank is None else slice(rank * 3, rank * 3 + 3)
    x = t["x"][sl].clone().requires_grad_()
    res = t["residual"][sl].clone().requires_grad_()
    w, gamma, beta = (t[k].clone().requires_grad_() for k in ("weight", "gamma", "beta"))
    rm, rv = torch.zeros(w.shape[0], dtype=dtype), torch.ones(w.shape[0], dtype=dtype)
    op = fn or sync_projection
    for _ in range(2):   # two calls: the running statistics accumulate
        out = op(x, w, gamma, beta, rm, rv, res, stride=stride, training=True, momentum=0.3, eps=1e-5)
    (out * t["grad"][sl]).sum().backward()
    return {"out": out.detach(), "x": x.grad, "residual": res.grad, "weight": w.grad, "gamma": gamma.grad,
            "beta": beta.grad, "running_mean": rm, "running_var": rv}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


CASES = [  # dtype, stride, large mean (x = 100 + noise), tolerance against float64 on the full batch
    (torch.float64, 2, False, 1e-10),
    (torch.float64, 1, True, 1e-10),
    (torch.float32, 3, True, 1e-5),
]


def _ops(rank):
    return [_op(rank, dtype, stride, large) for dtype, stride, large, _ in CASES]


def test_sync_projection_equals_full_batch(tmp_path):
    """Outputs, all gradients and running statistics of ``sync_projection`` on two ranks
    (3 images each) equal the eager composition on the 6 images in one process."""
    all_ranks = _spawn(_ops, tmp_path)   # one spawn for all cases: process start-up dominates
    for i, (dtype, stride, large, tol) in enumerate(CASES):
        ranks = [r[i] for r in all_ranks]
        ref = _op(None, torch.float64, stride, large, fn=projection_reference)
        errs = {}
        for k in ("out", "x", "residual"):   # per-sample tensors: the ranks' halves concatenated
            errs[k] = _rel(torch.cat([r[k] for r in ranks]), ref[k])
        for k in ("weight", "gamma", "beta"):   # parameter grads: contributions sum up (DDP then averages)
            errs[k] = _rel(sum(r[k] for r in ranks), ref[k])
        for k in ("running_mean", "running_var"):   # identical on every rank
            errs[k] = max(_rel(r[k], ref[k]) for r in ranks)
        bad = {k: v for k, v in errs.items() if v > tol}
        assert not bad, f"case {CASES[i][:3]}: sync_projection differs from the full batch: {errs}"


class _Net(nn.Module):
    """A small net whose only normalisation is in HierarchicalProjections (nn.SyncBatchNorm needs a GPU)."""

    def __init__(self, fused=True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.p0 = HierarchicalProjection(8, 16, stride=2, fused=fused)
        self.p1 = HierarchicalProjection(16, 16, stride=1, fused=fused)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        a = torch.relu(self.conv1(x))
        b = torch.relu(self.p0(a, self.conv2(a)))
        return self.head(self.p1(b, b).mean((2, 3)))


def _model(rank):
    """Three SGD steps of a DDP model with --sync-bn semantics on this rank's half of each batch."""
    torch.manual_seed(0)
    model = _Net(fused=rank is not None)   # one process: the eager modules (same state_dict)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(3)]
    if rank is not None:
        convert_sync_projection(model)
        net = nn.parallel.DistributedDataParallel(model)
    else:
        net = model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in data:
        if rank is not None:
            x, y = x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4]
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "eval_out": model(data[0][0]).detach()}


def test_ddp_model_with_synced_projections_equals_one_process(tmp_path):
    ranks = _spawn(_model, tmp_path)
    ref = _model(None)
    for r in ranks:
        for k, v in ref["state"].items():
            if v.is_floating_point():
                assert _rel(r["state"][k], v) < 1e-5, k
            else:
                assert torch.equal(r["state"][k], v), k
        assert _rel(r["eval_out"], ref["eval_out"]) < 1e-5
