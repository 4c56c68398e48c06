"""Sequence classification for any labels and text fields: text formatting, labels, metrics,
calibration, the TF-IDF baseline, zero-shot scoring and generative classification's training data, a
weighted-loss Trainer, and the saved classifier.

Usage:
    from ftnb.tasks.classify import Classifier, record_text, labels_for, tokenize_split, evaluate
    labels = labels_for("category", ds["train"], "tickets")   # labels.json order, else sorted values
    train = tokenize_split(ds["train"], tok, "category", labels, max_length=160, text_fields=["subject", "body"])
    clf = Classifier(model, tok, labels, base_model="smollm2-135m-instruct", ...)
    clf.save("outputs/01_ticket_classification/classifier")
    ftnb.saved.load("outputs/01_ticket_classification/classifier").predict(["I was charged twice"])

A record is a dict holding the text fields (joined in order, by default `subject` then `body`)
or a plain string. Long texts are truncated (the first field first) with a warning; nothing is
dropped silently.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from datasets import Dataset
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support
from sklearn.pipeline import make_pipeline
from transformers import Trainer

from ftnb.data import dataset_folder, read_labels
from ftnb.inference import left_pad
from ftnb.models import plain_forward, without_peft

Record = dict | str
ZERO_SHOT_FILE = "zero_shot_prompt.txt"
# The zero-shot prompt for data without its own zero_shot_prompt.txt; {labels} and {text} are filled in.
ZERO_SHOT_TEMPLATE = ("Classify the text into exactly one of these labels.\n{labels}\n\n"
                      "Text:\n{text}\n\nAnswer with the label only.")

# Characters kept before tokenizing: a 1 MB pasted log costs seconds to tokenize for nothing.
_CHARS_PER_TOKEN_CAP = 12
# Characters of a text that zero-shot scoring (and generative training) reads.
ZERO_SHOT_TEXT_CHARS = 4000


# ---------------------------------------------------------------- text and labels
def record_text(record: Record, text_fields: Sequence[str] = ("subject", "body")) -> str:
    """The record's text fields in order, separated by a blank line (empty ones left out);
    strings pass through. A missing field is an error naming it and the fields found.

    Usage: record_text({"subject": "Charged twice", "body": "Invoice INV-1 shows two charges"})
           record_text({"text": "book a table for two"}, text_fields=["text"])
    """
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise TypeError(f"a record is a dict with the fields {list(text_fields)}, or a string; got {record!r:.80}")
    missing = [name for name in text_fields if name not in record]
    if missing:
        raise ValueError(f"the record has no field {missing[0]!r} (fields found: {sorted(record)}); "
                         f"set text_fields to the fields that hold its text")
    parts = [str(record[name] or "").strip() for name in text_fields]
    return "\n\n".join(p for p in parts if p)


def label_maps(labels: Sequence[str]) -> tuple[dict[int, str], dict[str, int]]:
    """(id2label, label2id) for a model config. Usage: id2label, label2id = label_maps(["no", "yes"])"""
    return dict(enumerate(labels)), {label: i for i, label in enumerate(labels)}


def labels_for(label_field: str, train: Dataset, data_folder: str | Path | None = None) -> list[str]:
    """The labels of `label_field` in id order: as listed in the data folder's labels.json when it
    defines the field, else the sorted distinct values of the training split.

    Usage: labels = labels_for("category", ds["train"], "tickets")
    """
    defined = read_labels(data_folder).get(label_field) if data_folder is not None else None
    if defined:
        return list(defined)
    if label_field not in train.column_names:
        raise ValueError(f"label_field {label_field!r} is not a field of the data; "
                         f"fields: {', '.join(train.column_names)}")
    return sorted(set(train[label_field]))


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
    """Tokenize with the tokenizer's own truncation, which keeps the special tokens that close an
    input (an encoder's [SEP]); warns (once per call) how many texts were cut to max_length.
    Right truncation keeps the start of the text (for tickets the subject and the start of the
    body, where customers state their request).

    Usage: encode(tok, ["Charged twice\\n\\nInvoice INV-1 shows two charges"], max_length=160)["input_ids"]
    """
    char_cap = max_length * _CHARS_PER_TOKEN_CAP
    capped = [t[:char_cap] for t in texts]
    enc = tokenizer(capped, truncation=True, max_length=max_length)
    # one token over the limit tells which texts the limit cuts (a second pass, cheap next to a model)
    one_over = tokenizer(capped, truncation=True, max_length=max_length + 1)["input_ids"]
    cut = sum(len(ids) > max_length or len(text) > char_cap for ids, text in zip(one_over, texts))
    if cut:
        warnings.warn(f"{cut} of {len(texts)} text(s) longer than max_length={max_length} tokens were "
                      f"truncated (their start kept)", stacklevel=2)
    return dict(enc)


def tokenize_split(split: Dataset, tokenizer, label_field: str, labels: Sequence[str], max_length: int,
                   text_fields: Sequence[str] = ("subject", "body")) -> Dataset:
    """input_ids, attention_mask, labels and length (for length-grouped batches) of one split.

    Usage: train = tokenize_split(ds["train"], tok, "category", labels, max_length=160)
    """
    ids = label_ids(split[label_field], labels)
    enc = encode(tokenizer, [record_text(r, text_fields) for r in split], max_length)
    return Dataset.from_dict({**enc, "labels": ids, "length": [len(x) for x in enc["input_ids"]]})


def class_weights(train_labels: Sequence[int], num_labels: int) -> torch.Tensor:
    """'Balanced' weights n / (k * count): a class half as frequent weighs twice as much.
    A class absent from training is an error (its weight would be infinite)."""
    counts = np.bincount(np.asarray(train_labels), minlength=num_labels)
    if (counts == 0).any():
        raise ValueError(f"label ids {np.flatnonzero(counts == 0).tolist()} never occur in training")
    return torch.tensor(len(train_labels) / (num_labels * counts), dtype=torch.float32)


class WeightedTrainer(Trainer):
    """A Trainer whose cross-entropy weighs classes (`class_weights=None`: every class weighs 1).

    The loss of one optimizer step is the weighted mean over *all* its examples,
    sum(w[y] * nll) / sum(w[y]) over every micro-batch of the gradient accumulation (and every
    process), so micro-batch 4 x accumulation 2 takes the same step as batch 8. Averaging each
    micro-batch's own weighted mean would not: their total weights differ. Without weights it is
    the plain mean, which the stock Trainer gets wrong too: the sequence-classification models of
    transformers accept `num_items_in_batch` but ignore it, so the Trainer, trusting it, skips its
    division by the accumulation steps and the loss and gradient come out that many times too large.

    Usage: WeightedTrainer(model=m, args=args, ..., class_weights=class_weights(ids, 8))
    """

    # our loss is divided by the whole step's total weight: training_step must not divide it again
    loss_is_scaled_for_ga = True

    def __init__(self, *args, class_weights: torch.Tensor | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.class_weights = class_weights

    def _example_weights(self, labels: torch.Tensor) -> torch.Tensor:
        """Each example's weight in the loss: the class weight of its label, or 1."""
        if self.class_weights is None:
            return torch.ones(labels.shape, device=labels.device)
        return self.class_weights.to(labels.device)[labels]

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor:
        """The loss normaliser of one optimizer step (or one evaluation batch): the total weight of
        all its labels, over every micro-batch and process."""
        total = sum(self._example_weights(batch["labels"].to(device)).sum() for batch in batch_samples)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total).sum()
        return total

    def example_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Each example's cross-entropy, shaped like `labels` (a subclass may score several heads)."""
        return torch.nn.functional.cross_entropy(logits, labels, reduction="none",
                                                 label_smoothing=self.args.label_smoothing_factor)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        nll = self.example_losses(outputs.logits.float(), labels)
        weights = self._example_weights(labels)
        loss = (weights * nll).sum() / (weights.sum() if num_items_in_batch is None else num_items_in_batch)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages the gradients over processes
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


