// Argument checks shared by the CPU and CUDA kernels of every multi-tensor op.
// The Python wrappers check the same things first, with friendlier messages;
// these guard direct torch.ops.catapult.* calls. Nothing is written before they pass.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <optional>
#include <utility>
#include <vector>

namespace catapult {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// Whether a and b have the same shape and walk memory in the same order: strides
// agree on every dim of size > 1 (a size-1 dim's stride is arbitrary; autograd and
// .t() of a row vector give it different values).
inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// A scalar control tensor (lr, grad_norm, grad_scale, skip): float32, one
// element, on the kernels' device (CPU tensors are read directly by the CPU kernels).
inline void check_scalar_tensor(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.numel() == 1, "catapult: ", name, " must have one element, got ", t.numel());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "catapult: ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == device, "catapult: ", name, " is on ", t.device(),
              " but the tensors are on ", device);
}

inline void check_optional_scalar(const std::optional<at::Tensor>& t, const char* name,
                                  const at::Device& device) {
  if (t.has_value()) check_scalar_tensor(*t, name, device);
}

// The lists of an elementwise update: entry i of every list is the same shape,
// dtype, device and dense memory layout, so the kernels may walk all of them as
// flat arrays of params[i].numel() elements.
using NamedLists = std::vector<std::pair<const char*, at::TensorList>>;

inline void check_update_lists(at::TensorList params, const NamedLists& others,
                               const char* first = "params") {
  const auto n = params.size();
  for (const auto& [name, list] : others) {
    TORCH_CHECK(list.size() == n, "catapult: ", name, " has ", list.size(),
                " tensors but ", first, " has ", n);
  }
  if (n == 0) return;
  const auto device = params[0].device();
  for (size_t i = 0; i < n; ++i) {
    const auto& p = params[i];
    TORCH_CHECK(p.device() == device, "catapult: ", first, "[", i, "] is on ", p.device(),
                " but ", first, "[0] is on ", device);
    TORCH_CHECK(is_supported_float(p.scalar_type()), "catapult: ", first, "[", i,
                "] has dtype ", p.scalar_type(), "; supported: float32, bfloat16, float16");
    TORCH_CHECK(p.is_non_overlapping_and_dense(), "catapult: ", first, "[", i,
                "] is not dense in memory (strides ", p.strides(), ")");
    for (const auto& [name, list] : others) {
      const auto& t = list[i];
      TORCH_CHECK(t.device() == device, "catapult: ", name, "[", i, "] is on ", t.device(),
                  " but ", first, " are on ", device);
      TORCH_CHECK(t.scalar_type() == p.scalar_type(), "catapult: ", name, "[", i,
                  "] has dtype ", t.scalar_type(), " but ", first, "[", i, "] has ", p.scalar_type());
      TORCH_CHECK(same_layout(t, p), "catapult: ", name, "[",
                  i, "] has shape ", t.sizes(), " strides ", t.strides(), " but ", first, "[", i,
                  "] has shape ", p.sizes(), " strides ", p.strides());
    }
  }
}

// The same, plus one float32 step count per param on the params' device.
inline void check_update_lists(at::TensorList params, const NamedLists& others,
                               at::TensorList state_steps) {
  check_update_lists(params, others, "params");
  TORCH_CHECK(state_steps.size() == params.size(), "catapult: state_steps has ", state_steps.size(),
              " tensors but params has ", params.size());
  for (size_t i = 0; i < state_steps.size(); ++i) {
    const auto& s = state_steps[i];
    TORCH_CHECK(s.numel() == 1 && s.scalar_type() == at::kFloat,
                "catapult: state_steps[", i, "] must be a one-element float32 tensor");
    TORCH_CHECK(s.device() == params[0].device(), "catapult: state_steps[", i, "] is on ",
                s.device(), " but params are on ", params[0].device());
  }
}

