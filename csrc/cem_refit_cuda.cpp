// CUDA extension: the binding of lewm_fast::cem_refit (see cem_refit.h). Checks the inputs,
// allocates the outputs and launches the kernel of cem_refit_cuda.cu on the current CUDA
// stream under a device guard. The op schema is defined from Python (lewm_fast/_csrc.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cem_refit.h"
#include "cem_refit_kernel.cuh"

namespace lewm_fast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cem_refit_cuda(const at::Tensor& candidates,
                                                                          const at::Tensor& costs,
                                                                          const at::Tensor& mean,
                                                                          const at::Tensor& std,
                                                                          int64_t topk) {
  const RefitSizes n = check_refit_inputs(candidates, costs, mean, std, topk, c10::DeviceType::CUDA);
  TORCH_CHECK_VALUE(n.samples + n.topk <= kCemRefitMaxSharedItems, "cem_refit (cuda): S + topk = ",
                    n.samples + n.topk, " exceeds the kernel's limit of ", kCemRefitMaxSharedItems,
                    "; use backend='torch'");
  TORCH_CHECK_VALUE(n.envs <= INT32_MAX && n.elems <= INT32_MAX, "cem_refit (cuda): too many envs or elements");
  const c10::cuda::CUDAGuard guard(candidates.device());
  at::Tensor out_mean = at::empty_like(mean);
  at::Tensor out_std = at::empty_like(std);
  at::Tensor out_cost = at::empty({n.envs}, costs.options());
  at::Tensor out_nan = at::empty({n.envs}, costs.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(candidates.device().index()).stream();
  C10_CUDA_CHECK(launch_cem_refit(candidates.data_ptr<float>(), costs.data_ptr<float>(),
                                  mean.data_ptr<float>(), std.data_ptr<float>(), out_mean.data_ptr<float>(),
                                  out_std.data_ptr<float>(), out_cost.data_ptr<float>(),
                                  out_nan.data_ptr<int32_t>(), n.envs, n.samples, n.elems, n.topk, stream));
  return {out_mean, out_std, out_cost, out_nan};
}

}  // namespace

TORCH_LIBRARY_IMPL(lewm_fast, CUDA, m) { m.impl("cem_refit", &cem_refit_cuda); }

}  // namespace lewm_fast
