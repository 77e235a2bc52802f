// catapult::multi_tensor_norm on CUDA: the 2- or inf-norm of a list of tensors taken
// together, and optionally of each one.
//
// Deterministic (bit-identical every run) by construction: every chunk's block
// writes one partial (sum of squares, or max |x|) to its own slot, reduced within
// the block in a fixed order (cuda/block_reduce.cuh); a finalize kernel then
// reduces each tensor's partials, and all partials, again in a fixed order. No
// atomics. Squares are summed in double (block_reduce.cuh says why), so the norm is
// finite whenever the inputs are and the norm itself fits a float.
//
// Mixed dtypes: one multi_tensor_apply per dtype group, each writing a disjoint
// range of slots of the one partials buffer. Capturable: no host sync.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAFunctions.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "cuda/block_reduce.cuh"
#include "cuda/multi_tensor_apply.cuh"
#include "multi_tensor_checks.h"

namespace catapult {
namespace cuda {
namespace {

// One partial per chunk: partials[slot_base + global_chunk] (double: a sum of squares
// beyond float's range, or a max |x|, exact). The first chunk of each
// tensor also records (first slot, number of chunks) in ranges[2 * index] when
// per-tensor norms are wanted (a tensor's chunks take consecutive slots).
template <typename T, bool kMax>
struct NormPartials {
  double* partials;
  int64_t slot_base;
  int64_t* ranges;  // nullptr unless per_tensor

  template <typename Table>
  __device__ __forceinline__ void operator()(const Table& table, const ChunkInfo& c) const {
    using V = Vec16<T>;
    constexpr int kVec = V::kVec;
    const T* p = static_cast<const T*>(table.ptrs[0][c.t]) + c.start;
    const int n = c.n;
    Acc<kMax> acc[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) acc[j] = 0;

    // Thread k owns the kVec-element groups k, k + kBlockSize, ... and element j of a
    // group always goes to acc[j], whether the group is read as one 16-byte vector
    // (aligned tensor, full group) or element by element (misaligned tensor, or the
    // partial last group, whose missing elements count as 0, the identity). So the
    // partial's bits do not depend on the tensor's address alignment.
    const bool aligned = table.aligned[c.t] != 0;
    const int nfull = n / kVec;
    const int ngroups = (n + kVec - 1) / kVec;
    for (int v = threadIdx.x; v < ngroups; v += kBlockSize) {
      float x[kVec];
      if (aligned && v < nfull) {
        V::unpack(reinterpret_cast<const uint4*>(p)[v], x);
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const int i = v * kVec + j;
          x[j] = i < n ? to_float(p[i]) : 0.0f;
        }
      }
#pragma unroll
      for (int j = 0; j < kVec; ++j) acc[j] = accumulate<kMax>(acc[j], x[j]);
    }

