// CPU extension: the binding and C++ implementation of lewm_fast::cem_refit (see cem_refit.h).
// The op schema is defined from Python (lewm_fast/_csrc.py); this file registers the CPU kernel.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "cem_refit.h"

namespace lewm_fast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cem_refit_cpu(const at::Tensor& candidates,
                                                                         const at::Tensor& costs,
                                                                         const at::Tensor& mean,
                                                                         const at::Tensor& std,
                                                                         int64_t topk) {
  const RefitSizes n = check_refit_inputs(candidates, costs, mean, std, topk, c10::DeviceType::CPU);
  at::Tensor out_mean = at::empty_like(mean);
  at::Tensor out_std = at::empty_like(std);
  at::Tensor out_cost = at::empty({n.envs}, costs.options());
  at::Tensor out_nan = at::empty({n.envs}, costs.options().dtype(at::kInt));

  const float* cand = candidates.data_ptr<float>();
  const float* cost_all = costs.data_ptr<float>();
  const float* mean_in = mean.data_ptr<float>();
  const float* std_in = std.data_ptr<float>();
  float* mean_out = out_mean.data_ptr<float>();
  float* std_out = out_std.data_ptr<float>();
  float* cost_out = out_cost.data_ptr<float>();
  int32_t* nan_out = out_nan.data_ptr<int32_t>();

  std::vector<int64_t> order(n.samples);
  for (int64_t b = 0; b < n.envs; ++b) {
    const float* c = cost_all + b * n.samples;
    // (is NaN, cost, index) order: NaN after everything, ties to the lower index.
    auto before = [c](int64_t i, int64_t j) {
      const bool ni = std::isnan(c[i]), nj = std::isnan(c[j]);
      if (ni != nj) return nj;
      if (!ni && c[i] != c[j]) return c[i] < c[j];
      return i < j;
    };
    std::iota(order.begin(), order.end(), int64_t{0});
    std::partial_sort(order.begin(), order.begin() + n.topk, order.end(), before);

    int64_t nans = 0;
    for (int64_t s = 0; s < n.samples; ++s) nans += std::isnan(c[s]) ? 1 : 0;
    nan_out[b] = static_cast<int32_t>(nans);
    const int64_t kept = std::min(n.topk, n.samples - nans);  // elites without a NaN cost

    float cost_sum = 0.f;
    for (int64_t r = 0; r < kept; ++r) cost_sum += c[order[r]];
    cost_out[b] = kept > 0 ? cost_sum / static_cast<float>(kept) : std::numeric_limits<float>::quiet_NaN();

    const int64_t base = b * n.elems;
    if (kept < 2) {  // too few elites for an unbiased std: keep the distribution
      std::copy(mean_in + base, mean_in + base + n.elems, mean_out + base);
      std::copy(std_in + base, std_in + base + n.elems, std_out + base);
      continue;
    }
    const float* env_cand = cand + b * n.samples * n.elems;
    for (int64_t e = 0; e < n.elems; ++e) {
      float sum = 0.f;
      for (int64_t r = 0; r < kept; ++r) sum += env_cand[order[r] * n.elems + e];
      const float mu = sum / static_cast<float>(kept);
      float sq = 0.f;
      for (int64_t r = 0; r < kept; ++r) {
        const float d = env_cand[order[r] * n.elems + e] - mu;
        sq += d * d;
      }
      mean_out[base + e] = mu;
      std_out[base + e] = std::sqrt(sq / static_cast<float>(kept - 1));
    }
  }
  return {out_mean, out_std, out_cost, out_nan};
}

}  // namespace

TORCH_LIBRARY_IMPL(lewm_fast, CPU, m) { m.impl("cem_refit", &cem_refit_cpu); }

}  // namespace lewm_fast
