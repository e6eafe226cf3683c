// CUDA kernels of the fused projection: avgpool_s(x - shift) -> 1x1 conv -> BatchNorm
// (-> + residual), forward and backward, registered as the CUDA kernels of hires::projection
// and hires::projection_backward (csrc/ops.cpp: the schema and what each result means).
// Every per-call step runs on the GPU: the data shift, the statistics, the running-statistics
// update and eval's corrections. The math is that of hires_kernels/backends/reference.py.
//
// Notation: M = N * H' * W' pooled positions (row m <-> (n, ho, wo)), C_in, C_out,
// s = stride, e = bytes per activation element, T = 64 (tile), acc_t = float (double
// for float64 activations). Every kernel reads activations through their strides, so
// NCHW and channels_last (and any other strides) are handled by the same code; the
// thread mapping of loads and stores follows the layout so that the fastest-varying
// index of a warp is the contiguous one.
//
// One building block, `tile_gemm`: a block of 256 threads computes a T x T tile
// C[r][c] = sum_k A(k, r) B(k, c) in acc_t registers (4 x 4 per thread), staging
// A and B in shared memory in chunks of BK = 16 along k. The operands come from
// small loader functors, so the pooling, the shift and all masks live in the loaders
// (out-of-range rows, columns and k give 0). No tensor cores: fp32 (or fp64) FMA,
// chosen to be verifiable by reading; see "Next steps" below.
//
// Forward (S0 shift_kernel: shift[c] = mean of x[0, c, :s, :s], one thread per channel),
// training (4 launches):
//   F1 y_tile<FWD_STATS>  grid (ceil(M/T), ceil(C_out/T)). A = pooled tile computed
//      from x on load (window sum of x - shift, divided by its valid count), B = W^T.
//      y stays in shared memory; per column a two-pass (mean, M2) over the tile's
//      valid rows -> partials [tiles_m][C_out]. Blocks with blockIdx.y == 0 also
//      write `pooled` (x's dtype/format). Bytes: x read ceil(C_out/T) times (L2 hits
//      after the first), pooled written once (N C_in H' W' e), partials 8 M C_out / T.
//   F2 fwd_finalize       one block per channel merges the partials with Chan's
//      formula in a fixed order (deterministic) -> mean, var (biased), and updates the
//      running statistics (mean + W[c] . shift, unbiased var; ATen does it afterwards when
//      they are strided or not acc_t). Bytes: partials.
//   F3 y_tile<FWD_APPLY>  same grid; recomputes y exactly as F1, then
//      out = (y - mean) * rstd * gamma + beta (+ residual) in x's dtype/format.
//      Bytes: x again, residual read and out written once (N C_out H' W' e each).
//   The un-normalised y is never written to global memory.
// Forward, eval (2 launches): S0, then F3 alone; its per-column prologue takes
//   mean = running_mean - W[c] . shift and var = running_var (blocks of the first row
//   tile store them for backward); it also writes `pooled`.
// Backward (p = saved - shift at stride 1, where saved is x; saved, the already shifted
// pooled input, at stride > 1):
//   B1 y_tile<BWD_STATS>  y recomputed from p and W; per column partial sums of g
//      and g * yhat -> [tiles_m][C_out] x 2. Bytes: saved, grad_out read once.
//   B2 bwd_finalize       fixed-order sums -> dbeta, dgamma.
//   B3 y_tile<BWD_DY>     y recomputed; dy = gamma rstd (g - dbeta/M - yhat dgamma/M)
//      (training) or gamma rstd g (eval) -> dy scratch [M][C_out] in acc_t.
//      Bytes: saved, grad_out read, dy written (4 M C_out).
//   B4 dp_scatter         grid (ceil(M/T), ceil(C_in/T)): dp = dy W (k = C_out),
//      then every pooled position writes its own window of grad_x with dp / count
//      (the last row/column of windows also writes the zeros of the trailing
//      pixels in floor mode), so every grad_x pixel is written exactly once and no
//      memset is needed. Bytes: dy read (4 M C_out, per C_in tile), grad_x written.
//   B5 dw_partial         grid (ceil(C_out/T), ceil(C_in/T), splits): split-K over
//      m of dW = dy^T p -> [splits][C_out][C_in]; B6 dw_reduce sums the splits in a
//      fixed order and, in eval, adds rstd gamma dbeta shift^T (p was shifted; in
//      training sum_m dy = 0). Deterministic: no floating-point atomics anywhere.
//
// Next steps (performance, not correctness): read `pooled` instead of re-pooling x
// in F3; keep dy in the activation dtype or fuse B3 into B4/B5; bf16/fp16 tiles on
// tensor cores (mma/wgmma) and cp.async / TMA staging; one C_out tile per block so
// x is read exactly once.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <optional>
#include <tuple>
#include <type_traits>

#include "../projection_args.h"

