"""Regularisation, label smoothing and more varied training tickets for recipe 01's head, compared on validation.

The candidates section 2 of recipe 01 still had to measure for tickets unlike the training set. Four fine-tunes
of `generative_classification.py`'s head (NF4 SmolLM2 with LoRA r=16 on every linear layer, class-weighted loss,
last-token read-out), each on the same number of training tickets and optimizer steps, differing in one thing:
  recipe            recipe 01's settings (LoRA dropout 0.05, no weight decay, hard labels);
  label smoothing   targets of 0.9 on the label and 0.1 spread over all eight (`label_smoothing_factor=0.1`);
  regularised       LoRA dropout 0.2 and AdamW weight decay 0.1 on the adapters;
  varied tickets    half the training tickets rewritten as they might arrive by other channels (`vary`): in a
                    reply thread with a quoted answer, forwarded, as a chat transcript, with a greeting and a
                    signature, in lower case, with typos. The rewrites imitate the channels that the
                    out-of-distribution datasheet lists, never its tickets' text, and keep each label.
Beside them TF-IDF + logistic regression on the plain and on the varied tickets (C chosen on validation).
Every model predicts on up to 512 tokens per ticket, as recipe 01 does. Macro-F1 with bootstrap 95% intervals,
paired differences and McNemar tests, on validation; `--ood` also scores the out-of-distribution tickets
(`data/tickets_ood`): run it once, after every setting is fixed.

Usage: flock /tmp/ftnb-cpu.lock .venv/bin/python benchmarks/regularisation.py --train-limit 640 --ood
       (writes benchmarks/regularisation.json; 28 min on 2 idle cores)
       --train-limit 8 --eval-limit 8 --batch-size 2 --grad-accum 1 --out /tmp/check.json checks it in 5 minutes
"""
from __future__ import annotations

import random
from pathlib import Path

from datasets import Dataset
from generative_classification import (LABEL_FIELD, MODEL, SEED, arguments, load_tickets, report, result_of,
                                       head_probabilities, tfidf_probabilities)

from ftnb.models import load_tokenizer
from ftnb.tasks import classify

OUT = Path(__file__).with_suffix(".json")
VARIED_SHARE = 0.5  # half the tickets rewritten: the model still sees how plain tickets read
CANDIDATES = {  # name: train_head's keyword arguments
    "recipe": {},
    "label smoothing": {"label_smoothing_factor": 0.1},
    "regularised": {"lora_dropout": 0.2, "weight_decay": 0.1},
    "varied tickets": {},
}
PAIRS = [(name, "recipe") for name in list(CANDIDATES)[1:]] + [(name, "TF-IDF") for name in CANDIDATES] \
    + [("varied tickets", "TF-IDF on varied tickets"), ("TF-IDF on varied tickets", "TF-IDF")]

GREETINGS = ["Hi,", "Hello,", "Hi team,", "Dear support,", "Good morning,", "Hey there,"]
SIGN_OFFS = ["Thanks,\nSam", "Best regards,\nA. Kowalski\nOperations Manager", "Cheers\nJo",
             "Kind regards,\nPriya Nair\n\nSent from my phone", "Thank you!\n-- \nM. Dubois | +33 6 12 34 56 78"]
QUOTED_REPLIES = ["Thank you for contacting us. We have received your request and will get back to you shortly.",
                  "Could you send us a few more details so we can look into this?",
                  "We are sorry for the trouble. Your case has been passed to the right team."]


def with_typos(text: str, rng: random.Random, rate: float = 0.04) -> str:
    """Swap two neighbouring letters in about `rate` of the words longer than three letters."""
    words = text.split(" ")
    for i, word in enumerate(words):
        if len(word) > 3 and word.isalpha() and rng.random() < rate:
            j = rng.randrange(len(word) - 1)
            words[i] = word[:j] + word[j + 1] + word[j] + word[j + 2:]
    return " ".join(words)


def as_chat(subject: str, body: str, rng: random.Random) -> tuple[str, str]:
    """A chat transcript: an assistant's greeting, then the customer's sentences a line each."""
    minute = rng.randrange(50)
    lines = [f"[14:{minute:02d}] Assistant: Hi! What can we help you with today?",
             f"[14:{minute + 1:02d}] Customer: {subject}"]
    lines += [f"[14:{minute + 2:02d}] Customer: {sentence.strip()}" for sentence in body.split(". ") if sentence.strip()]
    return "Live chat transcript", "\n".join(lines)


def vary(record: dict, rng: random.Random) -> dict:
    """The ticket as it might arrive by another channel; label and every other field kept.

    Usage: vary({"subject": "Charged twice", "body": "Invoice INV-1 shows two charges", "category": "billing"},
                random.Random(0))
    """
    subject, body = record["subject"] or "", record["body"] or ""
    channel = rng.choice(["reply", "forward", "chat", "email", "email"])
    if channel == "chat":
        subject, body = as_chat(subject, body, rng)
    else:
        body = f"{rng.choice(GREETINGS)}\n\n{body}\n\n{rng.choice(SIGN_OFFS)}"
        if channel == "reply":
            subject, body = f"Re: {subject}", f"{body}\n\nOn Tue, Support wrote:\n> {rng.choice(QUOTED_REPLIES)}"
        elif channel == "forward":
            subject, body = f"Fwd: {subject}", f"See below, please.\n\n---------- Forwarded message ----------\n{body}"
    if rng.random() < 0.2:
        subject, body = subject.lower(), body.lower()
    return {**record, "subject": subject, "body": with_typos(body, rng)}


def varied_tickets(train_rows: Dataset, share: float = VARIED_SHARE) -> Dataset:
    """The training tickets with `share` of them (chosen at random, seeded) rewritten by `vary`."""
    rng = random.Random(SEED)
    return Dataset.from_list([vary(r, rng) if rng.random() < share else r for r in train_rows])


def main() -> None:
    args = arguments(__doc__.split("\n")[0]).parse_args()
    args.out = args.out or OUT
    train_rows, splits, labels = load_tickets(args)
    varied_rows = varied_tickets(train_rows)
    texts = {split: [classify.record_text(r) for r in rows] for split, rows in splits.items()}
    truth = {split: list(rows[LABEL_FIELD]) for split, rows in splits.items()}
    tokenizer = load_tokenizer(MODEL)
    probabilities, seconds, chosen = {split: {} for split in splits}, {}, {}
    for name, rows in (("TF-IDF", train_rows), ("TF-IDF on varied tickets", varied_rows)):
        tfidf, chosen[f"{name} C"] = tfidf_probabilities(rows, texts, truth["validation"], labels)
        for split in splits:
            probabilities[split][name] = tfidf[split]
    for name, settings in CANDIDATES.items():
        head, seconds[f"{name} (training)"] = head_probabilities(
            varied_rows if name == "varied tickets" else train_rows, tokenizer, labels, args, splits,
            predict_max_length=512, **settings)
        for split in splits:
            probabilities[split][name] = head[split]
    result = result_of(args, train_rows, chosen, seconds, probabilities, truth, labels, PAIRS)
    result["settings"]["candidates"], result["settings"]["varied_share"] = CANDIDATES, VARIED_SHARE
    result["settings"]["varied_examples"] = [{"plain": r, "varied": v} for r, v in zip(train_rows, varied_rows) if r != v][:4]
    report(result, splits, seconds, args.out)


if __name__ == "__main__":
    main()
