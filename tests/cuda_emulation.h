// Runs the CUDA kernels of csrc/cuda on the CPU, for tests on machines without a GPU.
// test_cuda_emulated.py turns the .cu source into C++ that includes this file: every
// launch becomes emu_launch, which runs the grid's blocks one after another on one
// std::thread per CUDA thread, so __syncthreads is a real barrier among them and
// __shared__ memory is shared by exactly the threads of one block. A launch in thread-block
// clusters (sm_90, cudaLaunchKernelEx) runs the blocks of one cluster at once, one
// std::thread per thread of each, each block with its own dynamic shared memory, which
// cluster_peer maps into (distributed shared memory) and cluster_sync orders across the
// cluster; such kernels keep all their shared memory dynamic (a static __shared__ here is one
// for the whole launch).
// Outputs and scratch come from emu_empty, filled with NaN: a value a kernel fails to
// write shows up in the comparison with the reference; so does shared memory (0xff at
// first and as each block ends) read before a cp.async copy lands there (at the copying
// thread's wait) or read in a peer block after that block exits. A launch a GPU would refuse or fault on
// fails here too: a misaligned global access, a block over 1024 threads, more
// than 48 KiB of dynamic shared memory without the kernel's limit raised, a grid its
// clusters do not tile, a cluster over 8 blocks without the kernel's non-portable size
// allowed or over 16, a peer mapping outside the block's shared memory.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

using std::isfinite;
using std::max;
using std::min;
using std::sqrt;

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct emu_uint3 {
  unsigned x, y, z;
};
inline thread_local emu_uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

// The barriers: std::barrier, except under ThreadSanitizer (test_cuda_races.py), where a
// barrier of n threads synchronises them through its own mutex alone, so that it orders
// exactly its participants, as __syncthreads does a block's threads. libstdc++'s
// std::barrier waits through a process-wide pool of atomic counters that unrelated barriers
// share, which would order threads that no barrier orders and could hide a race; it is
// several times faster, which the plain emulation needs.
#if defined(__SANITIZE_THREAD__)
class EmuBarrier {
 public:
  explicit EmuBarrier(unsigned n) : n_(n) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t generation = generation_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++generation_;
      all_arrived_.notify_all();
      return;
    }
    all_arrived_.wait(lock, [&] { return generation_ != generation; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable all_arrived_;
  const unsigned n_;
  unsigned arrived_ = 0;
  uint64_t generation_ = 0;
};
#else
using EmuBarrier = std::barrier<>;
#endif

// The blocks that run at once (one, or a cluster's): each thread's block barrier, rank in
// the cluster, and warp among the warps of all of them (which indexes the warp state below).
constexpr int EMU_MAX_CLUSTER = 16, EMU_WARPS = EMU_MAX_CLUSTER * 32;
inline thread_local EmuBarrier* emu_block_barrier = nullptr;
inline thread_local unsigned emu_rank = 0, emu_warp = 0;
inline EmuBarrier* emu_cluster_barrier = nullptr;
inline EmuBarrier* emu_warp_barrier[EMU_WARPS];
inline double emu_shuffle[EMU_WARPS][32];

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
inline void __syncwarp() { emu_warp_barrier[emu_warp]->arrive_and_wait(); }

// Every lane of the warp publishes its value, then reads its partner's.
template <typename T>
T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  const unsigned warp = emu_warp, lane = threadIdx.x % 32;
  emu_shuffle[warp][lane] = static_cast<double>(v);
  emu_warp_barrier[warp]->arrive_and_wait();
  const T r = static_cast<T>(emu_shuffle[warp][lane ^ lane_mask]);
  emu_warp_barrier[warp]->arrive_and_wait();
  return r;
}

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define HIRES_EMULATED 1
// One buffer per block that runs at once holds its dynamic shared memory; a thread sees its
// block's.
inline thread_local unsigned char* emu_dynamic_smem = nullptr;
inline std::vector<unsigned char*> emu_cluster_smem;  // by rank
inline size_t emu_smem_bytes = 0;
#define HIRES_DYNAMIC_SHARED(name) unsigned char* name = emu_dynamic_smem

