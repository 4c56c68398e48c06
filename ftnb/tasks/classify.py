"""Ticket classification plumbing for recipe 01: text formatting, labels, metrics, calibration,
zero-shot scoring, a weighted-loss Trainer, and the saved classifier.

Usage:
    from ftnb.tasks.classify import ticket_text, tokenize_split, evaluate, load_classifier
    train = tokenize_split(ds["train"], tok, "category", max_length=160)
    clf = TicketClassifier(model, tok, labels=TICKET_CATEGORIES, ...)
    clf.save("outputs/01_ticket_classification/classifier")
    load_classifier("outputs/01_ticket_classification/classifier").predict(["I was charged twice"])

A ticket is a dict with `subject` and `body` or a plain string. Long tickets are truncated
(subject first, then the start of the body) with a warning; nothing is dropped silently.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from datasets import Dataset
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support
from transformers import Trainer

from ftnb.data import TICKET_CATEGORIES, TICKET_PRIORITIES

Ticket = dict | str
LABELS: dict[str, tuple[str, ...]] = {"category": TICKET_CATEGORIES, "priority": TICKET_PRIORITIES}

# The binding definitions of data/tickets/README.md, also used in the zero-shot prompt.
DEFINITIONS: dict[str, dict[str, str]] = {
    "category": {
        "billing": "questions or problems about charges, invoices, receipts, payment methods, tax/VAT, "
                   "or the amount on an existing bill, where the customer does not ask for money back",
        "refund": "the customer asks for money back (full or partial), or about the status of a refund "
                  "already requested",
        "account_access": "cannot sign in, password reset, two-factor authentication, locked or suspended "
                          "account, changing the login email, SSO problems",
        "technical_issue": "the product, app, site or API malfunctions: errors, crashes, bugs, slowness, "
                           "sync or integration failures, data not saving",
        "shipping": "delivery of a physical order: tracking, delays, lost parcel, wrong address, damaged "
                    "in transit, customs",
        "product_question": "what the product does or how to use it: does it support X, how do I do Y, "
                            "compatibility, plan differences, stock or availability",
        "cancellation": "wants to cancel a subscription or an order, or close/delete the account, without "
                        "asking for money back as the main request",
        "feedback": "praise, complaints about the experience with no specific request, suggestions and "
                    "feature requests",
    },
    "priority": {
        "low": "informational, feedback, no time pressure",
        "normal": "an ordinary request or problem",
        "high": "blocked from core use, or money lost or at stake",
        "urgent": "business-wide outage, security incident such as account takeover or leaked data, "
                  "legal threat, or a deadline within hours",
    },
}
# Characters kept before tokenizing: a 1 MB pasted log costs seconds to tokenize for nothing.
_CHARS_PER_TOKEN_CAP = 12


# ---------------------------------------------------------------- text and labels
def ticket_text(ticket: Ticket) -> str:
    """Subject, blank line, body (an empty body leaves the subject alone); strings pass through.

    Usage: ticket_text({"subject": "Charged twice", "body": "Invoice INV-1 shows two charges"})
    """
    if isinstance(ticket, str):
        return ticket
    if not isinstance(ticket, dict) or not ({"subject", "body"} & set(ticket)):
        raise TypeError(f"a ticket is a dict with 'subject' and/or 'body', or a string; got {ticket!r:.80}")
    parts = [str(ticket.get("subject") or "").strip(), str(ticket.get("body") or "").strip()]
    return "\n\n".join(p for p in parts if p)


def label_maps(labels: Sequence[str]) -> tuple[dict[int, str], dict[str, int]]:
    """(id2label, label2id) for a model config. Usage: id2label, label2id = label_maps(LABELS["category"])"""
    return dict(enumerate(labels)), {label: i for i, label in enumerate(labels)}


def labels_for(label_field: str) -> tuple[str, ...]:
    """The allowed labels of `category` or `priority`, with a clear error for anything else."""
    if label_field not in LABELS:
        raise ValueError(f"label_field must be one of {list(LABELS)}, not {label_field!r}")
    return LABELS[label_field]


def label_ids(values: Iterable[str], labels: Sequence[str]) -> list[int]:
    """Map label strings to ids; an unknown label is an error naming it and its row."""
    index = {label: i for i, label in enumerate(labels)}
    ids = []
    for row, value in enumerate(values):
        if value not in index:
            raise ValueError(f"row {row}: unknown label {value!r}; allowed: {', '.join(labels)}. "
                             f"Fix the data or pass the right label_field.")
        ids.append(index[value])
    return ids


def encode(tokenizer, texts: Sequence[str], max_length: int) -> dict[str, list]:
    """Tokenize with truncation; warns (once per call) how many texts were cut to max_length.
    Right truncation keeps the subject and the start of the body, where customers state
    their request."""
    capped = [t[: max_length * _CHARS_PER_TOKEN_CAP] for t in texts]
    enc = tokenizer(capped, truncation=True, max_length=max_length + 1)  # one extra: detects cutting
    cut = sum(len(ids) > max_length for ids in enc["input_ids"])
    enc = {k: [v[:max_length] for v in values] for k, values in enc.items()}
    if cut:
        warnings.warn(f"{cut} of {len(texts)} ticket(s) longer than max_length={max_length} tokens "
                      f"were truncated (subject and start of the body kept)", stacklevel=2)
    return enc


def tokenize_split(split: Dataset, tokenizer, label_field: str, max_length: int) -> Dataset:
    """input_ids, attention_mask, labels and length (for length-grouped batches) of one split.

    Usage: train = tokenize_split(ds["train"], tok, "category", max_length=160)
    """
    labels = labels_for(label_field)
    ids = label_ids(split[label_field], labels)
    enc = encode(tokenizer, [ticket_text(r) for r in split], max_length)
    return Dataset.from_dict({**enc, "labels": ids, "length": [len(x) for x in enc["input_ids"]]})


def class_weights(train_labels: Sequence[int], num_labels: int) -> torch.Tensor:
    """'Balanced' weights n / (k * count): a class half as frequent weighs twice as much.
    A class absent from training is an error (its weight would be infinite)."""
    counts = np.bincount(np.asarray(train_labels), minlength=num_labels)
    if (counts == 0).any():
        raise ValueError(f"label ids {np.flatnonzero(counts == 0).tolist()} never occur in training")
    return torch.tensor(len(train_labels) / (num_labels * counts), dtype=torch.float32)


class WeightedTrainer(Trainer):
    """A Trainer whose cross-entropy weighs classes (`class_weights=None`: the plain loss).

    Usage: WeightedTrainer(model=m, args=args, ..., class_weights=class_weights(ids, 8))
    """

    def __init__(self, *args, class_weights: torch.Tensor | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.class_weights = class_weights

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.class_weights is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs.logits.float()
        loss = torch.nn.functional.cross_entropy(logits, labels, weight=self.class_weights.to(logits.device))
        return (loss, outputs) if return_outputs else loss


# ---------------------------------------------------------------- metrics
def trainer_metrics(eval_pred) -> dict[str, float]:
    """compute_metrics for the Trainer: accuracy and macro-F1 (the model-selection metric)."""
    logits, labels = eval_pred
    preds = np.asarray(logits).argmax(-1)
    return {"accuracy": accuracy_score(labels, preds),
            "macro_f1": f1_score(labels, preds, average="macro", zero_division=0)}


def evaluate(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> dict:
    """Accuracy, macro-F1 and per-class precision/recall/F1/support.

    Usage: m = evaluate(test["category"], clf.predict(test), labels); m["macro_f1"], m["per_class"]
    """
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=list(labels), zero_division=0)
    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, labels=list(labels), average="macro", zero_division=0)),
            "per_class": {lab: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                                "support": int(s[i])} for i, lab in enumerate(labels)}}


def _confidence_bins(probs: np.ndarray, correct: np.ndarray, n_bins: int):
    confidence = probs.max(1)
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, n_bins - 1)
    for b in range(n_bins):
        mask = which == b
        if mask.any():
            yield b, mask.sum(), confidence[mask].mean(), correct[mask].mean()


def expected_calibration_error(probs: np.ndarray, y_true: Sequence[int], n_bins: int = 10) -> float:
    """ECE: the support-weighted gap between confidence (top probability) and accuracy over
    equal-width confidence bins. 0 = a confidence of 0.8 is right 80% of the time."""
    probs = np.asarray(probs)
    correct = probs.argmax(1) == np.asarray(y_true)
    return float(sum(n * abs(conf - acc) for _, n, conf, acc in _confidence_bins(probs, correct, n_bins))
                 / len(probs))


def plot_reliability(probs: np.ndarray, y_true: Sequence[int], n_bins: int = 10, title: str = "", ax=None):
    """Reliability diagram: accuracy per confidence bin against the diagonal, ECE in the title."""
    import matplotlib.pyplot as plt

    probs = np.asarray(probs)
    correct = probs.argmax(1) == np.asarray(y_true)
    ax = ax or plt.subplots(figsize=(4, 4))[1]
    bins = list(_confidence_bins(probs, correct, n_bins))
    ax.bar([(b + 0.5) / n_bins for b, *_ in bins], [acc for *_, acc in bins], width=1 / n_bins,
           edgecolor="k", alpha=0.7, label="accuracy in bin")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ece = expected_calibration_error(probs, y_true, n_bins)
    ax.set(xlabel="confidence (top probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title=f"{title} ECE={ece:.3f}".strip())
    ax.legend(fontsize=8)
    return ax


def plot_confusion(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str], title: str = "", ax=None):
    """Confusion matrix (rows: true label, columns: predicted), counts in the cells."""
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    ax = ax or plt.subplots(figsize=(6.5, 5.5))[1]
    cm = confusion_matrix(y_true, y_pred, labels=list(labels))
    ConfusionMatrixDisplay(cm, display_labels=list(labels)).plot(ax=ax, xticks_rotation=45, colorbar=False)
    ax.set_title(title)
    return ax


def misclassified(tickets: Sequence[dict], y_pred: Sequence[str], probs: Sequence[dict[str, float]],
                  label_field: str, limit: int = 15, width: int = 140):
    """The most confident mistakes first: id, true, predicted, confidence, text (shortened)."""
    import pandas as pd

    rows = [{"id": t.get("id", i), "true": t[label_field], "predicted": p, "confidence": pr[p],
             "text": ticket_text(t).replace("\n", " ")[:width]}
            for i, (t, p, pr) in enumerate(zip(tickets, y_pred, probs)) if p != t[label_field]]
    frame = pd.DataFrame(rows, columns=["id", "true", "predicted", "confidence", "text"])
    return frame.sort_values("confidence", ascending=False).head(limit).round(3)


# ---------------------------------------------------------------- zero-shot
_MARK = "\u0000TICKET\u0000"


def zero_shot_prompt(tokenizer, labels: Sequence[str], definitions: dict[str, str]) -> tuple[str, str]:
    """(prefix, suffix template) of the chat prompt; the ticket goes between them. The prefix
    (instructions and definitions) is the same for every ticket, so it is computed once."""
    lines = "\n".join(f"- {label}: {definitions.get(label, '')}".rstrip(": ") for label in labels)
    user = (f"Classify the support ticket into exactly one of these labels.\n{lines}\n\n"
            f"Ticket:\n{_MARK}\n\nAnswer with the label only.")
    text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)
    prefix, suffix = text.split(_MARK)
    return prefix, suffix


@torch.no_grad()
def zero_shot_scores(model, tokenizer, texts: list[str], labels: list[str], definitions: dict[str, str],
                     batch_size: int = 8) -> np.ndarray:
    """P(label | prompt with the label definitions), from the causal LM's log-likelihood of
    each label's tokens (plus the end-of-turn token) after the chat template's assistant header,
    normalised over the labels. No generation, no parsing: every label gets a score.
    Returns an array (len(texts), len(labels)).

    Usage: zero_shot_scores(lm, tok, ["my card was charged twice"], labels, DEFINITIONS["category"])

    Cost: the shared prefix runs once; each batch runs its tickets once, then all labels at once
    on a copy of the cache (label tokens only).
    """
    model.eval()
    device = model.device
    prefix, suffix = zero_shot_prompt(tokenizer, labels, definitions)
    tok = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    label_tokens = [tok(label) + end for label in labels]
    prefix_ids = torch.tensor([tok(prefix)], device=device)
    prefix_cache = model(input_ids=prefix_ids, use_cache=True).past_key_values
    n_prefix, n_labels = prefix_ids.shape[1], len(labels)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = np.zeros((len(texts), n_labels))
    for start in range(0, len(texts), batch_size):
        chunk = [tok(t[:4000] + suffix) for t in texts[start:start + batch_size]]
        b, width = len(chunk), max(map(len, chunk))
        # left-pad the ticket part: the padding sits between prefix and ticket, masked out
        ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=device)
        full_mask = torch.cat([torch.ones(b, n_prefix, dtype=mask.dtype, device=device), mask], 1)
        positions = n_prefix + mask.cumsum(1) - 1
        cache = _copy_cache(prefix_cache, b)
        first = model(input_ids=ids, attention_mask=full_mask, position_ids=positions.clamp(min=0),
                      past_key_values=cache, use_cache=True)
        first_logp = torch.log_softmax(first.logits[:, -1].float(), -1)  # (b, vocab)
        # every label continuation, for every ticket: batch b * n_labels on a repeated cache
        cache = first.past_key_values
        cache.batch_repeat_interleave(n_labels)
        t_max = max(map(len, label_tokens))
        lab = torch.tensor([lt + [pad] * (t_max - len(lt)) for lt in label_tokens], device=device)
        lab_mask = torch.tensor([[1] * len(lt) + [0] * (t_max - len(lt)) for lt in label_tokens], device=device)
        lab, lab_mask = lab.repeat(b, 1), lab_mask.repeat(b, 1)
        seen = full_mask.repeat_interleave(n_labels, 0)
        last_pos = positions[:, -1:].repeat_interleave(n_labels, 0)
        rest = model(input_ids=lab, attention_mask=torch.cat([seen, lab_mask], 1),
                     position_ids=last_pos + torch.arange(1, t_max + 1, device=device),
                     past_key_values=cache, use_cache=True)
        rest_logp = torch.log_softmax(rest.logits[:, :-1].float(), -1)  # predicts label token 2..T
        token_logp = rest_logp.gather(-1, lab[:, 1:, None])[..., 0] * lab_mask[:, 1:]
        total = token_logp.sum(1).view(b, n_labels)
        total += first_logp[:, lab[:n_labels, 0]]
        out[start:start + b] = torch.softmax(total, -1).cpu().numpy()
    return out


def _copy_cache(cache, batch: int):
    """A deep copy of a batch-1 KV cache, repeated to `batch` rows (the original stays reusable)."""
    import copy

    copied = copy.deepcopy(cache)
    copied.batch_repeat_interleave(batch)
    return copied


# ---------------------------------------------------------------- the saved classifier
CONFIG_FILE = "classifier.json"


class TicketClassifier:
    """A sequence-classification model (with or without a LoRA adapter) and what it needs to
    turn tickets into labels: tokenizer, label list, max_length.

    Usage:
        clf = TicketClassifier(model, tok, labels, base_model="smollm2-135m-instruct",
                               quantization="nf4", max_length=160, label_field="category")
        clf.predict([{"subject": "Charged twice", "body": ""}, "Où est mon colis ?"])
        clf.save(path); load_classifier(path).predict_proba(["..."])
    """

    def __init__(self, model, tokenizer, labels: Sequence[str], base_model: str, quantization: str = "none",
                 max_length: int = 256, label_field: str = "category", batch_size: int = 16):
        self.model, self.tokenizer, self.labels = model, tokenizer, list(labels)
        self.base_model, self.quantization, self.max_length = base_model, quantization, max_length
        self.label_field, self.batch_size = label_field, batch_size

    @torch.no_grad()
    def probabilities(self, tickets: Sequence[Ticket]) -> np.ndarray:
        """Softmax probabilities, an array (len(tickets), len(labels)). Batches are formed from
        tickets of similar length (less padding), results come back in input order."""
        self.model.eval()
        texts = [ticket_text(t) for t in tickets]
        enc = encode(self.tokenizer, texts, self.max_length)["input_ids"]
        order = np.argsort([len(x) for x in enc], kind="stable")
        out = np.zeros((len(texts), len(self.labels)))
        device = next(self.model.parameters()).device
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            batch = self.tokenizer.pad({"input_ids": [enc[i] for i in idx]}, return_tensors="pt").to(device)
            logits = self.model(**batch).logits.float()
            out[idx] = torch.softmax(logits, -1).cpu().numpy()
        return out

    def predict_proba(self, tickets: Sequence[Ticket]) -> list[dict[str, float]]:
        """One {label: probability} dict per ticket."""
        return [dict(zip(self.labels, map(float, row))) for row in self.probabilities(_as_list(tickets))]

    def predict(self, tickets: Sequence[Ticket]) -> list[str]:
        """The most probable label per ticket."""
        return [self.labels[i] for i in self.probabilities(_as_list(tickets)).argmax(1)]

    def save(self, path: str | Path) -> Path:
        """Adapter (LoRA weights and the trained head, via modules_to_save), tokenizer and
        classifier.json (base model, quantization, labels, max_length) into `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        config = {"base_model": self.base_model, "quantization": self.quantization, "labels": self.labels,
                  "max_length": self.max_length, "label_field": self.label_field}
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        return path


def _as_list(tickets) -> list:
    return [tickets] if isinstance(tickets, (str, dict)) else list(tickets)


def load_classifier(path: str | Path, batch_size: int = 16) -> TicketClassifier:
    """Rebuild a saved TicketClassifier: base model (quantized as when trained), adapter and head.

    Usage: clf = load_classifier("outputs/01_ticket_classification/classifier"); clf.predict(["..."])
    """
    from peft import PeftModel, prepare_model_for_kbit_training

    from ftnb.models import load_model, load_tokenizer

    path = Path(path)
    if not (path / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{path} holds no {CONFIG_FILE}: not a folder written by TicketClassifier.save")
    config = json.loads((path / CONFIG_FILE).read_text())
    tokenizer = load_tokenizer(str(path))
    id2label, label2id = label_maps(config["labels"])
    base = load_model(config["base_model"], task="seq-cls", quantization=config["quantization"],
                      num_labels=len(id2label), id2label=id2label, label2id=label2id, tokenizer=tokenizer)
    if config["quantization"] != "none":
        # the same dtype casts as at training time, so reloaded predictions match exactly
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    model = PeftModel.from_pretrained(base, path).eval()
    return TicketClassifier(model, tokenizer, config["labels"], config["base_model"], config["quantization"],
                            config["max_length"], config["label_field"], batch_size)


# ---------------------------------------------------------------- demo
def build_demo(classifier: TicketClassifier, example: str = ""):
    """An ipywidgets box: ticket text in, label and one confidence bar per label out. It only
    reacts to clicks, so papermill runs it without waiting; `example` is classified at once.

    Usage: display(build_demo(clf, "My parcel never arrived"))
    """
    import ipywidgets as widgets

    text = widgets.Textarea(value=example, placeholder="Paste a ticket (subject on the first line)",
                            layout=widgets.Layout(width="100%", height="90px"))
    button = widgets.Button(description="Classify", button_style="primary")
    result = widgets.HTML()

    def show(_=None) -> None:
        probs = classifier.predict_proba([text.value])[0]
        bars = "".join(
            f"<div style='font-family:monospace'>{label:<17}"
            f"<span style='display:inline-block;background:#4c72b0;height:10px;width:{200 * p:.0f}px'></span>"
            f" {p:.2f}</div>" for label, p in sorted(probs.items(), key=lambda kv: -kv[1]))
        result.value = f"<b>{max(probs, key=probs.get)}</b>{bars}"

    button.on_click(show)
    if example:
        show()
    return widgets.VBox([text, button, result])
