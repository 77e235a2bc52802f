// The generic CPU driver of an elementwise update op (a spec: update_op.h): the op's
// arguments read off the dispatcher's stack and checked, the step counts advanced,
// per tensor its constants, then one parallel_for over fixed-size chunks of every
// tensor (one fork per step, however many tensors) running the grad pipeline and the
// spec's element function on vectors (at::vec, two per block) and on a scalar tail.
// Both lane types run the same function, so they round alike; params with master weights
// (master_weights.h) are read and written through them there. States stored otherwise
// than the params (another dtype, int8 blocks: state_storage.h) take the stored path:
// per group of kGroup elements, everything is read into float32 buffers, the pipeline
// and the element function run there on vectors, and everything is written back.
//
// CATAPULT_REGISTER_CPU(Spec) defines the op's schema and registers this kernel; each
// spec's registration is a file setup.py generates (csrc/optimizers/*.h -> one each).
#pragma once
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "cpu/update_common.h"  // first: it switches FMA contraction off
#include "cpu/master_io.h"
#include "cpu/storage_io.h"

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
  at::ScalarType storage;        // of the states and the ema (the params' when none)
  float* scales[kMaxStates];     // int8 storage: each used state's block scales
  float* ema_scales;
  Master master;
  AgcRows agc;
  typename Spec::Constants c;
};

// n elements of one tensor from offset b, with grad multiplier mult; kMaster: through the
// params' master weights (master_io.h).
template <class Spec, int V, typename T, bool kMaster>
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
    if constexpr (kMaster) {
      load_params_block(e.master, p - b, b + i, p0, p1);
    } else {
      load_block(p + i, p0, p1);
    }
    for (int k = 0; k < kSlots; ++k) {
      if (kRead >> k & 1u) {
        load_block(s[k] + i, s0[k], s1[k]);
      } else {
        s0[k] = s1[k] = Vec(0.0f);
      }
    }
    Spec::template update<V, Vec>(p0, g0, s0, e.c);
    Spec::template update<V, Vec>(p1, g1, s1, e.c);
    if constexpr (kMaster) {
      store_params_block(e.master, p - b, b + i, p0, p1);
    } else {
      store_block(p + i, p0, p1);
    }
    for (int k = 0; k < kSlots; ++k) {
      if (kUse >> k & 1u) store_block(s[k] + i, s0[k], s1[k]);
    }
  }
  for (; i < n; ++i) {
    const float gf = pipeline_element(g, ema, i, mult, pl);
    float pf = kMaster ? load_param(e.master, p - b, b + i) : static_cast<float>(p[i]);
    float sf[kSlots];
    for (int k = 0; k < kSlots; ++k) sf[k] = (kRead >> k & 1u) ? static_cast<float>(s[k][i]) : 0.0f;
    Spec::template update<V, float>(pf, gf, sf, e.c);
    if constexpr (kMaster) {
      store_param(e.master, p - b, b + i, pf);
    } else {
      p[i] = static_cast<T>(pf);
    }
    for (int k = 0; k < kSlots; ++k) {
      if (kUse >> k & 1u) s[k][i] = static_cast<T>(sf[k]);
    }
  }
}