// Thread-block clusters: the barrier of all the cluster's threads (which also orders their
// shared-memory accesses, as cluster.sync() does), and p, an address in this block's
// dynamic shared memory, as the same address in the block of rank `rank` (map_shared_rank).
inline std::atomic<bool> emu_bad_peer{false};
inline void cluster_sync() { emu_cluster_barrier->arrive_and_wait(); }
inline void require_clusters(int) {}  // the emulated kernels are "built" for sm_90
template <typename T>
T* cluster_peer(T* p, int rank) {
  const auto* at = reinterpret_cast<const unsigned char*>(p);
  if (at < emu_dynamic_smem || at >= emu_dynamic_smem + emu_smem_bytes || rank < 0 ||
      rank >= static_cast<int>(emu_cluster_smem.size())) {
    emu_bad_peer = true;
    return p;
  }
  return reinterpret_cast<T*>(emu_cluster_smem[rank] + (at - emu_dynamic_smem));
}

// cp.async (the kernels' copy_run_async): a thread's copies land in shared memory at its
// copy_async_wait (cp.async.wait_all), as a GPU guarantees no sooner: a read before the
// wait, by the thread or by another, sees the bytes that were there before (NaN where the
// block has written nothing yet), and under ThreadSanitizer the copy is a write at the
// wait. A kernel that ends with copies in flight fails the launch. set_wait_copies(false)
// drops the waits, to test that check.
struct EmuCopy {
  void* dst;
  unsigned char bytes[16];
};
inline thread_local std::vector<EmuCopy> emu_copies_in_flight;
inline std::atomic<bool> emu_unwaited_copy{false};
inline bool emu_wait_copies = true;
template <typename V>
void emu_copy_async(void* dst, const V& value) {
  static_assert(sizeof(V) == 16, "cp.async copies 16 bytes here");
  EmuCopy copy{dst, {}};
  std::memcpy(copy.bytes, &value, sizeof(V));
  emu_copies_in_flight.push_back(copy);
}
inline void emu_copy_async_wait() {
  if (!emu_wait_copies) return;
  for (const auto& copy : emu_copies_in_flight) std::memcpy(copy.dst, copy.bytes, sizeof copy.bytes);
  emu_copies_in_flight.clear();
}

// Traffic: the bytes each thread's global loads and stores request (the kernels' load_act,
// store_act, load_param and store_param), summed per launch into emu_launches. Those that
// fall inside the storage of the tensor given to watch() are also counted apart (reads,
// writes), so a test can tell which launches touch that one tensor, and so are the
// bytes moved by 16-byte accesses (vector loads and stores), per kind as emu_thread_bytes.
inline thread_local int64_t emu_thread_bytes[4], emu_thread_watched[2], emu_thread_wide[4];
inline uintptr_t emu_watch_begin = 0, emu_watch_end = 0;
// A GPU faults on a global access that is not aligned to its size (a 16-byte vector on a
// 16-byte boundary); the CPU does not, so the emulation checks every access and the launch
// fails with the first one found.
inline std::atomic<uintptr_t> emu_misaligned{0};
inline std::atomic<int64_t> emu_misaligned_bytes{0};
inline void emu_count(int kind, const void* address, int64_t bytes) {
  emu_thread_bytes[kind] += bytes;
  const auto a = reinterpret_cast<uintptr_t>(address);
  uintptr_t none = 0;
  if (a % static_cast<uintptr_t>(bytes) != 0 && emu_misaligned.compare_exchange_strong(none, a))
    emu_misaligned_bytes = bytes;  // the first misaligned access found: its address and size
  if (a >= emu_watch_begin && a < emu_watch_end) emu_thread_watched[kind % 2] += bytes;  // kinds: read, write, ...
  if (bytes >= 16) emu_thread_wide[kind] += bytes;
}
#define HIRES_TRAFFIC(kind, address, bytes) emu_count(kind, address, static_cast<int64_t>(bytes))
struct EmuLaunchRecord {
  std::string name;
  int64_t bytes[4], watched[2], wide[4];
  unsigned blocks, threads;
  size_t smem;
  unsigned cluster;  // blocks per cluster
};
// Dry run: launches are recorded (grid, block, shared memory) but not run, so that the
// launch configuration of full-size problems can be checked without emulating them.
inline bool emu_dry_run = false;
inline std::vector<EmuLaunchRecord> emu_launches;
inline std::mutex emu_launches_mutex;

