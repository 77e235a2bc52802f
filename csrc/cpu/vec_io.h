// Vectorized block loads and stores shared by the CPU update kernels: float32 lanes
// from and to float32, bfloat16 and float16 memory. Included before any math header:
// it also switches FMA contraction off for the rest of the file, so that the vector
// loops and the scalar tails round exactly as the *_math.h formulas read (GCC fuses
// a*b+c across statements by default, differently in the two).
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <tuple>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace catapult::cpu {

using Vec = at::vec::Vectorized<float>;

// Elements per step of the vector loop: two float vectors, one Vectorized<BFloat16/Half>.
constexpr int64_t kBlock = 2 * Vec::size();
// Elements per chunk (a multiple of kBlock), the unit of work of the parallel_for.
constexpr int64_t kChunk = 1 << 15;

inline void load_block(const float* x, Vec& a, Vec& b) {
  a = Vec::loadu(x);
  b = Vec::loadu(x + Vec::size());
}

template <typename T>
inline void load_block(const T* x, Vec& a, Vec& b) {
  std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(x));
}

inline void store_block(float* x, const Vec& a, const Vec& b) {
  a.store(x);
  b.store(x + Vec::size());
}

template <typename T>
inline void store_block(T* x, const Vec& a, const Vec& b) {
  at::vec::convert_from_float<T>(a, b).store(x);
}

#if defined(CPU_CAPABILITY_AVX2)
// bfloat16 on AVX2, about 20% faster than at::vec's conversions (measured): an
// in-lane unpack with zeros widens 16 values to two float vectors in two
// instructions, and the in-lane pack of the store undoes that same lane order, so
// no cross-lane fix-ups are needed.
inline void load_block(const at::BFloat16* x, Vec& a, Vec& b) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  const __m256i zero = _mm256_setzero_si256();
  a = Vec(_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, bits)));
  b = Vec(_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, bits)));
}

// float -> bfloat16 bits in the low half of each lane: round to nearest even, NaN
// to 0x7fc0, exactly as c10::BFloat16 does in the scalar tail.
inline __m256i to_bfloat16_bits(const Vec& x) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, bias), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan);
}

inline void store_block(at::BFloat16* x, const Vec& a, const Vec& b) {
  const __m256i packed = _mm256_packus_epi32(to_bfloat16_bits(a), to_bfloat16_bits(b));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(x), packed);
}
#endif

}  // namespace catapult::cpu
