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

// Every op takes all its tensor arguments (lists, lr, the control scalars) on one device.
// The fake kernels (catapult_kernels/ops.py) refuse a mix too: a meta tensor among real
// ones sends the whole call to them (the dispatcher ranks Meta above CPU and CUDA).
TORCH_LIBRARY(catapult, m) {
  // Norm of all tensors taken together (total, 0-d float32) and, if per_tensor,
  // the norm of each tensor (float32 [n]; else an empty tensor). ord is 2 or inf.
  // Deterministic: fixed-size chunks, per-chunk partials, fixed-order reduction.
  m.def("multi_tensor_norm(Tensor[] tensors, float ord, bool per_tensor) -> (Tensor, Tensor)");

  // The update ops below share one grad pipeline (csrc/grad_pipeline.h), applied to
  // every grad element in this order, before the optimizer's own weight decay and update:
  //   1. unscale and global clip: g = grad * mult, mult = min(1, max_grad_norm /
  //      (grad_norm / scale + 1e-6)) / scale  (scale = grad_scale or 1; no clip when
  //      max_grad_norm <= 0);
  //   2. AGC: g *= agc_scales[i][row] (row = the element's index along dim 0 for params of
  //      2+ dims, else 0; the factors min(1, agc * max(|w_row|, 1e-3) / |g_row|) are
  //      computed beforehand from row norms; agc_scales empty = off);
  //   3. Grokfast EMA: ema = alpha * ema + (1 - alpha) * g; g = g + lamb * ema
  //      (grokfast_emas empty = off; alpha = 0 starts a new ema at the grad);
  //   4. maximize: g = -g.
  // Nothing at all is written when found_inf is given and nonzero. Math in float32.
  // The tail "grad_norm .. grokfast_lamb" is the same on every update op.

  // One Adam/AdamW step (torch.optim.AdamW's formula; with decoupled_weight_decay false,
  // torch.optim.Adam's coupled L2: g = g + weight_decay * p) over lists of same-shaped
  // tensors. state_steps hold the step count already incremented for this step.
  // max_exp_avg_sqs is empty unless amsgrad.
  m.def(
      "adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor[] state_steps, "
      "Tensor lr, float beta1, float beta2, float eps, float weight_decay, "
      "bool decoupled_weight_decay, bool amsgrad, bool maximize, Tensor? grad_norm, "
      "float max_grad_norm, Tensor? grad_scale, Tensor? found_inf, Tensor[] agc_scales, "
      "Tensor(e!)[] grokfast_emas, float grokfast_alpha, float grokfast_lamb) -> ()");

  // One SGD step (torch.optim.SGD's formula). With momentum == 0, momentum_buffers is
  // empty and only params are written (12 B/param without the regularizers); else
  // first_step says the buffers are new: they are set to the step's grad (torch's first
  // step) instead of updated. trust_ratios (LARS; float32 [len(params)] or None)
  // multiplies param i's grad after the weight decay term: g = trust[i] * (g + wd * p).
  m.def(
      "sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor lr, "
      "float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, "
      "bool first_step, Tensor? trust_ratios, Tensor? grad_norm, float max_grad_norm, "
      "Tensor? grad_scale, Tensor? found_inf, Tensor[] agc_scales, Tensor(e!)[] grokfast_emas, "
      "float grokfast_alpha, float grokfast_lamb) -> ()");

  // One Lion step (Chen et al. 2023): p = p * (1 - lr * wd); p = p - lr * sign(beta1 * m +
  // (1 - beta1) * g); m = beta2 * m + (1 - beta2) * g.
  m.def(
      "lion_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor lr, "
      "float beta1, float beta2, float weight_decay, bool maximize, Tensor? grad_norm, "
      "float max_grad_norm, Tensor? grad_scale, Tensor? found_inf, Tensor[] agc_scales, "
      "Tensor(e!)[] grokfast_emas, float grokfast_alpha, float grokfast_lamb) -> ()");

  // One LAMB step (You et al. 2019), two passes inside the op. Pass 1, per element: the
  // grad pipeline, m = beta1 * m + (1 - beta1) * g, v = beta2 * v + (1 - beta2) * g^2,
  // r = (m / bc1) / (sqrt(v / bc2) + eps) + weight_decay * p (bc = 1 - beta^step when
  // bias_correction, else 1), and per tensor |r| and |p|. Then per tensor
  // trust = |w| / |r| with |w| = min(|p|, max_weight_norm) when max_weight_norm > 0, and
  // trust = 1 where |w| or |r| is 0. Pass 2: p = p - lr * trust * r with pass 1's r bit
  // for bit (float32 recomputes it from the stored m, v; 16-bit types, whose stored
  // moments are rounded, rerun pass 1's math and store m, v in pass 2). Norms are
  // deterministic (fixed chunks and reduction order).
  m.def(
      "lamb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor[] state_steps, Tensor lr, float beta1, float beta2, "
      "float eps, float weight_decay, bool bias_correction, float max_weight_norm, "
      "bool maximize, Tensor? grad_norm, float max_grad_norm, Tensor? grad_scale, "
      "Tensor? found_inf, Tensor[] agc_scales, Tensor(e!)[] grokfast_emas, "
      "float grokfast_alpha, float grokfast_lamb) -> ()");
}
