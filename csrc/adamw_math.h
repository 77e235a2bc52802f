// Scalar math shared by the CPU and CUDA AdamW kernels (the Triton kernel
// mirrors it in catapult_kernels/triton/adamw.py). Keep the three in step.
// The CPU and Triton kernels compile it without FMA contraction, so they round
// exactly as written; nvcc contracts a*b+c by default, so CUDA may differ by an ulp.
#pragma once
#include <cmath>

#include "grad_pipeline.h"

namespace catapult {

// Per-tensor constants of one AdamW step, from its (already incremented) step count.
struct AdamWStep {
  float lr, beta1, beta2, eps;
  float decay;                         // decoupled: 1 - lr * weight_decay, else 1
  float l2;                            // coupled (Adam): weight_decay, else 0
  float step_size;                     // lr / (1 - beta1^step)
  float bias_correction2_sqrt;         // sqrt(1 - beta2^step)
};

CATAPULT_HD AdamWStep adamw_step_constants(float lr, float beta1, float beta2, float eps,
                                           float weight_decay, bool decoupled, float step) {
  AdamWStep s;
  s.lr = lr;
  s.beta1 = beta1;
  s.beta2 = beta2;
  s.eps = eps;
  s.decay = decoupled ? 1.0f - lr * weight_decay : 1.0f;
  s.l2 = decoupled ? 0.0f : weight_decay;
  s.step_size = lr / (1.0f - powf(beta1, step));
  s.bias_correction2_sqrt = sqrtf(1.0f - powf(beta2, step));
  return s;
}

// One element, in float32, in the order of torch.optim.AdamW's foreach path (decay
// as p *= 1 - lr*wd; torch's fused kernel writes p -= lr*wd*p), or torch.optim.Adam's
// (g += wd*p). g is the grad pipeline's output (grad_pipeline.h). vmax is ignored
// unless amsgrad.
template <bool amsgrad>
CATAPULT_HD void adamw_element(float& p, float g, float& m, float& v, float& vmax,
                               const AdamWStep& s) {
  if (s.l2 != 0.0f) g = g + s.l2 * p;
  p *= s.decay;
  m = s.beta1 * m + (1.0f - s.beta1) * g;
  v = s.beta2 * v + (1.0f - s.beta2) * g * g;
  float denom;
  if (amsgrad) {
    vmax = vmax > v ? vmax : v;
    denom = sqrtf(vmax) / s.bias_correction2_sqrt + s.eps;
  } else {
    denom = sqrtf(v) / s.bias_correction2_sqrt + s.eps;
  }
  p -= s.step_size * m / denom;
}

}  // namespace catapult
