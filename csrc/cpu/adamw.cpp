// adamw_ on CPU: one Adam/AdamW step over lists of tensors, the math of adamw_math.h
// vectorized with at::vec after the grad pipeline of update_common.h. One
// parallel_for covers every chunk of every tensor, so a model of thousands of small
// tensors costs one fork, not one per tensor.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "cpu/update_common.h"  // first: it switches FMA contraction off

#include "adamw_math.h"

namespace {

using namespace catapult::cpu;

// AdamWStep broadcast to vectors, with the (1 - beta) terms that adamw_element
// recomputes per element (the same float values).
struct AdamWVec {
  Vec decay, l2, beta1, one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, eps, step_size;
  bool coupled;
  explicit AdamWVec(const catapult::AdamWStep& s)
      : decay(s.decay),
        l2(s.l2),
        beta1(s.beta1),
        one_minus_beta1(1.0f - s.beta1),
        beta2(s.beta2),
        one_minus_beta2(1.0f - s.beta2),
        bias_correction2_sqrt(s.bias_correction2_sqrt),
        eps(s.eps),
        step_size(s.step_size),
        coupled(s.l2 != 0.0f) {}
};

// catapult::adamw_element on Vec::size() lanes, operation for operation, so that
// the vector loop and the scalar tail give the same bits.
template <bool amsgrad>
inline void adamw_vec(Vec& p, Vec g, Vec& m, Vec& v, Vec& vmax, const AdamWVec& s) {
  if (s.coupled) g = g + s.l2 * p;
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

// One tensor's pointers (vmax null unless amsgrad, ema null without Grokfast), AGC
// rows and step constants.
struct Entry {
  void* p;
  const void* g;
  void* m;
  void* v;
  void* vmax;
  void* ema;
  at::ScalarType dtype;
  AgcRows agc;
  catapult::AdamWStep step;
};

// n elements of one tensor from offset b, with grad multiplier mult.
template <typename T, bool amsgrad>
void adamw_range(const Entry& e, int64_t b, int64_t n, float mult, const Pipeline& pl) {
  T* p = static_cast<T*>(e.p) + b;
  const T* g = static_cast<const T*>(e.g) + b;
  T* m = static_cast<T*>(e.m) + b;
  T* v = static_cast<T*>(e.v) + b;
  T* vmax = amsgrad ? static_cast<T*>(e.vmax) + b : nullptr;
  T* ema = e.ema ? static_cast<T*>(e.ema) + b : nullptr;
  const AdamWVec sv(e.step);
  const Vec multv(mult);
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    Vec p0, p1, g0, g1, m0, m1, v0, v1, x0, x1;
    pipeline_block(g, ema, i, multv, pl, g0, g1);
    load_block(p + i, p0, p1);
    load_block(m + i, m0, m1);
    load_block(v + i, v0, v1);
    if constexpr (amsgrad) load_block(vmax + i, x0, x1);
    adamw_vec<amsgrad>(p0, g0, m0, v0, x0, sv);
    adamw_vec<amsgrad>(p1, g1, m1, v1, x1, sv);
    store_block(p + i, p0, p1);
    store_block(m + i, m0, m1);
    store_block(v + i, v0, v1);
    if constexpr (amsgrad) store_block(vmax + i, x0, x1);
  }
  for (; i < n; ++i) {
    const float gf = pipeline_element(g, ema, i, mult, pl);
    float pf = static_cast<float>(p[i]);
    float mf = static_cast<float>(m[i]);
    float vf = static_cast<float>(v[i]);
    float xf = amsgrad ? static_cast<float>(vmax[i]) : 0.0f;
    catapult::adamw_element<amsgrad>(pf, gf, mf, vf, xf, e.step);
    p[i] = static_cast<T>(pf);
    m[i] = static_cast<T>(mf);
    v[i] = static_cast<T>(vf);
    if constexpr (amsgrad) vmax[i] = static_cast<T>(xf);
  }
}

template <bool amsgrad>
void run_all(const std::vector<Entry>& entries, const std::vector<Chunk>& chunks, float mult,
             const Pipeline& pl) {
  for_each_chunk(chunks, [&](const Chunk& c) {
    const Entry& e = entries[c.entry];
    dispatch_float_type(e.dtype, [&](auto t) {
      using T = decltype(t);
      for_each_row_segment(e.agc, c.begin, c.size, mult, [&](int64_t b, int64_t n, float m) {
        adamw_range<T, amsgrad>(e, b, n, m, pl);
      });
    });
  });
}

void adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
               at::TensorList state_steps, const at::Tensor& lr, double beta1, double beta2,
               double eps, double weight_decay, bool decoupled_weight_decay, bool amsgrad,
               bool maximize, const std::optional<at::Tensor>& grad_norm, double max_grad_norm,
               const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
               at::TensorList agc_scales, at::TensorList grokfast_emas, double grokfast_alpha,
               double grokfast_lamb) {
  catapult::check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                             amsgrad, lr, grad_norm, max_grad_norm, grad_scale, found_inf,
                             agc_scales, grokfast_emas, at::Device(at::kCPU));
  if (skip_step(found_inf)) return;
  const float mult = grad_multiplier_of(grad_norm, max_grad_norm, grad_scale);
  const Pipeline pl(grokfast_alpha, grokfast_lamb, maximize);
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
      constants = catapult::adamw_step_constants(
          lr_value, static_cast<float>(beta1), static_cast<float>(beta2), static_cast<float>(eps),
          static_cast<float>(weight_decay), decoupled_weight_decay, step);
      constants_step = step;
    }
    entries.push_back({params[i].data_ptr(), grads[i].const_data_ptr(), exp_avgs[i].data_ptr(),
                       exp_avg_sqs[i].data_ptr(), amsgrad ? max_exp_avg_sqs[i].data_ptr() : nullptr,
                       grokfast_emas.empty() ? nullptr : grokfast_emas[i].data_ptr(),
                       params[i].scalar_type(), agc_rows_of(agc_scales, i, params[i]), constants});
    add_chunks(chunks, static_cast<int64_t>(entries.size()) - 1, numel);
  }
  if (amsgrad) {
    run_all<true>(entries, chunks, mult, pl);
  } else {
    run_all<false>(entries, chunks, mult, pl);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(catapult, CPU, m) { m.impl("adamw_", &adamw_cpu); }
