// The operations an optimizer's element function (csrc/optimizers/*.h) may use beyond
// + - * / and comparisons, for each lane type F it is instantiated with: float (one
// element: the CPU scalar tail and the CUDA kernels) and, on CPU,
// at::vec::Vectorized<float> (Vec::size() elements at once). Each pair computes the
// same bits lane for lane, NaN included, so the vector loop and the scalar tail agree.
// Constants enter an element function as F(x): a no-op for float, a broadcast for Vec.
#pragma once
#include <cmath>

#if defined(__CUDACC__)
#define CATAPULT_HD __host__ __device__ __forceinline__
#else
#define CATAPULT_HD inline
#include <ATen/cpu/vec/vec.h>
#endif

namespace catapult {

CATAPULT_HD float lane_sqrt(float x) { return sqrtf(x); }
CATAPULT_HD float lane_abs(float x) { return fabsf(x); }
// To the nearest integer, ties to even (the default rounding mode).
CATAPULT_HD float lane_rint(float x) { return rintf(x); }
// a * b + c rounded once: an explicit FMA, for an op that must give torch's bits where
// torch's kernel fuses (lerp, add with alpha); exact on every lane type and backend.
CATAPULT_HD float lane_fma(float a, float b, float c) { return fmaf(a, b, c); }
// cond ? a : b (cond: the result of a comparison of lanes).
CATAPULT_HD float select(bool cond, float a, float b) { return cond ? a : b; }

#if !defined(__CUDACC__)
using Vec = at::vec::Vectorized<float>;
inline Vec lane_sqrt(const Vec& x) { return x.sqrt(); }
inline Vec lane_abs(const Vec& x) { return x.abs(); }
inline Vec lane_rint(const Vec& x) { return x.round(); }  // ties to even, as rintf
inline Vec lane_fma(const Vec& a, const Vec& b, const Vec& c) { return at::vec::fmadd(a, b, c); }
inline Vec select(const Vec& cond, const Vec& a, const Vec& b) { return Vec::blendv(b, a, cond); }
#endif

// max(x, lo) and min(x, hi) as torch.clamp: a NaN x stays NaN.
template <typename F>
CATAPULT_HD F clamp_min(const F& x, const F& lo) { return select(x < lo, lo, x); }
template <typename F>
CATAPULT_HD F clamp_max(const F& x, const F& hi) { return select(x > hi, hi, x); }

// 1 where x > 0, -1 where x < 0, x itself (0, -0, NaN) elsewhere: a NaN is not hidden.
template <typename F>
CATAPULT_HD F sign_of(const F& x) {
  return select(x > F(0.0f), F(1.0f), select(x < F(0.0f), F(-1.0f), x));
}

}  // namespace catapult