// mma.sync for one warp, D (16x8, fp32) += A (16xK) B (Kx8): each lane publishes its
// fragments, then computes its own four accumulator elements, D(g + 8 (v / 2), 2q + v % 2),
// from the warp's; A(fa, r, k) and B(fb, k, n) read an element out of the published
// fragments in the instruction's layout (PTX ISA, see the .cu). Two slots, used in turn, let
// one barrier per call suffice: a lane writes a slot again only two calls later, after every
// lane has passed the barrier of the call in between, so all reads of it are done.
inline uint32_t emu_mma_a[2][EMU_WARPS][32][4], emu_mma_b[2][EMU_WARPS][32][2];
inline thread_local int emu_mma_slot = 0;
template <int K, typename ElementA, typename ElementB>
void emu_mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], ElementA A, ElementB B) {
  const unsigned warp = emu_warp, lane = threadIdx.x % 32;
  const int slot = emu_mma_slot;
  emu_mma_slot ^= 1;
  for (int i = 0; i < 4; ++i) emu_mma_a[slot][warp][lane][i] = a[i];
  for (int i = 0; i < 2; ++i) emu_mma_b[slot][warp][lane][i] = b[i];
  emu_warp_barrier[warp]->arrive_and_wait();
  const auto& fa = emu_mma_a[slot][warp];
  const auto& fb = emu_mma_b[slot][warp];
  const int g = lane / 4, q = lane % 4;
  for (int v = 0; v < 4; ++v) {
    const int r = g + 8 * (v / 2), n = 2 * q + v % 2;
    float sum = 0;
    for (int k = 0; k < K; ++k) sum += A(fa, r, k) * B(fb, k, n);
    d[v] += sum;
  }
}

// m16n8k16 .bf16 / .f16: a[0..3] hold A(g, 2q..2q+1), A(g+8, ..), A(g, 2q+8..), A(g+8, 2q+8..),
// b[0..1] B(2q..2q+1, g), B(2q+8.., g); the lower k of a pair in the low half of its word.
template <typename scalar_t>
void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  auto half = [](uint32_t word, int k) {
    return static_cast<float>(scalar_t(static_cast<uint16_t>(word >> (16 * (k % 2))), scalar_t::from_bits()));
  };
  emu_mma<16>(
      d, a, b,
      [&](const auto& fa, int r, int k) { return half(fa[(r % 8) * 4 + (k % 8) / 2][(r >= 8) + 2 * (k >= 8)], k); },
      [&](const auto& fb, int k, int n) { return half(fb[n * 4 + (k % 8) / 2][k >= 8], k); });
}

// cvt.rna.tf32.f32: float32 rounded to 10 mantissa bits, to nearest, ties away from zero
// (Inf and NaN kept), in a 32-bit register whose low 13 bits are zero.
inline uint32_t to_tf32(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
  return u;
}

// m16n8k8 .tf32: a[0..3] hold A(g, q), A(g+8, q), A(g, q+4), A(g+8, q+4), b[0..1] B(q, g),
// B(q+4, g); the tensor cores read a word's TF32 bits only, and the products of TF32
// operands are exact in float32.
inline void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  auto value = [](uint32_t word) {
    word &= 0xffffe000u;
    float f;
    std::memcpy(&f, &word, sizeof f);
    return f;
  };
  emu_mma<8>(
      d, a, b, [&](const auto& fa, int r, int k) { return value(fa[(r % 8) * 4 + k % 4][(r >= 8) + 2 * (k >= 4)]); },
      [&](const auto& fb, int k, int n) { return value(fb[n * 4 + k % 4][k >= 4]); });
}

