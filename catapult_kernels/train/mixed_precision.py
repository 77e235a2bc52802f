"""--amp bf16|fp16: the training step's forward pass under torch.autocast on the run's
device, its loss computed in float32 from the outputs made float32; the params, grads and
optimizer state stay float32. fp16 also scales the loss with a torch.amp.GradScaler, whose
state goes into every checkpoint, so that a resumed run continues exactly.

catapult's optimizers take GradScaler's scale and found_inf themselves
(_step_supports_amp_scaling): the kernels unscale on the fly and skip a step whose grads
overflowed, and .grad keeps the scaled grads. torch's own optimizers get .grad unscaled by
the scaler. The sharpness is never measured under autocast (the trainer calls the model
outside of it)."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    """The step's precision: amp None or "none" (float32 throughout), "bf16" or "fp16"."""

    def __init__(self, amp: Optional[str], device: torch.device):
        amp = amp or "none"
        if amp != "none" and amp not in DTYPES:
            raise ValueError(f"unknown amp {amp!r}; choose one of: none, {', '.join(DTYPES)}")
        self.device = torch.device(device)
        if amp == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"--amp bf16: {torch.cuda.get_device_name(self.device)} has no bfloat16; use --amp fp16")
        self.dtype = DTYPES.get(amp)
        self.scaler = torch.amp.GradScaler(self.device.type) if amp == "fp16" else None
        self._grads_scale: Optional[torch.Tensor] = None  # the loss scale .grad carries, if any

    @property
    def active(self) -> bool:
        return self.dtype is not None

    def autocast(self):
        """The context of a forward pass (training and evaluation alike)."""
        if not self.active:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def float32(self, out: torch.Tensor) -> torch.Tensor:
        """The outputs the loss is computed from: float32 under autocast, else as they are."""
        return out.float() if self.active and out.is_floating_point() else out

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is None:
            loss.backward()
            return
        self._grads_scale = self.scaler.scale(torch.ones((), device=loss.device))  # a copy: update() changes the scale
        self.scaler.scale(loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """.grad unscaled in place, before anything that reads it as the grad (clip_grad_norm_)."""
        if self.scaler is not None and self._grads_scale is not None:
            self.scaler.unscale_(optimizer)
            self._grads_scale = None

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """optimizer.step(), through the scaler under fp16 (a step with inf or nan grads is skipped)."""
        if self.scaler is None:
            optimizer.step()
            return
        if not getattr(optimizer, "_step_supports_amp_scaling", False):
            self._grads_scale = None  # GradScaler unscales .grad for an optimizer that cannot take the scale
        self.scaler.step(optimizer)
        self.scaler.update()

    def grad_norm(self, norm: float) -> float:
        """A norm of .grad as it is now, as a norm of the grads: divided by the loss scale .grad
        still carries (none after unscale_ or a step of torch's own optimizers)."""
        return norm if self._grads_scale is None else norm / float(self._grads_scale)

    def state_dict(self) -> Optional[dict]:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: Optional[dict]) -> None:
        if (state is None) != (self.scaler is None):
            raise ValueError("the checkpoint's GradScaler state does not match --amp: resume with the --amp it ran with")
        if state is not None:
            self.scaler.load_state_dict(state)
