"""What a server serves: saved-model folders loaded once, generator adapters on a shared base.
A multihead folder (one adapter, several classification heads; `MultiHeadClassifier.save`) served
as NAME is one classify model per head, "NAME/<label field>" (as ftnb.multitask names them), all on
one base with the folder's one adapter.

Usage: served = load_models(["runs/x/adapter", "legal=runs/y/adapter"]); served["legal"].prompt_ids(messages)
       load_models(["tickets=runs/06/category_priority"])["tickets/priority"].classifier.predict_proba(["..."])
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftnb import saved
from ftnb.tasks import classify

BASE_ROW = "__base__"  # peft's adapter name for a row of a mixed batch that runs the bare base model


@dataclass(eq=False)
class Engine:
    """One loaded causal LM and its tokenizer; every adapter on it is served under its own name."""
    model: Any
    tokenizer: Any
    mixes_adapters: bool  # a PeftModel: each batch row names its adapter (or BASE_ROW)

    @property
    def context_length(self) -> int:
        return self.model.config.max_position_embeddings


@dataclass(eq=False)
class ServedGenerator:
    name: str
    engine: Engine
    adapter: str | None  # the peft adapter of this name, BASE_ROW, or None for a model without adapters
    system: str | None  # the system prompt it was trained with (None: the chat template's own)
    decoding: dict
    parent: str | None = None  # the base model's served name, for an adapter

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of the conversation plus the assistant header, as ftnb.tasks.sft tokenizes them."""
        if self.system and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.system}, *messages]
        text = self.engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.engine.tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass(eq=False)
class ServedClassifier:
    name: str
    classifier: classify.Classifier


Served = ServedGenerator | ServedClassifier


def parse_spec(spec: str) -> tuple[str, Path]:
    """("legal", Path("runs/x/adapter")) for "legal=runs/x/adapter"; a bare folder is named after itself."""
    name, sep, folder = spec.partition("=")
    if not sep:
        folder = spec
        name = Path(spec).resolve().name
    if not name or not folder:
        raise ValueError(f"{spec!r}: give FOLDER or NAME=FOLDER")
    return name, Path(folder)


def load_models(specs: list[str]) -> dict[str, Served]:
    """Every model the specs name, by served name (see the module docstring for how adapters share a base).

    Usage: load_models(["runs/x/adapter", "legal=runs/y/adapter"])["legal"].adapter
    """
    folders: dict[str, Path] = {}
    for spec in specs:
        name, folder = parse_spec(spec)
        if name in folders:
            raise ValueError(f"two folders would be served as {name!r}: name them, NAME=FOLDER")
        folders[name] = folder
    manifests = {name: saved.read_manifest(folder) for name, folder in folders.items()}
    served: dict[str, Served] = {}
    groups: dict[str, list[str]] = {}
    for name, manifest in manifests.items():
        if manifest["kind"] == "classifier":
            served[name] = ServedClassifier(name, saved.load(folders[name]))
        elif manifest["kind"] == "multihead":
            served.update(_head_classifiers(name, folders[name]))
        elif manifest["weights"]["format"] == "merged":
            gen = saved.load(folders[name])
            engine = Engine(gen.model, gen.tokenizer, mixes_adapters=False)
            served[name] = ServedGenerator(name, engine, None, gen.system, gen.decoding)
        else:
            groups.setdefault(json.dumps(saved.base_identity(manifest)), []).append(name)
    for names in groups.values():
        for model in _load_adapter_group(names, folders, manifests):
            if model.name in served or (model.adapter == BASE_ROW and model.name in folders):
                raise ValueError(f"{model.name!r} would be served twice (a base model is served under its own name): "
                                 f"name the folders otherwise, NAME=FOLDER")
            served[model.name] = model
    return served


def _head_classifiers(name: str, folder: Path) -> dict[str, ServedClassifier]:
    """Each head of a multihead folder as its own classify model, "NAME/<label field>", on one base
    with the folder's adapter, through ftnb.multitask (each head gives the folder's own probabilities)."""
    from ftnb.multitask import MultiTaskModel

    heads = MultiTaskModel.from_folders({"heads": folder}).tasks.values()  # peft names may not hold NAME's dots
    served = {f"{name}/{task.classifier.label_field}": task.classifier for task in heads}
    return {served_name: ServedClassifier(served_name, classifier) for served_name, classifier in served.items()}


def _load_adapter_group(names: list[str], folders: dict[str, Path],
                        manifests: dict[str, dict]) -> list[ServedGenerator]:
    """One base with each folder's active adapter attached as `adapter_<i>` (peft names may not hold
    dots, served names may), the recorded parameter dtypes replayed; plus the bare base."""
    from peft import PeftModel

    first = manifests[names[0]]
    model, dtypes, adapters = saved.load_base(first), {}, {}
    for i, name in enumerate(names):
        saved_name, path = saved.shareable_adapter(folders[name], manifests[name])
        internal = f"adapter_{i}"
        if isinstance(model, PeftModel):
            model.load_adapter(path, adapter_name=internal)
        else:
            model = PeftModel.from_pretrained(model, path, adapter_name=internal)
        dtypes.update({key.replace(f".{saved_name}.", f".{internal}."): dtype
                       for key, dtype in manifests[name]["parameter_dtypes"].items()})
        adapters[name] = internal
    saved.replay_dtypes(model, {**first, "parameter_dtypes": dtypes})
    engine = Engine(model.eval(), saved.load_tokenizer(folders[names[0]]), True)
    base_name = first["base_model"]["name"]
    return [ServedGenerator(base_name, engine, BASE_ROW, None, {})] + [
        ServedGenerator(name, engine, adapters[name], manifests[name]["task"]["system"],
                        manifests[name]["task"]["decoding"], parent=base_name) for name in names]