// The host API the kernels' launch code uses, as no-ops on the CPU.
using cudaStream_t = int;
namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
struct EmuStream {
  cudaStream_t stream() const { return 0; }
};
inline EmuStream getCurrentCUDAStream() { return {}; }
}  // namespace c10::cuda
// The launch heuristics see the GPU they target: an H100's (H200's) SMs and shared memory.
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount,
  cudaDevAttrMaxSharedMemoryPerBlockOptin,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor
};
inline int emu_sm_count = 132;  // set_sm_count: small grids then take the large-problem launch choices
inline int emu_smem_optin = 232448;  // set_smem_optin: a block's most (an SM has 1 KiB more)
inline int cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMultiProcessorCount ? emu_sm_count
           : attr == cudaDevAttrMaxSharedMemoryPerBlockOptin ? emu_smem_optin : emu_smem_optin + 1024;
  return 0;
}
// The emulated kernels are "built" for sm_90 (clusters available).
struct cudaFuncAttributes {
  int binaryVersion, ptxVersion;
};
template <typename F>
int cudaFuncGetAttributes(cudaFuncAttributes* attributes, F*) {
  attributes->binaryVersion = attributes->ptxVersion = 90;
  return 0;
}
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
constexpr int cudaFuncAttributeMaxDynamicSharedMemorySize = 8;
constexpr int cudaFuncAttributeNonPortableClusterSizeAllowed = 14;
// A GPU refuses a launch with more than 48 KiB of dynamic shared memory unless the kernel's
// limit was raised to it first, and one in clusters of more than 8 blocks unless the kernel
// allows non-portable sizes: each kernel's attributes, checked by emu_launch.
constexpr size_t emu_default_dynamic_smem = 48 * 1024;
inline std::map<const void*, int> emu_dynamic_smem_limit;
inline std::map<const void*, bool> emu_non_portable;
inline std::mutex emu_dynamic_smem_mutex;
inline bool emu_honour_attributes = true;  // false: cudaFuncSetAttribute is lost (tests the check)
template <typename F>
const void* emu_kernel_id(F* kernel) {
  return reinterpret_cast<const void*>(kernel);
}
// A limit over what the device gives a block is refused (cudaErrorInvalidValue, 1).
template <typename F>
int cudaFuncSetAttribute(F* kernel, int attribute, int value) {
  if (attribute == cudaFuncAttributeMaxDynamicSharedMemorySize && value > emu_smem_optin) return 1;
  const std::lock_guard<std::mutex> lock(emu_dynamic_smem_mutex);
  if (!emu_honour_attributes) return 0;
  if (attribute == cudaFuncAttributeMaxDynamicSharedMemorySize) emu_dynamic_smem_limit[emu_kernel_id(kernel)] = value;
  if (attribute == cudaFuncAttributeNonPortableClusterSizeAllowed) emu_non_portable[emu_kernel_id(kernel)] = value != 0;
  return 0;
}
#define C10_CUDA_CHECK(expr) TORCH_CHECK((expr) == 0, "emulated CUDA call failed: " #expr)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)

// cudaLaunchKernelEx's configuration, the cluster dimension its one attribute used here.
enum cudaLaunchAttributeID { cudaLaunchAttributeClusterDimension = 4 };
struct cudaLaunchAttributeValue {
  struct {
    unsigned x, y, z;
  } clusterDim;
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim, blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned numAttrs;
};
inline dim3 emu_cluster_dim(const cudaLaunchConfig_t& config) {
  for (unsigned i = 0; i < config.numAttrs; ++i)
    if (config.attrs[i].id == cudaLaunchAttributeClusterDimension) {
      const auto& c = config.attrs[i].val.clusterDim;
      return dim3(c.x, c.y, c.z);
    }
  return dim3(1, 1, 1);
}
// Clusters of up to emu_max_cluster blocks fit on the emulated GPU (set_max_cluster: 1 makes
// every cluster launch choice fall back to single blocks).
inline int emu_max_cluster = EMU_MAX_CLUSTER;
template <typename F>
cudaError_t cudaOccupancyMaxActiveClusters(int* clusters, F*, const cudaLaunchConfig_t* config) {
  const dim3 c = emu_cluster_dim(*config);
  *clusters = static_cast<int>(c.x * c.y * c.z) <= emu_max_cluster ? emu_sm_count * 2 / (c.x * c.y * c.z) : 0;
  return cudaSuccess;
}

// A block's shared memory as the block exits: gone (0xff, NaN in every float type).
inline void emu_block_exit(std::vector<unsigned char>& smem) { std::fill(smem.begin(), smem.end(), 0xff); }

