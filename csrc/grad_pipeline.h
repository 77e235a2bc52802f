// The grad pipeline every update kernel starts with, on every backend (the Triton
// kernels mirror it): unscale (GradScaler), then the global-norm clip, as one factor
// that every grad is multiplied by. Later transforms (AGC, Grokfast, weight decay)
// come after it, in that order.
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

}  // namespace catapult
