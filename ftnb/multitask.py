"""Several saved models on one base: each folder's LoRA adapter (and a classifier's head) attached
by task name to ONE base model, loaded once; each task asked for by its name.

Usage:
    from ftnb.multitask import MultiTaskModel
    mt = MultiTaskModel.from_folders({"category": "runs/01/classifier", "priority": "runs/06/priority",
                                      "legal": "runs/06/legal"})
    mt.classify("category", [ticket]); mt.predict_proba("priority", [ticket])
    mt.generate("legal", "Explain this clause.", "Tenant shall ...")
    mt.predict_proba_mixed(["category", "priority"], [ticket, ticket])    # one backbone pass, two heads
    mt.generate_batch(["legal", "medical"], [row_a, row_b])               # one generate call, two adapters

The folders are what recipes 01, 02 and 06 save (`Classifier.save`, `sft.save_generator`,
`MultiHeadClassifier.save`); their bases must load identically (same weights, dtype, quantization),
else loading them together is refused.

A folder with one adapter and several heads (`MultiHeadClassifier.save`, kind "multihead") given as
NAME becomes one classifier task per head, named "NAME/<label field>": {"shared": folder} gives the
tasks "shared/category" and "shared/priority". All of them run with the ONE adapter NAME, each with
its own rows of the saved score layer as its head, and compute what the folder loaded alone computes
for that head. The "/" keeps them apart from tasks given by name (task names may not contain one).

The base is loaded as a causal LM. A classifier was trained as a sequence-classification model,
whose backbone is the causal LM's (same module names, so its LoRA weights load unchanged); its
head is read from the adapter file and kept as the task's own `torch.nn.Linear`, applied to the
hidden state of the last non-pad token, as `LlamaForSequenceClassification` pools.

Every call names the adapter of every row (peft's `adapter_names`), so there is no active adapter to
switch or to forget, and a batch may mix tasks. A task's adapter and head are bound together in its
`Task`: no call takes an adapter or a head, only a task name, so a head never runs with another
task's adapter. An unknown task name is an error that lists the loaded tasks, never the bare base.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from transformers.modeling_outputs import SequenceClassifierOutput

from ftnb import saved
from ftnb.inference import left_pad
from ftnb.tasks import classify, multihead, sft

# peft keeps adapters in ModuleDicts keyed by name: no dots, and nothing peft uses itself
_TASK_NAME = re.compile(r"[A-Za-z0-9_-]+")
_SHAREABLE_KINDS = ("classifier", "multihead", "generator")
_HEADED_KINDS = ("classifier", "multihead")  # folders whose adapter file also holds a score layer


class UnknownTaskError(KeyError):
    """A task name that is not loaded; the message lists the loaded tasks."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


@dataclass(frozen=True, eq=False)
class Task:
    """One loaded task: its folder, the peft adapter it runs with, and the object that runs it
    (a Classifier whose model is the shared base through this adapter and this head, or a
    Generator through this adapter). Frozen: the adapter and head stay bound."""
    name: str
    kind: str  # "classifier" (also each head of a multihead folder) or "generator"
    folder: Path
    adapter: str  # the peft adapter: the name the folder was given (shared by the heads of a multihead folder)
    classifier: classify.Classifier | None = None
    generator: sft.Generator | None = None

    @property
    def head(self) -> torch.nn.Linear | None:
        return self.classifier.model.head if self.classifier else None


class TaskView(torch.nn.Module):
    """The shared PeftModel seen through one task: forward and generate run every row with this
    task's adapter (and, for a classifier, return this task's head's logits), so Classifier and
    Generator use it as they use a model of their own.

    Usage: sft.Generator(TaskView(shared, "legal"), tok).generate(instruction, input)
    """

    def __init__(self, shared, adapter: str, head: torch.nn.Linear | None = None, pad_token_id: int | None = None):
        super().__init__()
        self.shared, self.adapter, self.head, self.pad_token_id = shared, adapter, head, pad_token_id
        self.config = copy.copy(shared.config)  # the base's, with a classifier head's number of labels
        if head is not None:
            self.config.num_labels = head.out_features

    @property
    def device(self) -> torch.device:
        return self.shared.device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        adapters = [self.adapter] * input_ids.shape[0]
        if self.head is None:
            return self.shared(input_ids=input_ids, attention_mask=attention_mask, adapter_names=adapters, **kwargs)
        logits = head_logits(self.shared, input_ids, attention_mask, adapters, [self.head] * len(adapters),
                             self.pad_token_id)
        return SequenceClassifierOutput(logits=torch.stack(logits))

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.shared.generate(input_ids=input_ids, adapter_names=[self.adapter] * input_ids.shape[0], **kwargs)


