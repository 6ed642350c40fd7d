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

// Largest S + K the kernel takes. A block gets 48 KiB of shared memory without opting in;
// the kernel's static part is 16 bytes on sm_80-89 and 1,040 on sm_90 (cuobjdump), so
// 12,000 four-byte items (46,875 KiB) leave room on every target.
constexpr int64_t kCemRefitMaxSharedItems = 12000;

cudaError_t launch_cem_refit(const float* candidates, const float* costs, const float* mean,
                             const float* std, float* out_mean, float* out_std, float* out_cost,
                             int32_t* out_nan, int64_t envs, int64_t samples, int64_t elems,
                             int64_t topk, cudaStream_t stream);

}  // namespace lewm_fast
