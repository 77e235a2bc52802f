// muon_momentum_: Muon's momentum (torch.optim.Muon's formula), its output, the update
// direction that Newton-Schulz orthogonalizes, written into `out` (laid out like the
// grads, in their dtype): buf = lerp(buf, g, 1 - momentum); out = lerp(g, buf, momentum)
// with nesterov, else buf. lerp as torch's kernel computes it, fused: fma(w, b - a, a)
// for |w| < 0.5, else fma(-(b - a), 1 - w, b), the weight rounded to float32; so the
// direction is torch's bit for bit, and Newton-Schulz's bfloat16 rounding of it too. The
// grad pipeline runs first, so `out` is the clipped, AGC'd, Grokfast-filtered grad's
// momentum. lr is not read.
#pragma once
#include "update_op.h"

namespace catapult::optimizers::muon_momentum {

struct Spec {
  static constexpr const char* kName = "muon_momentum_";
  static constexpr const char* kParams = "out";  // the list it writes
  static constexpr std::array kStates{"momentum_buffers"};
  static constexpr bool kHasStep = false;
  static constexpr const char* kHyper = "float momentum, bool nesterov";

  struct Params {
    float weight, momentum;  // 1 - momentum (in double, then rounded: torch's lerp_ weight), momentum
    bool nesterov;
  };
  static Params params(const Hyper& h) {
    return {static_cast<float>(1.0 - h.f(0)), static_cast<float>(h.f(0)), h.b(1)};
  }

  // 0: out = buf; 1: nesterov.
  static constexpr int kVariants = 2;
  static int variant(const Params& h) { return h.nesterov ? 1 : 0; }
  static constexpr unsigned uses(int) { return 1u; }
  static constexpr unsigned reads(int) { return 1u; }

  struct Constants {
    float weight, one_minus_weight, momentum, one_minus_momentum;
  };
  CATAPULT_HD static Constants constants(const Params& h, float, float, int64_t) {
    return {h.weight, 1.0f - h.weight, h.momentum, 1.0f - h.momentum};
  }

  // torch's lerp(a, b, w) for a weight w and its complement 1 - w (both float32).
  template <typename F>
  CATAPULT_HD static F lerp(F a, F b, float w, float one_minus_w) {
    return (w < 0.5f && w > -0.5f) ? lane_fma(F(w), b - a, a) : lane_fma(F(0.0f) - (b - a), F(one_minus_w), b);
  }

  template <int V, typename F>
  CATAPULT_HD static void update(F& out, F g, F (&s)[1], const Constants& c) {
    F& buf = s[0];
    buf = lerp(buf, g, c.weight, c.one_minus_weight);
    out = V == 1 ? lerp(g, buf, c.momentum, c.one_minus_momentum) : buf;
  }
};

}  // namespace catapult::optimizers::muon_momentum