def predicted_labels(probabilities: np.ndarray, labels: Sequence[str]) -> list[str]:
    """The most probable label of each row (columns in `labels` order).

    Usage: predicted_labels(clf.probabilities(test), labels)
    """
    return [labels[i] for i in np.asarray(probabilities).argmax(1)]


def sklearn_probabilities(estimator, texts: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """A fitted scikit-learn classifier's probabilities with columns in `labels` order (scikit-learn
    sorts its classes alphabetically).

    Usage: sklearn_probabilities(tfidf, test_texts, labels)
    """
    return estimator.predict_proba(list(texts))[:, [list(estimator.classes_).index(label) for label in labels]]


def fit_tfidf(train_texts: Sequence[str], train_labels: Sequence[str], val_texts: Sequence[str],
              val_labels: Sequence[str], labels: Sequence[str], c_grid: Sequence[float],
              class_weight: str | None = None) -> tuple:
    """TF-IDF (word uni- and bigrams, sublinear term frequency) + logistic regression, fitted at every
    regularisation strength C of `c_grid`; the one with the best validation macro-F1 is returned (the
    smallest C among equals: the most regularised), with every C's validation macro-F1.

    Usage: tfidf, f1_by_c = fit_tfidf(train_texts, y_train, val_texts, y_val, labels, np.logspace(-1, 4, 6))
    """
    fitted, f1_by_c = {}, {}
    for c in c_grid:
        fitted[c] = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
                                  LogisticRegression(C=c, max_iter=2000, class_weight=class_weight)
                                  ).fit(list(train_texts), list(train_labels))
        f1_by_c[c] = evaluate(val_labels, list(fitted[c].predict(list(val_texts))), labels)["macro_f1"]
    return fitted[max(f1_by_c, key=f1_by_c.get)], f1_by_c


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


