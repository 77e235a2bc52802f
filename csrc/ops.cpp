// The one place where catapult's operator schemas are defined. Each backend
// (csrc/cpu, csrc/cuda) registers its kernels for these schemas with
// TORCH_LIBRARY_IMPL; the Triton kernels are separate ops (catapult::*_triton)
// registered from Python with torch.library.triton_op.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing catapult_kernels._C only runs the static registrations below and in
// the kernel files; the module itself is empty (the extension-cpp pattern).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(catapult, m) {
  // Norm of all tensors taken together (total, 0-d float32) and, if per_tensor,
  // the norm of each tensor (float32 [n]; else an empty tensor). ord is 2 or inf.
  // Deterministic: fixed-size chunks, per-chunk partials, fixed-order reduction.
  m.def("multi_tensor_norm(Tensor[] tensors, float ord, bool per_tensor) -> (Tensor, Tensor)");

  // One AdamW step (torch.optim.AdamW's formula, math in float32) over lists of
  // same-shaped tensors. state_steps hold the step count already incremented for
  // this step. Every grad is multiplied by a factor computed on the device:
  //   scale = grad_scale or 1;  clip = min(1, max_grad_norm / (grad_norm / scale + 1e-6))
  //   (clip = 1 when max_grad_norm <= 0);  g = grad * clip / scale
  // and nothing at all is written when found_inf is given and nonzero.
  // max_exp_avg_sqs is empty unless amsgrad.
  m.def(
      "adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor[] state_steps, "
      "Tensor lr, float beta1, float beta2, float eps, float weight_decay, bool amsgrad, "
      "bool maximize, Tensor? grad_norm, float max_grad_norm, Tensor? grad_scale, "
      "Tensor? found_inf) -> ()");

  // One SGD step (torch.optim.SGD's formula, math in float32), with the same grad
  // pipeline as adamw_ (grad_norm / max_grad_norm / grad_scale / found_inf). With
  // momentum == 0, momentum_buffers is empty and only params are written (12 B/param);
  // else first_step says the buffers are new: they are set to the step's grad
  // (torch's first step) instead of updated.
  m.def(
      "sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor lr, "
      "float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, "
      "bool first_step, Tensor? grad_norm, float max_grad_norm, Tensor? grad_scale, "
      "Tensor? found_inf) -> ()");
}
