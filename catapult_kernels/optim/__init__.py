"""Drop-in optimizers: `from catapult_kernels.optim import AdamW`."""
from .adamw import AdamW
from .sgd import SGD

__all__ = ["AdamW", "SGD"]
