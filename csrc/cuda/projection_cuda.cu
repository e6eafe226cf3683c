// CUDA kernels of the fused projection: avgpool_s(x - shift) -> 1x1 conv -> BatchNorm
// (-> + residual), forward and backward, registered as the CUDA kernels of hires::projection
// and hires::projection_backward (csrc/ops.cpp: the schema and what each result means), and
// of hires::pool_source / pool_source_backward, one source pooled once for every projection
// it feeds (kernels PM and PU at the end of the device code; csrc/pool_source.h); the
// projections then run the launches below at stride 1 on their pooled inputs.
// Every per-call step runs on the GPU: the data shift, the statistics, the running-statistics
// update and eval's corrections. The math is that of hires_kernels/backends/reference.py.
//
// Notation: M = N * H' * W' pooled positions (row m <-> (n, ho, wo)), C_in, C_out,
// s = stride, e = bytes per activation element, acc_t = float (double for float64
// activations). Activations are read through their strides (NCHW, channels_last or any
// other order); loops over a tile put consecutive threads along the contiguous dimension.
//
// The building block is the row kernel (rows_kernel<EPI>): a block of 256 threads owns
// tm pooled positions (tm = 64, 32 or 16: see row_launch) and every channel. It loads its
// pooled tile P [tm x C_in] into shared memory once (pooling and the shift applied on
// load, rounded to x's dtype as `pooled` stores it), then loops over the C_out blocks of 64:
// y = P W^T with the weight staged in chunks of 64, then the epilogue. The GEMMs run on the
// tensor cores for bf16/fp16 (mma.sync m16n8k16, fp32 accumulators, the weight rounded to
// x's dtype as eager autocast does); for fp32 on them too (mma.sync m16n8k8 .tf32) where
// torch allows TF32 for float32 matmuls, else as IEEE FMAs on the same fragment layout, as
// for fp64. y never leaves the block. Where 16-row tiles give under 2 waves (the H' = 4
// shapes), a tile is shared by a thread-block cluster of cs = 2 or 4 blocks (sm_90: Share,
// row_launch): each pools 1 / cs of the input channels, copies the rest of P from the others
// (distributed shared memory) and runs 1 / cs of the C_out blocks; BWD_DX gathers dy the same
// way and each block writes its 1 / cs of grad_x's channels. Every byte still moves once.
//
// Bytes per launch (the emulated tests count them, see tests/test_cuda_traffic.py):
// S0 operands_kernel   shift[c] = mean of x[0, c, :s, :s]: C_in s^2 e; for bf16 / fp16 also
//      the weight in x's dtype, the row kernels' GEMM operand (C_out C_in (4 + e), parameters).
// Forward, training (S0 + 3 launches):
//   F1 rows<FWD_STATS>  x read once (N C_in H W e), `pooled` written once (N C_in H' W' e,
//      stride > 1); per column a two-pass (mean, M2) over the tile -> partials, 8 C_out M / tm.
//   F2 fwd_finalize     one warp per channel: Chan's merge of the partials in a fixed order
//      -> mean, var; the running-statistics update (mean + W[c] . shift, unbiased var; ATen
//      does it afterwards when they are strided or not acc_t).
//   F3 rows<FWD_APPLY>  `pooled` (x at stride 1) read once, residual read once, out written
//      once: out = (y - mean) rstd gamma + beta (+ residual).
// Forward, eval (S0 + 1 launch): F3 straight from x (pooling on load, `pooled` written);
//   its per-column prologue takes mean = running_mean - W[c] . shift, var = running_var
//   (the first row tile's block stores them for backward).
// Backward (p = saved - shift at stride 1, where saved is x; p = saved, the shifted pooled
// input, at stride > 1; 5 launches, and for bf16 / fp16 first S0 for the weight alone):
//   B1 rows<BWD_STATS>  saved and grad_out read once: partial sums of g and g yhat.
//   B2 bwd_finalize     fixed-order sums -> dbeta, dgamma.
//   B3 rows<BWD_DX>     saved and grad_out read once: dy = gamma rstd (g - dbeta/M - yhat
//      dgamma/M) (training) or gamma rstd g (eval), rounded to x's dtype as eager's BatchNorm
//      backward returns it, kept in shared memory [tm x C_out] and written once (M C_out e)
//      for dW; then dp = dy W per block of 64 input channels, and each pooled position
//      writes its window of grad_x with dp / count (the last row / column of windows also
//      the zeros of floor mode's trailing pixels): grad_x written once, no memset.
//   B4 dw_partial       grid (C_out/R, C_in/64, splits cz), R = 128 for bf16/fp16 (tensor
//      cores), 64 otherwise: split-K over m of dW = dy^T p, in thread-block clusters of
//      cx x cy tiles on sm_90 (up to 4 x 4) whose blocks share their staged operands through
//      distributed shared memory: dy read ceil(C_in/(64 cy)) times, saved ceil(C_out/(R cx))
//      times (once each on every SPEC shape); where that is under 2 waves, each split in cz
//      z-ranks of the cluster, summed in shared memory; partials 4 splits C_out C_in.
//   B5 dw_reduce        the splits summed in a fixed order, + eval's rstd gamma dbeta shift^T.
// Deterministic: no floating-point atomics anywhere. Every global access goes through
// load_act / store_act / load_param / store_param, which the emulation counts.
//
// Each row block also reads the whole weight per GEMM pass (C_out C_in e bytes, from L2, in
// 16-byte runs where C_in is a multiple of 16 / e).
// The row kernels' shared memory grows with tm (C_in + C_out) e: a block of 16 rows takes up
// to about 6500 channels (C_in + C_out) in bf16, 3300 in fp32, 1400 in fp64; beyond that
// row_launch refuses the call.
//
// Loads and stores move 16-byte runs (VecMode, chosen per tensor by vec_mode): runs of
// channels where the channels come in aligned runs (channels_last, C a multiple of 16 / e:
// the SPEC shapes in bf16), else runs of positions where a tensor at the rows' resolution
// is NCHW with its planes' positions in aligned runs (pooled, saved, residual, out,
// grad_out, and grad_x at stride 1). That covers the input tile, `pooled`, the residual,
// out, grad_out (staged through shared memory in the statistics pass), dy (runs of
// channels only: it is [M][C_out]) and grad_x, the dW kernel's dy and saved, and the
// pooling kernels PM and PU (runs of channels: x, the pooled levels, their gradients and
// grad_x). In NCHW at stride s > 1 the row kernels read x and write grad_x in runs along a
// pixel row that cover whole windows (WINDOWS: s divides 16 / e, W = Wo s and Wo a multiple
// of 16 / (e s): every SPEC shape in bf16).
// Elsewhere element-wise along the contiguous dimension (coalesced): in NCHW, `pooled`
// written at stride > 1 (runs of 16 / s bytes), x and grad_x where the windows do not tile
// 16-byte runs, and every tensor whose planes' positions do not come in 16-byte runs (7x7
// or 14x14 in bf16); the pooling kernels' pooled levels in NCHW (x and grad_x there go in
// 16-byte runs of a row's columns where column_runs allows).
// Tiles staged as they are (`pooled` or the saved input at s = 1 without a shift, grad_out
// in the statistics pass), in runs of channels, go global -> shared by cp.async.
// Not done yet: cp.async pipelines (double buffering); wgmma; dW without the dy round trip
// (folded into B3, the fp32 dW held across a cluster's shared memory over many row tiles:
// bench/results/cuda_traffic.md, "Why dW is not fused into B3 yet"); B4 grids of 2 waves
// on the H' = 4 shapes (at most 16 blocks a cluster: more would need more splits, which add
// fp32 workspace traffic).
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/version.h>

#include <cuda_runtime.h>
#include <cooperative_groups.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../projection_args.h"
#include "../pool_source.h"

namespace hires_cuda {

constexpr int NT = 256;          // threads of a tile block: 8 warps
constexpr int TN = 64;           // GEMM tile columns (channels)
constexpr int KC = 64;           // k depth of one staged chunk of the weight operand
constexpr int KD = 32;           // positions per segment of the dW kernel's GEMM (a block stages 1 to 4 segments a step)
static_assert(KD % 16 == 0, "a dW segment holds whole 16-byte runs of positions and whole mma k-steps");
constexpr int KPAD = 8;          // shared rows padded by 8 elements: conflict-free fragment loads
constexpr int PITCH = TN + 1;    // row of the acc_t result tile
constexpr int FIN_THREADS = 256;

// ---------------------------------------------------------------------------------
// Global memory. Every global access of the kernels goes through these four helpers, so
// that the CPU emulation (tests/cuda_emulation.h) can count the bytes each launch
// requests; on the GPU they are plain loads and stores. "act" is everything whose size
// grows with the batch (activations, their workspaces, per-tile partials); "param" is
// the weight and per-channel vectors (L2-resident, re-read by every block).
#ifndef HIRES_TRAFFIC
#define HIRES_TRAFFIC(kind, address, bytes) ((void)0)
#endif
enum TrafficKind { ACT_READ = 0, ACT_WRITE = 1, PARAM_READ = 2, PARAM_WRITE = 3 };

template <int KIND, typename V>
__device__ __forceinline__ V counted_load(const V* p) {
  HIRES_TRAFFIC(KIND, p, sizeof(V));
  return *p;
}
template <int KIND, typename V>
__device__ __forceinline__ void counted_store(V* p, V v) {
  HIRES_TRAFFIC(KIND, p, sizeof(V));
  *p = v;
}
template <typename V> __device__ __forceinline__ V load_act(const V* p) { return counted_load<ACT_READ>(p); }
template <typename V> __device__ __forceinline__ void store_act(V* p, V v) { counted_store<ACT_WRITE>(p, v); }
template <typename V> __device__ __forceinline__ V load_param(const V* p) { return counted_load<PARAM_READ>(p); }
template <typename V> __device__ __forceinline__ void store_param(V* p, V v) { counted_store<PARAM_WRITE>(p, v); }

#ifndef HIRES_DYNAMIC_SHARED
#define HIRES_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

// Thread-block clusters (sm_90): cluster_sync is the barrier of every thread of the cluster
// (cluster.sync(): shared-memory writes before it are visible to the whole cluster after
// it); cluster_peer maps an address of this block's shared memory to the same address in
// the block of cluster rank `rank` (distributed shared memory, read with generic loads).
// Below sm_90 the host launches no clusters (clusters_enabled), so a cluster is the block
// itself; require_clusters(blocks) stops a kernel launched in clusters of `blocks` to such
// code instead of letting it compute garbage. The emulation provides all three
// (tests/cuda_emulation.h).
#ifndef HIRES_EMULATED
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void cluster_sync() { cooperative_groups::this_cluster().sync(); }
template <typename T>
__device__ __forceinline__ T* cluster_peer(T* p, int rank) {
  return cooperative_groups::this_cluster().map_shared_rank(p, rank);
}
__device__ __forceinline__ void require_clusters(int) {}
#else
__device__ __forceinline__ void cluster_sync() { __syncthreads(); }
template <typename T>
__device__ __forceinline__ T* cluster_peer(T* p, int) { return p; }
__device__ __forceinline__ void require_clusters(int blocks) {
  if (blocks > 1) __trap();
}
#endif
#endif

// ---------------------------------------------------------------------------------
// Tensor cores. D += A B for one warp: A 16x16 (row-major), B 16x8 (column-major) in
// bf16 or fp16, D 16x8 in fp32, in mma.sync's fragment layout (PTX ISA, "m16n8k16"):
// with g = lane / 4 and q = lane % 4, a[0..3] hold A(g, 2q..2q+1), A(g+8, 2q..), A(g, 2q+8..),
// A(g+8, 2q+8..); b[0..1] hold B(2q..2q+1, g), B(2q+8.., g); d[v] is D(g + 8 (v / 2), 2q + v % 2).
// The emulation implements the same layout.
template <typename scalar_t>
constexpr bool kTensorCores = std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>;

#ifndef HIRES_EMULATED
template <typename scalar_t>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}
#endif

// float32 on the tensor cores where torch allows TF32 for float32 matmuls (RowArgs::tf32):
// mma.sync m16n8k8 .tf32 with fp32 accumulate, each operand rounded to TF32 (cvt.rna: 10
// mantissa bits, to nearest, ties away from zero). Fragments (PTX ISA, "m16n8k8", .tf32):
// a[0..3] hold A(g, q), A(g+8, q), A(g, q+4), A(g+8, q+4); b[0..1] hold B(q, g), B(q+4, g);
// d as for m16n8k16. The emulation implements the same layout and rounding.
#ifndef HIRES_EMULATED
__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}
__device__ __forceinline__ void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

// The warps of a block over a tm x 64 result tile (tm = 16, 32, 64 or 128): tm / 16 warps
// along the rows, 8 / (tm / 16) along the columns; a warp owns 16 rows and nt = tm / 16
// groups of 8 columns, and each lane the mma.sync accumulator elements of its fragments, so
// the fp32 and fp64 paths (FMA) hold the very same elements as the tensor-core path.
struct Frag {
  int row0, col0, nt, g, q;
  __device__ explicit Frag(int tm) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wm = tm / 16;
    row0 = 16 * (warp % wm);
    nt = wm;
    col0 = (warp / wm) * 8 * nt;
    g = lane / 4;
    q = lane % 4;
  }
  __device__ int row(int v) const { return row0 + g + 8 * (v / 2); }
  __device__ int col(int j, int v) const { return col0 + 8 * j + 2 * q + v % 2; }
};

template <int NJ, typename acc_t>
__device__ __forceinline__ void zero(acc_t (&acc)[NJ][4]) {
#pragma unroll
  for (int j = 0; j < NJ; ++j)
#pragma unroll
    for (int v = 0; v < 4; ++v) acc[j][v] = acc_t(0);
}

