// The one place where catapult's operator schemas are defined. Each backend
// (csrc/cpu, csrc/cuda) registers its kernels for these schemas with
// TORCH_LIBRARY_IMPL; the Triton kernels are separate ops (catapult::*_triton)
// registered from Python with torch.library.triton_op.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "update_op.h"

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

  // The update ops share one grad pipeline (csrc/grad_pipeline.h), whose arguments end
  // every update op's schema (kPipelineSchema, update_op.h), applied to every grad element
  // in this order, before the optimizer's own weight decay and update:
  //   1. unscale and global clip: g = grad * mult, mult = min(1, max_grad_norm /
  //      (grad_norm / scale + 1e-6)) / scale  (scale = grad_scale or 1; no clip when
  //      max_grad_norm <= 0);
  //   2. AGC: g *= agc_scales[i][row] (row = the element's index along dim 0 for params of
  //      2+ dims, else 0; the factors min(1, agc * max(|w_row|, 1e-3) / |g_row|) are
  //      computed beforehand from row norms; agc_scales empty = off);
  //   3. Grokfast EMA: ema = alpha * ema + (1 - alpha) * g; g = g + lamb * ema
  //      (grokfast_emas empty = off; alpha = 0 starts a new ema at the grad);
  //   4. maximize: g = -g.
  // Nothing at all is written (step counts included) when skip is given and nonzero: the
  // flag of GradScaler's found_inf and of skip_nonfinite. Math in float32. state_steps
  // hold the steps taken before this one; the op counts this one (t = step + 1), writing t.
  //
  // The elementwise update ops (adamw_, sgd_, lion_, adopt_, adan_, grad_pipeline_) are
  // each defined by their spec, csrc/optimizers/<name>.h (schema and math); see update_op.h.

  // One LAMB step (You et al. 2019), two passes inside the op. Pass 1, per element: the
  // grad pipeline, m = beta1 * m + (1 - beta1) * g, v = beta2 * v + (1 - beta2) * g^2,
  // r = (m / bc1) / (sqrt(v / bc2) + eps) + weight_decay * p (bc = 1 - beta^step when
  // bias_correction, else 1), and per tensor |r| and |p|. Then per tensor
  // trust = |w| / |r| with |w| = min(|p|, max_weight_norm) when max_weight_norm > 0, and
  // trust = 1 where |w| or |r| is 0. Pass 2: p = p - lr * trust * r with pass 1's r bit
  // for bit (float32 recomputes it from the stored m, v; 16-bit types, whose stored
  // moments are rounded, rerun pass 1's math and store m, v in pass 2). Norms are
  // deterministic (fixed chunks and reduction order).
  m.def((std::string("lamb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
                     "Tensor(c!)[] exp_avg_sqs, Tensor(s!)[] state_steps, Tensor lr, float beta1, "
                     "float beta2, float eps, float weight_decay, bool bias_correction, "
                     "float max_weight_norm, ") +
         catapult::kPipelineSchema + ", " + catapult::kStorageSchema + ", " + catapult::kMasterSchema + ") -> ()")
            .c_str());
}
