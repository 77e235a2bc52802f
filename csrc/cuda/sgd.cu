// catapult::sgd_ on CUDA: one fused SGD step (torch.optim.SGD's formula, math in
// float32, csrc/sgd_math.h; LARS with trust_ratios) over lists of tensors, many
// tensors per launch, through the generic multi_tensor_apply.
//
// Per block: found_inf early exit (nothing written), grad multiplier (unscale and
// global-norm clip, read from the device), lr and the tensor's trust ratio read from
// the device, the chunk's AGC rows; then 16-byte vectors of p, g (and the momentum
// buffer, and the Grokfast ema) are all loaded before the math, the grad goes through
// the pipeline (cuda/grad_pipeline.cuh), and p (buffer, ema) stored back. Without
// momentum and regularizers the lists are just p and g: 12 B per fp32 param.
// Capturable: every changing scalar is a device tensor; no host sync.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <array>
#include <optional>

#include "cuda/grad_pipeline.cuh"
#include "cuda/multi_tensor_apply.cuh"
#include "multi_tensor_checks.h"
#include "sgd_math.h"

namespace catapult {
namespace cuda {
namespace {

// Lists: 0 params, 1 grads, [2 momentum_buffers], [last: grokfast_emas]; aux 0:
// agc_scales (may be empty). params (buffers, emas) are written back, grads never.
template <bool kMomentum, bool kGrokfast>
constexpr int sgd_lists() {
  return 2 + (kMomentum ? 1 : 0) + (kGrokfast ? 1 : 0);
}
template <bool kMomentum, bool kGrokfast>
constexpr unsigned sgd_store_mask() {
  return 0x1u | (kMomentum ? 0x4u : 0u) |
         grokfast_store_bit<kGrokfast, sgd_lists<kMomentum, kGrokfast>()>();
}
constexpr int kAgcAux = 0;

template <bool kMomentum, bool kNesterov, bool kFirstStep, bool kGrokfast>
struct SGDElementOp {
  SGDStep s;
  ChunkGrad<kGrokfast> grad;

  __device__ __forceinline__ void operator()(float (&e)[sgd_lists<kMomentum, kGrokfast>()],
                                             int i) const {
    const float g = grad.template of<1>(e, i);
    if constexpr (kMomentum) {
      sgd_element<true, kNesterov, kFirstStep>(e[0], g, e[2], s);
    } else {
      float unused = 0.0f;
      sgd_element<false, false, false>(e[0], g, unused, s);
    }
  }
};

template <typename T, bool kMomentum, bool kNesterov, bool kFirstStep, bool kGrokfast>
struct SGDFunctor {
  const float* lr;
  const float* trust_ratios;  // float32 [len(params)], by caller's index; nullptr: trust 1
  GradPipelineArgs pipe;
  float momentum, one_minus_dampening, weight_decay;