def blend(probabilities: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """The weighted mean of several classifiers' probabilities for the same rows (columns in one
    label order): an ensemble that needs no training.

    Usage: blend({"qlora": p1, "tfidf": p2}, {"qlora": 0.7, "tfidf": 0.3})
    """
    if set(weights) != set(probabilities) or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"give one non-negative weight per classifier ({sorted(probabilities)}), not all zero; "
                         f"got {weights}")
    shapes = {name: np.shape(p) for name, p in probabilities.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"the classifiers' probabilities must cover the same rows and labels; got shapes {shapes}")
    total = sum(weights.values())
    return sum(weights[name] / total * np.asarray(p) for name, p in probabilities.items())


def ensemble_weights(probabilities: dict[str, np.ndarray], y_true: Sequence[int], step: float = 0.1) -> dict:
    """Weights for blend(), chosen on held-out rows (validation, never test): every point of a grid
    over the simplex (weights in multiples of `step`, summing to 1), scored by the log-loss of the
    true labels. The log-loss rather than accuracy because it ranks near-ties that accuracy cannot
    tell apart on a few hundred rows. Returns {"weights", "log_loss", "single": each classifier's own log-loss}.

    Usage: ensemble_weights({"qlora": val_p1, "tfidf": val_p2}, label_ids(y_val, labels))["weights"]
    """
    names, units = list(probabilities), round(1 / step)
    if not 0 < step <= 1 or abs(units * step - 1) > 1e-9:
        raise ValueError(f"step must divide 1 (0.1, 0.25, 0.5), not {step}")
    truth = np.asarray(y_true)

    def log_loss(weights: dict[str, float]) -> float:
        chosen = blend(probabilities, weights)[np.arange(len(truth)), truth]
        return float(-np.log(np.clip(chosen, 1e-12, None)).mean())

    grid = [dict(zip(names, (round(k * step, 12) for k in split))) for split in _compositions(units, len(names))]
    best = min(grid, key=log_loss)  # the first of equals: the grid lists the earlier classifiers' weight first
    return {"weights": best, "log_loss": log_loss(best),
            "single": {name: log_loss({n: float(n == name) for n in names}) for name in names}}