// The stored path over n elements of one tensor from offset b (a multiple of kGroup):
// states stored otherwise than the params, or params with master weights.
template <class Spec, int V, typename T>
void update_stored_range(const Entry<Spec>& e, int64_t b, int64_t n, float mult, const Pipeline& pl) {
  constexpr int K = num_states<Spec>();
  constexpr int kSlots = state_slots<Spec>();
  constexpr unsigned kUse = Spec::uses(V);
  constexpr unsigned kRead = Spec::reads(V) & kUse;
  T* p = static_cast<T*>(e.p);
  const T* g = static_cast<const T*>(e.g);
  const StoredList ema{e.ema, e.ema_scales};
  StoredList s[kSlots];
  for (int k = 0; k < K; ++k) s[k] = {e.s[k], e.scales[k]};
  alignas(64) float pb[kGroup], gb[kGroup], eb[kGroup], sb[kSlots][kGroup];
  for (int64_t j0 = b; j0 < b + n; j0 += kGroup) {
    const int64_t m = std::min(kGroup, b + n - j0);
    pipeline_group(g, e.agc, mult, e.storage, ema, j0, m, pl, gb, eb);
    load_params(e.master, p, j0, m, pb);
    for (int k = 0; k < kSlots; ++k) {
      if (kRead >> k & 1u) {
        load_stored(e.storage, quant_map_of(Spec::kStates[k]), s[k], j0, m, sb[k]);
      } else {
        std::fill(sb[k], sb[k] + kGroup, 0.0f);
      }
    }
    for (int64_t i = 0; i < kGroup; i += Vec::size()) {
      Vec pv = Vec::loadu(pb + i);
      Vec sv[kSlots];
      for (int k = 0; k < kSlots; ++k) sv[k] = Vec::loadu(sb[k] + i);
      Spec::template update<V, Vec>(pv, Vec::loadu(gb + i), sv, e.c);
      pv.store(pb + i);
      for (int k = 0; k < kSlots; ++k) sv[k].store(sb[k] + i);
    }
    store_params(e.master, pb, j0, m, p);
    for (int k = 0; k < K; ++k) {
      if (kUse >> k & 1u) store_stored(e.storage, quant_map_of(Spec::kStates[k]), s[k], j0, m, sb[k]);
    }
    if (e.ema != nullptr) store_stored(e.storage, QuantMap::kSqrt, ema, j0, m, eb);
  }
}

template <class Spec>
void update_cpu(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const UpdateArgs a = pop_update_args<Spec>(*stack, op.schema().arguments().size());
  const at::Device cpu(at::kCPU);
  const typename Spec::Params h = Spec::params(a.hyper_args(Spec::kName, cpu));
  const int variant = Spec::variant(h);
  const MasterKind master = check_update_args<Spec>(a, Spec::uses(variant), cpu).master;
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
    const Master w = master_of(master, a.master_weights, i);
    const at::Tensor& p = a.params[i];
    if (p.numel() == 0) continue;
    Entry<Spec> e{p.data_ptr(), a.grads[i].const_data_ptr(), {}, nullptr, p.scalar_type(), p.scalar_type(), {}, nullptr,
                  w, agc_rows_of(a.agc_scales, i, p), Spec::constants(h, lr, t, static_cast<int64_t>(i))};
    // int8 storage: state_scales holds each stored list's scales, list-major
    const size_t n = a.params.size();
    size_t stored = 0;
    for (int k = 0; k < num_states<Spec>(); ++k) {
      if (a.states[k].empty()) continue;
      e.s[k] = a.states[k][i].data_ptr();
      e.storage = a.states[k][i].scalar_type();
      if (!a.state_scales.empty()) e.scales[k] = a.state_scales[stored * n + i].data_ptr<float>();
      ++stored;
    }
    if (!a.grokfast_emas.empty()) {
      e.ema = a.grokfast_emas[i].data_ptr();
      e.storage = a.grokfast_emas[i].scalar_type();
      if (!a.state_scales.empty()) e.ema_scales = a.state_scales[stored * n + i].data_ptr<float>();
    }
    entries.push_back(e);
    add_chunks(chunks, static_cast<int64_t>(entries.size()) - 1, p.numel());
  }
  dispatch_variant<Spec::kVariants>(variant, [&](auto v) {
    constexpr int V = decltype(v)::value;
    for_each_chunk(chunks, [&](const Chunk& c) {
      const Entry<Spec>& e = entries[c.entry];
      dispatch_float_type(e.dtype, [&](auto tag) {
        using T = decltype(tag);
        if (e.storage != e.dtype) return update_stored_range<Spec, V, T>(e, c.begin, c.size, mult, pl);
        for_each_row_segment(e.agc, c.begin, c.size, mult, [&](int64_t b, int64_t n, float m) {
          if constexpr (!std::is_same_v<T, float>) {  // masters: 16-bit params only
            if (e.master.kind != MasterKind::kNone) return update_range<Spec, V, T, true>(e, b, n, m, pl);
          }
          update_range<Spec, V, T, false>(e, b, n, m, pl);
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
