// The generic CUDA launcher of an elementwise update op (a spec: update_op.h), many
// tensors per launch through multi_tensor_apply, one launch set per dtype group.
//
// Per block: the skip flag's early exit (nothing written), the grad multiplier (unscale
// and global clip, read from the device), lr and the tensor's step count read from the
// device, the tensor's constants (Spec::constants), the chunk's AGC rows; then 16-byte
// vectors of p, g, the states the call uses (and the Grokfast ema) are all loaded
// before the math, the grad goes through the pipeline (grad_pipeline.cuh), the spec's
// element function runs, and p, the states (and ema) are stored back. Every block of a
// tensor reads the step count before this step (t = count + 1); a launch after the
// update's counts the step (step_count.cuh; not when skipped). Capturable: every changing
// scalar is a device tensor; no host sync.
//
// CATAPULT_REGISTER_CUDA(Spec) registers this kernel (one generated file per spec).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <array>
#include <bit>

#include "cuda/grad_pipeline.cuh"
#include "cuda/multi_tensor_apply.cuh"
#include "cuda/step_count.cuh"
#include "update_op.h"

namespace catapult {
namespace cuda {

// Lists of a call: 0 params, 1 grads, then each state the variant uses, in spec order,
// then the Grokfast ema (when on). Aux lists: [state_steps,] agc_scales.
template <class Spec, int V, bool kGrokfast>
struct UpdateLayout {
  static constexpr unsigned kUse = Spec::uses(V);
  static constexpr unsigned kRead = Spec::reads(V) & kUse;
  static constexpr int kLists = 2 + std::popcount(kUse) + (kGrokfast ? 1 : 0);
  // Everything but the grads is written back.
  static constexpr unsigned kStoreMask = ((1u << kLists) - 1u) & ~2u;
  static constexpr int kStepAux = 0;                       // when Spec::kHasStep
  static constexpr int kAgcAux = Spec::kHasStep ? 1 : 0;
  static constexpr int kAux = kAgcAux + 1;
};

template <class Spec, int V, bool kGrokfast>
struct UpdateElementOp {
  using L = UpdateLayout<Spec, V, kGrokfast>;
  typename Spec::Constants c;
  ChunkGrad<kGrokfast> grad;

  __device__ __forceinline__ void operator()(float (&e)[L::kLists], int i) const {
    const float g = grad.template of<1>(e, i);
    // Every used list is loaded (chunk_elementwise loads them all); one the variant does
    // not read enters as 0, as on CPU.
    float s[state_slots<Spec>()];
    int l = 2;
#pragma unroll
    for (int k = 0; k < state_slots<Spec>(); ++k) {
      s[k] = 0.0f;
      if (L::kUse >> k & 1u) {
        if (L::kRead >> k & 1u) s[k] = e[l];
        ++l;
      }
    }
    Spec::template update<V, float>(e[0], g, s, c);
    l = 2;
#pragma unroll
    for (int k = 0; k < state_slots<Spec>(); ++k) {
      if (L::kUse >> k & 1u) e[l++] = s[k];
    }
  }
};

template <class Spec, typename T, int V, bool kGrokfast>
struct UpdateFunctor {
  using L = UpdateLayout<Spec, V, kGrokfast>;
  const float* lr;
  PipelineArgs pipe;
  typename Spec::Params h;

