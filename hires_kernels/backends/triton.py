"""The ``triton`` backend: the fused projection as Triton kernels (GPU, or CPU tensors
under ``TRITON_INTERPRET=1``). Math and contract: :mod:`hires_kernels.backends.reference`.

It is the second GPU backend and is not tuned further: ``cuda`` is the GPU default, one
C++ call per direction with every per-call step inside it. This backend runs through
the Python backends' custom ops (hires_kernels/projection.py), whose shift, W @ shift,
statistics combine and running-statistics update are torch ops around its launches.

Notation: M = N*H'*W' positions (rows), tiles of BLOCK_M rows, T = cdiv(M, BLOCK_M);
e = bytes per activation element (2 for bf16/fp16, 4 for fp32); s = stride.
Every kernel takes tensors by pointer + element strides, so NCHW and channels_last (and
any dense layout) run without copies; Triton specialises strides equal to 1, so the
contiguous dimension is known at compile time. All sums and statistics are float32.
Dots: operands in the activation dtype for bf16/fp16 (like the eager conv), float32 with
``input_precision="ieee"`` for float32 unless ``torch.backends.cuda.matmul.allow_tf32``.

Forward, training (2 kernels + a tiny torch combine):
  1. ``_fwd_kernel[STATS]``, grid (T, cdiv(C_out, BLOCK_CO)): loads x windows, subtracts
     the shift, pools in fp32 (count_include_pad=False), rounds p to the activation dtype;
     programs with co-block 0 write ``pooled``; y = p @ W^T (tl.dot, fp32 accumulate);
     writes per-tile per-channel mean and M2 (centred on the tile mean) to [T, C_out].
     Reads x (e*C_in*s^2 per row, re-read per co-block, L2 for co-blocks > 0),
     writes pooled (e*C_in per row) + 8*C_out per tile. y never reaches memory.
  combine (torch, [T, C_out]): Chan's parallel formula, all tiles at once:
     mean = sum n_t mean_t / M,  M2 = sum M2_t + sum n_t (mean_t - mean)^2.
  2. ``_fwd_kernel[APPLY]``: recomputes y from ``pooled`` (s^2 times smaller than x;
     at stride 1 from x with the shift), writes out = (y - mean)*scale + beta + residual.
     Reads e*C_in (+ e*C_out residual), writes e*C_out per row.
  The conv output is not kept for backward (``y`` is returned empty): backward
  recomputes it from ``pooled``, trading C_in x C_out FLOPs per row for 4*C_out bytes.
Forward, eval: one ``_fwd_kernel[APPLY]`` that pools x on load, writes pooled (needed by
  backward) and out. Reads e*C_in*s^2 (+ e*C_out), writes e*(C_in + C_out) per row.
Backward (2 kernels + torch sums of partials):
  A. ``_bwd_reduce_kernel``, grid (T, co-blocks): recomputes y from saved (pooled, or x
     minus shift at stride 1), yhat; writes per-tile sums of g and g*yhat [T, C_out].
     Reads e*(C_in + C_out) per row.  dbeta, dgamma = sums over tiles (torch).
  B. ``_bwd_dx_kernel``, grid (cdiv(T, GROUP_M), ci-blocks): per row tile, per co-block:
     recompute y, dy = gamma*rstd*(g - dbeta/M - yhat*dgamma/M) (eval: gamma*rstd*g),
     dp += dy @ W[co, ci-block], dW_part += dy^T @ p[:, ci-block]; then writes dp/count
     to every pixel of the row's window (each pooled position owns its window: no
     atomics; floor mode's uncovered trailing rows/cols are zeroed by torch, only them).
     Reads e*(C_in + C_out)*n_ci_blocks per row (re-reads of the same row tile by the
     ci-block programs, L2 hits if they run together), writes e*C_in*s^2 per row; dW partials are
     [cdiv(T, GROUP_M), C_out, C_in] fp32, summed by torch (deterministic). GROUP_M row
     tiles per program keep that buffer small (its bytes are budgeted against the
     activations' bytes).
Per training step: forward reads x (+ L2 re-reads), writes pooled (x/s^2), reads pooled
and residual, writes out; backward reads pooled and grad_out twice, writes grad_x.
Against the SPEC floor (x + residual + out; grad_out + x + grad_x): forward moves
2*pooled more (x/2 at s=2); backward reads 2*(pooled + grad_out) instead of x + grad_out
(equal at s=2, C_out = 2*C_in), plus the L2 re-reads noted below.

Interpreter (TRITON_INTERPRET=1, triton 3.7.1) workarounds, selected by the EMU
constexpr (CPU tensors) and compiled out on the GPU: its bf16 tl.dot returns garbage and
its float32 -> bfloat16 cast truncates, so under EMU values are rounded to the
activation dtype on the bits (round-to-nearest-even) and the dots run in IEEE float32
on those rounded values (bf16 x bf16 products are exact in float32: same sums).

GPU status (one H200, triton 3.6, 2026-11-30; BENCHMARKS.md "GPU results"): every test
passes on CUDA tensors. bf16 channels_last fwd+bwd at N=256 takes 0.27-0.45 ms of GPU
time (CUDA-graph replay) but 1.8-2.3 ms per call end to end: the host side (about a
dozen small torch ops plus the launches) dominates, so folding those into the kernels
is the first lead, before the tile-level ones below.
All kernels compile for sm_90 with triton 3.7 (ptxas via
triton.compile(ASTSource, target=GPUTarget("cuda", 90, 32))); bf16 dots lower to
tensor-core MMA, float32 "ieee" dots to FFMA. ptxas reports (bf16, stride 2, strides
not specialised): 32x64x32 tiles / 4 warps: fwd 240 regs, no spill, bwd B <= 40 B spill;
64x64x{32,64} tiles: fwd spills ~0.5 KB, bwd B 0.2-0.5 KB; 64x128x64 / 8 warps: 0.7-0.8 KB.
Pressure comes from the s*s unrolled window loads (a 64-bit address and a predicate per
element each). Those loads are software-pipelined through shared memory, s*s tiles per
stage: ``_num_stages`` keeps that under the H100's 227 KB (with triton's default of 3
stages, stride 8 needs 266-545 KB and fails at launch). Checked by compiling
``_fwd_kernel`` for sm_90 at strides 2-16, bf16/fp16/fp32, NCHW and channels_last:
at most 152 KB. Tuning leads for issue 4, largest expected gain first:
  - forward kernel 1 re-pools x once per co-block (C_out / 64 times; L2 hits at best):
    hold the pooled tile in shared memory / loop co-blocks inside the program;
  - bigger BLOCK_M with fewer spills: load windows as [BLOCK_M, s, BLOCK_CI] or with
    block pointers / TMA (channels_last: s*BLOCK_CI contiguous per window row);
  - num_warps 4/8, num_stages, BLOCK_CI 32/64 per shape; fp32: allow tf32 to use MMA;
  - backward B recomputes y once per ci-block (C_in / BLOCK_CI times; once for
    C_in <= BLOCK_CI); else consider dy in shared memory or a split into dx and dW kernels;
  - the [T, C_out] partials and torch combines are a few small launches each: a
    combine kernel or CUDA graphs if launch gaps show in the profile.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover - exercised only without triton
    triton = None
    _IMPORT_ERROR = e

from ..shapes import memory_format_of, pooled_size

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Private knobs for tests of the tiling logic (multi-tile combine, grouped partials).
_OVERRIDES: dict = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason(name, device):
    if _IMPORT_ERROR is not None:
        return f"triton cannot be imported ({_IMPORT_ERROR})"
    device = torch.device(device)
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if _interpreting():
            return None
        return "the triton backend runs CPU tensors only in Triton's interpreter (set TRITON_INTERPRET=1 before import)"
    return f"the triton backend does not run {device.type} tensors"


if triton is not None:

    @triton.jit
    def _rnd(v, ACT: tl.constexpr, EMU: tl.constexpr):
        """float32 -> ACT, round to nearest even. The interpreter (triton 3.7) truncates
        float32 -> bfloat16, so under EMU the rounding is done on the bits first."""
        if EMU and ACT == tl.bfloat16:
            bits = v.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            v = bits.to(tl.float32, bitcast=True)
        return v.to(ACT)

    @triton.jit
    def _dq(v, ACT: tl.constexpr, EMU: tl.constexpr):
        """A dot operand: float32 stays; bf16/fp16 activations round to ACT. Under EMU
        (interpreter, whose bf16 dot is wrong) the rounded values stay float32 and the
        dot runs in IEEE float32: exact products, the same sums as a bf16 MMA."""
        if ACT == tl.float32:
            return v
        elif EMU:
            return _rnd(v, ACT, EMU).to(tl.float32)
        else:
            return v.to(ACT)

    @triton.jit
    def _load_p(src, s_n, s_c, s_h, s_w, shift_ptr, n64, oh, ow, m_mask, ci, ci_mask, H, W,
                STRIDE: tl.constexpr, SUB_SHIFT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_CI: tl.constexpr):
        """[BLOCK_M, BLOCK_CI] float32 tile of p = avgpool_s(src - shift) (masked -> 0)."""
        base = src + n64[:, None] * s_n + ci[None, :] * s_c
        if SUB_SHIFT:
            sh = tl.load(shift_ptr + ci, mask=ci_mask, other=0.0).to(tl.float32)
        if STRIDE == 1:
            mask = m_mask[:, None] & ci_mask[None, :]
            v = tl.load(base + oh[:, None] * s_h + ow[:, None] * s_w, mask=mask, other=0.0).to(tl.float32)
            if SUB_SHIFT:
                v = tl.where(mask, v - sh[None, :], 0.0)
            return v
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_CI), dtype=tl.float32)
            h0 = oh * STRIDE
            w0 = ow * STRIDE
            for kh in tl.static_range(STRIDE):
                for kw in tl.static_range(STRIDE):
                    ih = h0 + kh
                    iw = w0 + kw
                    ok = m_mask & (ih < H) & (iw < W)
                    mask = ok[:, None] & ci_mask[None, :]
                    v = tl.load(base + ih[:, None] * s_h + iw[:, None] * s_w, mask=mask, other=0.0).to(tl.float32)
                    if SUB_SHIFT:
                        v = tl.where(mask, v - sh[None, :], 0.0)
                    acc += v
            cnt = ((tl.minimum(h0 + STRIDE, H) - h0) * (tl.minimum(w0 + STRIDE, W) - w0)).to(tl.float32)
            return acc / cnt[:, None]

    @triton.jit
    def _rows(pid_m, M, HWo, Wo, BLOCK_M: tl.constexpr, INT64: tl.constexpr):
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        n = offs_m // HWo
        r = offs_m - n * HWo
        oh = r // Wo
        ow = r - oh * Wo
        if INT64:  # offsets past 2**31 elements: widen from the batch index on
            n = n.to(tl.int64)
        return offs_m, m_mask, n, oh, ow

    @triton.jit
    def _recompute_y(src, s_n, s_c, s_h, s_w, shift_ptr, w_ptr, n64, oh, ow, m_mask, co, co_mask, C_in, H, W,
                     STRIDE: tl.constexpr, SUB_SHIFT: tl.constexpr, ACT: tl.constexpr, EMU: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr):
        """y[BLOCK_M, BLOCK_CO] = p @ W[co]^T, p rounded to the dot dtype (as stored in pooled)."""
        acc = tl.zeros((BLOCK_M, BLOCK_CO), dtype=tl.float32)
        for c0 in range(0, C_in, BLOCK_CI):
            ci = c0 + tl.arange(0, BLOCK_CI)
            ci_mask = ci < C_in
            p = _load_p(src, s_n, s_c, s_h, s_w, shift_ptr, n64, oh, ow, m_mask, ci, ci_mask, H, W,
                        STRIDE, SUB_SHIFT, BLOCK_M, BLOCK_CI)
            wt = tl.load(w_ptr + co[None, :] * C_in + ci[:, None], mask=ci_mask[:, None] & co_mask[None, :], other=0.0)
            acc += tl.dot(_dq(p, ACT, EMU), _dq(wt, ACT, EMU), input_precision=PRECISION)
        return acc

    @triton.jit
    def _fwd_kernel(
        src, s_n, s_c, s_h, s_w, shift_ptr, w_ptr,
        pooled_ptr, p_n, p_c, p_h, p_w,
        part_mean_ptr, part_m2_ptr,
        mean_ptr, scale_ptr, beta_ptr,
        res_ptr, r_n, r_c, r_h, r_w,
        out_ptr, o_n, o_c, o_h, o_w,
        M, C_in, C_out, H, W, HWo, Wo,
        STRIDE: tl.constexpr, SUB_SHIFT: tl.constexpr, WRITE_POOLED: tl.constexpr, APPLY: tl.constexpr,
        HAS_BETA: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, EMU: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, INT64: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_co = tl.program_id(1)
        offs_m, m_mask, n64, oh, ow = _rows(pid_m, M, HWo, Wo, BLOCK_M, INT64)
        co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
        co_mask = co < C_out

        acc = tl.zeros((BLOCK_M, BLOCK_CO), dtype=tl.float32)
        for c0 in range(0, C_in, BLOCK_CI):
            ci = c0 + tl.arange(0, BLOCK_CI)
            ci_mask = ci < C_in
            p = _load_p(src, s_n, s_c, s_h, s_w, shift_ptr, n64, oh, ow, m_mask, ci, ci_mask, H, W,
                        STRIDE, SUB_SHIFT, BLOCK_M, BLOCK_CI)
            pq = _dq(p, ACT, EMU)
            if WRITE_POOLED:
                if pid_co == 0:
                    pp = pooled_ptr + n64[:, None] * p_n + ci[None, :] * p_c + oh[:, None] * p_h + ow[:, None] * p_w
                    tl.store(pp, _rnd(p, ACT, EMU), mask=m_mask[:, None] & ci_mask[None, :])
            wt = tl.load(w_ptr + co[None, :] * C_in + ci[:, None], mask=ci_mask[:, None] & co_mask[None, :], other=0.0)
            acc += tl.dot(pq, _dq(wt, ACT, EMU), input_precision=PRECISION)

        if APPLY:
            mean = tl.load(mean_ptr + co, mask=co_mask, other=0.0)
            scale = tl.load(scale_ptr + co, mask=co_mask, other=0.0)
            out = (acc - mean[None, :]) * scale[None, :]
            if HAS_BETA:
                out += tl.load(beta_ptr + co, mask=co_mask, other=0.0)[None, :]
            mask = m_mask[:, None] & co_mask[None, :]
            if HAS_RES:
                rp = res_ptr + n64[:, None] * r_n + co[None, :] * r_c + oh[:, None] * r_h + ow[:, None] * r_w
                out += tl.load(rp, mask=mask, other=0.0).to(tl.float32)
            op = out_ptr + n64[:, None] * o_n + co[None, :] * o_c + oh[:, None] * o_h + ow[:, None] * o_w
            tl.store(op, _rnd(out, ACT, EMU), mask=mask)
        else:
            cnt = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
            rows = m_mask[:, None]
            tile_mean = tl.sum(tl.where(rows, acc, 0.0), axis=0) / cnt
            d = tl.where(rows, acc - tile_mean[None, :], 0.0)
            m2 = tl.sum(d * d, axis=0)
            tl.store(part_mean_ptr + pid_m * C_out + co, tile_mean, mask=co_mask)
            tl.store(part_m2_ptr + pid_m * C_out + co, m2, mask=co_mask)

    @triton.jit
    def _bwd_reduce_kernel(
        src, s_n, s_c, s_h, s_w, shift_ptr, w_ptr,
        g_ptr, g_n, g_c, g_h, g_w,
        mean_ptr, rstd_ptr, part_g_ptr, part_gy_ptr,
        M, C_in, C_out, H, W, HWo, Wo,
        SUB_SHIFT: tl.constexpr, ACT: tl.constexpr, EMU: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, INT64: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_co = tl.program_id(1)
        offs_m, m_mask, n64, oh, ow = _rows(pid_m, M, HWo, Wo, BLOCK_M, INT64)
        co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
        co_mask = co < C_out
        y = _recompute_y(src, s_n, s_c, s_h, s_w, shift_ptr, w_ptr, n64, oh, ow, m_mask, co, co_mask, C_in, H, W,
                         1, SUB_SHIFT, ACT, EMU, PRECISION, BLOCK_M, BLOCK_CO, BLOCK_CI)
        mean = tl.load(mean_ptr + co, mask=co_mask, other=0.0)
        rstd = tl.load(rstd_ptr + co, mask=co_mask, other=0.0)
        mask = m_mask[:, None] & co_mask[None, :]
        g = tl.load(g_ptr + n64[:, None] * g_n + co[None, :] * g_c + oh[:, None] * g_h + ow[:, None] * g_w,
                    mask=mask, other=0.0).to(tl.float32)
        yhat = (y - mean[None, :]) * rstd[None, :]
        tl.store(part_g_ptr + pid_m * C_out + co, tl.sum(g, axis=0), mask=co_mask)
        tl.store(part_gy_ptr + pid_m * C_out + co, tl.sum(tl.where(mask, g * yhat, 0.0), axis=0), mask=co_mask)

    @triton.jit
    def _bwd_dx_kernel(
        src, s_n, s_c, s_h, s_w, shift_ptr, w_ptr,
        g_ptr, g_n, g_c, g_h, g_w,
        mean_ptr, rstd_ptr, coef_ptr, a_ptr, b_ptr,
        gx_ptr, x_n, x_c, x_h, x_w,
        dw_part_ptr,
        M, C_in, C_out, Hs, Ws, H, W, HWo, Wo, GROUP_M,
        STRIDE: tl.constexpr, SUB_SHIFT: tl.constexpr, TRAINING: tl.constexpr, ONE_CO: tl.constexpr,
        ACT: tl.constexpr, EMU: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, INT64: tl.constexpr,
    ):
        """(Hs, Ws): spatial size of ``src`` (pooled or x); (H, W): size of grad_x."""
        pid_g = tl.program_id(0)
        pid_ci = tl.program_id(1)
        ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
        ci_mask = ci < C_in
        co_base = tl.arange(0, BLOCK_CO)
        dw_acc = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=tl.float32)
        dw_rows = dw_part_ptr + pid_g * C_out * C_in
        for gi in range(0, GROUP_M):
            pid_m = pid_g * GROUP_M + gi
            offs_m, m_mask, n64, oh, ow = _rows(pid_m, M, HWo, Wo, BLOCK_M, INT64)
            p_ci = _load_p(src, s_n, s_c, s_h, s_w, shift_ptr, n64, oh, ow, m_mask, ci, ci_mask, Hs, Ws,
                           1, SUB_SHIFT, BLOCK_M, BLOCK_CI)
            p_ci = _dq(p_ci, ACT, EMU)
            dp = tl.zeros((BLOCK_M, BLOCK_CI), dtype=tl.float32)
            for co0 in range(0, C_out, BLOCK_CO):
                co = co0 + co_base
                co_mask = co < C_out
                mask = m_mask[:, None] & co_mask[None, :]
                g = tl.load(g_ptr + n64[:, None] * g_n + co[None, :] * g_c + oh[:, None] * g_h + ow[:, None] * g_w,
                            mask=mask, other=0.0).to(tl.float32)
                coef = tl.load(coef_ptr + co, mask=co_mask, other=0.0)
                if TRAINING:
                    y = _recompute_y(src, s_n, s_c, s_h, s_w, shift_ptr, w_ptr, n64, oh, ow, m_mask, co, co_mask,
                                     C_in, Hs, Ws, 1, SUB_SHIFT, ACT, EMU, PRECISION, BLOCK_M, BLOCK_CO, BLOCK_CI)
                    mean = tl.load(mean_ptr + co, mask=co_mask, other=0.0)
                    rstd = tl.load(rstd_ptr + co, mask=co_mask, other=0.0)
                    a = tl.load(a_ptr + co, mask=co_mask, other=0.0)
                    b = tl.load(b_ptr + co, mask=co_mask, other=0.0)
                    yhat = (y - mean[None, :]) * rstd[None, :]
                    dy = coef[None, :] * (g - a[None, :] - yhat * b[None, :])
                    dy = tl.where(mask, dy, 0.0)
                else:
                    dy = coef[None, :] * g
                dyq = _dq(dy, ACT, EMU)
                w = tl.load(w_ptr + co[:, None] * C_in + ci[None, :], mask=co_mask[:, None] & ci_mask[None, :],
                            other=0.0)
                w = _dq(w, ACT, EMU)
                dp += tl.dot(dyq, w, input_precision=PRECISION)
                dwp = tl.dot(tl.trans(dyq), p_ci, input_precision=PRECISION)
                if ONE_CO:
                    dw_acc += dwp
                else:
                    wmask = co_mask[:, None] & ci_mask[None, :]
                    dptr = dw_rows + co[:, None] * C_in + ci[None, :]
                    tl.store(dptr, tl.load(dptr, mask=wmask, other=0.0) + dwp, mask=wmask)
            # scatter dp / |window| to the window's pixels
            base = gx_ptr + n64[:, None] * x_n + ci[None, :] * x_c
            if STRIDE == 1:
                tl.store(base + oh[:, None] * x_h + ow[:, None] * x_w, _rnd(dp, ACT, EMU),
                         mask=m_mask[:, None] & ci_mask[None, :])
            else:
                h0 = oh * STRIDE
                w0 = ow * STRIDE
                cnt = ((tl.minimum(h0 + STRIDE, H) - h0) * (tl.minimum(w0 + STRIDE, W) - w0)).to(tl.float32)
                val = _rnd(dp / cnt[:, None], ACT, EMU)
                for kh in tl.static_range(STRIDE):
                    for kw in tl.static_range(STRIDE):
                        ih = h0 + kh
                        iw = w0 + kw
                        ok = m_mask & (ih < H) & (iw < W)
                        tl.store(base + ih[:, None] * x_h + iw[:, None] * x_w, val, mask=ok[:, None] & ci_mask[None, :])
        if ONE_CO:
            wmask = (co_base < C_out)[:, None] & ci_mask[None, :]
            tl.store(dw_rows + co_base[:, None] * C_in + ci[None, :], dw_acc, mask=wmask)


# --- host side -----------------------------------------------------------------------

def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _blocks(m: int, c_in: int, c_out: int):
    """(BLOCK_M, BLOCK_CO, BLOCK_CI, num_warps). Chosen from ptxas resource reports for
    sm_90 (no GPU timing yet): 32 x 64 x 32 tiles with 4 warps compile without (fwd) or
    with little (bwd B) register spilling at stride 2; 64-row tiles spill 0.5 KB+ there."""
    block_m = _OVERRIDES.get("BLOCK_M") or 32
    block_ci = _OVERRIDES.get("BLOCK_CI") or _pow2(c_in, 16, 32)
    block_co = _OVERRIDES.get("BLOCK_CO") or _pow2(c_out, 16, 64)
    num_warps = _OVERRIDES.get("num_warps") or 4
    return block_m, block_co, block_ci, num_warps


# Shared memory the pipelined pooling loads may take, of the 227 KB an H100 block can
# use: the rest holds the dot operands.
_PIPELINE_SMEM = 160 * 1024


def _num_stages(stride: int, block_m: int, block_ci: int, block_co: int, esize: int) -> int:
    """Software-pipelining depth of a kernel that pools while loading. Each stage past
    the first buffers the stride^2 window tiles of one C_in block (and a weight tile) in
    shared memory: at stride 8 in float32 one stage is 270 KB, over the H100's limit, and
    Triton's default of 3 stages fails at launch (OutOfResources) for stride 8 in any dtype."""
    per_stage = stride * stride * block_m * block_ci * esize + block_ci * block_co * 4
    return max(1, min(3, 1 + _PIPELINE_SMEM // per_stage))


def _tf32_allowed() -> bool:
    """torch's float32 matmul precision flag. Since torch 2.9, reading the legacy
    ``allow_tf32`` raises once the new ``fp32_precision`` API has been used."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    return precision == "tf32" if precision is not None else bool(matmul.allow_tf32)


def _on_tensor_device(fn):
    """Triton launches on the current CUDA device and stream: make that device the one
    the tensors (the first argument) live on."""
    @functools.wraps(fn)
    def wrapper(t, *args):
        with torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext():
            return fn(t, *args)
    return wrapper


def _dot_config(dtype: torch.dtype, device: torch.device):
    """(ACT, EMU, PRECISION) constexprs for the activations' dtype."""
    emu = device.type == "cpu"  # the interpreter
    if dtype == torch.float32:
        return dict(ACT=tl.float32, EMU=emu, PRECISION="tf32" if _tf32_allowed() else "ieee")
    act = tl.bfloat16 if dtype == torch.bfloat16 else tl.float16
    return dict(ACT=act, EMU=emu, PRECISION="ieee" if emu else "tf32")


def _strides(t):
    return tuple(t.stride())


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


@_on_tensor_device
def forward(x, shift, weight, bn_weight, bn_bias, residual, mean_in, var_in, stride, ceil_mode, training, eps):
    if x.dtype not in DTYPES:
        raise TypeError(f"triton backend: unsupported dtype {x.dtype}")
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    ho, wo = pooled_size(h, stride, ceil_mode), pooled_size(w, stride, ceil_mode)
    m = n * ho * wo
    fmt = memory_format_of(x)
    dev = x.device
    acc = torch.float32
    out = torch.empty((n, c_out, ho, wo), device=dev, dtype=x.dtype, memory_format=fmt)
    pooled = (torch.empty((n, c_in, ho, wo), device=dev, dtype=x.dtype, memory_format=fmt)
              if stride > 1 else x.new_empty(0))
    shift = shift.to(acc).contiguous()
    weight = weight.to(acc).contiguous()
    block_m, block_co, block_ci, num_warps = _blocks(m, c_in, c_out)
    t = triton.cdiv(m, block_m)
    grid = (t, triton.cdiv(c_out, block_co))
    dot = _dot_config(x.dtype, dev)
    pstr = _strides(pooled) if stride > 1 else (0, 0, 0, 0)
    dummy = weight
    common = dict(STRIDE=stride, **dot, INT64=max(x.numel(), out.numel()) >= 2**31,
                  BLOCK_M=block_m, BLOCK_CO=block_co, BLOCK_CI=block_ci, num_warps=num_warps,
                  num_stages=_num_stages(stride, block_m, block_ci, block_co, x.element_size()))
    has_res = residual is not None
    res = residual if has_res else out
    beta = bn_bias.to(acc).contiguous() if bn_bias is not None else dummy

    if training:
        part_mean = torch.empty((t, c_out), device=dev, dtype=acc)
        part_m2 = torch.empty((t, c_out), device=dev, dtype=acc)
        _fwd_kernel[grid](
            x, *_strides(x), shift, weight,
            pooled if stride > 1 else x, *pstr,
            part_mean, part_m2,
            dummy, dummy, dummy,
            res, *_strides(res), out, *_strides(out),
            m, c_in, c_out, h, w, ho * wo, wo,
            SUB_SHIFT=True, WRITE_POOLED=stride > 1, APPLY=False, HAS_BETA=False, HAS_RES=False, **common)
        # Chan's parallel combine of the per-tile (count, mean, M2), all tiles at once.
        cnt = torch.full((t, 1), float(block_m), device=dev, dtype=acc)
        cnt[-1] = float(m - (t - 1) * block_m)
        mean = (part_mean * cnt).sum(0) / m
        var = (part_m2.sum(0) + ((part_mean - mean) ** 2 * cnt).sum(0)) / m
    else:
        mean, var = mean_in.to(acc).clone(), var_in.to(acc).clone()

    scale = torch.rsqrt(var + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(acc)
    scale = scale.contiguous()
    if training and stride > 1:
        src, sub, src_stride, hs, ws = pooled, False, 1, ho, wo
    else:
        src, sub, src_stride, hs, ws = x, True, stride, h, w
    common["STRIDE"] = src_stride
    common["num_stages"] = _num_stages(src_stride, block_m, block_ci, block_co, x.element_size())
    _fwd_kernel[grid](
        src, *_strides(src), shift, weight,
        pooled if stride > 1 else x, *pstr,
        dummy, dummy,
        mean, scale, beta,
        res, *_strides(res), out, *_strides(out),
        m, c_in, c_out, hs, ws, ho * wo, wo,
        SUB_SHIFT=sub, WRITE_POOLED=(not training and stride > 1), APPLY=True,
        HAS_BETA=bn_bias is not None, HAS_RES=has_res, **common)
    return out, pooled, weight.new_empty(0), mean, var


@_on_tensor_device
def backward(grad_out, saved, y, shift, weight, bn_weight, mean, var, stride, ceil_mode, in_h, in_w, training, eps):
    if grad_out.dtype not in DTYPES:
        raise TypeError(f"triton backend: unsupported dtype {grad_out.dtype}")
    n, c_out, ho, wo = grad_out.shape
    c_in = weight.shape[1]
    m = n * ho * wo
    fmt = memory_format_of(grad_out)
    dev = grad_out.device
    acc = torch.float32
    weight = weight.to(acc).contiguous()
    sub = shift is not None
    shift_t = shift.to(acc).contiguous() if sub else weight
    hs, ws = saved.shape[2], saved.shape[3]
    block_m, block_co, block_ci, num_warps = _blocks(m, c_in, c_out)
    t = triton.cdiv(m, block_m)
    dot = _dot_config(grad_out.dtype, dev)
    mean = mean.to(acc).contiguous()
    rstd = torch.rsqrt(var.to(acc) + eps).contiguous()
    big = max(grad_out.numel(), saved.numel(), n * c_in * in_h * in_w) >= 2**31
    common = dict(**dot, BLOCK_M=block_m, BLOCK_CO=block_co, BLOCK_CI=block_ci, INT64=big, num_warps=num_warps)

    part_g = torch.empty((t, c_out), device=dev, dtype=acc)
    part_gy = torch.empty((t, c_out), device=dev, dtype=acc)
    _bwd_reduce_kernel[(t, triton.cdiv(c_out, block_co))](
        saved, *_strides(saved), shift_t, weight,
        grad_out, *_strides(grad_out),
        mean, rstd, part_g, part_gy,
        m, c_in, c_out, hs, ws, ho * wo, wo,
        SUB_SHIFT=sub, **common)
    dbeta = part_g.sum(0)
    dgamma = part_gy.sum(0)

    coef = rstd if bn_weight is None else rstd * bn_weight.to(acc)
    coef = coef.contiguous()
    a = (dbeta / m).contiguous()
    b = (dgamma / m).contiguous()

    grad_x = torch.empty((n, c_in, in_h, in_w), device=dev, dtype=grad_out.dtype, memory_format=fmt)
    if stride > 1:  # floor mode: trailing rows/columns outside every window get 0
        if ho * stride < in_h:
            grad_x[:, :, ho * stride:, :].zero_()
        if wo * stride < in_w:
            grad_x[:, :, :, wo * stride:].zero_()

    n_ci = triton.cdiv(c_in, block_ci)
    n_co = triton.cdiv(c_out, block_co)
    esize = grad_out.element_size()
    if "GROUP_M" in _OVERRIDES:
        group_m = _OVERRIDES["GROUP_M"]
    else:
        # Enough programs to fill the GPU, but dW partials ([groups, C_out, C_in] fp32)
        # at most about the bytes of the activations that kernel B reads.
        by_bytes = max(1, (m * (c_in + c_out) * esize) // (4 * c_in * c_out))
        groups = max(1, min(t, by_bytes, triton.cdiv(4 * _num_sms(dev), n_ci)))
        group_m = triton.cdiv(t, groups)
    groups = triton.cdiv(t, group_m)
    one_co = n_co == 1
    alloc = torch.empty if one_co else torch.zeros
    dw_part = alloc((groups, c_out, c_in), device=dev, dtype=acc)
    _bwd_dx_kernel[(groups, n_ci)](
        saved, *_strides(saved), shift_t, weight,
        grad_out, *_strides(grad_out),
        mean, rstd, coef, a, b,
        grad_x, *_strides(grad_x),
        dw_part,
        m, c_in, c_out, hs, ws, in_h, in_w, ho * wo, wo, group_m,
        STRIDE=stride, SUB_SHIFT=sub, TRAINING=training, ONE_CO=one_co, **common)
    dweight = dw_part.sum(0) if groups > 1 else dw_part[0]
    return grad_x, dweight, dgamma, dbeta
