// CPU kernels of the fused projection: avgpool -> 1x1 conv -> BatchNorm (-> + residual).
// Contract and math: hires_kernels/backends/reference.py.
//
// Design. The M = N*H'*W' output positions are cut into tiles of whole pooled rows
// (units (n, oh), possibly spanning images); each thread owns a run of tiles and small
// buffers in the accumulation dtype, laid out like the activations (channel-major [C, T]
// for NCHW, position-major [T, C] for NHWC) so loads and stores stream. Pooling (with the
// shift subtracted per element) happens while loading x; the GEMMs run on the tile
// buffers through at::mm (MKL/oneDNN), single-threaded inside the parallel region.
//
// Forward, training: pass 1 pools x into the tile (writes `pooled`), computes y = W p into
//   `y` (float32/64, kept for backward as eager keeps its conv output) and the tile's
//   per-channel mean and centred sum of squares (two-pass, in cache), Chan-merged per tile
//   and across threads. Pass 2 streams out = (y - mean) * gamma * rstd + beta (+ residual).
// Forward, eval: one tile pass (pool, GEMM, normalise), with the given statistics.
// Backward: pass 1 streams g and y for dbeta = sum g and dgamma = rstd sum g (y - mean).
//   Pass 2, per tile: dy (affine in g and y), then two GEMMs, dW += dy p^T and dp = W^T dy,
//   and dp is scattered to grad_x with the pooling rule. Eval has no y: the tile works on g
//   (dy = scale g) and dgamma = rstd (rowdot(W, sum g p^T) - mean dbeta).
//   With y kept, fwd + bwd costs 3 GEMMs of C_out x C_in x M, as eager's conv does.
#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <vector>

#include "../projection_args.h"
#include "../pool_source.h"

// Innermost loops run over contiguous channels or columns.
#define HIRES_SIMD _Pragma("omp simd")

namespace {

// Geometry shared by the passes: images of C channels, H x W input, Ho x Wo pooled;
// tiles of `rows` pooled rows (units u = n * Ho + oh).
struct Tiling {
  int64_t n, ho, wo, rows, units, ntiles, tmax;
  Tiling(int64_t n_, int64_t ho_, int64_t wo_) : n(n_), ho(ho_), wo(wo_) {
    units = n * ho;
    rows = std::max<int64_t>(1, 256 / wo);  // ~256 positions: GEMMs near peak, buffers in L2
    const int64_t want = 2 * at::get_num_threads();
    while (rows > 1 && (units + rows - 1) / rows < want) rows /= 2;
    ntiles = (units + rows - 1) / rows;
    tmax = rows * wo;
  }
  int64_t u0(int64_t tile) const { return tile * rows; }
  int64_t u1(int64_t tile) const { return std::min(units, (tile + 1) * rows); }
};

// A tile buffer holding a logical [C, T] matrix: element (c, t) at c * ld + t
// (channel-major, NCHW) or t * ld + c (position-major, NHWC).
template <bool CL>
inline int64_t at_(int64_t c, int64_t t, int64_t ld) { return CL ? t * ld + c : c * ld + t; }

// A logical row-major matrix: element (i, j) at p[j * ld + i] when t, else p[i * ld + j].
template <typename T>
struct Mat {
  const T* p;
  int64_t ld;
  bool t;
  Mat tr() const { return {p, ld, !t}; }
};

// Logical C[m, n] = A[m, k] B[k, n] + beta C (beta 0 or 1) through the CPU kernel directly
// (at::cpu::*_out: no dispatcher round trip; raw-pointer views, no allocation).
// Below kSmallGemm multiply-adds a plain loop is faster than a BLAS call's fixed cost
// (tensor views, checks, dispatch inside the library: microseconds), which would otherwise
// decide the time of a call on small layers.
constexpr int64_t kSmallGemm = 4096;

template <typename T>
void gemm(int64_t m, int64_t n, int64_t k, Mat<T> A, Mat<T> B, T beta, T* C, int64_t ldc, bool ct) {
  if (m * n * k <= kSmallGemm) {
    const int64_t ai = A.t ? 1 : A.ld, ak = A.t ? A.ld : 1, bk = B.t ? 1 : B.ld, bj = B.t ? B.ld : 1;
    const int64_t ci = ct ? 1 : ldc, cj = ct ? ldc : 1;
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        T sum = beta == T(0) ? T(0) : C[i * ci + j * cj];
        for (int64_t q = 0; q < k; ++q) sum += A.p[i * ai + q * ak] * B.p[q * bk + j * bj];
        C[i * ci + j * cj] = sum;
      }
    }
    return;
  }
  const auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* p, int64_t r, int64_t c, int64_t ld, bool t) {
    return at::from_blob(const_cast<T*>(p), {r, c}, t ? at::IntArrayRef{1, ld} : at::IntArrayRef{ld, 1}, opt);
  };
  at::Tensor a = view(A.p, m, k, A.ld, A.t), b = view(B.p, k, n, B.ld, B.t), c = view(C, m, n, ldc, ct);
  if (beta == T(0))
    at::cpu::mm_out(c, a, b);
  else
    at::cpu::addmm_out(c, c, a, b);
  TORCH_CHECK(c.const_data_ptr() == C, "hires (cpu): internal error, GEMM output moved");
}

// Tile buffers of the calling thread, kept from one call to the next. Buffers allocated and
// freed on every call let glibc hand their pages back to the OS, and the next call faults
// them in again, zero-filled: on 2 cores that cost up to 1 ms of kernel time per fwd+bwd.
enum Scratch { kPooledTile, kOutTile, kGradInTile, kGradWeight, kNumScratch };
// Tile buffers are bounded (C x ~256 positions); the dW partials (threads x C_out x C_in)
// are kept only up to this size, so a thread's scratch stays small on wide layers.
constexpr size_t kMaxKeptPartials = size_t(8) << 20;

template <typename T>
T* thread_scratch(Scratch slot, int64_t n) {
  struct Block {
    void* p = nullptr;
    size_t bytes = 0;
    ~Block() { std::free(p); }
  };
  thread_local std::array<Block, kNumScratch> blocks;
  Block& b = blocks[slot];
  const size_t need = (static_cast<size_t>(n) * sizeof(T) + 63) / 64 * 64;
  if (b.bytes < need) {
    std::free(b.p);
    b.bytes = 0;
    b.p = std::aligned_alloc(64, need);
    TORCH_CHECK(b.p != nullptr, "hires (cpu): cannot allocate a ", need, "-byte tile buffer");
    b.bytes = need;
  }
  return static_cast<T*>(b.p);
}

