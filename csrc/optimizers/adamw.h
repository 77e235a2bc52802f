// adamw_: one Adam or AdamW step (torch.optim.AdamW's formula; with
// decoupled_weight_decay false, torch.optim.Adam's coupled L2: g = g + weight_decay * p).
// max_exp_avg_sqs is used only with amsgrad. The CPU kernels round exactly as written
// (no FMA contraction); nvcc contracts a*b+c, so CUDA may differ by an ulp.
#pragma once
#include "update_op.h"

namespace catapult::optimizers::adamw {

struct Spec {
  static constexpr const char* kName = "adamw_";
  static constexpr std::array kStates{"exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"};
  static constexpr bool kHasStep = true;
  static constexpr const char* kHyper =
      "float beta1, float beta2, float eps, float weight_decay, bool decoupled_weight_decay, bool amsgrad";

  struct Params {
    float beta1, beta2, eps, weight_decay;
    bool decoupled, amsgrad;
  };
  static Params params(const Hyper& h) {
    return {static_cast<float>(h.f(0)), static_cast<float>(h.f(1)), static_cast<float>(h.f(2)),
            static_cast<float>(h.f(3)), h.b(4), h.b(5)};
  }

  static constexpr int kVariants = 2;  // amsgrad
  static int variant(const Params& h) { return h.amsgrad ? 1 : 0; }
  static constexpr unsigned uses(int v) { return v == 1 ? 0b111u : 0b011u; }
  static constexpr unsigned reads(int v) { return uses(v); }

  struct Constants {
    float beta1, beta2, eps;
    float decay;                  // decoupled: 1 - lr * weight_decay, else 1
    float l2;                     // coupled (Adam): weight_decay, else 0
    float step_size;              // lr / (1 - beta1^t)
    float bias_correction2_sqrt;  // sqrt(1 - beta2^t)
  };
  CATAPULT_HD static Constants constants(const Params& h, float lr, float t, int64_t) {
    Constants c;
    c.beta1 = h.beta1;
    c.beta2 = h.beta2;
    c.eps = h.eps;
    c.decay = h.decoupled ? 1.0f - lr * h.weight_decay : 1.0f;
    c.l2 = h.decoupled ? 0.0f : h.weight_decay;
    c.step_size = lr / (1.0f - powf(h.beta1, t));
    c.bias_correction2_sqrt = sqrtf(1.0f - powf(h.beta2, t));
    return c;
  }

  // In the order of torch.optim.AdamW's foreach path (decay as p *= 1 - lr*wd; torch's
  // fused kernel writes p -= lr*wd*p), or torch.optim.Adam's (g += wd*p).
  template <int V, typename F>
  CATAPULT_HD static void update(F& p, F g, F (&s)[3], const Constants& c) {
    F& m = s[0];
    F& v = s[1];
    if (c.l2 != 0.0f) g = g + F(c.l2) * p;
    p = p * F(c.decay);
    m = F(c.beta1) * m + F(1.0f - c.beta1) * g;
    v = F(c.beta2) * v + F(1.0f - c.beta2) * g * g;
    F denom;
    if constexpr (V == 1) {
      F& vmax = s[2];
      vmax = select(vmax > v, vmax, v);  // NaN v wins
      denom = lane_sqrt(vmax) / F(c.bias_correction2_sqrt) + F(c.eps);
    } else {
      denom = lane_sqrt(v) / F(c.bias_correction2_sqrt) + F(c.eps);
    }
    p = p - F(c.step_size) * m / denom;
  }
};

}  // namespace catapult::optimizers::adamw
