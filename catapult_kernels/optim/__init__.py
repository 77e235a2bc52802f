"""Drop-in optimizers: `from catapult_kernels.optim import AdamW`. Every one takes
max_grad_norm, skip_nonfinite, grokfast, agc and backend (see base.FusedOptimizer)."""
from .adam import Adam, AdamW
from .adan import Adan
from .adopt import ADOPT
from .lamb import LAMB
from .lars import LARS
from .lion import Lion
from .sgd import SGD

__all__ = ["ADOPT", "Adam", "AdamW", "Adan", "LAMB", "LARS", "Lion", "SGD"]
