"""One LoRA layer, written out: the counterpart of class `Linear` in peft's `tuners/lora/layer.py`.

A frozen linear layer computes y = W x + b. LoRA (Hu et al., 2021) learns a low-rank update
dW = B A, with A of shape (r, in) and B of shape (out, r), r much smaller than in and out, and computes

    y = W x + b + scaling * B (A dropout(x))

Only A and B train: r * (in + out) numbers instead of in * out. W stays as loaded, so it may be
stored in 4 or 8 bits (QLoRA); the adapter computes in floating point next to it.

Usage:
    layer = LoraLinear(nn.Linear(64, 32), r=8, alpha=16)
    layer(torch.randn(2, 64))   # equals the base layer's output until B is trained
    layer.merge()               # W += scaling * B @ A: a plain linear layer again, no extra cost
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZED_WEIGHTS = ("Params4bit", "Int8Params")  # bitsandbytes' 4-bit and 8-bit weight classes


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """The factor on B A x. Usage: lora_scaling(8, 16)  # 2.0"""
    # Why divide by r: each of A x's r entries has the scale of a linear layer's output, so B A x
    # sums r terms and grows with r. Dividing by r keeps the update's size, and with it the
    # learning rate that works, about the same when you change r. rsLoRA (Kalajdzievski, 2023)
    # shows 1/r over-corrects: with alpha / r a large rank learns more slowly and ends up no
    # better than a small one; alpha / sqrt(r) keeps learning stable as r grows.
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def float_weight(base_layer: nn.Module) -> nn.Parameter:
    """The base layer's weight, or a clear error if it is quantized and cannot take a merge."""
    weight = base_layer.weight
    if type(weight).__name__ in QUANTIZED_WEIGHTS:
        raise ValueError(
            f"Cannot merge an adapter into a {type(base_layer).__name__} layer: its weight is stored "
            "quantized (bitsandbytes 4-bit or 8-bit). W + scaling * B @ A falls between the "
            "quantization levels, and rounding it back to them would erase most of the update (a "
            "LoRA update is usually smaller than one quantization step). Keep the adapter separate "
            "(base + adapter at inference), or load the base in floating point "
            "(load_model(..., quantization='none')), load_adapter the saved adapter into it and merge there.")
    return weight


class LoraLinear(nn.Module):
    """A linear layer (nn.Linear, bitsandbytes Linear4bit or Linear8bitLt) plus a trainable
    low-rank update. Usage: LoraLinear(model.model.layers[0].self_attn.q_proj, r=8, alpha=16)"""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r, self.alpha = r, alpha
        self.scaling = lora_scaling(r, alpha, use_rslora)
        # Dropout on the adapter's input only: it regularises the update, not the frozen model.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base_layer.weight.device
        # A random, B zero, so B A = 0 and the wrapped model starts exactly as the base model:
        # step 0 is the pre-trained model, and training moves away from it gradually. Not both
        # zero: dL/dB = scaling * g (A x)^T needs A x != 0. At step 0, dL/dA = scaling * B^T g x^T
        # is zero, so B moves first and A follows.
        self.lora_A = nn.Parameter(torch.empty(r, base_layer.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, r, device=device))
        # nn.Linear's own initialisation (and peft's): A x has the scale of a linear layer's output.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        # The adapter computes in its own dtype (fp32 unless cast), whatever the base computes in.
        x = x.to(self.lora_A.dtype)
        # B (A x), never (B A) x: the small r-dimensional product avoids forming an out x in matrix.
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling
        return result + update.to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """dW = scaling * B @ A, the shape of the base weight (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """W += dW: the layer computes as one linear layer again (float bases only)."""
        if self.merged:
            return
        weight = float_weight(self.base_layer)
        weight += self.delta_weight().to(weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W -= dW: back to the base weight (up to float round-off) and a separate adapter."""
        if not self.merged:
            return
        weight = float_weight(self.base_layer)
        weight -= self.delta_weight().to(weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, merged={self.merged}"
