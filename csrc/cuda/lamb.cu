// catapult::lamb_ on CUDA: one fused LAMB step (You et al. 2019, math in float32,
// csrc/lamb_math.h) over lists of tensors, in three launches (per dtype group for
// the two passes), all through the generic multi_tensor_apply:
//   pass 1 (every chunk of every tensor): the grad pipeline (cuda/grad_pipeline.cuh)
//     and lamb_moments, and the chunk's partial sums of r^2 and p^2 (in double, so
//     finite for any finite r and p) written to its own slot (fixed-order block
//     reduction, cuda/block_reduce.cuh); the first chunk of each tensor records its
//     slot range;
//   trust (one block per tensor): the tensor's partials reduced in a fixed order,
//     trust = lamb_trust_ratio(|p|, |r|, max_weight_norm) into a float32 [n] buffer;
//   pass 2: p = p - lr * trust * r, with pass 1's r bit for bit.
// Where the new m and v live between the passes depends on the dtype. float32
// stores them exactly: pass 1 writes m, v (and the Grokfast ema), and pass 2
// recomputes r from p, m, v as stored (24 + 16 B per param). A 16-bit type would
// round them, and an r recomputed from rounded moments is not the r the trust ratio
// was measured on (v = 1e-8 is 0 in float16, which turns r = m_hat / (sqrt(v_hat) +
// eps) from about 1 into m_hat / eps); so for 16-bit types pass 1 writes nothing
// but its partials, and pass 2 runs the grad pipeline and lamb_moments again from
// the old state (the same float32 operations, so the same r), then writes p, m, v
// (and the ema): 8 + 14 B per param instead of 8 + 12.
// The trust ratios are deterministic (no atomics). skip nonzero: neither pass
// writes anything (pass 1 writes no partials or ranges either, so every trust is 1
// and unused). Capturable: every changing scalar is read on the device, scratch
// comes from the caching allocator on the current stream, and the host never waits.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>

#include "cuda/block_reduce.cuh"
#include "cuda/grad_pipeline.cuh"
#include "cuda/multi_tensor_apply.cuh"
#include "cuda/step_count.cuh"
#include "lamb_args.h"
#include "lamb_math.h"
#include "multi_tensor_checks.h"

namespace catapult {
namespace cuda {
namespace {

// Whether pass 1 stores the new m, v (and ema) for pass 2 to read: only where T's
// storage holds them exactly (see the top of the file).
template <typename T>
constexpr bool kStoresMoments = std::is_same_v<T, float>;

// The moments lists (pass 1; pass 2 of 16-bit types): 0 params, 1 grads, 2 exp_avgs,
// 3 exp_avg_sqs, [4 grokfast_emas]; aux 0: state_steps, aux 1: agc_scales (may be
// empty).
template <bool kGrokfast>
constexpr int moments_lists() {
  return kGrokfast ? 5 : 4;
}
// m, v (and the ema): the new state's lists.
template <bool kGrokfast>
constexpr unsigned state_mask() {
  return 0xCu | grokfast_store_bit<kGrokfast, moments_lists<kGrokfast>()>();
}
constexpr int kStepAux = 0;
constexpr int kAgcAux = 1;

// Pass 1 stores the new state only where pass 2 reads it back.
template <typename T, bool kGrokfast>
constexpr unsigned pass1_mask() {
  return kStoresMoments<T> ? state_mask<kGrokfast>() : 0u;
}
// Pass 2 of 16-bit types stores p and the new state.
template <bool kGrokfast>
constexpr unsigned pass2_full_mask() {
  return 0x1u | state_mask<kGrokfast>();
}

// The grad pipeline and lamb_moments on a moments-list element: m, v (ema) updated
// in e; returns r. Both passes of 16-bit types run exactly this, so they get the
// same r.
template <bool kGrokfast, int N>
__device__ __forceinline__ float moments_of(float (&e)[N], int i, const LAMBStep& s,
                                            const ChunkGrad<kGrokfast>& grad) {
  const float g = grad.template of<1>(e, i);
  return lamb_moments(e[0], g, e[2], e[3], s);
}

// Per block, both passes: the tensor's step constants from its own step count.
template <typename Table>
__device__ __forceinline__ LAMBStep step_of(const Table& table, const ChunkInfo& c, float beta1,
                                            float beta2, float eps, float weight_decay,
                                            bool bias_correction) {
  // t = the count before this step + 1 (both passes; the count moves after pass 2)
  const float step = *static_cast<const float*>(table.ptrs[Table::kLists + kStepAux][c.t]) + 1.0f;
  return lamb_step_constants(beta1, beta2, eps, weight_decay, bias_correction, step);
}

template <bool kGrokfast>
struct MomentsOp {
  LAMBStep s;
  ChunkGrad<kGrokfast> grad;
  double rr = 0.0;  // this thread's sum of r^2 over its elements, in its fixed order
  double pp = 0.0;  // and of p^2

