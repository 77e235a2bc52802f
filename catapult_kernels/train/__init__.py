"""The thin trainer for wide networks at high learning rates: catapult-train on the command
line, or from Python:

    from catapult_kernels.train import fit
    summary = fit(model, optimizer, (x_train, y_train), (x_val, y_val), loss="mse", steps=1000,
                  sharpness_every=50, out="runs/mine")

`run(TrainConfig(...))` trains a built-in task and model from a config, as the CLI does."""
from .config import LearningRate, TrainConfig
from .experiment import run
from .loop import Trainer, fit, mse_loss
from .sharpness import top_hessian_eigenvalue
from .sweep import sweep

__all__ = ["LearningRate", "TrainConfig", "Trainer", "fit", "mse_loss", "run", "sweep", "top_hessian_eigenvalue"]
