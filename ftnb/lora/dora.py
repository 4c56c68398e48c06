"""DoRA, weight-decomposed LoRA (Liu et al., 2024): the counterpart of peft's `tuners/lora/dora.py`.

DoRA writes the adapted weight as a magnitude times a direction:

    W' = m * (W + dW) / ||W + dW||        (norms per output row, dW = scaling * B A)

m (one number per output) trains next to A and B, so the update can change how long each
row of W is separately from where it points. Computed without forming W', as peft does:

    y = W x + b + (m / ||W + dW|| - 1) * W x + m / ||W + dW|| * scaling * B A x

The norm needs W itself in every forward pass: on a 4-bit base that means de-quantizing every
adapted weight at every step, DoRA's extra cost over LoRA.

Usage:
    layer = DoraLinear(nn.Linear(64, 32), r=8, alpha=16)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ftnb.lora.layer import LoraLinear, float_weight


def dequantized_weight(base_layer: nn.Module) -> torch.Tensor:
    """The base weight in floating point: a bitsandbytes 4-bit weight is de-quantized (a new
    tensor each call); a float weight is returned as is."""
    weight = base_layer.weight
    if type(weight).__name__ == "Params4bit":
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    if type(weight).__name__ == "Int8Params":
        raise ValueError("DoRA on an 8-bit (LLM.int8) base is not supported: load the base in 4-bit "
                         "(quantization='nf4') or in floating point, or use plain LoRA (use_dora=False).")
    return weight


class DoraLinear(LoraLinear):
    """LoraLinear plus a trainable magnitude per output row.

    Usage: DoraLinear(model.model.layers[0].self_attn.q_proj, r=8, alpha=16)"""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False) -> None:
        super().__init__(base_layer, r, alpha, dropout, use_rslora)
        # m starts as ||W|| (B = 0), so m / ||W + dW|| = 1 and the model starts as the base model.
        weight = dequantized_weight(base_layer).to(self.lora_A.dtype)
        self.magnitude = nn.Parameter(self.weight_norm(weight))

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """||W + dW|| per output row, detached: the DoRA paper (section 4.3) treats the norm as a
        constant in backpropagation, which saves the memory of its graph at little cost in accuracy."""
        return torch.linalg.norm(weight + self.delta_weight().detach(), dim=1).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        x = x.to(self.lora_A.dtype)
        weight = dequantized_weight(self.base_layer).to(x.dtype)
        rescale = (self.magnitude / self.weight_norm(weight)).view(1, -1)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            bias = self.base_layer.bias
            base_result = result if bias is None else result - bias  # W x, reused from the base output
        else:
            # With dropout the direction must see the same dropped input as the adapter.
            x = self.dropout(x)
            base_result = F.linear(x, weight)
        lora_result = F.linear(F.linear(x, self.lora_A), self.lora_B)
        dora_update = (rescale - 1) * base_result + rescale * lora_result * self.scaling
        return result + dora_update.to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W = m * (W + dW) / ||W + dW||. The norm is kept: unmerge cannot recompute it from W'."""
        if self.merged:
            return
        weight = float_weight(self.base_layer)
        delta = self.delta_weight()
        self.merged_norm = self.weight_norm(weight)
        rescale = (self.magnitude / self.merged_norm).view(-1, 1)
        weight.copy_(rescale * (weight + delta))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W = W' * ||W + dW|| / m - dW: back to the base weight, up to float round-off."""
        if not self.merged:
            return
        weight = float_weight(self.base_layer)
        rescale = (self.magnitude / self.merged_norm).view(-1, 1)
        weight.copy_(weight / rescale - self.delta_weight())
        del self.merged_norm
        self.merged = False
