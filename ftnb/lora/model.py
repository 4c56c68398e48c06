"""Putting LoRA layers into a model: the counterpart of peft's `tuners/lora/model.py` (and of
`get_peft_model`, `merge_adapter`, `save_pretrained`), working in place on any PyTorch model.

Usage:
    from ftnb.lora import LoraConfig, inject_adapters, merge_adapters, save_adapter, load_adapter
    names = inject_adapters(model, LoraConfig(r=8, alpha=16, trainable_modules=("score",)))
    ...train...
    save_adapter(model, "outputs/adapter")         # A, B (+ trainable modules) only: megabytes
    load_adapter(fresh_model, "outputs/adapter")   # injects the saved config, then loads the weights
    merge_adapters(model)                          # float bases only
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn

from ftnb.lora.config import ALL_LINEAR, LoraConfig
from ftnb.lora.dora import DoraLinear
from ftnb.lora.layer import LoraLinear, float_weight
from ftnb.models import HEAD_MODULES

CONFIG_FILE = "lora_config.json"
WEIGHTS_FILE = "lora_adapter.safetensors"
PEFT_PREFIX = "base_model.model."  # what peft's PeftModel puts before the wrapped model's module names


def _matches(name: str, suffix: str) -> bool:
    """peft's rule: a target names a module or the end of its dotted name."""
    return name == suffix or name.endswith("." + suffix)


def _output_layers(model: nn.Module) -> set[str]:
    """Names of the layers that produce the model's output (lm_head, score, ...): "all-linear"
    leaves them alone, as peft does; a fresh head is trained in full via trainable_modules."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, module in model.named_modules()
            if (output is not None and module is output) or name.split(".")[-1] in HEAD_MODULES}


def target_names(model: nn.Module, target_modules: str | tuple[str, ...]) -> list[str]:
    """The linear layers a config's target_modules selects, or a clear error for a name that
    selects none. Usage: target_names(model, ("q_proj", "v_proj"))"""
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if target_modules == ALL_LINEAR:
        return [name for name in linear if name not in _output_layers(model)]
    for target in target_modules:
        if not any(_matches(name, target) for name in linear):
            endings = sorted({name.split(".")[-1] for name in linear})
            close = difflib.get_close_matches(target.split(".")[-1], endings, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"target module '{target}' matches no linear layer of this model.{hint} "
                             f"Its linear layers end with: {', '.join(endings)}.")
    return [name for name in linear if any(_matches(name, target) for target in target_modules)]


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """{module name: layer} for every LoraLinear / DoraLinear in the model."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLinear)}


def _trainable_parameters(model: nn.Module, trainable_modules: tuple[str, ...]) -> dict[str, nn.Parameter]:
    found: dict[str, nn.Parameter] = {}
    for target in trainable_modules:
        modules = [(name, module) for name, module in model.named_modules() if _matches(name, target)]
        if not modules:
            raise ValueError(f"trainable module '{target}' is not a module of this model; "
                             "name a module such as the classification head ('score').")
        for name, module in modules:
            found.update({f"{name}.{key}": p for key, p in module.named_parameters()})
    return found


def inject_adapters(model: nn.Module, config: LoraConfig) -> list[str]:
    """Wrap every target linear layer in LoraLinear (DoraLinear with use_dora), in place; freeze
    all else except config.trainable_modules. Returns the wrapped module names.

    Usage: names = inject_adapters(model, LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    """
    if lora_layers(model):
        raise ValueError("This model already has LoRA layers; inject into a freshly loaded model.")
    names = target_names(model, config.target_modules)
    trainable = _trainable_parameters(model, config.trainable_modules)
    layer_class = DoraLinear if config.use_dora else LoraLinear
    # Build every new layer before replacing any, so an error leaves the model untouched.
    wrapped = {name: layer_class(model.get_submodule(name), config.r, config.alpha, config.dropout,
                                 config.use_rslora) for name in names}
    for param in model.parameters():
        param.requires_grad_(False)
    for name, layer in wrapped.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    for param in trainable.values():
        param.requires_grad_(True)
    model.lora_config = config
    return names


def merge_adapters(model: nn.Module) -> None:
    """Fold every adapter into its base weight (W += dW); float bases only.
    Usage: merge_adapters(model)"""
    layers = lora_layers(model)
    for layer in layers.values():  # check all first: a refused merge leaves no layer half-merged
        float_weight(layer.base_layer)
    for layer in layers.values():
        layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    """Undo merge_adapters (W -= dW). Usage: unmerge_adapters(model)"""
    for layer in lora_layers(model).values():
        layer.unmerge()


