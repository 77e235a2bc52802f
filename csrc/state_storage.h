// How an update op's states (and the Grokfast EMA) are stored, on every backend (the
// Triton kernels mirror it; the reference is catapult_kernels/int8_blocks.py): in one
// dtype S per call, which may differ from the params' dtype. A float S is read as
// float32 and stored rounded to nearest even. int8 is blockwise quantized: per block of
// kQuantBlock elements (memory order; blocks never cross tensors) int8 codes plus one
// float32 scale, the block's absmax, computed from the block's new values in the same
// pass that updates them. A code c stands for scale * map(c / 127), with per block
// factors (one division per block, a multiplication per element; each step rounded once):
//   SQRT (p = 1/2; signed states: moments, momentum, the Grokfast EMA):
//     c = rint(127 * sqrt(|x| * (1 / amax))) with x's sign; x = c|c| * (scale / 16129)
//   FOURTH_ROOT (p = 1/4; second moments, lists named *_sqs):
//     c = rint(127 * sqrt(sqrt(|x| * (1 / amax)))); q = c|c|; x = q|q| * (scale / 16129 / 16129)
// Companding spends the codes where the values are small: a second moment decoded to 0
// where its first moment is not would turn Adam's step into m / eps (measured in
// bench/int8_maps.py). For the same reason a nonzero FOURTH_ROOT value never takes code 0
// but at least 1 (a v under 2.4e-10 of its block's largest decodes larger, which makes the
// step smaller, not m / eps: a run diverged that way after a catapult spike). A block whose absmax is 0, inf or NaN has every code 0, so it
// decodes to 0 (a fresh state) or NaN everywhere (a non-finite state is not hidden).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string_view>
#include <utility>
#include <vector>

#include "lanes.h"
#include "multi_tensor_checks.h"

