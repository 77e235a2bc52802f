// muon_update_: Muon's step from the orthogonalized update u (given as the grads, in the
// params' dtype), torch.optim.Muon's formula: p = p * (1 - lr * weight_decay) - lr *
// ratio * u, with one lr ratio per param (adjust_lr_fn: sqrt(max(1, A / B)), or 0.2
// sqrt(max(A, B)), ... of its shape; Python computes them). As torch's mul_ then add_
// with alpha: the factors in double, then rounded (from the float32 lr and weight decay:
// torch's come from their doubles, which round alike but for the rare tie), and
// p = fma(u, -lr ratio, p (1 - lr wd)), fused as torch's add kernel. The caller gives u
// through no grad pipeline of its own (it ran on the momentum): only skip. Reads p and
// u, writes p.
#pragma once
#include "update_op.h"

namespace catapult::optimizers::muon_update {

struct Spec {
  static constexpr const char* kName = "muon_update_";
  static constexpr std::array<const char*, 0> kStates{};
  static constexpr bool kHasStep = false;
  static constexpr const char* kHyper = "float weight_decay, Tensor? lr_ratios";

  struct Params {
    double weight_decay;  // rounded to float32 first, as the Triton kernel takes it
    const float* ratios;  // per param, by index; nullptr: 1
  };
  static Params params(const Hyper& h) {
    return {static_cast<double>(static_cast<float>(h.f(0))), h.per_param(1, "lr_ratios")};
  }

  static constexpr int kVariants = 1;
  static int variant(const Params&) { return 0; }
  static constexpr unsigned uses(int) { return 0u; }
  static constexpr unsigned reads(int) { return 0u; }

  struct Constants {
    float decay, step;  // 1 - lr * weight_decay, -lr * ratio
  };
  CATAPULT_HD static Constants constants(const Params& h, float lr, float, int64_t index) {
    const double ratio = h.ratios ? h.ratios[index] : 1.0;
    return {static_cast<float>(1.0 - static_cast<double>(lr) * h.weight_decay),
            static_cast<float>(-(static_cast<double>(lr) * ratio))};
  }

  template <int V, typename F>
  CATAPULT_HD static void update(F& p, F u, F (&)[1], const Constants& c) {
    p = lane_fma(u, F(c.step), p * F(c.decay));
  }
};

}  // namespace catapult::optimizers::muon_update
