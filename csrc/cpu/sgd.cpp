// sgd_ on CPU: one SGD (or LARS, with trust ratios) step over lists of tensors, the
// math of sgd_math.h vectorized with at::vec after the grad pipeline of
// update_common.h. Without momentum and regularizers only p and g are touched: p and
// g read, p written (12 B/param in float32); momentum buffers are not read on the
// first step.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "cpu/update_common.h"  // first: it switches FMA contraction off

#include "sgd_math.h"

namespace {

using namespace catapult::cpu;

// SGDStep broadcast to vectors.
struct SGDVec {
  Vec lr, momentum, one_minus_dampening, weight_decay, trust;
  explicit SGDVec(const catapult::SGDStep& s)
      : lr(s.lr),
        momentum(s.momentum),
        one_minus_dampening(s.one_minus_dampening),
        weight_decay(s.weight_decay),
        trust(s.trust) {}
};

// catapult::sgd_element on Vec::size() lanes, operation for operation. kDecay is
// sgd_element's (weight_decay != 0) test, taken once per step instead of per element.
template <bool kMomentum, bool kNesterov, bool kFirstStep, bool kDecay>
inline void sgd_vec(Vec& p, Vec g, Vec& buf, const SGDVec& s) {
  if constexpr (kDecay) g = g + s.weight_decay * p;
  g = s.trust * g;
  if constexpr (kMomentum) {
    if constexpr (kFirstStep) {
      buf = g;
    } else {
      buf = s.momentum * buf + s.one_minus_dampening * g;
    }
    if constexpr (kNesterov) {
      g = g + s.momentum * buf;
    } else {
      g = buf;
    }
  }
  p = p - s.lr * g;
}

// One tensor's pointers (buf null without momentum, ema null without Grokfast), AGC
// rows and step constants (its own trust ratio).
struct Entry {
  void* p;
  const void* g;
  void* buf;
  void* ema;
  at::ScalarType dtype;
  AgcRows agc;
  catapult::SGDStep step;
};

// n elements of one tensor from offset b, with grad multiplier mult.
template <typename T, bool kMomentum, bool kNesterov, bool kFirstStep, bool kDecay>
void sgd_range(const Entry& e, int64_t b, int64_t n, float mult, const Pipeline& pl) {
  T* p = static_cast<T*>(e.p) + b;
  const T* g = static_cast<const T*>(e.g) + b;
  T* buf = kMomentum ? static_cast<T*>(e.buf) + b : nullptr;
  T* ema = e.ema ? static_cast<T*>(e.ema) + b : nullptr;
  const SGDVec sv(e.step);
  const Vec multv(mult);
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    Vec p0, p1, g0, g1;
    Vec b0(0.0f), b1(0.0f);
    pipeline_block(g, ema, i, multv, pl, g0, g1);
    load_block(p + i, p0, p1);
    if constexpr (kMomentum && !kFirstStep) load_block(buf + i, b0, b1);
    sgd_vec<kMomentum, kNesterov, kFirstStep, kDecay>(p0, g0, b0, sv);
    sgd_vec<kMomentum, kNesterov, kFirstStep, kDecay>(p1, g1, b1, sv);
    store_block(p + i, p0, p1);
    if constexpr (kMomentum) store_block(buf + i, b0, b1);
  }
  for (; i < n; ++i) {
    const float gf = pipeline_element(g, ema, i, mult, pl);
    float pf = static_cast<float>(p[i]);
    float bf = (kMomentum && !kFirstStep) ? static_cast<float>(buf[i]) : 0.0f;
    catapult::sgd_element<kMomentum, kNesterov, kFirstStep>(pf, gf, bf, e.step);
    p[i] = static_cast<T>(pf);
    if constexpr (kMomentum) buf[i] = static_cast<T>(bf);
  }
}

