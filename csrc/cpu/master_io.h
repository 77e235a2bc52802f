// Params read into float32 lanes and written back through their master weights
// (master_weights.h), for the CPU update kernels: per vector block and scalar element
// (the direct path) and per group of kGroup elements (the stored path): the float32 copy,
// the param plus its ecc correction, or the param (stochastic rounding on the way back).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu/storage_io.h"  // first: it switches FMA contraction off

#include "master_weights.h"

namespace catapult::cpu {

// One param's master weights in a kernel call.
struct Master {
  MasterKind kind = MasterKind::kNone;
  void* data = nullptr;  // float32 copies or int8 codes
  uint32_t key = 0;      // stochastic: this step's stream
};

// Param i's master weights in a call of this kind: with stochastic rounding, the stream of
// its counter's value, which is advanced (as the step counts, before the parallel work).
inline Master master_of(MasterKind kind, at::TensorList master_weights, size_t i) {
  Master w{kind};
  if (kind == MasterKind::kStochastic) {
    int64_t* counter = master_weights[i].data_ptr<int64_t>();
    const auto bits = static_cast<uint64_t>(*counter);
    w.key = rounding_key(static_cast<uint32_t>(bits), static_cast<uint32_t>(bits >> 32));
    *counter = static_cast<int64_t>(bits + 1);
  } else if (kind != MasterKind::kNone) {
    w.data = master_weights[i].data_ptr();
  }
  return w;
}

// The ecc quantum's parameters of a 16-bit format (float: unused, masters need 16 bits).
template <typename T>
constexpr int mantissa_bits() {
  return std::is_same_v<T, at::BFloat16> ? 7 : (std::is_same_v<T, at::Half> ? 10 : 23);
}

template <typename T>
constexpr int ecc_min_exponent() {
  return std::is_same_v<T, at::BFloat16> ? kEccMinExponentBf16 : kEccMinExponentHalf;
}

// The ecc quantum of param values P on lanes: q = 2^e * 2^-(M + 8) with 2^e = P's exponent
// bits alone (an exact power of two), at least 2^kMin; inf where P is not finite.
template <typename T>
struct EccLanes {
  static constexpr int kShift = mantissa_bits<T>() + 8;
  const Vec exponent_bits{bits_float(0x7F800000u)};
  const Vec smallest{pow2(ecc_min_exponent<T>())};
  const Vec shift{pow2(kShift)}, unshift{pow2(-kShift)};
  const Vec infinity{bits_float(0x7F800000u)};

