// CUDA kernels of the fused projection: avgpool_s(x - shift) -> 1x1 conv -> BatchNorm
// (-> + residual), forward and backward. The contract and the math are the docstring
// of hires_kernels/backends/reference.py; this file implements exactly that.
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
// Forward, training (3 launches):
//   F1 y_tile<FWD_STATS>  grid (ceil(M/T), ceil(C_out/T)). A = pooled tile computed
//      from x on load (window sum of x - shift, divided by its valid count), B = W^T.
//      y stays in shared memory; per column a two-pass (mean, M2) over the tile's
//      valid rows -> partials [tiles_m][C_out]. Blocks with blockIdx.y == 0 also
//      write `pooled` (x's dtype/format). Bytes: x read ceil(C_out/T) times (L2 hits
//      after the first), pooled written once (N C_in H' W' e), partials 8 M C_out / T.
//   F2 fwd_finalize       one block per channel merges the partials with Chan's
//      formula in a fixed order (deterministic) -> mean, var (biased). Bytes: partials.
//   F3 y_tile<FWD_APPLY>  same grid; recomputes y exactly as F1, then
//      out = (y - mean) * rstd * gamma + beta (+ residual) in x's dtype/format.
//      Bytes: x again, residual read and out written once (N C_out H' W' e each).
//   The un-normalised y is never written to global memory.
// Forward, eval (1 launch): F3 alone with mean_in/var_in (BN folded into the
//   epilogue's per-channel constants); it also writes `pooled`.
// Backward (p = saved - shift, shift only when given; saved is [N, C_in, H', W']):
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
//      fixed order. Deterministic: no floating-point atomics anywhere.
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

#include "../shapes.h"

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
  const acc_t* mean;              // [C_out]   (APPLY, BWD_*)
  const acc_t* var;               // [C_out]   (APPLY, BWD_*)
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

template <typename acc_t>
__global__ void __launch_bounds__(FIN_THREADS) fwd_finalize_kernel(
    const acc_t* part_mean, const acc_t* part_m2, int64_t tiles, int64_t M, int C_out,
    acc_t* mean_out, acc_t* var_out) {
  __shared__ acc_t sn[FIN_THREADS], sm[FIN_THREADS], s2[FIN_THREADS];
  const int co = blockIdx.x;
  acc_t n = 0, mean = 0, m2 = 0;
  for (int64_t t = threadIdx.x; t < tiles; t += FIN_THREADS) {
    const acc_t cnt = static_cast<acc_t>(min64(T, M - t * T));
    chan_merge(n, mean, m2, cnt, part_mean[t * C_out + co], part_m2[t * C_out + co]);
  }
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
  if (threadIdx.x == 0) {
    mean_out[co] = sm[0];
    var_out[co] = s2[0] / static_cast<acc_t>(M);
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

template <typename acc_t>
__global__ void dw_reduce_kernel(const acc_t* ws, int64_t splits, int64_t numel, acc_t* dw) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= numel) return;
  acc_t s = 0;
  for (int64_t z = 0; z < splits; ++z) s += ws[z * numel + i];
  dw[i] = s;
}

// ---------------------------------------------------------------------------------
// Host side.

at::MemoryFormat memory_format_of(const at::Tensor& t) {  // = hires_kernels.shapes.memory_format_of
  if (t.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (t.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  const auto s = t.strides();
  return (s[1] < s[3] && s[3] <= s[2] && s[2] <= s[0]) ? at::MemoryFormat::ChannelsLast
                                                        : at::MemoryFormat::Contiguous;
}

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
const acc_t* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<acc_t>() : nullptr;
}

void check_param(const std::optional<at::Tensor>& t, const char* name, at::ScalarType acc, int64_t n,
                 const at::Tensor& x) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->scalar_type() == acc, "hires_C (cuda): ", name, " must be ", acc, ", got ", t->scalar_type());
  TORCH_CHECK(t->is_contiguous() && t->numel() == n, "hires_C (cuda): ", name, " must be a contiguous [", n, "]");
  TORCH_CHECK(t->device() == x.device(), "hires_C (cuda): ", name, " is on ", t->device(), " but the activations on ",
              x.device());
}

