// The grad pipeline every update kernel starts with, on every backend (the Triton
// kernels mirror it in catapult_kernels/triton/kernel_common.py), in this order:
//   1. unscale (GradScaler) and the global-norm clip: one factor, grad_multiplier;
//   2. AGC: times the param row's factor (agc_scales; computed beforehand from row
//      norms, catapult_kernels/regularizers.py), folded into the same factor:
//      g = grad * (mult * agc_scale[row]);
//   3. Grokfast EMA: ema = alpha * ema + (1 - alpha) * g; g = g + lamb * ema;
//   4. maximize: g = -g.
// Then each optimizer's weight decay and update (csrc/*_math.h).
#pragma once

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

// Steps 2-4 for one element: grad already times mult * agc_scale[row].
template <bool kGrokfast>
CATAPULT_HD float pipeline_grad(float g, float& ema, const Grokfast& f, bool maximize) {
  if (kGrokfast) g = grokfast_filter(g, ema, f);
  return maximize ? -g : g;
}

}  // namespace catapult