// Loads pooled-and-shifted activations of units [u0, u1) of `src` ([N, C, H, W], this
// layout) into channels [c_off, c_off + C) of a tile buffer:
//   dst(c, t) = mean over the window of (src - shift[c]).
// `vrow` is scratch of W elements.
template <bool CL, typename scalar_t, typename acc_t>
void load_tile(const scalar_t* src, int64_t C, int64_t H, int64_t W, int64_t s, const acc_t* shift,
               int64_t ho, int64_t wo, int64_t u0, int64_t u1, acc_t* dst, int64_t ld, int64_t c_off,
               acc_t* vrow) {
  if (!CL) {
    for (int64_t c = 0; c < C; ++c) {
      const acc_t sh = shift[c];
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t n = u / ho, oh = u % ho;
        acc_t* out = dst + (c + c_off) * ld + (u - u0) * wo;
        const scalar_t* plane = src + (n * C + c) * H * W;
        if (s == 1) {
          const scalar_t* row = plane + oh * W;
          HIRES_SIMD
          for (int64_t j = 0; j < W; ++j) out[j] = static_cast<acc_t>(row[j]) - sh;
          continue;
        }
        const int64_t i0 = oh * s, i1 = std::min(i0 + s, H);
        const int64_t wlen = std::min(wo * s, W);
        {
          const scalar_t* row = plane + i0 * W;
          HIRES_SIMD
          for (int64_t j = 0; j < wlen; ++j) vrow[j] = static_cast<acc_t>(row[j]) - sh;
        }
        for (int64_t i = i0 + 1; i < i1; ++i) {
          const scalar_t* row = plane + i * W;
          HIRES_SIMD
          for (int64_t j = 0; j < wlen; ++j) vrow[j] += static_cast<acc_t>(row[j]) - sh;
        }
        const int64_t ch = i1 - i0;
        if (s == 2 && ch == 2 && 2 * wo <= W) {  // full 2x2 windows: sum / 4 == sum * 0.25 exactly
          HIRES_SIMD
          for (int64_t ow = 0; ow < wo; ++ow) out[ow] = (vrow[2 * ow] + vrow[2 * ow + 1]) * acc_t(0.25);
          continue;
        }
        for (int64_t ow = 0; ow < wo; ++ow) {
          const int64_t j0 = ow * s, j1 = std::min(j0 + s, W);
          acc_t sum = 0;
          for (int64_t j = j0; j < j1; ++j) sum += vrow[j];
          out[ow] = sum / static_cast<acc_t>(ch * (j1 - j0));
        }
      }
    }
  } else {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t n = u / ho, oh = u % ho;
      const int64_t i0 = oh * s, i1 = std::min(i0 + s, H);
      for (int64_t ow = 0; ow < wo; ++ow) {
        acc_t* out = dst + ((u - u0) * wo + ow) * ld + c_off;
        const int64_t j0 = ow * s, j1 = std::min(j0 + s, W);
        bool first = true;
        for (int64_t i = i0; i < i1; ++i) {
          for (int64_t j = j0; j < j1; ++j) {
            const scalar_t* px = src + ((n * H + i) * W + j) * C;
            if (first) {
              HIRES_SIMD
              for (int64_t c = 0; c < C; ++c) out[c] = static_cast<acc_t>(px[c]) - shift[c];
              first = false;
            } else {
              HIRES_SIMD
              for (int64_t c = 0; c < C; ++c) out[c] += static_cast<acc_t>(px[c]) - shift[c];
            }
          }
        }
        if (s > 1) {
          const acc_t cnt = static_cast<acc_t>((i1 - i0) * (j1 - j0));
          HIRES_SIMD
          for (int64_t c = 0; c < C; ++c) out[c] /= cnt;
        }
      }
    }
  }
}

// out[j] = (in[j] - m) * k + b (+ res[j]) for j < n: subtract the mean before scaling.
template <typename scalar_t, typename acc_t>
inline void normalize_row(scalar_t* __restrict__ out, const acc_t* __restrict__ in, const scalar_t* __restrict__ res,
                          int64_t n, acc_t m, acc_t k, acc_t b) {
  if (res) {
    HIRES_SIMD
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<scalar_t>((in[j] - m) * k + b + static_cast<acc_t>(res[j]));
  } else {
    HIRES_SIMD
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<scalar_t>((in[j] - m) * k + b);
  }
}

// The same across the channels of one position (NHWC): out[c] = (in[c] - m[c]) * k[c] + b[c] (+ res[c]).
template <typename scalar_t, typename acc_t>
inline void normalize_pixel(scalar_t* __restrict__ out, const acc_t* __restrict__ in, const scalar_t* __restrict__ res,
                            int64_t C, const acc_t* m, const acc_t* k, const acc_t* b) {
  if (res) {
    HIRES_SIMD
    for (int64_t c = 0; c < C; ++c) out[c] = static_cast<scalar_t>((in[c] - m[c]) * k[c] + b[c] + static_cast<acc_t>(res[c]));
  } else {
    HIRES_SIMD
    for (int64_t c = 0; c < C; ++c) out[c] = static_cast<scalar_t>((in[c] - m[c]) * k[c] + b[c]);
  }
}

// Writes units [u0, u1) of dst ([N, C, Ho, Wo], this layout):
//   dst = (buf(c, t) - mu[c]) * sc[c] + bt[c] (+ res), or the plain buffer when mu is null.
template <bool CL, typename scalar_t, typename acc_t>
void store_tile(scalar_t* dst, const scalar_t* res, int64_t C, int64_t ho, int64_t wo, int64_t u0, int64_t u1,
                const acc_t* buf, int64_t ld, const acc_t* mu, const acc_t* sc, const acc_t* bt) {
  if (!CL) {
    for (int64_t c = 0; c < C; ++c) {
      const acc_t m = mu ? mu[c] : acc_t(0), k = mu ? sc[c] : acc_t(1), b = mu ? bt[c] : acc_t(0);
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t n = u / ho, oh = u % ho;
        const int64_t off = ((n * C + c) * ho + oh) * wo;
        normalize_row(dst + off, buf + c * ld + (u - u0) * wo, res ? res + off : nullptr, wo, m, k, b);
      }
    }
  } else {
    const int64_t t_n = (u1 - u0) * wo;
    for (int64_t t = 0; t < t_n; ++t) {
      const acc_t* in = buf + t * ld;
      const int64_t off = (u0 * wo + t) * C;
      scalar_t* out = dst + off;
      if (!mu) {
        HIRES_SIMD
        for (int64_t c = 0; c < C; ++c) out[c] = static_cast<scalar_t>(in[c]);
      } else {
        normalize_pixel(out, in, res ? res + off : nullptr, C, mu, sc, bt);
      }
    }
  }
}

// grad_x for units [u0, u1): each pooled position spreads dp / |window| over its window;
// rows and columns outside every window (floor mode) get 0. Each element is written once:
// every row of a window holds the same values, so the first is built and copied.
template <bool CL, typename scalar_t, typename acc_t>
void scatter_tile(scalar_t* dx, int64_t C, int64_t H, int64_t W, int64_t s, int64_t ho, int64_t wo, int64_t u0,
                  int64_t u1, const acc_t* buf, int64_t ld) {
  const int64_t wcov = std::min(wo * s, W);  // columns inside some window
  // r0 is row i0 of a window (len elements; rows len apart): copy it to rows up to i1 and
  // zero rows i1 .. iend, which lie below every window.
  auto finish_rows = [](scalar_t* r0, int64_t len, int64_t i0, int64_t i1, int64_t iend) {
    for (int64_t i = i0 + 1; i < i1; ++i) std::copy(r0, r0 + len, r0 + (i - i0) * len);
    std::fill(r0 + (i1 - i0) * len, r0 + (iend - i0) * len, scalar_t(0));
  };
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t n = u / ho, oh = u % ho;
    const int64_t i0 = oh * s, i1 = std::min(i0 + s, H), iend = (oh == ho - 1) ? H : i1;
    const acc_t inv_h = acc_t(1) / static_cast<acc_t>(i1 - i0);
    if (!CL) {
      for (int64_t c = 0; c < C; ++c) {
        const acc_t* in = buf + c * ld + (u - u0) * wo;
        scalar_t* r0 = dx + ((n * C + c) * H + i0) * W;
        if (s == 1) {
          HIRES_SIMD
          for (int64_t j = 0; j < W; ++j) r0[j] = static_cast<scalar_t>(in[j]);
        } else if (s == 2 && wcov == 2 * wo) {  // 2-column windows: k is a power of two
          const acc_t k = inv_h * acc_t(0.5);
          HIRES_SIMD
          for (int64_t ow = 0; ow < wo; ++ow) {
            const scalar_t v = static_cast<scalar_t>(in[ow] * k);
            r0[2 * ow] = v;
            r0[2 * ow + 1] = v;
          }
        } else {
          for (int64_t ow = 0; ow < wo; ++ow) {
            const int64_t j0 = ow * s, j1 = std::min(j0 + s, W);
            std::fill(r0 + j0, r0 + j1, static_cast<scalar_t>(in[ow] * inv_h / static_cast<acc_t>(j1 - j0)));
          }
        }
        std::fill(r0 + wcov, r0 + W, scalar_t(0));
        finish_rows(r0, W, i0, i1, iend);
      }
    } else {
      scalar_t* r0 = dx + (n * H + i0) * W * C;
      for (int64_t ow = 0; ow < wo; ++ow) {
        const acc_t* in = buf + ((u - u0) * wo + ow) * ld;
        const int64_t j0 = ow * s, j1 = std::min(j0 + s, W);
        const acc_t k = inv_h / static_cast<acc_t>(j1 - j0);
        scalar_t* px = r0 + j0 * C;
        if (s == 1) {
          HIRES_SIMD
          for (int64_t c = 0; c < C; ++c) px[c] = static_cast<scalar_t>(in[c]);
        } else {
          HIRES_SIMD
          for (int64_t c = 0; c < C; ++c) px[c] = static_cast<scalar_t>(in[c] * k);
        }
        for (int64_t j = j0 + 1; j < j1; ++j) std::copy(px, px + C, r0 + j * C);
      }
      std::fill(r0 + wcov * C, r0 + W * C, scalar_t(0));
      finish_rows(r0, W * C, i0, i1, iend);
    }
  }
}

