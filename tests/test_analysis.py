"""hires.analysis: numbers against hand computation, figures, plain-model message."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hires.analysis import ablation, addend_stats, analyze
from hires_kernels import HierarchicalProjection

EPS = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is faster, and far faster on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class StandInBlock(nn.Module):
    """A block with the analysis interface of hires.models:

        out = relu(F(x) + shortcut(x) + sum_k P_k(x_k))        (side="output")

    F: avgpool(stride) -> 1x1 conv (no BN) so that it is hand-computable;
    shortcut: avgpool(stride)."""

    def __init__(self, channels, stride, sources, fused=True, side="output"):
        super().__init__()
        self.stride = stride
        self.f = nn.Conv2d(channels, channels, 1, bias=False)
        self.projections = nn.ModuleList(
            # input side: P_k matches the block input, which is not pooled yet here
            HierarchicalProjection(channels, channels, stride=1 if side == "input" else s, fused=fused)
            for _, s in sources)
        self.projection_sources = [k for k, _ in sources]
        self.side = side
        self.capture_addends = False
        self.addends = None
        self.ablate = set()

    def _pool(self, x):
        return F.avg_pool2d(x, self.stride) if self.stride > 1 else x

    def forward(self, x, levels):
        xs = [levels[k] for k in self.projection_sources]
        keys = [f"P{k}" for k in self.projection_sources]
        if self.side == "input":
            if self.capture_addends:
                ps = {key: proj.bn(proj.conv(proj_pool(proj, xk))) for key, proj, xk in zip(keys, self.projections, xs)}
            for key, proj, xk in zip(keys, self.projections, xs):
                if key not in self.ablate:
                    x = proj(xk, x)
        f, s = self.f(self._pool(x)), self._pool(x)
        if self.capture_addends:
            if self.side == "output":
                ps = {key: proj.bn(proj.conv(proj_pool(proj, xk))) for key, proj, xk in zip(keys, self.projections, xs)}
            self.addends = {"F": f.detach(), "shortcut": s.detach(), **{k: v.detach() for k, v in ps.items()}}
        out = f + s
        if self.side == "output":
            for key, proj, xk in zip(keys, self.projections, xs):
                if key not in self.ablate:
                    out = proj(xk, out)
        return torch.relu(out)


def proj_pool(proj, x):
    return F.avg_pool2d(x, proj.stride) if proj.stride > 1 else x


class StandInNet(nn.Module):
    """stem (identity, level 0) -> block1 (level 1, P0) -> block2 (level 2, stride 2,
    P0 and P1) -> global average pool -> linear head."""

    def __init__(self, channels=2, fused=True, side="output", plain=False, num_classes=2):
        super().__init__()
        self.block1 = StandInBlock(channels, 1, [] if plain else [(0, 1)], fused, side)
        self.block2 = StandInBlock(channels, 2, [] if plain else [(0, 2), (1, 2)], fused, side)
        self.head = nn.Linear(channels, num_classes)

    def hierarchical_blocks(self):
        return [(n, b) for n, b in [("block1", self.block1), ("block2", self.block2)] if len(b.projections)]

    def forward(self, x):
        x1 = self.block1(x, [x])
        x2 = self.block2(x1, [x, x1])
        return self.head(x2.mean((2, 3)))


def hand_net(fused=True):
    """block1 with known weights: F = diag(0.5, 2) x, P0 = -diag(0.5, 2) x / sqrt(1+eps)
    (BN at its initial running statistics), so F and P0 are exactly opposed; the
    head predicts class 1 iff mean(channel 1) > 3."""
    torch.manual_seed(0)
    net = StandInNet(fused=fused)
    with torch.no_grad():
        a = torch.tensor([0.5, 2.0])
        net.block1.f.weight.copy_(torch.diag(a).view(2, 2, 1, 1))
        net.block1.projections[0].conv.weight.copy_(-torch.diag(a).view(2, 2, 1, 1))
        net.head.weight.copy_(torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
        net.head.bias.copy_(torch.tensor([0.0, -3.0]))
    return net.eval()


def hand_images():
    """Image 0: channels constant (1, 2); image 1: constant (3, -1); 4x4."""
    x = torch.empty(2, 2, 4, 4)
    x[0, 0], x[0, 1], x[1, 0], x[1, 1] = 1.0, 2.0, 3.0, -1.0
    return x


@pytest.mark.parametrize("fused", [True, False])
def test_numbers_match_hand_computation(fused):
    net = hand_net(fused)
    stats, _ = addend_stats(net, hand_images())
    b1 = stats["block1"]
    s = math.sqrt(1 + EPS)
    # Per-channel L2 over 4x4 of a constant map v is 4|v|.
    # F: image0 (0.5, 4) -> (2, 16); image1 (1.5, -2) -> (6, 8): mean 8.
    # shortcut = x: image0 (1, 2) -> (4, 8); image1 (3, -1) -> (12, 4): mean 7.
    # P0 = -F / s: mean 8 / s.
    norms = {"F": 8.0, "shortcut": 7.0, "P0": 8.0 / s}
    total = sum(norms.values())
    for k, v in norms.items():
        assert b1["addends"][k]["mean_channel_norm"] == pytest.approx(v, rel=1e-5)
        assert b1["addends"][k]["share"] == pytest.approx(v / total, rel=1e-5)
    assert b1["addends"]["F"]["per_channel_norm"] == pytest.approx([4.0, 12.0], rel=1e-6)
    assert b1["addends"]["shortcut"]["mean_channel_rms"] == pytest.approx(7.0 / 4, rel=1e-6)
    # cos(F, P0) = -1 exactly; cos(F, x) per image: 8.5 / (|(0.5,4)| |(1,2)|), 6.5 / (2.5 sqrt(10)).
    assert b1["cosine_F"]["P0"] == pytest.approx(-1.0, abs=1e-6)
    cos_fs = (8.5 / (math.sqrt(16.25) * math.sqrt(5)) + 6.5 / (2.5 * math.sqrt(10))) / 2
    assert b1["cosine_F"]["shortcut"] == pytest.approx(cos_fs, rel=1e-6)
    assert b1["side"] == "output" and b1["sources"] == [0]
    assert set(stats["block2"]["addends"]) == {"F", "shortcut", "P0", "P1"}
    assert stats["block2"]["addends"]["P1"]["shape"] == [2, 2, 2]
    assert sum(a["share"] for a in stats["block2"]["addends"].values()) == pytest.approx(1.0)
    # capture is switched off again and the model is back in its mode
    assert not net.block1.capture_addends and net.block1.addends is None and not net.training


def test_block2_numbers_match_direct_computation():
    """block2 (random weights, stride 2, two sources) against a direct eager computation."""
    net = hand_net()
    with torch.no_grad():
        net.block2.f.weight.normal_()
        for p in net.block2.projections:
            p.conv.weight.normal_()
            p.bn.running_mean.normal_()
            p.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(5, 2, 4, 4)
    stats, _ = addend_stats(net, x, batch_size=2)  # several batches are accumulated
    with torch.no_grad():
        x1 = net.block1(x, [x])
        b = net.block2
        f, sc = b.f(F.avg_pool2d(x1, 2)), F.avg_pool2d(x1, 2)
        p0 = b.projections[0].bn(b.projections[0].conv(F.avg_pool2d(x, 2)))
        p1 = b.projections[1].bn(b.projections[1].conv(F.avg_pool2d(x1, 2)))
    got = stats["block2"]
    for k, t in {"F": f, "shortcut": sc, "P0": p0, "P1": p1}.items():
        want = sum(float(t[n, c].pow(2).sum().sqrt()) for n in range(5) for c in range(2)) / 10
        assert got["addends"][k]["mean_channel_norm"] == pytest.approx(want, rel=1e-5)
    want_cos = sum(float((f[n] * p1[n]).sum() / (f[n].norm() * p1[n].norm())) for n in range(5)) / 5
    assert got["cosine_F"]["P1"] == pytest.approx(want_cos, rel=1e-5)


def test_ablation_matches_hand_computation():
    net = hand_net()
    x, y = hand_images(), torch.tensor([0, 0])
    # With P0: block1 = relu(F + x - F/s) ~ relu(x); block2 output GAP of channel 1 stays
    # below 3 only if block2 is small: zero block2's own terms to make it hand-computable.
    with torch.no_grad():
        net.block2.f.weight.zero_()
        for p in net.block2.projections:
            p.bn.weight.zero_()
    # Baseline: channel-1 means 2 (image 0) and 0 (image 1) -> class 0, 0: accuracy 1.
    # P0 of block1 off: relu((1 + diag(0.5, 2)) x): channel-1 means 6 and 0 -> class 1, 0.
    abl = ablation(net, (x, y), progress=False)
    assert abl["baseline_accuracy"] == 1.0 and abl["num_images"] == 2
    assert abl["blocks"]["block1"]["P0"] == {"accuracy": 0.5, "drop": 0.5, "flipped": 0.5}
    assert abl["blocks"]["block2"]["P1"]["drop"] == 0.0
    assert abl["all_projections"]["drop"] == 0.5
    assert all(not b.ablate for b in (net.block1, net.block2))
    # Without labels only the changed predictions are reported.
    unl = ablation(net, x, progress=False)
    assert unl["baseline_accuracy"] is None and unl["blocks"]["block1"]["P0"]["flipped"] == 0.5


def test_analyze_writes_report_and_figures(tmp_path):
    torch.manual_seed(1)
    net = StandInNet(channels=6, num_classes=3)
    x, y = torch.randn(12, 6, 8, 8), torch.randint(0, 3, (12,))
    test = (torch.randn(20, 6, 8, 8), torch.randint(0, 3, (20,)))
    plain = StandInNet(channels=6, num_classes=3, plain=True)
    report = analyze(net, x, y, test_loader=test, out_dir=tmp_path, contrast=plain,
                     num_feature_images=2, top_channels=2, batch_size=8, progress=False)
    saved = json.loads((tmp_path / "analysis.json").read_text())
    assert saved["blocks"]["block2"]["ablation"]["P1"]["accuracy"] == report["blocks"]["block2"]["ablation"]["P1"]["accuracy"]
    assert saved["ablation"]["num_images"] == 20 and saved["num_images"] == 12
    assert set(saved["contrast"]["plain"]) == {"block1", "block2"}
    assert "F_over_shortcut" in saved["contrast"]["hires"]["block2"]
    files = [saved["figures"][k] for k in ("addend_shares", "cosine_F_vs_P", "ablation", "contrast")]
    files += list(saved["figures"]["feature_maps"].values())
    assert len(saved["figures"]["feature_maps"]) == 2
    for f in files:
        data = (tmp_path / f).read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n", f


def test_plain_model_gives_clear_message():
    with pytest.raises(ValueError, match="no hierarchical projections.*--contrast"):
        analyze(StandInNet(plain=True), torch.randn(2, 2, 4, 4))


def test_input_side_cosine_is_null_where_shapes_differ():
    torch.manual_seed(2)
    net = StandInNet(channels=3, side="input")
    stats, _ = addend_stats(net, torch.randn(4, 3, 8, 8))
    assert stats["block1"]["cosine_F"]["P0"] is not None  # same shape (stride 1)
    assert stats["block2"]["cosine_F"]["P1"] is None       # P1 at 8x8 input, F at 4x4
    assert stats["block2"]["addends"]["P1"]["shape"] == [3, 8, 8]


# --- the real models of hires.models ------------------------------------------------

TINY = dict(planes=(8, 8, 16, 16), stem_width=8)


def _tiny(name="hiresnet18", **kw):
    models = pytest.importorskip("hires.models")
    torch.manual_seed(0)
    model = models.create_model(name, num_classes=10, **TINY, **kw)
    # non-trivial BN statistics, so that eval mode differs from the initial identity
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, 16, 16))
    return model.eval()


@pytest.mark.parametrize("side", ["output", "input"])
def test_hiresnet_fused_and_eager_give_the_same_report(side):
    fused = _tiny(sources="all", side=side, fused=True)
    eager = _tiny(sources="all", side=side, fused=False)
    eager.load_state_dict(fused.state_dict())
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,))
    a = analyze(fused, x, y, progress=False)
    b = analyze(eager, x, y, progress=False)
    assert a["num_projections"] == 6 and a["fused"] == [True] and b["fused"] == [False]
    assert list(a["blocks"]) == [n for n, _ in fused.hierarchical_blocks()]
    for name, blk in a["blocks"].items():
        assert set(blk["addends"]) == {"F", "shortcut", *(f"P{k}" for k in blk["sources"])}
        for k, v in blk["addends"].items():
            assert v["mean_channel_norm"] == pytest.approx(b["blocks"][name]["addends"][k]["mean_channel_norm"], rel=1e-5)
        for k, e in blk["ablation"].items():
            assert e == b["blocks"][name]["ablation"][k]
    # P_k of the entry block of stage 4 against a direct eager computation
    name, block = fused.hierarchical_blocks()[-1]
    with torch.no_grad():
        levels = [fused.stem(x)]
        for stage in fused.stages[:-1]:
            levels.append(stage(levels[-1]) if len(levels) == 1 else stage[1:](stage[0](levels[-1], levels)))
        proj = block.projections[0]
        p = proj.bn(proj.conv(F.avg_pool2d(levels[block.projection_sources[0]], proj.stride, ceil_mode=True)))
    want = float(p.flatten(2).norm(dim=2).mean())
    assert a["blocks"][name]["addends"][f"P{block.projection_sources[0]}"]["mean_channel_norm"] == pytest.approx(want, rel=1e-5)


def test_hiresnet_plain_twin_message_and_contrast(tmp_path):
    plain = _tiny("resnet18")
    with pytest.raises(ValueError, match="no hierarchical projections"):
        analyze(plain, torch.randn(2, 3, 16, 16))
    model = _tiny(sources="stem")
    report = analyze(model, torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)), out_dir=tmp_path,
                     contrast=plain, progress=False)
    assert report["num_projections"] == 3
    assert set(report["contrast"]["plain"]) == {n for n, _ in plain.named_modules() if hasattr(_, "capture_addends")}
    assert set(report["contrast"]["hires"]) == set(report["contrast"]["plain"])
    assert (tmp_path / "contrast.png").stat().st_size > 1000


def test_cli_on_a_training_checkpoint(tmp_path, capsys):
    """`hires analyze` end to end on the offline digits data and a checkpoint in the
    format hires.train writes."""
    pytest.importorskip("sklearn")
    import argparse

    from hires.analysis import add_arguments, main

    model = _tiny(sources="all", fused=True)
    config = {"model": "hiresnet18", "num_classes": 10, "sources": "all", "side": None, "fused": True,
              "stem": None, "model_kwargs": TINY, "dataset": "digits", "data": None}
    torch.save({"model": model.state_dict(), "config": config,
                "normalization": {"mean": (0.305,) * 3, "std": (0.376,) * 3}}, tmp_path / "best.pt")
    plain_config = {**config, "model": "resnet18", "sources": None}
    torch.save({"model": _tiny("resnet18").state_dict(), "config": plain_config}, tmp_path / "plain.pt")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "analysis"
    args = parser.parse_args(["--checkpoint", str(tmp_path / "best.pt"), "--out", str(out), "--num-images", "10",
                              "--ablation-images", "30", "--feature-images", "2", "--no-fused", "--no-progress",
                              "--contrast", str(tmp_path / "plain.pt")])
    assert main(args) == 0
    saved = json.loads((out / "analysis.json").read_text())
    assert saved["num_images"] == 10 and saved["ablation"]["num_images"] == 30 and saved["fused"] == [False]
    assert saved["ablation"]["baseline_accuracy"] is not None
    assert all((out / f).stat().st_size > 1000 for f in saved["figures"]["feature_maps"].values())
    assert list(saved["blocks"]) == [n for n, _ in model.hierarchical_blocks()]
    assert saved["contrast"]["plain"]["stages.1.0"]["F_over_shortcut"] > 0
    assert "baseline accuracy" in capsys.readouterr().out
    # a plain checkpoint: the clear message, exit status 2
    args.checkpoint, args.contrast = str(tmp_path / "plain.pt"), None
    assert main(args) == 2
    assert "no hierarchical projections" in capsys.readouterr().err