    Acc<kMax> a = acc[0];
#pragma unroll
    for (int j = 1; j < kVec; ++j) a = combine<kMax>(a, acc[j]);
    a = block_reduce<kMax>(a);
    if (threadIdx.x == 0) {
      const int64_t slot = slot_base + c.global_chunk;
      partials[slot] = a;
      if (ranges != nullptr && c.chunk == 0) {
        const int64_t i = table.index[c.t];
        ranges[2 * i] = slot;
        ranges[2 * i + 1] = num_chunks(table.numel[c.t]);
      }
    }
  }
};

// Block b < n_tensors: tensor b's norm from its partials (ranges[2b], ranges[2b+1];
// 0 for empty tensors, whose ranges stay zero). Block n_tensors: the norm of all
// partials. Fixed order: thread k takes partials k, k + kBlockSize, ... in order,
// then block_reduce.
template <bool kMax>
__global__ void __launch_bounds__(kBlockSize)
    norm_finalize_kernel(const double* __restrict__ partials, int64_t total_chunks,
                         const int64_t* __restrict__ ranges, int64_t n_tensors,
                         float* __restrict__ total_out, float* __restrict__ per_tensor_out) {
  const int64_t b = blockIdx.x;
  int64_t start = 0;
  int64_t count = total_chunks;
  float* out = total_out;
  if (b < n_tensors) {
    start = ranges[2 * b];
    count = ranges[2 * b + 1];
    out = per_tensor_out + b;
  }
  double acc = 0.0;
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < count; i += kBlockSize) {
    acc = combine<kMax>(acc, partials[start + i]);
  }
  acc = block_reduce<kMax>(acc);
  if (threadIdx.x == 0) *out = static_cast<float>(kMax ? acc : sqrt(acc));
}

template <typename T, typename Select>
int64_t launch_partials(const std::array<at::TensorList, 1>& lists, const Select& select,
                        bool inf_norm, double* partials, int64_t slot_base, int64_t* ranges) {
  const std::array<at::TensorList, 0> no_aux{};
  if (inf_norm) {
    return multi_tensor_apply<1, 0, 0u>(lists, no_aux, select,
                                    NormPartials<T, true>{partials, slot_base, ranges});
  }
  return multi_tensor_apply<1, 0, 0u>(lists, no_aux, select,
                                  NormPartials<T, false>{partials, slot_base, ranges});
}

std::tuple<at::Tensor, at::Tensor> multi_tensor_norm_cuda(at::TensorList tensors, double ord,
                                                          bool per_tensor) {
  const bool inf_norm = std::isinf(ord) && ord > 0;
  TORCH_CHECK(ord == 2.0 || inf_norm, "catapult: multi_tensor_norm supports ord 2 and inf, got ",
              ord);
  const int64_t n = static_cast<int64_t>(tensors.size());
  if (n == 0) {
    const auto opts = at::TensorOptions().dtype(at::kFloat).device(
        at::Device(at::kCUDA, c10::cuda::current_device()));
    return {at::zeros({}, opts), at::empty({0}, opts)};
  }
  const at::Device device = tensors[0].device();
  TORCH_CHECK(device.is_cuda(), "catapult: multi_tensor_norm (CUDA) got tensors on ", device);
  for (int64_t i = 0; i < n; ++i) {
    const auto& t = tensors[i];
    TORCH_CHECK(t.device() == device, "catapult: tensors[", i, "] is on ", t.device(),
                " but tensors[0] is on ", device);
    TORCH_CHECK(is_supported_float(t.scalar_type()), "catapult: tensors[", i, "] has dtype ",
                t.scalar_type(), "; supported: float32, bfloat16, float16");
  }
  c10::cuda::CUDAGuard guard(device);

  // Flat walks need dense memory; the copies live until the launches are enqueued.
  std::vector<at::Tensor> dense;
  dense.reserve(n);
  int64_t total_chunks = 0;
  for (const auto& t : tensors) {
    dense.push_back(t.is_non_overlapping_and_dense() ? t : t.contiguous());
    total_chunks += num_chunks(t.numel());
  }

  const auto fopts = at::TensorOptions().dtype(at::kFloat).device(device);
  at::Tensor partials = at::empty({total_chunks}, fopts.dtype(at::kDouble));
  at::Tensor ranges;
  if (per_tensor) ranges = at::zeros({2 * n}, fopts.dtype(at::kLong));
  at::Tensor total = at::empty({}, fopts);
  at::Tensor per = at::empty({per_tensor ? n : 0}, fopts);

  double* partials_ptr = total_chunks > 0 ? partials.data_ptr<double>() : nullptr;
  int64_t* ranges_ptr = per_tensor ? ranges.data_ptr<int64_t>() : nullptr;
  const std::array<at::TensorList, 1> lists{at::TensorList(dense)};
  int64_t slot = 0;
  for (const at::ScalarType st : {at::kFloat, at::kBFloat16, at::kHalf}) {
    const auto select = [&](size_t i) { return dense[i].scalar_type() == st; };
    switch (st) {
      case at::kFloat:
        slot += launch_partials<float>(lists, select, inf_norm, partials_ptr, slot, ranges_ptr);
        break;
      case at::kBFloat16:
        slot += launch_partials<c10::BFloat16>(lists, select, inf_norm, partials_ptr, slot,
                                               ranges_ptr);
        break;
      default:
        slot += launch_partials<c10::Half>(lists, select, inf_norm, partials_ptr, slot,
                                           ranges_ptr);
        break;
    }
  }
  TORCH_INTERNAL_ASSERT(slot == total_chunks, "catapult: norm partials miscounted");

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const int64_t n_per = per_tensor ? n : 0;
  TORCH_CHECK(n_per + 1 <= std::numeric_limits<int32_t>::max(), "catapult: too many tensors");
  const dim3 grid(static_cast<unsigned>(n_per + 1));
  if (inf_norm) {
    norm_finalize_kernel<true><<<grid, kBlockSize, 0, stream>>>(
        partials_ptr, total_chunks, ranges_ptr, n_per, total.data_ptr<float>(),
        per_tensor ? per.data_ptr<float>() : nullptr);
  } else {
    norm_finalize_kernel<false><<<grid, kBlockSize, 0, stream>>>(
        partials_ptr, total_chunks, ranges_ptr, n_per, total.data_ptr<float>(),
        per_tensor ? per.data_ptr<float>() : nullptr);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {total, per};
}

}  // namespace
}  // namespace cuda
}  // namespace catapult

TORCH_LIBRARY_IMPL(catapult, CUDA, m) {
  m.impl("multi_tensor_norm", TORCH_FN(catapult::cuda::multi_tensor_norm_cuda));
}