at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> projection_forward_cuda(
    const at::Tensor& x, const at::Tensor& shift, const at::Tensor& weight,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& mean_in,
    const std::optional<at::Tensor>& var_in, int64_t stride, bool ceil_mode, bool training, double eps) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4, "hires_C (cuda): x must be a 4-D CUDA tensor");
  TORCH_CHECK(stride >= 1, "hires_C (cuda): stride must be >= 1");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = acc_type_of(x.scalar_type());
  const int64_t N = x.size(0), C_in = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == C_in && weight.scalar_type() == acc && weight.is_contiguous() &&
                  weight.device() == x.device(),
              "hires_C (cuda): weight must be a contiguous [C_out, C_in] ", acc, " tensor on ", x.device());
  const int64_t C_out = weight.size(0);
  check_param(shift, "shift", acc, C_in, x);
  check_param(bn_weight, "bn_weight", acc, C_out, x);
  check_param(bn_bias, "bn_bias", acc, C_out, x);
  check_param(mean_in, "mean_in", acc, C_out, x);
  check_param(var_in, "var_in", acc, C_out, x);
  TORCH_CHECK(training || (mean_in.has_value() && var_in.has_value()),
              "hires_C (cuda): mean_in and var_in are required in eval mode");
  const int64_t Ho = pooled_size(H, stride, ceil_mode), Wo = pooled_size(W, stride, ceil_mode);
  const int64_t M = N * Ho * Wo;
  TORCH_CHECK(M > 0, "hires_C (cuda): empty pooled output");
  const auto fmt = memory_format_of(x);
  at::Tensor res;
  if (residual.has_value() && residual->defined()) {
    res = *residual;
    TORCH_CHECK(res.scalar_type() == x.scalar_type() && res.dim() == 4 && res.size(0) == N &&
                    res.size(1) == C_out && res.size(2) == Ho && res.size(3) == Wo && res.device() == x.device(),
                "hires_C (cuda): residual must be [N, C_out, H', W'] like x");
  }

  at::Tensor out = at::empty({N, C_out, Ho, Wo}, x.options().memory_format(fmt));
  at::Tensor pooled = stride > 1 ? at::empty({N, C_in, Ho, Wo}, x.options().memory_format(fmt)) : x.new_empty({0});
  // The backward recomputes y from the pooled input: no conv output is kept.
  const at::Tensor no_y = weight.new_empty({0});
  at::Tensor mean, var;
  if (training) {
    mean = at::empty({C_out}, weight.options());
    var = at::empty({C_out}, weight.options());
  } else {
    mean = mean_in->clone();
    var = var_in->clone();
  }
  if (C_out == 0) return {out, pooled, no_y, mean, var};

  const auto cstream = c10::cuda::getCurrentCUDAStream();
  const cudaStream_t stream = cstream.stream();
  const int64_t tiles_m = cdiv(M, T), tiles_co = cdiv(C_out, T);
  TORCH_CHECK(tiles_m <= INT32_MAX && tiles_co <= 65535, "hires_C (cuda): problem too large for the grid");
  const dim3 grid((unsigned)tiles_m, (unsigned)tiles_co);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hires_projection_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    YTileArgs<scalar_t, acc_t> a{};
    a.p = pooled_view<scalar_t, acc_t>(x, (int)Ho, (int)Wo, (int)stride, shift.data_ptr<acc_t>());
    if (stride > 1) {
      a.p.dst = pooled.data_ptr<scalar_t>();
      a.p.dn = pooled.stride(0); a.p.dc = pooled.stride(1); a.p.dh = pooled.stride(2); a.p.dw = pooled.stride(3);
    }
    a.p_cfast = x.stride(1) == 1 && C_in > 1;
    a.weight = weight.data_ptr<acc_t>();
    a.C_in = (int)C_in; a.C_out = (int)C_out; a.Ho = (int)Ho; a.Wo = (int)Wo; a.M = M;
    a.gamma = opt_ptr<acc_t>(bn_weight);
    a.beta = opt_ptr<acc_t>(bn_bias);
    a.eps = static_cast<acc_t>(eps);
    a.training = training;
    a.out = act_view<scalar_t, acc_t>(out);
    a.residual = act_view<scalar_t, acc_t>(res);
    a.act_cfast = out.stride(1) == 1 && C_out > 1;

    if (training) {
      at::Tensor part = at::empty({2, tiles_m, C_out}, weight.options());
      a.part0 = part[0].data_ptr<acc_t>();
      a.part1 = part[1].data_ptr<acc_t>();
      a.write_pooled = stride > 1;
      y_tile_kernel<scalar_t, acc_t, FWD_STATS><<<grid, NT, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      fwd_finalize_kernel<acc_t><<<(unsigned)C_out, FIN_THREADS, 0, stream>>>(
          a.part0, a.part1, tiles_m, M, (int)C_out, mean.data_ptr<acc_t>(), var.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      a.write_pooled = false;
    } else {
      a.write_pooled = stride > 1;  // the single pass writes pooled
    }
    a.mean = mean.data_ptr<acc_t>();
    a.var = var.data_ptr<acc_t>();
    y_tile_kernel<scalar_t, acc_t, FWD_APPLY><<<grid, NT, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, pooled, no_y, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> projection_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& saved, const std::optional<at::Tensor>& /*y: not kept*/,
    const std::optional<at::Tensor>& shift, const at::Tensor& weight, const std::optional<at::Tensor>& bn_weight,
    const at::Tensor& mean, const at::Tensor& var, int64_t stride, bool ceil_mode, int64_t in_h, int64_t in_w, bool training, double eps) {
  TORCH_CHECK(grad_out.is_cuda() && grad_out.dim() == 4, "hires_C (cuda): grad_out must be a 4-D CUDA tensor");
  TORCH_CHECK(stride >= 1, "hires_C (cuda): stride must be >= 1");
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const auto acc = acc_type_of(grad_out.scalar_type());
  const int64_t N = grad_out.size(0), C_out = grad_out.size(1), Ho = grad_out.size(2), Wo = grad_out.size(3);
  TORCH_CHECK(Ho == pooled_size(in_h, stride, ceil_mode) && Wo == pooled_size(in_w, stride, ceil_mode),
              "hires_C (cuda): grad_out's spatial size does not match in_h, in_w, stride, ceil_mode");
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == C_out && weight.scalar_type() == acc && weight.is_contiguous() &&
                  weight.device() == grad_out.device(),
              "hires_C (cuda): weight must be a contiguous [C_out, C_in] ", acc, " tensor on ", grad_out.device());
  const int64_t C_in = weight.size(1);
  TORCH_CHECK(saved.dim() == 4 && saved.size(0) == N && saved.size(1) == C_in && saved.size(2) == Ho &&
                  saved.size(3) == Wo && saved.scalar_type() == grad_out.scalar_type() &&
                  saved.device() == grad_out.device(),
              "hires_C (cuda): saved must be [N, C_in, H', W'] like grad_out");
  check_param(shift, "shift", acc, C_in, grad_out);
  check_param(bn_weight, "bn_weight", acc, C_out, grad_out);
  check_param(std::optional<at::Tensor>(mean), "mean", acc, C_out, grad_out);
  check_param(std::optional<at::Tensor>(var), "var", acc, C_out, grad_out);
  const int64_t M = N * Ho * Wo;
  TORCH_CHECK(M > 0, "hires_C (cuda): empty grad_out");
  const auto fmt = memory_format_of(grad_out);

  at::Tensor grad_x = at::empty({N, C_in, in_h, in_w}, grad_out.options().memory_format(fmt));
  at::Tensor dweight = at::empty({C_out, C_in}, weight.options());
  at::Tensor dgamma = at::empty({C_out}, weight.options());
  at::Tensor dbeta = at::empty({C_out}, weight.options());
  if (C_out == 0) {
    grad_x.zero_();
    dweight.zero_();
    return {grad_x, dweight, dgamma, dbeta};
  }

  const auto cstream = c10::cuda::getCurrentCUDAStream();
  const cudaStream_t stream = cstream.stream();
  const int64_t tiles_m = cdiv(M, T), tiles_co = cdiv(C_out, T), tiles_ci = cdiv(C_in, T);
  TORCH_CHECK(tiles_m <= INT32_MAX && tiles_co <= 65535 && tiles_ci <= 65535,
              "hires_C (cuda): problem too large for the grid");

  // dW split-K: enough blocks to fill the GPU, at least 256 positions per split.
  int device_sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&device_sms, cudaDevAttrMultiProcessorCount, grad_out.get_device()));
  const int64_t want = std::max<int64_t>(1, cdiv(2 * (int64_t)device_sms, tiles_co * std::max<int64_t>(tiles_ci, 1)));
  const int64_t splits_cap = std::min<int64_t>(cdiv(M, 256), 65535);
  const int64_t chunk = cdiv(cdiv(M, std::max<int64_t>(1, std::min(want, splits_cap))), BK) * BK;
  const int64_t splits = cdiv(M, chunk);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "hires_projection_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    YTileArgs<scalar_t, acc_t> a{};
    a.p = pooled_view<scalar_t, acc_t>(saved, (int)Ho, (int)Wo, 1, opt_ptr<acc_t>(shift));
    a.p_cfast = saved.stride(1) == 1 && C_in > 1;
    a.weight = weight.data_ptr<acc_t>();
    a.C_in = (int)C_in; a.C_out = (int)C_out; a.Ho = (int)Ho; a.Wo = (int)Wo; a.M = M;
    a.write_pooled = false;
    a.mean = mean.data_ptr<acc_t>();
    a.var = var.data_ptr<acc_t>();
    a.gamma = opt_ptr<acc_t>(bn_weight);
    a.eps = static_cast<acc_t>(eps);
    a.training = training;
    a.grad = act_view<scalar_t, acc_t>(grad_out);
    a.act_cfast = grad_out.stride(1) == 1 && C_out > 1;
    const dim3 grid((unsigned)tiles_m, (unsigned)tiles_co);

    // B1 + B2: dbeta = sum g, dgamma = sum g * yhat.
    at::Tensor part = at::empty({2, tiles_m, C_out}, weight.options());
    a.part0 = part[0].data_ptr<acc_t>();
    a.part1 = part[1].data_ptr<acc_t>();
    y_tile_kernel<scalar_t, acc_t, BWD_STATS><<<grid, NT, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    bwd_finalize_kernel<acc_t><<<(unsigned)C_out, FIN_THREADS, 0, stream>>>(
        a.part0, a.part1, tiles_m, (int)C_out, dbeta.data_ptr<acc_t>(), dgamma.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    // B3: dy [M][C_out] in acc_t.
    at::Tensor dy = at::empty({M, C_out}, weight.options());
    a.dbeta = dbeta.data_ptr<acc_t>();
    a.dgamma = dgamma.data_ptr<acc_t>();
    a.dy = dy.data_ptr<acc_t>();
    y_tile_kernel<scalar_t, acc_t, BWD_DY><<<grid, NT, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    if (C_in > 0) {
      // B4: dp = dy W scattered to grad_x.
      dp_scatter_kernel<scalar_t, acc_t><<<dim3((unsigned)tiles_m, (unsigned)tiles_ci), NT, 0, stream>>>(
          a.dy, a.weight, (int)C_in, (int)C_out, M, (int)Ho, (int)Wo, (int)in_h, (int)in_w, (int)stride,
          act_view<scalar_t, acc_t>(grad_x), grad_x.stride(1) == 1 && C_in > 1);
      C10_CUDA_KERNEL_LAUNCH_CHECK();

      // B5 + B6: dW = dy^T p, split over m, fixed-order reduction.
      at::Tensor ws = at::empty({splits, C_out, C_in}, weight.options());
      dw_partial_kernel<scalar_t, acc_t><<<dim3((unsigned)tiles_co, (unsigned)tiles_ci, (unsigned)splits), NT, 0, stream>>>(
          a.dy, a.p, /*p_kfast=*/saved.stride(1) != 1 || C_in == 1, (int)C_in, (int)C_out, M, chunk,
          ws.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int64_t numel = C_out * C_in;
      dw_reduce_kernel<acc_t><<<(unsigned)cdiv(numel, 256), 256, 0, stream>>>(
          ws.data_ptr<acc_t>(), splits, numel, dweight.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_x, dweight, dgamma, dbeta};
}

}  // namespace hires_cuda

TORCH_LIBRARY_IMPL(hires_C, CUDA, m) {
  m.impl("projection_forward", &hires_cuda::projection_forward_cuda);
  m.impl("projection_backward", &hires_cuda::projection_backward_cuda);
}
