"""Generative classification against a classification head, on recipe 01's tickets, compared on validation.

Both fine-tunes start from the same NF4 SmolLM2 with LoRA r=16 on every linear layer and see the same
training tickets for the same optimizer steps (recipe 01's cpu settings otherwise: learning rate 1e-3,
cosine schedule, bf16 compute where the CPU has it):
  head        recipe 01's model: a new `score` layer on the last token, class-weighted cross-entropy;
  generative  the chat model taught to answer the label word after the zero-shot question (the label
              definitions in the prompt; `ftnb.tasks.classify.generative_examples`, TRL's SFTTrainer with
              the loss on the answer only), read out by the zero-shot scorer: every label's log-likelihood,
              the normalisation ("sum" or "mean") chosen on validation.
Beside them: TF-IDF + logistic regression on the same tickets (C chosen on validation) and the untuned
model's zero-shot scores. Every number is on the validation split, with bootstrap 95% intervals and paired
differences. `--ood` also scores the out-of-distribution tickets (`data/tickets_ood`): run it once, after
every setting is fixed, since reading them to choose anything would make them a second validation set.

Usage: flock /tmp/ftnb-cpu.lock .venv/bin/python benchmarks/generative_classification.py --train-limit 320
       (writes benchmarks/generative_classification.json; about 45 min on 2 cores at 320 tickets)
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from transformers import DataCollatorWithPadding, TrainingArguments  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from ftnb import data, env, stats  # noqa: E402
from ftnb.memory import HeapTrimCallback, process_peak_rss_mib, release_memory  # noqa: E402
from ftnb.models import load_model, load_tokenizer, plain_forward  # noqa: E402
from ftnb.tasks import classify, sft  # noqa: E402

MODEL, LABEL_FIELD, SEED = "smollm2-135m-instruct", "category", 0
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
C_GRID = np.logspace(-1, 4, 6)
OUT = Path(__file__).with_suffix(".json")
PAIRS = [("generative", "head"), ("generative", "TF-IDF"), ("generative", "zero-shot"), ("head", "TF-IDF")]


def trainer_settings(folder: str, args: argparse.Namespace) -> dict:
    """What both fine-tunes share: recipe 01's optimizer settings at this script's batch and length."""
    return dict(output_dir=folder, num_train_epochs=args.epochs, learning_rate=1e-3, lr_scheduler_type="cosine",
                warmup_steps=0.1, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
                save_strategy="no", report_to="none", logging_steps=5, disable_tqdm=True, seed=SEED,
                **env.precision_flags(env.pick_dtype(cpu_bf16=True)))


def train_head(train_rows, tokenizer, labels: list[str], args, pooling: str = "last", lora_dropout: float | None = None,
               predict_max_length: int = 128, **training) -> classify.Classifier:
    """Recipe 01's QLoRA classifier (a new score layer, class-weighted loss) on `train_rows`; `pooling="mean"`
    reads the mean of the tokens' hidden states instead of the last token's (`classify.use_pooling`).
    `lora_dropout` replaces LORA's, `training` adds TrainingArguments (label_smoothing_factor, weight_decay);
    it trains on 128 tokens per ticket and predicts on up to `predict_max_length`."""
    id2label, label2id = classify.label_maps(labels)
    model = load_model(MODEL, task="seq-cls", quantization="nf4", double_quant=True, num_labels=len(labels),
                       id2label=id2label, label2id=label2id, tokenizer=tokenizer, dtype=env.pick_dtype(cpu_bf16=True))
    lora = {**LORA, **({} if lora_dropout is None else {"lora_dropout": lora_dropout})}
    model = get_peft_model(prepare_model_for_kbit_training(model, use_gradient_checkpointing=False),
                           LoraConfig(task_type="SEQ_CLS", modules_to_save=["score"], **lora))
    classify.use_pooling(model, pooling)
    train = classify.tokenize_split(train_rows, tokenizer, LABEL_FIELD, labels, max_length=128)
    settings = {**trainer_settings("/tmp/ftnb_gen_head", args), **training}
    classify.WeightedTrainer(model=model, args=TrainingArguments(**settings),
                             train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=16),
                             class_weights=classify.class_weights(train["labels"], len(labels)),
                             callbacks=[HeapTrimCallback()]).train()
    return classify.Classifier(model, tokenizer, labels, base_model=MODEL, max_length=predict_max_length)


def head_probabilities(train_rows, tokenizer, labels: list[str], args, splits: dict, **settings) -> tuple[dict, float]:
    """Train recipe 01's head (`settings`: train_head's keywords), score every split, free the model.
    Returns ({split: probabilities}, training seconds).
    Usage: probabilities, seconds = head_probabilities(train_rows, tok, labels, args, splits, pooling="mean")"""
    start = time.perf_counter()
    head = train_head(train_rows, tokenizer, labels, args, **settings)
    seconds = time.perf_counter() - start
    probabilities = {split: head.probabilities(list(rows)) for split, rows in splits.items()}
    del head
    release_memory()
    return probabilities, seconds


def train_generative(train_rows, tokenizer, labels: list[str], definitions: dict, template: str, args):
    """The causal LM taught to answer each ticket's label word after the zero-shot question."""
    model = load_model(MODEL, quantization="nf4", double_quant=True, tokenizer=tokenizer,
                       dtype=env.pick_dtype(cpu_bf16=True))
    model = get_peft_model(prepare_model_for_kbit_training(model, use_gradient_checkpointing=False),
                           LoraConfig(task_type="CAUSAL_LM", **LORA))
    train = classify.generative_examples(train_rows, LABEL_FIELD, labels, definitions, template)
    config = SFTConfig(**trainer_settings("/tmp/ftnb_gen_lm", args), max_length=512, packing=True,
                       completion_only_loss=True)
    trainer = SFTTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer,
                         callbacks=[HeapTrimCallback()])
    sft.keep_fp32_adapters(trainer)  # as recipe 02: bf16 adapters only where training computes in bf16
    trainer.train()
    return plain_forward(model)  # the Trainer's autocast wrapper off: score what a reload would compute


