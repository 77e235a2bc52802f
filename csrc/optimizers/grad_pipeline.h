// grad_pipeline_: the grad pipeline alone (unscale and clip, AGC, Grokfast, maximize;
// csrc/grad_pipeline.h), its output written into `out` (buffers laid out like the
// grads, in their dtype). For optimizers that are not elementwise (LARS's
// per-param norms, Muon's matmuls): they run the pipeline into a buffer, then their own
// math. lr is taken (every update op has one) and not read.
#pragma once
#include "update_op.h"

namespace catapult::optimizers::grad_pipeline {

struct Spec {
  static constexpr const char* kName = "grad_pipeline_";
  static constexpr const char* kParams = "out";  // the list it writes
  static constexpr std::array<const char*, 0> kStates{};
  static constexpr bool kHasStep = false;
  static constexpr const char* kHyper = "";

  struct Params {};
  static Params params(const Hyper&) { return {}; }

  static constexpr int kVariants = 1;
  static int variant(const Params&) { return 0; }
  static constexpr unsigned uses(int) { return 0u; }
  static constexpr unsigned reads(int) { return 0u; }

  struct Constants {};
  CATAPULT_HD static Constants constants(const Params&, float, float, int64_t) { return {}; }

  template <int V, typename F>
  CATAPULT_HD static void update(F& out, F g, F (&)[1], const Constants&) {
    out = g;
  }
};

}  // namespace catapult::optimizers::grad_pipeline
