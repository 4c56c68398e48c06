"""LoRA variants by name: each gives a peft config plus whatever else training needs (an optimizer
with two learning rates, a callback run after every optimizer step, an initialisation that reads
the original weights), and says on which bases it runs.

    lora     B = 0, A random; the update BA is scaled by alpha / r
    rslora   scaled by alpha / sqrt(r) instead, so a larger r does not shrink the update
    dora     the weight split into a learned magnitude per output and a direction that LoRA adapts
    pissa    A and B start as the top r singular directions of W, the base keeps the residual
             (needs a base it can rewrite: quantization "none")
    loftq    on a 4-bit base: A and B start at the low-rank part of the quantization error W - Q(W),
             read from the original weights (the 4-bit base is unchanged)
    lora+    plain LoRA, with B learning `LORAPLUS_LR_RATIO` times faster than A
    vera     one frozen random pair A, B shared by all layers; only two scaling vectors per layer train
    adalora  starts at rank r and prunes to r / 2 on average, moving rank where it matters most
             (peft adds AdaLoRA's orthogonality penalty only to a loss the model computes from labels;
             a Trainer that computes the loss from the logits, as recipe 01's does, trains without it)

Resuming from a Trainer checkpoint is exact for all but AdaLoRA, whose importance scores live outside
the checkpoint; PiSSA's start is recomputed from the seed, and LoftQ's from the original weights.

Usage:
    from ftnb import variants
    adapted = variants.attach(model, "dora", variants.peft_config("dora", r=16, alpha=32, dropout=0.05,
                              target_modules="all-linear", task_type="SEQ_CLS", modules_to_save=["score"]))
    trainer = Trainer(model=adapted.model, args=args, optimizers=adapted.optimizers(args),
                      callbacks=adapted.callbacks, ...)
    Classifier(adapted.model, ...).save(folder)   # PiSSA is converted to a LoRA on the original base here
"""
from __future__ import annotations

import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

# LoRA+'s ratio of B's learning rate to A's (the paper's default, peft's example)
LORAPLUS_LR_RATIO = 16.0
# Where attach() keeps a PiSSA adapter's initial weights, in the model, for the conversion at save
INITIAL_ADAPTER_ATTRIBUTE = "ftnb_initial_adapter"


@dataclass(frozen=True)
class Variant:
    """A LoRA variant: the peft method, the LoraConfig settings it changes, and the bases it runs on."""

    name: str
    summary: str
    peft_type: str = "lora"  # lora | vera | adalora: which peft config class
    lora_settings: dict = field(default_factory=dict)  # LoraConfig fields that make the variant
    needs_4bit: bool = False  # LoftQ: its initialisation is defined against a 4-bit base
    full_precision_only: str = ""  # why a 4-bit base cannot take it ("" when it can)
    two_learning_rates: bool = False  # LoRA+
    allocates_rank: bool = False  # AdaLoRA: update_and_allocate after every optimizer step


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("lora", "B = 0, A random, update scaled by alpha / r"),
    Variant("rslora", "update scaled by alpha / sqrt(r)", lora_settings={"use_rslora": True}),
    Variant("dora", "learned magnitude per output times an adapted direction", lora_settings={"use_dora": True}),
    Variant("pissa", "A, B start at W's top singular directions; the base keeps the residual",
            lora_settings={"init_lora_weights": "pissa_niter_4"},
            full_precision_only="PiSSA moves W's top singular directions into A and B and writes the residual "
                                "into the base weights, which a 4-bit base cannot hold exactly (peft refuses it)"),
    Variant("loftq", "on a 4-bit base, A, B start at the low-rank part of the quantization error", needs_4bit=True),
    Variant("lora+", f"B learns {LORAPLUS_LR_RATIO:g}x faster than A", two_learning_rates=True),
    Variant("vera", "one frozen random A, B shared by all layers; per-layer scaling vectors train",
            peft_type="vera"),
    Variant("adalora", "starts at rank r, prunes to r / 2 on average where it matters least",
            peft_type="adalora", allocates_rank=True),
)}


class VariantError(ValueError):
    """A variant name that does not exist, or one that cannot run on the chosen base."""


