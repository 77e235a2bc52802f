// The grad pipeline (csrc/grad_pipeline.h: unscale and clip, AGC, Grokfast,
// maximize) in the CUDA update kernels: the arguments every update op shares, and
// per chunk what each grad element goes through before the optimizer's own math.
//
// Layout the update kernels follow: Grokfast's ema is the last elementwise list
// (read and written; kernels are built with and without it, kGrokfast), and the
// AGC factors are an aux list, empty when AGC is off (nullptr in the table: a
// runtime branch, uniform over the launch, so AGC does not double the kernels),
// with each tensor's row length in table.extra (agc_row_len).
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <optional>

#include "cuda/multi_tensor_apply.cuh"
#include "grad_pipeline.h"
#include "multi_tensor_checks.h"

namespace catapult {
namespace cuda {

// multi_tensor_apply's extra for the update ops: param i's AGC row length (elements
// per row: agc_rows(p) rows, each one contiguous run, as check_*_args ensure), or 0
// when AGC is off.
inline auto agc_row_len(at::TensorList params, at::TensorList agc_scales) {
  const bool on = !agc_scales.empty();
  return [params, on](size_t i) -> int64_t {
    return on ? params[i].numel() / agc_rows(params[i]) : int64_t{0};
  };
}

// Which row of its tensor each element of a chunk lies in, without a 64-bit division
// per element: element i of the chunk (in-chunk index) is in row first_row +
// (col0 + i) / div, where div <= kChunkSize and col0 + i < 2 * kChunkSize, so one
// multiply-high and a shift divide exactly (PyTorch's IntDivider: exact for
// dividend and divisor < 2^31). Rows longer than a chunk: a chunk spans at most two,
// and div = kChunkSize with col0 = kChunkSize - (elements left in the first row)
// puts exactly the elements past that row in first_row + 1.
struct ChunkRows {
  uint32_t col0, magic, shift;

  // Row of the chunk's first element (start: its index in the tensor), and the rest.
  __device__ __forceinline__ static ChunkRows make(int64_t start, int64_t row_len,
                                                   int64_t& first_row) {
    first_row = start / row_len;
    const int64_t col = start - first_row * row_len;  // < row_len
    uint32_t div;
    ChunkRows r;
    if (row_len <= kChunkSize) {
      div = static_cast<uint32_t>(row_len);
      r.col0 = static_cast<uint32_t>(col);
    } else {
      const int64_t left = row_len - col;  // >= 1 elements of the chunk in first_row
      div = static_cast<uint32_t>(kChunkSize);
      r.col0 = left >= kChunkSize ? 0u : static_cast<uint32_t>(kChunkSize - left);
    }
    // shift = ceil(log2(div)) (0 for div 1); magic < 2^32 as div <= 2^14.
    r.shift = static_cast<uint32_t>(32 - __clz(static_cast<int>(div - 1)));
    const uint64_t one = 1;
    r.magic = static_cast<uint32_t>(((one << 32) * ((one << r.shift) - div)) / div + 1);
    return r;
  }

  // Row of element i of the chunk, counted from first_row.
  __device__ __forceinline__ uint32_t operator()(int i) const {
    const uint32_t n = col0 + static_cast<uint32_t>(i);
    const uint32_t t = __umulhi(n, magic);
    return (t + n) >> shift;
  }
};

// The grad pipeline for the elements of one chunk; built once per block (chunk_grad).
template <bool kGrokfast>
struct ChunkGrad {
  // grad_multiplier, negated for maximize unless kGrokfast: grad * -m == -(grad * m)
  // exactly, and it saves a negation per element; with Grokfast the ema must see the
  // grad before the sign, so pipeline_grad negates after the filter.
  float mult;
  const float* agc;  // AGC factor of the chunk's first row (agc_scales[t] + first_row), or nullptr
  ChunkRows rows;    // valid when agc
  Grokfast grokfast;
  bool maximize;

  // The pipeline's grad for element i of the chunk; ema (kGrokfast) updated in place.
  __device__ __forceinline__ float operator()(float grad, float& ema, int i) const {
    // g = grad * (mult * agc_scale[row]): the factor first, as grad_pipeline.h says.
    const float m = agc != nullptr ? mult * __ldg(agc + rows(i)) : mult;
    return pipeline_grad<kGrokfast>(grad * m, ema, grokfast, kGrokfast && maximize);
  }

  // The same on a chunk_elementwise element: the grad at e[kGrad], the ema (when
  // kGrokfast) the last list.
  template <int kGrad, int N>
  __device__ __forceinline__ float of(float (&e)[N], int i) const {
    float none = 0.0f;
    return (*this)(e[kGrad], kGrokfast ? e[N - 1] : none, i);
  }
};

// Per block: the multiplier (read from the device), this tensor's AGC factors (aux
// list agc_aux of the table, nullptr when off) and row length (table.extra).
template <bool kGrokfast, typename Table>
__device__ __forceinline__ ChunkGrad<kGrokfast> chunk_grad(const PipelineArgs& a,
                                                           const Table& table,
                                                           const ChunkInfo& c, int agc_aux) {
  ChunkGrad<kGrokfast> g;
  const float mult = a.multiplier();
  g.mult = (!kGrokfast && a.maximize) ? -mult : mult;
  g.grokfast = a.grokfast;
  g.maximize = a.maximize;
  g.agc = static_cast<const float*>(table.ptrs[Table::kLists + agc_aux][c.t]);
  g.rows = ChunkRows{0u, 1u, 0u};
  if (g.agc != nullptr) {
    int64_t first_row;
    g.rows = ChunkRows::make(c.start, table.extra[c.t], first_row);
    g.agc += first_row;
  }
  return g;
}

// Store-mask bit of the Grokfast ema list (the last of N), 0 without Grokfast.
template <bool kGrokfast, int N>
constexpr unsigned grokfast_store_bit() {
  return kGrokfast ? (1u << (N - 1)) : 0u;
}

}  // namespace cuda
}  // namespace catapult
