"""hires_kernels.fuse: converting HierarchicalProjection(fused=False) and timm's
ResNet-D ``downsample`` (AvgPool2d -> 1x1 conv -> BatchNorm) to the fused op, which
runs as the compiled op (one call per direction)."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import hires
from hires_kernels import HierarchicalProjection, fuse, fused_projection
from hires_kernels.fuse import FusedPoolConvBN


def pool_conv_bn(pool, c_in, c_out, bias=False, bn=nn.BatchNorm2d, **bn_kwargs):
    return nn.Sequential(pool, nn.Conv2d(c_in, c_out, 1, bias=bias), bn(c_out, **bn_kwargs))


class NotPlainBatchNorm(nn.BatchNorm2d):
    """A BatchNorm2d subclass (like timm's BatchNormAct2d): fuse must leave it alone."""


class ShortcutNet(nn.Module):
    """Residual blocks whose shortcuts cover every accepted and rejected pattern."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.down = nn.ModuleDict({
            "resnet_d": pool_conv_bn(nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False), 4, 8),
            "floor_include_pad": pool_conv_bn(nn.AvgPool2d(2), 4, 8, momentum=None),
            "identity_pool": pool_conv_bn(nn.Identity(), 4, 8),
            "pool1": pool_conv_bn(nn.AvgPool2d(1), 4, 8),
            # left alone:
            "conv_bias": pool_conv_bn(nn.AvgPool2d(2), 4, 8, bias=True),
            "overlapping_pool": pool_conv_bn(nn.AvgPool2d(3, 2), 4, 8),
            "padded_pool": pool_conv_bn(nn.AvgPool2d(2, 2, padding=1), 4, 8),
            "bn_subclass": pool_conv_bn(nn.AvgPool2d(2), 4, 8, bn=NotPlainBatchNorm),
        })
        self.projection = HierarchicalProjection(4, 8, stride=2, fused=False)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        outs = [m(x) for m in self.down.values()] + [self.projection(x)]
        return torch.cat([o.flatten(1) for o in outs], 1)


CONVERTED = {"down.resnet_d": "FusedPoolConvBN(stride=2, ceil_mode=True)",
             "down.floor_include_pad": "FusedPoolConvBN(stride=2, ceil_mode=False)",
             "down.identity_pool": "FusedPoolConvBN(stride=1, ceil_mode=False)",
             "down.pool1": "FusedPoolConvBN(stride=1, ceil_mode=False)",
             "projection": "HierarchicalProjection(fused=True)"}


def _run(model, x, train):
    model.train(train)
    out = model(x)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("size", [8, 7])
def test_fuse_converts_the_patterns_and_keeps_the_numbers(size):
    torch.manual_seed(0)
    model = ShortcutNet().double()
    before = copy.deepcopy(model)
    keys = list(model.state_dict())
    report = fuse(model)
    assert {c.name: c.after for c in report} == CONVERTED
    assert str(report[0]) == ("down.resnet_d: Sequential(AvgPool2d, Conv2d 1x1, BatchNorm2d) -> "
                              "FusedPoolConvBN(stride=2, ceil_mode=True)")
    assert list(model.state_dict()) == keys
    for name, m in model.down.items():
        assert isinstance(m, FusedPoolConvBN) == (f"down.{name}" in CONVERTED), name
    x = torch.randn(3, 3, size, size, dtype=torch.float64)
    for train in (True, False, True):
        out, grads = _run(model, x, train)
        out_ref, grads_ref = _run(before, x, train)
        torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
        for n in grads_ref:
            torch.testing.assert_close(grads[n], grads_ref[n], rtol=1e-10, atol=1e-10, msg=n)
        model.zero_grad(), before.zero_grad()
    for (n, a), b in zip(model.state_dict().items(), before.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=n)  # incl. num_batches_tracked
    assert fuse(model) == []                                  # nothing left to convert


@pytest.mark.parametrize("size", [8, 7, 5])
@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("stride", [2, 3])
def test_count_include_pad_does_not_matter_without_padding(stride, ceil_mode, size):
    """Why fuse accepts either count_include_pad: with padding 0 every window (also a
    partial ceil-mode one) divides by the elements it covers, as the op does."""
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    with_pad = F.avg_pool2d(x, stride, stride, ceil_mode=ceil_mode, count_include_pad=True)
    without = F.avg_pool2d(x, stride, stride, ceil_mode=ceil_mode, count_include_pad=False)
    torch.testing.assert_close(with_pad, without, rtol=0, atol=0)
    w, rm, rv = torch.randn(4, 3, dtype=torch.float64), torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    out = fused_projection(x, w, None, None, rm, rv, stride=stride, training=False, ceil_mode=ceil_mode)
    expected = F.batch_norm(F.conv2d(with_pad, w.view(4, 3, 1, 1)), rm, rv, training=False)
    torch.testing.assert_close(out, expected)


def test_fuse_a_hiresnet_built_eager():
    torch.manual_seed(0)
    eager = hires.create_model("hiresnet18", planes=(4, 8, 8, 16), stem_width=4, fused=False).eval()
    fused = hires.create_model("hiresnet18", planes=(4, 8, 8, 16), stem_width=4, fused=True).eval()
    fused.load_state_dict(eager.state_dict())
    report = fuse(eager)
    assert [c.name for c in report] == [f"stages.{l}.0.projections.{i}" for l in (1, 2, 3) for i in range(l)]
    assert all(p.fused for _, b in eager.hierarchical_blocks() for p in b.projections)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(eager(x), fused(x))


def test_fuse_backend_argument():
    model = nn.Sequential(pool_conv_bn(nn.AvgPool2d(2), 4, 8), HierarchicalProjection(8, 8, fused=False))
    fuse(model, backend="reference")
    assert model[0].backend == model[1].backend == "reference"
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        fuse(model, backend="fast")


# --- timm's ResNet-D on the fast path ------------------------------------------------

class ResNetDBottleneck(nn.Module):
    """timm's ResNet-D Bottleneck (timm/models/resnet.py, avg_down=True) as fuse meets
    it: 1x1 -> 3x3 (the stride) -> 1x1 convs with BatchNorms, plus downsample_avg's
    shortcut, Sequential(AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False),
    or Identity at stride 1; 1x1 conv; BatchNorm2d), added in place as timm adds it."""

    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        c_out = 4 * width
        self.conv1, self.bn1 = nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, c_out, 1, bias=False), nn.BatchNorm2d(c_out)
        pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity()
        self.downsample = nn.Sequential(pool, nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        shortcut = self.downsample(x)
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        x += shortcut
        return torch.relu(x)


class _CountOps(TorchDispatchMode):
    """Counts the ops that reach the dispatcher at the top level (a fused op's inner
    work does not show)."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _check_fast_path(model: nn.Module, x: torch.Tensor, downsamples: int) -> None:
    """fuse() turns each of ``model``'s ``downsample`` shortcuts, and nothing else, into a
    FusedPoolConvBN; in float64, outputs and every gradient of a train and an eval
    forward + backward, and the state_dict (running statistics, batch counts), equal the
    unfused model's; a train forward + backward dispatches the compiled op, one
    ``hires.projection`` and one ``hires.projection_backward`` per shortcut, and no
    avg_pool2d (which the unfused model runs)."""
    reference = model.double()
    fused = copy.deepcopy(reference)
    report = fuse(fused)
    shortcuts = [name for name, _ in fused.named_modules() if name.endswith(".downsample")]
    assert len(shortcuts) == downsamples and [c.name for c in report] == shortcuts, report
    assert all(isinstance(fused.get_submodule(name), FusedPoolConvBN) for name in shortcuts)
    x = x.double()
    counted = {}
    for train in (True, False):
        for key, net in (("fused", fused), ("reference", reference)):
            with _CountOps() as mode:
                counted[key] = (*_run(net, x, train), mode.counts)
            net.zero_grad()
        (out, grads, ops), (out_ref, grads_ref, ops_ref) = counted["fused"], counted["reference"]
        torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
        for name in grads_ref:
            torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-9, atol=1e-10, msg=name)
        if train:
            assert ops["hires.projection"] == ops["hires.projection_backward"] == downsamples, ops
            assert ops["aten.avg_pool2d"] == ops["aten.avg_pool2d_backward"] == 0, ops
            assert ops_ref["aten.avg_pool2d"] > 0 and ops_ref["hires.projection"] == 0, ops_ref
    for (name, a), b in zip(fused.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


needs_extension = pytest.mark.skipif(not hasattr(torch.ops.hires, "projection"),
                                     reason="the C++ extension is not built")


@needs_extension
def test_resnet_d_shortcuts_run_the_compiled_op():
    """timm's ResNet-D pattern built by hand, so that it is tested where timm is not
    installed (timm needs torchvision): a stride-1 shortcut (Identity pool) and two
    stride-2 ones with ceil-mode windows (odd sizes, 15 -> 8 -> 4)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          ResNetDBottleneck(8, 4, 1), ResNetDBottleneck(16, 8, 2), ResNetDBottleneck(32, 8, 2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    _check_fast_path(model, torch.randn(2, 3, 15, 15), downsamples=3)


@needs_extension
@pytest.mark.parametrize("name", ["resnet26d", "resnet50d"])
def test_timm_resnet_d_runs_the_compiled_op(name):
    """At 40x40 the shortcuts of layers 3 and 4 pool 5x5 -> 3x3 and 3x3 -> 2x2: ceil-mode
    windows that are cut short."""
    timm = pytest.importorskip("timm", reason="timm is not installed")
    torch.manual_seed(0)
    _check_fast_path(timm.create_model(name, pretrained=False, num_classes=10), torch.randn(2, 3, 40, 40),
                     downsamples=4)


# --- timm (not installed on the CPU machine; runs where it is) ---------------------

@pytest.mark.parametrize("name, converted", [("resnet50d", 4), ("resnext50d_32x4d", 4)])
def test_timm_resnet_d(name, converted):
    timm = pytest.importorskip("timm", reason="timm is not installed")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).to(device)
    reference = copy.deepcopy(model)
    report = fuse(model)
    assert len(report) == converted and all(c.name.endswith(".downsample") for c in report), report
    x = torch.randn(4, 3, 96, 96, device=device)
    # cuDNN convolutions default to TF32 on GPUs: the eager shortcut's 1x1 conv would then
    # round its inputs to 10 bits while the fused op does not, and 50 layers amplify that
    # (3.7e-4 on an H200). Compare in IEEE float32, as the op's own tests do.
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
        for train in (True, False):
            model.train(train), reference.train(train)
            torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)
