// Sums of squares of float lanes for the norms and LAMB's trust ratios, in two widths.
// FloatSquareSum accumulates in float: full speed, but one square beyond float's range
// (|x| > 1.8e19) makes the sum inf, and squares below 2^-126 lose bits (below 2^-149
// they vanish). SquareSum accumulates in double, where every float32 square fits
// (3.4e38^2 = 1.2e77; the least subnormal's square is 2e-90): finite for any finite
// input, exact to double rounding, but 1.2-2.7x slower (measured on one core: float32
// from memory 1.16x, bfloat16 from cache 2.7x). So the kernels sum each chunk in float
// and sum it again in double only when needs_double_sum says the float sum may be off:
// the common chunk pays one comparison.
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace catapult::cpu {

// Whether a sum of squares accumulated in float may be off: inf (a square or the sum
// beyond float's range) or below 2^-80, where squares flushed or rounded in the
// subnormal range (up to 2^-126 each) could weigh more than 2^-30 of it. A NaN sum
// (a NaN input) is final: the double sum would be NaN too.
inline bool needs_double_sum(double float_sum) {
  return std::isinf(float_sum) || float_sum < 0x1p-80;
}

// In both, lane k of every added vector goes to the same accumulator, so a sum depends
// only on the order of the adds, never on the data.
class FloatSquareSum {
 public:
  using FVec = at::vec::Vectorized<float>;
  static constexpr int kVectors = 1;  // vector accumulators (add chains) per object

  void add(const FVec& x) { acc_ = at::vec::fmadd(x, x, acc_); }
  void add(const FloatSquareSum& other) { acc_ = acc_ + other.acc_; }
  double total() const {
    float lanes[FVec::size()];
    acc_.store(lanes);
    double sum = 0.0;
    for (float lane : lanes) sum += lane;
    return sum;
  }

 private:
  FVec acc_ = FVec(0.0f);
};

class SquareSum {
 public:
  using FVec = at::vec::Vectorized<float>;
  static constexpr int kVectors = 2;

#if defined(CPU_CAPABILITY_AVX512)
  void add(const FVec& x) {
    const __m512 v = x;
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    lo_ = _mm512_fmadd_pd(lo, lo, lo_);
    hi_ = _mm512_fmadd_pd(hi, hi, hi_);
  }
  void add(const SquareSum& other) {
    lo_ = _mm512_add_pd(lo_, other.lo_);
    hi_ = _mm512_add_pd(hi_, other.hi_);
  }
  double total() const {
    double lanes[16];
    _mm512_storeu_pd(lanes, lo_);
    _mm512_storeu_pd(lanes + 8, hi_);
    return sum_lanes(lanes);
  }

 private:
  __m512d lo_ = _mm512_setzero_pd(), hi_ = _mm512_setzero_pd();
#elif defined(CPU_CAPABILITY_AVX2)
  void add(const FVec& x) {
    const __m256 v = x;
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
    const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    lo_ = _mm256_fmadd_pd(lo, lo, lo_);
    hi_ = _mm256_fmadd_pd(hi, hi, hi_);
  }
  void add(const SquareSum& other) {
    lo_ = _mm256_add_pd(lo_, other.lo_);
    hi_ = _mm256_add_pd(hi_, other.hi_);
  }
  double total() const {
    double lanes[8];
    _mm256_storeu_pd(lanes, lo_);
    _mm256_storeu_pd(lanes + 4, hi_);
    return sum_lanes(lanes);
  }

 private:
  __m256d lo_ = _mm256_setzero_pd(), hi_ = _mm256_setzero_pd();
#else
  void add(const FVec& x) {
    float f[FVec::size()];
    x.store(f);
    for (int k = 0; k < FVec::size(); ++k) lanes_[k] += static_cast<double>(f[k]) * f[k];
  }
  void add(const SquareSum& other) {
    for (int k = 0; k < FVec::size(); ++k) lanes_[k] += other.lanes_[k];
  }
  double total() const { return sum_lanes(lanes_); }

 private:
  double lanes_[FVec::size()] = {};
#endif

  template <size_t N>
  static double sum_lanes(const double (&lanes)[N]) {
    double sum = 0.0;
    for (double lane : lanes) sum += lane;
    return sum;
  }
};

}  // namespace catapult::cpu