def get(variant: str) -> Variant:
    """The Variant called `variant`; an unknown name is an error listing the known ones.

    Usage: variants.get("dora").summary
    """
    if variant not in VARIANTS:
        raise VariantError(f"unknown LoRA variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return VARIANTS[variant]


def check_base(variant: str, quantization: str) -> None:
    """Raise VariantError, saying what to change, when `variant` cannot run on a base loaded with
    `quantization` ("none", "int8", "nf4", "fp4").

    Usage: variants.check_base("pissa", quantization)  # before loading the model
    """
    chosen = get(variant)
    quantized = quantization != "none"
    if chosen.full_precision_only and quantized:
        raise VariantError(f"lora_variant {variant!r} cannot run on a {quantization} base: "
                           f"{chosen.full_precision_only}. Set quantization = \"none\", or use \"loftq\", "
                           f"which starts from the quantization error of a 4-bit base instead")
    if chosen.needs_4bit and quantization not in ("nf4", "fp4"):
        raise VariantError(f"lora_variant {variant!r} needs a 4-bit base (quantization \"nf4\" or \"fp4\"), "
                           f"not {quantization!r}: it initialises the adapter from the 4-bit rounding error")


def peft_config(variant: str, r: int, alpha: float, dropout: float, target_modules: str | list[str],
                task_type: str, modules_to_save: list[str] | None = None, total_steps: int | None = None):
    """The peft config of `variant` with the usual LoRA settings. AdaLoRA needs `total_steps`
    (its rank budget shrinks over the run); VeRA has no alpha (its scaling vectors learn it).

    Usage: peft_config("rslora", 16, 32, 0.05, "all-linear", "SEQ_CLS", ["score"])
    """
    from peft import AdaLoraConfig, LoraConfig, VeraConfig

    chosen = get(variant)
    common = {"target_modules": target_modules, "task_type": task_type, "modules_to_save": modules_to_save}
    if chosen.peft_type == "vera":
        return VeraConfig(r=r, vera_dropout=dropout, **common)
    if chosen.peft_type == "adalora":
        if not total_steps:
            raise VariantError("adalora needs total_steps, the number of optimizer steps of the run")
        # prune during the middle of the run: the first and last tenth train at a fixed rank
        return AdaLoraConfig(init_r=r, target_r=max(1, r // 2), lora_alpha=alpha, lora_dropout=dropout,
                             total_step=total_steps, tinit=total_steps // 10, tfinal=total_steps // 10, **common)
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, **chosen.lora_settings, **common)


@dataclass
class Adapted:
    """A model with its variant attached, and what the Trainer needs for it."""

    model: object  # the PeftModel
    variant: Variant
    callbacks: list = field(default_factory=list)

    def optimizers(self, args) -> tuple:
        """The Trainer's `optimizers=` argument: LoRA+'s two-rate optimizer (of the class `args.optim`
        names, so an 8-bit optimizer stays 8-bit), or (None, None) for the Trainer's own.

        Usage: Trainer(..., optimizers=adapted.optimizers(args))
        """
        if not self.variant.two_learning_rates:
            return None, None
        from peft.optimizers import create_loraplus_optimizer
        from transformers import Trainer

        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, self.model)
        optimizer_kwargs.pop("lr", None)
        return create_loraplus_optimizer(self.model, optimizer_cls, lr=args.learning_rate,
                                         loraplus_lr_ratio=LORAPLUS_LR_RATIO,
                                         loraplus_weight_decay=args.weight_decay, **optimizer_kwargs), None


def attach(model, variant: str, config) -> Adapted:
    """`model` with the variant's adapter (get_peft_model), initialised as the variant says, and
    its callbacks. PiSSA's initial adapter is kept (in a temporary folder named on the model), so
    that `ftnb.saved.save` can write the trained adapter as a plain LoRA on the original base.

    Usage: adapted = attach(model, "loftq", peft_config("loftq", 16, 32, 0.0, "all-linear", "SEQ_CLS", ["score"]))
    """
    from peft import get_peft_model

    chosen = get(variant)
    check_base(variant, _quantization_of(model))
    peft_model = get_peft_model(model, config)
    callbacks = []
    if variant == "loftq":
        _loftq_init(peft_model)
    if variant == "pissa":
        setattr(peft_model, INITIAL_ADAPTER_ATTRIBUTE, _save_initial_adapter(peft_model))
    if chosen.allocates_rank:
        callbacks.append(_rank_allocation_callback())
    return Adapted(peft_model, chosen, callbacks)


def _quantization_of(model) -> str:
    from ftnb.saved import quantization_record

    record = quantization_record(model.config)
    return record["type"] if record else "none"


@torch.no_grad()
def _loftq_init(peft_model) -> None:
    """LoftQ for an already quantized base (one iteration, as peft's replace_lora_weights_loftq):
    for each 4-bit layer, read the original weight W from the base's safetensors file and set
    B·A·scaling to the best rank-r fit of the rounding error W - Q(W), so that Q(W) + BA starts
    closer to W than Q(W) alone. The 4-bit base stays as loaded, so the saved adapter reloads onto
    a freshly quantized base. Written here because peft's function computes on CUDA or XPU only
    and leaves out the alpha / r scaling."""
    import bitsandbytes as bnb
    from peft.tuners.lora import Linear4bit
    from safetensors import safe_open
    from transformers.utils import cached_file

    base = peft_model.get_base_model()
    weights_file = cached_file(base.config.name_or_path, "model.safetensors", _raise_exceptions_for_missing_entries=False)
    if weights_file is None:
        raise VariantError(f"loftq reads the original weights from {base.config.name_or_path}'s model.safetensors, "
                           "which is not there (a sharded or .bin model): use another variant")
    prefix = "base_model.model."
    with safe_open(weights_file, framework="pt") as original:
        for name, layer in peft_model.named_modules():
            if not isinstance(layer, Linear4bit):
                continue
            weight = layer.get_base_layer().weight
            rounded = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
            error = original.get_tensor(name.removeprefix(prefix) + ".weight").float() - rounded.cpu()
            for adapter, rank in layer.r.items():
                U, S, Vh = torch.linalg.svd(error, full_matrices=False)
                root = S[:rank].sqrt()
                layer.lora_A[adapter].weight.data = (root[:, None] * Vh[:rank]).to(weight.device)
                layer.lora_B[adapter].weight.data = (U[:, :rank] * root / layer.scaling[adapter]).to(weight.device)


def _save_initial_adapter(peft_model) -> Path:
    """Write the adapter as initialised, flagged as a plain LoRA init (peft's recipe for the conversion:
    loaded back as a second adapter, it must not run PiSSA again on the residual base)."""
    folder = Path(tempfile.mkdtemp(prefix="ftnb-pissa-")) / "initial"
    config = peft_model.peft_config["default"]
    pissa_init, config.init_lora_weights = config.init_lora_weights, True
    try:
        peft_model.save_pretrained(folder)
    finally:
        config.init_lora_weights = pissa_init
    weakref.finalize(peft_model, shutil.rmtree, folder.parent, True)  # removed with the model
    return folder


def initial_adapter(model) -> Path | None:
    """The folder holding a PiSSA adapter's initial weights (kept by `attach`), or None for every
    other variant."""
    return getattr(model, INITIAL_ADAPTER_ATTRIBUTE, None)


def save_weights(model, folder: str | Path) -> None:
    """`model.save_pretrained(folder)`, except for PiSSA: its base holds the residual W - B0·A0, which a
    reload (from the original weights) does not have, so the adapter is written as the LoRA of rank
    2r that gives the same model on the original base: [B, -B0]·[A; A0] (peft's conversion).
    A PiSSA model whose initial adapter is unknown is an error before anything is written.

    Usage: save_weights(adapted.model, folder)  # ftnb.saved.save calls it
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    initial = initial_adapter(model)
    pissa = [name for name, config in getattr(model, "peft_config", {}).items()
             if str(getattr(config, "init_lora_weights", "")).startswith("pissa")]
    if initial is None:
        if pissa:
            raise ValueError(f"adapter {pissa[0]!r} was initialised with PiSSA, which changed the base weights, "
                             "and its initial weights are unknown, so it cannot be saved to reload on the original "
                             "base: attach it with ftnb.variants.attach")
        model.save_pretrained(folder)
        return
    model.save_pretrained(folder, path_initial_model_for_weight_conversion=str(initial))
    # peft's conversion writes only the LoRA matrices: put the trained head (modules_to_save) back
    weights_file = Path(folder) / "adapter_model.safetensors"
    converted = load_file(weights_file)
    kept = {name: tensor.contiguous() for name, tensor in get_peft_model_state_dict(model).items()
            if "lora_" not in name}
    save_file({**kept, **converted}, weights_file, metadata={"format": "pt"})


def _rank_allocation_callback():
    from transformers import TrainerCallback

    class RankAllocation(TrainerCallback):
        """AdaLoRA's budget step, after the optimizer step and before the gradients are zeroed
        (it scores each singular value by |weight x gradient|)."""

        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            model.base_model.update_and_allocate(state.global_step)

    return RankAllocation()
