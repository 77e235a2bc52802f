// sgd_ on CPU: one SGD step over lists of tensors, the math of sgd_math.h vectorized
// with at::vec. One parallel_for covers every chunk of every tensor (one fork per
// step, not one per tensor). Without momentum only p and g are touched: p and g read,
// p written (12 B/param in float32); momentum buffers are not read on the first step.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/vec_io.h"  // first: it switches FMA contraction off

#include "multi_tensor_checks.h"
#include "sgd_math.h"

namespace {

using namespace catapult::cpu;  // Vec, kBlock, kChunk, load_block, store_block

// SGDStep broadcast to vectors.
struct SGDVec {
  Vec lr, momentum, one_minus_dampening, weight_decay;
  explicit SGDVec(const catapult::SGDStep& s)
      : lr(s.lr),
        momentum(s.momentum),
        one_minus_dampening(s.one_minus_dampening),
        weight_decay(s.weight_decay) {}
};

// catapult::sgd_element on Vec::size() lanes, operation for operation. kDecay is
// sgd_element's (weight_decay != 0) test, taken once per chunk instead of per element.
template <bool kMomentum, bool kNesterov, bool kFirstStep, bool kDecay>
inline void sgd_vec(Vec& p, Vec g, Vec& buf, const SGDVec& s) {
  if constexpr (kDecay) g = g + s.weight_decay * p;
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

// n elements of one tensor. mult is the grad multiplier, negated for maximize:
// grad * (-mult) is bit-identical to -(grad * mult). buf is null unless kMomentum.
template <typename T, bool kMomentum, bool kNesterov, bool kFirstStep, bool kDecay>
void sgd_range(T* p, const T* g, T* buf, int64_t n, float mult, const catapult::SGDStep& s) {
  const SGDVec sv(s);
  const Vec multv(mult);
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    Vec p0, p1, g0, g1;
    Vec b0(0.0f), b1(0.0f);
    load_block(p + i, p0, p1);
    load_block(g + i, g0, g1);
    if constexpr (kMomentum && !kFirstStep) load_block(buf + i, b0, b1);
    sgd_vec<kMomentum, kNesterov, kFirstStep, kDecay>(p0, g0 * multv, b0, sv);
    sgd_vec<kMomentum, kNesterov, kFirstStep, kDecay>(p1, g1 * multv, b1, sv);
    store_block(p + i, p0, p1);
    if constexpr (kMomentum) store_block(buf + i, b0, b1);
  }
  for (; i < n; ++i) {
    float pf = static_cast<float>(p[i]);
    float bf = (kMomentum && !kFirstStep) ? static_cast<float>(buf[i]) : 0.0f;
    catapult::sgd_element<kMomentum, kNesterov, kFirstStep>(pf, static_cast<float>(g[i]) * mult,
                                                           bf, s);
    p[i] = static_cast<T>(pf);
    if constexpr (kMomentum) buf[i] = static_cast<T>(bf);
  }
}

// One tensor's pointers (buf is null without momentum).
struct Entry {
  void* p;
  const void* g;
  void* buf;
  at::ScalarType dtype;
};

struct Chunk {
  int64_t entry, begin, size;
};

template <typename T, bool kMomentum, bool kNesterov, bool kFirstStep, bool kDecay>
void run_chunk(const Entry& e, const Chunk& c, float mult, const catapult::SGDStep& s) {
  const int64_t b = c.begin;
  T* buf = kMomentum ? static_cast<T*>(e.buf) + b : nullptr;
  sgd_range<T, kMomentum, kNesterov, kFirstStep, kDecay>(
      static_cast<T*>(e.p) + b, static_cast<const T*>(e.g) + b, buf, c.size, mult, s);
}

// Every chunk, in one parallel_for; the step's flags are fixed here, the dtype per chunk.
template <bool kMomentum, bool kNesterov, bool kFirstStep, bool kDecay>
void run_all(const std::vector<Entry>& entries, const std::vector<Chunk>& chunks, float mult,
             const catapult::SGDStep& s) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Chunk& c = chunks[i];
      const Entry& e = entries[c.entry];
      switch (e.dtype) {
        case at::kFloat:
          run_chunk<float, kMomentum, kNesterov, kFirstStep, kDecay>(e, c, mult, s);
          break;
        case at::kBFloat16:
          run_chunk<at::BFloat16, kMomentum, kNesterov, kFirstStep, kDecay>(e, c, mult, s);
          break;
        default:
          run_chunk<at::Half, kMomentum, kNesterov, kFirstStep, kDecay>(e, c, mult, s);
          break;
      }
    }
  });
}