// acc += A B^T over k in [0, depth) (depth a multiple of 16): A rows and B columns both
// stored k-contiguous in shared memory (pitches lda, ldb elements); float32 in TF32 where
// tf32 says so, else (and fp64) FMA.
template <typename scalar_t, typename acc_t, int NJ>
__device__ __forceinline__ void mma_chunk(acc_t (&acc)[NJ][4], const scalar_t* A, int lda, const scalar_t* B, int ldb,
                                          int depth, const Frag& f, bool tf32) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (tf32) {
      for (int k = 0; k < depth; k += 8) {
        const float* a0 = A + (f.row0 + f.g) * lda + k + f.q;
        const uint32_t a[4] = {to_tf32(a0[0]), to_tf32(a0[8 * lda]), to_tf32(a0[4]), to_tf32(a0[8 * lda + 4])};
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
          if (j >= f.nt) break;
          const float* b0 = B + (f.col0 + 8 * j + f.g) * ldb + k + f.q;
          const uint32_t b[2] = {to_tf32(b0[0]), to_tf32(b0[4])};
          mma_1688_tf32(acc[j], a, b);
        }
      }
      return;
    }
  }
  if constexpr (kTensorCores<scalar_t>) {
    for (int k = 0; k < depth; k += 16) {
      auto word = [](const scalar_t* p) { return *reinterpret_cast<const uint32_t*>(p); };
      const scalar_t* a0 = A + (f.row0 + f.g) * lda + k + 2 * f.q;
      const uint32_t a[4] = {word(a0), word(a0 + 8 * lda), word(a0 + 8), word(a0 + 8 * lda + 8)};
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        if (j >= f.nt) break;
        const scalar_t* b0 = B + (f.col0 + 8 * j + f.g) * ldb + k + 2 * f.q;
        const uint32_t b[2] = {word(b0), word(b0 + 8)};
        mma_16816<scalar_t>(acc[j], a, b);
      }
    }
  } else {
#pragma unroll 2  // unrolled further, the hoisted loads of fp64 spill
    for (int k = 0; k < depth; ++k) {
      const acc_t a0 = static_cast<acc_t>(A[f.row(0) * lda + k]);
      const acc_t a1 = static_cast<acc_t>(A[f.row(2) * lda + k]);
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        if (j >= f.nt) break;
        const acc_t b0 = static_cast<acc_t>(B[f.col(j, 0) * ldb + k]);
        const acc_t b1 = static_cast<acc_t>(B[f.col(j, 1) * ldb + k]);
        acc[j][0] += a0 * b0;
        acc[j][1] += a0 * b1;
        acc[j][2] += a1 * b0;
        acc[j][3] += a1 * b1;
      }
    }
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t inv_sqrt(acc_t v) {
  return acc_t(1) / sqrt(v);
}

__host__ __device__ __forceinline__ int round_up(int v, int to) { return (v + to - 1) / to * to; }

// ---------------------------------------------------------------------------------
// The row-tile kernel: a block owns tm pooled positions (rows m0 .. m0 + tm) and all
// channels. It loads its pooled tile P (tm x C_in) into shared memory once, then loops over
// the C_out blocks of 64: y = P W^T (tensor cores for bf16/fp16), then one of four
// epilogues; BWD_DX then loops over the C_in blocks for dp = dy W.

enum Epilogue { FWD_STATS = 0, FWD_APPLY = 1, BWD_STATS = 2, BWD_DX = 3 };

template <typename scalar_t>
struct Act {  // a strided [N, C, H, W] activation
  scalar_t* ptr;
  int64_t sn, sc, sh, sw;
  __device__ __forceinline__ int64_t offset(int n, int64_t c, int h, int w) const {
    return n * sn + c * sc + h * sh + w * sw;
  }
};

template <typename scalar_t, typename acc_t>
struct RowArgs {
  Act<const scalar_t> src;        // x (pooled on load when s > 1) or saved
  int s, H, W;                    // window and src's spatial size
  bool src_cfast;                 // src's channel stride is 1
  int src_vec;                    // VecMode of src in load_rows (and of pooled, but for WINDOWS)
  const acc_t* shift;             // nullable: subtracted from src on load
  Act<scalar_t> pooled;           // ptr nullable: the pooled tile is stored here on load
  const acc_t* weight;            // [C_out][C_in]
  const scalar_t* w;              // the weight in x's dtype, [C_out][C_in]: the GEMMs' operand
  int w_run;                      // elements per load of w: Vec16::n where its rows come in 16-byte runs, else 1
  int C_in, C_out, Ho, Wo, tm;
  int cs;                         // blocks per row tile (a cluster along C_out: Share), 1, 2 or 4
  bool tf32;                      // float32 GEMMs in TF32 (tf32_allowed)
  int64_t M;
  const acc_t* mean;              // [C_out] (APPLY, BWD_*); eval forward: running_mean
  const acc_t* var;               // [C_out] (APPLY, BWD_*)
  const acc_t* eval_shift;        // eval forward: the x shift; the epilogue's mean is mean - W eval_shift
  acc_t* mean_out;                // eval forward: the first row tile's blocks store the statistics used
  acc_t* var_out;
  const acc_t* gamma;             // nullable (APPLY, BWD_DX)
  const acc_t* beta;              // nullable (APPLY)
  const acc_t* dbeta;             // [C_out] (BWD_DX)
  const acc_t* dgamma;            // [C_out] (BWD_DX)
  acc_t eps;
  bool training;
  acc_t* part0;                   // [tiles][C_out]: mean (FWD_STATS) / sum g (BWD_STATS)
  acc_t* part1;                   // [tiles][C_out]: M2 (FWD_STATS) / sum g yhat (BWD_STATS)
  Act<scalar_t> out;              // FWD_APPLY output
  Act<const scalar_t> residual;   // FWD_APPLY, ptr nullable
  Act<const scalar_t> grad;       // BWD_*: grad_out
  bool act_cfast;                 // out / grad_out / grad_x channel stride is 1
  int out_vec;                    // VecMode of out and residual (FWD_APPLY)
  int grad_vec;                   // VecMode of grad_out (BWD_*; and dy where it is CHANNELS)
  int grad_x_vec;                 // VecMode of grad_x (BWD_DX)
  scalar_t* dy;                   // BWD_DX: [M][C_out], the input of the dW kernel
  Act<scalar_t> grad_x;           // BWD_DX
  int stride, in_h, in_w;         // BWD_DX: the op's stride and grad_x's spatial size
};

// Byte offsets of the row kernel's shared memory; the same on host (launch size) and device.
struct RowSmem {
  int ys, consts, pos, ps, ds, bs, total;
  int ldp, ldd, kin, kout;
  __host__ __device__ RowSmem(int tm, int C_in, int C_out, bool with_dy, int acc_size, int elt_size) {
    kin = round_up(C_in, 16);
    kout = round_up(C_out, 16);
    ldp = kin + KPAD;
    ldd = kout + KPAD;
    ys = 0;
    consts = ys + round_up(tm * PITCH * acc_size, 16);
    pos = consts + round_up(6 * TN * acc_size, 16);
    ps = pos + round_up(3 * tm * 4, 16);
    ds = ps + round_up(tm * ldp * elt_size, 16);
    bs = ds + (with_dy ? round_up(tm * ldd * elt_size, 16) : 0);
    total = bs + TN * (KC + KPAD) * elt_size;
  }
};

// 16 consecutive bytes of an activation (channels in channels_last, positions of one
// channel plane in NCHW): one vector load or store (LDG.128 / STG.128).
template <typename scalar_t>
struct alignas(16) Vec16 {
  static constexpr int n = 16 / sizeof(scalar_t);
  scalar_t v[n];
};

// How a kernel accesses an activation (vec_mode on the host picks it): element by element,
// or in 16-byte runs of consecutive channels (channels_last) or of consecutive positions of
// one channel (NCHW, at the pooled resolution), or (WINDOWS: NCHW x and grad_x at stride
// s > 1, window_vectors) in 16-byte runs along a row of pixels that cover 16 / (e s) whole
// windows, one run per pixel row of the windows.
enum VecMode { ELEMENTS = 0, CHANNELS = 1, POSITIONS = 2, WINDOWS = 3 };

// g consecutive elements at p into v[0, g): one 16-byte vector (g = Vec16::n, p aligned) or
// one element (g = 1); and back.
template <int KIND = ACT_READ, typename scalar_t, int N>
__device__ __forceinline__ void load_run(const scalar_t* p, int g, scalar_t (&v)[N]) {
  if constexpr (N == Vec16<scalar_t>::n) {
    if (g > 1) {
      const Vec16<scalar_t> in = counted_load<KIND>(reinterpret_cast<const Vec16<scalar_t>*>(p));
#pragma unroll
      for (int j = 0; j < N; ++j) v[j] = in.v[j];
      return;
    }
  }
  v[0] = counted_load<KIND>(p);
}
template <typename scalar_t, int N>
__device__ __forceinline__ void store_run(scalar_t* p, int g, const scalar_t (&v)[N]) {
  if constexpr (N == Vec16<scalar_t>::n) {
    if (g > 1) {
      Vec16<scalar_t> out;
#pragma unroll
      for (int j = 0; j < N; ++j) out.v[j] = v[j];
      store_act(reinterpret_cast<Vec16<scalar_t>*>(p), out);
      return;
    }
  }
  store_act(p, v[0]);
}