  __device__ __forceinline__ void operator()(float (&e)[moments_lists<kGrokfast>()], int i) {
    const float r = moments_of(e, i, s, grad);
    rr = accumulate<false>(rr, r);
    pp = accumulate<false>(pp, e[0]);
  }
};

template <typename T, bool kGrokfast>
struct MomentsFunctor {
  PipelineArgs pipe;
  float beta1, beta2, eps, weight_decay;
  bool bias_correction;
  double2* partials;  // per chunk (sum r^2, sum p^2), at slot slot_base + global_chunk
  int64_t slot_base;
  int64_t* ranges;  // per param (caller's index): first slot, number of chunks

  template <typename Table>
  __device__ __forceinline__ void operator()(const Table& table, const ChunkInfo& c) const {
    if (pipe.skipped()) return;  // uniform: before the block reduction's barrier
    MomentsOp<kGrokfast> op;
    op.s = step_of(table, c, beta1, beta2, eps, weight_decay, bias_correction);
    op.grad = chunk_grad<kGrokfast>(pipe, table, c, kAgcAux);

    constexpr int N = moments_lists<kGrokfast>();
    static_assert(Table::kLists == N, "table/list mismatch");
    T* ptr[N];
#pragma unroll
    for (int l = 0; l < N; ++l) ptr[l] = chunk_ptr<T>(table, l, c);
    chunk_elementwise<T, N, pass1_mask<T, kGrokfast>()>(ptr, c.n, table.aligned[c.t] != 0, op);

    double sums[2] = {op.rr, op.pp};
    block_reduce<false, 2>(sums);
    if (threadIdx.x == 0) {
      const int64_t slot = slot_base + c.global_chunk;
      partials[slot] = make_double2(sums[0], sums[1]);
      if (c.chunk == 0) {
        // A tensor's chunks are numbered consecutively (multi_tensor_apply).
        const int64_t i = table.index[c.t];
        ranges[2 * i] = slot;
        ranges[2 * i + 1] = num_chunks(table.numel[c.t]);
      }
    }
  }
};

// Block b: param b's trust ratio from its partials (slots ranges[2b] ..
// ranges[2b] + ranges[2b+1]; none for empty params, whose ranges stay zero: trust 1).
// Fixed order: thread k takes partials k, k + kBlockSize, ... in order, then
// block_reduce, as the norm's finalize.
__global__ void __launch_bounds__(kBlockSize)
    lamb_trust_kernel(const double2* __restrict__ partials, const int64_t* __restrict__ ranges,
                      float max_weight_norm, float* __restrict__ trust) {
  const int64_t b = blockIdx.x;
  const int64_t start = ranges[2 * b];
  const int64_t count = ranges[2 * b + 1];
  double sums[2] = {0.0, 0.0};  // r^2, p^2
  for (int64_t i = threadIdx.x; i < count; i += kBlockSize) {
    const double2 q = partials[start + i];
    sums[0] = combine<false>(sums[0], q.x);
    sums[1] = combine<false>(sums[1], q.y);
  }
  block_reduce<false, 2>(sums);
  if (threadIdx.x == 0) {
    trust[b] = lamb_trust_ratio(static_cast<float>(sqrt(sums[1])), static_cast<float>(sqrt(sums[0])),
                                max_weight_norm);
  }
}

// Pass 2 for float32. Lists: 0 params, 1 exp_avgs, 2 exp_avg_sqs (as pass 1 stored
// them); aux 0: state_steps. Only params are written.
struct UpdateOp {
  LAMBStep s;
  float lr_trust;  // lr * trust, so that p - lr * trust * r rounds as written

  __device__ __forceinline__ void operator()(float (&e)[3], int) const {
    e[0] = e[0] - lr_trust * lamb_direction(e[0], e[1], e[2], s);
  }
};

// Pass 2 for 16-bit types, on the moments lists from the old state: p, m, v (ema)
// are written.
template <bool kGrokfast>
struct FullUpdateOp {
  LAMBStep s;
  ChunkGrad<kGrokfast> grad;
  float lr_trust;