def generative_probabilities(model, tokenizer, texts: dict[str, list[str]], labels, definitions, template,
                             truth: list[str]) -> tuple[dict[str, np.ndarray], str]:
    """Each split's label probabilities, the normalisation chosen on validation ("sum" on a tie)."""
    lengths = classify.zero_shot_label_lengths(tokenizer, labels)
    logliks = {split: classify.zero_shot_logliks(model, tokenizer, t, labels, definitions, batch_size=16,
                                                 template=template) for split, t in texts.items()}
    normalize, _ = classify.best_zero_shot_normalization(logliks["validation"], lengths, truth, labels)
    return {split: classify.zero_shot_probabilities(ll, lengths, normalize) for split, ll in logliks.items()}, normalize


def tfidf_probabilities(train_rows, texts: dict[str, list[str]], truth: list[str], labels) -> tuple[dict, float]:
    """TF-IDF + logistic regression as recipe 01 fits it with class_weighting on (balanced class weights, like
    the head's loss here), C chosen on validation."""
    tfidf, _ = classify.fit_tfidf([classify.record_text(r) for r in train_rows], train_rows[LABEL_FIELD],
                                  texts["validation"], truth, labels, C_GRID, class_weight="balanced")
    return ({split: classify.sklearn_probabilities(tfidf, t, labels) for split, t in texts.items()},
            float(tfidf[-1].C))


def compare(probabilities: dict[str, np.ndarray], truth: list[str], labels, pairs: list[tuple[str, str]]) -> dict:
    """Macro-F1 with its interval per method, and the paired differences and McNemar tests of `pairs`."""
    preds = {name: classify.predicted_labels(p, labels) for name, p in probabilities.items()}
    table = {name: stats.macro_f1_interval(truth, p, labels).as_dict() for name, p in preds.items()}
    differences = {f"{a} - {b}": stats.paired_bootstrap_difference(stats.macro_f1(labels), truth, preds[a], preds[b])
                   .as_dict() for a, b in pairs}
    correct = {name: [p == t for p, t in zip(pred, truth)] for name, pred in preds.items()}
    mcnemar = {f"{a} vs {b}": stats.mcnemar_exact(correct[a], correct[b]).as_dict() for a, b in pairs}
    return {"macro_f1": table, "paired_difference": differences, "mcnemar": mcnemar, "tickets": len(truth)}