def _compositions(total: int, parts: int):
    """Every way to write `total` as an ordered sum of `parts` non-negative integers."""
    if parts == 1:
        yield (total,)
        return
    for first in range(total, -1, -1):
        for rest in _compositions(total - first, parts - 1):
            yield (first, *rest)


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


def misclassified(records: Sequence[dict], y_pred: Sequence[str], probs: Sequence[dict[str, float]],
                  label_field: str, limit: int = 15, width: int = 140,
                  text_fields: Sequence[str] = ("subject", "body")):
    """The most confident mistakes first: id, true, predicted, confidence, text (shortened)."""
    import pandas as pd

    rows = [{"id": t.get("id", i), "true": t[label_field], "predicted": p, "confidence": pr[p],
             "text": record_text(t, text_fields).replace("\n", " ")[:width]}
            for i, (t, p, pr) in enumerate(zip(records, y_pred, probs)) if p != t[label_field]]
    frame = pd.DataFrame(rows, columns=["id", "true", "predicted", "confidence", "text"])
    return frame.sort_values("confidence", ascending=False).head(limit).round(3)


# ---------------------------------------------------------------- zero-shot
_MARK = "\u0000TEXT\u0000"


def zero_shot_template(data_folder: str | Path) -> str:
    """The data folder's zero_shot_prompt.txt (its wording of the task), else ZERO_SHOT_TEMPLATE.

    Usage: zero_shot_scores(lm, tok, texts, labels, definitions, template=zero_shot_template("tickets"))
    """
    path = dataset_folder(data_folder) / ZERO_SHOT_FILE
    return path.read_text(encoding="utf-8").rstrip() if path.exists() else ZERO_SHOT_TEMPLATE


def zero_shot_question(text: str, labels: Sequence[str], definitions: dict[str, str],
                       template: str = ZERO_SHOT_TEMPLATE) -> str:
    """The user message asking for `text`'s label: `template` with {labels} (one "- label: definition"
    line each) and {text} filled in, once each.

    Usage: zero_shot_question("I was charged twice", labels, read_labels("tickets")["category"])
    """
    if template.count("{labels}") != 1 or template.count("{text}") != 1:
        raise ValueError(f"a zero-shot template needs {{labels}} and {{text}} exactly once each; got {template!r:.200}")
    lines = "\n".join(f"- {label}: {definitions.get(label, '')}".rstrip(": ") for label in labels)
    return template.replace("{labels}", lines).replace("{text}", text)


def zero_shot_prompt(tokenizer, labels: Sequence[str], definitions: dict[str, str],
                     template: str = ZERO_SHOT_TEMPLATE) -> tuple[str, str]:
    """(prefix, suffix template) of the chat prompt; the text goes between them. The prefix
    (instructions and definitions) is the same for every text, so it is computed once."""
    user = zero_shot_question(_MARK, labels, definitions, template)
    text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)
    prefix, suffix = text.split(_MARK)
    return prefix, suffix


