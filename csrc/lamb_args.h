// Everything catapult::lamb_ checks, on every backend, before it writes anything: its
// lists, its step control, its state storage (m, v and the Grokfast EMAs stored alike,
// state_storage.h) and its master weights (master_weights.h).
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

#include "update_op.h"

namespace catapult {

inline CallStorage check_lamb_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                   at::TensorList exp_avg_sqs, at::TensorList state_steps, const at::Tensor& lr,
                                   const std::optional<at::Tensor>& grad_norm, double max_grad_norm,
                                   const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& skip,
                                   at::TensorList agc_scales, at::TensorList grokfast_emas,
                                   at::TensorList state_scales, at::TensorList master_weights,
                                   const at::Device& device) {
  NamedLists lists{{"grads", grads}};
  NamedLists stored{{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}};
  add_regularizer_lists("lamb_", params, agc_scales, grokfast_emas, lists, "params", &stored);
  check_update_lists(params, lists, state_steps);
  check_step_control("lamb_", params, lr, grad_norm, max_grad_norm, grad_scale, skip, device);
  const bool int8 = check_storage_lists("lamb_", params, stored, state_scales);
  return {int8, check_master_weights("lamb_", params, master_weights)};
}

}  // namespace catapult
