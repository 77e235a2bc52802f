// lion_: one Lion step (Chen et al. 2023, "Symbolic Discovery of Optimization
// Algorithms", Algorithm 2): p = p * (1 - lr * wd); p = p - lr * sign(beta1 * m +
// (1 - beta1) * g); m = beta2 * m + (1 - beta2) * g. sign(NaN) is NaN: a NaN is not hidden.
#pragma once
#include "update_op.h"

namespace catapult::optimizers::lion {

struct Spec {
  static constexpr const char* kName = "lion_";
  static constexpr std::array kStates{"exp_avgs"};
  static constexpr bool kHasStep = false;
  static constexpr const char* kHyper = "float beta1, float beta2, float weight_decay";

  struct Params {
    float beta1, one_minus_beta1, beta2, one_minus_beta2, weight_decay;
  };
  static Params params(const Hyper& h) {
    // 1 - beta in double, then rounded, as the reference's alpha arguments.
    return {static_cast<float>(h.f(0)), static_cast<float>(1.0 - h.f(0)), static_cast<float>(h.f(1)),
            static_cast<float>(1.0 - h.f(1)), static_cast<float>(h.f(2))};
  }

  static constexpr int kVariants = 1;
  static int variant(const Params&) { return 0; }
  static constexpr unsigned uses(int) { return 1u; }
  static constexpr unsigned reads(int) { return 1u; }

  struct Constants {
    float lr, beta1, one_minus_beta1, beta2, one_minus_beta2;
    float decay;  // 1 - lr * weight_decay (decoupled, as in the paper)
  };
  CATAPULT_HD static Constants constants(const Params& h, float lr, float, int64_t) {
    return {lr, h.beta1, h.one_minus_beta1, h.beta2, h.one_minus_beta2, 1.0f - lr * h.weight_decay};
  }

  template <int V, typename F>
  CATAPULT_HD static void update(F& p, F g, F (&s)[1], const Constants& c) {
    F& m = s[0];
    const F direction = F(c.beta1) * m + F(c.one_minus_beta1) * g;
    p = p * F(c.decay);
    p = p - F(c.lr) * sign_of(direction);
    m = F(c.beta2) * m + F(c.one_minus_beta2) * g;
  }
};

}  // namespace catapult::optimizers::lion
