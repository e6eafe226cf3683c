"""hires.models: registry, shapes, parameter counts, the projection rule, fused vs
eager equivalence, side placement, the analysis interface and torch.compile."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

import hires
from hires.models import is_plain, projection_sources

NAMES = ["hiplain18", "hiresnet18", "hiresnet34", "hiresnet50", "hiresnext29_8x64d", "hiresnext50_32x4d",
         "plain18", "resnet18", "resnet34", "resnet50", "resnext29_8x64d", "resnext50_32x4d"]
TWINS = [("resnet18", "hiresnet18"), ("resnet34", "hiresnet34"), ("resnet50", "hiresnet50"),
         ("plain18", "hiplain18"), ("resnext29_8x64d", "hiresnext29_8x64d"),
         ("resnext50_32x4d", "hiresnext50_32x4d")]
# Narrow versions for tests about semantics (same depth and hierarchy as the full models).
NARROW = {"hiresnet18": dict(planes=(4, 8, 8, 16), stem_width=4),
          "hiplain18": dict(planes=(4, 8, 8, 16), stem_width=4),
          "hiresnet50": dict(planes=(2, 4, 4, 8), stem_width=4),
          "hiresnext29_8x64d": dict(planes=(2, 4, 4), stem_width=4, groups=2, base_width=64)}


def narrow(name, **kwargs):
    return hires.create_model(name, **NARROW[name], **kwargs)


def num_params(model):
    return sum(p.numel() for p in model.parameters())


# --- registry and configuration errors ----------------------------------------------

def test_registry_lists_every_base_and_twin():
    assert hires.list_models() == sorted(NAMES)
    assert hires.list_models("hires*") == ["hiresnet18", "hiresnet34", "hiresnet50",
                                           "hiresnext29_8x64d", "hiresnext50_32x4d"]
    assert [n for n in NAMES if is_plain(n)] == [plain for plain, _ in sorted(TWINS)]


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(name="hiresnet19"), ValueError, "unknown model 'hiresnet19'; valid names: hiplain18, hiresnet18"),
    (dict(name="hiresnet18", sources="some"), ValueError, "sources must be one of 'all', 'stem', 'none'; got 'some'"),
    (dict(name="hiresnet18", side="middle"), ValueError, "side must be one of 'output', 'input'; got 'middle'"),
    (dict(name="hiresnet18", stem="tiny"), ValueError, "stem must be one of 'cifar', 'imagenet'"),
    (dict(name="resnet18", sources="all"), ValueError, "plain twin .* create 'hiresnet18'"),
    (dict(name="hiresnet18", num_class=10), TypeError, "unknown argument.*num_class.*valid: block"),
])
def test_bad_configuration_is_a_clear_error(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        hires.create_model(**kwargs)


# --- the projection rule -------------------------------------------------------------

def test_projection_rule():
    assert projection_sources(4, "all") == {2: [0], 3: [0, 1], 4: [0, 1, 2]}
    assert projection_sources(4, "stem") == {2: [0], 3: [0], 4: [0]}
    assert projection_sources(3, "all") == {2: [0], 3: [0, 1]}
    assert projection_sources(4, "none") == {}


@pytest.mark.parametrize("name, sources, count", [
    ("hiresnet18", "all", 6), ("hiresnet18", "stem", 3), ("hiresnet18", "none", 0), ("resnet18", "none", 0),
    ("hiresnext29_8x64d", "all", 3), ("hiresnext29_8x64d", "stem", 2)])
def test_projection_counts(name, sources, count):
    with torch.device("meta"):
        model = hires.create_model(name, sources=sources)
    assert model.num_projections() == count
    blocks = model.hierarchical_blocks()
    assert [n for n, _ in blocks] == [f"stages.{i}.0" for i in range(1, len(blocks) + 1)]


@pytest.mark.parametrize("side", ["output", "input"])
def test_projection_shapes_follow_the_side(side):
    """Output side: P_k matches the entry block's output; input side: its input."""
    model = narrow("hiresnet18", side=side).eval()
    seen = []
    for _, block in model.hierarchical_blocks():
        def hook(block, args, out):
            target = out if block.side == "output" else args[0]
            seen.append([(tuple(p(args[1][k]).shape), tuple(target.shape))
                         for k, p in zip(block.projection_sources, block.projections)])
        block.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert [len(s) for s in seen] == [1, 2, 3]
    for pairs in seen:
        for proj_shape, target_shape in pairs:
            assert proj_shape == target_shape


# --- shapes and parameters -----------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_forward_shapes(name):
    model = hires.create_model(name, num_classes=7).eval()
    with torch.no_grad():
        for size in (32, 64):
            assert model(torch.randn(1, 3, size, size)).shape == (1, 7)