def arguments(description: str) -> argparse.ArgumentParser:
    """The options both tickets benchmarks share: how many tickets, the training shape, --ood, --out."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--train-limit", type=int, default=320, help="training tickets, stratified (0: all 1378)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--eval-limit", type=int, default=0, help="validation tickets, stratified (0: all 296)")
    parser.add_argument("--ood", action="store_true", help="also score the out-of-distribution tickets (once)")
    parser.add_argument("--out", type=Path, help="where the results go (a quick check: not the committed file)")
    return parser


def load_tickets(args: argparse.Namespace) -> tuple:
    """Set up (seed, threads), then the training tickets, the splits to score (validation; with --ood the
    out-of-distribution tickets too) and the labels."""
    env.setup(SEED, show=False)
    tickets = data.load("tickets")
    labels = classify.labels_for(LABEL_FIELD, tickets["train"], "tickets")
    train_rows = data.subset(tickets["train"], args.train_limit, SEED, stratify=LABEL_FIELD)
    splits = {"validation": data.subset(tickets["validation"], args.eval_limit, SEED, stratify=LABEL_FIELD)}
    if args.ood:
        splits["ood"] = data.load("tickets_ood", splits=("test",))["test"]
    return train_rows, splits, labels


def result_of(args: argparse.Namespace, train_rows, chosen: dict, seconds: dict, probabilities: dict, truth: dict,
              labels, pairs: list[tuple[str, str]]) -> dict:
    """What a tickets benchmark writes: its settings, what validation chose, seconds, peak RSS, each split compared."""
    settings = {name: value for name, value in vars(args).items() if name != "out"}
    return {"settings": {**settings, "train_tickets": len(train_rows), "model": MODEL, "lora": LORA,
                         "compute": str(env.pick_dtype(cpu_bf16=True)), "chosen_on_validation": chosen},
            "seconds": seconds, "peak_rss_mib": process_peak_rss_mib(),
            **{split: compare(probabilities[split], truth[split], labels, pairs) for split in probabilities}}


def report(result: dict, splits, seconds: dict, out: Path) -> None:
    """Write the result and print each split's table."""
    out.write_text(json.dumps(result, indent=2) + "\n")
    for split in splits:
        print(split, {k: f"{v['estimate']:.3f} [{v['low']:.3f}, {v['high']:.3f}]" for k, v in result[split]["macro_f1"].items()})
        print("  ", {k: f"{v['estimate']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}]"
                     for k, v in result[split]["paired_difference"].items()})
    print({k: round(v) for k, v in seconds.items()}, f"peak {result['peak_rss_mib']:.0f} MiB; wrote {out}")


def main() -> None:
    args = arguments(__doc__.split("\n")[0]).parse_args()
    args.out = args.out or OUT
    train_rows, splits, labels = load_tickets(args)
    definitions, template = data.read_labels("tickets")[LABEL_FIELD], classify.zero_shot_template("tickets")
    texts = {split: [classify.record_text(r) for r in rows] for split, rows in splits.items()}
    truth = {split: list(rows[LABEL_FIELD]) for split, rows in splits.items()}
    tokenizer = load_tokenizer(MODEL)
    probabilities, seconds, chosen = {split: {} for split in splits}, {}, {}

    start = time.perf_counter()
    tfidf, chosen["tfidf_C"] = tfidf_probabilities(train_rows, texts, truth["validation"], labels)
    seconds["TF-IDF"] = time.perf_counter() - start
    start = time.perf_counter()
    base = load_model(MODEL, quantization="nf4", double_quant=True, tokenizer=tokenizer, dtype=env.pick_dtype(cpu_bf16=True))
    zero_shot, chosen["zero_shot_normalize"] = generative_probabilities(base, tokenizer, texts, labels, definitions,
                                                                        template, truth["validation"])
    seconds["zero-shot (scoring)"] = time.perf_counter() - start
    del base
    release_memory()
    head_probs, seconds["head (training)"] = head_probabilities(train_rows, tokenizer, labels, args, splits)
    start = time.perf_counter()
    lm = train_generative(train_rows, tokenizer, labels, definitions, template, args)
    seconds["generative (training)"] = time.perf_counter() - start
    start = time.perf_counter()
    generative, chosen["generative_normalize"] = generative_probabilities(lm, tokenizer, texts, labels, definitions,
                                                                          template, truth["validation"])
    seconds["generative (scoring)"] = time.perf_counter() - start
    for split in splits:
        probabilities[split] = {"generative": generative[split], "head": head_probs[split], "TF-IDF": tfidf[split],
                                "zero-shot": zero_shot[split]}
    report(result_of(args, train_rows, chosen, seconds, probabilities, truth, labels, PAIRS), splits, seconds, args.out)


if __name__ == "__main__":
    main()