// A 16-byte run of an activation staged into shared memory as it is, at 16-byte aligned
// addresses: cp.async (cached in L2 only, no round trip through registers). A thread's
// copies land by its copy_async_wait(), which comes before the barrier that publishes them.
// The emulation reads through load_act (counted, alignment checked) and lands the copy at the
// wait, no sooner.
template <typename scalar_t>
__device__ __forceinline__ void copy_run_async(scalar_t* smem, const scalar_t* gmem) {
#ifdef HIRES_EMULATED
  emu_copy_async(smem, load_act(reinterpret_cast<const Vec16<scalar_t>*>(gmem)));
#else
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem) : "memory");
#endif
}
__device__ __forceinline__ void copy_async_wait() {
#ifdef HIRES_EMULATED
  emu_copy_async_wait();
#else
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// v[0, g) into shared memory at p, p + step, ...: one 16-byte store where the run is
// contiguous there (step 1, g a vector: p is then 16-byte aligned, the tile buffers' offsets,
// pitches and run starts being multiples of 16 bytes), else element by element.
template <typename scalar_t, int N>
__device__ __forceinline__ void store_shared_run(scalar_t* p, int step, int g, const scalar_t (&v)[N]) {
  if constexpr (N == Vec16<scalar_t>::n) {
    if (g > 1 && step == 1) {
      Vec16<scalar_t> out;
#pragma unroll
      for (int j = 0; j < N; ++j) out.v[j] = v[j];
      *reinterpret_cast<Vec16<scalar_t>*>(p) = out;
      return;
    }
  }
#pragma unroll
  for (int j = 0; j < N; ++j)
    if (j < g) p[j * step] = v[j];
}

// sum[j] += in[j S + w] - sub[j] for w < S: one 16-byte run of a pixel row covers VW / S
// windows; per window the element path's terms in its order (w ascending within a row).
template <int S, typename scalar_t, typename acc_t, int VW>
__device__ __forceinline__ void add_window_rows(const scalar_t (&in)[VW], const acc_t (&sub)[VW], acc_t (&sum)[VW]) {
  if constexpr (S <= VW) {
#pragma unroll
    for (int j = 0; j < VW / S; ++j)
#pragma unroll
      for (int w = 0; w < S; ++w) sum[j] += static_cast<acc_t>(in[j * S + w]) - sub[j];
  }
}
template <typename scalar_t, typename acc_t, int VW>
__device__ __forceinline__ void add_window_rows(int s, const scalar_t (&in)[VW], const acc_t (&sub)[VW],
                                                acc_t (&sum)[VW]) {
  if (s == 2) add_window_rows<2>(in, sub, sum);
  else if (s == 4) add_window_rows<4>(in, sub, sum);
  else add_window_rows<8>(in, sub, sum);
}

// out[j S + w] = v[j] for w < S: a pixel row of VW / S windows, each with its value.
template <int S, typename scalar_t, int VW>
__device__ __forceinline__ void spread_window_rows(const scalar_t (&v)[VW], scalar_t (&out)[VW]) {
  if constexpr (S <= VW) {
#pragma unroll
    for (int j = 0; j < VW / S; ++j)
#pragma unroll
      for (int w = 0; w < S; ++w) out[j * S + w] = v[j];
  }
}
template <typename scalar_t, int VW>
__device__ __forceinline__ void spread_window_rows(int s, const scalar_t (&v)[VW], scalar_t (&out)[VW]) {
  if (s == 2) spread_window_rows<2>(v, out);
  else if (s == 4) spread_window_rows<4>(v, out);
  else spread_window_rows<8>(v, out);
}

// A tile loop's item: a run of g elements from (r, c), along the channels (along_c) or the
// rows; consecutive threads take consecutive runs along the contiguous dimension.
struct Run {
  int r, c, dr, dc;  // element j of the run: (r + j dr, c + j dc)
  __device__ __forceinline__ Run(int e, int g, bool along_c, int rows_total, int cols_total) {
    if (along_c) {
      c = e % (cols_total / g) * g; r = e / (cols_total / g); dr = 0; dc = 1;
    } else {
      r = e % (rows_total / g) * g; c = e / (rows_total / g); dr = 1; dc = 0;
    }
  }
};

// Ys (tm x 64, pitch PITCH) = A Wt over k in [0, kpad), A resident in shared memory (tm x kpad,
// pitch lda), the weight operand Wt(k, c) = W[k * wk + (c0 + c) * wc] (0 outside
// [0, k_end) x [0, c_end)) staged chunk by chunk into Bs (64 x (KC + KPAD)). W is the weight
// in x's dtype (RowArgs::w: bf16/fp16 weights go to the tensor cores rounded as eager autocast
// rounds them), read in runs of g elements along its contiguous dimension (16 bytes where
// rows of W come in 16-byte runs, RowArgs::w_run; else 1), consecutive threads along it; a
// run is wholly in or out of range (C_in, the chunk and column offsets are multiples of g).
// Ends with a barrier.
template <typename scalar_t, typename acc_t>
__device__ void gemm_weight(acc_t* Ys, const scalar_t* A, int lda, int kpad, const scalar_t* W, int g, int64_t wk,
                            int64_t wc, int k_end, int64_t c0, int64_t c_end, scalar_t* Bs, const Frag& f, bool tf32) {
  constexpr int ldb = KC + KPAD, VW = Vec16<scalar_t>::n;
  acc_t acc[4][4];
  zero(acc);
  const bool k_fast = wk == 1;
  for (int k0 = 0; k0 < kpad; k0 += KC) {
    const int depth = min(KC, kpad - k0);
    for (int e = threadIdx.x; e < TN * KC / g; e += NT) {
      const Run u(e, g, !k_fast, KC, TN);  // r: k, c: column
      const int64_t k = k0 + u.r, col = c0 + u.c;
      const bool in = k < k_end && col < c_end;
      scalar_t v[VW];
      if (in) {
        load_run<PARAM_READ>(W + k * wk + col * wc, g, v);
      } else {
#pragma unroll
        for (int j = 0; j < VW; ++j) v[j] = static_cast<scalar_t>(acc_t(0));
      }
      store_shared_run(Bs + u.c * ldb + u.r, u.dc * ldb + u.dr, g, v);
    }
    __syncthreads();
    mma_chunk(acc, A + k0, lda, Bs, ldb, depth, f, tf32);
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int v = 0; v < 4; ++v)
      if (j < f.nt) Ys[f.row(v) * PITCH + f.col(j, v)] = acc[j][v];
  __syncthreads();
}

// Ps[r][k] = p(m0 + r, k) for r < rows, k in [k_lo, k_hi) (0 at k >= C and r >= rows): the window mean of
// (src - shift) (s = 1: src - shift), rounded to scalar_t as `pooled` stores it. Each thread
// takes a run of g elements (src_vec: 16-byte runs of channels, or at s = 1 of positions;
// WINDOWS: the VW / s positions whose windows one 16-byte run of a pixel row covers; else
// g = 1), consecutive threads along the contiguous dimension; per element the same sums in
// the same order whatever the run. A run is wholly in or out of range: C_in, or an image's
// positions, are multiples of g.
template <typename scalar_t, typename acc_t>
__device__ void load_rows(const RowArgs<scalar_t, acc_t>& a, const RowSmem& L, scalar_t* Ps, const int* rn,
                          const int* rh, const int* rw, int rows, int k_lo, int k_hi) {
  constexpr int VW = Vec16<scalar_t>::n;
  const bool windows = a.src_vec == WINDOWS;
  const int width = k_hi - k_lo, g = a.src_vec == ELEMENTS ? 1 : windows ? VW / a.s : VW;
  const bool along_k = a.src_vec == CHANNELS || (a.src_vec == ELEMENTS && a.src_cfast);
  // At s = 1 without a shift (`pooled`, or the saved pooled input) the tile is src as it is:
  // runs of channels go by cp.async.
  const bool as_is = a.s == 1 && a.shift == nullptr && a.pooled.ptr == nullptr && a.src_vec == CHANNELS;
  for (int e = threadIdx.x; e < a.tm * width / g; e += NT) {
    Run u(e, g, along_k, a.tm, width);
    u.c += k_lo;
    if (as_is && u.r < rows && u.c < a.C_in) {
      copy_run_async(Ps + u.r * L.ldp + u.c, a.src.ptr + a.src.offset(rn[u.r], u.c, rh[u.r], rw[u.r]));
      continue;
    }
    scalar_t v[VW];
#pragma unroll
    for (int j = 0; j < VW; ++j) v[j] = static_cast<scalar_t>(acc_t(0));
    if (u.r < rows && u.c < a.C_in) {
      const int h0 = rh[u.r] * a.s, w0 = rw[u.r] * a.s;
      const int h1 = min(h0 + a.s, a.H), w1 = min(w0 + a.s, a.W);
      acc_t sum[VW], sub[VW];
#pragma unroll
      for (int j = 0; j < VW; ++j) {
        sum[j] = acc_t(0);
        sub[j] = j < g && a.shift != nullptr ? load_param(a.shift + u.c + j * u.dc) : acc_t(0);
      }
      if (windows) {  // the run's windows are whole: w1 = w0 + s for each
        for (int h = h0; h < h1; ++h) {
          scalar_t in[VW];
          load_run(a.src.ptr + a.src.offset(rn[u.r], u.c, h, w0), VW, in);
          add_window_rows(a.s, in, sub, sum);
        }
      } else {
        for (int h = h0; h < h1; ++h)
          for (int w = w0; w < w1; ++w) {
            scalar_t in[VW];
            load_run(a.src.ptr + a.src.offset(rn[u.r], u.c, h, w), g, in);
#pragma unroll
            for (int j = 0; j < VW; ++j)
              if (j < g) sum[j] += static_cast<acc_t>(in[j]) - sub[j];
          }
      }
      const acc_t count = static_cast<acc_t>((h1 - h0) * (w1 - w0));
#pragma unroll
      for (int j = 0; j < VW; ++j)
        if (j < g) v[j] = static_cast<scalar_t>(a.s == 1 ? sum[j] : sum[j] / count);
      if (a.pooled.ptr != nullptr) {
        if (windows) {  // `pooled` is s^2 smaller: its runs of VW / s positions element by element
#pragma unroll
          for (int j = 0; j < VW; ++j)
            if (j < g) store_act(a.pooled.ptr + a.pooled.offset(rn[u.r], u.c, rh[u.r], rw[u.r] + j), v[j]);
        } else {
          store_run(a.pooled.ptr + a.pooled.offset(rn[u.r], u.c, rh[u.r], rw[u.r]), g, v);
        }
      }
    }
    store_shared_run(Ps + u.r * L.ldp + u.c, u.dr * L.ldp + u.dc, g, v);
  }
  if (as_is) copy_async_wait();
}

// The part of a row tile a block owns: with cs = RowArgs::cs blocks per tile (a thread-block
// cluster, cs > 1 where C_out is a multiple of 64 cs and C_in of 16 cs), block h of the tile's
// cluster owns the output channels [co_lo, co_hi) (its GEMMs and epilogues) and the input
// channels [ci_lo, ci_hi) (it pools them into its tile, and writes their grad_x); the other
// blocks' columns of the input tile, and in BWD_DX of dy, it copies from them
// (gather_columns). With cs = 1 all of them, ci_pad = kin (the tile's zero padding).
struct Share {
  int64_t tile;
  int h, co_lo, co_hi, ci_lo, ci_hi, ci_pad;
  __device__ Share(int cs, int C_in, int C_out, int kin) {
    tile = blockIdx.x / cs;
    h = blockIdx.x % cs;
    co_lo = h * (C_out / cs);
    co_hi = co_lo + C_out / cs;
    ci_lo = h * (C_in / cs);
    ci_hi = ci_lo + C_in / cs;
    ci_pad = cs == 1 ? kin : ci_hi;
  }
};

// T (rows_n x ld in shared memory, the same in every block of the cluster): the columns
// [r width, (r + 1) width) of every other block r copied from it (distributed shared memory),
// in 16-byte runs (width, ld and T's offset are multiples of 16 bytes). Between two cluster
// barriers: the first publishes every block's own columns, the second keeps each block (and
// its shared memory) until the others have copied from it.
template <typename scalar_t>
__device__ void gather_columns(scalar_t* T, int ld, int rows_n, int width, int h, int cs) {
  using Vec = Vec16<scalar_t>;
  const int runs = width / Vec::n;
  cluster_sync();
  for (int e = threadIdx.x; e < (cs - 1) * rows_n * runs; e += NT) {
    const int j = e % runs, r = e / runs % rows_n, k = e / (runs * rows_n);
    const int rank = k + (k >= h);
    const int at = r * ld + rank * width + j * Vec::n;
    *reinterpret_cast<Vec*>(T + at) = *reinterpret_cast<const Vec*>(cluster_peer(T, rank) + at);
  }
  cluster_sync();
}

template <typename scalar_t, typename acc_t, int EPI>
__global__ void __launch_bounds__(NT, 2) rows_kernel(RowArgs<scalar_t, acc_t> a) {
  HIRES_DYNAMIC_SHARED(smem);
  const RowSmem L(a.tm, a.C_in, a.C_out, EPI == BWD_DX, sizeof(acc_t), sizeof(scalar_t));
  acc_t* Ys = reinterpret_cast<acc_t*>(smem + L.ys);
  acc_t* c_mean = reinterpret_cast<acc_t*>(smem + L.consts);
  acc_t *c_rstd = c_mean + TN, *c_scale = c_mean + 2 * TN, *c_beta = c_mean + 3 * TN, *c_db = c_mean + 4 * TN,
        *c_dg = c_mean + 5 * TN;
  int* rn = reinterpret_cast<int*>(smem + L.pos);
  int *rh = rn + a.tm, *rw = rn + 2 * a.tm;
  scalar_t* Ps = reinterpret_cast<scalar_t*>(smem + L.ps);
  scalar_t* Ds = reinterpret_cast<scalar_t*>(smem + L.ds);
  scalar_t* Bs = reinterpret_cast<scalar_t*>(smem + L.bs);

  require_clusters(a.cs);
  const Share sh(a.cs, a.C_in, a.C_out, L.kin);
  const int64_t m0 = sh.tile * a.tm;
  const int rows = (int)(a.M - m0 < a.tm ? a.M - m0 : a.tm);
  const int64_t hw = (int64_t)a.Ho * a.Wo;
  if (threadIdx.x < a.tm) {  // the only divisions by the geometry: once per row
    const int64_t m = m0 + (threadIdx.x < rows ? threadIdx.x : 0);
    const int64_t n = m / hw, rem = m - n * hw;
    rn[threadIdx.x] = (int)n;
    rh[threadIdx.x] = (int)(rem / a.Wo);
    rw[threadIdx.x] = (int)(rem - rem / a.Wo * a.Wo);
  }
  __syncthreads();
  load_rows(a, L, Ps, rn, rh, rw, rows, sh.ci_lo, sh.ci_pad);
  if (a.cs > 1)
    gather_columns(Ps, L.ldp, a.tm, a.C_in / a.cs, sh.h, a.cs);
  else
    __syncthreads();

  const Frag f(a.tm);
  for (int64_t co0 = sh.co_lo; co0 < sh.co_hi; co0 += TN) {
    if (EPI != FWD_STATS && threadIdx.x < TN) {  // per-column constants (visible after gemm_weight's barriers)
      const int64_t co = co0 + threadIdx.x;
      acc_t mean = 0, rstd = 0, scale = 0, beta = 0, db = 0, dg = 0;
      if (co < a.C_out) {
        mean = load_param(a.mean + co);
        if (a.eval_shift != nullptr) {
          // Running statistics describe W x; the kernels see W (x - shift).
          for (int k = 0; k < a.C_in; ++k) mean -= load_param(a.weight + co * a.C_in + k) * load_param(a.eval_shift + k);
          if (sh.tile == 0) {
            store_param(a.mean_out + co, mean);
            store_param(a.var_out + co, load_param(a.var + co));
          }
        }
        rstd = inv_sqrt(load_param(a.var + co) + a.eps);
        scale = a.gamma != nullptr ? rstd * load_param(a.gamma + co) : rstd;
        if (EPI == FWD_APPLY) beta = a.beta != nullptr ? load_param(a.beta + co) : acc_t(0);
        if (EPI == BWD_DX && a.training) {
          db = load_param(a.dbeta + co) / static_cast<acc_t>(a.M);
          dg = load_param(a.dgamma + co) / static_cast<acc_t>(a.M);
        }
      }
      c_mean[threadIdx.x] = mean;
      c_rstd[threadIdx.x] = rstd;
      c_scale[threadIdx.x] = scale;
      c_beta[threadIdx.x] = beta;
      c_db[threadIdx.x] = db;
      c_dg[threadIdx.x] = dg;
    }
    gemm_weight(Ys, Ps, L.ldp, L.kin, a.w, a.w_run, 1, a.C_in, a.C_in, co0, a.C_out, Bs, f, a.tf32);

    if (EPI == FWD_STATS || EPI == BWD_STATS) {
      // BWD_STATS with grad_out in 16-byte runs: every thread stages the tile's g into Bs
      // (free until the next gemm_weight stages the weight; tm <= 64 rows of TN fit), so the
      // column loop below reads it from there, in the same order.
      static_assert(64 * TN <= TN * (KC + KPAD), "a g tile of 64 rows fits in Bs");
      const bool staged = EPI == BWD_STATS && a.grad_vec != ELEMENTS;
      if (staged) {
        constexpr int VW = Vec16<scalar_t>::n;
        for (int e = threadIdx.x; e < a.tm * TN / VW; e += NT) {
          const Run u(e, VW, a.grad_vec == CHANNELS, a.tm, TN);
          const int64_t co = co0 + u.c;
          if (a.grad_vec == CHANNELS && u.r < rows && co < a.C_out) {  // g as it is: cp.async
            copy_run_async(Bs + u.r * TN + u.c, a.grad.ptr + a.grad.offset(rn[u.r], co, rh[u.r], rw[u.r]));
            continue;
          }
          scalar_t gv[VW];
#pragma unroll
          for (int j = 0; j < VW; ++j) gv[j] = static_cast<scalar_t>(acc_t(0));
          if (u.r < rows && co < a.C_out) load_run(a.grad.ptr + a.grad.offset(rn[u.r], co, rh[u.r], rw[u.r]), VW, gv);
          store_shared_run(Bs + u.r * TN + u.c, u.dr * TN + u.dc, VW, gv);
        }
        copy_async_wait();
        __syncthreads();
      }
      // One thread per column, over the rows in order (deterministic).
      const int c = threadIdx.x;
      const int64_t co = co0 + c;
      if (c < TN && co < a.C_out) {
        acc_t s0 = 0, s1 = 0;
        if (EPI == FWD_STATS) {  // two-pass (mean, M2) of the tile's rows
          for (int r = 0; r < rows; ++r) s0 += Ys[r * PITCH + c];
          s0 /= static_cast<acc_t>(rows);
          for (int r = 0; r < rows; ++r) {
            const acc_t d = Ys[r * PITCH + c] - s0;
            s1 += d * d;
          }
        } else {  // sum g, sum g yhat
          for (int r = 0; r < rows; ++r) {
            const acc_t g = static_cast<acc_t>(
                staged ? Bs[r * TN + c] : load_act(a.grad.ptr + a.grad.offset(rn[r], co, rh[r], rw[r])));
            s0 += g;
            s1 += g * ((Ys[r * PITCH + c] - c_mean[c]) * c_rstd[c]);
          }
        }
        store_act(a.part0 + sh.tile * a.C_out + co, s0);
        store_act(a.part1 + sh.tile * a.C_out + co, s1);
      }
    } else {
      // Runs of g elements (out_vec for FWD_APPLY, grad_vec for BWD_DX: 16-byte runs of
      // channels or positions; else g = 1), consecutive threads along the contiguous
      // dimension; per element the reference's arithmetic. A run is wholly in or out of
      // range (C_out, or an image's positions, are multiples of g).
      constexpr int VW = Vec16<scalar_t>::n;
      const int mode = EPI == FWD_APPLY ? a.out_vec : a.grad_vec;
      const int g = mode == ELEMENTS ? 1 : VW;
      for (int e = threadIdx.x; e < a.tm * TN / g; e += NT) {
        const Run u(e, g, mode == CHANNELS || (mode == ELEMENTS && a.act_cfast), a.tm, TN);
        const int64_t co = co0 + u.c;
        if (EPI == FWD_APPLY) {
          if (u.r >= rows || co >= a.C_out) continue;
          scalar_t res[VW], o[VW];
          if (a.residual.ptr != nullptr)
            load_run(a.residual.ptr + a.residual.offset(rn[u.r], co, rh[u.r], rw[u.r]), g, res);
#pragma unroll
          for (int j = 0; j < VW; ++j) {
            if (j >= g) break;
            const int rj = u.r + j * u.dr, cj = u.c + j * u.dc;
            // (y - mean) * scale, then + beta, then + residual (the reference's order).
            acc_t v = (Ys[rj * PITCH + cj] - c_mean[cj]) * c_scale[cj] + c_beta[cj];
            if (a.residual.ptr != nullptr) v += static_cast<acc_t>(res[j]);
            o[j] = static_cast<scalar_t>(v);
          }
          store_run(a.out.ptr + a.out.offset(rn[u.r], co, rh[u.r], rw[u.r]), g, o);
        } else {  // BWD_DX: dy, rounded to scalar_t as eager's BatchNorm backward returns it
          if (co >= L.kout) continue;
          scalar_t d[VW];
#pragma unroll
          for (int j = 0; j < VW; ++j) d[j] = static_cast<scalar_t>(acc_t(0));
          if (u.r < rows && co < a.C_out) {
            scalar_t gv[VW];
            load_run(a.grad.ptr + a.grad.offset(rn[u.r], co, rh[u.r], rw[u.r]), g, gv);
#pragma unroll
            for (int j = 0; j < VW; ++j) {
              if (j >= g) break;
              const int rj = u.r + j * u.dr, cj = u.c + j * u.dc;
              const acc_t gj = static_cast<acc_t>(gv[j]);
              const acc_t yhat = (Ys[rj * PITCH + cj] - c_mean[cj]) * c_rstd[cj];
              d[j] = static_cast<scalar_t>(a.training ? c_scale[cj] * (gj - c_db[cj] - yhat * c_dg[cj])
                                                      : c_scale[cj] * gj);
            }
            // dy is [M][C_out]: a run of channels is contiguous there, a run of positions is not.
            if (mode == CHANNELS) {
              store_run(a.dy + (m0 + u.r) * a.C_out + co, g, d);
            } else {
#pragma unroll
              for (int j = 0; j < VW; ++j)
                if (j < g) store_act(a.dy + (m0 + u.r + j * u.dr) * a.C_out + co + j * u.dc, d[j]);
            }
          }
          store_shared_run(Ds + u.r * L.ldd + co, u.dr * L.ldd + u.dc, g, d);  // Ds spans every channel
        }
      }
    }
    __syncthreads();
  }
  if (EPI != BWD_DX) return;
  if (a.cs > 1) gather_columns(Ds, L.ldd, a.tm, a.C_out / a.cs, sh.h, a.cs);

  // dp = dy W for each block of 64 input channels, scattered to grad_x: every pooled position
  // writes its own window with dp / count (the last row / column of windows also writes the
  // zeros of floor mode's trailing pixels), so each grad_x pixel is written exactly once.
  for (int64_t ci0 = sh.ci_lo; ci0 < sh.ci_hi; ci0 += TN) {
    gemm_weight(Ys, Ds, L.ldd, L.kout, a.w, a.w_run, a.C_in, 1, a.C_out, ci0, sh.ci_hi, Bs, f, a.tf32);
    // Runs of g elements where grad_x takes them (16-byte runs of channels, or at stride 1
    // of positions, or WINDOWS: the VW / s positions whose windows one 16-byte run of a
    // pixel row covers; else g = 1).
    constexpr int VW = Vec16<scalar_t>::n;
    const bool windows = a.grad_x_vec == WINDOWS;
    const int g = a.grad_x_vec == ELEMENTS ? 1 : windows ? VW / a.stride : VW;
    for (int e = threadIdx.x; e < a.tm * TN / g; e += NT) {
      const Run u(e, g, a.grad_x_vec == CHANNELS || (a.grad_x_vec == ELEMENTS && a.act_cfast), a.tm, TN);
      const int r = u.r;
      const int64_t ci = ci0 + u.c;
      if (r >= rows || ci >= sh.ci_hi) continue;  // a run is wholly in or out
      // The run's windows: one (a run of channels), or at stride 1 one pixel each (a run of
      // positions, stored from its first), or WINDOWS whole windows side by side in one row
      // of windows (the same h range and count for each, stored from the first one's w0).
      const int ho = rh[r], wo = rw[r], s = a.stride;
      const int h0 = ho * s, w0 = wo * s;
      const int h1 = min(h0 + s, a.in_h), w1 = min(w0 + s, a.in_w);
      const int h_own = ho == a.Ho - 1 ? a.in_h : h1;
      const int w_own = wo == a.Wo - 1 ? a.in_w : w1;
      const acc_t count = static_cast<acc_t>((h1 - h0) * (w1 - w0));
      scalar_t v[VW], zero_v[VW];
#pragma unroll
      for (int j = 0; j < VW; ++j) {
        v[j] = j < g ? static_cast<scalar_t>(Ys[(r + j * u.dr) * PITCH + u.c + j * u.dc] / count)
                     : static_cast<scalar_t>(acc_t(0));
        zero_v[j] = static_cast<scalar_t>(acc_t(0));
      }
      if (windows) {
        scalar_t row[VW];
        spread_window_rows(s, v, row);
        for (int h = h0; h < h_own; ++h) {
          scalar_t* at = a.grad_x.ptr + a.grad_x.offset(rn[r], ci, h, w0);
          if (h < h1)
            store_run(at, VW, row);
          else
            store_run(at, VW, zero_v);
        }
      } else {
        for (int h = h0; h < h_own; ++h)
          for (int w = w0; w < w_own; ++w) {
            scalar_t* at = a.grad_x.ptr + a.grad_x.offset(rn[r], ci, h, w);
            if (h < h1 && w < w1)
              store_run(at, g, v);
            else
              store_run(at, g, zero_v);
          }
      }
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------
// Finalize kernels: one block per output channel, fixed-order reductions.

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

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

// One warp per channel (FIN_THREADS / 32 channels per block): lane l takes tiles l, l + 32,
// ...; lane 0 then combines the 32 lane results in lane order: a fixed order, so the
// results are deterministic, with a single warp barrier.
constexpr int FIN_CHANNELS = FIN_THREADS / 32;

// Per channel: mean and biased variance from the row tiles' partials (tiles of tm rows);
// then, when running statistics are given (contiguous, acc_t), their momentum update with
// the unshifted mean mean + W[co] . shift and the unbiased variance, as F.batch_norm does.
template <typename acc_t>
__global__ void __launch_bounds__(FIN_THREADS) fwd_finalize_kernel(
    const acc_t* part_mean, const acc_t* part_m2, int64_t tiles, int tm, int64_t M, int C_out,
    acc_t* mean_out, acc_t* var_out, const acc_t* weight, const acc_t* shift, int C_in,
    acc_t* running_mean, acc_t* running_var, acc_t momentum) {
  __shared__ acc_t sn[FIN_THREADS], sm[FIN_THREADS], s2[FIN_THREADS], sw[FIN_THREADS];
  const int lane = threadIdx.x % 32, base = threadIdx.x - lane;
  const int co = blockIdx.x * FIN_CHANNELS + threadIdx.x / 32;
  if (co >= C_out) return;  // whole warps
  acc_t n = 0, mean = 0, m2 = 0, ws = 0;
  for (int64_t t = lane; t < tiles; t += 32) {
    const acc_t cnt = static_cast<acc_t>(min64(tm, M - t * tm));
    chan_merge(n, mean, m2, cnt, load_act(part_mean + t * C_out + co), load_act(part_m2 + t * C_out + co));
  }
  if (running_mean != nullptr)
    for (int k = lane; k < C_in; k += 32) ws += load_param(weight + (int64_t)co * C_in + k) * load_param(shift + k);
  sn[threadIdx.x] = n; sm[threadIdx.x] = mean; s2[threadIdx.x] = m2; sw[threadIdx.x] = ws;
  __syncwarp();
  if (lane != 0) return;
  for (int l = 1; l < 32; ++l) {
    chan_merge(n, mean, m2, sn[base + l], sm[base + l], s2[base + l]);
    ws += sw[base + l];
  }
  store_param(mean_out + co, mean);
  store_param(var_out + co, m2 / static_cast<acc_t>(M));
  if (running_mean != nullptr) {
    const acc_t keep = acc_t(1) - momentum;
    store_param(running_mean + co, load_param(running_mean + co) * keep + (mean + ws) * momentum);
    store_param(running_var + co, load_param(running_var + co) * keep + m2 / static_cast<acc_t>(M - 1) * momentum);
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(FIN_THREADS) bwd_finalize_kernel(
    const acc_t* part_g, const acc_t* part_gy, int64_t tiles, int C_out, acc_t* dbeta, acc_t* dgamma) {
  __shared__ acc_t s0[FIN_THREADS], s1[FIN_THREADS];
  const int lane = threadIdx.x % 32, base = threadIdx.x - lane;
  const int co = blockIdx.x * FIN_CHANNELS + threadIdx.x / 32;
  if (co >= C_out) return;  // whole warps
  acc_t a = 0, b = 0;
  for (int64_t t = lane; t < tiles; t += 32) {
    a += load_act(part_g + t * C_out + co);
    b += load_act(part_gy + t * C_out + co);
  }
  s0[threadIdx.x] = a; s1[threadIdx.x] = b;
  __syncwarp();
  if (lane != 0) return;
  for (int l = 1; l < 32; ++l) {
    a += s0[base + l];
    b += s1[base + l];
  }
  store_param(dbeta + co, a);
  store_param(dgamma + co, b);
}

// ---------------------------------------------------------------------------------
// dW partials: ws[z][co][ci] = sum_{m in split z} dy[m][co] p[m][ci] for a tile of
// kDwRows output x 64 input channels, both operands staged k-contiguous (k = m) in shared
// memory, tensor cores for bf16/fp16 (128 output channels a block there: p is re-read once
// per block row, so the taller tile halves those re-reads). p is read from saved as
// load_rows reads it (shift subtracted at stride 1, rounded to scalar_t), so dW pairs dy
// with exactly the p the other passes used.
// The tiles of one split go in thread-block clusters of cx x cy tiles (DwLaunch; 1 x 1
// without clusters), whose blocks share their operands instead of each reading them: per
// step of max(cx, cy) segments of KD positions, block (bx, by) of the cluster stages the
// by-th 1 / cy of the step's positions of its dy tile (shared with the blocks of its column
// bx) and the bx-th 1 / cx of its p tile's (shared with its row by), and its GEMM takes
// each segment from the block that staged it. dy is then read
// ceil(C_in / (64 cy)) times and p ceil(C_out / (kDwRows cx)) times; every block still adds
// the positions in ascending order, so the partials do not depend on the cluster.
// Where the tiles and splits give under 2 waves, a split's positions go to 2 or 4 parts of
// whole steps, run by the cz z-ranks of a cluster of cx x cy x cz blocks: each z-rank runs
// the x-y cluster above on its part, then rank 0 sums the ranks' accumulators from their
// shared memory (sum_parts) and writes one partial; more blocks, no more workspace. With
// fewer z-ranks than parts (clusters that do not fit, or none) each rank's partial holds
// fewer parts and dw_reduce_kernel finishes sum_parts over them, so dW is bitwise the same.
template <typename scalar_t>
constexpr int kDwRows = kTensorCores<scalar_t> ? 128 : 64;

// The sum of a split's n = 1, 2 or 4 parts, part(r) the r-th, as a pairwise tree:
// (p0 + p1) + (p2 + p3). z-rank 0 of a cluster of cz ranks and dw_reduce_kernel over the
// partials of cz' < cz ranks both add in this order, so every choice of cz gives the same bits.
template <typename T, typename F>
__device__ __forceinline__ T sum_parts(int n, F part) {
  if (n == 4) return (part(0) + part(1)) + (part(2) + part(3));
  return n == 2 ? part(0) + part(1) : part(0);
}

// Byte offsets of the dW kernel's shared memory (host and device): this block's shares of
// the step, sa segments of the dy tile ([kDwRows][KD + KPAD] each) and sb of the p tile
// ([64][KD + KPAD] each), and the sb KD offsets into saved of its p positions. With z-ranks
// the same memory then holds the block's accumulators (kDwRows x 64 acc_t) for rank 0.
struct DwSmem {
  int sa, sb, bs, offs, total;
  __host__ __device__ DwSmem(int rows, int cx, int cy, int cz, int elt_size, int acc_size) {
    const int segments = cx > cy ? cx : cy;  // per step
    sa = segments / cy;
    sb = segments / cx;
    bs = round_up(sa * rows * (KD + KPAD) * elt_size, 16);
    offs = bs + round_up(sb * TN * (KD + KPAD) * elt_size, 16);
    total = offs + sb * KD * 8;
    if (cz > 1 && total < rows * TN * acc_size) total = rows * TN * acc_size;
  }
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(NT, 2) dw_partial_kernel(
    const scalar_t* dy, Act<const scalar_t> p, const acc_t* shift, bool p_cfast, bool dy_vec, int p_vec, int C_in,
    int C_out, int Ho, int Wo, int64_t M, int64_t chunk, int cx, int cy, int cz, bool tf32, acc_t* ws) {
  constexpr int ld = KD + KPAD, ROWS = kDwRows<scalar_t>;
  HIRES_DYNAMIC_SHARED(smem);
  const DwSmem L(ROWS, cx, cy, cz, sizeof(scalar_t), sizeof(acc_t));
  scalar_t* As = reinterpret_cast<scalar_t*>(smem);
  scalar_t* Bs = reinterpret_cast<scalar_t*>(smem + L.bs);
  int64_t* row_off = reinterpret_cast<int64_t*>(smem + L.offs);
  require_clusters(cx * cy * cz);
  const int bx = blockIdx.x % cx, by = blockIdx.y % cy, bz = blockIdx.z % cz, na = L.sa * KD, nb = L.sb * KD;
  const int z_rank = cx * cy * bz;  // cluster rank of this z-rank's block (0, 0)
  const int64_t co0 = (int64_t)blockIdx.x * ROWS, ci0 = (int64_t)blockIdx.y * TN;
  // Part blockIdx.z: chunk positions (whole steps). Every block of a cluster takes as many
  // steps as its z-rank 0 (the cluster barriers are collective); past its end it stages zeros.
  const int64_t k_begin = (int64_t)blockIdx.z * chunk, k_end = min64(M, k_begin + chunk);
  const int64_t step = (int64_t)na * cy, k_first = k_begin - bz * chunk;
  const int64_t steps = (min64(M, k_first + chunk) - k_first + step - 1) / step;
  const int64_t hw = (int64_t)Ho * Wo;
  const Frag f(ROWS);
  acc_t acc[ROWS / 16][4];
  zero(acc);
  for (int64_t k0 = k_begin; k0 < k_begin + steps * step; k0 += step) {
    const int64_t ka = k0 + (int64_t)by * na, kb = k0 + (int64_t)bx * nb;  // this block's shares
    if (threadIdx.x < nb) {  // saved's offset of each position of the p share
      const int64_t m = min64(kb + threadIdx.x, M - 1), n = m / hw, rem = m - n * hw;
      row_off[threadIdx.x] = n * p.sn + rem / Wo * p.sh + (rem - rem / Wo * Wo) * p.sw;
    }
    __syncthreads();
    // Both operands staged k-contiguous, a segment of KD positions after another: dy in
    // 16-byte runs of channels where they come aligned (dy_vec), p as the row kernels read it
    // (p_vec: runs of channels or positions).
    using Vec = Vec16<scalar_t>;
    constexpr int VW = Vec::n;
    if (dy_vec) {  // C_out is a multiple of VW: a vector is wholly in or out
      for (int e = threadIdx.x; e < ROWS / VW * na; e += NT) {
        const int r = e % (ROWS / VW) * VW, kk = e / (ROWS / VW);
        const int64_t m = ka + kk, co = co0 + r;
        scalar_t* at = As + kk / KD * ROWS * ld + kk % KD;
        Vec v;
        if (m < k_end && co < C_out) v = load_act(reinterpret_cast<const Vec*>(dy + m * C_out + co));
        for (int j = 0; j < VW; ++j)
          at[(r + j) * ld] = m < k_end && co < C_out ? v.v[j] : static_cast<scalar_t>(acc_t(0));
      }
    } else {
      for (int e = threadIdx.x; e < ROWS * na; e += NT) {
        const int r = e % ROWS, kk = e / ROWS;
        const int64_t m = ka + kk, co = co0 + r;
        As[kk / KD * ROWS * ld + r * ld + kk % KD] =
            m < k_end && co < C_out ? load_act(dy + m * C_out + co) : static_cast<scalar_t>(acc_t(0));
      }
    }
    {  // p: runs of g elements (16-byte runs of channels or positions), wholly in or out
      const int g = p_vec == ELEMENTS ? 1 : VW;
      for (int e = threadIdx.x; e < TN * nb / g; e += NT) {
        const Run u(e, g, p_vec == CHANNELS || (p_vec == ELEMENTS && p_cfast), nb, TN);  // r: k (position), c: ci
        const int64_t mb = kb + u.r, ci = ci0 + u.c;
        const bool in = mb < k_end && ci < C_in;
        scalar_t v[VW];
        if (in) load_run(p.ptr + row_off[u.r] + ci * p.sc, g, v);
#pragma unroll
        for (int j = 0; j < VW; ++j) {
          if (j >= g) break;
          const int kk = u.r + j * u.dr, c = u.c + j * u.dc;  // a run of positions stays in its segment
          const acc_t sub = in && shift != nullptr ? load_param(shift + ci0 + c) : acc_t(0);
          Bs[kk / KD * TN * ld + c * ld + kk % KD] =
              in ? static_cast<scalar_t>(static_cast<acc_t>(v[j]) - sub) : static_cast<scalar_t>(acc_t(0));
        }
      }
    }
    cluster_sync();  // every share of the step staged
#pragma unroll 1
    for (int t = 0; t < L.sa * cy; ++t) {  // segment t: positions k0 + t KD .. + KD, in order
      const int a_by = t / L.sa, b_bx = t / L.sb;  // the blocks that staged it (own shares read locally)
      const scalar_t* A = (a_by == by ? As : cluster_peer(As, z_rank + bx + cx * a_by)) + t % L.sa * ROWS * ld;
      const scalar_t* B = (b_bx == bx ? Bs : cluster_peer(Bs, z_rank + b_bx + cx * by)) + t % L.sb * TN * ld;
      mma_chunk(acc, A, ld, B, ld, KD, f, tf32);
    }
    cluster_sync();  // every block done with the step's shares before they are restaged
  }
  if (cz > 1) {  // z-rank 0 sums the ranks' parts (sum_parts); its partial is theirs
    static_assert(ROWS / 16 * 4 * NT == ROWS * TN, "the accumulators fill DwSmem's kDwRows x 64 park");
    acc_t* park = reinterpret_cast<acc_t*>(smem);
#pragma unroll
    for (int j = 0; j < ROWS / 16; ++j)
#pragma unroll
      for (int v = 0; v < 4; ++v) park[(j * 4 + v) * NT + threadIdx.x] = acc[j][v];
    cluster_sync();
    if (bz == 0) {
      const acc_t* peer[4] = {park, nullptr, nullptr, nullptr};
      for (int r = 1; r < cz; ++r) peer[r] = cluster_peer(park, cx * cy * r + bx + cx * by);
#pragma unroll
      for (int j = 0; j < ROWS / 16; ++j)
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          const int at = (j * 4 + v) * NT + threadIdx.x;
          acc[j][v] = sum_parts<acc_t>(cz, [&](int r) { return r == 0 ? acc[j][v] : peer[r][at]; });
        }
    }
    cluster_sync();  // a block's shared memory stays until rank 0 has read it
    if (bz != 0) return;
  }
  acc_t* out = ws + (int64_t)(blockIdx.z / cz) * C_out * C_in;
#pragma unroll
  for (int j = 0; j < ROWS / 16; ++j)
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int64_t co = co0 + f.row(v), ci = ci0 + f.col(j, v);
      if (co < C_out && ci < C_in) store_act(out + co * C_in + ci, acc[j][v]);
    }
}

// dW[co][ci] = the splits summed in a fixed order, each split the sum_parts of its `group`
// partials (its parts, or pairs of them, that no cluster summed); in eval, + rstd gamma
// dbeta shift[ci]: the partials summed dy (p - shift)^T and dW needs dy p^T. (In training
// sum_m dy = 0, so the shift drops out exactly.)
template <typename acc_t>
__global__ void __launch_bounds__(FIN_THREADS) dw_reduce_kernel(
    const acc_t* ws, int64_t splits, int group, int C_out, int C_in, acc_t* dw, const acc_t* shift, const acc_t* var,
    const acc_t* gamma, const acc_t* dbeta, acc_t eps) {
  const int64_t numel = (int64_t)C_out * C_in;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < numel; i += (int64_t)gridDim.x * blockDim.x) {
    acc_t s = 0;
    for (int64_t z = 0; z < splits; ++z)
      s += sum_parts<acc_t>(group, [&](int g) { return load_act(ws + (z * group + g) * numel + i); });
    if (shift != nullptr) {
      const int64_t co = i / C_in;
      const acc_t rstd = inv_sqrt(load_param(var + co) + eps);
      const acc_t scale = gamma != nullptr ? rstd * load_param(gamma + co) : rstd;
      s += scale * load_param(dbeta + co) * load_param(shift + i - co * C_in);
    }
    store_param(dw + i, s);
  }
}

// The per-call operands of the row kernels: shift[c] = mean of x[0, c, :s, :s] for c < C (0
// where not finite, so a NaN or Inf stays where it is instead of spreading;
// hires_kernels/shapes.py's data_shift), and where w_lp is given the weight in x's dtype, the
// GEMMs' operand (WeightOperand), rounded once here instead of by every block that stages it.
template <typename scalar_t, typename acc_t>
__global__ void operands_kernel(Act<const scalar_t> x, int C, int H, int W, int s, acc_t* shift, const acc_t* weight,
                                int64_t weight_numel, scalar_t* w_lp) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  for (int64_t e = i; w_lp != nullptr && e < weight_numel; e += (int64_t)gridDim.x * blockDim.x)
    store_param(w_lp + e, static_cast<scalar_t>(load_param(weight + e)));
  if (i >= C) return;
  const int c = (int)i;
  const int hs = min(s, H), ws = min(s, W);
  acc_t sum = 0;
  for (int h = 0; h < hs; ++h)
    for (int w = 0; w < ws; ++w) sum += static_cast<acc_t>(load_act(x.ptr + x.offset(0, c, h, w)));
  const acc_t m = sum / static_cast<acc_t>(hs * ws);
  store_param(shift + c, isfinite(m) ? m : acc_t(0));
}

// ---------------------------------------------------------------------------------
// hires::pool_source (csrc/pool_source.h): x pooled once for every target's stride, and in
// backward one grad_x written from every target's gradient of its pooled input. The
// single-projection kernels above then run at stride 1 on each pooled input.
//
// The strides (> 1, distinct) are the levels s_0 < ... < s_{L-1} = S; each divides the next,
// so x cut into blocks of S x S pixels puts every window of every level inside one block.
// A tile (one thread block) is cc channels of one image by a band of S rows and bw blocks
// of columns; its per-window values of every level stay in shared memory, each level's
// buffer [cc][S / s][bw S / s] stored in the activations' order (channel fastest in
// channels_last, column fastest in NCHW), so that the thread that owns an element also
// owns the global address of its layout and consecutive threads touch consecutive
// addresses. Level 0 is built from x, level l from level l - 1 (sums of whole windows, in a
// fixed order); an average divides by the pixels its window covers (avg_pool2d without
// padding: ceil mode's last windows are partial). In floor mode a finer window may reach
// past the coarser ones, and trailing pixels no window covers get a zero gradient.
// PM pool_many_kernel   x read once (the pixels the finest windows cover), every level's
//    average written once.
// PU unpool_sum_kernel  every level's gradient read once, grad_x written once:
//    grad_x(h, w) = sum_l g_l(window of (h, w)) / covered.

constexpr int kMaxLevels = 8;  // a ninth level would need a stride of at least 512

struct PoolGeometry {
  int L, S;                                              // levels; S = s_{L-1}
  int s[kMaxLevels], ho[kMaxLevels], wo[kMaxLevels];     // each level's stride and pooled size
  int C, H, W;
  int cc, bw, c_tiles, w_tiles, h_tiles;                 // tiles: cc channels x bw blocks of S x S
  bool cfast;                                            // channels_last
  int xw;  // NCHW: columns of x (PM) / grad_x (PU) per access, 16 / e where column_runs allows, else 1
};

// Offsets (in acc_t elements) of a tile's shared buffers: one per level, then (pool_many)
// the column sums of x over the rows of each level-0 window [cc][S / s_0][bw S].
struct PoolSmem {
  int64_t level[kMaxLevels], columns, total;
  __host__ __device__ PoolSmem(const PoolGeometry& g, bool with_columns) {
    int64_t at = 0;
    for (int l = 0; l < g.L; ++l) {
      level[l] = at;
      at += (int64_t)g.cc * (g.S / g.s[l]) * (g.bw * g.S / g.s[l]);
    }
    columns = at;
    if (with_columns) at += (int64_t)g.cc * (g.S / g.s[0]) * g.bw * g.S;
    total = at;
  }
};

template <typename T>
struct LevelActs {
  Act<T> t[kMaxLevels];
};

// The tile of this block: image n, channels from c0, input rows from h0, columns from w0.
struct PoolTile {
  int n, c0, h0, w0;
  __device__ explicit PoolTile(const PoolGeometry& g) {
    int t = (int)blockIdx.x;
    const int ct = t % g.c_tiles;
    t /= g.c_tiles;
    const int wt = t % g.w_tiles;
    t /= g.w_tiles;
    n = t / g.h_tiles;
    c0 = ct * g.cc;
    h0 = t % g.h_tiles * g.S;
    w0 = wt * g.bw * g.S;
  }
};

// Element (c, r, col) of a [cc][rows][cols] tile buffer at position e in the activations'
// order, and back.
struct TileIndex {
  int c, r, col;
};
__device__ __forceinline__ TileIndex tile_index(int e, int cc, int rows, int cols, bool cfast) {
  if (cfast) return {e % cc, e / cc / cols, e / cc % cols};
  return {e / (rows * cols), e / cols % rows, e % cols};
}
__device__ __forceinline__ int tile_offset(int c, int r, int col, int cc, int rows, int cols, bool cfast) {
  return cfast ? (r * cols + col) * cc + c : (c * rows + r) * cols + col;
}

// Pixels a window of stride s starting at o * s covers along a side of n pixels.
__device__ __forceinline__ int covered(int o, int s, int n) { return min(s, n - o * s); }

// Each thread takes V consecutive channels of a tile position (a group): i.c below is the
// group, its channels i.c * V + j; V > 1 only in channels_last, where they are adjacent in
// the tile buffers too.
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(NT) pool_many_kernel(PoolGeometry g, Act<const scalar_t> x,
                                                        LevelActs<scalar_t> out) {
  HIRES_DYNAMIC_SHARED(smem);
  const PoolSmem L(g, true);
  acc_t* sums = reinterpret_cast<acc_t*>(smem);
  const PoolTile t(g);
  const int s0 = g.s[0], X = g.bw * g.S, groups = g.cc / V;
  // Only the pixels the level-0 windows cover are read (floor mode leaves the others).
  const int h_end = min(g.H, g.ho[0] * s0), w_end = min(g.W, g.wo[0] * s0);
  acc_t* columns = sums + L.columns;
  // A thread sums the columns of one run: V channels of a column (channels_last), or in NCHW
  // xw consecutive columns of a channel (xw > 1: 16-byte runs, column_runs); a run is wholly
  // in or out of range (C, and w_end and the tiles' columns, split whole runs).
  constexpr int VW = Vec16<scalar_t>::n;
  const int xw = g.xw, run = V > 1 ? V : xw;
  for (int e = threadIdx.x; e < groups * (g.S / s0) * (X / xw); e += NT) {
    const TileIndex i = tile_index(e, groups, g.S / s0, X / xw, g.cfast);
    const int c = t.c0 + i.c * V, h0 = t.h0 + i.r * s0, w = t.w0 + i.col * xw;
    acc_t sum[VW];
#pragma unroll
    for (int j = 0; j < VW; ++j) sum[j] = acc_t(0);
    if (c < g.C && w < w_end)
      for (int h = h0; h < min(h0 + s0, h_end); ++h) {
        scalar_t v[VW];
        load_run(x.ptr + x.offset(t.n, c, h, w), run, v);
#pragma unroll
        for (int j = 0; j < VW; ++j)
          if (j < run) sum[j] += static_cast<acc_t>(v[j]);
      }
#pragma unroll
    for (int j = 0; j < VW; ++j)
      if (j < run)
        columns[V > 1 ? tile_offset(i.c * V + j, i.r, i.col, g.cc, g.S / s0, X, g.cfast)
                      : tile_offset(i.c, i.r, i.col * xw + j, g.cc, g.S / s0, X, g.cfast)] = sum[j];
  }
  __syncthreads();
  for (int l = 0; l < g.L; ++l) {
    const int s = g.s[l], rows = g.S / s, cols = X / s;
    // A window's parts: level 0 adds s_0 column sums, level l the q x q windows of level l - 1.
    const int qr = l == 0 ? 1 : s / g.s[l - 1], qc = l == 0 ? s : qr;
    const acc_t* part = l == 0 ? columns : sums + L.level[l - 1];
    acc_t* mine = sums + L.level[l];
    for (int e = threadIdx.x; e < groups * rows * cols; e += NT) {
      const TileIndex i = tile_index(e, groups, rows, cols, g.cfast);
      const int c = t.c0 + i.c * V, oh = t.h0 / s + i.r, ow = t.w0 / s + i.col;
      const bool in = c < g.C && oh < g.ho[l] && ow < g.wo[l];
      const acc_t count = in ? static_cast<acc_t>(covered(oh, s, g.H) * covered(ow, s, g.W)) : acc_t(1);
      scalar_t o[V];
      for (int j = 0; j < V; ++j) {
        const int cj = i.c * V + j;
        acc_t sum = 0;
        for (int a = 0; a < qr; ++a)
          for (int b = 0; b < qc; ++b)
            sum += part[tile_offset(cj, i.r * qr + a, i.col * qc + b, g.cc, rows * qr, cols * qc, g.cfast)];
        mine[tile_offset(cj, i.r, i.col, g.cc, rows, cols, g.cfast)] = sum;
        o[j] = static_cast<scalar_t>(sum / count);
      }
      if (in) store_run(out.t[l].ptr + out.t[l].offset(t.n, c, oh, ow), V, o);
    }
    __syncthreads();
  }
}

template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(NT) unpool_sum_kernel(PoolGeometry g, LevelActs<const scalar_t> grad,
                                                         Act<scalar_t> grad_x) {
  HIRES_DYNAMIC_SHARED(smem);
  const PoolSmem L(g, false);
  acc_t* vals = reinterpret_cast<acc_t*>(smem);
  const PoolTile t(g);
  const int X = g.bw * g.S, groups = g.cc / V;
  // Per window, coarsest first: its gradient's share of each pixel it covers plus its
  // parent's value. A window that does not exist holds 0: in floor mode a finer window
  // that reaches past the coarser ones finds its parent 0.
  for (int l = g.L - 1; l >= 0; --l) {
    const int s = g.s[l], rows = g.S / s, cols = X / s;
    const int q = l + 1 < g.L ? g.s[l + 1] / s : 1;
    acc_t* mine = vals + L.level[l];
    for (int e = threadIdx.x; e < groups * rows * cols; e += NT) {
      const TileIndex i = tile_index(e, groups, rows, cols, g.cfast);
      const int c = t.c0 + i.c * V, oh = t.h0 / s + i.r, ow = t.w0 / s + i.col;
      const bool in = c < g.C && oh < g.ho[l] && ow < g.wo[l];
      scalar_t gv[V];
      if (in) load_run(grad.t[l].ptr + grad.t[l].offset(t.n, c, oh, ow), V, gv);
      const acc_t count = in ? static_cast<acc_t>(covered(oh, s, g.H) * covered(ow, s, g.W)) : acc_t(1);
      for (int j = 0; j < V; ++j) {
        const int cj = i.c * V + j;
        acc_t v = 0;
        if (in) {
          v = static_cast<acc_t>(gv[j]) / count;
          if (l + 1 < g.L)
            v += vals[L.level[l + 1] + tile_offset(cj, i.r / q, i.col / q, g.cc, rows / q, cols / q, g.cfast)];
        }
        mine[tile_offset(cj, i.r, i.col, g.cc, rows, cols, g.cfast)] = v;
      }
    }
    __syncthreads();
  }
  // Runs as in pool_many_kernel: V channels of a pixel, or xw columns of a channel's row.
  const int s0 = g.s[0];
  constexpr int VW = Vec16<scalar_t>::n;
  const int xw = g.xw, run = V > 1 ? V : xw;
  for (int e = threadIdx.x; e < groups * g.S * (X / xw); e += NT) {
    const TileIndex i = tile_index(e, groups, g.S, X / xw, g.cfast);
    const int c = t.c0 + i.c * V, h = t.h0 + i.r, w = t.w0 + i.col * xw;
    if (c >= g.C || h >= g.H || w >= g.W) continue;
    scalar_t o[VW];
#pragma unroll
    for (int j = 0; j < VW; ++j)
      o[j] = static_cast<scalar_t>(
          j >= run ? acc_t(0)
          : V > 1  ? vals[L.level[0] + tile_offset(i.c * V + j, i.r / s0, i.col / s0, g.cc, g.S / s0, X / s0, g.cfast)]
                   : vals[L.level[0] + tile_offset(i.c, i.r / s0, (i.col * xw + j) / s0, g.cc, g.S / s0, X / s0,
                                                   g.cfast)]);
    store_run(grad_x.ptr + grad_x.offset(t.n, c, h, w), run, o);
  }
}

// ---------------------------------------------------------------------------------
// Host side.

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename scalar_t>
Act<scalar_t> act_view(const at::Tensor& t) {
  if (!t.defined()) return Act<scalar_t>{nullptr, 0, 0, 0, 0};
  return Act<scalar_t>{static_cast<scalar_t*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

template <typename acc_t>
acc_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<acc_t>() : nullptr;
}

int device_attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

// Whether launches may use thread-block clusters: the code that runs was built for sm_90 (a
// build for sm_80 run on a Hopper, from its PTX, has none: its cluster_sync is the block's
// barrier), and $HIRES_CUDA_CLUSTERS is not 0 (read per call: the same results, bitwise,
// from single blocks).
bool clusters_enabled(int device) {
  static std::atomic<int> built_for[64];  // per device: the loaded code's arch (0: not asked yet)
  const bool cached = device >= 0 && device < 64;
  int arch = cached ? built_for[device].load() : 0;
  if (arch == 0) {
    cudaFuncAttributes built;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&built, fwd_finalize_kernel<float>));
    arch = std::min(built.binaryVersion, built.ptxVersion);
    if (cached) built_for[device] = arch;
  }
  const char* env = std::getenv("HIRES_CUDA_CLUSTERS");
  return arch >= 90 && !(env != nullptr && std::string(env) == "0");
}

// Launch setup that depends only on the device and the kernel (a driver call each: on every
// projection call, host time for nothing) is done on a kernel's first launch on a device and
// its answer kept, per key (device, kernel, dynamic shared memory, cluster dims); ask()
// returns the answer, or nothing where a CUDA call failed (asked again next time). Devices
// outside 0..63 ask every time: the CPU emulation's tensors have none, and its knobs change
// the emulated device between calls.
using SetupKey = std::tuple<int, const void*, int, unsigned, unsigned, unsigned>;

class SetupAnswers {
 public:
  template <typename Ask>
  static bool get(const SetupKey& key, Ask ask) {
    const int device = std::get<0>(key);
    if (device < 0 || device >= 64) return ask().value_or(false);
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      const auto it = answers_.find(key);
      if (it != answers_.end()) return it->second;
    }
    const std::optional<bool> answer = ask();  // two threads may both ask: the same answer
    if (!answer) return false;
    const std::lock_guard<std::mutex> lock(mutex_);
    answers_.emplace(key, *answer);
    return *answer;
  }

 private:
  static inline std::mutex mutex_;
  static inline std::map<SetupKey, bool> answers_;
};

// The kernel's dynamic shared-memory limit raised to the device's per-block maximum: one
// value, so that concurrent calls never lower it under each other's launches.
template <typename F>
void allow_device_smem(F* kernel, int device) {
  SetupAnswers::get({device, reinterpret_cast<const void*>(kernel), -1, 0, 0, 0}, [&] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device)));
    return std::optional<bool>(true);
  });
}

