"""Mixed precision and speed switches for the training loop, as timm's train.py runs them.

`amp`: none | bf16 | fp16. The forward pass and the loss run under `torch.autocast` (timm `amp_autocast`);
backward, gradient clipping and the optimiser step run outside it, with a `torch.amp.GradScaler` for fp16 only
(bf16 has float32's exponent range). Everything after the step (UVC's dual and count updates, the MACs and
latency arithmetic in `UVCPrimalDual.step`, EMA) runs outside the autocast region, on float32 parameters.
`channels_last` puts the patch-embedding convolution's input in NHWC; `compile` wraps a module in
`torch.compile` (opt-in: the first steps pay the compilation).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

from uvclab.errors import UvclabError

AMP_MODES = ("none", "bf16", "fp16")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_amp(amp: str) -> None:
    if amp not in AMP_MODES:
        raise UvclabError(f"amp='{amp}' is not one of {AMP_MODES} (bf16 on recent GPUs and CPUs; fp16 adds a "
                          "gradient scaler).")


def autocast(amp: str, device) -> contextlib.AbstractContextManager:
    """The autocast context for forward + loss (a no-op context for amp='none')."""
    check_amp(amp)
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=AMP_DTYPES[amp])


def maybe_compile(module: torch.nn.Module, compile: bool) -> torch.nn.Module:
    """`torch.compile(module)` when asked (the returned wrapper shares the module's parameters)."""
    return torch.compile(module) if compile else module


class TrainStep:
    """One optimisation step with the precision settings: `loss(loss_fn, x, y)` then `update(loss, ...)`.

    loss: channels-last input (if on), forward + loss under autocast, the loss as float32.
    update: zero_grad, backward (scaled for fp16), unscale, clip, optimiser step, scaler update.
    The GradScaler's state is checkpointed with `state_dict` (empty without fp16)."""

    def __init__(self, amp: str = "none", device="cpu", channels_last: bool = False):
        check_amp(amp)
        self.amp, self.device, self.channels_last = amp, torch.device(device), channels_last
        self.scaler = torch.amp.GradScaler(self.device.type) if amp == "fp16" else None

    def loss(self, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.amp, self.device):
            loss = loss_fn(x, y)
        return loss.float()

    def update(self, loss: torch.Tensor, model: torch.nn.Module, opt: torch.optim.Optimizer,
               clip_grad: Optional[float]) -> None:
        opt.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            if clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            opt.step()
            return
        self.scaler.scale(loss).backward()
        if clip_grad is not None:
            self.scaler.unscale_(opt)  # clip the true gradients
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        self.scaler.step(opt)  # skipped when the scaled gradients overflowed
        self.scaler.update()

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def prepare_model(model: torch.nn.Module, channels_last: bool) -> torch.nn.Module:
    """Channels-last weights for the convolutions (in place; ViTs: the patch embedding)."""
    return model.to(memory_format=torch.channels_last) if channels_last else model
