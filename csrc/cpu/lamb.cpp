// lamb_ on CPU: one LAMB step over lists of tensors in two passes (lamb_math.h).
// Pass 1 runs the grad pipeline and lamb_moments and sums r^2 and p^2 per chunk; the
// chunk sums of each tensor are then added in chunk order (deterministic for any
// thread count) into its trust ratio; pass 2 writes p = p - lr * trust * r with pass
// 1's r bit for bit. float32 stores the new m, v exactly: pass 1 writes them (and the
// Grokfast ema) and pass 2 recomputes r from them (reads p, g, m, v, writes m, v; then
// reads p, m, v, writes p: 40 B/param). A 16-bit type would round them, and r from
// rounded moments is not the r the trust ratio measured (v = 1e-8 is 0 in float16,
// which makes r = m_hat / eps): there pass 1 writes nothing, and pass 2 runs the
// pipeline and lamb_moments again from the old state, then writes p, m, v (and the
// ema). The same design as csrc/cuda/lamb.cu. States stored otherwise than the params
// (state_storage.h) and params with master weights (master_weights.h) take the stored
// path, the 16-bit design through float32 buffers of kGroup elements (stored_range).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu/update_common.h"  // first: it switches FMA contraction off

#include "cpu/master_io.h"
#include "cpu/square_sum.h"
#include "cpu/storage_io.h"
#include "lamb_args.h"
#include "lamb_math.h"

namespace {

using namespace catapult::cpu;

struct Entry {
  void* p;
  const void* g;
  void* m;
  void* v;
  void* ema;  // null without Grokfast
  at::ScalarType dtype;
  at::ScalarType storage;  // of m, v and the ema (the params' when none)
  float* m_scales;         // int8 storage: the block scales of m, v and the ema
  float* v_scales;
  float* ema_scales;
  Master master;
  AgcRows agc;
  catapult::LAMBStep step;
  float lr_trust;  // lr * trust ratio, set between the passes
};

// Whether pass 1 stores the new m, v (and ema) for pass 2 to read: only where T holds
// them exactly.
template <typename T>
constexpr bool kStoresMoments = std::is_same_v<T, float>;

// Sums of squares of r and p over a chunk: in float lanes, and again in double when a
// float sum may be off (cpu/square_sum.h), so the trust ratio is finite and exact for
// any finite r and p (a weight of 2e19 overflowed |p|, weights of 1e-30 made it 0).
struct Sums {
  double r = 0.0, p = 0.0;

  bool need_double() const {
    return catapult::cpu::needs_double_sum(r) || catapult::cpu::needs_double_sum(p);
  }
};

// Whether a tensor takes the stored path.
bool stored(const Entry& e) { return e.storage != e.dtype || e.master.kind != catapult::MasterKind::kNone; }

// The moments over n elements of one tensor from offset b. Pass 1 (kApply false): r^2
// and p^2 added to sums in Acc's lanes, and m, v (and the ema) stored when
// kStoresMoments<T>. Pass 2 of a 16-bit type (kApply true): the same r again from the
// same old state, m, v and the ema stored, and p = p - lr_trust * r.
template <typename T, bool kApply, typename Acc = FloatSquareSum>
void moments_range(const Entry& e, int64_t b, int64_t n, float mult, const Pipeline& pl, Sums& sums) {
  constexpr bool kStore = kApply || kStoresMoments<T>;
  T* p = static_cast<T*>(e.p) + b;
  const T* g = static_cast<const T*>(e.g) + b;
  T* m = static_cast<T*>(e.m) + b;
  T* v = static_cast<T*>(e.v) + b;
  T* ema = e.ema ? static_cast<T*>(e.ema) + b : nullptr;
  const Vec multv(mult);
  const Vec lr_trust(e.lr_trust);
  Acc rr, pp;
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    Vec p0, p1, g0, g1, m0, m1, v0, v1;
    pipeline_block<kStore>(g, ema, i, multv, pl, g0, g1);
    load_block(p + i, p0, p1);
    load_block(m + i, m0, m1);
    load_block(v + i, v0, v1);
    const Vec r0 = catapult::lamb_moments(p0, g0, m0, v0, e.step);
    const Vec r1 = catapult::lamb_moments(p1, g1, m1, v1, e.step);
    if constexpr (kStore) {
      store_block(m + i, m0, m1);
      store_block(v + i, v0, v1);
    }
    if constexpr (kApply) {
      store_block(p + i, p0 - lr_trust * r0, p1 - lr_trust * r1);
    } else {
      rr.add(r0);
      rr.add(r1);
      pp.add(p0);
      pp.add(p1);
    }
  }
  if constexpr (!kApply) {
    sums.r += rr.total();
    sums.p += pp.total();
  }
  for (; i < n; ++i) {
    const float gf = pipeline_element<kStore>(g, ema, i, mult, pl);
    const float pf = static_cast<float>(p[i]);
    float mf = static_cast<float>(m[i]);
    float vf = static_cast<float>(v[i]);
    const float r = catapult::lamb_moments(pf, gf, mf, vf, e.step);
    if constexpr (kStore) {
      m[i] = static_cast<T>(mf);
      v[i] = static_cast<T>(vf);
    }
    if constexpr (kApply) {
      p[i] = static_cast<T>(pf - e.lr_trust * r);
    } else {
      sums.r += static_cast<double>(r) * r;
      sums.p += static_cast<double>(pf) * pf;
    }
  }
}

