// Runs the CUDA kernels of csrc/cuda on the CPU, for tests on machines without a GPU.
// test_cuda_emulated.py turns the .cu source into C++ that includes this file: every
// launch becomes emu_launch, which runs the grid's blocks one after another, each block
// as one std::thread per CUDA thread, so __syncthreads is a real barrier among them and
// __shared__ memory (a static) is shared by exactly the threads of one block.
// Outputs and scratch come from emu_empty, filled with NaN: a value a kernel fails to
// write shows up in the comparison with the reference.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <functional>
#include <limits>
#include <memory>
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

inline std::barrier<>* emu_block_barrier = nullptr;
inline std::barrier<>* emu_warp_barrier[32];
inline double emu_shuffle[32][32];

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }

// Every lane of the warp publishes its value, then reads its partner's.
template <typename T>
T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
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
#define __launch_bounds__(x)
#define __shared__ static

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
constexpr int cudaDevAttrMultiProcessorCount = 16;
inline int cudaDeviceGetAttribute(int* value, int, int) {
  *value = 132;  // an H100's SM count: the launch heuristics see the GPU they target
  return 0;
}
#define C10_CUDA_CHECK(expr) ((void)(expr))
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)

inline void emu_launch(dim3 grid, dim3 block, size_t /*dynamic_smem*/, const char* /*name*/,
                       const std::function<void()>& kernel) {
  TORCH_CHECK(block.x <= 1024 && block.y == 1 && block.z == 1, "emulated launch: block ", block.x, "x", block.y,
              "x", block.z, " is not a 1-D block of at most 1024 threads");
  TORCH_CHECK(grid.y <= 65535 && grid.z <= 65535, "emulated launch: grid y/z over 65535");
  blockDim = block;
  gridDim = grid;
  std::barrier<> block_barrier(block.x);
  emu_block_barrier = &block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  for (unsigned w = 0; w < (block.x + 31) / 32; ++w) {
    warp_barriers.push_back(std::make_unique<std::barrier<>>(std::min(32u, block.x - 32 * w)));
    emu_warp_barrier[w] = warp_barriers.back().get();
  }
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::vector<std::thread> threads;
        threads.reserve(block.x);
        for (unsigned t = 0; t < block.x; ++t)
          threads.emplace_back([&, t] {
            threadIdx = {t, 0, 0};
            blockIdx = {bx, by, bz};
            kernel();
          });
        for (auto& th : threads) th.join();
      }
}

inline at::Tensor emu_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  if (t.is_floating_point()) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}