def generative_examples(records: Iterable[dict], label_field: str, labels: Sequence[str],
                        definitions: dict[str, str], template: str = ZERO_SHOT_TEMPLATE,
                        text_fields: Sequence[str] = ("subject", "body")) -> Dataset:
    """Generative classification's training data: each record as a chat prompt/completion pair, the
    zero-shot question (label definitions included) answered by the record's label word. Trained with
    TRL's SFTTrainer and `completion_only_loss=True`, the model learns the very answer that
    zero_shot_scores reads, so the same scorer gives the tuned model's probabilities over every label,
    and the model starts from what it already knows about the label words.

    Usage: train = generative_examples(ds["train"], "category", labels, definitions, zero_shot_template("tickets"))
           SFTTrainer(model=lm, args=SFTConfig(completion_only_loss=True, ...), train_dataset=train)
    """
    examples = []
    for record in records:
        label = record[label_field]
        if label not in labels:
            raise ValueError(f"label {label!r} of {record.get('id', record)!r:.80} is not one of {list(labels)}")
        text = record_text(record, text_fields)[:ZERO_SHOT_TEXT_CHARS]  # as zero_shot_logliks cuts it
        question = zero_shot_question(text, labels, definitions, template)
        examples.append({"prompt": [{"role": "user", "content": question}],
                         "completion": [{"role": "assistant", "content": label}]})
    return Dataset.from_list(examples)


ZERO_SHOT_NORMALIZATIONS = ("sum", "mean")


def zero_shot_scores(model, tokenizer, texts: list[str], labels: list[str], definitions: dict[str, str],
                     batch_size: int = 8, template: str = ZERO_SHOT_TEMPLATE, normalize: str = "sum") -> np.ndarray:
    """P(label | prompt with the label definitions), from the causal LM's log-likelihood of
    each label's tokens (plus the end-of-turn token) after the chat template's assistant header,
    normalised over the labels. No generation, no parsing: every label gets a score.
    `normalize="mean"` divides each label's log-likelihood by its token count (see
    zero_shot_probabilities). Returns an array (len(texts), len(labels)).

    Usage: zero_shot_scores(lm, tok, ["my card was charged twice"], labels, read_labels("tickets")["category"])
    """
    logliks = zero_shot_logliks(model, tokenizer, texts, labels, definitions, batch_size, template)
    return zero_shot_probabilities(logliks, zero_shot_label_lengths(tokenizer, labels), normalize)


def zero_shot_label_lengths(tokenizer, labels: Sequence[str]) -> list[int]:
    """Tokens scored per label: the label's own tokens plus the end-of-turn token.

    Usage: zero_shot_probabilities(logliks, zero_shot_label_lengths(tok, labels), "mean")
    """
    return [len(ids) for ids in _label_token_ids(tokenizer, labels)]


def _label_token_ids(tokenizer, labels: Sequence[str]) -> list[list[int]]:
    """The token ids scored for each label: its own tokens, then the end-of-turn token."""
    end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [tokenizer(label, add_special_tokens=False)["input_ids"] + end for label in labels]


def zero_shot_probabilities(logliks: np.ndarray, label_lengths: Sequence[int], normalize: str = "sum") -> np.ndarray:
    """Softmax over the labels of their log-likelihoods (rows: texts, columns: labels).

    "sum" scores each label by the log-probability of its whole token sequence, which favours
    labels of few tokens: every extra token multiplies in a probability below 1. "mean" divides
    by the label's token count (the per-token average), which removes that length penalty.

    Usage: probs = zero_shot_probabilities(logliks, zero_shot_label_lengths(tok, labels), normalize="mean")
    """
    if normalize not in ZERO_SHOT_NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {ZERO_SHOT_NORMALIZATIONS}, not {normalize!r}")
    scores = torch.as_tensor(np.asarray(logliks, dtype=np.float64))
    if normalize == "mean":
        scores = scores / torch.tensor(label_lengths, dtype=scores.dtype)
    return torch.softmax(scores, -1).numpy()