inline void emu_launch(dim3 grid, dim3 block, size_t dynamic_smem, const char* name, const void* kernel_id,
                       const std::function<void()>& kernel, dim3 cluster = dim3(1, 1, 1)) {
  TORCH_CHECK(block.x <= 1024 && block.y == 1 && block.z == 1, "emulated launch: block ", block.x, "x", block.y,
              "x", block.z, " is not a 1-D block of at most 1024 threads");
  TORCH_CHECK(grid.y <= 65535 && grid.z <= 65535, "emulated launch: grid y/z over 65535");
  const unsigned ranks = cluster.x * cluster.y * cluster.z;
  TORCH_CHECK(ranks >= 1 && grid.x % cluster.x == 0 && grid.y % cluster.y == 0 && grid.z % cluster.z == 0,
              "emulated launch ", name, ": clusters of ", cluster.x, "x", cluster.y, "x", cluster.z,
              " do not tile the grid ", grid.x, "x", grid.y, "x", grid.z);
  {
    const std::lock_guard<std::mutex> lock(emu_dynamic_smem_mutex);
    if (dynamic_smem > emu_default_dynamic_smem) {
      const auto limit = emu_dynamic_smem_limit.find(kernel_id);
      TORCH_CHECK(limit != emu_dynamic_smem_limit.end() && static_cast<size_t>(limit->second) >= dynamic_smem,
                  "emulated launch ", name, ": ", dynamic_smem, " bytes of dynamic shared memory, over the default ",
                  emu_default_dynamic_smem, ", but the kernel's limit was not raised to it (cudaFuncSetAttribute): a "
                  "GPU refuses the launch");
    }
    TORCH_CHECK(ranks <= EMU_MAX_CLUSTER && (ranks <= 8 || emu_non_portable[kernel_id]), "emulated launch ", name,
                ": a cluster of ", ranks, " blocks needs the kernel's non-portable cluster size allowed (at most ",
                EMU_MAX_CLUSTER, "): a GPU refuses the launch");
  }
  blockDim = block;
  gridDim = grid;
  const unsigned warps = (block.x + 31) / 32;
  std::vector<std::unique_ptr<EmuBarrier>> block_barriers, warp_barriers;
  for (unsigned r = 0; r < ranks; ++r) {
    block_barriers.push_back(std::make_unique<EmuBarrier>(block.x));
    for (unsigned w = 0; w < warps; ++w) {
      warp_barriers.push_back(std::make_unique<EmuBarrier>(std::min(32u, block.x - 32 * w)));
      emu_warp_barrier[r * warps + w] = warp_barriers.back().get();
    }
  }
  EmuBarrier cluster_barrier(block.x * ranks);
  emu_cluster_barrier = &cluster_barrier;
  // Filled with 0xff (NaN in every float type) at first and as each block ends: a read of
  // shared memory that nothing wrote shows up in the results.
  std::vector<std::vector<unsigned char>> smem(ranks, std::vector<unsigned char>(dynamic_smem + 16, 0xff));
  emu_cluster_smem.clear();
  for (auto& buffer : smem)
    emu_cluster_smem.push_back(buffer.data() + (16 - reinterpret_cast<uintptr_t>(buffer.data()) % 16) % 16);
  emu_smem_bytes = dynamic_smem;
  EmuLaunchRecord record{name, {0, 0, 0, 0}, {0, 0}, {0, 0, 0, 0}, grid.x * grid.y * grid.z, block.x, dynamic_smem, ranks};
  if (emu_dry_run) {
    const std::lock_guard<std::mutex> lock(emu_launches_mutex);
    emu_launches.push_back(record);
    return;
  }
  // One std::thread per CUDA thread of each block that runs at once (a cluster's): each runs
  // its thread of its block of every cluster in turn, with a cluster barrier between clusters.
  // A block's shared memory ends with it: thread 0 refills it as soon as the block's own
  // threads are done, in no order with the other blocks of its cluster, so a peer reading it
  // after the block exits (no cluster barrier in between) reads NaN, and under
  // ThreadSanitizer races with the refill.
  std::vector<std::thread> threads;
  threads.reserve(block.x * ranks);
  for (unsigned r = 0; r < ranks; ++r)
    for (unsigned t = 0; t < block.x; ++t)
      threads.emplace_back([&, r, t] {
        threadIdx = {t, 0, 0};
        emu_rank = r;
        emu_warp = r * warps + t / 32;
        emu_block_barrier = block_barriers[r].get();
        emu_dynamic_smem = emu_cluster_smem[r];
        for (auto& b : emu_thread_bytes) b = 0;
        for (auto& b : emu_thread_watched) b = 0;
        for (auto& b : emu_thread_wide) b = 0;
        // Rank r's place in its cluster, x fastest (as cluster.block_rank() counts).
        const unsigned rx = r % cluster.x, ry = r / cluster.x % cluster.y, rz = r / (cluster.x * cluster.y);
        for (unsigned bz = 0; bz < grid.z; bz += cluster.z)
          for (unsigned by = 0; by < grid.y; by += cluster.y)
            for (unsigned bx = 0; bx < grid.x; bx += cluster.x) {
              blockIdx = {bx + rx, by + ry, bz + rz};
              kernel();
              if (!emu_copies_in_flight.empty()) {
                emu_unwaited_copy = true;
                emu_copies_in_flight.clear();
              }
              emu_block_barrier->arrive_and_wait();
              if (t == 0) emu_block_exit(smem[r]);
              cluster_barrier.arrive_and_wait();
            }
        const std::lock_guard<std::mutex> lock(emu_launches_mutex);
        for (int i = 0; i < 4; ++i) record.bytes[i] += emu_thread_bytes[i];
        for (int i = 0; i < 2; ++i) record.watched[i] += emu_thread_watched[i];
        for (int i = 0; i < 4; ++i) record.wide[i] += emu_thread_wide[i];
      });
  for (auto& th : threads) th.join();
  // Every flag cleared before any is reported, so that a failed launch leaves none to the next.
  const bool bad_peer = emu_bad_peer.exchange(false), unwaited = emu_unwaited_copy.exchange(false);
  const uintptr_t misaligned = emu_misaligned.exchange(0);
  TORCH_CHECK(!bad_peer, "emulated launch ", name, ": cluster_peer of an address outside the block's dynamic "
              "shared memory, or of a rank outside the cluster");
  TORCH_CHECK(!unwaited, "emulated launch ", name, ": a thread ended with cp.async copies it never waited for "
              "(copy_async_wait): on a GPU they land at an unknown time");
  TORCH_CHECK(misaligned == 0, "emulated launch ", name, ": a ", emu_misaligned_bytes.load(),
              "-byte global access at address ", misaligned, " is not aligned to its size (a GPU would fault)");
  const std::lock_guard<std::mutex> lock(emu_launches_mutex);
  emu_launches.push_back(record);
}