  template <typename Table>
  __device__ __forceinline__ void operator()(const Table& table, const ChunkInfo& c) const {
    if (pipe.skip()) return;
    SGDElementOp<kMomentum, kNesterov, kFirstStep, kGrokfast> op;
    const float trust = trust_ratios != nullptr ? trust_ratios[table.index[c.t]] : 1.0f;
    op.s = SGDStep{*lr, momentum, one_minus_dampening, weight_decay, trust};
    op.grad = chunk_grad<kGrokfast>(pipe, table, c, kAgcAux);

    constexpr int N = sgd_lists<kMomentum, kGrokfast>();
    static_assert(Table::kLists == N, "table/list mismatch");
    T* ptr[N];
#pragma unroll
    for (int l = 0; l < N; ++l) ptr[l] = chunk_ptr<T>(table, l, c);
    // On a first step the (new) buffers are loaded too and their values ignored:
    // chunk_elementwise loads every list.
    chunk_elementwise<T, N, sgd_store_mask<kMomentum, kGrokfast>()>(
        ptr, c.n, table.aligned[c.t] != 0, op);
  }
};

// The lists of one step and its scalars, as the launches take them.
struct SGDArgs {
  at::TensorList params, grads, momentum_buffers, agc_scales, grokfast_emas;
  const float* lr;
  const float* trust_ratios;
  GradPipelineArgs pipe;
  float momentum, one_minus_dampening, weight_decay;
};

template <typename T, bool kMomentum, bool kNesterov, bool kFirstStep, bool kGrokfast,
          typename Select>
void launch_sgd(const SGDArgs& x, const Select& select) {
  SGDFunctor<T, kMomentum, kNesterov, kFirstStep, kGrokfast> f;
  f.lr = x.lr;
  f.trust_ratios = x.trust_ratios;
  f.pipe = x.pipe;
  f.momentum = x.momentum;
  f.one_minus_dampening = x.one_minus_dampening;
  f.weight_decay = x.weight_decay;
  constexpr int N = sgd_lists<kMomentum, kGrokfast>();
  std::array<at::TensorList, N> lists;
  lists[0] = x.params;
  lists[1] = x.grads;
  if constexpr (kMomentum) lists[2] = x.momentum_buffers;
  if constexpr (kGrokfast) lists[N - 1] = x.grokfast_emas;
  const std::array<at::TensorList, 1> aux{x.agc_scales};
  multi_tensor_apply<N, 1, sgd_store_mask<kMomentum, kGrokfast>()>(
      lists, aux, select, agc_row_len(x.params, x.agc_scales), f);
}

// One dtype group: the step's flags picked here.
template <typename T, bool kGrokfast, typename Select>
void run_group(const SGDArgs& x, const Select& select, bool use_momentum, bool nesterov,
               bool first_step) {
  if (!use_momentum) {
    launch_sgd<T, false, false, false, kGrokfast>(x, select);
  } else if (first_step) {
    if (nesterov) {
      launch_sgd<T, true, true, true, kGrokfast>(x, select);
    } else {
      launch_sgd<T, true, false, true, kGrokfast>(x, select);
    }
  } else {
    if (nesterov) {
      launch_sgd<T, true, true, false, kGrokfast>(x, select);
    } else {
      launch_sgd<T, true, false, false, kGrokfast>(x, select);
    }
  }
}

void sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
              const at::Tensor& lr, double momentum, double dampening, double weight_decay,
              bool nesterov, bool maximize, bool first_step,
              const std::optional<at::Tensor>& trust_ratios,
              const std::optional<at::Tensor>& grad_norm, double max_grad_norm,
              const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf, at::TensorList agc_scales,
              at::TensorList grokfast_emas, double grokfast_alpha, double grokfast_lamb) {
  const at::Device device = params.empty() ? lr.device() : params[0].device();
  TORCH_CHECK(device.is_cuda(), "catapult: sgd_ (CUDA) got tensors on ", device);
  // Every check passes before anything is launched.
  check_sgd_args(params, grads, momentum_buffers, momentum, trust_ratios, lr, grad_norm,
                 max_grad_norm, grad_scale, found_inf, agc_scales, grokfast_emas, device);
  if (params.empty()) return;

  c10::cuda::CUDAGuard guard(device);
  SGDArgs x;
  x.params = params;
  x.grads = grads;
  x.momentum_buffers = momentum_buffers;
  x.agc_scales = agc_scales;
  x.grokfast_emas = grokfast_emas;
  // Read-only inputs: const_data_ptr (no copy-on-write materialization).
  x.lr = lr.const_data_ptr<float>();
  x.trust_ratios = trust_ratios.has_value() ? trust_ratios->const_data_ptr<float>() : nullptr;
  x.pipe = grad_pipeline_args(grad_norm, max_grad_norm, grad_scale, found_inf, grokfast_alpha,
                              grokfast_lamb, maximize);
  x.momentum = static_cast<float>(momentum);
  // 1 - dampening in double, then rounded: the alpha torch.optim.SGD passes to add_.
  x.one_minus_dampening = static_cast<float>(1.0 - dampening);
  x.weight_decay = static_cast<float>(weight_decay);
  // The same test as check_sgd_args: momentum_buffers is given iff momentum != 0.
  const bool use_momentum = momentum != 0.0;
  const bool grokfast = !grokfast_emas.empty();

  for_each_dtype_group(params, [&](auto tag, const auto& select) {
    using T = decltype(tag);
    if (grokfast) {
      run_group<T, true>(x, select, use_momentum, nesterov, first_step);
    } else {
      run_group<T, false>(x, select, use_momentum, nesterov, first_step);
    }
  });
}

}  // namespace
}  // namespace cuda
}  // namespace catapult

TORCH_LIBRARY_IMPL(catapult, CUDA, m) {
  m.impl("sgd_", TORCH_FN(catapult::cuda::sgd_cuda));
}