namespace catapult {

constexpr int64_t kQuantBlock = 128;
constexpr float kCodeMax = 127.0f;
constexpr float kCodeMaxSquared = 16129.0f;

// The schema argument after the pipeline's: per int8 state list a call uses (in spec
// order), then the Grokfast EMAs, one float32 tensor of block scales per param.
constexpr const char* kStorageSchema = "Tensor(y!)[] state_scales";  // written: int8 scales

enum class QuantMap { kSqrt, kFourthRoot };

// A list's map, from its schema name: second moments (non-negative, *_sqs) FOURTH_ROOT.
constexpr QuantMap quant_map_of(const char* list_name) {
  const std::string_view name(list_name);
  return name.size() >= 4 && name.substr(name.size() - 4) == "_sqs" ? QuantMap::kFourthRoot : QuantMap::kSqrt;
}

constexpr int64_t quant_blocks(int64_t numel) { return (numel + kQuantBlock - 1) / kQuantBlock; }

// Whether a block with this absmax has codes (else all are 0).
CATAPULT_HD bool quantizable(float amax) { return amax > 0.0f && amax < INFINITY; }

// The code of x (as a float holding an integer in [-127, 127]) in a block of absmax amax
// (quantizable), given inverse = 1 / amax. The same operations on every lane type, each
// rounded once. |x| * inverse may exceed 1 by an ulp: its code is still 127.
template <QuantMap M, typename F>
CATAPULT_HD F encode_code(const F& x, const F& inverse) {
  F f = lane_sqrt(lane_abs(x) * inverse);
  if constexpr (M == QuantMap::kFourthRoot) f = lane_sqrt(f);
  F c = lane_rint(f * F(kCodeMax));
  if constexpr (M == QuantMap::kFourthRoot) c = select(lane_abs(x) > F(0.0f), clamp_min(c, F(1.0f)), c);
  return select(x < F(0.0f), F(0.0f) - c, c);
}

// A block's decode factor from its scale.
template <QuantMap M>
CATAPULT_HD float decode_factor(float scale) {
  const float k = scale / kCodeMaxSquared;
  return M == QuantMap::kFourthRoot ? k / kCodeMaxSquared : k;
}

// The value of code c (a float holding the code) in a block of decode factor k.
template <QuantMap M, typename F>
CATAPULT_HD F decode_code(const F& c, const F& k) {
  F q = c * lane_abs(c);  // exact
  if constexpr (M == QuantMap::kFourthRoot) q = q * lane_abs(q);
  return q * k;
}

inline bool is_storage_dtype(at::ScalarType t) { return is_supported_float(t) || t == at::kChar; }

// The checks of the stored lists of a call (the states it uses, then the Grokfast EMAs),
// before anything is written: entry i of each laid out like params[i] on its device, in
// one storage dtype per param (float32, bfloat16, float16 or int8), int8 for every param
// or for none, and with int8 the block scales. Returns whether the storage is int8.
inline bool check_storage_lists(const char* op, at::TensorList params, const NamedLists& stored,
                                at::TensorList state_scales, const char* first = "params") {
  const size_t n = params.size();
  for (const auto& [name, list] : stored) {
    TORCH_CHECK(list.size() == n, "catapult: ", name, " has ", list.size(), " tensors but ", first, " has ", n);
  }
  const bool int8 = !stored.empty() && n > 0 && stored[0].second[0].scalar_type() == at::kChar;
  for (size_t i = 0; i < n && !stored.empty(); ++i) {
    const auto& p = params[i];
    const at::ScalarType storage = stored[0].second[i].scalar_type();
    for (const auto& [name, list] : stored) {
      const auto& t = list[i];
      TORCH_CHECK(is_storage_dtype(t.scalar_type()), "catapult: ", op, ": ", name, "[", i, "] has dtype ",
                  t.scalar_type(), "; state storage: float32, bfloat16, float16 or int8");
      TORCH_CHECK(t.scalar_type() == storage, "catapult: ", op, ": ", name, "[", i, "] has dtype ", t.scalar_type(),
                  " but ", stored[0].first, "[", i, "] has ", storage, " (one storage dtype per param)");
      TORCH_CHECK((storage == at::kChar) == int8, "catapult: ", op, ": ", name, "[", i, "] has dtype ", storage,
                  " but ", stored[0].first, "[0] has ", stored[0].second[0].scalar_type(),
                  " (int8 storage for every param of a call or for none)");
      TORCH_CHECK(t.device() == p.device(), "catapult: ", name, "[", i, "] is on ", t.device(), " but ", first,
                  " are on ", p.device());
      TORCH_CHECK(same_layout(t, p), "catapult: ", name, "[", i, "] has shape ", t.sizes(), " strides ",
                  t.strides(), " but ", first, "[", i, "] has shape ", p.sizes(), " strides ", p.strides());
    }
  }
  if (!int8) {
    TORCH_CHECK(state_scales.empty(), "catapult: ", op, ": state_scales must be empty: no state is stored as int8");
    return false;
  }
  TORCH_CHECK(state_scales.size() == stored.size() * n, "catapult: ", op, ": state_scales has ",
              state_scales.size(), " tensors but int8 storage needs ", stored.size() * n, " (one per param for each of ",
              stored.size(), " stored lists)");
  for (size_t j = 0; j < state_scales.size(); ++j) {
    const auto& s = state_scales[j];
    const auto& p = params[j % n];
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.dim() == 1 && s.is_contiguous(), "catapult: ", op,
                ": state_scales[", j, "] must be a contiguous 1-D float32 tensor, got ", s.scalar_type(),
                " of shape ", s.sizes());
    TORCH_CHECK(s.numel() == quant_blocks(p.numel()), "catapult: ", op, ": state_scales[", j, "] has ", s.numel(),
                " scales but ", stored[j / n].first, "[", j % n, "] has ", quant_blocks(p.numel()), " blocks of ",
                kQuantBlock);
    TORCH_CHECK(s.device() == p.device(), "catapult: ", op, ": state_scales[", j, "] is on ", s.device(),
                " but ", first, " are on ", p.device());
  }
  return true;
}

}  // namespace catapult
