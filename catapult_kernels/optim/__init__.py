"""Drop-in optimizers: `from catapult_kernels.optim import AdamW`."""
from .adamw import AdamW

__all__ = ["AdamW"]
