// adamw_ on CPU: one AdamW step over lists of tensors, the math of adamw_math.h
// vectorized with at::vec. One parallel_for covers every chunk of every tensor, so
// a model of thousands of small tensors costs one fork, not one per tensor.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

// No FMA contraction from here on. GCC fuses a*b+c across statements by default,
// and fused differently in the vector loop and in the scalar tail; unfused, both
// round exactly as adamw_element reads, and as a plain-PyTorch reference does.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "adamw_math.h"
#include "multi_tensor_checks.h"

namespace {

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

// AdamWStep broadcast to vectors, with the (1 - beta) terms that adamw_element
// recomputes per element (the same float values).
struct AdamWVec {
  Vec decay, beta1, one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, eps, step_size;
  explicit AdamWVec(const catapult::AdamWStep& s)
      : decay(s.decay),
        beta1(s.beta1),
        one_minus_beta1(1.0f - s.beta1),
        beta2(s.beta2),
        one_minus_beta2(1.0f - s.beta2),
        bias_correction2_sqrt(s.bias_correction2_sqrt),
        eps(s.eps),
        step_size(s.step_size) {}
};

// catapult::adamw_element on Vec::size() lanes, operation for operation, so that
// the vector loop and the scalar tail give the same bits.
template <bool amsgrad>
inline void adamw_vec(Vec& p, const Vec& g, Vec& m, Vec& v, Vec& vmax, const AdamWVec& s) {
  p = p * s.decay;
  m = s.beta1 * m + s.one_minus_beta1 * g;
  v = s.beta2 * v + s.one_minus_beta2 * g * g;
  Vec denom;
  if constexpr (amsgrad) {
    vmax = Vec::blendv(v, vmax, vmax > v);  // vmax > v ? vmax : v, NaN cases included
    denom = vmax.sqrt() / s.bias_correction2_sqrt + s.eps;
  } else {
    denom = v.sqrt() / s.bias_correction2_sqrt + s.eps;
  }
  p = p - s.step_size * m / denom;
}

// n elements of one tensor. mult is the grad multiplier, negated for maximize:
// grad * (-mult) is bit-identical to -(grad * mult).
template <typename T, bool amsgrad>
void adamw_range(T* p, const T* g, T* m, T* v, T* vmax, int64_t n, float mult,
                 const catapult::AdamWStep& s) {
  const AdamWVec sv(s);
  const Vec multv(mult);
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    Vec p0, p1, g0, g1, m0, m1, v0, v1, x0, x1;
    load_block(p + i, p0, p1);
    load_block(g + i, g0, g1);
    load_block(m + i, m0, m1);
    load_block(v + i, v0, v1);
    if constexpr (amsgrad) load_block(vmax + i, x0, x1);
    adamw_vec<amsgrad>(p0, g0 * multv, m0, v0, x0, sv);
    adamw_vec<amsgrad>(p1, g1 * multv, m1, v1, x1, sv);
    store_block(p + i, p0, p1);
    store_block(m + i, m0, m1);
    store_block(v + i, v0, v1);
    if constexpr (amsgrad) store_block(vmax + i, x0, x1);
  }
  for (; i < n; ++i) {
    float pf = static_cast<float>(p[i]);
    float mf = static_cast<float>(m[i]);
    float vf = static_cast<float>(v[i]);
    float xf = amsgrad ? static_cast<float>(vmax[i]) : 0.0f;
    catapult::adamw_element<amsgrad>(pf, static_cast<float>(g[i]) * mult, mf, vf, xf, s);
    p[i] = static_cast<T>(pf);
    m[i] = static_cast<T>(mf);
    v[i] = static_cast<T>(vf);
    if constexpr (amsgrad) vmax[i] = static_cast<T>(xf);
  }
}

// One tensor's pointers (vmax is null unless amsgrad) and step constants.
struct Entry {
  void* p;
  const void* g;
  void* m;
  void* v;
  void* vmax;
  at::ScalarType dtype;
  catapult::AdamWStep step;
};

struct Chunk {
  int64_t entry, begin, size;
};

template <typename T, bool amsgrad>
void run_chunk(const Entry& e, const Chunk& c, float mult) {
  const int64_t b = c.begin;
  T* vmax = amsgrad ? static_cast<T*>(e.vmax) + b : nullptr;
  adamw_range<T, amsgrad>(static_cast<T*>(e.p) + b, static_cast<const T*>(e.g) + b,
                          static_cast<T*>(e.m) + b, static_cast<T*>(e.v) + b, vmax, c.size, mult,
                          e.step);
}

template <bool amsgrad>
void run_chunk(const Entry& e, const Chunk& c, float mult) {
  switch (e.dtype) {
    case at::kFloat:
      return run_chunk<float, amsgrad>(e, c, mult);
    case at::kBFloat16:
      return run_chunk<at::BFloat16, amsgrad>(e, c, mult);
    default:
      return run_chunk<at::Half, amsgrad>(e, c, mult);
  }
}

void adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
               at::TensorList state_steps, const at::Tensor& lr, double beta1, double beta2,
               double eps, double weight_decay, bool amsgrad, bool maximize,
               const std::optional<at::Tensor>& grad_norm, double max_grad_norm,
               const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf) {
  catapult::check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                             amsgrad, lr, grad_norm, max_grad_norm, grad_scale, found_inf,
                             at::Device(at::kCPU));

  // The control scalars are CPU tensors: read them here, no sync involved.
  if (found_inf.has_value() && *found_inf->const_data_ptr<float>() != 0.0f) return;
  const float mult = catapult::grad_multiplier(
      grad_norm.has_value() ? grad_norm->const_data_ptr<float>() : nullptr,
      static_cast<float>(max_grad_norm),
      grad_scale.has_value() ? grad_scale->const_data_ptr<float>() : nullptr);
  const float lr_value = *lr.const_data_ptr<float>();

  std::vector<Entry> entries;
  std::vector<Chunk> chunks;
  entries.reserve(params.size());
  catapult::AdamWStep constants{};
  float constants_step = 0.0f;
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t numel = params[i].numel();
    if (numel == 0) continue;
    // The tensors of a group usually share their step: compute its powf once.
    const float step = *state_steps[i].const_data_ptr<float>();
    if (entries.empty() || step != constants_step) {
      constants = catapult::adamw_step_constants(lr_value, static_cast<float>(beta1),
                                                 static_cast<float>(beta2), static_cast<float>(eps),
                                                 static_cast<float>(weight_decay), step);
      constants_step = step;
    }
    entries.push_back({params[i].data_ptr(), grads[i].const_data_ptr(), exp_avgs[i].data_ptr(),
                       exp_avg_sqs[i].data_ptr(), amsgrad ? max_exp_avg_sqs[i].data_ptr() : nullptr,
                       params[i].scalar_type(), constants});
    const int64_t e = static_cast<int64_t>(entries.size()) - 1;
    for (int64_t b = 0; b < numel; b += kChunk) chunks.push_back({e, b, std::min(kChunk, numel - b)});
  }

  const float signed_mult = maximize ? -mult : mult;
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Chunk& c = chunks[i];
      if (amsgrad) {
        run_chunk<true>(entries[c.entry], c, signed_mult);
      } else {
        run_chunk<false>(entries[c.entry], c, signed_mult);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(catapult, CPU, m) { m.impl("adamw_", &adamw_cpu); }