  template <typename Table>
  __device__ __forceinline__ void operator()(const Table& table, const ChunkInfo& c) const {
    if (pipe.skipped()) return;
    float t = 0.0f;
    if constexpr (Spec::kHasStep) {
      t = *static_cast<const float*>(table.ptrs[Table::kLists + L::kStepAux][c.t]) + 1.0f;
    }
    UpdateElementOp<Spec, V, kGrokfast> op;
    op.c = Spec::constants(h, *lr, t, table.index[c.t]);
    op.grad = chunk_grad<kGrokfast>(pipe, table, c, L::kAgcAux);
    static_assert(Table::kLists == L::kLists, "table/list mismatch");
    T* ptr[L::kLists];
#pragma unroll
    for (int l = 0; l < L::kLists; ++l) ptr[l] = chunk_ptr<T>(table, l, c);
    chunk_elementwise<T, L::kLists, L::kStoreMask>(ptr, c.n, table.aligned[c.t] != 0, op);
  }
};

template <class Spec, typename T, int V, bool kGrokfast, typename Select>
void launch_update(const UpdateArgs& a, const Select& select, const typename Spec::Params& h) {
  using L = UpdateLayout<Spec, V, kGrokfast>;
  UpdateFunctor<Spec, T, V, kGrokfast> f;
  f.lr = a.lr.const_data_ptr<float>();
  f.pipe = a.pipeline();
  f.h = h;
  std::array<at::TensorList, L::kLists> lists;
  lists[0] = a.params;
  lists[1] = a.grads;
  int l = 2;
  for (int k = 0; k < num_states<Spec>(); ++k) {
    if (L::kUse >> k & 1u) lists[l++] = a.states[k];
  }
  if constexpr (kGrokfast) lists[L::kLists - 1] = a.grokfast_emas;
  std::array<at::TensorList, L::kAux> aux;
  if constexpr (Spec::kHasStep) aux[L::kStepAux] = a.state_steps;
  aux[L::kAgcAux] = a.agc_scales;
  multi_tensor_apply<L::kLists, L::kAux, L::kStoreMask>(lists, aux, select,
                                                        agc_row_len(a.params, a.agc_scales), f);
}

template <class Spec>
void update_cuda(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const UpdateArgs a = pop_update_args<Spec>(*stack, op.schema().arguments().size());
  const at::Device device = a.params.empty() ? a.lr.device() : a.params[0].device();
  TORCH_CHECK(device.is_cuda(), "catapult: ", Spec::kName, " (CUDA) got tensors on ", device);
  const typename Spec::Params h = Spec::params(a.hyper_args(Spec::kName, device));
  const int variant = Spec::variant(h);
  check_update_args<Spec>(a, Spec::uses(variant), device);  // before anything is launched
  if (a.params.empty()) return;
  TORCH_CHECK(a.master_weights.empty(), "catapult: ", Spec::kName,
              " (CUDA): master_weights are not built for CUDA yet; use backend='triton'");
  // multi_tensor_apply walks every list in one dtype: other storage runs on Triton for now.
  for (size_t i = 0; i < a.params.size(); ++i) {
    for (const auto& list : a.states) {
      TORCH_CHECK(list.empty() || list[i].scalar_type() == a.params[i].scalar_type(), "catapult: ", Spec::kName,
                  " (CUDA): states stored as ", list[i].scalar_type(), " with ", a.params[i].scalar_type(),
                  " params are not built for CUDA yet; use backend='triton'");
    }
    TORCH_CHECK(a.grokfast_emas.empty() || a.grokfast_emas[i].scalar_type() == a.params[i].scalar_type(),
                "catapult: ", Spec::kName, " (CUDA): Grokfast EMAs stored as ", a.grokfast_emas[i].scalar_type(),
                " with ", a.params[i].scalar_type(), " params are not built for CUDA yet; use backend='triton'");
  }

  c10::cuda::CUDAGuard guard(device);
  const bool grokfast = !a.grokfast_emas.empty();
  for_each_dtype_group(a.params, [&](auto tag, const auto& select) {
    using T = decltype(tag);
    dispatch_variant<Spec::kVariants>(variant, [&](auto v) {
      constexpr int V = decltype(v)::value;
      if (grokfast) {
        launch_update<Spec, T, V, true>(a, select, h);
      } else {
        launch_update<Spec, T, V, false>(a, select, h);
      }
    });
  });
  if constexpr (Spec::kHasStep) count_step(a.state_steps, a.skip);  // after every block read them
}

}  // namespace cuda
}  // namespace catapult

#define CATAPULT_REGISTER_CUDA(SPEC)                                                          \
  TORCH_LIBRARY_IMPL(catapult, CUDA, m) {                                                     \
    m.impl(SPEC::kName, torch::CppFunction::makeFromBoxedFunction<&catapult::cuda::update_cuda<SPEC>>()); \
  }
