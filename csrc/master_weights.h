// Master weights of 16-bit params (bfloat16, float16), on every backend: the update ops'
// last argument, master_weights (the reference is catapult_kernels/master_weights.py; the
// Triton kernels mirror it). Per param it holds one of (one kind for every param of a call):
//   float32, laid out like the param ("fp32"): a float32 copy. The element function
//     reads it as p; the new value x goes there and, rounded to nearest even, into the param.
//   int8, laid out like the param ("ecc"): a correction c per element, 8 bits below the
//     param's last: the value is P + c * q, P the param as float32 and q = 2^(e - M - 8),
//     e = max(P's exponent, kEccMinExponent), M the format's explicit mantissa bits (bf16 7,
//     fp16 10). Stored: P = x rounded to nearest even, c = rint((x - P) / q) clamped to
//     [-127, 127] (x - P and the scalings are exact); c = 0 where P is not finite. So P + c * q
//     keeps x to 16 significant bits (within q / 2), but where c would be 128 (x within q / 2
//     below the midpoint above P): there within q.
//   int64 with one element ("stochastic", bfloat16 params only): the counter of the
//     param's random stream. x is rounded stochastically: its float32 bits plus the low 16
//     bits of r = mix32(mix32(i) ^ key), then cut to the upper 16 (unbiased: it rounds up
//     with probability (x - down) / (up - down)); i the element's index in memory order,
//     key = mix32(lo ^ mix32(hi + kRoundingSalt)) of the counter's halves lo, hi (both
//     mixed, so that no two steps' streams are the same bits at nearby elements). The op advances the counter by one after the step
//     (not when it is skipped), so a step is reproducible from its counter. NaN rounds to
//     nearest.
// Empty: the param is read and written itself, rounded to nearest even (torch's way).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>

#include "multi_tensor_checks.h"

namespace catapult {

constexpr const char* kMasterSchema = "Tensor(w!)[] master_weights";

enum class MasterKind { kNone, kFloat, kEcc, kStochastic };

// The smallest exponent e of the ecc quantum per format: bf16's is raised from -126 so that
// 1 / q stays a normal float32 (values under 2^-111 get a coarser correction).
constexpr int kEccMinExponentBf16 = -111;
constexpr int kEccMinExponentHalf = -14;

inline uint32_t float_bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

inline float bits_float(uint32_t b) {
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}

// 2^k for k in [-126, 127].
inline float pow2(int k) { return bits_float(static_cast<uint32_t>(k + 127) << 23); }

// A 32-bit mixer (a bijection with full avalanche; constants of hash-prospector's lowbias32).
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21f0aaadu;
  x ^= x >> 15;
  x *= 0x735a2d97u;
  x ^= x >> 15;
  return x;
}

constexpr uint32_t kRoundingSalt = 0x7F4A7C15u;

// The key of a step's stream from its counter's halves.
inline uint32_t rounding_key(uint32_t lo, uint32_t hi) { return mix32(lo ^ mix32(hi + kRoundingSalt)); }

// The 16 random bits that round element i stochastically under a stream's key.
inline uint32_t rounding_bits(uint32_t i, uint32_t key) { return mix32(mix32(i) ^ key) & 0xFFFFu; }

// x rounded stochastically to bfloat16 (as float32) with its random bits r; NaN stays.
inline float stochastic_round_bf16(float x, uint32_t r) {
  const float cut = bits_float((float_bits(x) + r) & 0xFFFF0000u);
  return x != x ? x : cut;  // NaN: its bits plus r may carry into the sign
}

inline const char* master_kind_name(MasterKind k) {
  switch (k) {
    case MasterKind::kFloat:
      return "float32 copies";
    case MasterKind::kEcc:
      return "int8 corrections (ecc)";
    case MasterKind::kStochastic:
      return "stochastic rounding counters";
    default:
      return "none";
  }
}

// The checks of a call's master_weights before anything is written; returns their kind.
inline MasterKind check_master_weights(const char* op, at::TensorList params, at::TensorList masters,
                                       const char* first = "params") {
  if (masters.empty()) return MasterKind::kNone;
  const size_t n = params.size();
  TORCH_CHECK(masters.size() == n, "catapult: ", op, ": master_weights has ", masters.size(), " tensors but ", first,
              " has ", n);
  const at::ScalarType kind_dtype = masters[0].scalar_type();
  MasterKind kind;
  switch (kind_dtype) {
    case at::kFloat:
      kind = MasterKind::kFloat;
      break;
    case at::kChar:
      kind = MasterKind::kEcc;
      break;
    case at::kLong:
      kind = MasterKind::kStochastic;
      break;
    default:
      TORCH_CHECK(false, "catapult: ", op, ": master_weights[0] has dtype ", kind_dtype,
                  "; master weights: float32 (copies), int8 (ecc corrections) or one-element int64 "
                  "(stochastic rounding counters)");
  }
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& m = masters[i];
    const at::Tensor& p = params[i];
    TORCH_CHECK(m.scalar_type() == kind_dtype, "catapult: ", op, ": master_weights[", i, "] has dtype ",
                m.scalar_type(), " but master_weights[0] has ", kind_dtype, " (one kind per call)");
    const bool bf16 = p.scalar_type() == at::kBFloat16;
    TORCH_CHECK(bf16 || (p.scalar_type() == at::kHalf && kind != MasterKind::kStochastic), "catapult: ", op,
                ": master_weights as ", master_kind_name(kind), " need ",
                kind == MasterKind::kStochastic ? "bfloat16" : "bfloat16 or float16", " ", first, "; ", first, "[",
                i, "] is ", p.scalar_type());
    TORCH_CHECK(m.device() == p.device(), "catapult: ", op, ": master_weights[", i, "] is on ", m.device(), " but ",
                first, " are on ", p.device());
    if (kind == MasterKind::kStochastic) {
      TORCH_CHECK(m.numel() == 1, "catapult: ", op, ": master_weights[", i,
                  "] (a stochastic rounding counter) must have one element, got shape ", m.sizes());
    } else {
      TORCH_CHECK(same_layout(m, p), "catapult: ", op, ": master_weights[", i, "] has shape ", m.sizes(),
                  " strides ", m.strides(), " but ", first, "[", i, "] has shape ", p.sizes(), " strides ",
                  p.strides());
    }
  }
  return kind;
}

}  // namespace catapult