// Whether the device can run clusters of config's dims (non-portable beyond 8 blocks) of
// kernel (its shared-memory limit already raised); false, not an error, where it cannot or
// where the query fails (not kept: clusters change no result, so a failed query costs speed).
template <typename F>
bool cluster_fits(F* kernel, const cudaLaunchConfig_t& config, dim3 cluster, int device) {
  const unsigned blocks = cluster.x * cluster.y * cluster.z;
  return SetupAnswers::get({device, reinterpret_cast<const void*>(kernel), (int)config.dynamicSmemBytes, cluster.x,
                            cluster.y, cluster.z}, [&]() -> std::optional<bool> {
    if (blocks > 8 && cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess) {
      (void)cudaGetLastError();
      return std::nullopt;
    }
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess) {
      (void)cudaGetLastError();
      return std::nullopt;
    }
    return clusters > 0;
  });
}

// A launch configuration in clusters of `cluster` blocks (none for 1 x 1 x 1), and its attribute.
struct ClusterLaunch {
  cudaLaunchAttribute attribute;
  cudaLaunchConfig_t config;
  ClusterLaunch(dim3 grid, dim3 cluster, int smem, cudaStream_t stream) {
    attribute.id = cudaLaunchAttributeClusterDimension;
    attribute.val.clusterDim.x = cluster.x;
    attribute.val.clusterDim.y = cluster.y;
    attribute.val.clusterDim.z = cluster.z;
    config = cudaLaunchConfig_t{grid, dim3(NT), (size_t)smem, stream, &attribute,
                                cluster.x * cluster.y * cluster.z > 1 ? 1u : 0u};
  }
  ClusterLaunch(const ClusterLaunch&) = delete;  // config points at attribute
};

