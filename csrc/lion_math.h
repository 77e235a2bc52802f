// Scalar math of one Lion step (Chen et al. 2023, "Symbolic Discovery of Optimization
// Algorithms", Algorithm 2), shared by the CPU and CUDA kernels (the Triton kernel
// mirrors it in catapult_kernels/triton/lion.py).
#pragma once
#include "grad_pipeline.h"

namespace catapult {

struct LionStep {
  float lr, beta1, one_minus_beta1, beta2, one_minus_beta2;
  float decay;  // 1 - lr * weight_decay (decoupled, as in the paper)
};

// sign(x): -1, 0 or 1, and NaN for NaN (torch.sign gives 0 on CPU; a NaN must not be
// hidden in the update).
CATAPULT_HD float sign_of(float x) {
  return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : x);
}

// One element in float32; g is the grad pipeline's output.
CATAPULT_HD void lion_element(float& p, float g, float& m, const LionStep& s) {
  const float c = s.beta1 * m + s.one_minus_beta1 * g;
  p = p * s.decay;
  p = p - s.lr * sign_of(c);
  m = s.beta2 * m + s.one_minus_beta2 * g;
}

}  // namespace catapult
