// catapult::adamw_ on CUDA: one fused AdamW (or Adam: coupled weight decay) step
// (torch.optim.AdamW's formula, math in float32, csrc/adamw_math.h) over lists of
// tensors, many tensors per launch.
//
// Per block: found_inf early exit (nothing written), grad multiplier (unscale and
// global-norm clip, read from the device), lr and the tensor's own step count read
// from the device, per-tensor constants, the chunk's AGC rows; then 16-byte vectors
// of p, g, m, v (and vmax, and the Grokfast ema) are all loaded before the math, the
// grad goes through the pipeline (cuda/grad_pipeline.cuh), and p, m, v (vmax, ema)
// are stored back. Capturable: every changing scalar is a device tensor; no host sync.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <array>
#include <optional>

#include "adamw_math.h"
#include "cuda/grad_pipeline.cuh"
#include "cuda/multi_tensor_apply.cuh"
#include "multi_tensor_checks.h"

namespace catapult {
namespace cuda {
namespace {

// Lists: 0 params, 1 grads, 2 exp_avgs, 3 exp_avg_sqs, [4 max_exp_avg_sqs], [last:
// grokfast_emas]; aux 0: state_steps, aux 1: agc_scales (may be empty). Everything
// but the grads is written back.
template <bool kAms, bool kGrokfast>
constexpr int adamw_lists() {
  return 4 + (kAms ? 1 : 0) + (kGrokfast ? 1 : 0);
}
template <bool kAms, bool kGrokfast>
constexpr unsigned adamw_store_mask() {
  return 0x0Du | (kAms ? 0x10u : 0u) |
         grokfast_store_bit<kGrokfast, adamw_lists<kAms, kGrokfast>()>();
}
constexpr int kStepAux = 0;
constexpr int kAgcAux = 1;

template <bool kAms, bool kGrokfast>
struct AdamWElementOp {
  AdamWStep s;
  ChunkGrad<kGrokfast> grad;

  __device__ __forceinline__ void operator()(float (&e)[adamw_lists<kAms, kGrokfast>()],
                                             int i) const {
    const float g = grad.template of<1>(e, i);
    if constexpr (kAms) {
      adamw_element<true>(e[0], g, e[2], e[3], e[4], s);
    } else {
      float unused = 0.0f;
      adamw_element<false>(e[0], g, e[2], e[3], unused, s);
    }
  }
};

template <typename T, bool kAms, bool kGrokfast>
struct AdamWFunctor {
  const float* lr;
  GradPipelineArgs pipe;
  float beta1, beta2, eps, weight_decay;
  bool decoupled;