def best_zero_shot_normalization(logliks: np.ndarray, label_lengths: Sequence[int], truth: Sequence[str],
                                 labels: Sequence[str]) -> tuple[str, dict[str, float]]:
    """The normalisation of zero_shot_probabilities with the higher macro-F1 against `truth` (validation
    labels, never test), "sum" on a tie, and each normalisation's macro-F1.

    Usage: normalize, f1 = best_zero_shot_normalization(val_logliks, lengths, val["category"], labels)
    """
    f1 = {normalize: evaluate(truth, predicted_labels(zero_shot_probabilities(logliks, label_lengths, normalize),
                                                      labels), labels)["macro_f1"]
          for normalize in ZERO_SHOT_NORMALIZATIONS}
    return max(f1, key=f1.get), f1


@torch.no_grad()
def zero_shot_logliks(model, tokenizer, texts: list[str], labels: list[str], definitions: dict[str, str],
                      batch_size: int = 8, template: str = ZERO_SHOT_TEMPLATE) -> np.ndarray:
    """Each label's summed log-likelihood (its tokens plus the end-of-turn token) as the answer to
    the zero-shot prompt of each text, an array (len(texts), len(labels)). zero_shot_probabilities
    turns it into probabilities, with either normalisation, without scoring again.

    Usage: logliks = zero_shot_logliks(lm, tok, texts, labels, definitions, template=zero_shot_template("tickets"))

    Cost: the shared prefix runs once and its key/value cache serves every batch; each batch runs
    its texts once, then one short pass per label on that batch's cache, which is cut back after
    each label. Memory stays at one batch's cache: no copy per label, no logits for the text tokens.
    """
    model.eval()
    device = model.device
    prefix, suffix = zero_shot_prompt(tokenizer, labels, definitions, template)
    tok = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    label_tokens = _label_token_ids(tokenizer, labels)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prefix_ids = torch.tensor([tok(prefix)], device=device)
    n_prefix, rows = prefix_ids.shape[1], min(batch_size, len(texts))
    cache = model(input_ids=prefix_ids, use_cache=True, logits_to_keep=1).past_key_values
    cache.batch_repeat_interleave(rows)
    out = np.zeros((len(texts), len(labels)))
    for start in range(0, len(texts), batch_size):
        chunk = [tok(t[:ZERO_SHOT_TEXT_CHARS] + suffix) for t in texts[start:start + batch_size]]
        b, width = len(chunk), max(map(len, chunk))
        if b < rows:  # the last, shorter batch
            cache.batch_select_indices(torch.arange(b, device=device))
            rows = b
        # left-pad the text part: the padding sits between prefix and text, masked out
        ids, mask = left_pad(chunk, pad, device)
        seen = torch.cat([torch.ones(b, n_prefix, dtype=mask.dtype, device=device), mask], 1)
        positions = n_prefix + mask.cumsum(1) - 1
        first = model(input_ids=ids, attention_mask=seen, position_ids=positions.clamp(min=0),
                      past_key_values=cache, use_cache=True, logits_to_keep=1)
        first_logp = torch.log_softmax(first.logits[:, -1].float(), -1)  # (b, vocab): predicts token 1
        total = first_logp[:, [lt[0] for lt in label_tokens]]
        for j, target in enumerate(label_tokens):
            total[:, j] += _continuation_logprob(model, cache, target, seen, positions[:, -1:])
        cache.crop(-width)  # back to the prefix for the next batch
        out[start:start + b] = total.cpu().numpy()
    return out


def _continuation_logprob(model, cache, target: list[int], seen: torch.Tensor,
                          last_position: torch.Tensor) -> torch.Tensor:
    """Sum of log P(target[k] | context, target[:k]) for k >= 1, per row of the cached context
    (`seen` its attention mask, `last_position` its last position id); the first target token's
    probability comes from the context pass. The cache is left as it was."""
    if len(target) < 2:
        return torch.zeros(seen.shape[0], device=seen.device)
    b, n, device = seen.shape[0], len(target) - 1, seen.device
    ids = torch.tensor([target[:-1]], device=device).expand(b, n)  # the last token only gets predicted
    step = model(input_ids=ids, attention_mask=torch.cat([seen, torch.ones_like(ids)], 1),
                 position_ids=last_position + torch.arange(1, n + 1, device=device),
                 past_key_values=cache, use_cache=True)
    cache.crop(-n)
    logp = torch.log_softmax(step.logits.float(), -1)
    return logp.gather(-1, torch.tensor(target[1:], device=device).expand(b, n)[..., None])[..., 0].sum(1)