template <bool kMomentum, bool kNesterov, bool kFirstStep>
void run_all(const std::vector<Entry>& entries, const std::vector<Chunk>& chunks, float mult,
             const catapult::SGDStep& s) {
  if (s.weight_decay != 0.0f) {  // sgd_element's test
    run_all<kMomentum, kNesterov, kFirstStep, true>(entries, chunks, mult, s);
  } else {
    run_all<kMomentum, kNesterov, kFirstStep, false>(entries, chunks, mult, s);
  }
}

void sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
             const at::Tensor& lr, double momentum, double dampening, double weight_decay,
             bool nesterov, bool maximize, bool first_step,
             const std::optional<at::Tensor>& grad_norm, double max_grad_norm,
             const std::optional<at::Tensor>& grad_scale,
             const std::optional<at::Tensor>& found_inf) {
  catapult::check_sgd_args(params, grads, momentum_buffers, momentum, lr, grad_norm, max_grad_norm,
                           grad_scale, found_inf, at::Device(at::kCPU));

  // The control scalars are CPU tensors: read them here, no sync involved.
  if (found_inf.has_value() && *found_inf->const_data_ptr<float>() != 0.0f) return;
  const float mult = catapult::grad_multiplier(
      grad_norm.has_value() ? grad_norm->const_data_ptr<float>() : nullptr,
      static_cast<float>(max_grad_norm),
      grad_scale.has_value() ? grad_scale->const_data_ptr<float>() : nullptr);
  // 1 - dampening in double, then rounded: the alpha torch.optim.SGD passes to add_.
  const catapult::SGDStep s{*lr.const_data_ptr<float>(), static_cast<float>(momentum),
                            static_cast<float>(1.0 - dampening),
                            static_cast<float>(weight_decay)};
  // The same test as check_sgd_args: momentum_buffers is given iff momentum != 0.
  const bool use_momentum = momentum != 0.0;

  std::vector<Entry> entries;
  std::vector<Chunk> chunks;
  entries.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t numel = params[i].numel();
    if (numel == 0) continue;
    entries.push_back({params[i].data_ptr(), grads[i].const_data_ptr(),
                       use_momentum ? momentum_buffers[i].data_ptr() : nullptr,
                       params[i].scalar_type()});
    const int64_t e = static_cast<int64_t>(entries.size()) - 1;
    for (int64_t b = 0; b < numel; b += kChunk) chunks.push_back({e, b, std::min(kChunk, numel - b)});
  }
  if (chunks.empty()) return;

  const float signed_mult = maximize ? -mult : mult;
  if (!use_momentum) {
    run_all<false, false, false>(entries, chunks, signed_mult, s);
  } else if (first_step) {
    if (nesterov) {
      run_all<true, true, true>(entries, chunks, signed_mult, s);
    } else {
      run_all<true, false, true>(entries, chunks, signed_mult, s);
    }
  } else {
    if (nesterov) {
      run_all<true, true, false>(entries, chunks, signed_mult, s);
    } else {
      run_all<true, false, false>(entries, chunks, signed_mult, s);
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(catapult, CPU, m) { m.impl("sgd_", &sgd_cpu); }
