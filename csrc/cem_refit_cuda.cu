// CUDA kernel of lewm_fast::cem_refit (semantics in cem_refit.h): one thread block per env.
//
// 1. Costs of the env go to shared memory; NaN costs are counted.
// 2. Every candidate's rank in the (is NaN, cost, index) order is counted against all S
//    costs (O(S^2 / threads) shared-memory compares: a few microseconds at S = 300); the K
//    candidates with rank < K are the elites, stored at their rank.
// 3. Threads stride over the T * A elements: mean, then unbiased variance over the kept
//    (non-NaN) elites, summed in rank order in float32.
#include "cem_refit_kernel.cuh"

#include <math.h>

namespace lewm_fast {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ bool ranks_before(float cj, int j, float ci, int i) {
  const bool nj = isnan(cj), ni = isnan(ci);
  if (nj != ni) return ni;
  if (!nj && cj != ci) return cj < ci;
  return j < i;
}

__global__ void __launch_bounds__(kThreads)
    cem_refit_kernel(const float* __restrict__ candidates, const float* __restrict__ costs,
                     const float* __restrict__ mean, const float* __restrict__ std,
                     float* __restrict__ out_mean, float* __restrict__ out_std,
                     float* __restrict__ out_cost, int32_t* __restrict__ out_nan, int samples, int elems,
                     int topk) {
  extern __shared__ float shared[];
  float* cost = shared;                                       // [samples]
  int* elite = reinterpret_cast<int*>(shared + samples);      // [topk]
  __shared__ int nan_count;

  const int b = blockIdx.x;
  const float* env_costs = costs + static_cast<int64_t>(b) * samples;
  if (threadIdx.x == 0) nan_count = 0;
  __syncthreads();

  int local_nans = 0;
  for (int s = threadIdx.x; s < samples; s += blockDim.x) {
    const float c = env_costs[s];
    cost[s] = c;
    local_nans += isnan(c) ? 1 : 0;
  }
  if (local_nans) atomicAdd(&nan_count, local_nans);
  __syncthreads();

  for (int i = threadIdx.x; i < samples; i += blockDim.x) {
    const float ci = cost[i];
    int rank = 0;
    for (int j = 0; j < samples; ++j) rank += ranks_before(cost[j], j, ci, i) ? 1 : 0;
    if (rank < topk) elite[rank] = i;
  }
  __syncthreads();

  const int nans = nan_count;
  const int kept = min(topk, samples - nans);  // elites without a NaN cost
  if (threadIdx.x == 0) {
    float sum = 0.f;
    for (int r = 0; r < kept; ++r) sum += cost[elite[r]];
    out_cost[b] = kept > 0 ? sum / static_cast<float>(kept) : nanf("");
    out_nan[b] = nans;
  }

  const int64_t base = static_cast<int64_t>(b) * elems;
  const float* env_cand = candidates + static_cast<int64_t>(b) * samples * elems;
  for (int e = threadIdx.x; e < elems; e += blockDim.x) {
    if (kept < 2) {  // too few elites for an unbiased std: keep the distribution
      out_mean[base + e] = mean[base + e];
      out_std[base + e] = std[base + e];
      continue;
    }
    float sum = 0.f;
    for (int r = 0; r < kept; ++r) sum += env_cand[static_cast<int64_t>(elite[r]) * elems + e];
    const float mu = sum / static_cast<float>(kept);
    float sq = 0.f;
    for (int r = 0; r < kept; ++r) {
      const float d = env_cand[static_cast<int64_t>(elite[r]) * elems + e] - mu;
      sq += d * d;
    }
    out_mean[base + e] = mu;
    out_std[base + e] = sqrtf(sq / static_cast<float>(kept - 1));
  }
}

}  // namespace

cudaError_t launch_cem_refit(const float* candidates, const float* costs, const float* mean,
                             const float* std, float* out_mean, float* out_std, float* out_cost,
                             int32_t* out_nan, int64_t envs, int64_t samples, int64_t elems,
                             int64_t topk, cudaStream_t stream) {
  const size_t shared = cem_refit_shared_bytes(samples, topk);
  cem_refit_kernel<<<static_cast<unsigned>(envs), kThreads, shared, stream>>>(
      candidates, costs, mean, std, out_mean, out_std, out_cost, out_nan, static_cast<int>(samples),
      static_cast<int>(elems), static_cast<int>(topk));
  return cudaGetLastError();
}

}  // namespace lewm_fast
