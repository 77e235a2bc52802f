// What the CPU update kernels (the generic driver, elementwise_update.h, and lamb) share
// around their math: the
// work split (fixed-size chunks of every tensor, one parallel_for over all of them)
// and the grad pipeline of csrc/grad_pipeline.h on vectors (AGC row factors folded
// into the grad multiplier per row segment, the Grokfast EMA, maximize).
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "cpu/vec_io.h"  // first: it switches FMA contraction off

#include "grad_pipeline.h"
#include "multi_tensor_checks.h"

namespace catapult::cpu {

// A run of one tensor's elements: the unit of work of the parallel_for.
struct Chunk {
  int64_t entry, begin, size;
};

inline void add_chunks(std::vector<Chunk>& chunks, int64_t entry, int64_t numel) {
  for (int64_t b = 0; b < numel; b += kChunk) chunks.push_back({entry, b, std::min(kChunk, numel - b)});
}

// Every chunk, in one parallel_for (one fork per step, not one per tensor).
template <typename F>
void for_each_chunk(const std::vector<Chunk>& chunks, const F& f) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) f(chunks[i]);
  });
}

// Calls f(T) with the dtype's C++ type (float, at::BFloat16 or at::Half).
template <typename F>
void dispatch_float_type(at::ScalarType dtype, const F& f) {
  switch (dtype) {
    case at::kFloat:
      return f(float{});
    case at::kBFloat16:
      return f(at::BFloat16{});
    default:
      return f(at::Half{});
  }
}

// One tensor's AGC factors: scale[row] for the elements [row * row_len, (row+1) * row_len).
struct AgcRows {
  const float* scale = nullptr;  // nullptr: AGC off
  int64_t row_len = 1;
};

inline AgcRows agc_rows_of(at::TensorList agc_scales, size_t i, const at::Tensor& p) {
  if (agc_scales.empty()) return {};
  return {agc_scales[i].const_data_ptr<float>(), p.numel() / catapult::agc_rows(p)};
}

// Calls f(begin, size, mult) over the chunk [begin, begin + size), cut where AGC rows
// end, with the grad multiplier of each piece: mult, times its row's factor with AGC.
template <typename F>
void for_each_row_segment(const AgcRows& agc, int64_t begin, int64_t size, float mult, const F& f) {
  if (agc.scale == nullptr) return f(begin, size, mult);
  const int64_t end = begin + size;
  while (begin < end) {
    const int64_t row = begin / agc.row_len;
    const int64_t stop = std::min(end, (row + 1) * agc.row_len);
    f(begin, stop - begin, mult * agc.scale[row]);
    begin = stop;
  }
}

// The step-wide part of the grad pipeline, scalar and broadcast to vectors.
struct Pipeline {
  catapult::Grokfast grokfast;
  Vec alpha, one_minus_alpha, lamb;
  bool maximize;
  explicit Pipeline(const catapult::PipelineArgs& a)
      : grokfast(a.grokfast),
        alpha(grokfast.alpha),
        one_minus_alpha(grokfast.one_minus_alpha),
        lamb(grokfast.lamb),
        maximize(a.maximize) {}
};

// The grad pipeline on one block (kBlock elements at g + i): g * mult, the Grokfast
// filter when ema is given (its block read, and written unless !kStoreEma), then
// maximize. The same operations, in the same order, as catapult::pipeline_grad on one
// element.
template <bool kStoreEma = true, typename T>
inline void pipeline_block(const T* g, T* ema, int64_t i, const Vec& mult, const Pipeline& pl, Vec& g0,
                           Vec& g1) {
  load_block(g + i, g0, g1);
  g0 = g0 * mult;
  g1 = g1 * mult;
  if (ema != nullptr) {
    Vec e0, e1;
    load_block(ema + i, e0, e1);
    e0 = pl.alpha * e0 + pl.one_minus_alpha * g0;
    e1 = pl.alpha * e1 + pl.one_minus_alpha * g1;
    g0 = g0 + pl.lamb * e0;
    g1 = g1 + pl.lamb * e1;
    if constexpr (kStoreEma) store_block(ema + i, e0, e1);
  }
  if (pl.maximize) {
    g0 = g0.neg();
    g1 = g1.neg();
  }
}

// The same for the one element g[i] of a scalar tail.
template <bool kStoreEma = true, typename T>
inline float pipeline_element(const T* g, T* ema, int64_t i, float mult, const Pipeline& pl) {
  const float gm = static_cast<float>(g[i]) * mult;
  float e = 0.0f;
  if (ema == nullptr) return catapult::pipeline_grad<false>(gm, e, pl.grokfast, pl.maximize);
  e = static_cast<float>(ema[i]);
  const float out = catapult::pipeline_grad<true>(gm, e, pl.grokfast, pl.maximize);
  if constexpr (kStoreEma) ema[i] = static_cast<T>(e);
  return out;
}

}  // namespace catapult::cpu
