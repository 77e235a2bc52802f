// lion_ on CPU: one Lion step over lists of tensors, the math of lion_math.h
// vectorized with at::vec after the grad pipeline of update_common.h: p, g and m
// read, p and m written (20 B/param in float32).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "cpu/update_common.h"  // first: it switches FMA contraction off

#include "lion_math.h"

namespace {

using namespace catapult::cpu;

struct LionVec {
  Vec lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay;
  explicit LionVec(const catapult::LionStep& s)
      : lr(s.lr),
        beta1(s.beta1),
        one_minus_beta1(s.one_minus_beta1),
        beta2(s.beta2),
        one_minus_beta2(s.one_minus_beta2),
        decay(s.decay) {}
};

// catapult::sign_of on lanes: 1 where x > 0, -1 where x < 0, x itself (0, -0, NaN) elsewhere.
inline Vec sign_vec(const Vec& x) {
  const Vec zero(0.0f);
  const Vec s = Vec::blendv(x, Vec(-1.0f), x < zero);
  return Vec::blendv(s, Vec(1.0f), x > zero);
}

// catapult::lion_element on Vec::size() lanes, operation for operation.
inline void lion_vec(Vec& p, const Vec& g, Vec& m, const LionVec& s) {
  const Vec c = s.beta1 * m + s.one_minus_beta1 * g;
  p = p * s.decay;
  p = p - s.lr * sign_vec(c);
  m = s.beta2 * m + s.one_minus_beta2 * g;
}

struct Entry {
  void* p;
  const void* g;
  void* m;
  void* ema;  // null without Grokfast
  at::ScalarType dtype;
  AgcRows agc;
};

template <typename T>
void lion_range(const Entry& e, int64_t b, int64_t n, float mult, const Pipeline& pl,
                const catapult::LionStep& s, const LionVec& sv) {
  T* p = static_cast<T*>(e.p) + b;
  const T* g = static_cast<const T*>(e.g) + b;
  T* m = static_cast<T*>(e.m) + b;
  T* ema = e.ema ? static_cast<T*>(e.ema) + b : nullptr;
  const Vec multv(mult);
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    Vec p0, p1, g0, g1, m0, m1;
    pipeline_block(g, ema, i, multv, pl, g0, g1);
    load_block(p + i, p0, p1);
    load_block(m + i, m0, m1);
    lion_vec(p0, g0, m0, sv);
    lion_vec(p1, g1, m1, sv);
    store_block(p + i, p0, p1);
    store_block(m + i, m0, m1);
  }
  for (; i < n; ++i) {
    const float gf = pipeline_element(g, ema, i, mult, pl);
    float pf = static_cast<float>(p[i]);
    float mf = static_cast<float>(m[i]);
    catapult::lion_element(pf, gf, mf, s);
    p[i] = static_cast<T>(pf);
    m[i] = static_cast<T>(mf);
  }
}

void lion_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
              const at::Tensor& lr, double beta1, double beta2, double weight_decay, bool maximize,
              const std::optional<at::Tensor>& grad_norm, double max_grad_norm,
              const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
              at::TensorList agc_scales, at::TensorList grokfast_emas, double grokfast_alpha,
              double grokfast_lamb) {
  catapult::check_lion_args(params, grads, exp_avgs, lr, grad_norm, max_grad_norm, grad_scale,
                            found_inf, agc_scales, grokfast_emas, at::Device(at::kCPU));
  if (skip_step(found_inf)) return;
  const float mult = grad_multiplier_of(grad_norm, max_grad_norm, grad_scale);
  const Pipeline pl(grokfast_alpha, grokfast_lamb, maximize);
  const float lr_value = *lr.const_data_ptr<float>();
  // 1 - beta in double, then rounded, as the Python reference's alpha arguments.
  const catapult::LionStep s{lr_value, static_cast<float>(beta1), static_cast<float>(1.0 - beta1),
                             static_cast<float>(beta2), static_cast<float>(1.0 - beta2),
                             1.0f - lr_value * static_cast<float>(weight_decay)};
  const LionVec sv(s);

  std::vector<Entry> entries;
  std::vector<Chunk> chunks;
  entries.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t numel = params[i].numel();
    if (numel == 0) continue;
    entries.push_back({params[i].data_ptr(), grads[i].const_data_ptr(), exp_avgs[i].data_ptr(),
                       grokfast_emas.empty() ? nullptr : grokfast_emas[i].data_ptr(),
                       params[i].scalar_type(), agc_rows_of(agc_scales, i, params[i])});
    add_chunks(chunks, static_cast<int64_t>(entries.size()) - 1, numel);
  }
  for_each_chunk(chunks, [&](const Chunk& c) {
    const Entry& e = entries[c.entry];
    dispatch_float_type(e.dtype, [&](auto t) {
      using T = decltype(t);
      for_each_row_segment(e.agc, c.begin, c.size, mult, [&](int64_t b, int64_t n, float m) {
        lion_range<T>(e, b, n, m, pl, s, sv);
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(catapult, CPU, m) { m.impl("lion_", &lion_cpu); }