// Rows per block of the row kernels: 64, halved (down to 16) while the grid has fewer
// than 2 waves of 2 blocks per SM or the shared memory exceeds what 2 blocks per SM
// leave each; then the largest that fits at all. Where 16-row tiles still give under 2
// waves (M / 16 < 4 SMs: the H' = 4 shapes), cs = 2 or 4 blocks per tile (Share), the
// fewest that reach 2 waves, where the channels split evenly (launch_rows keeps those the
// device can schedule).
struct RowLaunch {
  int tm, smem, cs;
  int64_t tiles;
  int device;
};

RowLaunch row_launch(int64_t M, int C_in, int C_out, bool with_dy, int acc_size, int elt_size, int device) {
  const int sms = device_attribute(cudaDevAttrMultiProcessorCount, device);
  const int smem_max = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  const int smem_sm = device_attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
  auto bytes = [&](int tm) { return RowSmem(tm, C_in, C_out, with_dy, acc_size, elt_size).total; };
  int tm = 64;
  while (tm > 16 && (cdiv(M, tm) < 4 * (int64_t)sms || bytes(tm) > smem_sm / 2 - 1024)) tm /= 2;
  TORCH_CHECK(bytes(tm) <= smem_max, "projection (cuda): C_in=", C_in, ", C_out=", C_out,
              " need ", bytes(tm), " bytes of shared memory per block; the device has ", smem_max);
  // Runs of up to 8 positions (16 bytes) never cross a tile: tm is 16, 32 or 64.
  TORCH_CHECK(tm % 8 == 0, "projection (cuda): internal error: row tile of ", tm, " positions");
  const int64_t tiles = cdiv(M, tm);
  int cs = 1;
  if (tiles < 4 * (int64_t)sms && clusters_enabled(device))
    while (cs < 4 && tiles * cs < 4 * (int64_t)sms && C_out % (64 * 2 * cs) == 0 && C_in % (16 * 2 * cs) == 0) cs *= 2;
  return {tm, bytes(tm), cs, tiles, device};
}