// ------------------------------------------------------------------------------------
// Forward

// Returns (out, pooled, y). gamma and beta: [C_out] arrays (ones / zeros without affine
// parameters). mean and var: [C_out], read in eval (the running statistics moved by the
// shift) and written in training (the batch statistics).
template <typename scalar_t, bool CL, typename acc_t = at::opmath_type<scalar_t>>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const at::Tensor& x, const acc_t* shp, const at::Tensor& weight, const acc_t* gamma, const acc_t* btp,
    const at::Tensor& residual, int64_t s, bool ceil_mode, bool training, double eps, const at::Tensor& mean,
    const at::Tensor& var) {
  const int64_t N = x.size(0), C_in = x.size(1), H = x.size(2), W = x.size(3), C_out = weight.size(0);
  const int64_t Ho = pooled_size(H, s, ceil_mode), Wo = pooled_size(W, s, ceil_mode);
  const auto fmt = hires::format_of(CL);
  const auto aopt = weight.options();
  at::Tensor out = at::empty({N, C_out, Ho, Wo}, x.options().memory_format(fmt));
  at::Tensor pooled = s > 1 ? at::empty({N, C_in, Ho, Wo}, x.options().memory_format(fmt)) : at::empty({0}, x.options());
  at::Tensor y = training ? at::empty({N, C_out, Ho, Wo}, aopt.memory_format(fmt)) : at::empty({0}, aopt);
  const Tiling tl(N, Ho, Wo);
  const int64_t M = N * Ho * Wo;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* poolp = s > 1 ? pooled.mutable_data_ptr<scalar_t>() : nullptr;
  const int64_t ldp = CL ? C_in : tl.tmax, ldy = CL ? C_out : tl.tmax;
  const Mat<acc_t> Wm{weight.const_data_ptr<acc_t>(), C_in, false};
  const scalar_t* resp = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* outp = out.mutable_data_ptr<scalar_t>();
  acc_t* mup = mean.mutable_data_ptr<acc_t>();
  acc_t* vp = var.mutable_data_ptr<acc_t>();
  std::vector<acc_t> scale(C_out);
  acc_t* scp = scale.data();

  if (!training) {
    // One pass: pool x into the tile (writing `pooled`), y = W p, normalise (+ residual).
    for (int64_t c = 0; c < C_out; ++c) scp[c] = static_cast<acc_t>(gamma[c] / std::sqrt(static_cast<double>(vp[c]) + eps));
    at::parallel_for(0, tl.ntiles, 1, [&](int64_t b, int64_t e) {
      std::vector<acc_t> vrow(W);
      acc_t* P = thread_scratch<acc_t>(kPooledTile, C_in * tl.tmax);
      acc_t* Y = thread_scratch<acc_t>(kOutTile, C_out * tl.tmax);
      for (int64_t tile = b; tile < e; ++tile) {
        const int64_t u0 = tl.u0(tile), u1 = tl.u1(tile), T = (u1 - u0) * Wo;
        load_tile<CL>(xp, C_in, H, W, s, shp, Ho, Wo, u0, u1, P, ldp, 0, vrow.data());
        if (poolp) store_tile<CL, scalar_t, acc_t>(poolp, nullptr, C_in, Ho, Wo, u0, u1, P, ldp, nullptr, nullptr, nullptr);
        gemm<acc_t>(C_out, T, C_in, Wm, Mat<acc_t>{P, ldp, CL}, acc_t(0), Y, ldy, CL);
        store_tile<CL, scalar_t, acc_t>(outp, resp, C_out, Ho, Wo, u0, u1, Y, ldy, mup, scp, btp);
      }
    });
    return {out, pooled, y};
  }

  // Pass 1: pool x into the tile (writing `pooled`), y = W p into `y`, per-tile mean and
  // centred sum of squares (two-pass, in cache), Chan-merged per thread, then across threads.
  acc_t* yp = y.mutable_data_ptr<acc_t>();
  const int nthreads = at::get_num_threads();
  // Sums of squares in double, as ATen's CPU batch_norm: (y - mean)^2 of float32 y may
  // overflow float32 (x * 1e30) where the normalised output is still finite.
  std::vector<int64_t> cnt(nthreads, 0);
  std::vector<double> mean_acc(nthreads * C_out, 0.0), m2_acc(nthreads * C_out, 0.0);
  at::parallel_for(0, tl.ntiles, 1, [&](int64_t b, int64_t e) {
    const int tid = at::get_thread_num();
    std::vector<acc_t> vrow(W), mu(C_out);
    std::vector<double> m2(C_out);
    acc_t* P = thread_scratch<acc_t>(kPooledTile, C_in * tl.tmax);
    acc_t* Yb = CL ? nullptr : thread_scratch<acc_t>(kOutTile, C_out * tl.tmax);
    double* mean_a = mean_acc.data() + tid * C_out;
    double* m2_a = m2_acc.data() + tid * C_out;
    for (int64_t tile = b; tile < e; ++tile) {
      const int64_t u0 = tl.u0(tile), u1 = tl.u1(tile), T = (u1 - u0) * Wo;
      load_tile<CL>(xp, C_in, H, W, s, shp, Ho, Wo, u0, u1, P, ldp, 0, vrow.data());
      if (poolp) store_tile<CL, scalar_t, acc_t>(poolp, nullptr, C_in, Ho, Wo, u0, u1, P, ldp, nullptr, nullptr, nullptr);
      // Position-major y tiles are a block of rows of `y`: the GEMM writes them in place.
      acc_t* Y = CL ? yp + u0 * Wo * C_out : Yb;
      gemm<acc_t>(C_out, T, C_in, Wm, Mat<acc_t>{P, ldp, CL}, acc_t(0), Y, ldy, CL);
      if (!CL) store_tile<CL, acc_t, acc_t>(yp, nullptr, C_out, Ho, Wo, u0, u1, Y, ldy, nullptr, nullptr, nullptr);
      const acc_t inv_t = acc_t(1) / static_cast<acc_t>(T);
      acc_t* __restrict__ mup_ = mu.data();
      double* __restrict__ m2p_ = m2.data();
      if (!CL) {
        for (int64_t c = 0; c < C_out; ++c) {
          const acc_t* row = Y + c * ldy;
          acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t t = 0; t < T; ++t) sum += row[t];
          const acc_t m = sum * inv_t;
          double sq = 0;
#pragma omp simd reduction(+ : sq)
          for (int64_t t = 0; t < T; ++t) sq += static_cast<double>(row[t] - m) * static_cast<double>(row[t] - m);
          mup_[c] = m;
          m2p_[c] = sq;
        }
      } else {
        std::fill(mu.begin(), mu.end(), acc_t(0));
        std::fill(m2.begin(), m2.end(), 0.0);
        for (int64_t t = 0; t < T; ++t) {
          const acc_t* __restrict__ yr = Y + t * ldy;
          HIRES_SIMD
          for (int64_t c = 0; c < C_out; ++c) mup_[c] += yr[c];
        }
        HIRES_SIMD
        for (int64_t c = 0; c < C_out; ++c) mup_[c] *= inv_t;
        for (int64_t t = 0; t < T; ++t) {
          const acc_t* __restrict__ yr = Y + t * ldy;
          HIRES_SIMD
          for (int64_t c = 0; c < C_out; ++c) {
            const double d = static_cast<double>(yr[c] - mup_[c]);
            m2p_[c] += d * d;
          }
        }
      }
      // Chan merge (n_a, mean_a, M2_a) + (T, mu, m2).
      const int64_t na = cnt[tid], nn = na + T;
      const double fb = static_cast<double>(T) / static_cast<double>(nn);
      const double fab = static_cast<double>(na) * fb;
      for (int64_t c = 0; c < C_out; ++c) {
        const double delta = mu[c] - mean_a[c];
        m2_a[c] += m2[c] + delta * delta * fab;
        mean_a[c] += delta * fb;
      }
      cnt[tid] = nn;
    }
  });
  // Threads' partials merged in thread order (deterministic for a thread count).
  int64_t na = 0;
  std::vector<double> mean_d(C_out, 0.0), m2_d(C_out, 0.0);
  for (int i = 0; i < nthreads; ++i) {
    if (cnt[i] == 0) continue;
    const int64_t nb = cnt[i], nn = na + nb;
    const double fab = static_cast<double>(na) * nb / nn, fb = static_cast<double>(nb) / nn;
    for (int64_t c = 0; c < C_out; ++c) {
      const double delta = mean_acc[i * C_out + c] - mean_d[c];
      m2_d[c] += m2_acc[i * C_out + c] + delta * delta * fab;
      mean_d[c] += delta * fb;
    }
    na = nn;
  }
  TORCH_CHECK(na == M, "hires (cpu): internal error, statistics cover ", na, " of ", M, " positions");
  for (int64_t c = 0; c < C_out; ++c) {
    const double v = m2_d[c] / static_cast<double>(M);
    mup[c] = static_cast<acc_t>(mean_d[c]);
    vp[c] = static_cast<acc_t>(v);
    scp[c] = static_cast<acc_t>(gamma[c] / std::sqrt(v + eps));
  }

  // Pass 2, streaming: out = (y - mean) * scale + beta (+ residual).
  const int64_t HW = Ho * Wo;
  if (!CL) {
    at::parallel_for(0, N * C_out, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t c = i % C_out;
        normalize_row(outp + i * HW, yp + i * HW, resp ? resp + i * HW : nullptr, HW, mup[c], scp[c], btp[c]);
      }
    });
  } else {
    at::parallel_for(0, M, 64, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        normalize_pixel(outp + i * C_out, yp + i * C_out, resp ? resp + i * C_out : nullptr, C_out, mup, scp, btp);
      }
    });
  }
  return {out, pooled, y};
}

