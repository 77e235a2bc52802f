"""catapult_kernels: fused optimizer kernels (CPU C++, CUDA C++, Triton) as PyTorch ops,
drop-in optimizers, and tools for wide networks trained at high learning rates."""
from . import ops
from .clip import clip_grad_norm_

__all__ = ["ops", "clip_grad_norm_"]
__version__ = "0.1.0"
