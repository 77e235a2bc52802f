// Scalar math of one SGD step, shared by the CPU and CUDA kernels (the Triton kernel
// mirrors it in catapult_kernels/triton/sgd.py). torch.optim.SGD's order of operations.
#pragma once
#include "grad_pipeline.h"

namespace catapult {

struct SGDStep {
  float lr, momentum, one_minus_dampening, weight_decay;
  float trust;  // LARS's per-tensor trust ratio; 1 for SGD (g * 1 == g exactly)
};

// One element in float32. g is the grad pipeline's output (grad_pipeline.h); buf is
// ignored unless kMomentum.
template <bool kMomentum, bool kNesterov, bool kFirstStep>
CATAPULT_HD void sgd_element(float& p, float g, float& buf, const SGDStep& s) {
  if (s.weight_decay != 0.0f) g = g + s.weight_decay * p;  // coupled L2, as torch
  g = s.trust * g;
  if (kMomentum) {
    buf = kFirstStep ? g : s.momentum * buf + s.one_minus_dampening * g;
    g = kNesterov ? g + s.momentum * buf : buf;
  }
  p = p - s.lr * g;
}

}  // namespace catapult
