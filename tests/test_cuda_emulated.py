"""The CUDA kernels (csrc/cuda/*.cu), run on the CPU against a float64 oracle.

Without a GPU the CUDA backend would only be compiled (test_cuda_compile.py). Here its
source is turned into plain C++ (cuda_emulation.h: each block of a launch runs as one
thread per CUDA thread with real barriers) and built as a CPU extension, so the kernels'
index math, masks, barriers, reductions and launch code run in CI, on small shapes.
Outputs start as NaN, so anything a kernel fails to write fails the comparison, and a
global access not aligned to its size (which a GPU faults on) fails the launch.

The oracle is the eager composition avg_pool2d -> conv2d -> batch_norm (+ residual) in
float64 with torch's autograd, on the values the kernels see (inputs rounded to their
dtype first): it checks the op's whole contract (SPEC §2), the data shift, the running
statistics update and the eval-mode corrections included, not a lower-level formula.
This file imports nothing from hires_kernels, so it runs whatever state the Python
package is in.
"""

from __future__ import annotations

import functools
import os
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "csrc", "cuda", "projection_cuda.cu")
PRELUDE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emulation.h")
REGISTRATION = "TORCH_LIBRARY_IMPL(hires, CUDA, m)"


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
    `kernel<<<grid, block, shm, stream>>>(args);` to
    `emu_launch(grid, block, shm, "kernel", emu_kernel_id(kernel), [&] { kernel(args); });`,
    `cudaLaunchKernelEx(&config, kernel, args)` (a launch in clusters) to
    `emu_launch_ex(config, "kernel", emu_kernel_id(kernel), [&] { kernel(args); })`,
    device checks to CPU ones, and the CUDA dispatch registration to an op library of its own."""
    cu = re.sub(r"#include <(cuda_runtime\.h|cooperative_groups\.h|c10/cuda/[^>]+)>\n", "", cu)
    cu = cu.replace("#include <torch/library.h>", '#include "cuda_emulation.h"', 1)
    cu = cu.replace("at::empty(", "emu_empty(").replace(".is_cuda()", ".is_cpu()")
    out, pos = [], 0
    for launch in re.finditer(r"<<<(.*?)>>>\(", cu, flags=re.S):
        line_start = cu.rfind("\n", 0, launch.start()) + 1
        kernel_at = line_start + len(cu[line_start:launch.start()]) - len(cu[line_start:launch.start()].lstrip())
        close = _matching_paren(cu, launch.end() - 1)
        assert cu[close + 1] == ";", "a kernel launch must be a statement of its own"
        grid, block, shm = _split_top_level(launch.group(1))[:3]
        kernel = cu[kernel_at:launch.start()]
        name = kernel.split("<")[0].strip()
        args = cu[launch.end():close]
        out.append(cu[pos:kernel_at])
        out.append(f'emu_launch(dim3({grid}), dim3({block}), {shm}, "{name}", emu_kernel_id({kernel}), '
                   f'[&] {{ {kernel}({args}); }});')
        pos = close + 2
    cu = "".join(out) + cu[pos:]
    out, pos = [], 0
    for launch in re.finditer(r"cudaLaunchKernelEx\(", cu):
        close = _matching_paren(cu, launch.end() - 1)
        config, kernel, *args = _split_top_level(cu[launch.end():close])
        assert config.startswith("&"), "cudaLaunchKernelEx takes &config"
        name = kernel.split("<")[0].strip()
        out.append(cu[pos:launch.start()])
        out.append(f'emu_launch_ex({config[1:]}, "{name}", emu_kernel_id({kernel}), '
                   f'[&] {{ {kernel}({", ".join(args)}); }})')
        pos = close + 1
    cu = "".join(out) + cu[pos:]
    assert REGISTRATION in cu, "the CUDA kernels are no longer registered as expected"
    return cu.replace(REGISTRATION, "TORCH_LIBRARY(hires_cuda_emulated, m)").replace("m.impl(", "m.def(")


def test_every_launch_is_rewritten():
    with open(SOURCE) as f:
        cu = f.read()
    emulated = emulated_source(cu)
    assert "<<<" not in emulated and "cudaLaunchKernelEx(" not in emulated
    assert emulated.count("emu_launch(") == cu.count("<<<") > 0
    assert emulated.count("emu_launch_ex(") == cu.count("cudaLaunchKernelEx(") > 0


@functools.lru_cache(maxsize=None)
def build_emulated_ops(build_dir: str, flags=(), edit=None):
    """Builds the emulated kernels once per process (test_cuda_traffic.py shares them) and
    loads them as torch.ops.hires_cuda_emulated; `flags` go to the compiler and the linker
    (test_cuda_races.py: ThreadSanitizer), `edit` rewrites the .cu text first (a mutation)."""
    from torch.utils.cpp_extension import load

    os.makedirs(build_dir, exist_ok=True)
    src = os.path.join(build_dir, "projection_cuda_emulated.cpp")
    with open(SOURCE) as f, open(src, "w") as out:
        cu = f.read()
        out.write(emulated_source(edit(cu) if edit else cu))
    load(name="hires_cuda_emulated", sources=[src], is_python_module=False, build_directory=build_dir,
         extra_include_paths=[os.path.dirname(PRELUDE), os.path.dirname(SOURCE)],
         extra_cflags=["-O1", "-std=c++20", "-w", *flags], extra_ldflags=list(flags), verbose=False)
    return torch.ops.hires_cuda_emulated


@pytest.fixture(scope="session")
def emulated_ops(tmp_path_factory):
    if shutil.which("ninja") is None:
        pytest.skip("ninja is needed to build the emulated CUDA kernels")
    return build_emulated_ops(str(tmp_path_factory.getbasetemp() / "cuda_emulated"))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def arrange(t: torch.Tensor, how: str) -> torch.Tensor:
    """t in a layout: NCHW, channels_last, or a non-contiguous NCHW-ordered view."""
    if how == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if how == "strided":
        big = torch.zeros(t.shape[0], t.shape[1] * 2, t.shape[2], t.shape[3] + 3, dtype=t.dtype)
        big[:, ::2, :, 1:-2] = t
        return big[:, ::2, :, 1:-2]
    return t


class Problem:
    """One call's inputs, drawn in float64 and rounded to `dtype` for the activations;
    parameters and running statistics stay in the accumulation dtype."""

    def __init__(self, n, c_in, c_out, h, w, stride, *, ceil=False, training=True, how="nchw", affine=True,
                 residual=True, running=True, dtype=torch.float64, offset=0.0, seed=0):
        g = torch.Generator().manual_seed(seed)
        acc = torch.float64 if dtype == torch.float64 else torch.float32

        def rnd(*size, dt=acc):
            return torch.randn(*size, generator=g, dtype=torch.float64).to(dt)

        self.stride, self.ceil, self.training, self.h, self.w = stride, ceil, training, h, w
        self.momentum, self.eps = 0.1, 1e-5
        self.x = arrange((rnd(n, c_in, h, w, dt=torch.float64) + offset).to(dtype), how)
        self.weight = rnd(c_out, c_in, 1, 1) / c_in ** 0.5
        self.gamma, self.beta = (rnd(c_out) * 0.5 + 1, rnd(c_out)) if affine else (None, None)
        ho, wo = F.avg_pool2d(torch.empty(1, 1, h, w), stride, stride, ceil_mode=ceil).shape[2:]
        self.channels_last = how == "channels_last"
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        self.residual = arrange(rnd(n, c_out, ho, wo, dt=dtype), how) if residual else None
        mean_offset = offset * self.weight.sum((1, 2, 3)).double()
        self.running = ((rnd(c_out) + mean_offset.to(acc), rnd(c_out).abs() + 0.5) if running
                        else (None, None))
        self.grad_out = rnd(n, c_out, ho, wo, dt=dtype).contiguous(memory_format=fmt)

    def forward(self, ops):
        """The emulated CUDA op's results and the running statistics it updated (copies)."""
        rm, rv = (t.clone() if t is not None else None for t in self.running)
        results = ops.projection(self.x, self.weight, self.gamma, self.beta, rm, rv, self.residual, self.stride,
                                 self.ceil, self.training, self.momentum, self.eps)
        return results, (rm, rv)

    def backward(self, ops, results):
        _, saved, y, shift, mean, var = results
        return ops.projection_backward(
            self.grad_out, self.x if self.stride == 1 else saved, y, shift, self.weight, self.gamma, mean, var,
            self.stride, self.ceil, self.h, self.w, self.training, self.eps)

    def run_kernels(self, ops):
        """(out, grads, running stats after the call) from the emulated CUDA op."""
        results, running = self.forward(ops)
        out, saved, y = results[:3]
        assert y.numel() == 0 and (saved.numel() == 0) == (self.stride == 1)
        return out, self.backward(ops, results), running

    def run_eager(self, dtype):
        """The same through eager torch ops in `dtype` (activations) with autograd."""
        acc = torch.float64 if dtype == torch.float64 else torch.float32

        def leaf(t, dt):
            return None if t is None else t.detach().to(dt).requires_grad_()

        x, weight, gamma, beta = (leaf(self.x, dtype), leaf(self.weight, acc), leaf(self.gamma, acc),
                                  leaf(self.beta, acc))
        rm, rv = (None if t is None else t.clone().to(acc) for t in self.running)
        p = F.avg_pool2d(x, self.stride, self.stride, ceil_mode=self.ceil, count_include_pad=False) \
            if self.stride > 1 else x
        y = F.conv2d(p, weight.to(dtype))
        out = F.batch_norm(y, rm, rv, gamma, beta, self.training, self.momentum, self.eps)
        if self.residual is not None:
            out = out + self.residual.to(dtype)
        out.backward(self.grad_out.to(dtype))
        grads = (x.grad, weight.grad, gamma.grad if gamma is not None else None,
                 beta.grad if beta is not None else None)
        return out.detach(), grads, (rm, rv)


