"""Dropout that draws its CPU masks several times faster than torch's, with the same distribution.

On a CPU, torch draws a dropout mask with one Mersenne-Twister number per element, one element after
the other. LoRA adapters make that expensive: peft applies `lora_dropout` to the input of every adapted
layer, each with its own mask (q, k and v too, though they read the same input), so a QLoRA step of
SmolLM2 with LoRA on every linear layer draws 210 masks per micro-batch. On 2 cores that took 19-30% of
a training step of recipes 01 and 02 (`benchmarks/cpu_efficiency.py`). `FastDropout` takes 32 random
bits per element from numpy's SFC64 generator (vectorised, several times faster) and keeps an element
when its bits are at or above p x 2**32, so an element is dropped with probability p to within 2**-33;
kept elements are scaled by 1 / (1 - p) as usual. Each call seeds SFC64 with a number drawn from
torch's generator, so `set_seed` and a resumed Trainer (which restores torch's RNG state) reproduce the
masks. For the backward pass it keeps the mask as booleans, one byte an element, where torch's keeps it in
the input's dtype (four bytes in fp32): 210 masks per micro-batch are a large share of the activations
a QLoRA step keeps. The scale is rounded to the input's dtype first, so the output and the gradient are
bit for bit those of multiplying by a mask in that dtype. On a GPU it is torch's own fused dropout.

Usage: from ftnb.dropout import use_fast_dropout
       model = get_peft_model(model, config); use_fast_dropout(model)   # before training
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn


def dropout_keep(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """A CPU bool tensor of `shape` whose elements are, independently, False with probability p (to
    within 2**-33): the elements dropout keeps.

    Usage: y = x * dropout_keep(x.shape, 0.05) / 0.95
    """
    count = int(np.prod(shape, dtype=np.int64))
    seed = int(torch.randint(0, 2**63 - 1, ()).item())  # from torch's generator: set_seed reproduces the mask
    words = np.random.SFC64(seed).random_raw((count + 1) // 2)  # 64 random bits each: two elements per word
    kept = words.view(np.int32)[:count] >= -(2**31) + round(p * 2**32)  # int32 bits are uniform over 2**32 values
    return torch.from_numpy(kept).view(shape)


@functools.cache
def _scale_in(dtype: torch.dtype, p: float) -> float:
    """1 / (1 - p) as a mask in `dtype` holds it (through fp32, as a float32 mask cast to it; bf16: 1.0547 for 0.05)."""
    return torch.tensor(1.0 / (1.0 - p), dtype=torch.float32).to(dtype).item()


def _keep_and_scale(x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """x * keep * scale. The mask is converted through uint8: torch converts a CPU bool tensor to a float
    type one element at a time, uint8 with vector instructions (a tenth of the time; the same numbers), and
    multiplying by the bool directly converts it the slow way (13% of the CPU time of a profiled bf16 training step of
    recipe 01; a step took 1.06x as long that way in `benchmarks/alternating_steps.py`)."""
    return x.mul(keep.view(torch.uint8).to(x.dtype)).mul_(scale)


class _KeepAndScale(torch.autograd.Function):
    """x * keep * scale, saving only the bool `keep` for the backward pass (the gradient is the same product)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return _keep_and_scale(x, keep, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return _keep_and_scale(grad, keep, ctx.scale), None, None


class FastDropout(nn.Dropout):
    """nn.Dropout whose CPU masks come from `dropout_keep`, kept for the backward pass as booleans;
    anywhere else, torch's dropout.

    Usage: layer.lora_dropout["default"] = FastDropout(0.05)
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p in (0.0, 1.0) or x.device.type != "cpu":
            return super().forward(x)
        return _KeepAndScale.apply(x, dropout_keep(x.shape, self.p), _scale_in(x.dtype, self.p))


def use_fast_dropout(model: nn.Module) -> int:
    """Replace every nn.Dropout in `model` (the adapters' `lora_dropout`, an encoder's own dropout) by a
    FastDropout with the same p; returns how many. Nothing saved changes: dropout has no weights.

    Usage: print(use_fast_dropout(peft_model), "dropout modules replaced")
    """
    replaced = 0
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:  # exactly: a subclass may do something else
                setattr(parent, name, FastDropout(child.p))
                replaced += 1
    return replaced
