// An elementwise update op (an optimizer step) as one description, its spec: what every
// backend's generic driver (cpu/elementwise_update.h, cuda/elementwise_update.cuh, and
// the Triton kernel in catapult_kernels/triton) needs to run it. A spec is a struct:
//
//   static constexpr const char* kName;        // the op, e.g. "adopt_"
//   static constexpr std::array kStates{...};  // its state lists (read and written), in order
//   static constexpr bool kHasStep;            // a step count per param (state_steps)
//   static constexpr const char* kHyper;       // schema text of its own arguments after lr
//   struct Params;                             // those arguments as the kernels take them
//   static Params params(const Hyper& h);      // ... made (and checked) from the op's arguments
//   static constexpr int kVariants;            // compile-time paths of the element function,
//   static int variant(const Params&);         // ... the one a call takes,
//   static constexpr unsigned uses(int v);     // ... the states it reads or writes (bit i: kStates[i]),
//   static constexpr unsigned reads(int v);    // ... and those it reads (not: loaded as 0)
//   struct Constants;                          // per tensor: from lr, the step t, its index
//   CATAPULT_HD static Constants constants(const Params&, float lr, float t, int64_t index);
//   template <int V, typename F>               // one element; F = float or Vec (lanes.h)
//   CATAPULT_HD static void update(F& p, F g, F (&s)[N], const Constants&);  // N = max(1, states)
//   static constexpr const char* kParams;      // optional: another name for the list written
//
// g is the grad pipeline's output (grad_pipeline.h). t = state_steps[i] + 1 (0 without
// steps): the op counts the step itself, writing t back unless the step is skipped.
// The op's schema, built here from the spec:
//   kName(Tensor(a!)[] params, Tensor[] grads, <Tensor(x!)[] state>..., [Tensor(s!)[] state_steps,]
//         Tensor lr, <kHyper>, <kPipelineSchema>, <kStorageSchema>, <kMasterSchema>) -> ()
// A state list that a call does not use (uses) must be empty. The states a call uses and
// its Grokfast EMAs are stored in one dtype, which may differ from the params'
// (state_storage.h); the element function sees them as float32 either way. 16-bit params
// may carry master weights (master_weights.h): then p is their float32 value.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/stack.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstdint>
#include <iterator>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "grad_pipeline.h"
#include "multi_tensor_checks.h"
#include "master_weights.h"
#include "state_storage.h"

namespace catapult {

// The grad pipeline's arguments: the tail of every update op's schema (lamb_ too).
constexpr const char* kPipelineSchema =
    "Tensor? grad_norm, float max_grad_norm, Tensor? grad_scale, Tensor? skip, Tensor[] agc_scales, "
    "Tensor(z!)[] grokfast_emas, float grokfast_alpha, float grokfast_lamb, bool maximize";
constexpr int kPipelineArgCount = 9;

template <class Spec>
constexpr int num_states() {
  return static_cast<int>(std::size(Spec::kStates));
}

// The element function's state array: C++ has no arrays of 0.
template <class Spec>
constexpr int state_slots() {
  return num_states<Spec>() > 0 ? num_states<Spec>() : 1;
}

// The name of the list an op writes: params, unless the spec names it (kParams).
template <class Spec>
constexpr const char* params_name() {
  if constexpr (requires { Spec::kParams; }) {
    return Spec::kParams;
  } else {
    return "params";
  }
}

template <class Spec>
std::string update_schema() {
  std::string s = std::string(Spec::kName) + "(Tensor(a!)[] " + params_name<Spec>() + ", Tensor[] grads, ";
  char alias = 'b';
  for (const char* state : Spec::kStates) s += std::string("Tensor(") + alias++ + "!)[] " + state + ", ";
  if (Spec::kHasStep) s += "Tensor(s!)[] state_steps, ";
  s += "Tensor lr, ";
  if (std::string(Spec::kHyper).size() > 0) s += std::string(Spec::kHyper) + ", ";
  return s + kPipelineSchema + ", " + kStorageSchema + ", " + kMasterSchema + ") -> ()";
}

// The pipeline's arguments for the kernels, from the op's (pointers into its tensors).
inline PipelineArgs pipeline_args(const std::optional<at::Tensor>& grad_norm, double max_grad_norm,
                                  const std::optional<at::Tensor>& grad_scale,
                                  const std::optional<at::Tensor>& skip, double grokfast_alpha,
                                  double grokfast_lamb, bool maximize) {
  PipelineArgs a;
  // Read-only inputs: const_data_ptr (no copy-on-write materialization).
  a.grad_norm = grad_norm.has_value() ? grad_norm->const_data_ptr<float>() : nullptr;
  a.grad_scale = grad_scale.has_value() ? grad_scale->const_data_ptr<float>() : nullptr;
  a.skip = skip.has_value() ? skip->const_data_ptr<float>() : nullptr;
  a.max_grad_norm = static_cast<float>(max_grad_norm);
  // 1 - alpha in double, then rounded (Grokfast).
  a.grokfast = Grokfast{static_cast<float>(grokfast_alpha), static_cast<float>(1.0 - grokfast_alpha),
                        static_cast<float>(grokfast_lamb)};
  a.maximize = maximize;
  return a;
}

// An op's own arguments (between lr and the pipeline tail), by position.
struct Hyper {
  const char* op;
  const c10::IValue* values;
  size_t n_params;
  at::Device device;

