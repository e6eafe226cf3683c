"""Interleaved host-cost steps: the narrow models of test_bench_host.py, one step of each in
turn, so that a machine's drift hits them all alike (pytest-benchmark runs one case after
the other). Prints each model's percentiles and their ratio to ResNet-18's; with --parts,
also the forward + backward and the SGD step of each model apart (p10 of 1,000 calls).

HiResNet-18 runs with sources "all" and "stem", with ``eager`` or ``fused`` projections
(each source pooled once for all its targets), and with sources "all" in two more variants:
``fused-separate`` (every fused projection pools its source itself, as without pool_source)
and ``none`` (projections that return their residual untouched: the hierarchy's bookkeeping
alone).

    python bench/host_steps.py [--rounds 400] [--parts]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import _util
import hires

NARROW = {"planes": [4, 8, 16, 32], "stem_width": 4}
MODELS = ([("resnet18", None, "eager")] + [("hiresnet18", s, v) for s in ("all", "stem") for v in ("eager", "fused")]
          + [("hiresnet18", "all", v) for v in ("fused-separate", "none")])
QUANTILES = (0.1, 0.5)


def _residual_only(x, residual=None, *, pooled=False):
    return residual


def _no_pooling_once(k, x, entries, pooled):
    return None


def make_step(name, sources, variant):
    """(step, forward + backward, optimizer step) of one model; variant: "eager", "fused",
    "fused-separate" or "none" (see the module docstring)."""
    torch.manual_seed(0)
    kwargs = dict(NARROW, sources=sources, fused=variant != "eager") if sources else dict(NARROW)
    model = hires.create_model(name, num_classes=10, **kwargs).train()
    if variant == "fused-separate":
        model._pool = _no_pooling_once
    if variant == "none":
        for _, block in model.hierarchical_blocks():
            for projection in block.projections:
                projection.forward = _residual_only
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 8, 8, generator=g), torch.randint(0, 10, (2,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def forward_backward():
        F.cross_entropy(model(x), y).backward()

    def step():
        opt.zero_grad(set_to_none=True)
        forward_backward()
        opt.step()

    return step, forward_backward, opt.step


def p10_us(fn, calls=1000):
    return _util.host_quantile_s(fn, calls, 0.1, warmup_calls=20) * 1e6


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=400)
    p.add_argument("--parts", action="store_true", help="also time forward + backward and the SGD step apart")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    made = {(n if s is None else f"{n}-{s}-{v}"): make_step(n, s, v) for n, s, v in MODELS}
    steps = {k: v[0] for k, v in made.items()}
    for step in steps.values():
        for _ in range(20):
            step()
    times = {k: [] for k in steps}
    for _ in range(args.rounds):
        for k, step in steps.items():
            t = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - t)
    at = {k: sorted(v) for k, v in times.items()}
    q = {k: {f: v[int(len(v) * f)] for f in QUANTILES} for k, v in at.items()}
    base = q["resnet18"]
    for k in steps:
        print(f"{k:30s} " + "  ".join(f"p{int(f * 100)} {q[k][f] * 1e3:.3f} ms ({q[k][f] / base[f]:.3f}x)"
                                     for f in QUANTILES))
    if args.parts:
        for k, (_, forward_backward, opt_step) in made.items():
            # forward_backward leaves gradients, so the optimizer step is timed on real ones.
            print(f"{k:30s} forward+backward {p10_us(forward_backward, 300):.0f} us  "
                  f"SGD step {p10_us(opt_step):.0f} us")


if __name__ == "__main__":
    main()
