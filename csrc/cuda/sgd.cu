// catapult::sgd_ on CUDA: one fused SGD step (torch.optim.SGD's formula, math in
// float32, csrc/sgd_math.h) over lists of tensors, many tensors per launch, through
// the generic multi_tensor_apply.
//
// Per block: found_inf early exit (nothing written), grad multiplier (unscale and
// global-norm clip, read from the device), lr read from the device; then 16-byte
// vectors of p, g (and the momentum buffer) are all loaded before the math, and p
// (and the buffer) stored back. Without momentum the lists are just p and g: 12 B
// per fp32 param. Capturable: every changing scalar is a device tensor; no host sync.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <array>
#include <optional>

#include "cuda/multi_tensor_apply.cuh"
#include "multi_tensor_checks.h"
#include "sgd_math.h"

namespace catapult {
namespace cuda {
namespace {

// Lists: 0 params, 1 grads, [2 momentum_buffers]; no aux. params (and buffers) are
// written back, grads never.
template <bool kMomentum>
constexpr int sgd_lists() {
  return kMomentum ? 3 : 2;
}
template <bool kMomentum>
constexpr unsigned sgd_store_mask() {
  return kMomentum ? 0x5u : 0x1u;
}

template <bool kMomentum, bool kNesterov, bool kFirstStep>
struct SGDElementOp {
  SGDStep s;
  float gmult;  // grad multiplier, negated for maximize (-(g*m) == g*(-m) exactly)

  __device__ __forceinline__ void operator()(float (&e)[sgd_lists<kMomentum>()]) const {
    const float g = e[1] * gmult;
    if constexpr (kMomentum) {
      sgd_element<true, kNesterov, kFirstStep>(e[0], g, e[2], s);
    } else {
      float unused = 0.0f;
      sgd_element<false, false, false>(e[0], g, unused, s);
    }
  }
};

template <typename T, bool kMomentum, bool kNesterov, bool kFirstStep>
struct SGDFunctor {
  const float* lr;
  const float* grad_norm;   // may be nullptr when max_grad_norm <= 0
  const float* grad_scale;  // may be nullptr
  const float* found_inf;   // may be nullptr
  float momentum, one_minus_dampening, weight_decay, max_grad_norm;
  bool maximize;