// shift[c] = mean of x's first pooling window in channel c (0 where not finite, so a NaN
// or Inf stays where it is instead of spreading); hires_kernels/shapes.py's data_shift.
template <typename scalar_t, typename acc_t>
void data_shift(const at::Tensor& x, int64_t s, acc_t* shift) {
  const int64_t C = x.size(1), hs = std::min(s, x.size(2)), ws = std::min(s, x.size(3));
  const int64_t sc = x.stride(1), sh = x.stride(2), sw = x.stride(3);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  for (int64_t c = 0; c < C; ++c) {
    acc_t sum = 0;
    for (int64_t i = 0; i < hs; ++i)
      for (int64_t j = 0; j < ws; ++j) sum += static_cast<acc_t>(xp[c * sc + i * sh + j * sw]);
    const acc_t m = sum / static_cast<acc_t>(hs * ws);
    shift[c] = std::isfinite(m) ? m : acc_t(0);
  }
}

// w_shift[c] = sum_k W[c, k] shift[k]: the statistics of W (p - shift) are those of W p
// moved by it.
template <typename acc_t>
std::vector<acc_t> weight_times(const at::Tensor& weight, const acc_t* shift) {
  const int64_t C_out = weight.size(0), C_in = weight.size(1);
  const acc_t* w = weight.const_data_ptr<acc_t>();
  std::vector<acc_t> r(C_out);
  for (int64_t c = 0; c < C_out; ++c) {
    acc_t sum = 0;
    for (int64_t k = 0; k < C_in; ++k) sum += w[c * C_in + k] * shift[k];
    r[c] = sum;
  }
  return r;
}

// The momentum update of F.batch_norm, with the unbiased batch variance.
template <typename acc_t>
void update_running_stats(const at::Tensor& running_mean, const at::Tensor& running_var, const acc_t* mean,
                          const std::vector<acc_t>& w_shift, const acc_t* var, int64_t M, double momentum) {
  const int64_t C = running_mean.numel();
  const double unbias = static_cast<double>(M) / static_cast<double>(M - 1);
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  if (running_mean.is_contiguous() && running_var.is_contiguous() && running_mean.scalar_type() == acc &&
      running_var.scalar_type() == acc) {
    acc_t* rm = running_mean.mutable_data_ptr<acc_t>();
    acc_t* rv = running_var.mutable_data_ptr<acc_t>();
    const acc_t keep = static_cast<acc_t>(1 - momentum), take = static_cast<acc_t>(momentum);
    for (int64_t c = 0; c < C; ++c) {
      rm[c] = rm[c] * keep + (mean[c] + w_shift[c]) * take;
      rv[c] = rv[c] * keep + static_cast<acc_t>(var[c] * unbias) * take;
    }
    return;
  }
  const auto opt = at::TensorOptions().dtype(acc);
  std::vector<acc_t> m(C), v(C);
  for (int64_t c = 0; c < C; ++c) {
    m[c] = mean[c] + w_shift[c];
    v[c] = static_cast<acc_t>(var[c] * unbias);
  }
  hires::update_running_stat(running_mean, at::from_blob(m.data(), {C}, opt), momentum);
  hires::update_running_stat(running_var, at::from_blob(v.data(), {C}, opt), momentum);
}

using ForwardResult = hires::ProjectionResult;