// Every chunk, in one parallel_for; the step's flags are fixed here, the dtype per chunk.
template <bool kMomentum, bool kNesterov, bool kFirstStep, bool kDecay>
void run_all(const std::vector<Entry>& entries, const std::vector<Chunk>& chunks, float mult,
             const Pipeline& pl) {
  for_each_chunk(chunks, [&](const Chunk& c) {
    const Entry& e = entries[c.entry];
    dispatch_float_type(e.dtype, [&](auto t) {
      using T = decltype(t);
      for_each_row_segment(e.agc, c.begin, c.size, mult, [&](int64_t b, int64_t n, float m) {
        sgd_range<T, kMomentum, kNesterov, kFirstStep, kDecay>(e, b, n, m, pl);
      });
    });
  });
}

template <bool kMomentum, bool kNesterov, bool kFirstStep>
void run_all(const std::vector<Entry>& entries, const std::vector<Chunk>& chunks, float mult,
             const Pipeline& pl, float weight_decay) {
  if (weight_decay != 0.0f) {  // sgd_element's test
    run_all<kMomentum, kNesterov, kFirstStep, true>(entries, chunks, mult, pl);
  } else {
    run_all<kMomentum, kNesterov, kFirstStep, false>(entries, chunks, mult, pl);
  }
}

void sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
             const at::Tensor& lr, double momentum, double dampening, double weight_decay,
             bool nesterov, bool maximize, bool first_step,
             const std::optional<at::Tensor>& trust_ratios,
             const std::optional<at::Tensor>& grad_norm, double max_grad_norm,
             const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
             at::TensorList agc_scales, at::TensorList grokfast_emas, double grokfast_alpha,
             double grokfast_lamb) {
  catapult::check_sgd_args(params, grads, momentum_buffers, momentum, trust_ratios, lr, grad_norm,
                           max_grad_norm, grad_scale, found_inf, agc_scales, grokfast_emas,
                           at::Device(at::kCPU));
  if (skip_step(found_inf)) return;
  const float mult = grad_multiplier_of(grad_norm, max_grad_norm, grad_scale);
  const Pipeline pl(grokfast_alpha, grokfast_lamb, maximize);
  // 1 - dampening in double, then rounded: the alpha torch.optim.SGD passes to add_.
  const catapult::SGDStep step{*lr.const_data_ptr<float>(), static_cast<float>(momentum),
                               static_cast<float>(1.0 - dampening), static_cast<float>(weight_decay),
                               1.0f};
  const float* trust = trust_ratios.has_value() ? trust_ratios->const_data_ptr<float>() : nullptr;
  // The same test as check_sgd_args: momentum_buffers is given iff momentum != 0.
  const bool use_momentum = momentum != 0.0;

  std::vector<Entry> entries;
  std::vector<Chunk> chunks;
  entries.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t numel = params[i].numel();
    if (numel == 0) continue;
    catapult::SGDStep s = step;
    if (trust != nullptr) s.trust = trust[i];
    entries.push_back({params[i].data_ptr(), grads[i].const_data_ptr(),
                       use_momentum ? momentum_buffers[i].data_ptr() : nullptr,
                       grokfast_emas.empty() ? nullptr : grokfast_emas[i].data_ptr(),
                       params[i].scalar_type(), agc_rows_of(agc_scales, i, params[i]), s});
    add_chunks(chunks, static_cast<int64_t>(entries.size()) - 1, numel);
  }
  if (chunks.empty()) return;

  if (!use_momentum) {
    run_all<false, false, false>(entries, chunks, mult, pl, step.weight_decay);
  } else if (first_step) {
    if (nesterov) {
      run_all<true, true, true>(entries, chunks, mult, pl, step.weight_decay);
    } else {
      run_all<true, false, true>(entries, chunks, mult, pl, step.weight_decay);
    }
  } else {
    if (nesterov) {
      run_all<true, true, false>(entries, chunks, mult, pl, step.weight_decay);
    } else {
      run_all<true, false, false>(entries, chunks, mult, pl, step.weight_decay);
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(catapult, CPU, m) { m.impl("sgd_", &sgd_cpu); }