  __device__ __forceinline__ void operator()(float (&e)[moments_lists<kGrokfast>()],
                                             int i) const {
    const float r = moments_of(e, i, s, grad);
    e[0] = e[0] - lr_trust * r;
  }
};

template <typename T, bool kGrokfast>
struct UpdateFunctor {
  const float* lr;
  PipelineArgs pipe;  // 16-bit types: the whole pipeline; float32: the skip flag only
  const float* trust;     // float32 [len(params)], by caller's index
  float beta1, beta2, eps, weight_decay;
  bool bias_correction;

  template <typename Table>
  __device__ __forceinline__ void operator()(const Table& table, const ChunkInfo& c) const {
    if (pipe.skipped()) return;
    const LAMBStep s = step_of(table, c, beta1, beta2, eps, weight_decay, bias_correction);
    const float lr_trust = *lr * trust[table.index[c.t]];
    constexpr int N = Table::kLists;
    T* ptr[N];
#pragma unroll
    for (int l = 0; l < N; ++l) ptr[l] = chunk_ptr<T>(table, l, c);
    const bool aligned = table.aligned[c.t] != 0;
    if constexpr (kStoresMoments<T>) {
      static_assert(N == 3, "table/list mismatch");
      UpdateOp op{s, lr_trust};
      chunk_elementwise<T, N, 0x1u>(ptr, c.n, aligned, op);
    } else {
      static_assert(N == moments_lists<kGrokfast>(), "table/list mismatch");
      FullUpdateOp<kGrokfast> op{s, chunk_grad<kGrokfast>(pipe, table, c, kAgcAux), lr_trust};
      chunk_elementwise<T, N, pass2_full_mask<kGrokfast>()>(ptr, c.n, aligned, op);
    }
  }
};

// The lists of one step.
struct LAMBLists {
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, state_steps, agc_scales, grokfast_emas;
};

// multi_tensor_apply over the moments lists (pass 1; pass 2 of 16-bit types).
template <unsigned kWriteMask, bool kGrokfast, typename Select, typename Functor>
int64_t apply_moments_lists(const LAMBLists& x, const Select& select, const Functor& f) {
  const std::array<at::TensorList, 2> aux{x.state_steps, x.agc_scales};
  const auto extra = agc_row_len(x.params, x.agc_scales);
  if constexpr (kGrokfast) {
    const std::array<at::TensorList, 5> lists{x.params, x.grads, x.exp_avgs, x.exp_avg_sqs,
                                              x.grokfast_emas};
    return multi_tensor_apply<5, 2, kWriteMask>(lists, aux, select, extra, f);
  } else {
    const std::array<at::TensorList, 4> lists{x.params, x.grads, x.exp_avgs, x.exp_avg_sqs};
    return multi_tensor_apply<4, 2, kWriteMask>(lists, aux, select, extra, f);
  }
}

template <typename T, bool kGrokfast, typename Select>
void launch_update(const LAMBLists& x, const Select& select, const UpdateFunctor<T, kGrokfast>& f) {
  if constexpr (kStoresMoments<T>) {
    const std::array<at::TensorList, 3> lists{x.params, x.exp_avgs, x.exp_avg_sqs};
    const std::array<at::TensorList, 1> aux{x.state_steps};
    multi_tensor_apply<3, 1, 0x1u>(lists, aux, select, f);
  } else {
    apply_moments_lists<pass2_full_mask<kGrokfast>(), kGrokfast>(x, select, f);
  }
}

void lamb_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
               at::TensorList exp_avg_sqs, at::TensorList state_steps, const at::Tensor& lr,
               double beta1, double beta2, double eps, double weight_decay, bool bias_correction,
               double max_weight_norm, const std::optional<at::Tensor>& grad_norm,
               double max_grad_norm, const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& skip, at::TensorList agc_scales,
               at::TensorList grokfast_emas, double grokfast_alpha, double grokfast_lamb,
               bool maximize, at::TensorList state_scales, at::TensorList master_weights) {
  const at::Device device = params.empty() ? lr.device() : params[0].device();
  TORCH_CHECK(device.is_cuda(), "catapult: lamb_ (CUDA) got tensors on ", device);
  // Every check passes before anything is launched.
  const CallStorage storage =
      check_lamb_args(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, grad_norm, max_grad_norm, grad_scale,
                      skip, agc_scales, grokfast_emas, state_scales, master_weights, device);
  if (params.empty()) return;
  TORCH_CHECK(storage.master == MasterKind::kNone, "catapult: lamb_ (CUDA): master_weights are not built for CUDA "
              "yet; use backend='triton'");
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(exp_avgs[i].scalar_type() == params[i].scalar_type(), "catapult: lamb_ (CUDA): states stored as ",
                exp_avgs[i].scalar_type(), " with ", params[i].scalar_type(),
                " params are not built for CUDA yet; use backend='triton'");
  }
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(n <= std::numeric_limits<int32_t>::max(), "catapult: lamb_: too many tensors");