template <typename scalar_t, typename acc_t, int EPI>
void launch_rows(RowArgs<scalar_t, acc_t> k, const RowLaunch& l, cudaStream_t stream) {
  const auto kernel = rows_kernel<scalar_t, acc_t, EPI>;
  TORCH_CHECK(l.tiles * l.cs <= INT32_MAX, "projection (cuda): problem too large for the grid");
  allow_device_smem(kernel, l.device);
  k.cs = l.cs;
  while (k.cs > 1 && !cluster_fits(kernel, ClusterLaunch(dim3((unsigned)(l.tiles * k.cs)), dim3(k.cs), l.smem,
                                                         stream).config, dim3(k.cs), l.device))
    k.cs /= 2;
  const ClusterLaunch launch(dim3((unsigned)(l.tiles * k.cs)), dim3(k.cs), l.smem, stream);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&launch.config, rows_kernel<scalar_t, acc_t, EPI>, k));
}

// The dW kernel's launch: tiles of kDwRows x 64 channels, split over m (2 waves of tiles, at
// least 256 positions per split), and on sm_90 clusters of cx x cy tiles of a split that share
// their operands: the largest (up to 4 x 4) that tile the grid. Where that gives under 2
// waves, each split goes to 2 or 4 parts of whole steps (the fewest that reach 2 waves, with
// at most 16 blocks a cluster), run by the cluster's z-ranks. A cluster must leave 2 blocks
// per SM their shared memory and be one the device can schedule
// (cudaOccupancyMaxActiveClusters); until it is, its z is halved (a split's parts then go to
// `group` partials for dw_reduce_kernel), then its longer side; 1 x 1 x 1 without clusters.
// The parts are whole steps of the largest cluster whether or not clusters run (or which
// fit): every block of every choice then adds the same positions in the same order, and
// sum_parts the same parts in the same order, so dW is bitwise the same.
struct DwLaunch {
  dim3 grid, cluster;
  int smem;
  int64_t chunk;     // positions per part
  int64_t partials;  // written to the workspace
  int group;         // partials per split
};

