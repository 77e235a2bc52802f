// Counting the step on CUDA: state_steps[i] += 1 for every param, after the update
// kernels have read the old counts, and not at all when the step is skipped (the skip
// flag nonzero, as every kernel tests it). One thread per tensor, through the
// multi-tensor launcher (its tables hold the step tensors' addresses): no allocation, no
// host sync, capturable.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>

#include "cuda/multi_tensor_apply.cuh"

namespace catapult {
namespace cuda {

struct CountStep {
  const float* skip;  // nullptr: never skipped

  template <typename Table>
  __device__ __forceinline__ void operator()(const Table& table, const ChunkInfo& c) const {
    if (threadIdx.x != 0 || (skip != nullptr && *skip != 0.0f)) return;
    *static_cast<float*>(table.ptrs[0][c.t]) += 1.0f;
  }
};

// state_steps: float32 one-element tensors on the current device (checked by the op).
inline void count_step(at::TensorList state_steps, const std::optional<at::Tensor>& skip) {
  const CountStep f{skip.has_value() ? skip->const_data_ptr<float>() : nullptr};
  multi_tensor_apply<1, 0, 1u>(std::array<at::TensorList, 1>{state_steps}, std::array<at::TensorList, 0>{},
                               [](size_t) { return true; }, f);
}

}  // namespace cuda
}  // namespace catapult