namespace hires_cuda {

constexpr int T = 64;          // tile rows and columns
constexpr int BK = 16;         // k chunk staged in shared memory
constexpr int PITCH = T + 1;   // padded shared-memory row (no bank conflicts on transposed stores)
constexpr int NT = 256;        // threads per tile block; thread (ty, tx) = (tid / 16, tid % 16)
                               // owns rows ty + 16 i and columns tx + 16 j, i, j < 4
constexpr int FIN_THREADS = 256;

// ---------------------------------------------------------------------------------
// Loaders. Each is a functor acc_t operator()(int64_t k, int r) giving operand(k, row0 + r),
// 0 outside the matrix.

// A 4-D activation [N, C, H, W] read through its strides as the pooled matrix p[m][c]:
// window average of (src - shift) over rows [ho s, min(ho s + s, H)) and columns
// [wo s, min(wo s + s, W)) (s = 1: a plain read). Optionally stores each value it
// computes to `dst` (the `pooled` output, same indexing at H' x W').
template <typename scalar_t, typename acc_t>
struct PooledView {
  const scalar_t* src;
  int64_t sn, sc, sh, sw;
  int C, H, W;        // src channels and spatial size
  int Ho, Wo, s;      // pooled size and window
  int64_t M;          // N * Ho * Wo
  const acc_t* shift; // nullable
  scalar_t* dst;      // nullable
  int64_t dn, dc, dh, dw;