ForwardResult projection_cpu(const at::Tensor& x_, const at::Tensor& weight_, const c10::optional<at::Tensor>& bn_weight,
                             const c10::optional<at::Tensor>& bn_bias, const c10::optional<at::Tensor>& running_mean_,
                             const c10::optional<at::Tensor>& running_var_, const c10::optional<at::Tensor>& residual_,
                             int64_t stride, bool ceil_mode, bool training, double momentum, double eps) {
  const at::Tensor& running_mean = hires::value_or_undefined(running_mean_);
  const at::Tensor& running_var = hires::value_or_undefined(running_var_);
  hires::check_forward(x_, weight_, hires::value_or_undefined(bn_weight), hires::value_or_undefined(bn_bias),
                       running_mean, running_var, hires::value_or_undefined(residual_), stride, ceil_mode, training,
                       eps);
  at::AutoDispatchBelowADInplaceOrView guard;
  const auto no_autocast = hires::no_autocast();
  // Worker threads do not inherit the dispatch guard: they touch raw pointers and
  // views made from them only, never a tensor that may carry autograd state.
  const hires::Prepared a = hires::prepare_forward(x_, weight_, hires::value_or_undefined(bn_weight),
                                                   hires::value_or_undefined(bn_bias),
                                                   hires::value_or_undefined(residual_));
  const bool cl = a.format == at::MemoryFormat::ChannelsLast;
  const int64_t C_in = a.x.size(1), C_out = a.weight.size(0);
  const auto aopt = a.weight.options();
  at::Tensor shift = at::empty({C_in}, aopt), mean = at::empty({C_out}, aopt), var = at::empty({C_out}, aopt);
  ForwardResult result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.x.scalar_type(), "projection_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* shp = shift.mutable_data_ptr<acc_t>();
    data_shift<scalar_t>(a.x, stride, shp);
    const std::vector<acc_t> w_shift = weight_times(a.weight, shp);
    const std::vector<acc_t> ones(a.bn_weight.defined() ? 0 : C_out, acc_t(1)), zeros(a.bn_bias.defined() ? 0 : C_out);
    const acc_t* gamma = a.bn_weight.defined() ? a.bn_weight.const_data_ptr<acc_t>() : ones.data();
    const acc_t* beta = a.bn_bias.defined() ? a.bn_bias.const_data_ptr<acc_t>() : zeros.data();
    if (!training) {
      // The running statistics of W p, moved into the frame of W (p - shift).
      const at::Tensor rm = running_mean.to(a.acc).contiguous(), rv = running_var.to(a.acc).contiguous();
      const acc_t *rmp = rm.const_data_ptr<acc_t>(), *rvp = rv.const_data_ptr<acc_t>();
      acc_t *mp = mean.mutable_data_ptr<acc_t>(), *vp = var.mutable_data_ptr<acc_t>();
      for (int64_t c = 0; c < C_out; ++c) {
        mp[c] = rmp[c] - w_shift[c];
        vp[c] = rvp[c];
      }
    }
    auto impl = cl ? forward_impl<scalar_t, true> : forward_impl<scalar_t, false>;
    auto [out, pooled, y] = impl(a.x, shp, a.weight, gamma, beta, a.residual, stride, ceil_mode, training, eps, mean, var);
    if (training && running_mean.defined()) {
      update_running_stats(running_mean, running_var, mean.const_data_ptr<acc_t>(), w_shift,
                           var.const_data_ptr<acc_t>(), out.numel() / C_out, momentum);
    }
    result = {out, pooled, y, shift, mean, var};
  });
  return result;
}

// ------------------------------------------------------------------------------------
// Backward

// Calls f(n, oh0, oh1, t0) for each run of units [u0, u1) inside one image (contiguous
// per channel in NCHW); t0 is the run's first position within the tile.
template <typename F>
void for_each_image_run(int64_t ho, int64_t wo, int64_t u0, int64_t u1, F f) {
  for (int64_t u = u0; u < u1;) {
    const int64_t n = u / ho, e = std::min(u1, (n + 1) * ho);
    f(n, u % ho, u % ho + (e - u), (u - u0) * wo);
    u = e;
  }
}

// Per channel, s0[c] = sum_m g and, when y is given, s1[c] = sum_m g (y - mean); per-thread
// partials summed in thread order.
template <bool CL, typename scalar_t, typename acc_t>
void grad_sums(const scalar_t* g, const acc_t* y, const acc_t* mu, int64_t N, int64_t C, int64_t HW, acc_t* sum0,
               acc_t* sum1) {
  const int nthreads = at::get_num_threads();
  std::vector<acc_t> part(nthreads * 2 * C, acc_t(0));
  acc_t* partp = part.data();
  if (!CL) {
    at::parallel_for(0, N * C, 8, [&](int64_t b, int64_t e) {
      acc_t* ps = partp + at::get_thread_num() * 2 * C;
      for (int64_t i = b; i < e; ++i) {
        const int64_t c = i % C;
        const scalar_t* __restrict__ gr = g + i * HW;
        acc_t s0 = 0, s1 = 0;
#pragma omp simd reduction(+ : s0)
        for (int64_t j = 0; j < HW; ++j) s0 += static_cast<acc_t>(gr[j]);
        if (y) {
          const acc_t* __restrict__ yr = y + i * HW;
          const acc_t m = mu[c];
#pragma omp simd reduction(+ : s1)
          for (int64_t j = 0; j < HW; ++j) s1 += static_cast<acc_t>(gr[j]) * (yr[j] - m);
        }
        ps[c] += s0;
        ps[C + c] += s1;
      }
    });
  } else {
    constexpr int64_t kBlock = 256;  // positions summed locally before joining the thread's sums
    at::parallel_for(0, N * HW, kBlock, [&](int64_t b, int64_t e) {
      acc_t* __restrict__ ps = partp + at::get_thread_num() * 2 * C;
      std::vector<acc_t> l0(C), l1(C);
      acc_t* __restrict__ s0 = l0.data();
      acc_t* __restrict__ s1 = l1.data();
      for (int64_t m0 = b; m0 < e; m0 += kBlock) {
        std::fill(l0.begin(), l0.end(), acc_t(0));
        std::fill(l1.begin(), l1.end(), acc_t(0));
        for (int64_t m = m0; m < std::min(e, m0 + kBlock); ++m) {
          const scalar_t* __restrict__ gr = g + m * C;
          HIRES_SIMD
          for (int64_t c = 0; c < C; ++c) s0[c] += static_cast<acc_t>(gr[c]);
          if (y) {
            const acc_t* __restrict__ yr = y + m * C;
            HIRES_SIMD
            for (int64_t c = 0; c < C; ++c) s1[c] += static_cast<acc_t>(gr[c]) * (yr[c] - mu[c]);
          }
        }
        HIRES_SIMD
        for (int64_t c = 0; c < C; ++c) {
          ps[c] += s0[c];
          ps[C + c] += s1[c];
        }
      }
    });
  }
  for (int64_t c = 0; c < C; ++c) {
    acc_t a = 0, b = 0;
    for (int i = 0; i < nthreads; ++i) {
      a += partp[i * 2 * C + c];
      b += partp[i * 2 * C + C + c];
    }
    sum0[c] = a;
    sum1[c] = b;
  }
}

// The tile E(c, t) of units [u0, u1): dy = al[c] g + be[c] (y - mu[c]) + ga[c] when y is
// given (training), else g.
template <bool CL, typename scalar_t, typename acc_t>
void dy_tile(const scalar_t* g, const acc_t* y, int64_t C, int64_t ho, int64_t wo, int64_t u0, int64_t u1,
             const acc_t* al, const acc_t* be, const acc_t* ga, const acc_t* mu, acc_t* E, int64_t ld) {
  const int64_t HW = ho * wo;
  if (!CL) {
    for (int64_t c = 0; c < C; ++c) {
      for_each_image_run(ho, wo, u0, u1, [&](int64_t n, int64_t oh0, int64_t oh1, int64_t t0) {
        const int64_t off = (n * C + c) * HW + oh0 * wo, len = (oh1 - oh0) * wo;
        const scalar_t* __restrict__ gr = g + off;
        acc_t* __restrict__ er = E + c * ld + t0;
        if (y) {
          const acc_t* __restrict__ yr = y + off;
          const acc_t a = al[c], k = be[c], m = mu[c], d = ga[c];
          HIRES_SIMD
          for (int64_t j = 0; j < len; ++j) er[j] = a * static_cast<acc_t>(gr[j]) + k * (yr[j] - m) + d;
        } else {
          HIRES_SIMD
          for (int64_t j = 0; j < len; ++j) er[j] = static_cast<acc_t>(gr[j]);
        }
      });
    }
  } else {
    const int64_t T = (u1 - u0) * wo;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t off = (u0 * wo + t) * C;
      const scalar_t* __restrict__ gr = g + off;
      acc_t* __restrict__ er = E + t * ld;
      if (y) {
        const acc_t* __restrict__ yr = y + off;
        HIRES_SIMD
        for (int64_t c = 0; c < C; ++c) er[c] = al[c] * static_cast<acc_t>(gr[c]) + be[c] * (yr[c] - mu[c]) + ga[c];
      } else {
        HIRES_SIMD
        for (int64_t c = 0; c < C; ++c) er[c] = static_cast<acc_t>(gr[c]);
      }
    }
  }
}

