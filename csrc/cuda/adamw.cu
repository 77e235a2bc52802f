// catapult::adamw_ on CUDA: one fused AdamW step (torch.optim.AdamW's formula, math
// in float32, csrc/adamw_math.h) over lists of tensors, many tensors per launch.
//
// Per block: found_inf early exit (nothing written), grad multiplier (unscale and
// global-norm clip, read from the device), lr and the tensor's own step count read
// from the device, per-tensor constants; then 16-byte vectors of p, g, m, v (and
// vmax) are all loaded before the math, and p, m, v (vmax) stored back.
// Capturable: every changing scalar is a device tensor; no host sync.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>

#include "adamw_math.h"
#include "cuda/multi_tensor_apply.cuh"
#include "multi_tensor_checks.h"

namespace catapult {
namespace cuda {
namespace {

// Lists: 0 params, 1 grads, 2 exp_avgs, 3 exp_avg_sqs, [4 max_exp_avg_sqs]; aux 0:
// state_steps. Everything but the grads is written back.
template <bool kAms>
constexpr int adamw_lists() {
  return kAms ? 5 : 4;
}
template <bool kAms>
constexpr unsigned adamw_store_mask() {
  return kAms ? 0x1Du : 0x0Du;
}

template <bool kAms>
struct AdamWElementOp {
  AdamWStep s;
  float gmult;  // grad multiplier, negated for maximize (-(g*m) == g*(-m) exactly)

  __device__ __forceinline__ void operator()(float (&e)[adamw_lists<kAms>()]) const {
    const float g = e[1] * gmult;
    if constexpr (kAms) {
      adamw_element<true>(e[0], g, e[2], e[3], e[4], s);
    } else {
      float unused = 0.0f;
      adamw_element<false>(e[0], g, e[2], e[3], unused, s);
    }
  }
};

template <typename T, bool kAms>
struct AdamWFunctor {
  const float* lr;
  const float* grad_norm;   // may be nullptr when max_grad_norm <= 0
  const float* grad_scale;  // may be nullptr
  const float* found_inf;   // may be nullptr
  float beta1, beta2, eps, weight_decay, max_grad_norm;
  bool maximize;

  template <typename Table>
  __device__ __forceinline__ void operator()(const Table& table, const ChunkInfo& c) const {
    // Uniform over the block: every thread reads the same addresses.
    if (found_inf != nullptr && *found_inf != 0.0f) return;
    const float mult = grad_multiplier(grad_norm, max_grad_norm, grad_scale);
    const float step = *static_cast<const float*>(table.ptrs[Table::kLists][c.t]);
    AdamWElementOp<kAms> op;
    op.s = adamw_step_constants(*lr, beta1, beta2, eps, weight_decay, step);
    op.gmult = maximize ? -mult : mult;

    constexpr int N = adamw_lists<kAms>();
    static_assert(Table::kLists == N, "table/list mismatch");
    T* ptr[N];
#pragma unroll
    for (int l = 0; l < N; ++l) ptr[l] = chunk_ptr<T>(table, l, c);
    chunk_elementwise<T, N, adamw_store_mask<kAms>()>(ptr, c.n, table.aligned[c.t] != 0, op);
  }
};

template <typename T, bool kAms, typename Select>
void launch_adamw(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                  at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                  at::TensorList state_steps, const Select& select,
                  const AdamWFunctor<T, kAms>& f) {
  const std::array<at::TensorList, 1> aux{state_steps};
  if constexpr (kAms) {
    const std::array<at::TensorList, 5> lists{params, grads, exp_avgs, exp_avg_sqs,
                                              max_exp_avg_sqs};
    multi_tensor_apply<5, 1, adamw_store_mask<true>()>(lists, aux, select, f);
  } else {
    const std::array<at::TensorList, 4> lists{params, grads, exp_avgs, exp_avg_sqs};
    multi_tensor_apply<4, 1, adamw_store_mask<false>()>(lists, aux, select, f);
  }
}

template <typename T, bool kAms, typename Select>
void run_group(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
               at::TensorList state_steps, const Select& select, const float* lr,
               const float* grad_norm, const float* grad_scale, const float* found_inf,
               float beta1, float beta2, float eps, float weight_decay, float max_grad_norm,
               bool maximize) {
  AdamWFunctor<T, kAms> f;
  f.lr = lr;
  f.grad_norm = grad_norm;
  f.grad_scale = grad_scale;
  f.found_inf = found_inf;
  f.beta1 = beta1;
  f.beta2 = beta2;
  f.eps = eps;
  f.weight_decay = weight_decay;
  f.max_grad_norm = max_grad_norm;
  f.maximize = maximize;
  launch_adamw<T, kAms>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                        select, f);
}

void adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                at::TensorList state_steps, const at::Tensor& lr, double beta1, double beta2,
                double eps, double weight_decay, bool amsgrad, bool maximize,
                const std::optional<at::Tensor>& grad_norm, double max_grad_norm,
                const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf) {
  const at::Device device = params.empty() ? lr.device() : params[0].device();
  TORCH_CHECK(device.is_cuda(), "catapult: adamw_ (CUDA) got tensors on ", device);
  // Every check passes before anything is launched.
  check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad, lr,
                   grad_norm, max_grad_norm, grad_scale, found_inf, device);
  if (params.empty()) return;

  c10::cuda::CUDAGuard guard(device);
  const float* lr_ptr = lr.data_ptr<float>();
  const float* grad_norm_ptr = grad_norm.has_value() ? grad_norm->data_ptr<float>() : nullptr;
  const float* grad_scale_ptr = grad_scale.has_value() ? grad_scale->data_ptr<float>() : nullptr;
  const float* found_inf_ptr = found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr;
  const float b1 = static_cast<float>(beta1), b2 = static_cast<float>(beta2);
  const float ep = static_cast<float>(eps), wd = static_cast<float>(weight_decay);
  const float mgn = static_cast<float>(max_grad_norm);

  // One multi_tensor_apply per dtype present (params, grads and states of an entry
  // share its dtype: checked above).
  for (const at::ScalarType st : {at::kFloat, at::kBFloat16, at::kHalf}) {
    bool present = false;
    for (const auto& p : params) present = present || p.scalar_type() == st;
    if (!present) continue;
    const auto select = [&](size_t i) { return params[i].scalar_type() == st; };
#define CATAPULT_ADAMW_GROUP(T)                                                                \
  if (amsgrad) {                                                                               \
    run_group<T, true>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,     \
                       select, lr_ptr, grad_norm_ptr, grad_scale_ptr, found_inf_ptr, b1, b2, ep, \
                       wd, mgn, maximize);                                                     \
  } else {                                                                                     \
    run_group<T, false>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,    \
                        select, lr_ptr, grad_norm_ptr, grad_scale_ptr, found_inf_ptr, b1, b2,  \
                        ep, wd, mgn, maximize);                                                \
  }
    switch (st) {
      case at::kFloat:
        CATAPULT_ADAMW_GROUP(float)
        break;
      case at::kBFloat16:
        CATAPULT_ADAMW_GROUP(c10::BFloat16)
        break;
      default:
        CATAPULT_ADAMW_GROUP(c10::Half)
        break;
    }
#undef CATAPULT_ADAMW_GROUP
  }
}

}  // namespace
}  // namespace cuda
}  // namespace catapult

TORCH_LIBRARY_IMPL(catapult, CUDA, m) {
  m.impl("adamw_", TORCH_FN(catapult::cuda::adamw_cuda));
}