  c10::cuda::CUDAGuard guard(device);
  const LAMBLists x{params, grads, exp_avgs, exp_avg_sqs, state_steps, agc_scales, grokfast_emas};
  const float* lr_ptr = lr.const_data_ptr<float>();
  const PipelineArgs pipe = pipeline_args(grad_norm, max_grad_norm, grad_scale, skip, grokfast_alpha,
                                          grokfast_lamb, maximize);
  const float b1 = static_cast<float>(beta1), b2 = static_cast<float>(beta2);
  const float ep = static_cast<float>(eps), wd = static_cast<float>(weight_decay);
  const bool grokfast = !grokfast_emas.empty();

  // Scratch: one (r^2, p^2) partial per chunk, each param's slot range (zero for
  // params pass 1 never visits), each param's trust ratio.
  int64_t total_chunks = 0;
  for (const auto& p : params) total_chunks += num_chunks(p.numel());
  const auto fopts = at::TensorOptions().dtype(at::kFloat).device(device);
  at::Tensor partials = at::empty({total_chunks, 2}, fopts.dtype(at::kDouble));
  at::Tensor ranges = at::zeros({2 * n}, fopts.dtype(at::kLong));
  at::Tensor trust = at::empty({n}, fopts);
  // at::empty storage is at least 16-byte aligned: double2 accesses are fine.
  double2* partials_ptr =
      total_chunks > 0 ? reinterpret_cast<double2*>(partials.data_ptr<double>()) : nullptr;
  int64_t* ranges_ptr = ranges.data_ptr<int64_t>();
  float* trust_ptr = trust.data_ptr<float>();

  // Pass 1: the dtype groups write disjoint slot ranges of the one partials buffer.
  int64_t slot = 0;
  for_each_dtype_group(params, [&](auto tag, const auto& select) {
    using T = decltype(tag);
    const auto pass1 = [&](auto grokfast_tag) {
      constexpr bool G = decltype(grokfast_tag)::value;
      const MomentsFunctor<T, G> f{pipe, b1, b2, ep, wd, bias_correction, partials_ptr, slot,
                                   ranges_ptr};
      slot += apply_moments_lists<pass1_mask<T, G>(), G>(x, select, f);
    };
    if (grokfast) {
      pass1(std::true_type{});
    } else {
      pass1(std::false_type{});
    }
  });
  TORCH_INTERNAL_ASSERT(slot == total_chunks, "catapult: lamb_ partials miscounted");

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  lamb_trust_kernel<<<static_cast<unsigned>(n), kBlockSize, 0, stream>>>(
      partials_ptr, ranges_ptr, static_cast<float>(max_weight_norm), trust_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Pass 2 (float32 reads the stored state, with or without Grokfast: one kernel).
  for_each_dtype_group(params, [&](auto tag, const auto& select) {
    using T = decltype(tag);
    if constexpr (!kStoresMoments<T>) {
      if (grokfast) {
        const UpdateFunctor<T, true> f{lr_ptr, pipe, trust_ptr, b1, b2, ep, wd, bias_correction};
        launch_update<T, true>(x, select, f);
        return;
      }
    }
    const UpdateFunctor<T, false> f{lr_ptr, pipe, trust_ptr, b1, b2, ep, wd, bias_correction};
    launch_update<T, false>(x, select, f);
  });
  count_step(state_steps, skip);  // the op counts the step, after both passes read the old count
}

}  // namespace
}  // namespace cuda
}  // namespace catapult

TORCH_LIBRARY_IMPL(catapult, CUDA, m) {
  m.impl("lamb_", TORCH_FN(catapult::cuda::lamb_cuda));
}