@pytest.mark.parametrize("size, side", [(224, "output"), (100, "output"), (100, "input")])
def test_imagenet_stem(size, side):
    """224: sizes divide (56 -> 28 -> 14 -> 7); 100: 25 -> 13 -> 7 -> 4, which the
    projections' ceil-mode pooling matches."""
    model = hires.create_model("hiresnet18", stem="imagenet", side=side, num_classes=1000).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 1000)


def test_parameter_counts():
    rows = []
    for base, hi in TWINS:
        with torch.device("meta"):
            counts = [num_params(hires.create_model(base))] + [
                num_params(hires.create_model(hi, sources=s)) for s in ("stem", "all")]
        rows.append((base, hi, *counts))
    print("\n| base | params | HiResNet | sources=stem | sources=all |\n|---|---|---|---|---|")
    for base, hi, n, stem, all_ in rows:
        print(f"| {base} | {n / 1e6:.2f}M | {hi} | {stem / 1e6:.2f}M (+{100 * (stem / n - 1):.2f}%) "
              f"| {all_ / 1e6:.2f}M (+{100 * (all_ / n - 1):.2f}%) |")
    added = {base: all_ / n - 1 for base, _, n, _, all_ in rows}
    # The BasicBlock nets and ResNeXt-29 add ~1-2%; the 2048-wide last stage of the
    # 4-stage bottleneck nets makes their three projections into it ~9%.
    for base in ("resnet18", "resnet34", "plain18", "resnext29_8x64d"):
        assert 0.005 < added[base] < 0.02, (base, added[base])
    for base in ("resnet50", "resnext50_32x4d"):
        assert 0.05 < added[base] < 0.10, (base, added[base])
    assert all(stem < all_ for *_, stem, all_ in rows)


# --- fused and eager execution -------------------------------------------------------

def _step(model, x):
    out = model(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("name, side", [("hiresnet18", "output"), ("hiresnet18", "input"),
                                        ("hiplain18", "output"), ("hiresnet50", "input"),
                                        ("hiresnext29_8x64d", "output")])
def test_fused_equals_eager(name, side):
    torch.manual_seed(0)
    fused = narrow(name, side=side, fused=True).double()
    eager = narrow(name, side=side, fused=False).double()
    eager.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    for train in (True, False):
        fused.train(train), eager.train(train)
        out_f, grads_f = _step(fused, x)
        out_e, grads_e = _step(eager, x)
        torch.testing.assert_close(out_f, out_e, rtol=1e-9, atol=1e-9)
        for n in grads_e:
            torch.testing.assert_close(grads_f[n], grads_e[n], rtol=1e-9, atol=1e-9, msg=n)
        fused.zero_grad(), eager.zero_grad()
    for (n, a), b in zip(fused.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=n)


@pytest.mark.parametrize("sources", ["all", "stem"])
def test_fused_equals_eager_in_float32(sources):
    """Outputs, every gradient and the running statistics within float32 tolerance
    after two training steps (each level feeding several stages pooled once a step)."""
    torch.manual_seed(0)
    fused = narrow("hiresnet18", sources=sources, fused=True)
    eager = narrow("hiresnet18", sources=sources, fused=False)
    eager.load_state_dict(fused.state_dict())
    x = torch.randn(4, 3, 16, 16)
    for _ in range(2):
        out_f, grads_f = _step(fused, x)
        out_e, grads_e = _step(eager, x)
        torch.testing.assert_close(out_f, out_e, rtol=1e-5, atol=1e-5)
        for n in grads_e:
            torch.testing.assert_close(grads_f[n], grads_e[n], rtol=1e-4, atol=1e-5, msg=n)
    torch.testing.assert_close(fused.state_dict(), eager.state_dict(), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not hasattr(torch.ops.hires, "pool_source"), reason="the C++ extension is not built")
@pytest.mark.parametrize("sources, pools, projections", [("all", 2, 6), ("stem", 1, 3)])
def test_each_source_pooled_once(sources, pools, projections):
    """A fused HiResNet-18 pools each level that feeds several stages once (x_0 feeds 3
    and x_1 2 with "all"), and each target block runs its projection at stride 1 with its
    residual fused; x_2, the only source of its stage, keeps the op that pools it itself.
    Backward writes one gradient per pooled source. Evaluation and no-grad forwards take
    the same calls."""
    from collections import Counter

    from test_projection import _RecordOps

    def ours(mode):
        return Counter(op for op in mode.ops if op.startswith("hires."))

    model = narrow("hiresnet18", sources=sources, fused=True).train()
    with _RecordOps() as fwd:
        out = model(torch.randn(2, 3, 16, 16))
    with _RecordOps() as bwd:
        out.sum().backward()
    assert ours(fwd) == {"hires.pool_source": pools, "hires.projection": projections}
    assert ours(bwd) == {"hires.pool_source_backward": pools, "hires.projection_backward": projections}
    for train, grad in ((False, True), (True, False)):
        model.train(train)
        with _RecordOps() as fwd, torch.set_grad_enabled(grad):
            model(torch.randn(2, 3, 16, 16))
        assert ours(fwd) == {"hires.pool_source": pools, "hires.projection": projections}


def test_state_dicts_are_interchangeable():
    fused = narrow("hiresnet18", fused=True).eval()
    eager = narrow("hiresnet18", fused=False).eval()
    buf = io.BytesIO()
    torch.save(fused.state_dict(), buf)
    buf.seek(0)
    eager.load_state_dict(torch.load(buf))
    assert list(fused.state_dict()) == list(eager.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fused(x), eager(x), rtol=1e-5, atol=1e-5)


# --- where the projections are added ------------------------------------------------

@pytest.mark.parametrize("side", ["output", "input"])
def test_side_adds_projections_where_documented(side):
    """Projections with zero weights and BN bias c add exactly c per projection: on
    the output side to the pre-ReLU sum, on the input side to the block input."""
    torch.manual_seed(0)
    model = narrow("hiresnet18", side=side).eval()
    c = 0.25
    for _, block in model.hierarchical_blocks():
        for p in block.projections:
            torch.nn.init.zeros_(p.conv.weight)
            torch.nn.init.constant_(p.bn.bias, c)
    levels = [torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16), torch.randn(1, 8, 8, 8)]
    block = model.stages[2][0]                         # level 3: P0 and P1
    x = levels[2]
    shift = c * len(block.projections)
    with torch.no_grad():
        out = block(x, levels)
        if side == "output":
            expected = torch.relu(block.branch(x) + block.shortcut(x) + shift)
        else:
            expected = torch.relu(block.branch(x + shift) + block.shortcut(x + shift))
    torch.testing.assert_close(out, expected)


