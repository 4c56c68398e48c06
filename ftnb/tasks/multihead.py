"""One shared LoRA adapter with several classification heads: a ticket's category and its priority
from one backbone pass.

The heads are rows of ONE `score` layer (no bias, as in LlamaForSequenceClassification): rows 0-7 the
category head, rows 8-11 the priority head. Stacking them is exactly one `Linear` per head (each
head's logits only see its own rows), and it keeps everything of the single-task classifier:
transformers pools the hidden state of the last non-pad token, peft trains and saves the layer
(`modules_to_save=["score"]`), and `ftnb.saved` reloads it. Only three things differ: each head's
softmax covers its own rows, the loss is the mean over heads of each head's cross-entropy, and the
dataset's `labels` holds one row index per head (category id, 8 + priority id).

Usage:
    from ftnb.tasks import multihead
    heads = multihead.build_heads({"category": category_labels, "priority": priority_labels})
    model = load_model(name, task="seq-cls", quantization="nf4", tokenizer=tok, **multihead.model_labels(heads))
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", ..., modules_to_save=["score"]))
    train = multihead.tokenize_split(ds["train"], tok, heads, max_length=128)
    trainer = multihead.MultiHeadTrainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                                         data_collator=DataCollatorWithPadding(tok), heads=heads,
                                         compute_metrics=multihead.trainer_metrics(heads))
    clf = multihead.MultiHeadClassifier(model, tok, heads, base_model=name, max_length=128)
    clf.predict([ticket])    # [{"category": "billing", "priority": "high"}]
    clf.save(folder); ftnb.saved.load(folder).probabilities([ticket])["priority"]
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from datasets import Dataset

from ftnb.models import plain_forward
from ftnb.tasks.classify import (Record, WeightedTrainer, _as_list, class_weights, encode, evaluate, label_ids,
                                 predict_logits, predicted_labels, record_text, saved_head_name)


@dataclass(frozen=True)
class Head:
    """One classification head: the field it predicts, its labels, and its rows [start, stop) of the score layer."""

    label_field: str
    labels: tuple[str, ...]
    rows: tuple[int, int]

    @property
    def slice(self) -> slice:
        return slice(*self.rows)


def build_heads(labels_by_field: dict[str, Sequence[str]]) -> list[Head]:
    """The heads, their rows stacked in the order given.

    Usage: build_heads({"category": labels_for("category", train, "tickets"), "priority": [...]})
    """
    if not labels_by_field:
        raise ValueError("give at least one head: {label_field: labels}")
    heads, start = [], 0
    for field, labels in labels_by_field.items():
        if len(labels) < 2:
            raise ValueError(f"head {field!r} needs at least two labels, got {list(labels)}")
        heads.append(Head(field, tuple(labels), (start, start + len(labels))))
        start += len(labels)
    return heads


def heads_of(task: dict) -> list[Head]:
    """The heads a saved manifest's task records, checked to tile the score layer's rows in order.

    Usage: heads_of(ftnb.saved.read_manifest(folder)["task"])
    """
    heads = build_heads({h["label_field"]: h["labels"] for h in task["heads"]})
    recorded = [tuple(h["rows"]) for h in task["heads"]]
    if recorded != [h.rows for h in heads]:
        raise ValueError(f"the manifest's head rows {recorded} do not match its labels (expected "
                         f"{[h.rows for h in heads]}); save the model again")
    return heads


def model_labels(heads: Sequence[Head]) -> dict:
    """num_labels, id2label and label2id for the model config: one output per row, named "field=label".

    Usage: load_model(name, task="seq-cls", **model_labels(heads))
    """
    names = [f"{h.label_field}={label}" for h in heads for label in h.labels]
    return {"num_labels": len(names), "id2label": dict(enumerate(names)),
            "label2id": {name: i for i, name in enumerate(names)}}


def tokenize_split(split: Dataset, tokenizer, heads: Sequence[Head], max_length: int,
                   text_fields: Sequence[str] = ("subject", "body")) -> Dataset:
    """input_ids, attention_mask, length and `labels`: per record one score-layer row per head.

    Usage: train = tokenize_split(ds["train"], tok, heads, max_length=128)
    """
    per_head = [[h.rows[0] + i for i in label_ids(split[h.label_field], h.labels)] for h in heads]
    enc = encode(tokenizer, [record_text(r, text_fields) for r in split], max_length)
    return Dataset.from_dict({**enc, "labels": [list(row) for row in zip(*per_head)],
                              "length": [len(x) for x in enc["input_ids"]]})


def head_class_weights(records: Dataset, heads: Sequence[Head]) -> torch.Tensor:
    """Balanced class weights of every head from the label fields of `records`, one per score-layer
    row (for MultiHeadTrainer's class_weights). A label absent from `records` is an error.

    Usage: MultiHeadTrainer(..., heads=heads, class_weights=head_class_weights(ds["train"], heads))
    """
    return torch.cat([class_weights(label_ids(records[h.label_field], h.labels), len(h.labels)) for h in heads])


class MultiHeadTrainer(WeightedTrainer):
    """A WeightedTrainer whose loss is, over every example and head, the (class-weighted) mean of
    each head's own cross-entropy: without class weights, the mean over heads of each head's mean
    loss. The gradient-accumulation normalisation of WeightedTrainer carries over unchanged (it
    sums the weights of every label, here of every head).

    Usage: MultiHeadTrainer(model=m, args=args, train_dataset=train, heads=heads, compute_metrics=trainer_metrics(heads))
    """

    def __init__(self, *args, heads: Sequence[Head], **kwargs):
        super().__init__(*args, **kwargs)
        self.heads = list(heads)

    def example_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(batch, heads): each head's cross-entropy over its own rows."""
        return torch.stack([super(MultiHeadTrainer, self).example_losses(logits[:, h.slice], labels[:, k] - h.rows[0])
                            for k, h in enumerate(self.heads)], 1)


def head_probabilities(logits: np.ndarray, heads: Sequence[Head]) -> dict[str, np.ndarray]:
    """{label_field: softmax over that head's rows}, from logits (n, rows)."""
    logits = torch.from_numpy(np.asarray(logits, dtype=np.float32))
    return {h.label_field: torch.softmax(logits[:, h.slice], -1).numpy().astype(np.float64) for h in heads}


def trainer_metrics(heads: Sequence[Head]) -> Callable[..., dict[str, float]]:
    """compute_metrics for the Trainer: each head's accuracy and macro-F1, and `macro_f1`, their
    mean (the model-selection metric: both tasks count alike).

    Usage: MultiHeadTrainer(..., compute_metrics=trainer_metrics(heads))
    """

    def metrics(eval_pred) -> dict[str, float]:
        logits, rows = eval_pred
        out = {}
        for k, h in enumerate(heads):
            truth = [h.labels[i] for i in np.asarray(rows)[:, k] - h.rows[0]]
            scores = evaluate(truth, predicted_labels(np.asarray(logits)[:, h.slice], h.labels), h.labels)
            out[f"{h.label_field}_accuracy"], out[f"{h.label_field}_macro_f1"] = scores["accuracy"], scores["macro_f1"]
        out["macro_f1"] = float(np.mean([out[f"{h.label_field}_macro_f1"] for h in heads]))
        return out

    return metrics


class MultiHeadClassifier:
    """A classification model with several heads on one adapter, and what it needs to turn records
    into one label per head: tokenizer, heads, text fields, max_length.

    Usage:
        clf = MultiHeadClassifier(model, tok, heads, base_model="smollm2-135m-instruct", max_length=128)
        clf.predict(["My card was charged twice, fix it today"])   # [{"category": ..., "priority": ...}]
        clf.probabilities(tickets)["priority"]                     # (n, 4) array
        clf.save(path); ftnb.saved.load(path)
    """

    def __init__(self, model, tokenizer, heads: Sequence[Head], base_model: str, max_length: int = 256,
                 text_fields: Sequence[str] = ("subject", "body"), batch_size: int = 16):
        rows = model.config.num_labels
        if heads[-1].rows[1] != rows:
            raise ValueError(f"the heads cover {heads[-1].rows[1]} rows but the model's score layer has {rows}: "
                             f"load the model with **model_labels(heads)")
        # without a Trainer's autocast wrapper: this object predicts exactly as its copy from ftnb.saved.load will
        self.model, self.tokenizer, self.heads = plain_forward(model), tokenizer, list(heads)
        self.base_model, self.max_length = base_model, max_length
        self.text_fields, self.batch_size = list(text_fields), batch_size

    def probabilities(self, records: Sequence[Record]) -> dict[str, np.ndarray]:
        """{label_field: softmax probabilities (len(records), len(labels))}, one backbone pass for all heads."""
        logits = predict_logits(self.model, self.tokenizer, _as_list(records), self.text_fields, self.max_length,
                                self.batch_size)
        return head_probabilities(logits, self.heads)

    def predict_proba(self, records: Sequence[Record], label_field: str) -> list[dict[str, float]]:
        """One {label: probability} dict per record, for one head."""
        head = self.head(label_field)
        probs = self.probabilities(records)[label_field]
        return [dict(zip(head.labels, map(float, row))) for row in probs]

    def predict(self, records: Sequence[Record]) -> list[dict[str, str]]:
        """The most probable label of every head, per record: [{label_field: label}]."""
        probs = self.probabilities(records)
        by_head = {h.label_field: predicted_labels(probs[h.label_field], h.labels) for h in self.heads}
        return [dict(zip(by_head, labels)) for labels in zip(*by_head.values())]

    def head(self, label_field: str) -> Head:
        """The head that predicts `label_field`; an unknown one is an error listing the heads."""
        found = [h for h in self.heads if h.label_field == label_field]
        if not found:
            raise KeyError(f"no head {label_field!r}; this model's heads: {', '.join(h.label_field for h in self.heads)}")
        return found[0]

    def save(self, path: str | Path) -> Path:
        """Adapter (LoRA and the score layer holding every head), tokenizer and the ftnb_model.json
        manifest (kind "multihead", see ftnb.saved); ftnb.saved.load reads it back."""
        from ftnb import saved

        task = {"head": saved_head_name(self.model),
                "heads": [{"label_field": h.label_field, "labels": list(h.labels), "rows": list(h.rows)}
                          for h in self.heads],
                "text_fields": self.text_fields, "max_length": self.max_length}
        return saved.save(path, self.model, self.tokenizer, "multihead", self.base_model, task)