def head_logits(shared, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, adapter_names: list[str],
                heads: list[torch.nn.Linear], pad_token_id: int) -> list[torch.Tensor]:
    """One backbone pass, each row with its adapter, then each row's head on the final hidden state
    of its last non-pad token (LlamaForSequenceClassification's pooling: right or left padding alike).
    Returns one logits vector per row (heads may have different numbers of labels).

    Usage: head_logits(peft_model, ids, mask, ["category", "priority"], [cat_head, prio_head], tok.pad_token_id)
    """
    out = shared(input_ids=input_ids, attention_mask=attention_mask, adapter_names=adapter_names,
                 output_hidden_states=True, logits_to_keep=1)  # one position of LM logits, not the whole vocab x text
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = (positions * (input_ids != pad_token_id)).argmax(-1)
    pooled = out.hidden_states[-1][torch.arange(len(last), device=last.device), last]
    return [head(row.to(head.weight.dtype)) for head, row in zip(heads, pooled)]


class MultiTaskModel:
    """Saved classifiers and generators on one base model; see the module docstring.

    Usage: mt = MultiTaskModel.from_folders({"category": dir1, "legal": dir2}); mt.classify("category", tickets)
    """

    def __init__(self, shared, tokenizer, tasks: dict[str, Task]):
        self.shared, self.tokenizer, self.tasks = shared, tokenizer, tasks
        self._adapter_dtypes = {task.adapter: next(p.dtype for n, p in shared.named_parameters()
                                                   if f".lora_A.{task.adapter}." in n) for task in tasks.values()}

    @classmethod
    def from_folders(cls, folders: Mapping[str, str | Path], batch_size: int = 16) -> "MultiTaskModel":
        """Load the base once (as the first folder's manifest records it) and attach each folder's
        active LoRA adapter under its given name; a multihead folder gives one task per head,
        "NAME/<label field>" (see the module docstring). `batch_size` is the classifiers' prediction batch.

        Usage: MultiTaskModel.from_folders({"category": "runs/01/classifier", "legal": "runs/06/legal"})
        """
        folders = {name: Path(folder) for name, folder in folders.items()}
        if not folders:
            raise ValueError("give at least one task: {task name: saved folder}")
        bad = [name for name in folders if not isinstance(name, str) or not _TASK_NAME.fullmatch(name)]
        if bad:
            raise ValueError(f"task names {bad} must be letters, digits, '_' or '-' (they name peft adapters)")
        manifests = {name: saved.read_manifest(folder) for name, folder in folders.items()}
        for name, manifest in manifests.items():
            if manifest["kind"] not in _SHAREABLE_KINDS:
                raise ValueError(f"{folders[name]} holds a {manifest['kind']}; a task is one of {_SHAREABLE_KINDS}")
            if manifest["task"].get("pooling", "last") != "last":
                raise ValueError(f"{folders[name]} holds a classifier that reads the mean of its tokens; tasks on one "
                                 f"base read the last token (head_logits): load it alone with ftnb.saved.load")
        _check_same_base(folders, manifests)
        tokenizers = _same_tokenizer(folders)
        first = next(iter(manifests.values()))
        shared = saved.load_base({**first, "kind": "generator"})  # the base as a causal LM, as recorded
        heads, dtypes = {}, {}
        for name, manifest in manifests.items():
            shared, heads[name] = _attach(shared, name, folders[name], manifest)
            dtypes = _merge_dtypes(dtypes, _renamed_dtypes(name, manifest), folders[name])
        saved.replay_dtypes(shared, {**first, "parameter_dtypes": dtypes})
        shared.eval()
        tasks = {task.name: task for name in folders
                 for task in _tasks(shared, name, folders[name], manifests[name], tokenizers[name], heads[name], batch_size)}
        return cls(shared, next(iter(tokenizers.values())), tasks)

    # ------------------------------------------------------------ by task name
    def task(self, name: str, kind: str | None = None) -> Task:
        """The loaded task called `name` (of `kind`, when given); anything else is an error that
        lists what is loaded. Usage: mt.task("category").classifier.labels"""
        if name not in self.tasks:
            raise UnknownTaskError(f"no task {name!r} is loaded; the loaded tasks are: {self._listing()}")
        task = self.tasks[name]
        if kind is not None and task.kind != kind:
            use = "classify / predict_proba" if task.kind == "classifier" else "generate / generate_batch"
            raise ValueError(f"{name!r} is a {task.kind}, not a {kind}: ask it with {use}. "
                             f"The loaded tasks are: {self._listing()}")
        return task

    def _listing(self) -> str:
        return ", ".join(f"{name} ({task.kind})" for name, task in self.tasks.items())

    def classify(self, task: str, records: Sequence[classify.Record]) -> list[str]:
        """The most probable label of each record, by the task's adapter and head."""
        return self.task(task, "classifier").classifier.predict(records)

    def predict_proba(self, task: str, records: Sequence[classify.Record]) -> list[dict[str, float]]:
        """One {label: probability} dict per record."""
        return self.task(task, "classifier").classifier.predict_proba(records)

    def probabilities(self, task: str, records: Sequence[classify.Record]) -> np.ndarray:
        """An array (len(records), the task's number of labels), as Classifier.probabilities."""
        return self.task(task, "classifier").classifier.probabilities(records)

    def generate(self, task: str, instruction: str, input: str, **generation_kwargs) -> str:
        """The task's answer, with its system prompt and saved decoding settings (overridable)."""
        return self.task(task, "generator").generator.generate(instruction, input, **generation_kwargs)

    # ------------------------------------------------------------ mixed batches
    def _per_row(self, tasks: str | Sequence[str], rows: Sequence, kind: str) -> list[Task]:
        names = [tasks] * len(rows) if isinstance(tasks, str) else list(tasks)
        if len(names) != len(rows):
            raise ValueError(f"{len(names)} task names for {len(rows)} rows: give one per row, or one for all")
        chosen = [self.task(name, kind) for name in names]
        dtypes = {t.name: self._adapter_dtypes[t.adapter] for t in chosen}
        if len(set(dtypes.values())) > 1:
            # peft's mixed-batch forward casts the whole batch's input to the dtype of the first adapter
            # it visits (in set order), so rows of an adapter in another dtype would lose precision
            raise ValueError(f"one batch cannot mix adapters stored in different dtypes ({dtypes}): "
                             f"run these tasks in separate calls")
        return chosen

    @torch.no_grad()
    def predict_proba_mixed(self, tasks: str | Sequence[str], records: Sequence[classify.Record],
                            batch_size: int = 16) -> list[dict[str, float]]:
        """{label: probability} per record, each by its own task (`tasks`: one name per record, or
        one for all): each batch is one backbone pass with each row's adapter, then each row's head.

        Usage: mt.predict_proba_mixed(["category", "priority"], [ticket, ticket])
        """
        chosen = self._per_row(tasks, records, "classifier")
        ids: list[list[int]] = [[] for _ in records]
        for task in {id(t): t for t in chosen}.values():  # each task tokenizes its rows as its Classifier does
            clf = task.classifier
            rows = [i for i, t in enumerate(chosen) if t is task]
            texts = [classify.record_text(records[i], clf.text_fields) for i in rows]
            for i, row_ids in zip(rows, classify.encode(clf.tokenizer, texts, clf.max_length)["input_ids"]):
                ids[i] = row_ids
        out = []
        for start in range(0, len(records), batch_size):
            part = range(start, min(start + batch_size, len(records)))
            batch = self.tokenizer.pad({"input_ids": [ids[i] for i in part]}, return_tensors="pt").to(self.shared.device)
            logits = head_logits(self.shared, batch["input_ids"], batch["attention_mask"],
                                 [chosen[i].adapter for i in part], [chosen[i].head for i in part],
                                 self.tokenizer.pad_token_id)
            out += [dict(zip(chosen[i].classifier.labels, torch.softmax(row.float(), -1).tolist()))
                    for i, row in zip(part, logits)]
        return out

    def _prompts(self, chosen: list[Task], rows: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded chat prompts, each with its task's system prompt, as sft.generate_batch builds them."""
        texts = [self.tokenizer.apply_chat_template(sft.prompt_messages(r["instruction"], r["input"], t.generator.system),
                                                    tokenize=False, add_generation_prompt=True)
                 for t, r in zip(chosen, rows)]
        ids = [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        return left_pad(ids, self.tokenizer.pad_token_id, self.shared.device)

    @torch.no_grad()
    def next_token_logits(self, tasks: str | Sequence[str], rows: Sequence[dict]) -> torch.Tensor:
        """Logits of the first answer token of each row (instruction, input), each row by its own
        task, in ONE padded forward pass: compare with sft.next_token_logits of each task alone.

        Usage: mt.next_token_logits(["legal", "medical"], [row_a, row_b])  # (2, vocab)
        """
        chosen = self._per_row(tasks, rows, "generator")
        ids, mask = self._prompts(chosen, rows)
        # all positions' logits, as sft.next_token_logits computes them: the LM head on one position is
        # another kernel, whose sums differ in the last bits (~1e-5 on SmolLM2's logits). Positions count
        # from each prompt's first token, as generate counts them: left padding then changes nothing
        # (RoPE shifted by the padding is the same attention in exact arithmetic, not in float: ~1e-4)
        out = self.shared(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                          adapter_names=[t.adapter for t in chosen])
        return out.logits[:, -1].float().cpu()

    @torch.no_grad()
    def generate_batch(self, tasks: str | Sequence[str], rows: Sequence[dict], batch_size: int = 8,
                       **generation_kwargs) -> list[str]:
        """Answers to rows with instruction/input, each by its own task (one name per row, or one for
        all), `batch_size` rows per generate call whatever their tasks. Decoding settings are the
        tasks' saved ones; where the tasks of a batch disagree, pass the setting.

        Usage: mt.generate_batch(["legal", "medical", "legal"], rows, max_new_tokens=120)
        """
        chosen = self._per_row(tasks, rows, "generator")
        decoding = _common_decoding(chosen, generation_kwargs)
        answers = []
        for start in range(0, len(rows), batch_size):
            part_tasks, part_rows = chosen[start:start + batch_size], list(rows[start:start + batch_size])
            ids, mask = self._prompts(part_tasks, part_rows)
            width = ids.shape[1]
            out = self.shared.generate(input_ids=ids, attention_mask=mask, adapter_names=[t.adapter for t in part_tasks],
                                       **sft.decoding_kwargs(self.tokenizer, width, **decoding))
            answers += [t.strip() for t in self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]
        return answers

    def summary(self) -> list[dict]:
        """One row per task: name, kind, adapter, folder, labels or system prompt, the parameters of its
        adapter and of its head, and the MiB they take as stored (a QLoRA adapter trained with TRL is kept
        in bf16). The heads of one multihead folder share its adapter: sum LoRA parameters per adapter."""
        rows = []
        for name, task in self.tasks.items():
            lora = [p for n, p in self.shared.named_parameters() if f".{task.adapter}." in n]
            head = list(task.head.parameters()) if task.head else []
            what = (f"{len(task.classifier.labels)} labels ({task.classifier.label_field})" if task.classifier
                    else f"system prompt: {task.generator.system[:60]}")
            rows.append({"task": name, "kind": task.kind, "adapter": task.adapter, "folder": str(task.folder), "what": what,
                         "LoRA parameters": sum(p.numel() for p in lora), "head parameters": sum(p.numel() for p in head),
                         "MiB": sum(p.numel() * p.element_size() for p in lora + head) / 2**20})
        return rows


# ---------------------------------------------------------------- loading, checked
def _check_same_base(folders: dict[str, Path], manifests: dict[str, dict]) -> None:
    (first, reference), *others = ((name, saved.base_identity(m)) for name, m in manifests.items())
    for name, identity in others:
        differs = [f"{key} {reference[key]!r} vs {identity[key]!r}" for key in reference if reference[key] != identity[key]]
        if differs:
            raise ValueError(f"{folders[first]} and {folders[name]} were trained on different bases ({'; '.join(differs)}), "
                             f"so they cannot share one: load them separately with ftnb.saved.load, or retrain one "
                             f"on the other's base")


def _same_tokenizer(folders: dict[str, Path]) -> dict:
    """Each folder's tokenizer, checked to be the same in all (vocabulary, pad token, chat template)."""
    tokenizers = {name: saved.load_tokenizer(folder) for name, folder in folders.items()}
    (first, reference), *others = tokenizers.items()
    fingerprint = lambda tok: (tok.get_vocab(), tok.pad_token_id, tok.chat_template)  # noqa: E731
    for name, tok in others:
        if fingerprint(tok) != fingerprint(reference):
            raise ValueError(f"{folders[name]} was saved with another tokenizer (vocabulary, pad token or chat "
                             f"template) than {folders[first]}: tasks on one base must share one tokenizer")
    return tokenizers


def _attach(shared, name: str, folder: Path, manifest: dict):
    """(shared PeftModel with the folder's active LoRA adapter added as `name`, the folder's score layer
    (a classifier's head, or every head of a multihead folder) or None). The adapter's state dict is
    loaded with set_peft_model_state_dict, and every tensor in the file must land: a LoRA weight, or the head."""
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    _, path = saved.shareable_adapter(folder, manifest)
    config = LoraConfig.from_pretrained(path)
    # a classifier's config also saves its head (modules_to_save), which a causal LM does not have:
    # the head is taken out of the file below and kept apart
    config.modules_to_save, config.task_type = None, "CAUSAL_LM"
    state = load_file(path / "adapter_model.safetensors", device=str(shared.device))
    head = _pop_head(state, folder, manifest) if manifest["kind"] in _HEADED_KINDS else None
    if isinstance(shared, PeftModel):
        shared.add_adapter(name, config)
    else:
        shared = get_peft_model(shared, config, adapter_name=name)
    loaded = set_peft_model_state_dict(shared, state, adapter_name=name)
    created = [n for n, _ in shared.named_parameters() if f".{name}." in n]
    if loaded.unexpected_keys or len(created) != len(state):
        raise ValueError(f"{path}: {len(state)} LoRA tensors in the file, {len(created)} created for them, "
                         f"not loaded: {loaded.unexpected_keys[:5]}; the adapter does not fit this base")
    return shared, head


def _pop_head(state: dict[str, torch.Tensor], folder: Path, manifest: dict) -> torch.nn.Linear:
    """The saved score layer (weight and bias, as peft saves modules_to_save), removed from `state`:
    a classifier's head, or all heads of a multihead folder, one row per label."""
    head_name, rows = manifest["task"]["head"], _score_rows(manifest)
    prefix = f"base_model.model.{head_name}."
    tensors = {key.removeprefix(prefix): state.pop(key) for key in list(state) if key.startswith(prefix)}
    if "weight" not in tensors or set(tensors) - {"weight", "bias"}:
        raise ValueError(f"{folder}: the adapter file holds {sorted(tensors) or 'no tensors'} for the head "
                         f"{head_name!r}, not its weight (and bias); save the classifier again")
    weight = tensors["weight"]
    if weight.shape[0] != rows:
        raise ValueError(f"{folder}: the head has {weight.shape[0]} outputs for {rows} labels; save the model again")
    recorded = {dtype for key, dtype in manifest["parameter_dtypes"].items() if f".{head_name}." in key}
    return _frozen_linear(weight, tensors.get("bias"), getattr(torch, recorded.pop() if recorded else manifest["dtype"]))


def _frozen_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.nn.Linear:
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(weight)
        if bias is not None:
            head.bias.copy_(bias)
    return head.requires_grad_(False)


def _score_rows(manifest: dict) -> int:
    """How many rows a folder's score layer has: one per label (of every head, for a multihead folder)."""
    if manifest["kind"] == "multihead":
        return multihead.heads_of(manifest["task"])[-1].rows[1]
    return len(manifest["task"]["labels"])


def _rows_of(score: torch.nn.Linear, rows: slice) -> torch.nn.Linear:
    """A Linear of `score`'s rows `rows` alone: one head of a multihead score layer (a head's logits
    only ever see its own rows, so this computes exactly those logits)."""
    return _frozen_linear(score.weight[rows], None if score.bias is None else score.bias[rows], score.weight.dtype)


def _renamed_dtypes(name: str, manifest: dict) -> dict[str, str]:
    """The manifest's parameter dtypes under the shared model's names: the saved adapter's name
    replaced by the given one, the score layer left out (its dtype is the head's own)."""
    saved_name = manifest["weights"]["active"]
    head = manifest["task"].get("head") if manifest["kind"] in _HEADED_KINDS else None
    return {key.replace(f".{saved_name}.", f".{name}."): dtype for key, dtype in manifest["parameter_dtypes"].items()
            if not (head and f".{head}." in key)}


def _merge_dtypes(merged: dict[str, str], new: dict[str, str], folder: Path) -> dict[str, str]:
    clash = sorted(key for key in set(merged) & set(new) if merged[key] != new[key])
    if clash:
        raise ValueError(f"{folder} computes {clash[0]} in {new[clash[0]]}, another folder in {merged[clash[0]]}: "
                         f"the base parameters of tasks on one base must have the same dtypes")
    return {**merged, **new}


def _tasks(shared, name: str, folder: Path, manifest: dict, tokenizer, head: torch.nn.Linear | None,
           batch_size: int) -> list[Task]:
    """The Task objects of one folder, each a Classifier or Generator running through TaskView on the
    adapter `name`: one task, or one per head of a multihead folder ("NAME/<label field>")."""
    spec = manifest["task"]

    def classifier(task_name: str, head: torch.nn.Linear, labels, label_field: str) -> Task:
        clf = classify.Classifier(TaskView(shared, name, head, tokenizer.pad_token_id), tokenizer, list(labels),
                                  base_model=manifest["base_model"]["name"], max_length=spec["max_length"],
                                  label_field=label_field, text_fields=spec["text_fields"], batch_size=batch_size)
        return Task(task_name, "classifier", folder, name, classifier=clf)

    if manifest["kind"] == "multihead":
        return [classifier(f"{name}/{h.label_field}", _rows_of(head, h.slice), h.labels, h.label_field)
                for h in multihead.heads_of(spec)]
    if manifest["kind"] == "classifier":
        return [classifier(name, head, spec["labels"], spec["label_field"])]
    gen = sft.Generator(TaskView(shared, name), tokenizer, system=spec["system"], decoding=spec["decoding"])
    return [Task(name, "generator", folder, name, generator=gen)]


def _common_decoding(tasks: list[Task], overrides: dict) -> dict:
    """The saved decoding settings of the tasks in one batch, which must agree where not overridden."""
    settings: dict = {}
    for task in tasks:
        for key, value in task.generator.decoding.items():
            if key not in overrides and settings.setdefault(key, value) != value:
                raise ValueError(f"the tasks in this batch were saved with different {key} ({settings[key]!r} and "
                                 f"{value!r} for {task.name}): pass {key}=... for the whole batch")
    return {**settings, **overrides}


# ---------------------------------------------------------------- memory, measured
def loading_memory(folders: Mapping[str, str | Path], use: Callable[[str, object], None] | None = None) -> dict:
    """MiB held after loading (RSS on a CPU, allocated accelerator memory on a GPU; ftnb.memory
    probes, in this process): all folders on one base with MultiTaskModel, then, after freeing it, each
    folder with its own saved.load (its own base), one at a time: loaded, measured, handed to
    `use(name, loaded)` (to compare its outputs), freed. N separate models hold the sum of what each holds
    alone; loading them one at a time keeps this function at one model's memory, not N. Memory freed by an
    earlier load can only make the separate models look smaller, never the shared base.

    Usage: m = loading_memory({"category": a, "legal": b}); m["shared_mib"] / min(m["per_model_mib"].values())
    """
    from ftnb.memory import probe, release_memory

    def held(record) -> float:
        return record.accel_end_delta_mib if record.accel_end_delta_mib is not None else record.rss_end_delta_mib

    with probe(f"{len(folders)} tasks on one base (MultiTaskModel)") as shared:
        model = MultiTaskModel.from_folders(folders)
    del model
    release_memory()
    per_model = {}
    for name, folder in folders.items():
        with probe(f"saved.load {name}") as one:
            loaded = saved.load(folder)
        per_model[name] = held(one)
        if use is not None:
            use(name, loaded)
        del loaded
        release_memory()
    return {"tasks": len(folders), "per_model_mib": per_model, "separate_mib": sum(per_model.values()),
            "shared_mib": held(shared)}
