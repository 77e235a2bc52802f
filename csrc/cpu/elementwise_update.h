// The generic CPU driver of an elementwise update op (a spec: update_op.h): the op's
// arguments read off the dispatcher's stack and checked, the step counts advanced,
// per tensor its constants, then one parallel_for over fixed-size chunks of every
// tensor (one fork per step, however many tensors) running the grad pipeline and the
// spec's element function on vectors (at::vec, two per block) and on a scalar tail.
// Both lane types run the same function, so they round alike.
//
// CATAPULT_REGISTER_CPU(Spec) defines the op's schema and registers this kernel; each
// spec's registration is a file setup.py generates (csrc/optimizers/*.h -> one each).
#pragma once
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <vector>

#include "cpu/update_common.h"  // first: it switches FMA contraction off

#include "update_op.h"

namespace catapult::cpu {

constexpr int kMaxStates = 8;

// One tensor's pointers, AGC rows and constants.
template <class Spec>
struct Entry {
  void* p;
  const void* g;
  void* s[kMaxStates];  // nullptr where the call does not use the state
  void* ema;            // nullptr without Grokfast
  at::ScalarType dtype;
  AgcRows agc;
  typename Spec::Constants c;
};

// n elements of one tensor from offset b, with grad multiplier mult.
template <class Spec, int V, typename T>
void update_range(const Entry<Spec>& e, int64_t b, int64_t n, float mult, const Pipeline& pl) {
  constexpr int K = num_states<Spec>();
  constexpr int kSlots = state_slots<Spec>();
  constexpr unsigned kUse = Spec::uses(V);
  constexpr unsigned kRead = Spec::reads(V) & kUse;
  static_assert(K <= kMaxStates, "too many states");
  T* p = static_cast<T*>(e.p) + b;
  const T* g = static_cast<const T*>(e.g) + b;
  T* s[kSlots];
  for (int k = 0; k < kSlots; ++k) s[k] = k < K && (kUse >> k & 1u) ? static_cast<T*>(e.s[k]) + b : nullptr;
  T* ema = e.ema ? static_cast<T*>(e.ema) + b : nullptr;
  const Vec multv(mult);
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    Vec p0, p1, g0, g1;
    Vec s0[kSlots], s1[kSlots];
    pipeline_block(g, ema, i, multv, pl, g0, g1);
    load_block(p + i, p0, p1);
    for (int k = 0; k < kSlots; ++k) {
      if (kRead >> k & 1u) {
        load_block(s[k] + i, s0[k], s1[k]);
      } else {
        s0[k] = s1[k] = Vec(0.0f);
      }
    }
    Spec::template update<V, Vec>(p0, g0, s0, e.c);
    Spec::template update<V, Vec>(p1, g1, s1, e.c);
    store_block(p + i, p0, p1);
    for (int k = 0; k < kSlots; ++k) {
      if (kUse >> k & 1u) store_block(s[k] + i, s0[k], s1[k]);
    }
  }
  for (; i < n; ++i) {
    const float gf = pipeline_element(g, ema, i, mult, pl);
    float pf = static_cast<float>(p[i]);
    float sf[kSlots];
    for (int k = 0; k < kSlots; ++k) sf[k] = (kRead >> k & 1u) ? static_cast<float>(s[k][i]) : 0.0f;
    Spec::template update<V, float>(pf, gf, sf, e.c);
    p[i] = static_cast<T>(pf);
    for (int k = 0; k < kSlots; ++k) {
      if (kUse >> k & 1u) s[k][i] = static_cast<T>(sf[k]);
    }
  }
}

template <class Spec>
void update_cpu(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const UpdateArgs a = pop_update_args<Spec>(*stack, op.schema().arguments().size());
  const at::Device cpu(at::kCPU);
  const typename Spec::Params h = Spec::params(a.hyper_args(Spec::kName, cpu));
  const int variant = Spec::variant(h);
  check_update_args<Spec>(a, Spec::uses(variant), cpu);
  const PipelineArgs pipe = a.pipeline();
  if (pipe.skipped()) return;  // nothing at all is written, step counts included
  const float mult = pipe.multiplier();
  const Pipeline pl(pipe);
  const float lr = *a.lr.const_data_ptr<float>();

  std::vector<Entry<Spec>> entries;
  std::vector<Chunk> chunks;
  entries.reserve(a.params.size());
  for (size_t i = 0; i < a.params.size(); ++i) {
    float t = 0.0f;
    if constexpr (Spec::kHasStep) {
      float* step = a.state_steps[i].data_ptr<float>();
      t = *step + 1.0f;
      *step = t;
    }
    const at::Tensor& p = a.params[i];
    if (p.numel() == 0) continue;
    Entry<Spec> e{p.data_ptr(), a.grads[i].const_data_ptr(), {}, nullptr, p.scalar_type(),
                  agc_rows_of(a.agc_scales, i, p), Spec::constants(h, lr, t, static_cast<int64_t>(i))};
    for (int k = 0; k < num_states<Spec>(); ++k) {
      e.s[k] = a.states[k].empty() ? nullptr : a.states[k][i].data_ptr();
    }
    e.ema = a.grokfast_emas.empty() ? nullptr : a.grokfast_emas[i].data_ptr();
    entries.push_back(e);
    add_chunks(chunks, static_cast<int64_t>(entries.size()) - 1, p.numel());
  }
  dispatch_variant<Spec::kVariants>(variant, [&](auto v) {
    constexpr int V = decltype(v)::value;
    for_each_chunk(chunks, [&](const Chunk& c) {
      const Entry<Spec>& e = entries[c.entry];
      dispatch_float_type(e.dtype, [&](auto tag) {
        using T = decltype(tag);
        for_each_row_segment(e.agc, c.begin, c.size, mult, [&](int64_t b, int64_t n, float m) {
          update_range<Spec, V, T>(e, b, n, m, pl);
        });
      });
    });
  });
}

}  // namespace catapult::cpu

// The op's schema and its CPU kernel (in the one file setup.py generates per spec).
#define CATAPULT_REGISTER_CPU(SPEC)                                                          \
  TORCH_LIBRARY_FRAGMENT(catapult, m) { m.def(catapult::update_schema<SPEC>().c_str()); } \
  TORCH_LIBRARY_IMPL(catapult, CPU, m) {                                                     \
    m.impl(SPEC::kName, torch::CppFunction::makeFromBoxedFunction<&catapult::cpu::update_cpu<SPEC>>()); \
  }