// Pass 2 of float32 over n elements of one tensor from offset b: r from the stored m, v.
template <typename T>
void apply_range(const Entry& e, int64_t b, int64_t n) {
  T* p = static_cast<T*>(e.p) + b;
  const T* m = static_cast<const T*>(e.m) + b;
  const T* v = static_cast<const T*>(e.v) + b;
  const Vec lr_trust(e.lr_trust);
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    Vec p0, p1, m0, m1, v0, v1;
    load_block(p + i, p0, p1);
    load_block(m + i, m0, m1);
    load_block(v + i, v0, v1);
    p0 = p0 - lr_trust * catapult::lamb_direction(p0, m0, v0, e.step);
    p1 = p1 - lr_trust * catapult::lamb_direction(p1, m1, v1, e.step);
    store_block(p + i, p0, p1);
  }
  for (; i < n; ++i) {
    const float pf = static_cast<float>(p[i]);
    const float r = catapult::lamb_direction(pf, static_cast<float>(m[i]), static_cast<float>(v[i]), e.step);
    p[i] = static_cast<T>(pf - e.lr_trust * r);
  }
}

// r^2 and p^2 in double over n elements of one float32 tensor from offset b after pass
// 1, r from the stored m, v: pass 1's r bit for bit, as pass 2 recomputes it.
void stored_direction_sums(const Entry& e, int64_t b, int64_t n, Sums& sums) {
  const float* p = static_cast<const float*>(e.p) + b;
  const float* m = static_cast<const float*>(e.m) + b;
  const float* v = static_cast<const float*>(e.v) + b;
  SquareSum rr, pp;
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    Vec p0, p1, m0, m1, v0, v1;
    load_block(p + i, p0, p1);
    load_block(m + i, m0, m1);
    load_block(v + i, v0, v1);
    rr.add(catapult::lamb_direction(p0, m0, v0, e.step));
    rr.add(catapult::lamb_direction(p1, m1, v1, e.step));
    pp.add(p0);
    pp.add(p1);
  }
  sums.r += rr.total();
  sums.p += pp.total();
  for (; i < n; ++i) {
    const double r = catapult::lamb_direction(p[i], m[i], v[i], e.step);
    sums.r += r * r;
    sums.p += static_cast<double>(p[i]) * p[i];
  }
}

