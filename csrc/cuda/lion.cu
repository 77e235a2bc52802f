// catapult::lion_ on CUDA: one fused Lion step (Chen et al. 2023, math in float32,
// csrc/lion_math.h) over lists of tensors, many tensors per launch, through the
// generic multi_tensor_apply.
//
// Per block: found_inf early exit (nothing written), grad multiplier (unscale and
// global-norm clip, read from the device), lr read from the device, the chunk's AGC
// rows; then 16-byte vectors of p, g, m (and the Grokfast ema) are all loaded before
// the math, the grad goes through the pipeline (cuda/grad_pipeline.cuh), and p, m
// (ema) stored back: 20 B per fp32 param without the regularizers. Capturable: every
// changing scalar is a device tensor; no host sync.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <array>
#include <optional>

#include "cuda/grad_pipeline.cuh"
#include "cuda/multi_tensor_apply.cuh"
#include "lion_math.h"
#include "multi_tensor_checks.h"

namespace catapult {
namespace cuda {
namespace {

// Lists: 0 params, 1 grads, 2 exp_avgs, [3 grokfast_emas]; aux 0: agc_scales (may be
// empty). Everything but the grads is written back.
template <bool kGrokfast>
constexpr int lion_lists() {
  return kGrokfast ? 4 : 3;
}
template <bool kGrokfast>
constexpr unsigned lion_store_mask() {
  return 0x5u | grokfast_store_bit<kGrokfast, lion_lists<kGrokfast>()>();
}
constexpr int kAgcAux = 0;

template <bool kGrokfast>
struct LionElementOp {
  LionStep s;
  ChunkGrad<kGrokfast> grad;

  __device__ __forceinline__ void operator()(float (&e)[lion_lists<kGrokfast>()], int i) const {
    const float g = grad.template of<1>(e, i);
    lion_element(e[0], g, e[2], s);
  }
};

template <typename T, bool kGrokfast>
struct LionFunctor {
  const float* lr;
  GradPipelineArgs pipe;
  float beta1, one_minus_beta1, beta2, one_minus_beta2, weight_decay;

  template <typename Table>
  __device__ __forceinline__ void operator()(const Table& table, const ChunkInfo& c) const {
    if (pipe.skip()) return;
    LionElementOp<kGrokfast> op;
    const float lr_v = *lr;
    // Decoupled decay, computed in float32 from the device lr (as adamw_step_constants).
    op.s = LionStep{lr_v, beta1, one_minus_beta1, beta2, one_minus_beta2,
                    1.0f - lr_v * weight_decay};
    op.grad = chunk_grad<kGrokfast>(pipe, table, c, kAgcAux);

    constexpr int N = lion_lists<kGrokfast>();
    static_assert(Table::kLists == N, "table/list mismatch");
    T* ptr[N];
#pragma unroll
    for (int l = 0; l < N; ++l) ptr[l] = chunk_ptr<T>(table, l, c);
    chunk_elementwise<T, N, lion_store_mask<kGrokfast>()>(ptr, c.n, table.aligned[c.t] != 0, op);
  }
};

template <typename T, bool kGrokfast, typename Select>
void launch_lion(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                 at::TensorList agc_scales, at::TensorList grokfast_emas, const Select& select,
                 const LionFunctor<T, kGrokfast>& f) {
  const std::array<at::TensorList, 1> aux{agc_scales};
  const auto extra = agc_row_len(params, agc_scales);
  if constexpr (kGrokfast) {
    const std::array<at::TensorList, 4> lists{params, grads, exp_avgs, grokfast_emas};
    multi_tensor_apply<4, 1, lion_store_mask<true>()>(lists, aux, select, extra, f);
  } else {
    const std::array<at::TensorList, 3> lists{params, grads, exp_avgs};
    multi_tensor_apply<3, 1, lion_store_mask<false>()>(lists, aux, select, extra, f);
  }
}

void lion_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
               const at::Tensor& lr, double beta1, double beta2, double weight_decay,
               bool maximize, const std::optional<at::Tensor>& grad_norm, double max_grad_norm,
               const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf, at::TensorList agc_scales,
               at::TensorList grokfast_emas, double grokfast_alpha, double grokfast_lamb) {
  const at::Device device = params.empty() ? lr.device() : params[0].device();
  TORCH_CHECK(device.is_cuda(), "catapult: lion_ (CUDA) got tensors on ", device);
  // Every check passes before anything is launched.
  check_lion_args(params, grads, exp_avgs, lr, grad_norm, max_grad_norm, grad_scale, found_inf,
                  agc_scales, grokfast_emas, device);
  if (params.empty()) return;

  c10::cuda::CUDAGuard guard(device);
  const float* lr_ptr = lr.const_data_ptr<float>();
  const GradPipelineArgs pipe = grad_pipeline_args(grad_norm, max_grad_norm, grad_scale, found_inf,
                                                   grokfast_alpha, grokfast_lamb, maximize);
  // 1 - beta in double, then rounded (as sgd_'s 1 - dampening).
  const float b1 = static_cast<float>(beta1), omb1 = static_cast<float>(1.0 - beta1);
  const float b2 = static_cast<float>(beta2), omb2 = static_cast<float>(1.0 - beta2);
  const float wd = static_cast<float>(weight_decay);
  const bool grokfast = !grokfast_emas.empty();

  for_each_dtype_group(params, [&](auto tag, const auto& select) {
    using T = decltype(tag);
    if (grokfast) {
      const LionFunctor<T, true> f{lr_ptr, pipe, b1, omb1, b2, omb2, wd};
      launch_lion<T, true>(params, grads, exp_avgs, agc_scales, grokfast_emas, select, f);
    } else {
      const LionFunctor<T, false> f{lr_ptr, pipe, b1, omb1, b2, omb2, wd};
      launch_lion<T, false>(params, grads, exp_avgs, agc_scales, grokfast_emas, select, f);
    }
  });
}

}  // namespace
}  // namespace cuda
}  // namespace catapult

TORCH_LIBRARY_IMPL(catapult, CUDA, m) {
  m.impl("lion_", TORCH_FN(catapult::cuda::lion_cuda));
}
