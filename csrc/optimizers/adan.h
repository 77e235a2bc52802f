// adan_: one Adan step (Xie et al. 2022, "Adan: Adaptive Nesterov Momentum Algorithm",
// arXiv 2208.06677), as in its authors' implementation. With bc_i = 1 - beta_i^t:
// diff = g - pre_grad (0 at t = 1); m = b1 m + (1-b1) g; d = b2 d + (1-b2) diff;
// u = g + b2 diff; v = b3 v + (1-b3) u^2; update = (m/bc1 + b2 d/bc2) / (sqrt(v)/sqrt(bc3) + eps);
// no_prox: p = p (1 - lr wd) - lr update; else p = (p - lr update) / (1 + lr wd); pre_grad = g.
#pragma once
#include "update_op.h"

namespace catapult::optimizers::adan {

struct Spec {
  static constexpr const char* kName = "adan_";
  static constexpr std::array kStates{"exp_avgs", "exp_avg_diffs", "exp_avg_sqs", "pre_grads"};
  static constexpr bool kHasStep = true;
  static constexpr const char* kHyper =
      "float beta1, float beta2, float beta3, float eps, float weight_decay, bool no_prox";

  struct Params {
    float beta1, beta2, beta3, eps, weight_decay;
    bool no_prox;
  };
  static Params params(const Hyper& h) {
    return {static_cast<float>(h.f(0)), static_cast<float>(h.f(1)), static_cast<float>(h.f(2)),
            static_cast<float>(h.f(3)), static_cast<float>(h.f(4)), h.b(5)};
  }

  static constexpr int kVariants = 1;
  static int variant(const Params&) { return 0; }
  static constexpr unsigned uses(int) { return 0b1111u; }
  static constexpr unsigned reads(int) { return 0b1111u; }

  struct Constants {
    float lr, beta1, beta2, beta3, eps;
    float bias_correction1, bias_correction2, bias_correction3_sqrt;
    float weight_decay_lr;  // lr * weight_decay
    bool first, no_prox;
  };
  CATAPULT_HD static Constants constants(const Params& h, float lr, float t, int64_t) {
    return {lr, h.beta1, h.beta2, h.beta3, h.eps, 1.0f - powf(h.beta1, t), 1.0f - powf(h.beta2, t),
            sqrtf(1.0f - powf(h.beta3, t)), lr * h.weight_decay, t == 1.0f, h.no_prox};
  }

  template <int V, typename F>
  CATAPULT_HD static void update(F& p, F g, F (&s)[4], const Constants& c) {
    F& m = s[0];
    F& d = s[1];
    F& v = s[2];
    F& pre_grad = s[3];
    const F diff = c.first ? F(0.0f) : g - pre_grad;
    m = F(c.beta1) * m + F(1.0f - c.beta1) * g;
    d = F(c.beta2) * d + F(1.0f - c.beta2) * diff;
    const F u = g + F(c.beta2) * diff;
    v = F(c.beta3) * v + F(1.0f - c.beta3) * u * u;
    const F denom = lane_sqrt(v) / F(c.bias_correction3_sqrt) + F(c.eps);
    const F step = (m / F(c.bias_correction1) + F(c.beta2) * d / F(c.bias_correction2)) / denom;
    if (c.no_prox) {
      p = p * F(1.0f - c.weight_decay_lr) - F(c.lr) * step;
    } else {
      p = (p - F(c.lr) * step) / F(1.0f + c.weight_decay_lr);
    }
    pre_grad = g;
  }
};

}  // namespace catapult::optimizers::adan
