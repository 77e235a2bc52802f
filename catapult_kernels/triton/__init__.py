"""Triton kernels of catapult_kernels, registered as torch.library.triton_op ops:

  catapult::multi_tensor_norm_triton   (multi_tensor_norm.py)
  catapult::adamw_triton_              (adamw.py)
  catapult::sgd_triton_                (sgd.py)
  catapult::lion_triton_               (lion.py)
  catapult::lamb_triton_               (lamb.py)

Importing this package registers them. They take the same arguments as the C++
ops of csrc/ops.cpp. The update ops share the grad pipeline and their launch
machinery (kernel_common.py). adamw.adamw_triton_eager, sgd.sgd_triton_eager,
lion.lion_triton_eager, lamb.lamb_triton_eager and
multi_tensor_norm.multi_tensor_norm_triton_eager do the same work without going
through torch.ops in plain eager calls (the dispatcher's Python layers cost
microseconds per tensor) and fall back to the ops under torch.compile/tracing.
CUDA tensors run compiled kernels; CPU tensors run under the Triton interpreter,
which must be switched on (TRITON_INTERPRET=1) before triton is first imported.
"""
try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "catapult_kernels.triton needs the triton package (pip install triton); "
        f"importing it failed: {e}") from e

import torch

if not hasattr(torch.library, "triton_op"):  # pragma: no cover
    raise ImportError(f"catapult_kernels.triton needs torch >= 2.6 (torch.library.triton_op); "
                      f"this is torch {torch.__version__}")

from . import multi_tensor_table  # noqa: E402,F401
from . import multi_tensor_norm  # noqa: E402,F401  (registers catapult::multi_tensor_norm_triton)
from . import kernel_common  # noqa: E402,F401
from . import adamw  # noqa: E402,F401  (registers catapult::adamw_triton_)
from . import sgd  # noqa: E402,F401  (registers catapult::sgd_triton_)
from . import lion  # noqa: E402,F401  (registers catapult::lion_triton_)
from . import lamb  # noqa: E402,F401  (registers catapult::lamb_triton_)

__all__ = ["multi_tensor_table", "kernel_common", "multi_tensor_norm", "adamw", "sgd", "lion", "lamb"]