// Returns (grad_x, dW as a [C_out, C_in] matrix in dw's storage, dgamma, dbeta). shift:
// subtracted from `saved` as it is loaded (stride 1, where saved is x), else null.
template <typename scalar_t, bool CL, typename acc_t = at::opmath_type<scalar_t>>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& g, const at::Tensor& saved, const at::Tensor& y, const acc_t* shift, const at::Tensor& weight,
    const acc_t* gamma, const acc_t* mean, const acc_t* var, int64_t s, int64_t H, int64_t W, bool training,
    double eps, const at::Tensor& dw) {
  const int64_t N = g.size(0), C_out = g.size(1), Ho = g.size(2), Wo = g.size(3), C_in = weight.size(1);
  const auto aopt = weight.options();
  const int64_t M = N * Ho * Wo;
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  const acc_t* yp = training ? y.const_data_ptr<acc_t>() : nullptr;
  const acc_t* wp = weight.const_data_ptr<acc_t>();
  std::vector<acc_t> rstd(C_out), scale(C_out);
  for (int64_t c = 0; c < C_out; ++c) {
    rstd[c] = static_cast<acc_t>(1 / std::sqrt(static_cast<double>(var[c]) + eps));
    scale[c] = rstd[c] * gamma[c];
  }

  // Pass 1: dbeta = sum g and, in training, dgamma = rstd sum g (y - mean).
  at::Tensor dbeta = at::empty({C_out}, aopt), dgamma = at::empty({C_out}, aopt);
  acc_t* dbp = dbeta.mutable_data_ptr<acc_t>();
  acc_t* dgp = dgamma.mutable_data_ptr<acc_t>();
  grad_sums<CL>(gp, yp, mean, N, C_out, Ho * Wo, dbp, dgp);
  // Pass 2 works on E = dy (training) or g (eval): acc += E p^T and dp = Wd^T E, with
  // Wd = W (training) or diag(scale) W (eval, where dy = scale g).
  std::vector<acc_t> al, be, ga, Wd;
  if (training) {
    al.resize(C_out), be.resize(C_out), ga.resize(C_out);
    for (int64_t c = 0; c < C_out; ++c) {
      dgp[c] *= rstd[c];
      al[c] = scale[c];
      be[c] = -scale[c] * rstd[c] * dgp[c] / static_cast<acc_t>(M);
      ga[c] = -scale[c] * dbp[c] / static_cast<acc_t>(M);
    }
  } else {
    Wd.resize(C_out * C_in);
    for (int64_t c = 0; c < C_out; ++c)
      for (int64_t k = 0; k < C_in; ++k) Wd[c * C_in + k] = wp[c * C_in + k] * scale[c];
  }

  at::Tensor grad_x = at::empty({N, C_in, H, W}, g.options().memory_format(hires::format_of(CL)));
  const Tiling tl(N, Ho, Wo);
  const int64_t lde = CL ? C_out : tl.tmax, ldp = CL ? C_in : tl.tmax;
  const scalar_t* sp = saved.const_data_ptr<scalar_t>();
  const std::vector<acc_t> no_shift(shift ? 0 : C_in, acc_t(0));
  const acc_t* shp = shift ? shift : no_shift.data();
  const acc_t *alp = al.data(), *bep = be.data(), *gap = ga.data();
  const Mat<acc_t> WdT = Mat<acc_t>{training ? wp : Wd.data(), C_in, false}.tr();
  // Per-thread partial sums of dW, in the calling thread's scratch (only this call uses it)
  // or, when large, a buffer of this call. A thread's first tile overwrites its partial
  // (beta 0); a thread without tiles zeroes it.
  const int nthreads = at::get_num_threads();
  const int64_t dw_elems = nthreads * C_out * C_in;
  const at::Tensor dw_buf = dw_elems * sizeof(acc_t) > kMaxKeptPartials ? at::empty({dw_elems}, aopt) : at::Tensor();
  acc_t* partial_dw = dw_buf.defined() ? dw_buf.mutable_data_ptr<acc_t>() : thread_scratch<acc_t>(kGradWeight, dw_elems);
  std::vector<char> has_tiles(nthreads, 0);
  scalar_t* dxp = grad_x.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, tl.ntiles, 1, [&](int64_t b, int64_t e) {
    std::vector<acc_t> vrow(W);
    acc_t* E = thread_scratch<acc_t>(kOutTile, C_out * tl.tmax);
    acc_t* P = thread_scratch<acc_t>(kPooledTile, C_in * tl.tmax);
    acc_t* D = thread_scratch<acc_t>(kGradInTile, C_in * tl.tmax);
    const int tid = at::get_thread_num();
    acc_t* A = partial_dw + tid * C_out * C_in;
    for (int64_t tile = b; tile < e; ++tile) {
      const int64_t u0 = tl.u0(tile), u1 = tl.u1(tile), T = (u1 - u0) * Wo;
      dy_tile<CL>(gp, yp, C_out, Ho, Wo, u0, u1, alp, bep, gap, mean, E, lde);
      load_tile<CL>(sp, C_in, Ho, Wo, 1, shp, Ho, Wo, u0, u1, P, ldp, 0, vrow.data());
      gemm<acc_t>(C_out, C_in, T, Mat<acc_t>{E, lde, CL}, Mat<acc_t>{P, ldp, !CL}, acc_t(has_tiles[tid] ? 1 : 0), A,
                  C_in, false);
      has_tiles[tid] = 1;
      gemm<acc_t>(C_in, T, C_out, WdT, Mat<acc_t>{E, lde, CL}, acc_t(0), D, ldp, CL);
      scatter_tile<CL>(dxp, C_in, H, W, s, Ho, Wo, u0, u1, static_cast<const acc_t*>(D), ldp);
    }
  });
  // dW = the threads' partials summed in thread order; eval: A = sum g p^T, so
  // dgamma = rstd (rowdot(W, A) - mean dbeta) and dW = diag(scale) A.
  acc_t* dwp = dw.mutable_data_ptr<acc_t>();
  const int64_t CC = C_out * C_in;
  std::fill(dwp, dwp + CC, acc_t(0));
  for (int i = 0; i < nthreads; ++i) {
    if (!has_tiles[i]) continue;
    const acc_t* part = partial_dw + i * CC;
    for (int64_t j = 0; j < CC; ++j) dwp[j] += part[j];
  }
  if (!training) {
    for (int64_t c = 0; c < C_out; ++c) {
      acc_t dot = 0;
      for (int64_t k = 0; k < C_in; ++k) dot += wp[c * C_in + k] * dwp[c * C_in + k];
      dgp[c] = rstd[c] * (dot - mean[c] * dbp[c]);
      for (int64_t k = 0; k < C_in; ++k) dwp[c * C_in + k] *= scale[c];
    }
  }
  return {grad_x, dgamma, dbeta};
}

