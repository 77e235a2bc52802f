// Scalar math shared by the CPU and CUDA AdamW kernels (the Triton kernel
// mirrors it in catapult_kernels/triton/adamw.py). Keep the three in step.
// The CPU and Triton kernels compile it without FMA contraction, so they round
// exactly as written; nvcc contracts a*b+c by default, so CUDA may differ by an ulp.
#pragma once
#include <cmath>

#if defined(__CUDACC__)
#define CATAPULT_HD __host__ __device__ __forceinline__
#else
#define CATAPULT_HD inline
#endif

namespace catapult {

// Factor every grad is multiplied by: unscale (GradScaler) and global-norm clip.
// Written so that a NaN norm propagates as in torch.clamp(max_norm / (norm + 1e-6), max=1).
CATAPULT_HD float grad_multiplier(const float* grad_norm, float max_grad_norm,
                                  const float* grad_scale) {
  const float scale = grad_scale ? *grad_scale : 1.0f;
  float clip = 1.0f;
  if (max_grad_norm > 0.0f) {
    clip = max_grad_norm / (*grad_norm / scale + 1e-6f);
    clip = clip > 1.0f ? 1.0f : clip;
  }
  return clip / scale;
}

// Per-tensor constants of one AdamW step, from its (already incremented) step count.
struct AdamWStep {
  float lr, beta1, beta2, eps, decay;  // decay = 1 - lr * weight_decay
  float step_size;                     // lr / (1 - beta1^step)
  float bias_correction2_sqrt;         // sqrt(1 - beta2^step)
};

CATAPULT_HD AdamWStep adamw_step_constants(float lr, float beta1, float beta2, float eps,
                                           float weight_decay, float step) {
  AdamWStep s;
  s.lr = lr;
  s.beta1 = beta1;
  s.beta2 = beta2;
  s.eps = eps;
  s.decay = 1.0f - lr * weight_decay;
  s.step_size = lr / (1.0f - powf(beta1, step));
  s.bias_correction2_sqrt = sqrtf(1.0f - powf(beta2, step));
  return s;
}

// One element, in float32, in the order of torch.optim.AdamW's foreach path (decay
// as p *= 1 - lr*wd; torch's fused kernel writes p -= lr*wd*p). g is already multiplied
// by grad_multiplier and negated for maximize. vmax is ignored unless amsgrad.
template <bool amsgrad>
CATAPULT_HD void adamw_element(float& p, float g, float& m, float& v, float& vmax,
                               const AdamWStep& s) {
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