def check(problem: Problem, ops, dtype, tol):
    """Kernels against the float64 oracle; tol(name, error of eager in `dtype`) is the bound."""
    got_out, got_grads, got_stats = problem.run_kernels(ops)
    ref_out, ref_grads, ref_stats = problem.run_eager(torch.float64)
    same = problem.run_eager(dtype) if dtype != torch.float64 else (ref_out, ref_grads, ref_stats)
    fmt = torch.channels_last if problem.channels_last else torch.contiguous_format
    assert got_out.dtype == problem.x.dtype
    assert got_out.is_contiguous(memory_format=fmt) and got_grads[0].is_contiguous(memory_format=fmt)
    pairs = [("out", got_out, ref_out, same[0])]
    for name, a, b, c in zip(("grad_x", "grad_weight", "grad_bn_weight", "grad_bn_bias"), got_grads, ref_grads,
                             same[1]):
        if b is not None:
            pairs.append((name, a, b, c))
    if problem.training and ref_stats[0] is not None:
        pairs += [("running_mean", got_stats[0], ref_stats[0], same[2][0]),
                  ("running_var", got_stats[1], ref_stats[1], same[2][1])]
    assert_within(pairs, tol)


def assert_within(pairs, tol):
    """(name, kernels' result, float64 oracle, eager in the same dtype) each within tol."""
    for name, a, b, c in pairs:
        err = rel(a, b)
        bound = tol(name, rel(c, b))
        assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g}"