# --- analysis interface -------------------------------------------------------------

@pytest.mark.parametrize("side", ["output", "input"])
def test_capture_addends(side):
    torch.manual_seed(0)
    model = narrow("hiresnet18", side=side).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    reference = copy.deepcopy(model)
    blocks = dict(model.hierarchical_blocks())
    for b in blocks.values():
        b.capture_addends = True
    block = blocks["stages.3.0"]
    seen = {}
    block.register_forward_hook(lambda m, args, out: seen.update(input=args[0], out=out))
    out = model(x)                                     # training mode: statistics update once
    torch.testing.assert_close(out, reference(x))
    for (n, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, msg=n)
    addends = block.addends
    assert list(addends) == ["F", "shortcut", "P0", "P1", "P2"]
    assert block.side == side and not any(a.requires_grad for a in addends.values())
    projected = addends["P0"] + addends["P1"] + addends["P2"]
    if side == "output":
        torch.testing.assert_close(torch.relu(addends["F"] + addends["shortcut"] + projected), seen["out"])
    else:
        assert projected.shape == seen["input"].shape
        torch.testing.assert_close(torch.relu(addends["F"] + addends["shortcut"]), seen["out"])
    # The plain CNN's blocks have no shortcut addend.
    plain = narrow("hiplain18").eval()
    plain.stages[1][0].capture_addends = True
    with torch.no_grad():
        plain(torch.randn(1, 3, 16, 16))
    assert list(plain.stages[1][0].addends) == ["F", "P0"]


def test_ablating_every_projection_gives_the_plain_twin():
    torch.manual_seed(0)
    hi = narrow("hiresnet18").eval()
    plain = hires.create_model("resnet18", **NARROW["hiresnet18"]).eval()
    missing, unexpected = plain.load_state_dict(hi.state_dict(), strict=False)
    assert not missing and all(".projections." in k for k in unexpected)
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(hi(x), plain(x))
    for _, block in hi.hierarchical_blocks():
        block.ablate = {f"P{k}" for k in block.projection_sources}
    torch.testing.assert_close(hi(x), plain(x))


# --- torch.compile -------------------------------------------------------------------

def test_torch_compile_fullgraph_train_step():
    """One SGD step of a compiled fused HiResNet equals the eager step. Without a GPU
    the graph is captured whole (fullgraph) and run through AOTAutograd
    (``aot_eager``): inductor's C++ code generation would take minutes on a small CPU."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = "inductor" if device == "cuda" else "aot_eager"
    torch.manual_seed(0)
    model = hires.create_model("hiresnet18", planes=(4, 4, 8, 8), stem_width=4, depths=(1, 1, 1, 1),
                               num_classes=3, fused=True).to(device)
    eager = copy.deepcopy(model)
    x, y = torch.randn(4, 3, 16, 16, device=device), torch.tensor([0, 1, 2, 0], device=device)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    for net, m in ((compiled, model), (eager, eager)):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        F.cross_entropy(net(x), y).backward()
        opt.step()
    for (n, a), b in zip(model.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)