  __device__ acc_t operator()(int64_t m, int c) const {
    if (m >= M || c >= C) return acc_t(0);
    const int64_t hw = (int64_t)Ho * Wo;
    const int64_t n = m / hw;
    const int64_t rem = m - n * hw;
    const int ho = (int)(rem / Wo), wo = (int)(rem - (int64_t)ho * Wo);
    const int h0 = ho * s, w0 = wo * s;
    const int h1 = min(h0 + s, H), w1 = min(w0 + s, W);
    const scalar_t* base = src + n * sn + (int64_t)c * sc;
    const acc_t sub = shift != nullptr ? shift[c] : acc_t(0);
    acc_t sum = acc_t(0);
    for (int h = h0; h < h1; ++h)
      for (int w = w0; w < w1; ++w)
        sum += static_cast<acc_t>(base[(int64_t)h * sh + (int64_t)w * sw]) - sub;
    const acc_t v = s == 1 ? sum : sum / static_cast<acc_t>((h1 - h0) * (w1 - w0));
    if (dst != nullptr)
      dst[n * dn + (int64_t)c * dc + (int64_t)ho * dh + (int64_t)wo * dw] = static_cast<scalar_t>(v);
    return v;
  }
};

// operand(k, r) = p[row0 + r][k]: pooled positions as tile rows, channels along k.
template <typename scalar_t, typename acc_t>
struct PoolRowsK {
  PooledView<scalar_t, acc_t> v;
  int64_t row0;
  __device__ acc_t operator()(int64_t k, int r) const { return v(row0 + r, (int)k); }
};

// operand(k, r) = p[k][row0 + r]: positions along k, channels as tile columns.
template <typename scalar_t, typename acc_t>
struct PoolKRows {
  PooledView<scalar_t, acc_t> v;
  int64_t row0;
  __device__ acc_t operator()(int64_t k, int r) const {
    const int64_t c = row0 + r;
    return c < v.C ? v(k, (int)c) : acc_t(0);
  }
};

// operand(k, r) = ptr[k * stride_k + (row0 + r) * stride_r] for row0 + r < rows.
template <typename acc_t>
struct MatView {
  const acc_t* ptr;
  int64_t stride_k, stride_r, row0, rows;
  __device__ acc_t operator()(int64_t k, int r) const {
    const int64_t row = row0 + r;
    return row < rows ? ptr[k * stride_k + row * stride_r] : acc_t(0);
  }
};

// S[kk][r] = f(k0 + kk, r) (0 for k >= k_end). k_fast: consecutive threads take
// consecutive k (the contiguous direction of the source), else consecutive rows.
template <typename acc_t, typename F>
__device__ __forceinline__ void fill_tile(acc_t* S, const F& f, int64_t k0, int64_t k_end, bool k_fast) {
  for (int e = threadIdx.x; e < BK * T; e += NT) {
    const int kk = k_fast ? e % BK : e / T;
    const int r = k_fast ? e / BK : e % T;
    const int64_t k = k0 + kk;
    S[kk * PITCH + r] = k < k_end ? f(k, r) : acc_t(0);
  }
}

// acc[i][j] += sum_{k in [k_begin, k_end)} A(k, ty + 16 i) B(k, tx + 16 j).
// smem holds at least 2 * BK * PITCH elements. Ends with a barrier, so the caller
// may reuse smem at once.
template <typename acc_t, typename LA, typename LB>
__device__ void tile_gemm(acc_t (&acc)[4][4], acc_t* smem, int64_t k_begin, int64_t k_end,
                          const LA& la, bool a_kfast, const LB& lb, bool b_kfast) {
  acc_t* As = smem;
  acc_t* Bs = smem + BK * PITCH;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += BK) {
    fill_tile(As, la, k0, k_end, a_kfast);
    fill_tile(Bs, lb, k0, k_end, b_kfast);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      acc_t a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[kk * PITCH + ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[kk * PITCH + tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }
  __syncthreads();  // also when the loop ran zero times (C_in == 0)
}

// Ys[r][c] = acc (PITCH-padded T x T tile in smem); ends with a barrier.
template <typename acc_t>
__device__ __forceinline__ void store_tile(acc_t* Ys, const acc_t (&acc)[4][4]) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) Ys[(ty + 16 * i) * PITCH + tx + 16 * j] = acc[i][j];
  __syncthreads();
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t inv_sqrt(acc_t v) {
  return acc_t(1) / sqrt(v);
}

// ---------------------------------------------------------------------------------
// The y tile kernel: y[m][co] = sum_ci p[m][ci] W[co][ci] for a T x T tile, with one
// of four epilogues.

enum Epilogue { FWD_STATS = 0, FWD_APPLY = 1, BWD_STATS = 2, BWD_DY = 3 };

template <typename scalar_t, typename acc_t>
struct Act {  // a strided [N, C, H', W'] activation at the pooled resolution
  scalar_t* ptr;
  int64_t sn, sc, sh, sw;
  __device__ __forceinline__ int64_t offset(int64_t n, int64_t c, int64_t h, int64_t w) const {
    return n * sn + c * sc + h * sh + w * sw;
  }
};

template <typename scalar_t, typename acc_t>
struct YTileArgs {
  PooledView<scalar_t, acc_t> p;  // the A operand source (x with pooling, or saved)
  bool p_cfast;                   // its channel stride is 1 (load along channels)
  const acc_t* weight;            // [C_out][C_in]
  int C_in, C_out, Ho, Wo;
  int64_t M;
  bool write_pooled;              // FWD: blocks with blockIdx.y == 0 store p.dst
  // statistics in / out
  const acc_t* mean;              // [C_out]   (APPLY, BWD_*); eval forward: running_mean
  const acc_t* var;               // [C_out]   (APPLY, BWD_*)
  const acc_t* eval_shift;        // eval forward: the x shift; the epilogue's mean is mean - W eval_shift
  acc_t* mean_out;                // eval forward: blocks with blockIdx.x == 0 store the statistics used
  acc_t* var_out;
  const acc_t* gamma;             // nullable  (APPLY, BWD_DY)
  const acc_t* beta;              // nullable  (APPLY)
  const acc_t* dbeta;             // [C_out]   (BWD_DY)
  const acc_t* dgamma;            // [C_out]   (BWD_DY)
  acc_t eps;
  bool training;
  acc_t* part0;                   // [tiles_m][C_out]: mean (FWD_STATS) / sum g (BWD_STATS)
  acc_t* part1;                   // [tiles_m][C_out]: M2 (FWD_STATS) / sum g*yhat (BWD_STATS)
  Act<scalar_t, acc_t> out;       // FWD_APPLY output
  Act<scalar_t, acc_t> residual;  // FWD_APPLY, ptr nullable
  Act<scalar_t, acc_t> grad;      // BWD_*: grad_out
  bool act_cfast;                 // out / grad_out channel stride is 1
  acc_t* dy;                      // BWD_DY: [M][C_out]
};

template <typename scalar_t, typename acc_t, int EPI>
__global__ void __launch_bounds__(NT) y_tile_kernel(YTileArgs<scalar_t, acc_t> a) {
  __shared__ acc_t smem[T * PITCH];
  __shared__ acc_t c_mean[T], c_rstd[T], c_scale[T], c_beta[T], c_db[T], c_dg[T];
  const int64_t m0 = (int64_t)blockIdx.x * T;
  const int64_t co0 = (int64_t)blockIdx.y * T;

  if (EPI != FWD_STATS && threadIdx.x < T) {  // per-column constants (visible after tile_gemm's barriers)
    const int64_t co = co0 + threadIdx.x;
    acc_t mean = 0, rstd = 0, scale = 0, beta = 0, db = 0, dg = 0;
    if (co < a.C_out) {
      mean = a.mean[co];
      if (a.eval_shift != nullptr) {
        // Running statistics describe W x; the kernels see W (x - shift).
        for (int k = 0; k < a.C_in; ++k) mean -= a.weight[co * a.C_in + k] * a.eval_shift[k];
        if (blockIdx.x == 0) {
          a.mean_out[co] = mean;
          a.var_out[co] = a.var[co];
        }
      }
      rstd = inv_sqrt(a.var[co] + a.eps);
      scale = a.gamma != nullptr ? rstd * a.gamma[co] : rstd;
      if (EPI == FWD_APPLY) beta = a.beta != nullptr ? a.beta[co] : acc_t(0);
      if (EPI == BWD_DY && a.training) {
        db = a.dbeta[co] / static_cast<acc_t>(a.M);
        dg = a.dgamma[co] / static_cast<acc_t>(a.M);
      }
    }
    c_mean[threadIdx.x] = mean;
    c_rstd[threadIdx.x] = rstd;
    c_scale[threadIdx.x] = scale;
    c_beta[threadIdx.x] = beta;
    c_db[threadIdx.x] = db;
    c_dg[threadIdx.x] = dg;
  }

  PoolRowsK<scalar_t, acc_t> la{a.p, m0};
  if (!(a.write_pooled && blockIdx.y == 0)) la.v.dst = nullptr;
  MatView<acc_t> lb{a.weight, 1, a.C_in, co0, a.C_out};  // B(k = ci, c = co) = W[co][ci]
  acc_t acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = acc_t(0);
  tile_gemm(acc, smem, 0, a.C_in, la, a.p_cfast, lb, true);
  acc_t* Ys = smem;
  store_tile(Ys, acc);

  const int rows = (int)min64(T, a.M - m0);
  const int64_t hw = (int64_t)a.Ho * a.Wo;

  if (EPI == FWD_STATS || EPI == BWD_STATS) {
    // One warp per column at a time; lanes cover rows lane and lane + 32.
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int c = warp; c < T; c += NT / 32) {
      const int64_t co = co0 + c;
      if (co >= a.C_out) continue;  // warp-uniform
      if (EPI == FWD_STATS) {
        const acc_t v0 = lane < rows ? Ys[lane * PITCH + c] : acc_t(0);
        const acc_t v1 = lane + 32 < rows ? Ys[(lane + 32) * PITCH + c] : acc_t(0);
        const acc_t mean = warp_sum(v0 + v1) / static_cast<acc_t>(rows);
        const acc_t d0 = lane < rows ? v0 - mean : acc_t(0);
        const acc_t d1 = lane + 32 < rows ? v1 - mean : acc_t(0);
        const acc_t m2 = warp_sum(d0 * d0 + d1 * d1);
        if (lane == 0) {
          a.part0[(int64_t)blockIdx.x * a.C_out + co] = mean;
          a.part1[(int64_t)blockIdx.x * a.C_out + co] = m2;
        }
      } else {
        acc_t sg = 0, sgy = 0;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = lane + 32 * h;
          if (r < rows) {
            const int64_t m = m0 + r;
            const int64_t n = m / hw, rem = m - n * hw;
            const int64_t ho = rem / a.Wo, wo = rem - ho * a.Wo;
            const acc_t g = static_cast<acc_t>(a.grad.ptr[a.grad.offset(n, co, ho, wo)]);
            const acc_t yhat = (Ys[r * PITCH + c] - c_mean[c]) * c_rstd[c];
            sg += g;
            sgy += g * yhat;
          }
        }
        sg = warp_sum(sg);
        sgy = warp_sum(sgy);
        if (lane == 0) {
          a.part0[(int64_t)blockIdx.x * a.C_out + co] = sg;
          a.part1[(int64_t)blockIdx.x * a.C_out + co] = sgy;
        }
      }
    }
    return;
  }

  // Elementwise epilogues: consecutive threads along the contiguous direction.
  for (int e = threadIdx.x; e < T * T; e += NT) {
    const int c = a.act_cfast ? e % T : e / T;
    const int r = a.act_cfast ? e / T : e % T;
    const int64_t co = co0 + c;
    if (r >= rows || co >= a.C_out) continue;
    const int64_t m = m0 + r;
    const int64_t n = m / hw, rem = m - n * hw;
    const int64_t ho = rem / a.Wo, wo = rem - ho * a.Wo;
    const acc_t y = Ys[r * PITCH + c];
    if (EPI == FWD_APPLY) {
      // (y - mean) * scale, then + beta, then + residual (the reference's order).
      acc_t v = (y - c_mean[c]) * c_scale[c] + c_beta[c];
      if (a.residual.ptr != nullptr) v += static_cast<acc_t>(a.residual.ptr[a.residual.offset(n, co, ho, wo)]);
      a.out.ptr[a.out.offset(n, co, ho, wo)] = static_cast<scalar_t>(v);
    } else {  // BWD_DY
      const acc_t g = static_cast<acc_t>(a.grad.ptr[a.grad.offset(n, co, ho, wo)]);
      acc_t d;
      if (a.training) {
        const acc_t yhat = (y - c_mean[c]) * c_rstd[c];
        d = c_scale[c] * (g - c_db[c] - yhat * c_dg[c]);
      } else {
        d = c_scale[c] * g;
      }
      a.dy[m * a.C_out + co] = d;
    }
  }
}

