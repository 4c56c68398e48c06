"""Attention over packed rows, one example at a time.

Padding-free batching (TRL's `packing=True`) concatenates a batch's examples into one row and restarts
the position ids at each example. transformers keeps the examples apart with a block-diagonal mask, and
where no variable-length kernel reads the restarts (a CPU's "sdpa" and "eager") it then computes
attention over the whole row: every query against every key of the row, the other examples' and the
future ones' included, only to mask them away. A row of three 200-token examples costs 600 x 600
scores where the examples need 3 x 200 x 201 / 2, six times fewer. `by_sequence(kernel)` is an
attention implementation that splits such a row at its restarts and runs `kernel` ("sdpa" or "eager")
causally on each example; any other input (padded batches, decoding with a cache) goes to `kernel`
unchanged, with its mask. The arithmetic per example is the kernel's own, so outputs and gradients
equal the block-mask path's to rounding (`tests/test_attention.py`).

Usage:
    from ftnb.attention import by_sequence
    model.set_attn_implementation(by_sequence("sdpa"))   # or ftnb.models.training_attention, which picks
"""
from __future__ import annotations

import sys
from typing import Callable

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

PREFIX = "ftnb_by_sequence_"
KERNELS = ("sdpa", "eager")


def by_sequence(kernel: str) -> str:
    """Register (once) and return the name of the implementation attending packed rows per example with
    `kernel`, one of KERNELS; pass the name to `model.set_attn_implementation`.

    Usage: model.set_attn_implementation(by_sequence("eager"))
    """
    if kernel not in KERNELS:
        raise ValueError(f"by_sequence wraps one of {KERNELS}, not {kernel!r}")
    name = PREFIX + kernel
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _attention_by_sequence(kernel))
        # the kernel's own mask: what the input needs where it is not a packed row (unused where it is)
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[kernel])
    return name


def packed_sequences(position_ids: torch.Tensor | None, query: torch.Tensor,
                     key: torch.Tensor) -> list[tuple[int, int]] | None:
    """(start, end) of each example in a packed row: one row whose position ids restart at 0 more than
    once, attending to itself alone (no cache). None for anything else.

    Usage: packed_sequences(torch.tensor([[0, 1, 2, 0, 1]]), q, k) == [(0, 3), (3, 5)]
    """
    if position_ids is None or query.shape[0] != 1 or query.shape[2] != key.shape[2] \
            or position_ids.shape != (1, query.shape[2]):
        return None
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if len(starts) < 2 or starts[0] != 0:
        return None
    return list(zip(starts, starts[1:] + [query.shape[2]]))


def _kernel(module: torch.nn.Module, kernel: str) -> Callable:
    """transformers' attention function `kernel` for this attention module (eager is the model's own)."""
    if kernel != "eager":
        return ALL_ATTENTION_FUNCTIONS[kernel]
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise NotImplementedError(f"{type(module).__name__}'s module has no eager_attention_forward: "
                                  f"attend with {PREFIX}sdpa or the model's own implementation")
    return eager


def _causal_mask(length: int, like: torch.Tensor, kernel: str) -> torch.Tensor | None:
    """One example's causal mask as `kernel` takes it: none for sdpa (its causal flag), additive for eager."""
    if kernel == "sdpa":
        return None
    future = torch.ones(length, length, dtype=torch.bool, device=like.device).triu(1)
    return torch.zeros(length, length, dtype=like.dtype, device=like.device).masked_fill(
        future, torch.finfo(like.dtype).min)[None, None]


def _attention_by_sequence(kernel: str) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        attend = _kernel(module, kernel)
        spans = packed_sequences(kwargs.get("position_ids"), query, key)
        if spans is None:
            return attend(module, query, key, value, attention_mask, **kwargs)
        outputs = [attend(module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                          _causal_mask(end - start, query, kernel), **kwargs)[0] for start, end in spans]
        return torch.cat(outputs, dim=1), None  # (batch, tokens, heads, head_dim), as the kernels return
    return attention