  double f(int i) const { return values[i].toDouble(); }
  bool b(int i) const { return values[i].toBool(); }
  // An optional float32 tensor of one value per param (e.g. LARS's trust ratios) on the
  // params' device, checked; nullptr when None.
  const float* per_param(int i, const char* name) const {
    if (values[i].isNone()) return nullptr;
    const at::Tensor t = values[i].toTensor();
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.is_contiguous() &&
                    t.numel() == static_cast<int64_t>(n_params),
                "catapult: ", op, ": ", name, " must be a contiguous float32 tensor of ", n_params,
                " elements (one per param), got ", t.scalar_type(), " of shape ", t.sizes());
    TORCH_CHECK(t.device() == device, "catapult: ", op, ": ", name, " is on ", t.device(),
                " but the params are on ", device);
    return t.const_data_ptr<float>();
  }
};

// One call's arguments, read from the dispatcher's stack.
struct UpdateArgs {
  std::vector<at::Tensor> params, grads, state_steps, agc_scales, grokfast_emas, state_scales, master_weights;
  std::vector<std::vector<at::Tensor>> states;
  at::Tensor lr;
  std::vector<c10::IValue> hyper;
  std::optional<at::Tensor> grad_norm, grad_scale, skip;
  double max_grad_norm, grokfast_alpha, grokfast_lamb;
  bool maximize;

  Hyper hyper_args(const char* op, const at::Device& device) const {
    return {op, hyper.data(), params.size(), device};
  }

  PipelineArgs pipeline() const {
    return pipeline_args(grad_norm, max_grad_norm, grad_scale, skip, grokfast_alpha, grokfast_lamb, maximize);
  }
};

inline std::optional<at::Tensor> optional_tensor(const c10::IValue& v) {
  return v.isNone() ? std::nullopt : std::optional<at::Tensor>(v.toTensor());
}

// Pops the op's n arguments off the stack (a boxed kernel returns nothing).
template <class Spec>
UpdateArgs pop_update_args(torch::jit::Stack& stack, size_t n_args) {
  constexpr int kFixed = 2 + num_states<Spec>() + (Spec::kHasStep ? 1 : 0) + 1;
  const int n = static_cast<int>(n_args);
  TORCH_CHECK(n >= kFixed + kPipelineArgCount + 2, "catapult: ", Spec::kName, ": too few arguments");
  const c10::IValue* v = &stack[stack.size() - n];
  UpdateArgs a;
  int i = 0;
  a.params = v[i++].toTensorVector();
  a.grads = v[i++].toTensorVector();
  for (int s = 0; s < num_states<Spec>(); ++s) a.states.push_back(v[i++].toTensorVector());
  if (Spec::kHasStep) a.state_steps = v[i++].toTensorVector();
  a.lr = v[i++].toTensor();
  for (; i < n - kPipelineArgCount - 2; ++i) a.hyper.push_back(v[i]);
  a.grad_norm = optional_tensor(v[i++]);
  a.max_grad_norm = v[i++].toDouble();
  a.grad_scale = optional_tensor(v[i++]);
  a.skip = optional_tensor(v[i++]);
  a.agc_scales = v[i++].toTensorVector();
  a.grokfast_emas = v[i++].toTensorVector();
  a.grokfast_alpha = v[i++].toDouble();
  a.grokfast_lamb = v[i++].toDouble();
  a.maximize = v[i++].toBool();
  a.state_scales = v[i++].toTensorVector();
  a.master_weights = v[i++].toTensorVector();
  torch::jit::drop(stack, n);
  return a;
}

// Everything a call is checked for, on every backend, before anything is written:
// the lists it uses (used: bit i for kStates[i]) and their storage, the regularizer
// lists, the step counts and the control scalars. `device` is where the kernel runs.
// Returns how the states and master weights are stored.
struct CallStorage {
  bool int8;          // the states and EMAs (check_storage_lists)
  MasterKind master;  // check_master_weights
};

template <class Spec>
CallStorage check_update_args(const UpdateArgs& a, unsigned used, const at::Device& device) {
  NamedLists lists{{"grads", a.grads}};
  NamedLists stored;
  for (int s = 0; s < num_states<Spec>(); ++s) {
    if (used & (1u << s)) {
      stored.emplace_back(Spec::kStates[s], a.states[s]);
    } else {
      TORCH_CHECK(a.states[s].empty(), "catapult: ", Spec::kName, ": ", Spec::kStates[s],
                  " must be empty: this call does not use it");
    }
  }
  add_regularizer_lists(Spec::kName, a.params, a.agc_scales, a.grokfast_emas, lists, params_name<Spec>(), &stored);
  if constexpr (Spec::kHasStep) {
    check_update_lists(a.params, lists, a.state_steps);
  } else {
    check_update_lists(a.params, lists, params_name<Spec>());
  }
  check_step_control(Spec::kName, a.params, a.lr, a.grad_norm, a.max_grad_norm, a.grad_scale, a.skip,
                     device, params_name<Spec>());
  const bool int8 = check_storage_lists(Spec::kName, a.params, stored, a.state_scales, params_name<Spec>());
  return {int8, check_master_weights(Spec::kName, a.params, a.master_weights, params_name<Spec>())};
}

// Calls f(std::integral_constant<int, V>) for the runtime variant v of [0, N).
template <int N, int V = 0, typename F>
void dispatch_variant(int v, const F& f) {
  if constexpr (V < N) {
    if (v == V) return f(std::integral_constant<int, V>{});
    dispatch_variant<N, V + 1>(v, f);
  }
}

}  // namespace catapult
