"""Drop-in optimizers: `from catapult_kernels.optim import AdamW`. Every one takes
max_grad_norm, skip_nonfinite, grokfast, agc, backend, flat, state_dtype, master_weights and
rounding_seed (see base.FusedOptimizer). torch_state_dict turns
a state_dict of theirs into one torch.optim loads."""
from .adam import Adam, AdamW
from .adan import Adan
from .adopt import ADOPT
from .lamb import LAMB
from .lars import LARS
from .lion import Lion
from .muon import Muon, muon_param_groups
from .sgd import SGD
from .state_storage import torch_state_dict

# The optimizers (the trainer offers each); muon_param_groups is importable from here too.
__all__ = ["ADOPT", "Adam", "AdamW", "Adan", "LAMB", "LARS", "Lion", "Muon", "SGD"]
