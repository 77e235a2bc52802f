// The grad pipeline every update kernel starts with, on every backend (the Triton
// kernels mirror it in catapult_kernels/triton/kernel_common.py; the schema fragment
// that carries its arguments is kPipelineSchema in update_op.h), in this order:
//   1. unscale (GradScaler) and the global-norm clip: one factor, grad_multiplier;
//   2. AGC: times the param row's factor (agc_scales; computed beforehand from row
//      norms, catapult_kernels/regularizers.py), folded into the same factor:
//      g = grad * (mult * agc_scale[row]);
//   3. Grokfast EMA: ema = alpha * ema + (1 - alpha) * g; g = g + lamb * ema;
//   4. maximize: g = -g.
// Then each optimizer's weight decay and update (csrc/optimizers/*.h, lamb_math.h).
#pragma once

#include "lanes.h"  // CATAPULT_HD

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

// Grokfast's EMA filter (Lee et al. 2024). one_minus_alpha is 1 - alpha computed in
// double and rounded (as torch's alpha arguments); alpha = 0 starts a new ema at g
// exactly (0 * 0 + 1 * g), as the paper's code starts it at the first grad.
struct Grokfast {
  float alpha, one_minus_alpha, lamb;
};

CATAPULT_HD float grokfast_filter(float g, float& ema, const Grokfast& f) {
  ema = f.alpha * ema + f.one_minus_alpha * g;
  return g + f.lamb * ema;
}

// The pipeline's arguments as every kernel takes them (pointers to one-element float32
// tensors on the kernel's device, read there: no host sync on CUDA).
struct PipelineArgs {
  const float* grad_norm;   // nullptr when not given (then max_grad_norm <= 0: checked)
  const float* grad_scale;  // nullptr: no unscale
  const float* skip;        // nullptr: never skipped; nonzero: nothing at all is written
  float max_grad_norm;      // <= 0: no clip
  Grokfast grokfast;        // read only where Grokfast emas are given
  bool maximize;

  CATAPULT_HD bool skipped() const { return skip != nullptr && *skip != 0.0f; }
  CATAPULT_HD float multiplier() const { return grad_multiplier(grad_norm, max_grad_norm, grad_scale); }
};

// Steps 2-4 for one element: grad already times mult * agc_scale[row].
template <bool kGrokfast>
CATAPULT_HD float pipeline_grad(float g, float& ema, const Grokfast& f, bool maximize) {
  if (kGrokfast) g = grokfast_filter(g, ema, f);
  return maximize ? -g : g;
}

}  // namespace catapult