def exact(name, eager_err):
    return 1e-10


# (N, C_in, C_out, H, W, stride): odd sizes, partial windows, C and M across several
# 64-wide tiles, a batch of 1, stride 1 (shift subtracted in backward).
SHAPES = [(2, 3, 5, 7, 9, 2), (3, 70, 65, 7, 9, 2), (1, 4, 3, 8, 8, 3), (3, 5, 4, 10, 10, 1), (2, 6, 70, 5, 5, 4)]


def _cases():
    for i, (shape, how) in enumerate(zip(SHAPES, ["nchw", "channels_last", "strided"] * 2)):
        for ceil in ((False, True) if shape[5] > 1 else (False,)):
            for training in (True, False):
                opts = dict(ceil=ceil, training=training, how=how, affine=(i + ceil) % 2 == 0,
                            residual=(i + training) % 2 == 0, running=training is False or i != 2)
                tag = "-".join(k if v is True else f"no{k}" for k, v in opts.items() if isinstance(v, bool)
                               and k in ("affine", "residual", "running"))
                n, ci, co, h, w, s = shape
                yield pytest.param(shape, opts, id=f"{n}x{ci}x{h}x{w}->{co}-s{s}{'-ceil' if ceil else ''}-"
                                                   f"{'train' if training else 'eval'}-{how}-{tag}")


@pytest.mark.parametrize("shape,opts", list(_cases()))
def test_emulated_cuda_matches_float64_oracle(emulated_ops, shape, opts):
    check(Problem(*shape, **opts), emulated_ops, torch.float64, exact)