# ---------------------------------------------------------------- the saved classifier
# the head module names a sequence-classification model may have (decoders: score, encoders: classifier)
HEAD_NAMES = ("score", "classifier")


class Classifier:
    """A sequence-classification model (with or without a LoRA adapter) and what it needs to
    turn records into labels: tokenizer, label list, text fields, max_length.

    Usage:
        clf = Classifier(model, tok, labels, base_model="smollm2-135m-instruct", label_field="category",
                         text_fields=["subject", "body"], max_length=160)
        clf.predict([{"subject": "Charged twice", "body": ""}, "Où est mon colis ?"])
        clf.save(path); ftnb.saved.load(path).predict_proba(["..."])
    """

    def __init__(self, model, tokenizer, labels: Sequence[str], base_model: str, max_length: int = 256,
                 label_field: str = "category", text_fields: Sequence[str] = ("subject", "body"),
                 batch_size: int = 16):
        # without a Trainer's autocast wrapper: this object predicts exactly as its copy from ftnb.saved.load will
        self.model = plain_forward(model)
        self.tokenizer, self.labels = tokenizer, list(labels)
        self.base_model, self.max_length, self.label_field = base_model, max_length, label_field
        self.text_fields, self.batch_size = list(text_fields), batch_size

    def probabilities(self, records: Sequence[Record]) -> np.ndarray:
        """Softmax probabilities, an array (len(records), len(labels))."""
        logits = predict_logits(self.model, self.tokenizer, records, self.text_fields, self.max_length,
                                self.batch_size)
        return torch.softmax(torch.from_numpy(logits), -1).numpy().astype(np.float64)

    def predict_proba(self, records: Sequence[Record]) -> list[dict[str, float]]:
        """One {label: probability} dict per record."""
        return [dict(zip(self.labels, map(float, row))) for row in self.probabilities(_as_list(records))]

    def predict(self, records: Sequence[Record]) -> list[str]:
        """The most probable label per record."""
        return predicted_labels(self.probabilities(_as_list(records)), self.labels)

    def save(self, path: str | Path) -> Path:
        """Adapter (LoRA weights and the trained head) or full model, tokenizer, and the
        ftnb_model.json manifest (see ftnb.saved) into `path`; ftnb.saved.load reads it back.
        A head left out of the adapter would reload random: that is an error here, not later."""
        from ftnb import saved

        task = {"head": saved_head_name(self.model), "labels": self.labels, "label_field": self.label_field,
                "text_fields": self.text_fields, "max_length": self.max_length, "pooling": pooling_of(self.model)}
        return saved.save(path, self.model, self.tokenizer, "classifier", self.base_model, task)


def saved_head_name(model) -> str:
    """The name of the model's classification head, checked to be saved with its adapter: a head
    left out of the adapter would reload random, so that is an error here, not at reload.

    Usage: task = {"head": saved_head_name(peft_model), ...}
    """
    head = _head_name(model)
    if hasattr(model, "peft_config"):
        kept = set().union(*(c.modules_to_save or [] for c in model.peft_config.values()))
        if head not in kept:
            raise ValueError(f"the adapter does not save the trained head {head!r}, so a reload would get a "
                             f"random one: create the LoraConfig with modules_to_save=[{head!r}]")
    return head


def _head_name(model) -> str:
    """The attribute name of the model's classification head ("score" for decoders, "classifier" for BERT)."""
    found = [name for name in HEAD_NAMES if hasattr(without_peft(model), name)]
    if not found:
        raise ValueError(f"the model has no classification head named {' or '.join(HEAD_NAMES)}")
    return found[0]


