"""The CUDA kernels (csrc/cuda/*.cu), run on the CPU against the reference backend.

Without a GPU the CUDA backend would only be compiled (test_cuda_compile.py). Here its
source is turned into plain C++ (cuda_emulation.h: each block of a launch runs as one
thread per CUDA thread with real barriers) and built as a CPU extension, so the kernels'
index math, masks, barriers, reductions and launch code run in CI, on small shapes.
Outputs start as NaN, so anything a kernel fails to write fails the comparison.
"""

from __future__ import annotations

import os
import re
import shutil

import pytest
import torch

from hires_kernels.backends import reference
from hires_kernels.shapes import data_shift, pooled_size
from projection_cases import layout, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "csrc", "cuda", "projection_cuda.cu")
PRELUDE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emulation.h")


def _matching_paren(text: str, open_at: int) -> int:
    depth = 0
    for i in range(open_at, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    raise ValueError("unbalanced parentheses in a kernel launch")


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1, "<": 1, ">": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    return parts + [text[start:].strip()]


def emulated_source(cu: str) -> str:
    """The .cu source as C++ for the CPU: CUDA headers give way to the emulation,
    `kernel<<<grid, block, shm, stream>>>(args);` to `emu_launch(grid, block, [&] { kernel(args); });`,
    device checks to CPU ones, and the CUDA dispatch registration to an op library of its own."""
    cu = re.sub(r"#include <(cuda_runtime\.h|c10/cuda/[^>]+)>\n", "", cu)
    cu = cu.replace("#include <torch/library.h>", '#include "cuda_emulation.h"', 1)
    cu = cu.replace("at::empty(", "emu_empty(").replace(".is_cuda()", ".is_cpu()")
    out, pos = [], 0
    for launch in re.finditer(r"<<<(.*?)>>>\(", cu, flags=re.S):
        line_start = cu.rfind("\n", 0, launch.start()) + 1
        kernel_at = line_start + len(cu[line_start:launch.start()]) - len(cu[line_start:launch.start()].lstrip())
        close = _matching_paren(cu, launch.end() - 1)
        assert cu[close + 1] == ";", "a kernel launch must be a statement of its own"
        grid, block = _split_top_level(launch.group(1))[:2]
        kernel = cu[kernel_at:launch.start()]
        args = cu[launch.end():close]
        out.append(cu[pos:kernel_at])
        out.append(f"emu_launch(dim3({grid}), dim3({block}), [&] {{ {kernel}({args}); }});")
        pos = close + 2
    cu = "".join(out) + cu[pos:]
    registration = "TORCH_LIBRARY_IMPL(hires_C, CUDA, m)"
    assert registration in cu, "the CUDA kernels are no longer registered as expected"
    return cu.replace(registration, "TORCH_LIBRARY(hires_cuda_emulated, m)").replace("m.impl(", "m.def(")


def test_every_launch_is_rewritten():
    with open(SOURCE) as f:
        cu = f.read()
    emulated = emulated_source(cu)
    assert "<<<" not in emulated
    assert emulated.count("emu_launch(") == cu.count("<<<") > 0


@pytest.fixture(scope="session")
def emulated_ops(tmp_path_factory):
    if shutil.which("ninja") is None:
        pytest.skip("ninja is needed to build the emulated CUDA kernels")
    from torch.utils.cpp_extension import load

    build = tmp_path_factory.mktemp("cuda_emulated")
    src = build / "projection_cuda_emulated.cpp"
    with open(SOURCE) as f:
        src.write_text(emulated_source(f.read()))
    load(name="hires_cuda_emulated", sources=[str(src)], is_python_module=False, build_directory=str(build),
         extra_include_paths=[os.path.dirname(PRELUDE), os.path.dirname(SOURCE)],
         extra_cflags=["-O1", "-std=c++20", "-w"], verbose=False)
    return torch.ops.hires_cuda_emulated


def _rel(a, b):
    assert a.shape == b.shape
    return rel_err(a, b)


# (N, C_in, C_out, H, W, stride): odd sizes, partial windows, C and M across several
# 64-wide tiles and k-chunks, a batch of 1, stride 1 (shift subtracted in backward).
SHAPES = [(2, 3, 5, 7, 9, 2), (3, 70, 65, 7, 9, 2), (1, 4, 3, 8, 8, 3), (3, 5, 4, 10, 10, 1), (2, 6, 70, 5, 5, 4)]


def _case_id(shape, ceil, training, how):
    n, ci, co, h, w, s = shape
    return f"{n}x{ci}x{h}x{w}->{co}-s{s}{'-ceil' if ceil else ''}-{'train' if training else 'eval'}-{how}"


CASES = [pytest.param(shape, ceil, training, how, id=_case_id(shape, ceil, training, how))
         for shape, how in zip(SHAPES, ["nchw", "channels_last", "strided"] * 2)
         for ceil in ((False, True) if shape[5] > 1 else (False,))
         for training in (True, False)]


@pytest.mark.parametrize("shape,ceil,training,how", CASES)
def test_emulated_cuda_matches_reference_float64(emulated_ops, shape, ceil, training, how):
    n, c_in, c_out, h, w, s = shape
    g = torch.Generator().manual_seed(0)

    def rnd(*size):
        return torch.randn(*size, generator=g, dtype=torch.float64)

    x = layout(rnd(n, c_in, h, w), how)
    weight = rnd(c_out, c_in) / c_in ** 0.5
    gamma, beta = (rnd(c_out) * 0.5 + 1, rnd(c_out)) if (c_out + s) % 2 else (None, None)
    ho, wo = pooled_size(h, s, ceil), pooled_size(w, s, ceil)
    fmt = torch.channels_last if how == "channels_last" else torch.contiguous_format
    residual = rnd(n, c_out, ho, wo).contiguous(memory_format=fmt) if n % 2 else None
    mean_in, var_in = (None, None) if training else (rnd(c_out), rnd(c_out).abs() + 0.5)
    shift = data_shift(x, s, torch.float64)
    x = x.contiguous(memory_format=fmt)  # fused_projection hands the kernels dense tensors

    args = (x, shift, weight, gamma, beta, residual, mean_in, var_in, s, ceil, training, 1e-5)
    got = emulated_ops.projection_forward(*args)
    expected = reference.forward(*args)
    for name, i in (("out", 0), ("pooled", 1), ("mean", 3), ("var", 4)):
        if expected[i].numel():
            assert _rel(got[i], expected[i]) < 1e-10, name
    assert got[0].stride() == expected[0].stride() or ho * wo == 1

    grad_out = rnd(n, c_out, ho, wo).contiguous(memory_format=fmt)
    saved, sub = (x, shift) if s == 1 else (expected[1], None)
    bwd = (grad_out, saved, None, sub, weight, gamma, expected[3], expected[4], s, ceil, h, w, training, 1e-5)
    got_b, expected_b = emulated_ops.projection_backward(*bwd), reference.backward(*bwd)
    for name, a, b in zip(("grad_x", "grad_weight", "grad_bn_weight", "grad_bn_bias"), got_b, expected_b):
        assert _rel(a, b) < 1e-10, name
    assert got_b[0].stride() == expected_b[0].stride()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_cuda_low_precision_large_mean(emulated_ops, dtype):
    """Activations of 1000 + noise in float32 and bf16: the shift keeps the statistics
    accurate (within twice the error of the reference run in the same dtype)."""
    g = torch.Generator().manual_seed(1)
    x64 = torch.randn(2, 6, 7, 9, generator=g, dtype=torch.float64) + 1000
    weight = torch.randn(5, 6, generator=g) / 6 ** 0.5
    x = x64.to(dtype)
    shift = data_shift(x, 2, torch.float32)
    args = (x, shift, weight, None, None, None, None, None, 2, True, True, 1e-5)
    oracle = reference.forward(x.double(), data_shift(x.double(), 2, torch.float64), weight.double(),
                               None, None, None, None, None, 2, True, True, 1e-5)
    got, same_dtype = emulated_ops.projection_forward(*args), reference.forward(*args)
    floor = torch.finfo(dtype).eps
    for i in (0, 3, 4):
        assert _rel(got[i], oracle[i]) <= max(2 * _rel(same_dtype[i], oracle[i]), floor)