def adapter_parameters(model: nn.Module) -> dict[str, dict[str, nn.Parameter]]:
    """{module name: {"A", "B"[, "magnitude"]}} for this module's LoRA layers or for a peft model's
    (names without peft's "base_model.model." prefix), so the two can be compared by name.

    Usage: adapter_parameters(peft_model)["model.layers.0.self_attn.q_proj"]["B"]
    """
    found: dict[str, dict[str, nn.Parameter]] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            found[name] = {"A": module.lora_A, "B": module.lora_B}
            if isinstance(module, DoraLinear):
                found[name]["magnitude"] = module.magnitude
        elif isinstance(module, LoraLayer) and module.lora_A:
            if len(module.lora_A) != 1:
                raise ValueError(f"{name} holds {len(module.lora_A)} peft adapters; keep one to compare.")
            adapter = next(iter(module.lora_A))
            name = name.removeprefix(PEFT_PREFIX)
            found[name] = {"A": module.lora_A[adapter].weight, "B": module.lora_B[adapter].weight}
            if adapter in module.lora_magnitude_vector:
                found[name]["magnitude"] = module.lora_magnitude_vector[adapter].weight
    return found


@torch.no_grad()
def copy_adapter_weights(source: nn.Module, destination: nn.Module) -> None:
    """Copy A, B (and DoRA's magnitude) by module name between two models, each with this
    module's layers or with peft's, so both start from the same adapter.

    Usage: copy_adapter_weights(our_model, peft_model)
    """
    src, dst = adapter_parameters(source), adapter_parameters(destination)
    if src.keys() != dst.keys():
        raise ValueError("The two models adapt different modules: only in the source "
                         f"{sorted(src.keys() - dst.keys())[:5]}, only in the destination "
                         f"{sorted(dst.keys() - src.keys())[:5]}. Use the same target_modules on both.")
    for name, tensors in src.items():
        if tensors.keys() != dst[name].keys():
            raise ValueError(f"{name}: one model uses DoRA and the other not; set use_dora the same.")
        for kind, tensor in tensors.items():
            if tensor.shape != dst[name][kind].shape:
                raise ValueError(f"{name}.{kind}: shape {tuple(tensor.shape)} in the source, "
                                 f"{tuple(dst[name][kind].shape)} in the destination: use the same r.")
            dst[name][kind].copy_(tensor)


def _config_of(model: nn.Module) -> LoraConfig:
    if not hasattr(model, "lora_config"):
        raise ValueError("This model has no LoRA adapters: call inject_adapters(model, config) first.")
    return model.lora_config


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights that make this adapter: every A, B (and magnitude) plus the parameters of
    config.trainable_modules; the frozen base is left out. Usage: adapter_state_dict(model)"""
    state = {f"{name}.{key}": p.detach() for name, layer in lora_layers(model).items()
             for key, p in layer.named_parameters(recurse=False)}
    state.update({name: p.detach() for name, p in
                  _trainable_parameters(model, _config_of(model).trainable_modules).items()})
    return state


def save_adapter(model: nn.Module, folder: str | Path) -> Path:
    """Write the adapter's weights (safetensors) and config (JSON) to folder.
    Usage: save_adapter(model, "outputs/05/adapter")"""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = _config_of(model)
    save_file({name: t.contiguous() for name, t in adapter_state_dict(model).items()}, folder / WEIGHTS_FILE)
    base = getattr(getattr(model, "config", None), "name_or_path", "")
    (folder / CONFIG_FILE).write_text(json.dumps({"lora_config": config.to_dict(), "base_model": base}, indent=2))
    return folder


@torch.no_grad()
def load_adapter(model: nn.Module, folder: str | Path) -> LoraConfig:
    """Load a save_adapter folder into model: into a model without adapters, injects the saved
    config first; into one with adapters, the configs must agree. Returns the config.

    Usage: load_adapter(load_model("smollm2-135m-instruct"), "outputs/05/adapter")
    """
    folder = Path(folder)
    if not (folder / CONFIG_FILE).exists() or not (folder / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"{folder} holds no {CONFIG_FILE} and {WEIGHTS_FILE}: "
                                "pass a folder written by save_adapter.")
    saved = json.loads((folder / CONFIG_FILE).read_text())
    config = LoraConfig.from_dict(saved["lora_config"])
    if not lora_layers(model):
        inject_adapters(model, config)
    elif _config_of(model) != config:
        raise ValueError(f"This model's adapters were injected with {_config_of(model)}, the saved "
                         f"adapter with {config}: load it into a model without adapters instead.")
    weights, expected = load_file(folder / WEIGHTS_FILE), adapter_state_dict(model)
    where = f"saved from base model '{saved['base_model']}'"
    if weights.keys() != expected.keys():
        raise ValueError(f"The adapter in {folder} ({where}) does not fit this model: missing "
                         f"{sorted(expected.keys() - weights.keys())[:3]}, unexpected "
                         f"{sorted(weights.keys() - expected.keys())[:3]}. Load it into that base model.")
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"The adapter in {folder} ({where}) does not fit this model: {name} is "
                             f"{tuple(tensor.shape)} there, {tuple(expected[name].shape)} here. "
                             "Load it into that base model.")
        expected[name].copy_(tensor)
    return config