template <typename scalar_t, typename acc_t>
DwLaunch dw_launch(int64_t M, int64_t C_in, int64_t C_out, int device) {
  const int64_t sms = device_attribute(cudaDevAttrMultiProcessorCount, device);
  const int smem_sm = device_attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
  const int smem_max = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  const int64_t tiles_co = cdiv(C_out, kDwRows<scalar_t>), tiles_ci = cdiv(C_in, TN);
  TORCH_CHECK(tiles_co <= INT32_MAX && tiles_ci <= 65535, "projection_backward (cuda): problem too large for the grid");
  unsigned cx = 1, cy = 1, cz = 1;
  while (cx < 4 && tiles_co % (2 * cx) == 0) cx *= 2;
  while (cy < 4 && tiles_ci % (2 * cy) == 0) cy *= 2;
  const int64_t tiles = tiles_co * tiles_ci;
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>({cdiv(4 * sms, tiles), cdiv(M, 256), 65535}));
  const int64_t span = KD * std::max(cx, cy);  // the largest cluster's step
  const int64_t per_split = cdiv(M, splits);
  while (cz < 4 && cx * cy * cz * 2 <= 16 && tiles * splits * cz < 4 * sms && per_split >= 2 * cz * span) cz *= 2;
  const unsigned parts = cz;  // per split
  DwLaunch d;
  d.chunk = cdiv(per_split, parts * span) * span;
  d.grid = dim3((unsigned)tiles_co, (unsigned)tiles_ci, (unsigned)(cdiv(M, d.chunk * parts) * parts));
  allow_device_smem(dw_partial_kernel<scalar_t, acc_t>, device);
  if (!clusters_enabled(device)) cx = cy = cz = 1;
  for (;;) {
    d.cluster = dim3(cx, cy, cz);
    d.smem = DwSmem(kDwRows<scalar_t>, (int)cx, (int)cy, (int)cz, sizeof(scalar_t), sizeof(acc_t)).total;
    if (cx * cy * cz == 1) break;
    if (d.smem <= smem_sm / 2 - 1024 && d.smem <= smem_max &&
        cluster_fits(dw_partial_kernel<scalar_t, acc_t>, ClusterLaunch(d.grid, d.cluster, d.smem, 0).config, d.cluster,
                     device))
      break;
    if (cz > 1)
      cz /= 2;  // fewer z-ranks, more partials a split (group): sum_parts keeps the order
    else if (cx >= cy)
      cx /= 2;
    else
      cy /= 2;
  }
  d.group = (int)(parts / cz);
  d.partials = d.grid.z / cz;
  return d;
}

// Whether a kernel may access activation t in 16-byte runs of channels: its channel stride
// is 1 and every other stride, C and the address are multiples of 16 bytes (a dense
// channels_last tensor of C % (16 / e) == 0 from the allocator).
bool channel_vectors(const at::Tensor& t, size_t elt) {
  const int64_t vw = 16 / (int64_t)elt;
  return t.stride(1) == 1 && t.size(1) % vw == 0 && t.stride(0) % vw == 0 && t.stride(2) % vw == 0 &&
         t.stride(3) % vw == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// How the row kernels access activation t: in runs of channels (channel_vectors), else, where
// t is at the rows' resolution (positions_ok: a row is one of its pixels), in 16-byte runs of
// positions: each channel plane dense (NCHW), its positions and every other stride and the
// address multiples of 16 bytes, so a run of a tile's rows is one image's consecutive
// pixels; else element by element.
VecMode vec_mode(const at::Tensor& t, size_t elt, bool positions_ok) {
  if (channel_vectors(t, elt)) return CHANNELS;
  const int64_t vw = 16 / (int64_t)elt;
  const bool planes = t.stride(3) == 1 && t.stride(2) == t.size(3) && t.size(2) * t.size(3) % vw == 0 &&
                      t.stride(1) % vw == 0 && t.stride(0) % vw == 0 &&
                      reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  return positions_ok && planes ? POSITIONS : ELEMENTS;
}

// Whether the row kernels may read x (or write grad_x) at stride s > 1 in WINDOWS runs: NCHW
// rows of pixels with s dividing a 16-byte run, the windows tiling each row exactly (W = Wo s,
// no partial window across a run) in runs of 16 / (e s) windows within one row of windows
// (Wo a multiple), and the rows, planes and address at multiples of 16 bytes.
bool window_vectors(const at::Tensor& t, int64_t s, int64_t Wo, size_t elt) {
  const int64_t vw = 16 / (int64_t)elt;
  return s > 1 && vw % s == 0 && t.stride(3) == 1 && t.size(3) == Wo * s && Wo % (vw / s) == 0 &&
         t.stride(2) % vw == 0 && t.stride(1) % vw == 0 && t.stride(0) % vw == 0 &&
         reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// Whether float32 GEMMs may run in TF32: as torch decides it for its own float32 matmuls
// (torch.backends.cuda.matmul.fp32_precision = "tf32", which allow_tf32 and
// set_float32_matmul_precision set too; not under a NoTF32Guard). Before torch 2.13 through
// the legacy flag, IEEE where torch refuses to read it (legacy and new settings disagree).
bool tf32_allowed() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 13)
  return !at::NoTF32Guard::should_disable_tf32() &&
         at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
             at::Float32Precision::TF32;
#else
  try {
    return at::globalContext().allowTF32CuBLAS();
  } catch (const c10::Error&) {
    return false;
  }
#endif
}

// The row kernels' weight operand in x's dtype: for bf16 / fp16 a copy that operands_kernel
// fills (`to_fill`), for float32 / float64 the weight itself (acc_t [C_out][C_in], contiguous).
template <typename scalar_t>
struct WeightOperand {
  at::Tensor copy;
  const scalar_t* ptr;
  scalar_t* to_fill;  // nullptr where the weight is its own operand
  int run;            // RowArgs::w_run
};

template <typename scalar_t, typename acc_t>
WeightOperand<scalar_t> weight_operand(const at::Tensor& weight) {
  WeightOperand<scalar_t> w{};
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    w.ptr = weight.data_ptr<scalar_t>();
  } else {
    w.copy = at::empty(weight.sizes(), weight.options().dtype(c10::CppTypeToScalarType<scalar_t>::value));
    w.to_fill = w.copy.template data_ptr<scalar_t>();
    w.ptr = w.to_fill;
  }
  constexpr int VW = Vec16<scalar_t>::n;
  w.run = weight.size(1) % VW == 0 && reinterpret_cast<uintptr_t>(w.ptr) % 16 == 0 ? VW : 1;
  return w;
}