  template <typename Table>
  __device__ __forceinline__ void operator()(const Table& table, const ChunkInfo& c) const {
    // Uniform over the block: every thread reads the same addresses.
    if (found_inf != nullptr && *found_inf != 0.0f) return;
    const float mult = grad_multiplier(grad_norm, max_grad_norm, grad_scale);
    SGDElementOp<kMomentum, kNesterov, kFirstStep> op;
    op.s = SGDStep{*lr, momentum, one_minus_dampening, weight_decay};
    op.gmult = maximize ? -mult : mult;

    constexpr int N = sgd_lists<kMomentum>();
    static_assert(Table::kLists == N, "table/list mismatch");
    T* ptr[N];
#pragma unroll
    for (int l = 0; l < N; ++l) ptr[l] = chunk_ptr<T>(table, l, c);
    // On a first step the (new) buffers are loaded too and their values ignored:
    // chunk_elementwise loads every list.
    chunk_elementwise<T, N, sgd_store_mask<kMomentum>()>(ptr, c.n, table.aligned[c.t] != 0, op);
  }
};

template <typename T, bool kMomentum, bool kNesterov, bool kFirstStep, typename Select>
void launch_sgd(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                const Select& select, const float* lr, const float* grad_norm,
                const float* grad_scale, const float* found_inf, float momentum,
                float one_minus_dampening, float weight_decay, float max_grad_norm,
                bool maximize) {
  SGDFunctor<T, kMomentum, kNesterov, kFirstStep> f;
  f.lr = lr;
  f.grad_norm = grad_norm;
  f.grad_scale = grad_scale;
  f.found_inf = found_inf;
  f.momentum = momentum;
  f.one_minus_dampening = one_minus_dampening;
  f.weight_decay = weight_decay;
  f.max_grad_norm = max_grad_norm;
  f.maximize = maximize;
  const std::array<at::TensorList, 0> no_aux{};
  if constexpr (kMomentum) {
    const std::array<at::TensorList, 3> lists{params, grads, momentum_buffers};
    multi_tensor_apply<3, 0, sgd_store_mask<true>()>(lists, no_aux, select, f);
  } else {
    const std::array<at::TensorList, 2> lists{params, grads};
    multi_tensor_apply<2, 0, sgd_store_mask<false>()>(lists, no_aux, select, f);
  }
}

// One dtype group: the step's flags picked here.
template <typename T, typename Select>
void run_group(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
               const Select& select, bool use_momentum, bool nesterov, bool first_step,
               const float* lr, const float* grad_norm, const float* grad_scale,
               const float* found_inf, float momentum, float one_minus_dampening,
               float weight_decay, float max_grad_norm, bool maximize) {
#define CATAPULT_SGD_LAUNCH(M, N, F)                                                       \
  launch_sgd<T, M, N, F>(params, grads, momentum_buffers, select, lr, grad_norm, grad_scale, \
                         found_inf, momentum, one_minus_dampening, weight_decay,            \
                         max_grad_norm, maximize)
  if (!use_momentum) {
    CATAPULT_SGD_LAUNCH(false, false, false);
  } else if (first_step) {
    if (nesterov) {
      CATAPULT_SGD_LAUNCH(true, true, true);
    } else {
      CATAPULT_SGD_LAUNCH(true, false, true);
    }
  } else {
    if (nesterov) {
      CATAPULT_SGD_LAUNCH(true, true, false);
    } else {
      CATAPULT_SGD_LAUNCH(true, false, false);
    }
  }
#undef CATAPULT_SGD_LAUNCH
}

void sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
              const at::Tensor& lr, double momentum, double dampening, double weight_decay,
              bool nesterov, bool maximize, bool first_step,
              const std::optional<at::Tensor>& grad_norm, double max_grad_norm,
              const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf) {
  const at::Device device = params.empty() ? lr.device() : params[0].device();
  TORCH_CHECK(device.is_cuda(), "catapult: sgd_ (CUDA) got tensors on ", device);
  // Every check passes before anything is launched.
  check_sgd_args(params, grads, momentum_buffers, momentum, lr, grad_norm, max_grad_norm,
                 grad_scale, found_inf, device);
  if (params.empty()) return;

  c10::cuda::CUDAGuard guard(device);
  // Read-only inputs: const_data_ptr (no copy-on-write materialization).
  const float* lr_ptr = lr.const_data_ptr<float>();
  const float* grad_norm_ptr = grad_norm.has_value() ? grad_norm->const_data_ptr<float>() : nullptr;
  const float* grad_scale_ptr =
      grad_scale.has_value() ? grad_scale->const_data_ptr<float>() : nullptr;
  const float* found_inf_ptr = found_inf.has_value() ? found_inf->const_data_ptr<float>() : nullptr;
  // The same test as check_sgd_args: momentum_buffers is given iff momentum != 0.
  const bool use_momentum = momentum != 0.0;
  const float mom = static_cast<float>(momentum);
  // 1 - dampening in double, then rounded: the alpha torch.optim.SGD passes to add_.
  const float omd = static_cast<float>(1.0 - dampening);
  const float wd = static_cast<float>(weight_decay);
  const float mgn = static_cast<float>(max_grad_norm);

  // One multi_tensor_apply per dtype present (params, grads and buffers of an entry
  // share its dtype: checked above).
  for (const at::ScalarType st : {at::kFloat, at::kBFloat16, at::kHalf}) {
    bool present = false;
    for (const auto& p : params) present = present || p.scalar_type() == st;
    if (!present) continue;
    const auto select = [&](size_t i) { return params[i].scalar_type() == st; };
    switch (st) {
      case at::kFloat:
        run_group<float>(params, grads, momentum_buffers, select, use_momentum, nesterov,
                         first_step, lr_ptr, grad_norm_ptr, grad_scale_ptr, found_inf_ptr, mom,
                         omd, wd, mgn, maximize);
        break;
      case at::kBFloat16:
        run_group<c10::BFloat16>(params, grads, momentum_buffers, select, use_momentum, nesterov,
                                 first_step, lr_ptr, grad_norm_ptr, grad_scale_ptr, found_inf_ptr,
                                 mom, omd, wd, mgn, maximize);
        break;
      default:
        run_group<c10::Half>(params, grads, momentum_buffers, select, use_momentum, nesterov,
                             first_step, lr_ptr, grad_norm_ptr, grad_scale_ptr, found_inf_ptr,
                             mom, omd, wd, mgn, maximize);
        break;
    }
  }
}

}  // namespace
}  // namespace cuda
}  // namespace catapult

TORCH_LIBRARY_IMPL(catapult, CUDA, m) {
  m.impl("sgd_", TORCH_FN(catapult::cuda::sgd_cuda));
}