  template <typename Table>
  __device__ __forceinline__ void operator()(const Table& table, const ChunkInfo& c) const {
    if (pipe.skip()) return;
    const float step = *static_cast<const float*>(table.ptrs[Table::kLists + kStepAux][c.t]);
    AdamWElementOp<kAms, kGrokfast> op;
    op.s = adamw_step_constants(*lr, beta1, beta2, eps, weight_decay, decoupled, step);
    op.grad = chunk_grad<kGrokfast>(pipe, table, c, kAgcAux);

    constexpr int N = adamw_lists<kAms, kGrokfast>();
    static_assert(Table::kLists == N, "table/list mismatch");
    T* ptr[N];
#pragma unroll
    for (int l = 0; l < N; ++l) ptr[l] = chunk_ptr<T>(table, l, c);
    chunk_elementwise<T, N, adamw_store_mask<kAms, kGrokfast>()>(ptr, c.n,
                                                                 table.aligned[c.t] != 0, op);
  }
};

// The lists of one step, in the order the kernels take them.
struct AdamWLists {
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, agc_scales,
      grokfast_emas;
};

template <typename T, bool kAms, bool kGrokfast, typename Select>
void launch_adamw(const AdamWLists& x, const Select& select,
                  const AdamWFunctor<T, kAms, kGrokfast>& f) {
  constexpr int N = adamw_lists<kAms, kGrokfast>();
  std::array<at::TensorList, N> lists;
  lists[0] = x.params;
  lists[1] = x.grads;
  lists[2] = x.exp_avgs;
  lists[3] = x.exp_avg_sqs;
  if constexpr (kAms) lists[4] = x.max_exp_avg_sqs;
  if constexpr (kGrokfast) lists[N - 1] = x.grokfast_emas;
  const std::array<at::TensorList, 2> aux{x.state_steps, x.agc_scales};
  multi_tensor_apply<N, 2, adamw_store_mask<kAms, kGrokfast>()>(
      lists, aux, select, agc_row_len(x.params, x.agc_scales), f);
}

template <typename T, bool kAms, bool kGrokfast, typename Select>
void run_group(const AdamWLists& x, const Select& select, const float* lr,
               const GradPipelineArgs& pipe, float beta1, float beta2, float eps,
               float weight_decay, bool decoupled) {
  AdamWFunctor<T, kAms, kGrokfast> f;
  f.lr = lr;
  f.pipe = pipe;
  f.beta1 = beta1;
  f.beta2 = beta2;
  f.eps = eps;
  f.weight_decay = weight_decay;
  f.decoupled = decoupled;
  launch_adamw<T, kAms, kGrokfast>(x, select, f);
}

void adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                at::TensorList state_steps, const at::Tensor& lr, double beta1, double beta2,
                double eps, double weight_decay, bool decoupled_weight_decay, bool amsgrad,
                bool maximize, const std::optional<at::Tensor>& grad_norm, double max_grad_norm,
                const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf, at::TensorList agc_scales,
                at::TensorList grokfast_emas, double grokfast_alpha, double grokfast_lamb) {
  const at::Device device = params.empty() ? lr.device() : params[0].device();
  TORCH_CHECK(device.is_cuda(), "catapult: adamw_ (CUDA) got tensors on ", device);
  // Every check passes before anything is launched.
  check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad, lr,
                   grad_norm, max_grad_norm, grad_scale, found_inf, agc_scales, grokfast_emas,
                   device);
  if (params.empty()) return;

  c10::cuda::CUDAGuard guard(device);
  const float* lr_ptr = lr.const_data_ptr<float>();
  const GradPipelineArgs pipe = grad_pipeline_args(grad_norm, max_grad_norm, grad_scale, found_inf,
                                                   grokfast_alpha, grokfast_lamb, maximize);
  const float b1 = static_cast<float>(beta1), b2 = static_cast<float>(beta2);
  const float ep = static_cast<float>(eps), wd = static_cast<float>(weight_decay);
  const AdamWLists x{params,          grads,       exp_avgs,   exp_avg_sqs,
                     max_exp_avg_sqs, state_steps, agc_scales, grokfast_emas};
  const bool grokfast = !grokfast_emas.empty();

  for_each_dtype_group(params, [&](auto tag, const auto& select) {
    using T = decltype(tag);
#define CATAPULT_ADAMW_GROUP(A, G) \
  run_group<T, A, G>(x, select, lr_ptr, pipe, b1, b2, ep, wd, decoupled_weight_decay)
    if (amsgrad) {
      if (grokfast) {
        CATAPULT_ADAMW_GROUP(true, true);
      } else {
        CATAPULT_ADAMW_GROUP(true, false);
      }
    } else {
      if (grokfast) {
        CATAPULT_ADAMW_GROUP(false, true);
      } else {
        CATAPULT_ADAMW_GROUP(false, false);
      }
    }
#undef CATAPULT_ADAMW_GROUP
  });
}

}  // namespace
}  // namespace cuda
}  // namespace catapult

TORCH_LIBRARY_IMPL(catapult, CUDA, m) {
  m.impl("adamw_", TORCH_FN(catapult::cuda::adamw_cuda));
}