def _within_eager(dtype):
    floor = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps

    def tol(name, eager_err):
        return max(2 * eager_err, floor) if dtype != torch.float32 else max(1e-5, 2 * eager_err)
    return tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("how", ["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_emulated_cuda_low_precision(emulated_ops, dtype, how, training):
    """float32 within 1e-5 of the oracle (SPEC §3, IEEE: the emulated kernels use no TF32);
    bf16 / fp16 within twice the error of the eager composition in the same dtype."""
    problem = Problem(2, 9, 7, 7, 9, 2, ceil=True, training=training, how=how, dtype=dtype, seed=3)
    check(problem, emulated_ops, dtype, _within_eager(dtype))


@pytest.mark.parametrize("how", ["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_emulated_cuda_float32_in_tf32_where_torch_allows_it(emulated_ops, how, training):
    """float32 where torch allows TF32 for float32 matmuls (the legacy allow_tf32, or the
    new fp32_precision alone): the GEMMs run on the tensor cores in TF32 (mma.sync m16n8k8,
    operands rounded by cvt.rna), within SPEC §3's 2e-3 of the oracle and different from the
    IEEE results; with TF32 off (torch's default) they stay IEEE, within 1e-5. C_in = 24 and
    C_out = 20: k and n across partial chunks."""
    problem = Problem(2, 24, 20, 8, 8, 2, training=training, how=how, dtype=torch.float32, seed=8)
    matmul = torch.backends.cuda.matmul
    assert not matmul.allow_tf32
    check(problem, emulated_ops, torch.float32, _within_eager(torch.float32))
    ieee = problem.run_kernels(emulated_ops)
    results = []
    for setting, off in (("allow_tf32", False), ("fp32_precision", matmul.fp32_precision)):
        setattr(matmul, setting, True if setting == "allow_tf32" else "tf32")
        try:
            check(problem, emulated_ops, torch.float32, lambda name, eager_err: 2e-3)
            results.append(problem.run_kernels(emulated_ops))
        finally:
            setattr(matmul, setting, off)
    flat = [torch.utils._pytree.tree_leaves(r) for r in (ieee, *results)]
    assert not all(torch.equal(a, b) for a, b in zip(flat[0], flat[1]))
    assert all(torch.equal(a, b) for a, b in zip(flat[1], flat[2]))


# With one SM the row kernels take 64 (M >= 256) or 32 rows (M >= 128) a block, as full-size
# problems do on a GPU; the cases above run 16-row blocks. C_out = 130 spans two of the bf16
# dW kernel's 128-row tiles.
ONE_SM_CASES = [((3, 5, 4, 10, 10, 1), torch.float64, True), ((2, 9, 70, 12, 12, 1), torch.float64, False),
                ((2, 6, 130, 18, 18, 2), torch.bfloat16, True), ((2, 6, 130, 18, 18, 2), torch.float32, False)]


@pytest.mark.parametrize("shape,dtype,training", ONE_SM_CASES,
                         ids=[f"{'x'.join(map(str, c[0]))}-{c[1]}-{'train' if c[2] else 'eval'}" for c in ONE_SM_CASES])
def test_emulated_cuda_large_row_tiles(emulated_ops, shape, dtype, training):
    emulated_ops.set_sm_count(1)
    try:
        problem = Problem(*shape, training=training, how="channels_last" if training else "nchw", dtype=dtype, seed=4)
        check(problem, emulated_ops, dtype, exact if dtype == torch.float64 else _within_eager(dtype))
    finally:
        emulated_ops.set_sm_count(132)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("stride", [1, 2])
def test_emulated_cuda_large_mean(emulated_ops, dtype, stride):
    """Activations of 1000 + noise: the data shift keeps the statistics (and so the output,
    gradients and running statistics) within the tolerance of the same run without it."""
    problem = Problem(2, 6, 5, 7, 9, stride, ceil=True, dtype=dtype, offset=1000.0, seed=1)
    check(problem, emulated_ops, dtype, _within_eager(dtype))


def test_emulated_cuda_running_stats_strided_view(emulated_ops):
    """Running statistics that are a strided view take the ATen path after the kernels:
    the same update as a contiguous pair, and the storage between them left alone."""
    problem = Problem(2, 5, 4, 6, 6, 2, dtype=torch.float32, seed=2)
    expected = problem.run_eager(torch.float64)[2]
    storage = [torch.full((8,), 7.0) for _ in range(2)]
    views = [t[::2] for t in storage]
    for view, start in zip(views, problem.running):
        view.copy_(start)
    emulated_ops.projection(problem.x, problem.weight, problem.gamma, problem.beta, *views, problem.residual,
                            problem.stride, problem.ceil, True, problem.momentum, problem.eps)
    assert all(bool((t[1::2] == 7.0).all()) for t in storage)
    for view, ref in zip(views, expected):
        assert rel(view, ref) <= 1e-5


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """t's values and strides in storage one element off 16-byte alignment."""
    storage = torch.empty(t.numel() + 1, dtype=t.dtype)
    view = storage[1:].as_strided(t.shape, t.stride())
    return view.copy_(t)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("how", ["channels_last", "nchw"])
def test_emulated_vector_loads_equal_element_loads(emulated_ops, dtype, stride, training, how):
    """Activations in 16-byte runs are moved in vectors: channels_last with C_in = 16 and
    C_out = 24 (runs of channels), NCHW with 16 or 64 positions a plane at the pooled
    resolution (runs of positions). The same values one element off alignment (x, residual,
    grad_out) go element by element. Both match the oracle, and bitwise each other: per
    element the runs compute the same terms in the same order."""
    h, w = (7, 9) if how == "channels_last" else (8, 8)
    problem = Problem(2, 16, 24, h, w, stride, ceil=True, training=training, how=how, dtype=dtype, seed=6)
    check(problem, emulated_ops, dtype, exact if dtype == torch.float64 else _within_eager(dtype))
    vectors = problem.run_kernels(emulated_ops)
    problem.x, problem.residual, problem.grad_out = (misaligned(t) for t in (problem.x, problem.residual,
                                                                               problem.grad_out))
    fmt = torch.channels_last if how == "channels_last" else torch.contiguous_format
    assert problem.x.data_ptr() % 16 != 0 and problem.x.is_contiguous(memory_format=fmt)
    elements = problem.run_kernels(emulated_ops)
    for a, b in zip(torch.utils._pytree.tree_leaves(vectors), torch.utils._pytree.tree_leaves(elements)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_emulated_weight_off_16_byte_alignment_is_read_element_by_element(emulated_ops, dtype):
    """float32 and float64 take the weight itself as the row kernels' GEMM operand. A weight
    view off a 16-byte boundary (C_in a multiple of the vector, so only its address rules
    vectors out; a GPU faults on a misaligned vector load, and so does the emulation) is read
    element by element, with the same results, bitwise, as the aligned weight."""
    problem = Problem(2, 8, 12, 6, 6, 2, how="channels_last", dtype=dtype, seed=4)
    aligned = problem.run_kernels(emulated_ops)
    w = problem.weight
    problem.weight = torch.empty(w.numel() + 1, dtype=w.dtype)[1:].view_as(w).copy_(w)
    assert problem.weight.data_ptr() % 16 != 0
    shifted = problem.run_kernels(emulated_ops)
    for a, b in zip(*(torch.utils._pytree.tree_leaves(r) for r in (aligned, shifted))):
        assert torch.equal(a, b)


def test_emulated_cp_async_copies_must_be_waited_for(emulated_ops):
    """cp.async copies (copy_run_async: channels_last rows staged as they are, grad_out staged
    for the backward statistics) land in shared memory at the copying thread's wait in the
    emulation, as a GPU guarantees no sooner. A kernel whose threads never wait
    (set_wait_copies(False)) fails its launch; with the waits the same call matches the oracle."""
    problem = Problem(2, 64, 128, 8, 8, 2, how="channels_last", dtype=torch.bfloat16, seed=1)
    emulated_ops.set_wait_copies(False)
    try:
        with pytest.raises(RuntimeError, match="never waited for"):
            problem.run_kernels(emulated_ops)
    finally:
        emulated_ops.set_wait_copies(True)
        emulated_ops.traffic()
    check(problem, emulated_ops, torch.bfloat16, _within_eager(torch.bfloat16))


# (N, C_in, C_out, H, W, stride, layout, dtype) -> the dW kernel's cluster (tiles of 128 output
# channels in bf16, 64 otherwise, by 64 input channels; z-ranks each summing a part of a
# split): 2 x 4 tiles (steps of 128 positions, each block staging 32 of its dy tile's and 64 of
# its p tile's), 4 x 2 with a partial last tile of output channels over three splits, the last
# one ending inside a step, 2 x 1 (input channels in 3 tiles: no cluster along them), 4 x 4
# (16 blocks, a non-portable size), 2 x 1 x 2 over 300 positions (two splits of two parts of a
# step, 64 positions, each; the last part past the end; single blocks, whose steps are 32
# positions, would otherwise have cut them elsewhere), 1 x 1 x 4 (a split's four parts summed
# in one block's shared memory), 2 x 1 x 2 with the last split's second part partial, and
# 2 x 2 x 4 (16 blocks: four z-ranks of a 2 x 2 cluster).
CLUSTER_CASES = [((3, 256, 256, 9, 9, 1, "channels_last", torch.bfloat16), (2, 4, 1)),
                 ((7, 70, 200, 10, 10, 1, "nchw", torch.float32), (4, 2, 1)),
                 ((2, 130, 70, 12, 12, 2, "channels_last", torch.float64), (2, 1, 1)),
                 ((1, 256, 512, 12, 12, 2, "nchw", torch.bfloat16), (4, 4, 1)),
                 ((3, 64, 256, 10, 10, 1, "channels_last", torch.bfloat16), (2, 1, 2)),
                 ((4, 64, 64, 16, 16, 1, "nchw", torch.float32), (1, 1, 4)),
                 ((5, 130, 70, 12, 12, 1, "channels_last", torch.float64), (2, 1, 2)),
                 ((2, 128, 256, 16, 16, 1, "channels_last", torch.bfloat16), (2, 2, 4))]


def with_and_without_clusters(ops, problem, launches):
    """The problem's kernels run as the launch choices pick them and with clusters off
    (set_max_cluster(1): the device schedules none, so every launch falls back to single
    blocks); asserts the results are bitwise equal and returns launches(ops) of each run."""
    ops.traffic()
    clustered = problem.run_kernels(ops)
    with_clusters = launches(ops)
    ops.set_max_cluster(1)
    try:
        single = problem.run_kernels(ops)
        without = launches(ops)
    finally:
        ops.set_max_cluster(16)
    for a, b in zip(torch.utils._pytree.tree_leaves(clustered), torch.utils._pytree.tree_leaves(single)):
        assert torch.equal(a, b)
    return with_clusters, without


def dw_tile_counts(c_in, c_out, dtype) -> tuple[int, int]:
    """The dW kernel's tiles along C_out and C_in: kDwRows (128 on tensor cores, bf16 and
    fp16; else 64) output x 64 input channels."""
    return -(-c_out // (128 if dtype in (torch.bfloat16, torch.float16) else 64)), -(-c_in // 64)


def dw_launch(ops) -> dict:
    """The dW kernel's launch among those since the last call (blocks, bytes)."""
    rows = [line.split() for line in ops.traffic().splitlines()]
    (r,) = [r for r in rows if r[0] == "dw_partial_kernel"]
    return dict(blocks=int(r[1]), act_read=int(r[4]), act_write=int(r[5]), cluster=int(r[12]))


@pytest.mark.parametrize("case,cluster", CLUSTER_CASES,
                         ids=["{}x{}x{}x{}->{}-s{}-{}-{}".format(*c[0][:2], *c[0][3:5], c[0][2], *c[0][5:7],
                                                                   str(c[0][7]).split(".")[1]) for c in CLUSTER_CASES])
def test_emulated_dw_clusters_read_operands_once_and_equal_single_blocks(emulated_ops, monkeypatch, case, cluster):
    """The dW kernel in thread-block clusters: each block stages its share of a step's dy and
    p tiles and takes the rest from its cluster's blocks, so the launch reads dy and p once
    where the cluster spans every tile (here), against once per tile of the other operand
    without clusters (set_max_cluster(1): the device schedules none, so the launch choice
    falls back to single blocks; or $HIRES_CUDA_CLUSTERS=0). z-ranks sum a split's parts in
    shared memory: one partial a split, against one a part without clusters. Both match the
    oracle and, bitwise, each other: every block adds the positions in the same order
    whatever the cluster, and z-rank 0 and the reduction sum a split's parts in one order
    (sum_parts), also where a device schedules only half the z-ranks."""
    n, c_in, c_out, h, w, s, how, dtype = case
    problem = Problem(n, c_in, c_out, h, w, s, how=how, dtype=dtype, seed=8)
    check(problem, emulated_ops, dtype, exact if dtype == torch.float64 else _within_eager(dtype))
    clustered = problem.run_kernels(emulated_ops)
    with_clusters, without = with_and_without_clusters(emulated_ops, problem, dw_launch)
    if cluster[2] > 1:  # a device that schedules half that cluster: half the z-ranks, twice the partials
        emulated_ops.set_max_cluster(cluster[0] * cluster[1] * cluster[2] // 2)
        try:
            halved = problem.run_kernels(emulated_ops)
            fewer = dw_launch(emulated_ops)
        finally:
            emulated_ops.set_max_cluster(16)
        assert fewer["cluster"] * 2 == with_clusters["cluster"] and fewer["act_write"] == 2 * with_clusters["act_write"]
        for a, b in zip(*(torch.utils._pytree.tree_leaves(r) for r in (clustered, halved))):
            assert torch.equal(a, b)
    monkeypatch.setenv("HIRES_CUDA_CLUSTERS", "0")
    switched_off = problem.run_kernels(emulated_ops)
    assert dw_launch(emulated_ops) == without
    for a, b in zip(*(torch.utils._pytree.tree_leaves(r) for r in (clustered, switched_off))):
        assert torch.equal(a, b)
    m, e = n * (h // s) * (w // s), torch.finfo(dtype).bits // 8
    tiles_co, tiles_ci = dw_tile_counts(c_in, c_out, dtype)
    assert tiles_co % cluster[0] == 0 and tiles_ci % cluster[1] == 0 and with_clusters["blocks"] == without["blocks"]
    assert with_clusters["cluster"] == cluster[0] * cluster[1] * cluster[2] and without["cluster"] == 1
    assert with_clusters["act_write"] * cluster[2] == without["act_write"]
    dy, p = m * c_out * e, m * c_in * e
    assert with_clusters["act_read"] == dy * (tiles_ci // cluster[1]) + p * (tiles_co // cluster[0])
    assert without["act_read"] == dy * tiles_ci + p * tiles_co


# (N, C_in, C_out, H, W, stride, layout, dtype, training) -> blocks per row tile: 2 (C_out a
# multiple of 128, not of 256) and 4; channels_last runs of channels, NCHW windows of x at
# stride 4 (float32: 4 positions a run), stride 1 with the shift (float64), eval from x.
ROW_CLUSTER_CASES = [((2, 32, 128, 8, 8, 2, "channels_last", torch.bfloat16, True), 2),
                     ((2, 64, 256, 16, 16, 4, "nchw", torch.float32, True), 4),
                     ((3, 64, 128, 6, 6, 1, "channels_last", torch.float64, False), 2),
                     ((2, 64, 256, 8, 8, 2, "nchw", torch.float16, False), 4)]


def row_launches(ops) -> list[tuple[int, int, int, int]]:
    """(blocks, blocks per cluster, activation bytes read, written) of each row-kernel launch
    since the last call."""
    rows = [line.split() for line in ops.traffic().splitlines()]
    return [(int(r[1]), int(r[12]), int(r[4]), int(r[5])) for r in rows if r[0] == "rows_kernel"]


@pytest.mark.parametrize("case,cs", ROW_CLUSTER_CASES,
                         ids=["{}x{}x{}x{}->{}-s{}-{}-{}-{}".format(*c[0][:2], *c[0][3:5], c[0][2], *c[0][5:7],
                                                                      str(c[0][7]).split(".")[1],
                                                                      "train" if c[0][8] else "eval")
                              for c in ROW_CLUSTER_CASES])
def test_emulated_row_clusters_equal_single_blocks(emulated_ops, case, cs):
    """Row tiles too few for 2 waves split over a thread-block cluster of cs blocks along
    C_out: each pools its share of the input channels, copies the others' from them, and runs
    its own output channels (in BWD_DX, gathers dy likewise and writes its channels of
    grad_x). Against single blocks (set_max_cluster(1)): the same activation bytes per launch
    (x read once, every output written once), bitwise the same results, both within the
    oracle's bound."""
    n, c_in, c_out, h, w, s, how, dtype, training = case
    problem = Problem(n, c_in, c_out, h, w, s, how=how, dtype=dtype, training=training, seed=9)
    check(problem, emulated_ops, dtype, exact if dtype == torch.float64 else _within_eager(dtype))
    with_clusters, without = with_and_without_clusters(emulated_ops, problem, row_launches)
    assert [r[1] for r in with_clusters] == [cs] * len(with_clusters) and all(r[1] == 1 for r in without)
    assert [r[0] for r in with_clusters] == [cs * r[0] for r in without]
    assert [r[2:] for r in with_clusters] == [r[2:] for r in without]


# NCHW (N, C_in, C_out, H, W, stride, ceil, training) whose windows tile 16-byte runs of x's
# pixel rows (W = W' s, W' a multiple of 16 / (e s); where s does not divide 16 / e, as
# float64 at s = 4, the runs are single elements): a partial last row of windows (ceil),
# trailing pixel rows that get no window (floor), strides 2, 4 and 8, train and eval.
WINDOW_CASES = [(2, 5, 6, 7, 8, 2, True, True), (2, 5, 6, 9, 8, 2, False, True), (1, 3, 4, 8, 16, 4, False, False),
                (2, 70, 5, 18, 16, 4, False, True), (2, 6, 7, 15, 16, 4, True, True), (2, 4, 5, 17, 16, 8, True, True)]


def row_kernel_wide_bytes(ops) -> list[tuple[int, int]]:
    """(16-byte bytes read, written) of each row-kernel launch since the last call."""
    rows = [line.split() for line in ops.traffic().splitlines()]
    return [(int(r[10]), int(r[11])) for r in rows if r[0] == "rows_kernel"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", WINDOW_CASES, ids=lambda c: "{}x{}x{}x{}->{}-s{}{}-{}".format(
    c[0], c[1], c[3], c[4], c[2], c[5], "-ceil" if c[6] else "", "train" if c[7] else "eval"))
def test_emulated_window_runs_equal_element_loads(emulated_ops, dtype, case):
    """NCHW at stride > 1: x is read and grad_x written in 16-byte runs along pixel rows,
    each run covering whole windows; the same values one element off alignment go element by
    element (grad_x, which the op allocates, takes the runs both times). Both match the
    oracle, and bitwise each other: every window is summed in the same order."""
    n, c_in, c_out, h, w, s, ceil, training = case
    problem = Problem(n, c_in, c_out, h, w, s, ceil=ceil, training=training, how="nchw", dtype=dtype, seed=7)
    check(problem, emulated_ops, dtype, exact if dtype == torch.float64 else _within_eager(dtype))
    windows = (16 // dtype.itemsize) % s == 0
    ho = -(-h // s) if ceil else h // s
    x_read, x_bytes = n * c_in * min(h, ho * s) * w * dtype.itemsize, problem.x.numel() * dtype.itemsize
    emulated_ops.traffic()
    vectors = problem.run_kernels(emulated_ops)
    wide = row_kernel_wide_bytes(emulated_ops)
    # Training's first pass reads the pixels the windows cover (eval's one pass the residual
    # too); the backward's dx pass (the last row kernel) writes all of grad_x (floor mode's
    # trailing rows too).
    assert (wide[-1][1] >= x_bytes and (wide[0][0] == x_read or not training)) == windows
    problem.x, problem.residual, problem.grad_out = (misaligned(t) for t in (problem.x, problem.residual,
                                                                               problem.grad_out))
    assert problem.x.data_ptr() % 16 != 0 and problem.x.is_contiguous()
    elements = problem.run_kernels(emulated_ops)
    assert row_kernel_wide_bytes(emulated_ops)[0][0] == 0
    for a, b in zip(torch.utils._pytree.tree_leaves(vectors), torch.utils._pytree.tree_leaves(elements)):
        assert torch.equal(a, b)


# --- every projection of one source (hires::pool_source) ------------------------------


class Source:
    """One source x and its targets, (C_out, stride) each: a Problem per target, all on the
    first one's x. x is pooled once for every stride > 1 (hires::pool_source), each target
    runs the projection at stride 1 on its pooled input with its residual, and backward
    sums the targets' gradients into one grad_x (hires::pool_source_backward; a stride-1
    target's gradient is added as autograd adds it)."""

    def __init__(self, n, c_in, h, w, targets, *, ceil=False, training=True, how="nchw", dtype=torch.float64,
                 seed=0):
        self.problems = [Problem(n, c_in, c_out, h, w, s, ceil=ceil, training=training, how=how,
                                 dtype=dtype, seed=seed + t)
                         for t, (c_out, s) in enumerate(targets)]
        for p in self.problems[1:]:
            p.x = self.problems[0].x
        self.x, self.strides = self.problems[0].x, [p.stride for p in self.problems]
        self.levels = sorted({s for s in self.strides if s > 1})
        self.ceil, self.training, self.h, self.w = ceil, training, h, w

    def forward(self, ops):
        """(each target's input, its op results) and the running statistics the ops updated."""
        pooled = dict(zip(self.levels, ops.pool_source(self.x, self.levels, self.ceil))) if self.levels else {}
        inputs, results, running = [], [], ([], [])
        for p in self.problems:
            rm, rv = (t.clone() for t in p.running)
            x = pooled.get(p.stride, self.x)
            inputs.append(x)
            results.append(ops.projection(x, p.weight, p.gamma, p.beta, rm, rv, p.residual, 1, False, p.training,
                                          p.momentum, p.eps))
            running[0].append(rm)
            running[1].append(rv)
        return (inputs, results), running

    def backward(self, ops, forward):
        """(grad_x, [(grad_weight, grad_bn_weight, grad_bn_bias) per target])."""
        inputs, results = forward
        grads, params = {}, []
        for p, x, (_, _, y, shift, mean, var) in zip(self.problems, inputs, results):
            gx, gw, gg, gb = ops.projection_backward(p.grad_out, x, y, shift, p.weight, p.gamma, mean, var, 1, False,
                                                     x.shape[2], x.shape[3], p.training, p.eps)
            grads.setdefault(p.stride, []).append(gx)
            params.append((gw, gg, gb))
        # Targets of one stride share its pooled tensor: autograd sums their gradients first.
        grad_x = (ops.pool_source_backward([functools.reduce(torch.add, grads[s]) for s in self.levels], self.levels, self.ceil, self.h, self.w,
                                           self.problems[0].channels_last) if self.levels else None)
        for g in grads.get(1, []):
            grad_x = g if grad_x is None else grad_x + g
        return grad_x, params

    def run_eager(self, dtype):
        """Each target's eager run, and grad_x summed over the targets in `dtype` as autograd sums it."""
        runs = [p.run_eager(dtype) for p in self.problems]
        return runs, functools.reduce(torch.add, (r[1][0] for r in runs))


def check_source(source: Source, ops, dtype, tol):
    forward, running = source.forward(ops)
    pooled = [x for x, s in zip(forward[0], source.strides) if s > 1]
    assert len({x.data_ptr() for x in pooled}) == len(source.levels), "one pooled input per stride"
    grad_x, params = source.backward(ops, forward)
    ref, ref_grad_x = source.run_eager(torch.float64)
    same, same_grad_x = source.run_eager(dtype) if dtype != torch.float64 else (ref, ref_grad_x)
    fmt = torch.channels_last if source.problems[0].channels_last else torch.contiguous_format
    assert grad_x.dtype == source.x.dtype and grad_x.is_contiguous(memory_format=fmt)
    pairs = [("grad_x", grad_x, ref_grad_x, same_grad_x)]
    for t, (r, e, res, grads) in enumerate(zip(ref, same, forward[1], params)):
        out = res[0]
        assert out.dtype == source.x.dtype and out.is_contiguous(memory_format=fmt)
        pairs += [(f"out[{t}]", out, r[0], e[0]), (f"grad_weight[{t}]", grads[0], r[1][1], e[1][1]),
                  (f"grad_bn_weight[{t}]", grads[1], r[1][2], e[1][2]),
                  (f"grad_bn_bias[{t}]", grads[2], r[1][3], e[1][3])]
        if source.training:
            pairs += [(f"running_mean[{t}]", running[0][t], r[2][0], e[2][0]),
                      (f"running_var[{t}]", running[1][t], r[2][1], e[2][1])]
    assert_within(pairs, tol)


# (N, C_in, H, W, targets) and options: partial windows (ceil) and windows past the coarser
# ones (floor: 7x9 at strides 2 and 4, 17x37 at 2, 4 and 8), a stride-1 target, repeated
# strides (stride 1 repeated: no pooling at all), a strided x. 17x37 in NCHW and C_in = 70
# in channels_last span several pooling tiles along the row and across channels.
SOURCE_CASES = [
    ((2, 3, 7, 9, [(5, 2), (4, 4)]), dict(ceil=True, training=True, how="nchw")),
    ((2, 3, 7, 9, [(5, 2), (4, 4)]), dict(ceil=False, training=True, how="channels_last")),
    ((2, 3, 7, 9, [(5, 2), (4, 4)]), dict(ceil=False, training=False, how="nchw")),
    ((2, 3, 7, 9, [(5, 2), (4, 4)]), dict(ceil=True, training=False, how="channels_last")),
    ((2, 3, 7, 9, [(5, 1), (4, 2), (6, 4)]), dict(ceil=False, training=True, how="channels_last")),
    ((2, 3, 7, 9, [(5, 1), (4, 2), (6, 4)]), dict(ceil=True, training=False, how="strided")),
    ((2, 3, 7, 9, [(5, 2), (4, 4), (6, 8)]), dict(ceil=True, training=True, how="channels_last")),
    ((2, 3, 17, 37, [(5, 2), (4, 4), (6, 8)]), dict(ceil=False, training=True, how="nchw")),
    ((2, 70, 7, 9, [(5, 2), (4, 2)]), dict(ceil=True, training=True, how="channels_last")),
    ((2, 3, 7, 9, [(5, 2), (4, 2)]), dict(ceil=False, training=False, how="nchw")),
    ((2, 3, 7, 9, [(5, 1), (4, 1)]), dict(ceil=False, training=True, how="channels_last")),
]


def _source_id(case):
    (n, c, h, w, targets), opts = case
    strides = "-".join(str(s) for _, s in targets)
    return (f"{n}x{c}x{h}x{w}-s{strides}-{'ceil' if opts['ceil'] else 'floor'}-"
            f"{'train' if opts['training'] else 'eval'}-{opts['how']}")


@pytest.mark.parametrize("shape,opts", SOURCE_CASES, ids=[_source_id(c) for c in SOURCE_CASES])
def test_emulated_projections_match_float64_oracle(emulated_ops, shape, opts):
    check_source(Source(*shape, **opts), emulated_ops, torch.float64, exact)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("how", ["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_emulated_projections_low_precision(emulated_ops, dtype, how, training):
    source = Source(2, 9, 7, 9, [(7, 1), (6, 2), (5, 4)], ceil=True, training=training, how=how, dtype=dtype,
                    seed=3)
    check_source(source, emulated_ops, dtype, _within_eager(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ceil", [True, False])
@pytest.mark.parametrize("how", ["channels_last", "nchw"])
def test_emulated_pooling_vectors_equal_elements(emulated_ops, dtype, ceil, how):
    """channels_last with C = 24: the pooling kernels move channels in 16-byte vectors; NCHW
    with W = 16: x's and grad_x's rows in 16-byte runs of columns. The same x one element
    off alignment goes element by element: bitwise equal results. Both match avg_pool2d and
    its gradient."""
    g = torch.Generator().manual_seed(7)
    cl = how == "channels_last"
    fmt = torch.channels_last if cl else torch.contiguous_format
    h, w = 17, 13 if cl else 16
    x = torch.randn(2, 24, h, w, generator=g, dtype=torch.float64).to(dtype).contiguous(memory_format=fmt)
    strides = [2, 4, 8]
    pooled = emulated_ops.pool_source(x, strides, ceil)
    assert all(torch.equal(a, b) for a, b in zip(pooled, emulated_ops.pool_source(misaligned(x), strides, ceil)))
    leaf = x.detach().double().requires_grad_()
    expected = [F.avg_pool2d(leaf, s, s, ceil_mode=ceil, count_include_pad=False) for s in strides]
    for p, e in zip(pooled, expected):
        torch.testing.assert_close(p, e.to(dtype))
    grads = [torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype).contiguous(memory_format=fmt)
             for p in pooled]
    grad_x = emulated_ops.pool_source_backward(grads, strides, ceil, h, w, cl)
    assert grad_x.is_contiguous(memory_format=fmt)
    assert torch.equal(grad_x, emulated_ops.pool_source_backward([misaligned(t) for t in grads], strides, ceil,
                                                                  h, w, cl))
    torch.autograd.backward(expected, [t.double() for t in grads])
    torch.testing.assert_close(grad_x, leaf.grad.to(dtype))


LARGE_TILE_CASES = [SOURCE_CASES[7], SOURCE_CASES[8]]


@pytest.mark.parametrize("shape,opts", LARGE_TILE_CASES, ids=[_source_id(c) for c in LARGE_TILE_CASES])
def test_emulated_projections_large_pool_tiles(emulated_ops, shape, opts):
    """With one SM the pooling tiles take up to 4096 pixels of x (whole rows of blocks,
    several channels), as full-size problems do on a GPU; the cases above run the smallest."""
    emulated_ops.set_sm_count(1)
    try:
        check_source(Source(*shape, **opts), emulated_ops, torch.float64, exact)
    finally:
        emulated_ops.set_sm_count(132)
