"""Bad input: a clear error naming the argument, before any kernel, with no state changed."""

from __future__ import annotations

import pytest
import torch

from hires_kernels import HierarchicalProjection, fused_projection


def good():
    return dict(
        x=torch.randn(2, 4, 6, 6), weight=torch.randn(5, 4), bn_weight=torch.ones(5), bn_bias=torch.zeros(5),
        running_mean=torch.randn(5), running_var=torch.rand(5) + 0.5, residual=torch.randn(2, 5, 3, 3),
        stride=2, training=True,
    )


BAD = {
    "x rank": (dict(x=torch.randn(4, 6, 6)), "x must be a 4-D"),
    "x integer": (dict(x=torch.ones(2, 4, 6, 6, dtype=torch.int64)), "x has dtype"),
    "empty batch": (dict(x=torch.randn(0, 4, 6, 6), residual=torch.randn(0, 5, 3, 3)), "empty batch"),
    "weight channels": (dict(weight=torch.randn(5, 3)), "weight has 3 input channels"),
    "no output channels": (dict(weight=torch.randn(0, 4)), "no channels"),
    "no input channels": (dict(x=torch.randn(2, 0, 6, 6), weight=torch.randn(5, 0)), "no channels"),
    "weight kernel": (dict(weight=torch.randn(5, 4, 3, 3)), "weight must be"),
    "stride zero": (dict(stride=0), "stride must be an integer >= 1"),
    "stride float": (dict(stride=1.5), "stride must be an integer >= 1"),
    "stride too large": (dict(stride=7), "stride=7 is larger than the input"),
    "residual shape": (dict(residual=torch.randn(2, 5, 6, 6)), "residual must have shape"),
    "residual dtype": (dict(residual=torch.randn(2, 5, 3, 3, dtype=torch.float64)), "residual has dtype"),
    "bn_weight shape": (dict(bn_weight=torch.ones(4)), "bn_weight must have shape"),
    "running_var shape": (dict(running_var=torch.ones(6)), "running_var must have shape"),
    "running stats half given": (dict(running_var=None), "given together"),
    "eval without running stats": (dict(running_mean=None, running_var=None, training=False), "required in eval mode"),
    "one value per channel": (dict(x=torch.randn(1, 4, 2, 2), residual=None), "more than 1 value per channel"),
    "mixed devices": (dict(weight=torch.randn(5, 4, device="meta")), "weight is on meta"),
}


@pytest.mark.parametrize("backend", ["cpu", "reference"])  # the C++ checks and the Python backends' copy
@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_before_any_change(name, backend):
    overrides, message = BAD[name]
    args = {**good(), **overrides}
    before = [t.clone() if t is not None else None for t in (args["running_mean"], args["running_var"])]
    x = args.pop("x")
    stride, training = args.pop("stride"), args.pop("training")
    with pytest.raises((ValueError, RuntimeError), match=message):
        fused_projection(x, args["weight"], args["bn_weight"], args["bn_bias"], args["running_mean"],
                         args["running_var"], args["residual"], stride=stride, training=training, backend=backend)
    for now, then in zip((args["running_mean"], args["running_var"]), before):
        if now is not None:
            assert torch.equal(now, then), "running statistics changed by a rejected call"


def test_unknown_backend_is_an_error_before_state_changes():
    args = good()
    rm = args["running_mean"].clone()
    with pytest.raises(RuntimeError, match="unknown backend"):
        fused_projection(args["x"], args["weight"], None, None, args["running_mean"], args["running_var"],
                         stride=2, backend="nope")
    assert torch.equal(rm, args["running_mean"])


def test_module_rejects_bad_input_without_counting_a_batch():
    m = HierarchicalProjection(4, 5, stride=2)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="x must be a 4-D"):
        m(torch.randn(4, 6, 6))
    with pytest.raises(ValueError, match="residual must have shape"):
        m(torch.randn(2, 4, 6, 6), torch.randn(2, 5, 6, 6))
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed by a rejected call"
    with pytest.raises(ValueError, match="stride must be >= 1"):
        HierarchicalProjection(4, 5, stride=0)


@pytest.mark.skipif(not hasattr(torch.ops.hires, "projection"), reason="the C++ extension is not built")
def test_kernels_called_directly_reject_a_stride_larger_than_the_input():
    """Floor mode pools a 1-row input with stride 2 to 0 rows (as ATen), not to 1."""
    x, w = torch.randn(1, 4, 1, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="stride=2 is larger than the input 1x4"):
        torch.ops.hires.projection(x, w, None, None, None, None, None, 2, False, True, 0.1, 1e-5)
