// adopt_: one ADOPT step (Taniguchi et al. 2024, "ADOPT: Modified Adam Can Converge with
// Any beta2 with the Optimal Rate", arXiv 2411.02853, with the clipped update of its
// released code). t = 1: v = g^2 (m and p unchanged). t >= 2: p = p * (1 - lr * wd)
// (decoupled); ghat = clamp(g / max(sqrt(v), eps), -(t-1)^(1/4), (t-1)^(1/4));
// m = beta1 * m + (1 - beta1) * ghat; p = p - lr * m; v = beta2 * v + (1 - beta2) * g^2.
#pragma once
#include "update_op.h"

namespace catapult::optimizers::adopt {

struct Spec {
  static constexpr const char* kName = "adopt_";
  static constexpr std::array kStates{"exp_avgs", "exp_avg_sqs"};
  static constexpr bool kHasStep = true;
  static constexpr const char* kHyper = "float beta1, float beta2, float eps, float weight_decay";

  struct Params {
    float beta1, beta2, eps, weight_decay;
  };
  static Params params(const Hyper& h) {
    return {static_cast<float>(h.f(0)), static_cast<float>(h.f(1)), static_cast<float>(h.f(2)),
            static_cast<float>(h.f(3))};
  }

  static constexpr int kVariants = 1;
  static int variant(const Params&) { return 0; }
  static constexpr unsigned uses(int) { return 0b11u; }
  static constexpr unsigned reads(int) { return 0b11u; }

  struct Constants {
    float lr, beta1, beta2, eps, decay;
    float clip;  // (t - 1)^(1/4)
    bool first;  // t == 1: only v is set
  };
  CATAPULT_HD static Constants constants(const Params& h, float lr, float t, int64_t) {
    return {lr, h.beta1, h.beta2, h.eps, 1.0f - lr * h.weight_decay, powf(t - 1.0f, 0.25f), t == 1.0f};
  }

  template <int V, typename F>
  CATAPULT_HD static void update(F& p, F g, F (&s)[2], const Constants& c) {
    F& m = s[0];
    F& v = s[1];
    if (c.first) {
      v = g * g;
      return;
    }
    p = p * F(c.decay);
    F ghat = g / clamp_min(lane_sqrt(v), F(c.eps));
    ghat = clamp_max(clamp_min(ghat, F(-c.clip)), F(c.clip));
    m = F(c.beta1) * m + F(1.0f - c.beta1) * ghat;
    p = p - F(c.lr) * m;
    v = F(c.beta2) * v + F(1.0f - c.beta2) * g * g;
  }
};

}  // namespace catapult::optimizers::adopt
