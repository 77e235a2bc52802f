// adamw_ on CPU: one AdamW step over lists of tensors, the math of adamw_math.h
// vectorized with at::vec. One parallel_for covers every chunk of every tensor, so
// a model of thousands of small tensors costs one fork, not one per tensor.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/vec_io.h"  // first: it switches FMA contraction off

#include "adamw_math.h"
#include "multi_tensor_checks.h"

namespace {

using namespace catapult::cpu;  // Vec, kBlock, kChunk, load_block, store_block

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