// The stored path over n elements of one tensor from offset b (a multiple of kGroup):
// pass 1 (kApply false) adds r^2 and p^2 to sums (in double: padding adds zeros) and
// writes nothing; pass 2 computes the same r from the same old state and writes p, m, v
// and the ema.
template <typename T, bool kApply>
void stored_range(const Entry& e, int64_t b, int64_t n, float mult, const Pipeline& pl, Sums& sums) {
  T* p = static_cast<T*>(e.p);
  const T* g = static_cast<const T*>(e.g);
  const StoredList m{e.m, e.m_scales}, v{e.v, e.v_scales}, ema{e.ema, e.ema_scales};
  constexpr catapult::QuantMap kV = catapult::quant_map_of("exp_avg_sqs");
  alignas(64) float pb[kGroup], gb[kGroup], eb[kGroup], mb[kGroup], vb[kGroup], rb[kGroup];
  const Vec lr_trust(e.lr_trust);
  SquareSum rr, pp;
  for (int64_t j0 = b; j0 < b + n; j0 += kGroup) {
    const int64_t k = std::min(kGroup, b + n - j0);
    pipeline_group(g, e.agc, mult, e.storage, ema, j0, k, pl, gb, eb);
    load_params(e.master, p, j0, k, pb);
    load_stored(e.storage, catapult::QuantMap::kSqrt, m, j0, k, mb);
    load_stored(e.storage, kV, v, j0, k, vb);
    for (int64_t i = 0; i < kGroup; i += Vec::size()) {
      const Vec pv = Vec::loadu(pb + i);
      Vec mv = Vec::loadu(mb + i), vv = Vec::loadu(vb + i);
      const Vec r = catapult::lamb_moments(pv, Vec::loadu(gb + i), mv, vv, e.step);
      if constexpr (kApply) {
        (pv - lr_trust * r).store(pb + i);
        mv.store(mb + i);
        vv.store(vb + i);
      } else {
        r.store(rb + i);
      }
    }
    if constexpr (!kApply) {
      // the elements past the tensor's end (zeros: r = 0 / (0 + eps), NaN with eps 0) add nothing
      std::fill(rb + k, rb + kGroup, 0.0f);
      for (int64_t i = 0; i < kGroup; i += Vec::size()) {
        rr.add(Vec::loadu(rb + i));
        pp.add(Vec::loadu(pb + i));
      }
    }
    if constexpr (kApply) {
      store_params(e.master, pb, j0, k, p);
      store_stored(e.storage, catapult::QuantMap::kSqrt, m, j0, k, mb);
      store_stored(e.storage, kV, v, j0, k, vb);
      if (e.ema != nullptr) store_stored(e.storage, catapult::QuantMap::kSqrt, ema, j0, k, eb);
    }
  }
  if constexpr (!kApply) {
    sums.r += rr.total();
    sums.p += pp.total();
  }
}