// ---------------------------------------------------------------------------------
// Finalize kernels: one block per output channel, fixed-order reductions.

// Chan's merge of (count, mean, M2) triples; counts are exact small integers.
template <typename acc_t>
__device__ __forceinline__ void chan_merge(acc_t& n, acc_t& mean, acc_t& m2, acc_t nb, acc_t mb, acc_t m2b) {
  if (nb == acc_t(0)) return;
  if (n == acc_t(0)) {
    n = nb; mean = mb; m2 = m2b;
    return;
  }
  const acc_t tot = n + nb;
  const acc_t delta = mb - mean;
  mean += delta * (nb / tot);
  m2 += m2b + delta * delta * (n * (nb / tot));
  n = tot;
}

// Per channel: mean and biased variance from the tile partials; then, when running
// statistics are given (contiguous, acc_t), their momentum update with the unshifted mean
// mean + W[co] . shift and the unbiased variance, as F.batch_norm does.
template <typename acc_t>
__global__ void __launch_bounds__(FIN_THREADS) fwd_finalize_kernel(
    const acc_t* part_mean, const acc_t* part_m2, int64_t tiles, int64_t M, int C_out,
    acc_t* mean_out, acc_t* var_out, const acc_t* weight, const acc_t* shift, int C_in,
    acc_t* running_mean, acc_t* running_var, acc_t momentum) {
  __shared__ acc_t sn[FIN_THREADS], sm[FIN_THREADS], s2[FIN_THREADS];
  const int co = blockIdx.x;
  acc_t n = 0, mean = 0, m2 = 0, ws = 0;
  for (int64_t t = threadIdx.x; t < tiles; t += FIN_THREADS) {
    const acc_t cnt = static_cast<acc_t>(min64(T, M - t * T));
    chan_merge(n, mean, m2, cnt, part_mean[t * C_out + co], part_m2[t * C_out + co]);
  }
  if (running_mean != nullptr)
    for (int k = threadIdx.x; k < C_in; k += FIN_THREADS) ws += weight[(int64_t)co * C_in + k] * shift[k];
  sn[threadIdx.x] = n; sm[threadIdx.x] = mean; s2[threadIdx.x] = m2;
  __syncthreads();
  for (int half = FIN_THREADS / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) {
      acc_t a = sn[threadIdx.x], b = sm[threadIdx.x], c = s2[threadIdx.x];
      chan_merge(a, b, c, sn[threadIdx.x + half], sm[threadIdx.x + half], s2[threadIdx.x + half]);
      sn[threadIdx.x] = a; sm[threadIdx.x] = b; s2[threadIdx.x] = c;
    }
    __syncthreads();
  }
  const acc_t batch_mean = sm[0], batch_m2 = s2[0];
  if (running_mean == nullptr) {
    if (threadIdx.x == 0) {
      mean_out[co] = batch_mean;
      var_out[co] = batch_m2 / static_cast<acc_t>(M);
    }
    return;
  }
  __syncthreads();  // sn is reused for the w_shift sum
  sn[threadIdx.x] = ws;
  __syncthreads();
  for (int half = FIN_THREADS / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) sn[threadIdx.x] += sn[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    mean_out[co] = batch_mean;
    var_out[co] = batch_m2 / static_cast<acc_t>(M);
    const acc_t keep = acc_t(1) - momentum;
    running_mean[co] = running_mean[co] * keep + (batch_mean + sn[0]) * momentum;
    running_var[co] = running_var[co] * keep + batch_m2 / static_cast<acc_t>(M - 1) * momentum;
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(FIN_THREADS) bwd_finalize_kernel(
    const acc_t* part_g, const acc_t* part_gy, int64_t tiles, int C_out, acc_t* dbeta, acc_t* dgamma) {
  __shared__ acc_t s0[FIN_THREADS], s1[FIN_THREADS];
  const int co = blockIdx.x;
  acc_t a = 0, b = 0;
  for (int64_t t = threadIdx.x; t < tiles; t += FIN_THREADS) {
    a += part_g[t * C_out + co];
    b += part_gy[t * C_out + co];
  }
  s0[threadIdx.x] = a; s1[threadIdx.x] = b;
  __syncthreads();
  for (int half = FIN_THREADS / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) {
      s0[threadIdx.x] += s0[threadIdx.x + half];
      s1[threadIdx.x] += s1[threadIdx.x + half];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    dbeta[co] = s0[0];
    dgamma[co] = s1[0];
  }
}

// ---------------------------------------------------------------------------------
// dp = dy W for a (T positions) x (T input channels) tile, scattered into grad_x.

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(NT) dp_scatter_kernel(
    const acc_t* dy, const acc_t* weight, int C_in, int C_out, int64_t M, int Ho, int Wo,
    int H, int W, int s, Act<scalar_t, acc_t> gx, bool gx_cfast) {
  __shared__ acc_t smem[T * PITCH];
  const int64_t m0 = (int64_t)blockIdx.x * T;
  const int64_t ci0 = (int64_t)blockIdx.y * T;
  MatView<acc_t> la{dy, 1, C_out, m0, M};            // A(k = co, r = m)  = dy[m][co]
  MatView<acc_t> lb{weight, C_in, 1, ci0, C_in};     // B(k = co, c = ci) = W[co][ci]
  acc_t acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = acc_t(0);
  tile_gemm(acc, smem, 0, C_out, la, true, lb, false);
  acc_t* Ys = smem;
  store_tile(Ys, acc);

  const int rows = (int)min64(T, M - m0);
  const int64_t hw = (int64_t)Ho * Wo;
  for (int e = threadIdx.x; e < T * T; e += NT) {
    const int c = gx_cfast ? e % T : e / T;
    const int r = gx_cfast ? e / T : e % T;
    const int64_t ci = ci0 + c;
    if (r >= rows || ci >= C_in) continue;
    const int64_t m = m0 + r;
    const int64_t n = m / hw, rem = m - n * hw;
    const int ho = (int)(rem / Wo), wo = (int)(rem - (int64_t)ho * Wo);
    // The window, and the region this position owns: the window, extended to the
    // border for the last row / column of windows (floor mode's trailing pixels).
    const int h0 = ho * s, w0 = wo * s;
    const int h1 = min(h0 + s, H), w1 = min(w0 + s, W);
    const int h_own = ho == Ho - 1 ? H : h1;
    const int w_own = wo == Wo - 1 ? W : w1;
    const acc_t v = Ys[r * PITCH + c] / static_cast<acc_t>((h1 - h0) * (w1 - w0));
    const scalar_t vin = static_cast<scalar_t>(v);
    const scalar_t zero = static_cast<scalar_t>(acc_t(0));
    for (int h = h0; h < h_own; ++h)
      for (int w = w0; w < w_own; ++w)
        gx.ptr[gx.offset(n, ci, h, w)] = (h < h1 && w < w1) ? vin : zero;
  }
}

// ---------------------------------------------------------------------------------
// dW partials: ws[z][co][ci] = sum_{m in split z} dy[m][co] p[m][ci]; then a
// fixed-order sum over z.

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(NT) dw_partial_kernel(
    const acc_t* dy, PooledView<scalar_t, acc_t> p, bool p_kfast, int C_in, int C_out, int64_t M,
    int64_t chunk, acc_t* ws) {
  __shared__ acc_t smem[2 * BK * PITCH];
  const int64_t co0 = (int64_t)blockIdx.x * T;
  const int64_t ci0 = (int64_t)blockIdx.y * T;
  const int64_t k_begin = (int64_t)blockIdx.z * chunk;
  const int64_t k_end = min64(M, k_begin + chunk);
  MatView<acc_t> la{dy, C_out, 1, co0, C_out};  // A(k = m, r = co) = dy[m][co]
  PoolKRows<scalar_t, acc_t> lb{p, ci0};        // B(k = m, c = ci) = p[m][ci]
  acc_t acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = acc_t(0);
  tile_gemm(acc, smem, k_begin, k_end, la, false, lb, p_kfast);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  acc_t* out = ws + (int64_t)blockIdx.z * C_out * C_in;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t co = co0 + ty + 16 * i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t ci = ci0 + tx + 16 * j;
      if (co < C_out && ci < C_in) out[co * C_in + ci] = acc[i][j];
    }
  }
}

