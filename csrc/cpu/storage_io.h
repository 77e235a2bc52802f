// Groups of kGroup elements of a stored list (a state or Grokfast EMA, state_storage.h)
// read into and written from float32 buffers, for the CPU update kernels' stored path:
// float storage converted (rounded to nearest even on the way back), int8 storage
// decoded and encoded a quantization block at a time (a group is one block).
#pragma once
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/update_common.h"  // first: it switches FMA contraction off

#include "state_storage.h"

namespace catapult::cpu {

constexpr int64_t kGroup = kQuantBlock;
static_assert(kGroup % kBlock == 0 && kChunk % kGroup == 0, "groups are whole vector blocks within chunks");

// buf[0, kGroup): the m elements at x as float32, then zeros.
template <typename T>
inline void load_group(const T* x, int64_t m, float* buf) {
  if (m == kGroup) {
    for (int64_t i = 0; i < kGroup; i += kBlock) {
      Vec a, b;
      load_block(x + i, a, b);
      store_block(buf + i, a, b);
    }
    return;
  }
  for (int64_t j = 0; j < m; ++j) buf[j] = static_cast<float>(x[j]);
  std::fill(buf + m, buf + kGroup, 0.0f);
}

// The first m elements of buf into x, rounded to T (as store_block and c10's casts do).
template <typename T>
inline void store_group(const float* buf, int64_t m, T* x) {
  if (m == kGroup) {
    for (int64_t i = 0; i < kGroup; i += kBlock) {
      Vec a, b;
      load_block(buf + i, a, b);
      store_block(x + i, a, b);
    }
    return;
  }
  for (int64_t j = 0; j < m; ++j) x[j] = static_cast<T>(buf[j]);
}

template <QuantMap M>
inline void decode_group(const int8_t* codes, float scale, int64_t m, float* buf) {
  alignas(64) float c[kGroup];
  for (int64_t j = 0; j < m; ++j) c[j] = static_cast<float>(codes[j]);
  std::fill(c + m, c + kGroup, 0.0f);
  const Vec k(decode_factor<M>(scale));
  for (int64_t i = 0; i < kGroup; i += Vec::size()) decode_code<M>(Vec::loadu(c + i), k).store(buf + i);
}

// The absmax of buf[0, kGroup), NaN if any element is NaN.
inline float group_absmax(const float* buf) {
  Vec acc(0.0f);
  for (int64_t i = 0; i < kGroup; i += Vec::size()) acc = at::vec::maximum(acc, Vec::loadu(buf + i).abs());
  alignas(64) float lanes[Vec::size()];
  acc.store(lanes);
  float amax = 0.0f;
  for (int l = 0; l < Vec::size(); ++l) {
    if (std::isnan(lanes[l])) return std::numeric_limits<float>::quiet_NaN();
    amax = std::max(amax, lanes[l]);
  }
  return amax;
}

// Codes and the block's scale of the m values in buf (the rest of buf is zeroed first).
template <QuantMap M>
inline void encode_group(float* buf, int64_t m, int8_t* codes, float* scale) {
  std::fill(buf + m, buf + kGroup, 0.0f);
  const float amax = group_absmax(buf);
  *scale = amax;
  if (!quantizable(amax)) {
    std::fill(codes, codes + m, int8_t{0});
    return;
  }
  alignas(64) float c[kGroup];
  const Vec inverse(1.0f / amax);
  for (int64_t i = 0; i < kGroup; i += Vec::size()) encode_code<M>(Vec::loadu(buf + i), inverse).store(c + i);
  for (int64_t j = 0; j < m; ++j) codes[j] = static_cast<int8_t>(static_cast<int>(c[j]));
}

// One stored list of one tensor: its elements (in `storage`) and, for int8, its scales.
struct StoredList {
  void* data = nullptr;
  float* scales = nullptr;
};

// The group of m elements at element `begin` (a multiple of kGroup) of a stored list.
inline void load_stored(at::ScalarType storage, QuantMap map, const StoredList& l, int64_t begin, int64_t m,
                        float* buf) {
  switch (storage) {
    case at::kFloat:
      return load_group(static_cast<const float*>(l.data) + begin, m, buf);
    case at::kBFloat16:
      return load_group(static_cast<const at::BFloat16*>(l.data) + begin, m, buf);
    case at::kHalf:
      return load_group(static_cast<const at::Half*>(l.data) + begin, m, buf);
    default: {
      const int8_t* codes = static_cast<const int8_t*>(l.data) + begin;
      const float scale = l.scales[begin / kGroup];
      if (map == QuantMap::kFourthRoot) return decode_group<QuantMap::kFourthRoot>(codes, scale, m, buf);
      return decode_group<QuantMap::kSqrt>(codes, scale, m, buf);
    }
  }
}

inline void store_stored(at::ScalarType storage, QuantMap map, const StoredList& l, int64_t begin, int64_t m,
                         float* buf) {
  switch (storage) {
    case at::kFloat:
      return store_group(buf, m, static_cast<float*>(l.data) + begin);
    case at::kBFloat16:
      return store_group(buf, m, static_cast<at::BFloat16*>(l.data) + begin);
    case at::kHalf:
      return store_group(buf, m, static_cast<at::Half*>(l.data) + begin);
    default: {
      int8_t* codes = static_cast<int8_t*>(l.data) + begin;
      float* scale = l.scales + begin / kGroup;
      if (map == QuantMap::kFourthRoot) return encode_group<QuantMap::kFourthRoot>(buf, m, codes, scale);
      return encode_group<QuantMap::kSqrt>(buf, m, codes, scale);
    }
  }
}

// The grad pipeline over the m elements at element j0 (a multiple of kGroup) of a tensor
// whose Grokfast ema is stored as `storage` (ema.data null: off): gb the piped grads, eb the
// new ema values (the caller stores them). The grad times its multiplier (with AGC, its
// row's) first, as pipeline_block computes it.
template <typename T>
inline void pipeline_group(const T* g, const AgcRows& agc, float mult, at::ScalarType storage, const StoredList& ema,
                           int64_t j0, int64_t m, const Pipeline& pl, float* gb, float* eb) {
  load_group(g + j0, m, gb);
  for (int64_t j = 0; j < m; ++j) gb[j] *= agc.scale == nullptr ? mult : mult * agc.scale[(j0 + j) / agc.row_len];
  if (ema.data != nullptr) load_stored(storage, QuantMap::kSqrt, ema, j0, m, eb);
  const Vec one(1.0f);
  for (int64_t i = 0; i < kGroup; i += kBlock) {
    Vec g0, g1;
    pipeline_block<true, float>(gb, ema.data != nullptr ? eb : nullptr, i, one, pl, g0, g1);
    store_block(gb + i, g0, g1);
  }
}

}  // namespace catapult::cpu
