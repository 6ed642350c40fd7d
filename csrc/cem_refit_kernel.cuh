// Launcher of the CUDA kernel of lewm_fast::cem_refit (semantics in cem_refit.h).
// Plain pointers and a stream, no torch headers: cem_refit_cuda.cu compiles with nvcc alone.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace lewm_fast {

// Dynamic shared memory the kernel needs: S costs and K elite indices.
inline size_t cem_refit_shared_bytes(int64_t samples, int64_t topk) {
  return static_cast<size_t>(samples + topk) * 4;
}

// Largest S + K the kernel takes: a block gets 48 KiB of shared memory without opting in,
// and the kernel's static NaN counter takes some of it (16 bytes kept for it and alignment).
constexpr int64_t kCemRefitMaxSharedItems = (48 * 1024 - 16) / 4;

cudaError_t launch_cem_refit(const float* candidates, const float* costs, const float* mean,
                             const float* std, float* out_mean, float* out_std, float* out_cost,
                             int32_t* out_nan, int64_t envs, int64_t samples, int64_t elems,
                             int64_t topk, cudaStream_t stream);

}  // namespace lewm_fast