// dW[co][ci] = the splits summed in a fixed order; in eval, + rstd gamma dbeta shift[ci]:
// the partials summed dy (p - shift)^T and dW needs dy p^T. (In training sum_m dy = 0, so
// the shift drops out exactly.)
template <typename acc_t>
__global__ void dw_reduce_kernel(const acc_t* ws, int64_t splits, int C_out, int C_in, acc_t* dw,
                                 const acc_t* shift, const acc_t* var, const acc_t* gamma, const acc_t* dbeta,
                                 acc_t eps) {
  const int64_t numel = (int64_t)C_out * C_in;
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= numel) return;
  acc_t s = 0;
  for (int64_t z = 0; z < splits; ++z) s += ws[z * numel + i];
  if (shift != nullptr) {
    const int64_t co = i / C_in;
    const acc_t scale = gamma != nullptr ? inv_sqrt(var[co] + eps) * gamma[co] : inv_sqrt(var[co] + eps);
    s += scale * dbeta[co] * shift[i - co * C_in];
  }
  dw[i] = s;
}

// shift[c] = mean of x[0, c, :s, :s] (0 where not finite, so a NaN or Inf stays where it
// is instead of spreading); hires_kernels/shapes.py's data_shift.
template <typename scalar_t, typename acc_t>
__global__ void shift_kernel(PooledView<scalar_t, acc_t> x, acc_t* shift) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= x.C) return;
  const int hs = min(x.s, x.H), ws = min(x.s, x.W);
  acc_t sum = 0;
  for (int h = 0; h < hs; ++h)
    for (int w = 0; w < ws; ++w) sum += static_cast<acc_t>(x.src[(int64_t)c * x.sc + h * x.sh + w * x.sw]);
  const acc_t m = sum / static_cast<acc_t>(hs * ws);
  shift[c] = isfinite(m) ? m : acc_t(0);
}

