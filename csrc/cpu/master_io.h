// Groups of kGroup param elements read into and written from float32 buffers with their
// master weights (master_weights.h), for the CPU update kernels' stored path: the float32
// copy, the param plus its ecc correction, or the param (stochastic rounding on the way back).
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "cpu/storage_io.h"  // first: it switches FMA contraction off

#include "master_weights.h"

namespace catapult::cpu {

// One param's master weights in a kernel call.
struct Master {
  MasterKind kind = MasterKind::kNone;
  void* data = nullptr;  // float32 copies or int8 codes
  uint32_t lo = 0, hi = 0;  // stochastic: the counter's halves at this step
};

// The ecc quantum's parameters of a 16-bit format (float: unused, masters need 16 bits).
template <typename T>
constexpr int mantissa_bits() {
  return std::is_same_v<T, at::BFloat16> ? 7 : (std::is_same_v<T, at::Half> ? 10 : 23);
}

template <typename T>
constexpr int ecc_min_exponent() {
  return std::is_same_v<T, at::BFloat16> ? kEccMinExponentBf16 : kEccMinExponentHalf;
}

// buf[0, kGroup): the float32 values of the m params at element `begin`, then zeros.
template <typename T>
inline void load_params(const Master& w, const T* p, int64_t begin, int64_t m, float* buf) {
  if (w.kind == MasterKind::kFloat) return load_group(static_cast<const float*>(w.data) + begin, m, buf);
  load_group(p + begin, m, buf);
  if (w.kind != MasterKind::kEcc) return;
  const int8_t* codes = static_cast<const int8_t*>(w.data) + begin;
  for (int64_t j = 0; j < m; ++j) buf[j] = ecc_value(buf[j], codes[j], mantissa_bits<T>(), ecc_min_exponent<T>());
}

// The m new values in buf into the params at element `begin` and their master weights.
template <typename T>
inline void store_params(const Master& w, float* buf, int64_t begin, int64_t m, T* p) {
  switch (w.kind) {
    case MasterKind::kFloat:
      store_group(buf, m, static_cast<float*>(w.data) + begin);
      return store_group(buf, m, p + begin);
    case MasterKind::kEcc: {
      int8_t* codes = static_cast<int8_t*>(w.data) + begin;
      for (int64_t j = 0; j < m; ++j) {
        const T rounded = static_cast<T>(buf[j]);
        codes[j] = ecc_code(buf[j], static_cast<float>(rounded), mantissa_bits<T>(), ecc_min_exponent<T>());
        p[begin + j] = rounded;
      }
      return;
    }
    case MasterKind::kStochastic:
      for (int64_t j = 0; j < m; ++j) {
        p[begin + j] = static_cast<T>(stochastic_round_bf16(buf[j], static_cast<uint64_t>(begin + j), w.lo, w.hi));
      }
      return;
    default:
      return store_group(buf, m, p + begin);
  }
}

}  // namespace catapult::cpu
