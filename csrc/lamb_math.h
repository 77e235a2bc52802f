// The math of one LAMB step (You et al. 2019, "Large Batch Optimization for Deep
// Learning", Algorithm 2), shared by the CPU (scalar and vector lanes) and CUDA kernels
// (the Triton kernel mirrors it in catapult_kernels/triton/lamb.py). Two passes: lamb_moments updates
// m and v and gives the update direction r, whose norm (and the param's) sets the
// per-tensor trust ratio; the second pass writes p = p - lr * trust * r with the same
// r (float32: lamb_direction from the stored m and v; 16-bit types, whose stored
// moments are rounded: lamb_moments again from the old state).
#pragma once
#include <cmath>

#include "grad_pipeline.h"

namespace catapult {

struct LAMBStep {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay;
  float bias_correction1, bias_correction2;  // 1 - beta^step, or 1 without bias correction
};

CATAPULT_HD LAMBStep lamb_step_constants(float beta1, float beta2, float eps, float weight_decay,
                                         bool bias_correction, float step) {
  LAMBStep s;
  s.beta1 = beta1;
  s.one_minus_beta1 = 1.0f - beta1;
  s.beta2 = beta2;
  s.one_minus_beta2 = 1.0f - beta2;
  s.eps = eps;
  s.weight_decay = weight_decay;
  s.bias_correction1 = bias_correction ? 1.0f - powf(beta1, step) : 1.0f;
  s.bias_correction2 = bias_correction ? 1.0f - powf(beta2, step) : 1.0f;
  return s;
}

// r = m_hat / (sqrt(v_hat) + eps) + weight_decay * p, from the updated m and v. F: a lane
// type of lanes.h (float, or on CPU at::vec::Vectorized<float>), the same bits in each.
template <typename F>
CATAPULT_HD F lamb_direction(const F& p, const F& m, const F& v, const LAMBStep& s) {
  return (m / F(s.bias_correction1)) / (lane_sqrt(v / F(s.bias_correction2)) + F(s.eps)) +
         F(s.weight_decay) * p;
}

// Pass 1 for one element: update m and v from g (the grad pipeline's output); returns r.
template <typename F>
CATAPULT_HD F lamb_moments(const F& p, const F& g, F& m, F& v, const LAMBStep& s) {
  m = F(s.beta1) * m + F(s.one_minus_beta1) * g;
  v = F(s.beta2) * v + F(s.one_minus_beta2) * g * g;
  return lamb_direction(p, m, v, s);
}

// The per-tensor trust ratio from the norms of p and r: |w| / |r| with |w| clamped to
// max_weight_norm when that is > 0, and 1 where either norm is 0.
CATAPULT_HD float lamb_trust_ratio(float p_norm, float r_norm, float max_weight_norm) {
  const float w = (max_weight_norm > 0.0f && p_norm > max_weight_norm) ? max_weight_norm : p_norm;
  return (w > 0.0f && r_norm > 0.0f) ? w / r_norm : 1.0f;
}

}  // namespace catapult
