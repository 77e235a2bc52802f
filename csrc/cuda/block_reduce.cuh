// Deterministic reductions shared by the kernels that sum over chunks (the norms,
// LAMB's trust ratios): per-thread accumulators, a fixed shuffle tree within each
// warp, then a fixed tree over the warps. The same inputs in the same threads give
// the same bits on every run; no atomics. Sums of squares are accumulated in double:
// every float32 square fits one (3.4e38^2 = 1.2e77; the least subnormal's square,
// 2e-90, is far from underflow), so any finite input gives a finite sum and tiny ones
// do not vanish, with no scaling pass (a float32 sum overflows at one element of 2e19).
// The cost per element is one float->double conversion and one DFMA; on sm_90 (64 DFMA
// per clock per SM; sm_80: 32) that should stay under the memory roof
// (an H200 streams about 9 bfloat16 elements per clock per SM). Not measured on a GPU;
// GPUs with slow double (sm_86/89: 2 per clock per SM) may turn bfloat16 norms compute-bound.
#pragma once

#include <cuda_runtime.h>

#include <type_traits>

#include "cuda/multi_tensor_apply.cuh"

namespace catapult {
namespace cuda {

// A thread's accumulator: max |x| in float (exact), sum x^2 in double.
template <bool kMax>
using Acc = std::conditional_t<kMax, float, double>;

// NaN-propagating reductions; 0 is the identity of both (|x| >= 0).
template <bool kMax, typename V>
__device__ __forceinline__ V combine(V a, V b) {
  if constexpr (kMax) {
    return (a > b || a != a) ? a : b;  // a NaN wins; a NaN b wins through the else
  } else {
    return a + b;
  }
}

// Adds x to a thread's accumulator of sum x^2 (kMax false) or max |x| (kMax true).
template <bool kMax>
__device__ __forceinline__ Acc<kMax> accumulate(Acc<kMax> acc, float x) {
  if constexpr (kMax) {
    return combine<true>(acc, fabsf(x));
  } else {
    const double d = x;
    return fma(d, d, acc);
  }
}

// Fixed-order block reduction of K values at once (one barrier for all); the results
// are valid in thread 0. Call at most once per kernel: it owns a static shared buffer.
template <bool kMax, int K, typename V>
__device__ __forceinline__ void block_reduce(V (&v)[K]) {
  __shared__ V warp_vals[K][kWarps];
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
      v[k] = lane < kWarps ? warp_vals[k][lane] : V(0);
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        v[k] = combine<kMax>(v[k], __shfl_down_sync(0xffffffffu, v[k], off));
      }
    }
  }
}

template <bool kMax, typename V>
__device__ __forceinline__ V block_reduce(V v) {
  V a[1] = {v};
  block_reduce<kMax, 1>(a);
  return a[0];
}

}  // namespace cuda
}  // namespace catapult
