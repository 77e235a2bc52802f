// Deterministic reductions shared by the kernels that sum over chunks (the norms,
// LAMB's trust ratios): per-thread accumulators, a fixed shuffle tree within each
// warp, then a fixed tree over the warps. The same inputs in the same threads give
// the same bits on every run; no atomics.
#pragma once

#include <cuda_runtime.h>

#include "cuda/multi_tensor_apply.cuh"

namespace catapult {
namespace cuda {

// NaN-propagating reductions; 0 is the identity of both (|x| >= 0).
template <bool kMax>
__device__ __forceinline__ float combine(float a, float b) {
  if constexpr (kMax) {
    return (a > b || a != a) ? a : b;  // a NaN wins; a NaN b wins through the else
  } else {
    return a + b;
  }
}

// A thread's accumulator of sum x^2 (kMax false) or max |x| (kMax true).
template <bool kMax>
__device__ __forceinline__ float accumulate(float acc, float x) {
  if constexpr (kMax) {
    return combine<true>(acc, fabsf(x));
  } else {
    return fmaf(x, x, acc);
  }
}

// Fixed-order block reduction of K values at once (one barrier for all); the results
// are valid in thread 0. Call at most once per kernel: it owns a static shared buffer.
template <bool kMax, int K>
__device__ __forceinline__ void block_reduce(float (&v)[K]) {
  __shared__ float warp_vals[K][kWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      v[k] = combine<kMax>(v[k], __shfl_down_sync(0xffffffffu, v[k], off));
    }
    if (lane == 0) warp_vals[k][warp] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      v[k] = lane < kWarps ? warp_vals[k][lane] : 0.0f;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        v[k] = combine<kMax>(v[k], __shfl_down_sync(0xffffffffu, v[k], off));
      }
    }
  }
}

template <bool kMax>
__device__ __forceinline__ float block_reduce(float v) {
  float a[1] = {v};
  block_reduce<kMax, 1>(a);
  return a[0];
}

}  // namespace cuda
}  // namespace catapult
