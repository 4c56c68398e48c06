"""Combining LoRA adapters on one base with peft's `add_weighted_adapter`, and measuring what a
combination computes against what it looks like it computes.

An adapter changes each adapted weight by its update ΔW = B A · scaling. The combination users
usually want is the weighted sum of updates, Σ w_i ΔW_i. peft's combination types differ:
    cat           stacks the A's (each times w_i · scaling_i) and the B's: rank Σ r_i, and exactly Σ w_i ΔW_i
    linear        one rank-r adapter from the weighted sums of the A's and of the B's (√(w_i s_i) each):
                  (Σ √(w_i s_i) B_i)(Σ ±√(w_j s_j) A_j), the weighted sum plus cross terms B_i A_j (i ≠ j)
    svd           Σ w_i ΔW_i, then its best rank-`svd_rank` approximation (default: the largest r_i)
    ties, dare_linear, dare_ties, magnitude_prune
                  trim (keep a `density` share of the entries), resolve signs or rescale, then sum:
                  applied to A's and B's separately, like linear (their *_svd variants act on ΔW)
`sum_error` puts a number on the difference for every module.

Usage:
    from ftnb import combine
    combine.combine(peft_model, ["legal", "medical", "technical"], [1.0, 1.0, 1.0], "cat", name="all_cat")
    combine.sum_error(peft_model, "all_cat", ["legal", "medical", "technical"], [1.0, 1.0, 1.0]).max_abs  # ~1e-8
    peft_model.set_adapter("all_cat")
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

# peft 0.21's combination types, and those of them that trim to a `density`
COMBINATION_TYPES = ("cat", "linear", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                     "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
NEEDS_DENSITY = tuple(t for t in COMBINATION_TYPES if t.startswith(("ties", "dare", "magnitude")))


@dataclass(frozen=True)
class SumError:
    """How far a combined adapter's updates are from the weighted sum of its parts' updates:
    `max_abs` the largest entry of |ΔW_combined - Σ w_i ΔW_i| over every module, `relative` the
    largest ratio ||ΔW_combined - Σ w_i ΔW_i|| / ||Σ w_i ΔW_i|| (Frobenius norms) over the modules."""

    max_abs: float
    relative: float


def lora_modules(model) -> dict[str, torch.nn.Module]:
    """Every module that carries LoRA adapters, by name. Usage: list(lora_modules(peft_model))[:3]"""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def update(model, adapter: str, module: str | torch.nn.Module) -> torch.Tensor:
    """The adapter's update ΔW = B A · scaling of one module (a name from `lora_modules`, or the
    module), in fp32 and shaped like the module's weight; zeros where the adapter leaves it alone.

    Usage: update(peft_model, "legal", "base_model.model.model.layers.0.self_attn.q_proj").norm()
    """
    layer = lora_modules(model)[module] if isinstance(module, str) else module
    if adapter not in layer.lora_A:
        return torch.zeros(layer.out_features, layer.in_features)
    return layer.get_delta_weight(adapter).float().cpu()


def combine(model, adapters: Sequence[str], weights: Sequence[float], combination_type: str, name: str,
            seed: int = 0, **kwargs) -> str:
    """Add the adapter `name`: the `adapters` combined with `weights` by peft's add_weighted_adapter
    (see the module docstring for what each type computes). `kwargs` go to it: `density` (required
    by the trimming types), `svd_rank`, `majority_sign_method`. DARE drops entries at random:
    `seed` makes it repeatable. Returns `name`; activate it with `model.set_adapter(name)`.

    peft itself does nothing, silently, when `name` already exists: here that is an error.

    Usage: combine(peft_model, ["legal", "medical"], [0.5, 0.5], "ties", name="lm_ties", density=0.5)
    """
    loaded = list(model.peft_config)
    unknown = [a for a in adapters if a not in loaded]
    if unknown:
        raise ValueError(f"no adapter {unknown[0]!r} is loaded; loaded: {', '.join(loaded)}")
    if len(weights) != len(adapters):
        raise ValueError(f"{len(adapters)} adapters but {len(weights)} weights: give one weight per adapter")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"unknown combination_type {combination_type!r}; peft offers {', '.join(COMBINATION_TYPES)}")
    if combination_type in NEEDS_DENSITY and kwargs.get("density") is None:
        raise ValueError(f"{combination_type} keeps a share of the entries: pass density (0-1), e.g. density=0.5")
    if name in loaded:
        raise ValueError(f"an adapter named {name!r} is already loaded (peft would keep it unchanged): "
                         f"choose another name or model.delete_adapter({name!r}) first")
    if combination_type.endswith("svd"):
        kwargs.setdefault("svd_full_matrices", False)  # the same rank-r factors as the full SVD, ~10x faster
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model.add_weighted_adapter(list(adapters), [float(w) for w in weights], name,
                                   combination_type=combination_type, **kwargs)
    return name


def sum_error(model, combined: str, adapters: Sequence[str], weights: Sequence[float]) -> SumError:
    """How far the `combined` adapter is from the weighted sum of the `adapters`' updates, over
    every LoRA module (see SumError). ~1e-7 (float round-off) for `cat`; for `linear`, the cross terms.

    Usage: sum_error(peft_model, "all_cat", ["legal", "medical"], [1.0, 1.0]).max_abs
    """
    max_abs, relative = 0.0, 0.0
    for layer in lora_modules(model).values():
        if combined not in layer.lora_A:
            continue
        target = sum(w * update(model, a, layer) for a, w in zip(adapters, weights, strict=True))
        difference = update(model, combined, layer) - target
        max_abs = max(max_abs, difference.abs().max().item())
        relative = max(relative, (difference.norm() / target.norm().clamp_min(1e-30)).item())
    return SumError(max_abs, relative)