hires::ProjectionBackwardResult projection_backward_cpu(
    const at::Tensor& grad_out_, const at::Tensor& saved_, const at::Tensor& y_, const at::Tensor& shift_,
    const at::Tensor& weight_, const c10::optional<at::Tensor>& bn_weight_, const at::Tensor& mean_,
    const at::Tensor& var_, int64_t stride, bool ceil_mode, int64_t in_h, int64_t in_w, bool training, double eps) {
  const at::Tensor& bn_weight = hires::value_or_undefined(bn_weight_);
  hires::check_backward(grad_out_, saved_, y_, shift_, weight_, bn_weight, mean_, var_, stride, ceil_mode, in_h, in_w,
                        training);
  at::AutoDispatchBelowADInplaceOrView guard;
  const auto no_autocast = hires::no_autocast();
  const auto fmt = hires::saved_memory_format(saved_);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const auto acc = hires::accumulation_dtype(grad_out_.scalar_type());
  const int64_t C_out = weight_.size(0), C_in = weight_.size(1);
  const at::Tensor weight = weight_.reshape({C_out, C_in}).to(acc).contiguous();
  const at::Tensor grad_out = grad_out_.contiguous(fmt), saved = saved_.contiguous(fmt);
  const at::Tensor shift = shift_.contiguous(), mean = mean_.contiguous(), var = var_.contiguous();
  at::Tensor y;
  if (training) {
    TORCH_CHECK_VALUE(y_.numel(), "projection_backward (cpu): training backward needs y, the conv output the cpu "
                                  "forward returned");
    y = y_.contiguous(fmt);
  }
  const at::Tensor gamma_t = bn_weight.defined() ? bn_weight.to(acc).contiguous() : at::Tensor();
  // grad_weight in weight's own shape and dtype-of-accumulation, written as [C_out, C_in].
  at::Tensor grad_w = at::empty(weight_.sizes(), weight.options());
  hires::ProjectionBackwardResult result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_out.scalar_type(), "projection_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<acc_t> ones(gamma_t.defined() ? 0 : C_out, acc_t(1));
    const acc_t* gamma = gamma_t.defined() ? gamma_t.const_data_ptr<acc_t>() : ones.data();
    const acc_t* shp = shift.const_data_ptr<acc_t>();
    auto impl = cl ? backward_impl<scalar_t, true> : backward_impl<scalar_t, false>;
    // Stride > 1 saved the already-shifted pooled input; stride 1 saved x itself.
    auto [grad_x, grad_gamma, grad_beta] =
        impl(grad_out, saved, y, stride == 1 ? shp : nullptr, weight, gamma, mean.const_data_ptr<acc_t>(),
             var.const_data_ptr<acc_t>(), stride, in_h, in_w, training, eps, grad_w);
    if (!training) {
      // dW = sum_m dy (p + shift)^T: the kernels summed dy p^T with the shifted p. (In
      // training sum_m dy = 0, so the shift drops out exactly.)
      acc_t* dwp = grad_w.mutable_data_ptr<acc_t>();
      const acc_t *vp = var.const_data_ptr<acc_t>(), *dbp = grad_beta.const_data_ptr<acc_t>();
      for (int64_t c = 0; c < C_out; ++c) {
        const acc_t k = static_cast<acc_t>(gamma[c] / std::sqrt(static_cast<double>(vp[c]) + eps)) * dbp[c];
        for (int64_t j = 0; j < C_in; ++j) dwp[c * C_in + j] += k * shp[j];
      }
    }
    result = {grad_x, grad_w, grad_gamma, grad_beta};
  });
  return result;
}


// ------------------------------------------------------------------------------------
// hires::pool_source and its backward (csrc/pool_source.h).
//
// Both work on blocks of S input rows of one image, S the largest stride: the block holds
// whole windows of every stride, so each pass reads (or writes) its part of x once. Sums
// of a stride's windows are sums of the next finer stride's window sums (the strides
// nest); an average divides by the elements its window covers, as avg_pool2d does without
// padding. Buffers of a block are laid out like the activations: [C, T] for NCHW, [T, C]
// for NHWC, T the block's positions of one stride.

// The strides (checked: > 1, distinct, nested), ascending; their pooled sizes.
struct Levels {
  std::vector<int64_t> s, ho, wo;
  Levels(at::IntArrayRef strides, int64_t H, int64_t W, bool ceil_mode) : s(strides.begin(), strides.end()) {
    std::sort(s.begin(), s.end());
    for (int64_t v : s) {
      ho.push_back(pooled_size(H, v, ceil_mode));
      wo.push_back(pooled_size(W, v, ceil_mode));
    }
  }
  int64_t block() const { return s.back(); }
  // Level i's rows [row0, row0 + rows(i, R)) in block R.
  int64_t row0(size_t i, int64_t R) const { return R * (block() / s[i]); }
  int64_t rows(size_t i, int64_t R) const {
    return std::max<int64_t>(0, std::min(ho[i], (R + 1) * (block() / s[i])) - row0(i, R));
  }
  size_t index(int64_t v) const { return std::lower_bound(s.begin(), s.end(), v) - s.begin(); }
};

// Elements a window of stride s starting at o * s covers along a side of length n.
inline int64_t covered(int64_t o, int64_t s, int64_t n) { return std::min(s, n - o * s); }

template <typename scalar_t, bool CL, typename acc_t = at::opmath_type<scalar_t>>
void pool_levels(const at::Tensor& x, const Levels& lv, std::vector<at::Tensor>& out) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), S = lv.block();
  const int64_t blocks = (H + S - 1) / S, L = lv.s.size();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  std::vector<scalar_t*> op(L);
  for (int64_t i = 0; i < L; ++i) op[i] = out[i].mutable_data_ptr<scalar_t>();
  at::parallel_for(0, N * blocks, 1, [&](int64_t b, int64_t e) {
    std::vector<std::vector<acc_t>> sums(L);
    for (int64_t item = b; item < e; ++item) {
      const int64_t n = item / blocks, R = item % blocks;
      for (int64_t i = 0; i < L; ++i) {
        const int64_t s = lv.s[i], Wo = lv.wo[i], r0 = lv.row0(i, R), T = lv.rows(i, R) * Wo;
        std::vector<acc_t>& buf = sums[i];
        buf.assign(C * T, acc_t(0));
        acc_t* __restrict__ B = buf.data();
        if (i == 0) {  // from x: each element read once
          const int64_t h0 = r0 * s, h1 = std::min(H, (r0 + lv.rows(0, R)) * s), w1 = std::min(W, Wo * s);
          for (int64_t h = h0; h < h1; ++h) {
            const int64_t tr = (h / s - r0) * Wo;
            if (CL) {
              const scalar_t* __restrict__ xr = xp + ((n * H + h) * W) * C;
              for (int64_t w = 0; w < w1; ++w) {
                acc_t* __restrict__ Bt = B + (tr + w / s) * C;
                const scalar_t* __restrict__ xc = xr + w * C;
                HIRES_SIMD
                for (int64_t c = 0; c < C; ++c) Bt[c] += static_cast<acc_t>(xc[c]);
              }
            } else {
              for (int64_t c = 0; c < C; ++c) {
                const scalar_t* __restrict__ xr = xp + ((n * C + c) * H + h) * W;
                acc_t* __restrict__ Bc = B + c * T + tr;
                for (int64_t w = 0; w < w1; ++w) Bc[w / s] += static_cast<acc_t>(xr[w]);
              }
            }
          }
        } else {  // from the finer level's sums
          const int64_t q = s / lv.s[i - 1], Wf = lv.wo[i - 1], rf = lv.rows(i - 1, R), Tf = rf * Wf;
          const acc_t* __restrict__ F = sums[i - 1].data();
          for (int64_t lr = 0; lr < rf; ++lr) {
            for (int64_t ow = 0; ow < Wf; ++ow) {
              // In floor mode finer windows may reach past the coarser ones.
              if (lr / q >= lv.rows(i, R) || ow / q >= Wo) continue;
              const int64_t t = (lr / q) * Wo + ow / q, tf = lr * Wf + ow;
              if (CL) {
                HIRES_SIMD
                for (int64_t c = 0; c < C; ++c) B[t * C + c] += F[tf * C + c];
              } else {
                for (int64_t c = 0; c < C; ++c) B[c * T + t] += F[c * Tf + tf];
              }
            }
          }
        }
        // Averages of this level's rows in the block.
        const int64_t Ho = lv.ho[i];
        for (int64_t t = 0; t < T; ++t) {
          const int64_t oh = r0 + t / Wo, ow = t % Wo;
          const acc_t inv = acc_t(1) / static_cast<acc_t>(covered(oh, s, H) * covered(ow, s, W));
          if (CL) {
            scalar_t* __restrict__ o = op[i] + ((n * Ho + oh) * Wo + ow) * C;
            HIRES_SIMD
            for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(B[t * C + c] * inv);
          } else {
            for (int64_t c = 0; c < C; ++c) op[i][((n * C + c) * Ho + oh) * Wo + ow] = static_cast<scalar_t>(B[c * T + t] * inv);
          }
        }
      }
    }
  });
}

