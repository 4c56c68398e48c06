"""Last-token against mean-pooled classification head, on recipe 01's tickets, compared on validation.

Two fine-tunes that differ only in what the new `score` layer reads: the hidden state of the last token
(recipe 01's model, `LlamaForSequenceClassification`'s read-out) or the mean of every real token's hidden
state (`ftnb.tasks.classify.use_mean_pooling`). Everything else is `generative_classification.py`'s head:
NF4 SmolLM2 with LoRA r=16 on every linear layer, class-weighted loss, the same training tickets and
optimizer steps. Beside them TF-IDF + logistic regression on the same tickets (C chosen on validation).
Macro-F1 with bootstrap 95% intervals, paired differences and McNemar tests, on validation; `--ood` also
scores the out-of-distribution tickets (`data/tickets_ood`): run it once, after every setting is fixed.

Usage: flock /tmp/ftnb-cpu.lock .venv/bin/python benchmarks/pooling.py --train-limit 320 --ood
       (writes benchmarks/pooling.json; about 8 min on 2 cores at 320 tickets)
       --train-limit 8 --eval-limit 8 --batch-size 2 --grad-accum 1 --out /tmp/check.json checks it in a minute
"""
from __future__ import annotations

from pathlib import Path

from generative_classification import (LABEL_FIELD, MODEL, arguments, load_tickets, report, result_of,
                                       head_probabilities, tfidf_probabilities)

from ftnb.models import load_tokenizer
from ftnb.tasks import classify

OUT = Path(__file__).with_suffix(".json")
PAIRS = [("mean pooling", "last token"), ("mean pooling", "TF-IDF"), ("last token", "TF-IDF")]


def main() -> None:
    args = arguments(__doc__.split("\n")[0]).parse_args()
    args.out = args.out or OUT
    train_rows, splits, labels = load_tickets(args)
    texts = {split: [classify.record_text(r) for r in rows] for split, rows in splits.items()}
    truth = {split: list(rows[LABEL_FIELD]) for split, rows in splits.items()}
    tokenizer = load_tokenizer(MODEL)
    probabilities, seconds = {split: {} for split in splits}, {}
    tfidf, tfidf_c = tfidf_probabilities(train_rows, texts, truth["validation"], labels)
    for split in splits:
        probabilities[split]["TF-IDF"] = tfidf[split]
    for name, pooling in (("last token", "last"), ("mean pooling", "mean")):
        head, seconds[f"{name} (training)"] = head_probabilities(train_rows, tokenizer, labels, args, splits,
                                                                pooling=pooling)
        for split in splits:
            probabilities[split][name] = head[split]
    result = result_of(args, train_rows, {"tfidf_C": tfidf_c}, seconds, probabilities, truth, labels, PAIRS)
    report(result, splits, seconds, args.out)


if __name__ == "__main__":
    main()