  Vec binade(const Vec& P) const { return at::vec::maximum(P & exponent_bits, smallest); }
  // rint((x - P) / q) in [-127, 127]; 0 where P is not finite (x - P and the scalings exact)
  Vec code(const Vec& x, const Vec& P) const {
    const Vec e = binade(P);
    const Vec c = at::vec::clamp(((x - P) * (shift / e)).round(), Vec(-127.0f), Vec(127.0f));
    return Vec::blendv(c, Vec(0.0f), e == infinity);
  }
  // P + c * q; P where it is not finite
  Vec value(const Vec& P, const Vec& c) const {
    const Vec e = binade(P);
    return Vec::blendv(P + c * (e * unshift), P, e == infinity);
  }
};

// A vector block (kBlock elements from element j) of params as float32 lanes a, b.
template <typename T>
inline void load_params_block(const Master& w, const T* p, int64_t j, Vec& a, Vec& b) {
  if (w.kind == MasterKind::kFloat) return load_block(static_cast<const float*>(w.data) + j, a, b);
  load_block(p + j, a, b);
  if (w.kind != MasterKind::kEcc) return;
  alignas(64) float c[kBlock];
  const int8_t* codes = static_cast<const int8_t*>(w.data) + j;
  for (int64_t k = 0; k < kBlock; ++k) c[k] = static_cast<float>(codes[k]);
  const EccLanes<T> ecc;
  a = ecc.value(a, Vec::loadu(c));
  b = ecc.value(b, Vec::loadu(c + Vec::size()));
}

// The new values a, b of a vector block into the params from element j and their masters.
template <typename T>
inline void store_params_block(const Master& w, T* p, int64_t j, Vec a, Vec b) {
  if (w.kind == MasterKind::kFloat) store_block(static_cast<float*>(w.data) + j, a, b);
  if (w.kind == MasterKind::kStochastic) {
    alignas(64) float x[kBlock];
    alignas(64) uint32_t r[kBlock];
    a.store(x);
    b.store(x + Vec::size());
    for (int64_t k = 0; k < kBlock; ++k) r[k] = rounding_bits(static_cast<uint32_t>(j + k), w.key);
    for (int64_t k = 0; k < kBlock; ++k) x[k] = stochastic_round_bf16(x[k], r[k]);
    a = Vec::loadu(x);
    b = Vec::loadu(x + Vec::size());
  }
  store_block(p + j, a, b);  // rounded to nearest even (stochastic: already exact)
  if (w.kind != MasterKind::kEcc) return;
  Vec P0, P1;
  load_block(p + j, P0, P1);
  const EccLanes<T> ecc;
  alignas(64) float c[kBlock];
  ecc.code(a, P0).store(c);
  ecc.code(b, P1).store(c + Vec::size());
  int8_t* codes = static_cast<int8_t*>(w.data) + j;
  for (int64_t k = 0; k < kBlock; ++k) codes[k] = static_cast<int8_t>(static_cast<int>(c[k]));
}

// One param element j as float32 (a scalar tail), through the lanes' arithmetic.
template <typename T>
inline float load_param(const Master& w, const T* p, int64_t j) {
  switch (w.kind) {
    case MasterKind::kFloat:
      return static_cast<const float*>(w.data)[j];
    case MasterKind::kEcc: {
      const float code = static_cast<float>(static_cast<const int8_t*>(w.data)[j]);
      alignas(64) float out[Vec::size()];
      EccLanes<T>().value(Vec(static_cast<float>(p[j])), Vec(code)).store(out);
      return out[0];
    }
    default:
      return static_cast<float>(p[j]);
  }
}

template <typename T>
inline void store_param(const Master& w, T* p, int64_t j, float x) {
  switch (w.kind) {
    case MasterKind::kFloat:
      static_cast<float*>(w.data)[j] = x;
      p[j] = static_cast<T>(x);
      return;
    case MasterKind::kStochastic:
      p[j] = static_cast<T>(stochastic_round_bf16(x, rounding_bits(static_cast<uint32_t>(j), w.key)));
      return;
    case MasterKind::kEcc: {
      const T rounded = static_cast<T>(x);
      alignas(64) float out[Vec::size()];
      EccLanes<T>().code(Vec(x), Vec(static_cast<float>(rounded))).store(out);
      static_cast<int8_t*>(w.data)[j] = static_cast<int8_t>(static_cast<int>(out[0]));
      p[j] = rounded;
      return;
    }
    default:
      p[j] = static_cast<T>(x);
  }
}

// buf[0, kGroup): the float32 values of the m params at element `begin`, then zeros.
template <typename T>
inline void load_params(const Master& w, const T* p, int64_t begin, int64_t m, float* buf) {
  if (w.kind == MasterKind::kFloat) return load_group(static_cast<const float*>(w.data) + begin, m, buf);
  load_group(p + begin, m, buf);
  if (w.kind != MasterKind::kEcc) return;
  alignas(64) float c[kGroup];
  const int8_t* codes = static_cast<const int8_t*>(w.data) + begin;
  for (int64_t j = 0; j < m; ++j) c[j] = static_cast<float>(codes[j]);
  std::fill(c + m, c + kGroup, 0.0f);
  const EccLanes<T> ecc;
  for (int64_t i = 0; i < kGroup; i += Vec::size()) ecc.value(Vec::loadu(buf + i), Vec::loadu(c + i)).store(buf + i);
}

// The m new values in buf into the params at element `begin` and their master weights.
template <typename T>
inline void store_params(const Master& w, float* buf, int64_t begin, int64_t m, T* p) {
  if (w.kind == MasterKind::kFloat) store_group(buf, m, static_cast<float*>(w.data) + begin);
  if (w.kind == MasterKind::kStochastic) {
    alignas(64) uint32_t r[kGroup];
    for (int64_t j = 0; j < kGroup; ++j) r[j] = rounding_bits(static_cast<uint32_t>(begin + j), w.key);
    for (int64_t j = 0; j < kGroup; ++j) buf[j] = stochastic_round_bf16(buf[j], r[j]);  // exact in bf16 now
  }
  store_group(buf, m, p + begin);  // rounded to nearest even (stochastic: already exact)
  if (w.kind != MasterKind::kEcc) return;
  alignas(64) float P[kGroup], c[kGroup];
  load_group(p + begin, m, P);
  const EccLanes<T> ecc;
  for (int64_t i = 0; i < kGroup; i += Vec::size()) ecc.code(Vec::loadu(buf + i), Vec::loadu(P + i)).store(c + i);
  int8_t* codes = static_cast<int8_t*>(w.data) + begin;
  for (int64_t j = 0; j < m; ++j) codes[j] = static_cast<int8_t>(static_cast<int>(c[j]));
}

}  // namespace catapult::cpu
