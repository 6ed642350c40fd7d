// Shared declarations of the CEM elite-selection and refit op (csrc/README.md).
//
// lewm_fast::cem_refit(candidates (B, S, T, A), costs (B, S), mean (B, T, A), std (B, T, A), topk)
//   -> (mean (B, T, A), std (B, T, A), elite_cost (B,), nan_count (B,) int32)
//
// Per env b: the elites are the `topk` candidates with the lowest costs, ordered by
// (cost is NaN, cost, sample index), so NaN costs come after every other cost and ties go
// to the lower index. Elites with a NaN cost are dropped; with n >= 2 elites left the new
// mean and unbiased std (divisor n - 1) of every (t, a) element are taken over them,
// otherwise the previous mean and std are kept. elite_cost is the mean cost of the kept
// elites (NaN if none), nan_count the number of NaN costs among all S samples.
// All tensors are float32 and contiguous; sums accumulate in float32.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace lewm_fast {

struct RefitSizes {
  int64_t envs;     // B
  int64_t samples;  // S
  int64_t elems;    // T * A
  int64_t topk;     // K
};

inline void check_float32(const at::Tensor& t, const char* name, const char* layout) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat, "cem_refit: ", name, " must be float32 ", layout,
                    ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous(), "cem_refit: ", name, " ", layout, " must be contiguous");
}

// Checks every input of cem_refit and returns its sizes. `device_type` is the device the
// calling kernel runs on (CPU or CUDA).
inline RefitSizes check_refit_inputs(const at::Tensor& candidates, const at::Tensor& costs,
                                     const at::Tensor& mean, const at::Tensor& std, int64_t topk,
                                     c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(candidates.dim() == 4, "cem_refit: candidates must be (B, S, T, A), got ",
                    candidates.dim(), " dimensions with shape ", candidates.sizes());
  const int64_t B = candidates.size(0), S = candidates.size(1);
  const int64_t T = candidates.size(2), A = candidates.size(3);
  TORCH_CHECK_VALUE(costs.dim() == 2 && costs.size(0) == B && costs.size(1) == S,
                    "cem_refit: costs must be (B, S) = (", B, ", ", S, ") to match candidates ",
                    candidates.sizes(), ", got ", costs.sizes());
  TORCH_CHECK_VALUE(mean.dim() == 3 && mean.size(0) == B && mean.size(1) == T && mean.size(2) == A,
                    "cem_refit: mean must be (B, T, A) = (", B, ", ", T, ", ", A, "), got ", mean.sizes());
  TORCH_CHECK_VALUE(std.sizes() == mean.sizes(), "cem_refit: std must be (B, T, A) = ", mean.sizes(),
                    ", got ", std.sizes());
  TORCH_CHECK_VALUE(topk >= 2 && topk <= S, "cem_refit: topk must be in [2, S = ", S,
                    "] (the unbiased std needs two elites), got ", topk);
  TORCH_CHECK_VALUE(B >= 1 && T * A >= 1, "cem_refit: empty candidates ", candidates.sizes());
  check_float32(candidates, "candidates", "(B, S, T, A)");
  check_float32(costs, "costs", "(B, S)");
  check_float32(mean, "mean", "(B, T, A)");
  check_float32(std, "std", "(B, T, A)");
  const at::Tensor* all[] = {&candidates, &costs, &mean, &std};
  for (const at::Tensor* t : all) {
    TORCH_CHECK_VALUE(t->device().type() == device_type && t->device() == candidates.device(),
                      "cem_refit: all inputs must be on one ", c10::DeviceTypeName(device_type),
                      " device; candidates are on ", candidates.device(), ", got a tensor on ",
                      t->device());
  }
  return {B, S, T * A, topk};
}

}  // namespace lewm_fast