// One launch of operands_kernel: x's shift over C channels (C = 0: none) and the weight
// operand where it is a copy.
template <typename scalar_t, typename acc_t>
void launch_operands(const at::Tensor& x, int64_t C, int64_t stride, acc_t* shift, const at::Tensor& weight,
                     const WeightOperand<scalar_t>& w, cudaStream_t stream) {
  const int64_t numel = w.to_fill != nullptr ? weight.numel() : 0;
  const int64_t threads = std::max<int64_t>(C, cdiv(numel, 8));  // up to 8 weight elements a thread
  if (threads == 0) return;
  operands_kernel<scalar_t, acc_t><<<(unsigned)std::min<int64_t>(cdiv(threads, FIN_THREADS), 65535), FIN_THREADS, 0,
                                     stream>>>(act_view<const scalar_t>(x), (int)C, x.defined() ? (int)x.size(2) : 0,
                                               x.defined() ? (int)x.size(3) : 0, (int)stride, shift,
                                               weight.data_ptr<acc_t>(), numel, w.to_fill);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The fields of the row kernels' arguments that forward and backward set alike.
template <typename scalar_t, typename acc_t>
RowArgs<scalar_t, acc_t> row_args(const at::Tensor& src, int64_t s, const acc_t* shift, const at::Tensor& weight,
                                  const WeightOperand<scalar_t>& w, int64_t Ho, int64_t Wo, const at::Tensor& act,
                                  const RowLaunch& l, double eps, bool training) {
  RowArgs<scalar_t, acc_t> k{};
  k.src = act_view<const scalar_t>(src);
  k.s = (int)s; k.H = (int)src.size(2); k.W = (int)src.size(3);
  k.src_cfast = src.stride(1) == 1 && src.size(1) > 1;
  k.src_vec = vec_mode(src, sizeof(scalar_t), s == 1);
  if (k.src_vec == ELEMENTS && window_vectors(src, s, Wo, sizeof(scalar_t))) k.src_vec = WINDOWS;
  k.shift = shift;
  k.weight = weight.data_ptr<acc_t>();
  k.w = w.ptr;
  k.w_run = w.run;
  k.C_in = (int)weight.size(1); k.C_out = (int)weight.size(0); k.Ho = (int)Ho; k.Wo = (int)Wo; k.tm = l.tm;
  k.tf32 = std::is_same_v<scalar_t, float> && tf32_allowed();
  k.M = src.size(0) * Ho * Wo;
  k.eps = static_cast<acc_t>(eps);
  k.training = training;
  k.act_cfast = act.stride(1) == 1 && act.size(1) > 1;
  return k;
}

using ForwardResult = hires::ProjectionResult;
using BackwardResult = hires::ProjectionBackwardResult;

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

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "projection_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* shift_ptr = shift.data_ptr<acc_t>();
    const WeightOperand<scalar_t> w = weight_operand<scalar_t, acc_t>(a.weight);
    launch_operands<scalar_t, acc_t>(x, C_in, stride, shift_ptr, a.weight, w, stream);
    const RowLaunch l = row_launch(M, (int)C_in, (int)C_out, false, sizeof(acc_t), sizeof(scalar_t), x.get_device());
    // The first pass over x pools it (and stores `pooled`); training's second pass reads
    // `pooled` (x itself at stride 1).
    RowArgs<scalar_t, acc_t> k = row_args<scalar_t, acc_t>(x, stride, shift_ptr, a.weight, w, Ho, Wo, out, l, eps,
                                                           training);
    k.pooled = act_view<scalar_t>(stride > 1 ? pooled : at::Tensor());
    // Runs of channels store `pooled` in the same runs; WINDOWS runs store it element-wise.
    if (stride > 1 && k.src_vec == CHANNELS && vec_mode(pooled, sizeof(scalar_t), false) != CHANNELS)
      k.src_vec = ELEMENTS;
    k.gamma = ptr_or_null<acc_t>(a.bn_weight);
    k.beta = ptr_or_null<acc_t>(a.bn_bias);
    k.out = act_view<scalar_t>(out);
    k.residual = act_view<const scalar_t>(a.residual);
    k.out_vec = vec_mode(out, sizeof(scalar_t), true);
    if (a.residual.defined() && vec_mode(a.residual, sizeof(scalar_t), true) != k.out_vec) k.out_vec = ELEMENTS;

    if (training) {
      at::Tensor part = at::empty({2, l.tiles, C_out}, aopt);
      k.part0 = part[0].data_ptr<acc_t>();
      k.part1 = part[1].data_ptr<acc_t>();
      launch_rows<scalar_t, acc_t, FWD_STATS>(k, l, stream);
      fwd_finalize_kernel<acc_t><<<(unsigned)cdiv(C_out, FIN_CHANNELS), FIN_THREADS, 0, stream>>>(
          k.part0, k.part1, l.tiles, l.tm, M, (int)C_out, mean.data_ptr<acc_t>(), var.data_ptr<acc_t>(), k.weight,
          shift_ptr, (int)C_in, stats_in_kernel ? running_mean.data_ptr<acc_t>() : nullptr,
          stats_in_kernel ? running_var.data_ptr<acc_t>() : nullptr, static_cast<acc_t>(momentum));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (stride > 1) {
        k.src = act_view<const scalar_t>(pooled);
        k.src_vec = vec_mode(pooled, sizeof(scalar_t), true);
        k.s = 1; k.H = (int)Ho; k.W = (int)Wo;
        k.shift = nullptr;
        k.pooled = act_view<scalar_t>(at::Tensor());
      }
      k.mean = mean.data_ptr<acc_t>();
      k.var = var.data_ptr<acc_t>();
    } else {
      k.mean = eval_mean.data_ptr<acc_t>();
      k.var = eval_var.data_ptr<acc_t>();
      k.eval_shift = shift_ptr;
      k.mean_out = mean.data_ptr<acc_t>();
      k.var_out = var.data_ptr<acc_t>();
    }
    launch_rows<scalar_t, acc_t, FWD_APPLY>(k, l, stream);
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
  const int device = grad_out.get_device();

  const int sms = device_attribute(cudaDevAttrMultiProcessorCount, device);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "projection_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Stride > 1 saved the already-shifted pooled input; stride 1 saved x itself.
    const acc_t* sub = stride == 1 ? shift_c.data_ptr<acc_t>() : nullptr;
    const RowLaunch l = row_launch(M, (int)C_in, (int)C_out, true, sizeof(acc_t), sizeof(scalar_t), device);
    const WeightOperand<scalar_t> w = weight_operand<scalar_t, acc_t>(weight);
    launch_operands<scalar_t, acc_t>(at::Tensor(), 0, 1, nullptr, weight, w, stream);
    RowArgs<scalar_t, acc_t> k = row_args<scalar_t, acc_t>(saved, 1, sub, weight, w, Ho, Wo, grad_out, l, eps,
                                                           training);
    k.mean = mean_c.data_ptr<acc_t>();
    k.var = var_c.data_ptr<acc_t>();
    k.gamma = ptr_or_null<acc_t>(gamma);
    k.grad = act_view<const scalar_t>(grad_out);
    k.grad_vec = vec_mode(grad_out, sizeof(scalar_t), true);  // dy: [M][C_out] from the allocator

    // B1 + B2: dbeta = sum g, dgamma = sum g * yhat.
    at::Tensor part = at::empty({2, l.tiles, C_out}, aopt);
    k.part0 = part[0].data_ptr<acc_t>();
    k.part1 = part[1].data_ptr<acc_t>();
    launch_rows<scalar_t, acc_t, BWD_STATS>(k, l, stream);
    bwd_finalize_kernel<acc_t><<<(unsigned)cdiv(C_out, FIN_CHANNELS), FIN_THREADS, 0, stream>>>(
        k.part0, k.part1, l.tiles, (int)C_out, dbeta.data_ptr<acc_t>(), dgamma.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    // B3: dy (kept in scalar_t for dW) and grad_x.
    at::Tensor dy = at::empty({M, C_out}, grad_out.options().memory_format(at::MemoryFormat::Contiguous));
    k.dbeta = dbeta.data_ptr<acc_t>();
    k.dgamma = dgamma.data_ptr<acc_t>();
    k.dy = dy.data_ptr<scalar_t>();
    k.grad_x = act_view<scalar_t>(grad_x);
    k.grad_x_vec = vec_mode(grad_x, sizeof(scalar_t), stride == 1);
    if (k.grad_x_vec == ELEMENTS && window_vectors(grad_x, stride, Wo, sizeof(scalar_t))) k.grad_x_vec = WINDOWS;
    k.stride = (int)stride;
    k.in_h = (int)in_h; k.in_w = (int)in_w;
    launch_rows<scalar_t, acc_t, BWD_DX>(k, l, stream);

    // B4 + B5: dW = dy^T p (dw_launch), fixed-order reduction (+ eval's shift term).
    TORCH_CHECK(k.src_vec != WINDOWS, "projection_backward (cuda): internal error: the dW kernel reads saved in "
                "windows");
    const DwLaunch d = dw_launch<scalar_t, acc_t>(M, C_in, C_out, device);
    at::Tensor ws = at::empty({d.partials, C_out, C_in}, aopt);
    const ClusterLaunch launch(d.grid, d.cluster, d.smem, stream);
    C10_CUDA_CHECK(cudaLaunchKernelEx(&launch.config, dw_partial_kernel<scalar_t, acc_t>, k.dy, k.src, sub, k.src_cfast,
                                      C_out % Vec16<scalar_t>::n == 0, k.src_vec, (int)C_in, (int)C_out, (int)Ho,
                                      (int)Wo, M, d.chunk, (int)d.cluster.x, (int)d.cluster.y, (int)d.cluster.z, k.tf32,
                                      ws.data_ptr<acc_t>()));
    dw_reduce_kernel<acc_t><<<(unsigned)std::min<int64_t>(cdiv(C_out * C_in, FIN_THREADS), sms), FIN_THREADS, 0, stream>>>(
        ws.data_ptr<acc_t>(), d.partials / d.group, d.group, (int)C_out, (int)C_in, dweight.data_ptr<acc_t>(),
        training ? nullptr : shift_c.data_ptr<acc_t>(), k.var, k.gamma, k.dbeta, k.eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_x, dweight.view(weight_.sizes()), dgamma, dbeta};
}

// ---------------------------------------------------------------------------------
// hires::pool_source and its backward: the pooling launches.

// Elements of x per pooling tile: 16 per thread, fewer while the grid has under 2 waves
// of 8 blocks per SM; NT at the least.
constexpr int64_t kPoolTile = 16 * NT;

PoolGeometry pool_geometry(at::IntArrayRef strides, bool ceil_mode, int64_t N, int64_t C, int64_t H, int64_t W,
                           bool cfast, int device) {
  std::vector<int64_t> s(strides.begin(), strides.end());
  std::sort(s.begin(), s.end());
  TORCH_CHECK_VALUE(s.size() <= kMaxLevels, "pool_source (cuda): at most ", kMaxLevels, " strides, got ", strides);
  PoolGeometry g{};
  g.L = (int)s.size();
  g.S = (int)s.back();
  for (int l = 0; l < g.L; ++l) {
    g.s[l] = (int)s[l];
    g.ho[l] = (int)pooled_size(H, s[l], ceil_mode);
    g.wo[l] = (int)pooled_size(W, s[l], ceil_mode);
  }
  g.C = (int)C; g.H = (int)H; g.W = (int)W;
  g.cfast = cfast;
  g.xw = 1;
  // channels_last: up to 64 channels, then blocks along the row; NCHW: blocks along the
  // row, then channels.
  const int64_t block = (int64_t)g.S * g.S, blocks_w = cdiv(W, g.S);
  const int64_t sms = device_attribute(cudaDevAttrMultiProcessorCount, device);
  for (int64_t elems = kPoolTile;; elems /= 2) {
    int64_t cc, bw;
    if (cfast) {
      cc = std::min<int64_t>(C, 64);
      bw = std::clamp<int64_t>(elems / (cc * block), 1, blocks_w);
    } else {
      bw = std::clamp<int64_t>(elems / block, 1, blocks_w);
      cc = std::clamp<int64_t>(elems / (bw * block), 1, C);
    }
    g.cc = (int)cc; g.bw = (int)bw;
    g.c_tiles = (int)cdiv(C, cc); g.w_tiles = (int)cdiv(blocks_w, bw); g.h_tiles = (int)cdiv(H, g.S);
    if (elems <= NT || N * g.h_tiles * g.w_tiles * g.c_tiles >= 16 * sms) break;
  }
  TORCH_CHECK(N * g.h_tiles * g.w_tiles * g.c_tiles <= INT32_MAX, "pool_source (cuda): problem too large for the grid");
  return g;
}

// NCHW: whether the pooling kernels may move t (x, or grad_x) in 16-byte runs of a row's
// columns: every row, plane and the address at multiples of 16 bytes, and runs that the
// tiles' columns (bw S), W and the columns the finest windows cover split whole.
bool column_runs(const PoolGeometry& g, const at::Tensor& t, size_t elt) {
  const int64_t vw = 16 / (int64_t)elt;
  const int64_t covered_w = std::min<int64_t>(g.W, (int64_t)g.wo[0] * g.s[0]);
  return !g.cfast && t.stride(3) == 1 && g.W % vw == 0 && covered_w % vw == 0 && (int64_t)g.bw * g.S % vw == 0 &&
         t.stride(2) % vw == 0 && t.stride(1) % vw == 0 && t.stride(0) % vw == 0 &&
         reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

int level_of(const PoolGeometry& g, int64_t stride) { return (int)(std::find(g.s, g.s + g.L, stride) - g.s); }

// The dynamic shared memory of a pooling launch (the kernel's limit raised: allow_device_smem).
template <typename F>
int pool_smem(F* kernel, const PoolGeometry& g, bool with_columns, int acc_size, int device) {
  const int64_t bytes = PoolSmem(g, with_columns).total * acc_size;
  const int smem_max = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  TORCH_CHECK(bytes <= smem_max, "pool_source (cuda): stride ", g.S, " needs ", bytes,
              " bytes of shared memory per block; the device has ", smem_max);
  allow_device_smem(kernel, device);
  return (int)bytes;
}

// How a pooling launch moves its tensors: `acts` point at the levels (the pooled outputs, or
// their gradients), g.xw says whether `full` (x, or grad_x) goes in NCHW runs of columns, and
// the result whether every tensor takes 16-byte runs of channels (the kernels' V).
template <typename scalar_t, typename T>
bool pool_access(PoolGeometry& g, const at::Tensor& full, const std::vector<at::Tensor>& levels, LevelActs<T>& acts) {
  bool vectors = g.cfast && channel_vectors(full, sizeof(scalar_t));
  for (int l = 0; l < g.L; ++l) {
    acts.t[l] = act_view<T>(levels[l]);
    vectors = vectors && channel_vectors(levels[l], sizeof(scalar_t));
  }
  g.xw = column_runs(g, full, sizeof(scalar_t)) ? Vec16<scalar_t>::n : 1;
  return vectors;
}

unsigned pool_tiles(const PoolGeometry& g, int64_t N) { return (unsigned)(N * g.h_tiles * g.w_tiles * g.c_tiles); }

// One launch of each pooling kernel with V channels per global access (a 16-byte vector
// where every tensor it touches takes them, else 1).
template <typename scalar_t, typename acc_t, int V>
void launch_pool_many(const PoolGeometry& g, int64_t N, const at::Tensor& x, const LevelActs<scalar_t>& out,
                      int device) {
  const int smem = pool_smem(pool_many_kernel<scalar_t, acc_t, V>, g, true, sizeof(acc_t), device);
  pool_many_kernel<scalar_t, acc_t, V><<<pool_tiles(g, N), NT, smem, c10::cuda::getCurrentCUDAStream().stream()>>>(
      g, act_view<const scalar_t>(x), out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t, int V>
void launch_unpool_sum(const PoolGeometry& g, int64_t N, const LevelActs<const scalar_t>& grad,
                       const at::Tensor& grad_x, int device) {
  const int smem = pool_smem(unpool_sum_kernel<scalar_t, acc_t, V>, g, false, sizeof(acc_t), device);
  unpool_sum_kernel<scalar_t, acc_t, V><<<pool_tiles(g, N), NT, smem, c10::cuda::getCurrentCUDAStream().stream()>>>(
      g, grad, act_view<scalar_t>(grad_x));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::vector<at::Tensor> pool_source_cuda(const at::Tensor& x_in, at::IntArrayRef strides, bool ceil_mode) {
  hires::check_pool_source(x_in, strides, ceil_mode);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const auto fmt = hires::memory_format_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int device = x.get_device();
  PoolGeometry g = pool_geometry(strides, ceil_mode, N, C, H, W, fmt == at::MemoryFormat::ChannelsLast, device);
  std::vector<at::Tensor> level_out;
  for (int l = 0; l < g.L; ++l)
    level_out.push_back(at::empty({N, C, g.ho[l], g.wo[l]}, x.options().memory_format(fmt)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pool_source_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    LevelActs<scalar_t> out{};
    if (pool_access<scalar_t>(g, x, level_out, out))
      launch_pool_many<scalar_t, acc_t, Vec16<scalar_t>::n>(g, N, x, out, device);
    else
      launch_pool_many<scalar_t, acc_t, 1>(g, N, x, out, device);
  });
  std::vector<at::Tensor> pooled;
  for (int64_t s : strides) pooled.push_back(level_out[level_of(g, s)]);
  return pooled;
}

at::Tensor pool_source_backward_cuda(at::TensorList grads, at::IntArrayRef strides, bool ceil_mode, int64_t H,
                                     int64_t W, bool channels_last) {
  hires::check_pool_source_backward(grads, strides, ceil_mode, H, W);
  const c10::cuda::CUDAGuard device_guard(grads[0].device());
  const auto fmt = hires::format_of(channels_last);
  const int64_t N = grads[0].size(0), C = grads[0].size(1);
  const int device = grads[0].get_device();
  PoolGeometry g = pool_geometry(strides, ceil_mode, N, C, H, W, channels_last, device);
  std::vector<at::Tensor> level(g.L);
  for (size_t t = 0; t < grads.size(); ++t) level[level_of(g, strides[t])] = grads[t].contiguous(fmt);
  at::Tensor grad_x = at::empty({N, C, H, W}, grads[0].options().memory_format(fmt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_x.scalar_type(), "pool_source_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    LevelActs<const scalar_t> in{};
    if (pool_access<scalar_t>(g, grad_x, level, in))
      launch_unpool_sum<scalar_t, acc_t, Vec16<scalar_t>::n>(g, N, in, grad_x, device);
    else
      launch_unpool_sum<scalar_t, acc_t, 1>(g, N, in, grad_x, device);
  });
  return grad_x;
}

}  // namespace hires_cuda

TORCH_LIBRARY_IMPL(hires, CUDA, m) {
  m.impl("projection", &hires_cuda::projection_cuda);
  m.impl("projection_backward", &hires_cuda::projection_backward_cuda);
  m.impl("pool_source", &hires_cuda::pool_source_cuda);
  m.impl("pool_source_backward", &hires_cuda::pool_source_backward_cuda);
}