std::vector<at::Tensor> pool_source_cpu(const at::Tensor& x_in, at::IntArrayRef strides, bool ceil_mode) {
  hires::check_pool_source(x_in, strides, ceil_mode);
  const auto fmt = hires::memory_format_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const Levels lv(strides, H, W, ceil_mode);
  std::vector<at::Tensor> level_out;
  for (size_t i = 0; i < lv.s.size(); ++i)
    level_out.push_back(at::empty({N, C, lv.ho[i], lv.wo[i]}, x.options().memory_format(fmt)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "pool_source_cpu", [&] {
    (fmt == at::MemoryFormat::ChannelsLast ? pool_levels<scalar_t, true> : pool_levels<scalar_t, false>)(x, lv,
                                                                                                     level_out);
  });
  std::vector<at::Tensor> pooled;
  for (int64_t s : strides) pooled.push_back(level_out[lv.index(s)]);
  return pooled;
}

// grad_x = sum over strides of grads[i] / |window| spread over its windows: the per-element
// value of a window is its own plus its coarser parent's, built from the coarsest level
// down, then written once per element of x (0 outside every window, in floor mode).
template <typename scalar_t, bool CL, typename acc_t = at::opmath_type<scalar_t>>
void unpool_levels(const std::vector<const scalar_t*>& level_grads, const Levels& lv, int64_t N, int64_t C, int64_t H,
                   int64_t W, scalar_t* dx) {
  const int64_t S = lv.block(), blocks = (H + S - 1) / S, L = lv.s.size();
  at::parallel_for(0, N * blocks, 1, [&](int64_t b, int64_t e) {
    std::vector<std::vector<acc_t>> vals(L);
    for (int64_t item = b; item < e; ++item) {
      const int64_t n = item / blocks, R = item % blocks;
      for (int64_t i = L - 1; i >= 0; --i) {
        const int64_t s = lv.s[i], Ho = lv.ho[i], Wo = lv.wo[i], r0 = lv.row0(i, R), T = lv.rows(i, R) * Wo;
        std::vector<acc_t>& buf = vals[i];
        buf.resize(C * T);
        acc_t* __restrict__ V = buf.data();
        const scalar_t* g = level_grads[i];
        for (int64_t t = 0; t < T; ++t) {
          const int64_t oh = r0 + t / Wo, ow = t % Wo;
          const acc_t inv = acc_t(1) / static_cast<acc_t>(covered(oh, s, H) * covered(ow, s, W));
          // The parent window's value, where a coarser level covers this one.
          const acc_t* P = nullptr;
          int64_t tp = 0, Tp = 0;
          if (i + 1 < L) {
            const int64_t q = lv.s[i + 1] / s, Wp = lv.wo[i + 1], lr = (oh - r0) / q, pw = ow / q;
            if (lr < lv.rows(i + 1, R) && pw < Wp) {
              P = vals[i + 1].data();
              tp = lr * Wp + pw;
              Tp = lv.rows(i + 1, R) * Wp;
            }
          }
          if (CL) {
            const scalar_t* __restrict__ gc = g + ((n * Ho + oh) * Wo + ow) * C;
            acc_t* __restrict__ Vt = V + t * C;
            HIRES_SIMD
            for (int64_t c = 0; c < C; ++c) Vt[c] = static_cast<acc_t>(gc[c]) * inv + (P ? P[tp * C + c] : acc_t(0));
          } else {
            for (int64_t c = 0; c < C; ++c)
              V[c * T + t] = static_cast<acc_t>(g[((n * C + c) * Ho + oh) * Wo + ow]) * inv + (P ? P[c * Tp + tp] : acc_t(0));
          }
        }
      }
      const int64_t h0 = R * S, h1 = std::min(H, h0 + S);
      const int64_t s1 = lv.s[0], Wo1 = lv.wo[0], r01 = lv.row0(0, R), rows1 = lv.rows(0, R), T1 = rows1 * Wo1;
      const acc_t* V1 = vals[0].data();
      for (int64_t h = h0; h < h1; ++h) {
        const int64_t lr = h / s1 - r01;
        const bool row_in = lr < rows1;
        if (CL) {
          for (int64_t w = 0; w < W; ++w) {
            scalar_t* __restrict__ o = dx + ((n * H + h) * W + w) * C;
            if (row_in && w / s1 < Wo1) {
              const acc_t* __restrict__ v = V1 + (lr * Wo1 + w / s1) * C;
              HIRES_SIMD
              for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(v[c]);
            } else {
              std::fill(o, o + C, scalar_t(0));
            }
          }
        } else {
          for (int64_t c = 0; c < C; ++c) {
            scalar_t* __restrict__ o = dx + ((n * C + c) * H + h) * W;
            for (int64_t w = 0; w < W; ++w)
              o[w] = static_cast<scalar_t>(row_in && w / s1 < Wo1 ? V1[c * T1 + lr * Wo1 + w / s1] : acc_t(0));
          }
        }
      }
    }
  });
}

at::Tensor pool_source_backward_cpu(at::TensorList grads, at::IntArrayRef strides, bool ceil_mode, int64_t H,
                                    int64_t W, bool channels_last) {
  hires::check_pool_source_backward(grads, strides, ceil_mode, H, W);
  const auto fmt = hires::format_of(channels_last);
  const int64_t N = grads[0].size(0), C = grads[0].size(1);
  const Levels lv(strides, H, W, ceil_mode);
  std::vector<at::Tensor> level(lv.s.size());
  for (size_t t = 0; t < grads.size(); ++t) level[lv.index(strides[t])] = grads[t].contiguous(fmt);
  at::Tensor dx = at::empty({N, C, H, W}, grads[0].options().memory_format(fmt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dx.scalar_type(), "pool_source_backward_cpu", [&] {
    std::vector<const scalar_t*> lp;
    for (const auto& l : level) lp.push_back(l.const_data_ptr<scalar_t>());
    (fmt == at::MemoryFormat::ChannelsLast ? unpool_levels<scalar_t, true> : unpool_levels<scalar_t, false>)(
        lp, lv, N, C, H, W, dx.mutable_data_ptr<scalar_t>());
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(hires, CPU, m) {
  m.impl("projection", &projection_cpu);
  m.impl("projection_backward", &projection_backward_cpu);
  m.impl("pool_source", &pool_source_cpu);
  m.impl("pool_source_backward", &pool_source_backward_cpu);
}
