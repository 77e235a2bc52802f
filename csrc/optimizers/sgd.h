// sgd_: one SGD step (torch.optim.SGD's formula: coupled weight decay, momentum,
// dampening, nesterov), and LARS's update with trust_ratios (one per param: g = trust *
// (g + weight_decay * p); the ratios come from per-param norms, catapult_kernels/optim/lars.py).
// momentum_buffers is used only when momentum != 0; with first_step they are set to the
// step's grad (torch's first step) instead of updated, and not read. Plain SGD reads p
// and g and writes p: 12 B/param in float32.
#pragma once
#include "update_op.h"

namespace catapult::optimizers::sgd {

struct Spec {
  static constexpr const char* kName = "sgd_";
  static constexpr std::array kStates{"momentum_buffers"};
  static constexpr bool kHasStep = false;
  static constexpr const char* kHyper =
      "float momentum, float dampening, float weight_decay, bool nesterov, bool first_step, "
      "Tensor? trust_ratios";

  struct Params {
    float momentum, one_minus_dampening, weight_decay;
    bool use_momentum;  // momentum != 0 in double, as torch.optim.SGD tests it (1e-50 is momentum)
    bool nesterov, first_step;
    const float* trust;  // per param, by index; nullptr: 1
  };
  static Params params(const Hyper& h) {
    // 1 - dampening in double, then rounded: the alpha torch.optim.SGD passes to add_.
    return {static_cast<float>(h.f(0)), static_cast<float>(1.0 - h.f(1)), static_cast<float>(h.f(2)),
            h.f(0) != 0.0, h.b(3), h.b(4), h.per_param(5, "trust_ratios")};
  }

  // 0: no momentum; 1: momentum; 2: nesterov; 3: first step; 4: first step, nesterov.
  static constexpr int kVariants = 5;
  static int variant(const Params& h) {
    if (!h.use_momentum) return 0;
    return 1 + (h.nesterov ? 1 : 0) + (h.first_step ? 2 : 0);
  }
  static constexpr unsigned uses(int v) { return v == 0 ? 0u : 1u; }
  static constexpr unsigned reads(int v) { return v >= 3 ? 0u : uses(v); }

  struct Constants {
    float lr, momentum, one_minus_dampening, weight_decay;
    float trust;  // 1 for SGD (g * 1 == g exactly)
  };
  CATAPULT_HD static Constants constants(const Params& h, float lr, float, int64_t index) {
    return {lr, h.momentum, h.one_minus_dampening, h.weight_decay, h.trust ? h.trust[index] : 1.0f};
  }

  template <int V, typename F>
  CATAPULT_HD static void update(F& p, F g, F (&s)[1], const Constants& c) {
    if (c.weight_decay != 0.0f) g = g + F(c.weight_decay) * p;  // coupled L2, as torch
    g = F(c.trust) * g;
    if constexpr (V != 0) {
      constexpr bool kNesterov = V == 2 || V == 4;
      F& buf = s[0];
      if constexpr (V >= 3) {
        buf = g;
      } else {
        buf = F(c.momentum) * buf + F(c.one_minus_dampening) * g;
      }
      g = kNesterov ? g + F(c.momentum) * buf : buf;
    }
    p = p - F(c.lr) * g;
  }
};

}  // namespace catapult::optimizers::sgd
