"""Talk to a model the way it was trained: through its chat template.

Usage:
    from ftnb.inference import chat
    chat(model, tok, "What is LoRA?", max_new_tokens=64)
"""
from __future__ import annotations

from typing import Sequence

import torch


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int,
             device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists padded on the left to one width, and their attention mask (0 on padding).
    Left, because a decoder continues every row from its last position.

    Usage: ids, mask = left_pad([[1, 2, 3], [4]], tokenizer.pad_token_id)  # ids[1] == [pad, pad, 4]
    """
    width = max(len(s) for s in sequences)
    ids = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in sequences], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences], device=device)
    return ids, mask


@torch.no_grad()
def target_nll(model, pad_id: int, sequences: Sequence[Sequence[int]], target_lengths: Sequence[int]) -> list[float]:
    """Per sequence: the summed negative log-likelihood of its last `target_lengths[i]` tokens given
    the tokens before them (teacher forcing), all rows in one left-padded forward pass.

    Left padding ends every target at the last position, so the model computes full-vocabulary logits
    for the last (longest target + 1) positions only (`logits_to_keep`), never for the prompts; position
    ids follow the mask, so padding shifts no row.

    Usage: target_nll(model, tok.pad_token_id, [prompt + answer], [len(answer)])  # [nll of the answer]
    """
    ids, mask = left_pad(sequences, pad_id, model.device)
    keep = max(target_lengths) + 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
    nll = []
    for row, length in enumerate(target_lengths):
        # the row's last `length` tokens are its target; the logits one position earlier predict them
        predicted, target = logits[row, keep - 1 - length:-1].float(), ids[row, ids.shape[1] - length:]
        nll.append(float(torch.nn.functional.cross_entropy(predicted, target, reduction="sum")) if length else 0.0)
    return nll


def chat_inputs(tokenizer, prompt: str | list[dict], device: torch.device | str = "cpu") -> dict:
    """Token ids for a user prompt (or a list of messages) plus the assistant header,
    exactly as the chat template lays them out."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    return {k: v.to(device) for k, v in inputs.items()}


@torch.no_grad()
def chat(model, tokenizer, prompt: str | list[dict], max_new_tokens: int = 128, **generation_kwargs) -> str:
    """The assistant's reply (greedy unless you pass do_sample=True)."""
    inputs = chat_inputs(tokenizer, prompt, model.device)
    generation_kwargs.setdefault("do_sample", False)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens,
                            pad_token_id=tokenizer.pad_token_id, **generation_kwargs)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

