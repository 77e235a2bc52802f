"""Triton kernels of catapult_kernels, registered as torch.library.triton_op ops:

  catapult::multi_tensor_norm_triton   (multi_tensor_norm.py)
  catapult::<base>_triton_             the Triton twin of each C++ update op <base>_
                                       (adamw_triton_, sgd_triton_, lion_triton_, adopt_triton_,
                                       adan_triton_, grad_pipeline_triton_, lamb_triton_)

Importing this package registers them. An update op's twin takes the C++ op's schema
(csrc/update_op.h) and is registered by one helper (op_registration.py). The
elementwise ones run one generic kernel (elementwise_update.py) with the op's math from
its module in optimizers/ (found by the op's name: a new optimizer is one module
there); lamb_triton_ is its own two-pass kernel (lamb.py). All share the grad pipeline
and the launch machinery (kernel_common.py, multi_tensor_table.py).
gram.gram(x) is x @ x.mT from the upper-triangle tiles only (Muon's Newton-Schulz), a
plain function, not an op.

KERNELS[name] (by the C++ op's name: "multi_tensor_norm", "adamw_", ...) do the same
work as the ops without going through torch.ops in plain eager calls (the dispatcher's
Python layers cost microseconds per tensor) and fall back to the ops under
torch.compile/tracing.
CUDA tensors run compiled kernels; CPU tensors run under the Triton interpreter,
which must be switched on (TRITON_INTERPRET=1) before triton is first imported.
The update ops exist only where the C++ extension is built (their schemas are its ops').
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
from . import op_registration  # noqa: E402,F401
from . import elementwise_update  # noqa: E402,F401
from . import lamb  # noqa: E402,F401
from . import gram  # noqa: E402,F401
from ..op_contract import UPDATE_OPS  # noqa: E402

# The eager entry points of the Triton ops, by the name of the C++ op they twin (ops.kernel's
# table for backend='triton'): the norm, each update op with a module optimizers/<base>.py, lamb_.
KERNELS = {"multi_tensor_norm": multi_tensor_norm.multi_tensor_norm_triton_eager,
           **elementwise_update.register_elementwise_ops(UPDATE_OPS)}
if "lamb_" in UPDATE_OPS:
    KERNELS["lamb_"] = lamb.register()

__all__ = ["multi_tensor_table", "kernel_common", "multi_tensor_norm", "op_registration", "elementwise_update",
           "lamb", "gram", "KERNELS"]