// ---------------------------------------------------------------------------------
// Host side.

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename scalar_t, typename acc_t>
PooledView<scalar_t, acc_t> pooled_view(const at::Tensor& src, int Ho, int Wo, int s, const acc_t* shift) {
  PooledView<scalar_t, acc_t> v;
  v.src = src.data_ptr<scalar_t>();
  v.sn = src.stride(0); v.sc = src.stride(1); v.sh = src.stride(2); v.sw = src.stride(3);
  v.C = (int)src.size(1); v.H = (int)src.size(2); v.W = (int)src.size(3);
  v.Ho = Ho; v.Wo = Wo; v.s = s;
  v.M = src.size(0) * (int64_t)Ho * Wo;
  v.shift = shift;
  v.dst = nullptr;
  v.dn = v.dc = v.dh = v.dw = 0;
  return v;
}

template <typename scalar_t, typename acc_t>
Act<scalar_t, acc_t> act_view(const at::Tensor& t) {
  if (!t.defined()) return Act<scalar_t, acc_t>{nullptr, 0, 0, 0, 0};
  return Act<scalar_t, acc_t>{const_cast<scalar_t*>(t.data_ptr<scalar_t>()), t.stride(0), t.stride(1),
                              t.stride(2), t.stride(3)};
}

template <typename acc_t>
acc_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<acc_t>() : nullptr;
}

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