# what a classification head reads: the last real token's hidden state (the model's own read-out) or the mean
# of every real token's (use_mean_pooling)
POOLINGS = ("last", "mean")


def use_pooling(model: torch.nn.Module, pooling: str) -> torch.nn.Module:
    """The model reading `pooling` ("last": as it is; "mean": use_mean_pooling). Returns the model.

    Usage: model = use_pooling(peft_model, "mean")
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r}: choose one of {POOLINGS}")
    return use_mean_pooling(model) if pooling == "mean" else model


def pooling_of(model: torch.nn.Module) -> str:
    """"mean" for a model given use_mean_pooling, otherwise "last" (what a saved classifier records)."""
    return "mean" if getattr(model, "ftnb_mean_pooling", False) else "last"


def use_mean_pooling(model: torch.nn.Module) -> torch.nn.Module:
    """Make a *ForSequenceClassification model (peft-wrapped or not) read the mean of its tokens' hidden
    states instead of its last token. The head is linear, so the mean over the attention mask of the
    per-token logits it computes is the head applied to the mean hidden state; a hook puts that mean
    at every position, so the model's own last-token read-out returns it. In place; returns the model.
    `Classifier.save` records it ("pooling": "mean") and `ftnb.saved.load` applies it again.

    Usage: model = use_mean_pooling(get_peft_model(model, LoraConfig(task_type="SEQ_CLS", modules_to_save=["score"])))
    """
    head = getattr(without_peft(model), _head_name(model))
    mask = {}

    def remember_mask(module, args, kwargs) -> None:
        # forward(input_ids, attention_mask, ...): the mask comes by keyword (Trainer, predict_logits) or second
        positional = args[1] if len(args) > 1 else None
        mask["current"] = kwargs.get("attention_mask", positional)

    def mean_over_tokens(module, inputs, logits: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 3:  # not per-token logits (batch, tokens, labels): the head called on its own
            return logits
        keep = mask.get("current")
        keep = torch.ones(logits.shape[:2], device=logits.device) if keep is None else keep
        weights = keep.to(torch.float32).unsqueeze(-1)
        mean = (logits.float() * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp(min=1)
        return mean.to(logits.dtype).expand_as(logits)

    model.register_forward_pre_hook(remember_mask, with_kwargs=True)
    head.register_forward_hook(mean_over_tokens)
    model.ftnb_mean_pooling = True
    return model


@torch.no_grad()
def predict_logits(model, tokenizer, records: Sequence[Record], text_fields: Sequence[str], max_length: int,
                   batch_size: int = 16) -> np.ndarray:
    """A classification model's logits (float32), an array (len(records), outputs). Batches are formed
    from records of similar length (less padding), results come back in input order.

    Usage: predict_logits(clf_model, tok, tickets, ["subject", "body"], max_length=128)
    """
    model.eval()
    texts = [record_text(r, text_fields) for r in records]
    enc = encode(tokenizer, texts, max_length)["input_ids"]
    order = np.argsort([len(x) for x in enc], kind="stable")
    out = np.zeros((len(texts), model.config.num_labels), dtype=np.float32)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = tokenizer.pad({"input_ids": [enc[i] for i in idx]}, return_tensors="pt").to(device)
        out[idx] = model(**batch).logits.float().cpu().numpy()
    return out


def _as_list(records) -> list:
    return [records] if isinstance(records, (str, dict)) else list(records)


# ---------------------------------------------------------------- demo
def build_demo(classifier: Classifier, example: str = ""):
    """An ipywidgets box: a text in, its label and one confidence bar per label out. It only
    reacts to clicks, so papermill runs it without waiting; `example` is classified at once.

    Usage: display(build_demo(clf, "My parcel never arrived"))
    """
    import ipywidgets as widgets

    text = widgets.Textarea(value=example, placeholder="Paste a text to classify",
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