void lamb_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
              at::TensorList exp_avg_sqs, at::TensorList state_steps, const at::Tensor& lr,
              double beta1, double beta2, double eps, double weight_decay, bool bias_correction,
              double max_weight_norm, const std::optional<at::Tensor>& grad_norm,
              double max_grad_norm, const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& skip, at::TensorList agc_scales,
              at::TensorList grokfast_emas, double grokfast_alpha, double grokfast_lamb,
              bool maximize, at::TensorList state_scales, at::TensorList master_weights) {
  const catapult::MasterKind master =
      catapult::check_lamb_args(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, grad_norm, max_grad_norm,
                                grad_scale, skip, agc_scales, grokfast_emas, state_scales, master_weights,
                                at::Device(at::kCPU))
          .master;
  const catapult::PipelineArgs pipe = catapult::pipeline_args(grad_norm, max_grad_norm, grad_scale, skip,
                                                              grokfast_alpha, grokfast_lamb, maximize);
  if (pipe.skipped()) return;  // nothing at all is written, step counts included
  const float mult = pipe.multiplier();
  const Pipeline pl(pipe);
  const float lr_value = *lr.const_data_ptr<float>();

  std::vector<Entry> entries;
  std::vector<Chunk> chunks;
  std::vector<int64_t> first_chunk;  // per entry, its first chunk (its chunks are consecutive)
  entries.reserve(params.size());
  const size_t n_params = params.size();
  for (size_t i = 0; i < n_params; ++i) {
    float* step_count = state_steps[i].data_ptr<float>();  // the op counts the step
    const float step = *step_count + 1.0f;
    *step_count = step;
    const Master w = master_of(master, master_weights, i);
    const int64_t numel = params[i].numel();
    if (numel == 0) continue;
    // int8 storage: state_scales holds the scales of m, then v, then the emas, list-major
    const auto scales = [&](size_t list) {
      return state_scales.empty() ? nullptr : state_scales[list * n_params + i].data_ptr<float>();
    };
    entries.push_back({params[i].data_ptr(), grads[i].const_data_ptr(), exp_avgs[i].data_ptr(),
                       exp_avg_sqs[i].data_ptr(),
                       grokfast_emas.empty() ? nullptr : grokfast_emas[i].data_ptr(),
                       params[i].scalar_type(), exp_avgs[i].scalar_type(), scales(0), scales(1),
                       grokfast_emas.empty() ? nullptr : scales(2), w, agc_rows_of(agc_scales, i, params[i]),
                       catapult::lamb_step_constants(
                           static_cast<float>(beta1), static_cast<float>(beta2), static_cast<float>(eps),
                           static_cast<float>(weight_decay), bias_correction, step),
                       0.0f});
    first_chunk.push_back(static_cast<int64_t>(chunks.size()));
    add_chunks(chunks, static_cast<int64_t>(entries.size()) - 1, numel);
  }
  first_chunk.push_back(static_cast<int64_t>(chunks.size()));

  std::vector<Sums> sums(chunks.size());
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const Chunk& c = chunks[k];
      const Entry& e = entries[c.entry];
      dispatch_float_type(e.dtype, [&](auto t) {
        using T = decltype(t);
        if (stored(e)) return stored_range<T, false>(e, c.begin, c.size, mult, pl, sums[k]);
        for_each_row_segment(e.agc, c.begin, c.size, mult, [&](int64_t b, int64_t n, float m) {
          moments_range<T, false>(e, b, n, m, pl, sums[k]);
        });
        if (!sums[k].need_double()) return;
        sums[k] = Sums{};  // the rare chunk: its sums again, in double
        if constexpr (kStoresMoments<T>) {
          stored_direction_sums(e, c.begin, c.size, sums[k]);
        } else {  // pass 1 stored nothing: the same math from the same old state
          for_each_row_segment(e.agc, c.begin, c.size, mult, [&](int64_t b, int64_t n, float m) {
            moments_range<T, false, SquareSum>(e, b, n, m, pl, sums[k]);
          });
        }
      });
    }
  });

  for (size_t i = 0; i < entries.size(); ++i) {
    Sums total;
    for (int64_t k = first_chunk[i]; k < first_chunk[i + 1]; ++k) {
      total.r += sums[k].r;
      total.p += sums[k].p;
    }
    const float trust = catapult::lamb_trust_ratio(static_cast<float>(std::sqrt(total.p)),
                                                   static_cast<float>(std::sqrt(total.r)),
                                                   static_cast<float>(max_weight_norm));
    entries[i].lr_trust = lr_value * trust;
  }

  for_each_chunk(chunks, [&](const Chunk& c) {
    const Entry& e = entries[c.entry];
    dispatch_float_type(e.dtype, [&](auto t) {
      using T = decltype(t);
      if (stored(e)) {
        Sums unused;
        stored_range<T, true>(e, c.begin, c.size, mult, pl, unused);
      } else if constexpr (kStoresMoments<T>) {
        apply_range<T>(e, c.begin, c.size);
      } else {
        Sums unused;
        for_each_row_segment(e.agc, c.begin, c.size, mult, [&](int64_t b, int64_t n, float m) {
          moments_range<T, true>(e, b, n, m, pl, unused);
        });
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(catapult, CPU, m) { m.impl("lamb_", &lamb_cpu); }