ForwardResult projection_cuda(const at::Tensor& x_, const at::Tensor& weight_,
                              const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
                              const std::optional<at::Tensor>& running_mean_,
                              const std::optional<at::Tensor>& running_var_,
                              const std::optional<at::Tensor>& residual, int64_t stride, bool ceil_mode,
                              bool training, double momentum, double eps) {
  const at::Tensor& running_mean = hires::value_or_undefined(running_mean_);
  const at::Tensor& running_var = hires::value_or_undefined(running_var_);
  hires::check_forward(x_, weight_, hires::value_or_undefined(bn_weight), hires::value_or_undefined(bn_bias),
                       running_mean, running_var, hires::value_or_undefined(residual), stride, ceil_mode, training,
                       eps);
  TORCH_CHECK(x_.is_cuda(), "projection (cuda): x must be a CUDA tensor");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto no_autocast = hires::no_autocast();
  const c10::cuda::CUDAGuard device_guard(x_.device());
  const hires::Prepared a = hires::prepare_forward(x_, weight_, hires::value_or_undefined(bn_weight),
                                                   hires::value_or_undefined(bn_bias),
                                                   hires::value_or_undefined(residual));
  const at::Tensor& x = a.x;
  const int64_t N = x.size(0), C_in = x.size(1), H = x.size(2), W = x.size(3), C_out = a.weight.size(0);
  const int64_t Ho = pooled_size(H, stride, ceil_mode), Wo = pooled_size(W, stride, ceil_mode);
  const int64_t M = N * Ho * Wo;
  const auto aopt = a.weight.options();

  at::Tensor out = at::empty({N, C_out, Ho, Wo}, x.options().memory_format(a.format));
  at::Tensor pooled = stride > 1 ? at::empty({N, C_in, Ho, Wo}, x.options().memory_format(a.format)) : x.new_empty({0});
  // The backward recomputes y from the pooled input: no conv output is kept.
  const at::Tensor no_y = a.weight.new_empty({0});
  at::Tensor shift = at::empty({C_in}, aopt), mean = at::empty({C_out}, aopt), var = at::empty({C_out}, aopt);
  // The kernels update running statistics of the accumulation dtype in place; others
  // (another dtype, a strided view) go through ATen after the kernels.
  const bool stats_in_kernel = training && running_mean.defined() && running_mean.is_contiguous() &&
                               running_var.is_contiguous() && running_mean.scalar_type() == a.acc &&
                               running_var.scalar_type() == a.acc;
  at::Tensor eval_mean, eval_var;
  if (!training) {
    eval_mean = running_mean.detach().to(a.acc).contiguous();
    eval_var = running_var.detach().to(a.acc).contiguous();
  }

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t tiles_m = cdiv(M, T), tiles_co = cdiv(C_out, T);
  TORCH_CHECK(tiles_m <= INT32_MAX && tiles_co <= 65535, "projection (cuda): problem too large for the grid");
  const dim3 grid((unsigned)tiles_m, (unsigned)tiles_co);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "projection_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    YTileArgs<scalar_t, acc_t> k{};
    k.p = pooled_view<scalar_t, acc_t>(x, (int)Ho, (int)Wo, (int)stride, shift.data_ptr<acc_t>());
    shift_kernel<scalar_t, acc_t><<<(unsigned)cdiv(C_in, FIN_THREADS), FIN_THREADS, 0, stream>>>(k.p, shift.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (stride > 1) {
      k.p.dst = pooled.data_ptr<scalar_t>();
      k.p.dn = pooled.stride(0); k.p.dc = pooled.stride(1); k.p.dh = pooled.stride(2); k.p.dw = pooled.stride(3);
    }
    k.p_cfast = x.stride(1) == 1 && C_in > 1;
    k.weight = a.weight.data_ptr<acc_t>();
    k.C_in = (int)C_in; k.C_out = (int)C_out; k.Ho = (int)Ho; k.Wo = (int)Wo; k.M = M;
    k.gamma = ptr_or_null<acc_t>(a.bn_weight);
    k.beta = ptr_or_null<acc_t>(a.bn_bias);
    k.eps = static_cast<acc_t>(eps);
    k.training = training;
    k.out = act_view<scalar_t, acc_t>(out);
    k.residual = act_view<scalar_t, acc_t>(a.residual);
    k.act_cfast = out.stride(1) == 1 && C_out > 1;
    k.write_pooled = stride > 1;  // by the first pass over x

    if (training) {
      at::Tensor part = at::empty({2, tiles_m, C_out}, aopt);
      k.part0 = part[0].data_ptr<acc_t>();
      k.part1 = part[1].data_ptr<acc_t>();
      y_tile_kernel<scalar_t, acc_t, FWD_STATS><<<grid, NT, 0, stream>>>(k);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      fwd_finalize_kernel<acc_t><<<(unsigned)C_out, FIN_THREADS, 0, stream>>>(
          k.part0, k.part1, tiles_m, M, (int)C_out, mean.data_ptr<acc_t>(), var.data_ptr<acc_t>(), k.weight,
          k.p.shift, (int)C_in, stats_in_kernel ? running_mean.data_ptr<acc_t>() : nullptr,
          stats_in_kernel ? running_var.data_ptr<acc_t>() : nullptr, static_cast<acc_t>(momentum));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      k.write_pooled = false;
      k.mean = mean.data_ptr<acc_t>();
      k.var = var.data_ptr<acc_t>();
    } else {
      k.mean = eval_mean.data_ptr<acc_t>();
      k.var = eval_var.data_ptr<acc_t>();
      k.eval_shift = k.p.shift;
      k.mean_out = mean.data_ptr<acc_t>();
      k.var_out = var.data_ptr<acc_t>();
    }
    y_tile_kernel<scalar_t, acc_t, FWD_APPLY><<<grid, NT, 0, stream>>>(k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (training && running_mean.defined() && !stats_in_kernel) {
    hires::update_running_stat(running_mean, mean + at::mv(a.weight, shift), momentum);
    hires::update_running_stat(running_var, var * (static_cast<double>(M) / static_cast<double>(M - 1)), momentum);
  }
  return {out, pooled, no_y, shift, mean, var};
}

BackwardResult projection_backward_cuda(const at::Tensor& grad_out_, const at::Tensor& saved_, const at::Tensor& y,
                                        const at::Tensor& shift, const at::Tensor& weight_,
                                        const std::optional<at::Tensor>& bn_weight_, const at::Tensor& mean,
                                        const at::Tensor& var, int64_t stride, bool ceil_mode, int64_t in_h,
                                        int64_t in_w, bool training, double eps) {
  const at::Tensor& bn_weight = hires::value_or_undefined(bn_weight_);
  hires::check_backward(grad_out_, saved_, y, shift, weight_, bn_weight, mean, var, stride, ceil_mode, in_h, in_w,
                        training);
  TORCH_CHECK(grad_out_.is_cuda(), "projection_backward (cuda): grad_out must be a CUDA tensor");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto no_autocast = hires::no_autocast();
  const c10::cuda::CUDAGuard device_guard(grad_out_.device());
  const auto fmt = hires::saved_memory_format(saved_);
  const auto acc = hires::accumulation_dtype(grad_out_.scalar_type());
  const at::Tensor grad_out = grad_out_.detach().contiguous(fmt), saved = saved_.detach().contiguous(fmt);
  const at::Tensor weight = weight_.detach().reshape({weight_.size(0), weight_.size(1)}).to(acc).contiguous();
  const at::Tensor gamma = bn_weight.defined() ? bn_weight.detach().to(acc).contiguous() : at::Tensor();
  const at::Tensor mean_c = mean.contiguous(), var_c = var.contiguous(), shift_c = shift.contiguous();
  const int64_t N = grad_out.size(0), C_out = grad_out.size(1), Ho = grad_out.size(2), Wo = grad_out.size(3);
  const int64_t C_in = weight.size(1);
  const int64_t M = N * Ho * Wo;
  const auto aopt = weight.options();

  at::Tensor grad_x = at::empty({N, C_in, in_h, in_w}, grad_out.options().memory_format(fmt));
  at::Tensor dweight = at::empty({C_out, C_in}, aopt);
  at::Tensor dgamma = at::empty({C_out}, aopt);
  at::Tensor dbeta = at::empty({C_out}, aopt);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t tiles_m = cdiv(M, T), tiles_co = cdiv(C_out, T), tiles_ci = cdiv(C_in, T);
  TORCH_CHECK(tiles_m <= INT32_MAX && tiles_co <= 65535 && tiles_ci <= 65535,
              "projection_backward (cuda): problem too large for the grid");

  // dW split-K: enough blocks to fill the GPU, at least 256 positions per split.
  int device_sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&device_sms, cudaDevAttrMultiProcessorCount, grad_out.get_device()));
  const int64_t want = std::max<int64_t>(1, cdiv(2 * (int64_t)device_sms, tiles_co * tiles_ci));
  const int64_t splits_cap = std::min<int64_t>(cdiv(M, 256), 65535);
  const int64_t chunk = cdiv(cdiv(M, std::max<int64_t>(1, std::min(want, splits_cap))), BK) * BK;
  const int64_t splits = cdiv(M, chunk);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "projection_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Stride > 1 saved the already-shifted pooled input; stride 1 saved x itself.
    const acc_t* sub = stride == 1 ? shift_c.data_ptr<acc_t>() : nullptr;
    YTileArgs<scalar_t, acc_t> k{};
    k.p = pooled_view<scalar_t, acc_t>(saved, (int)Ho, (int)Wo, 1, sub);
    k.p_cfast = saved.stride(1) == 1 && C_in > 1;
    k.weight = weight.data_ptr<acc_t>();
    k.C_in = (int)C_in; k.C_out = (int)C_out; k.Ho = (int)Ho; k.Wo = (int)Wo; k.M = M;
    k.mean = mean_c.data_ptr<acc_t>();
    k.var = var_c.data_ptr<acc_t>();
    k.gamma = ptr_or_null<acc_t>(gamma);
    k.eps = static_cast<acc_t>(eps);
    k.training = training;
    k.grad = act_view<scalar_t, acc_t>(grad_out);
    k.act_cfast = grad_out.stride(1) == 1 && C_out > 1;
    const dim3 grid((unsigned)tiles_m, (unsigned)tiles_co);

    // B1 + B2: dbeta = sum g, dgamma = sum g * yhat.
    at::Tensor part = at::empty({2, tiles_m, C_out}, aopt);
    k.part0 = part[0].data_ptr<acc_t>();
    k.part1 = part[1].data_ptr<acc_t>();
    y_tile_kernel<scalar_t, acc_t, BWD_STATS><<<grid, NT, 0, stream>>>(k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    bwd_finalize_kernel<acc_t><<<(unsigned)C_out, FIN_THREADS, 0, stream>>>(
        k.part0, k.part1, tiles_m, (int)C_out, dbeta.data_ptr<acc_t>(), dgamma.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    // B3: dy [M][C_out] in acc_t.
    at::Tensor dy = at::empty({M, C_out}, aopt);
    k.dbeta = dbeta.data_ptr<acc_t>();
    k.dgamma = dgamma.data_ptr<acc_t>();
    k.dy = dy.data_ptr<acc_t>();
    y_tile_kernel<scalar_t, acc_t, BWD_DY><<<grid, NT, 0, stream>>>(k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    // B4: dp = dy W scattered to grad_x.
    dp_scatter_kernel<scalar_t, acc_t><<<dim3((unsigned)tiles_m, (unsigned)tiles_ci), NT, 0, stream>>>(
        k.dy, k.weight, (int)C_in, (int)C_out, M, (int)Ho, (int)Wo, (int)in_h, (int)in_w, (int)stride,
        act_view<scalar_t, acc_t>(grad_x), grad_x.stride(1) == 1 && C_in > 1);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    // B5 + B6: dW = dy^T p, split over m, fixed-order reduction (+ eval's shift term).
    at::Tensor ws = at::empty({splits, C_out, C_in}, aopt);
    dw_partial_kernel<scalar_t, acc_t><<<dim3((unsigned)tiles_co, (unsigned)tiles_ci, (unsigned)splits), NT, 0, stream>>>(
        k.dy, k.p, /*p_kfast=*/saved.stride(1) != 1 || C_in == 1, (int)C_in, (int)C_out, M, chunk,
        ws.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dw_reduce_kernel<acc_t><<<(unsigned)cdiv(C_out * C_in, 256), 256, 0, stream>>>(
        ws.data_ptr<acc_t>(), splits, (int)C_out, (int)C_in, dweight.data_ptr<acc_t>(),
        training ? nullptr : shift_c.data_ptr<acc_t>(), k.var, k.gamma, k.dbeta, k.eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_x, dweight.view(weight_.sizes()), dgamma, dbeta};
}

}  // namespace hires_cuda

TORCH_LIBRARY_IMPL(hires, CUDA, m) {
  m.impl("projection", &hires_cuda::projection_cuda);
  m.impl("projection_backward", &hires_cuda::projection_backward_cuda);
}