// The checks every update op shares: params on the kernel's device, and the control
// scalars of the grad pipeline (lr, grad_norm, grad_scale, skip) beside them.
inline void check_step_control(const char* op, at::TensorList params, const at::Tensor& lr,
                               const std::optional<at::Tensor>& grad_norm, double max_grad_norm,
                               const std::optional<at::Tensor>& grad_scale,
                               const std::optional<at::Tensor>& skip, const at::Device& device,
                               const char* first = "params") {
  TORCH_CHECK(params.empty() || params[0].device() == device, "catapult: ", op, ": ", first, " are on ",
              params.empty() ? device : params[0].device(), "; this kernel takes ", device.type(),
              " tensors");
  check_scalar_tensor(lr, "lr", device);
  check_optional_scalar(grad_norm, "grad_norm", device);
  check_optional_scalar(grad_scale, "grad_scale", device);
  check_optional_scalar(skip, "skip", device);
  TORCH_CHECK(!(max_grad_norm > 0.0) || grad_norm.has_value(), "catapult: ", op,
              " needs grad_norm when max_grad_norm > 0 (got ", max_grad_norm, ")");
}

// The rows AGC scales param p by: its size along dim 0 for 2+ dims, else one row.
inline int64_t agc_rows(const at::Tensor& p) { return p.dim() >= 2 ? p.size(0) : 1; }

// The regularizer lists of every update op: grokfast_emas (empty, or laid out like the
// params: added to `lists` for check_update_lists, or to `ema_lists` where the op stores
// its EMAs like its states, state_storage.h) and agc_scales (empty, or per param
// a contiguous float32 tensor of agc_rows(p) factors on the params' device, with dim 0
// the outermost dim of p's memory, so that each row is one contiguous run).
inline void add_regularizer_lists(const char* op, at::TensorList params, at::TensorList agc_scales,
                                  at::TensorList grokfast_emas, NamedLists& lists,
                                  const char* first = "params", NamedLists* ema_lists = nullptr) {
  TORCH_CHECK(grokfast_emas.empty() || grokfast_emas.size() == params.size(), "catapult: ", op,
              ": grokfast_emas has ", grokfast_emas.size(), " tensors but ", first,
              " has ", params.size(), " (give none to switch Grokfast off)");
  if (!grokfast_emas.empty()) (ema_lists ? *ema_lists : lists).emplace_back("grokfast_emas", grokfast_emas);
  TORCH_CHECK(agc_scales.empty() || agc_scales.size() == params.size(), "catapult: ", op,
              ": agc_scales has ", agc_scales.size(), " tensors but ", first, " has ", params.size(),
              " (give none to switch AGC off)");
  for (size_t i = 0; i < agc_scales.size(); ++i) {
    const auto& a = agc_scales[i];
    const auto& p = params[i];
    TORCH_CHECK(a.scalar_type() == at::kFloat && a.dim() == 1 && a.is_contiguous(), "catapult: ",
                op, ": agc_scales[", i, "] must be a contiguous 1-D float32 tensor, got ",
                a.scalar_type(), " of shape ", a.sizes());
    TORCH_CHECK(a.numel() == agc_rows(p), "catapult: ", op, ": agc_scales[", i, "] has ",
                a.numel(), " factors but ", first, "[", i, "] has ", agc_rows(p), " rows");
    TORCH_CHECK(a.device() == p.device(), "catapult: ", op, ": agc_scales[", i, "] is on ",
                a.device(), " but ", first, "[", i, "] is on ", p.device());
    bool outer = true;  // dim 0 has the largest stride among dims of size > 1
    for (int64_t d = 1; d < p.dim(); ++d) {
      outer = outer && (p.size(0) == 1 || p.size(d) == 1 || p.stride(0) >= p.stride(d) * p.size(d));
    }
    TORCH_CHECK(outer, "catapult: ", op, ": ", first, "[", i, "] (strides ", p.strides(),
                ") does not keep its rows contiguous, as AGC needs");
  }
}

}  // namespace catapult