// cudaLaunchKernelEx(&config, kernel, args...), as test_cuda_emulated.py rewrites it.
inline cudaError_t emu_launch_ex(const cudaLaunchConfig_t& config, const char* name, const void* kernel_id,
                                 const std::function<void()>& kernel) {
  emu_launch(config.gridDim, config.blockDim, config.dynamicSmemBytes, name, kernel_id, kernel,
             emu_cluster_dim(config));
  return cudaSuccess;
}

// "name blocks threads dynamic_smem act_read act_write param_read param_write
// watched_read watched_write wide_read wide_write cluster wide_param_read"
// per launch since the last call (wide: of 16-byte accesses).
inline std::string emu_traffic() {
  const std::lock_guard<std::mutex> lock(emu_launches_mutex);
  std::string log;
  for (const auto& r : emu_launches) {
    log += r.name + " " + std::to_string(r.blocks) + " " + std::to_string(r.threads) + " " + std::to_string(r.smem);
    for (int64_t b : r.bytes) log += " " + std::to_string(b);
    for (int64_t b : r.watched) log += " " + std::to_string(b);
    for (int i = 0; i < 2; ++i) log += " " + std::to_string(r.wide[i]);
    log += " " + std::to_string(r.cluster) + " " + std::to_string(r.wide[2]) + "\n";
  }
  emu_launches.clear();
  return log;
}

// From now on, accesses inside t's storage are counted apart (an empty t: none are).
inline void emu_watch(const at::Tensor& t) {
  emu_watch_begin = reinterpret_cast<uintptr_t>(t.storage().data());
  emu_watch_end = emu_watch_begin + t.storage().nbytes();
}

inline void emu_set_dry_run(bool on) { emu_dry_run = on; }
inline void emu_set_sm_count(int64_t sms) { emu_sm_count = static_cast<int>(sms); }
inline void emu_set_honour_attributes(bool on) {
  const std::lock_guard<std::mutex> lock(emu_dynamic_smem_mutex);
  emu_honour_attributes = on;
  emu_dynamic_smem_limit.clear();
  emu_non_portable.clear();
}
inline void emu_set_max_cluster(int64_t blocks) { emu_max_cluster = static_cast<int>(blocks); }
inline void emu_set_smem_optin(int64_t bytes) { emu_smem_optin = static_cast<int>(bytes); }
inline void emu_set_wait_copies(bool on) { emu_wait_copies = on; }

TORCH_LIBRARY_FRAGMENT(hires_cuda_emulated, m) {
  m.def("traffic", &emu_traffic);
  m.def("watch", &emu_watch);
  m.def("set_dry_run", &emu_set_dry_run);
  m.def("set_sm_count", &emu_set_sm_count);
  m.def("set_honour_attributes", &emu_set_honour_attributes);
  m.def("set_max_cluster", &emu_set_max_cluster);
  m.def("set_smem_optin", &emu_set_smem_optin);
  m.def("set_wait_copies", &emu_set_wait_copies);
}

inline at::Tensor emu_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  if (t.is_floating_point()) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}
