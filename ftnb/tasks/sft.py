"""Supervised fine-tuning of a chat model on instruction/input/output rows, with the traps guarded.

Usage:
    from ftnb.tasks import sft
    train, dropped = sft.build_sft_dataset(rows, tok, max_length=352)   # prompt/completion chat examples
    sft.check_training_examples(trainer.train_dataset, tok)             # labels, end-of-turn, masking
    sft.check_same_template(tok, rows[0])                               # inference prompt == training prefix
    test = sft.evaluate_split(model, tok, test_rows, gen_rows, formats=formats.read_formats("domains"))
    test.table, test.adherence_intervals()                              # perplexity, adherence, ROUGE-L
    sft.keep_fp32_adapters(trainer)                                     # fp32 adapters unless training is bf16
    with sft.loss_on_labelled_positions(): trainer.train()              # the vocabulary head skips the prompt
    sft.packing_summary(trainer.train_dataset, batch_size=2)            # examples per packed row, padding
    sft.perplexity(model, tok, rows)                                    # {'loss': ..., 'perplexity': ...}
    sft.perplexity_interval(sft.response_nll(model, tok, rows))         # with a bootstrap interval over rows
    gen = ftnb.saved.load("outputs/02_domain_generation/adapter")       # adapter or merged folder
    gen.generate("Explain this contract clause in plain English.", "Tenant shall ...")

One function builds the chat messages (`prompt_messages`), and training, evaluation and the
saved generator all call it: the same system prompt and template at training and inference.
SmolLM2's template injects its own default system message when none is given, so we always
pass ours explicitly and store it in the saved model's manifest (`ftnb_model.json`).
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from threading import Event, Thread
from typing import Iterable, Iterator

import numpy as np
import torch
from datasets import Dataset
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from ftnb import stats
from ftnb.data import Schema
from ftnb.inference import chat_inputs, target_nll
from ftnb.memory import release_memory
from ftnb.tasks.formats import adherence_report, format_adherence

SYSTEM_PROMPT = "You are a careful assistant. Answer in the requested house format."
IGNORE = -100
# The fields every SFT row needs; `domain` groups rows for stratified subsets and per-domain metrics.
SCHEMA = Schema.of("id", "domain", "instruction", "input", "output")


def select_domains(requested: list[str], present: Iterable[str]) -> list[str]:
    """The domains to use: `requested`, or every domain present in the data (sorted) when it is
    empty. A requested domain absent from the data is a ValueError naming it (a typo would
    otherwise silently train and evaluate on fewer domains).

    Usage: domains = select_domains(["legal", "technical"], ds["train"]["domain"])
    """
    known = sorted(set(present))
    unknown = sorted(set(requested) - set(known))
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown}; the data has: {', '.join(known)}")
    return list(requested) or known


class SFTTrapError(ValueError):
    """A training set-up that would silently teach the wrong thing (nothing to learn, no stop token,
    a prompt at inference that differs from training, responses cut off by max_length)."""


# ---------------------------------------------------------------- formatting
def prompt_messages(instruction: str, input: str, system: str = SYSTEM_PROMPT) -> list[dict]:
    """The chat messages of one request: our system prompt, then instruction and input as the user turn."""
    return [{"role": "system", "content": system},
            {"role": "user", "content": f"{instruction}\n\n{input}"}]


def to_prompt_completion(row: dict, system: str = SYSTEM_PROMPT) -> dict:
    """TRL's conversational prompt/completion example for a row with instruction/input/output."""
    return {"prompt": prompt_messages(row["instruction"], row["input"], system),
            "completion": [{"role": "assistant", "content": row["output"]}]}


def _rows(rows) -> list[dict]:
    """A list of row dicts from a list or a datasets.Dataset."""
    return rows if isinstance(rows, list) else list(rows)


def _chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    return tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                         return_dict=True)["input_ids"]


def prompt_and_response_ids(tokenizer, row: dict, system: str = SYSTEM_PROMPT) -> tuple[list[int], list[int]]:
    """The chat prompt's token ids (assistant header included) and the reference response's after it
    (end-of-turn included), split where the template puts them.

    Usage: prompt, response = prompt_and_response_ids(tok, ds["validation"][0])
    """
    ex = to_prompt_completion(row, system)
    prompt = _chat_ids(tokenizer, ex["prompt"], add_generation_prompt=True)
    return prompt, _chat_ids(tokenizer, ex["prompt"] + ex["completion"])[len(prompt):]


def example_length(tokenizer, row: dict, system: str = SYSTEM_PROMPT) -> int:
    """Tokens of the full training sequence (template, prompt, response, end-of-turn)."""
    ex = to_prompt_completion(row, system)
    return len(_chat_ids(tokenizer, ex["prompt"] + ex["completion"]))


def build_sft_dataset(rows: Iterable[dict], tokenizer, max_length: int, system: str = SYSTEM_PROMPT,
                      on_too_long: str = "drop") -> tuple[Dataset, list[dict]]:
    """Prompt/completion chat examples, minus (reported) those longer than `max_length` tokens.

    TRL truncates long sequences silently: the response would lose its end and its end-of-turn
    token, teaching the model to ramble. We drop them and print which (on_too_long="drop"), or
    raise (on_too_long="raise"). Returns (dataset, dropped) where dropped lists id and length.

    Usage: train_ds, dropped = build_sft_dataset(ds["train"], tok, max_length=352)
    """
    if on_too_long not in ("drop", "raise"):
        raise ValueError(f"on_too_long must be 'drop' or 'raise', not {on_too_long!r}")
    kept, dropped = [], []
    for row in rows:
        length = example_length(tokenizer, row, system)
        if length > max_length:
            dropped.append({"id": row.get("id"), "tokens": length})
        else:
            kept.append(to_prompt_completion(row, system))
    if dropped:
        listing = ", ".join(f"{d['id']} ({d['tokens']} tokens)" for d in dropped[:10])
        message = (f"{len(dropped)} example(s) exceed max_length={max_length} and would be truncated "
                   f"before their end-of-turn token: {listing}{' ...' if len(dropped) > 10 else ''}")
        if on_too_long == "raise":
            raise SFTTrapError(message + ". Raise max_length or shorten these examples.")
        print(f"[build_sft_dataset] dropped {message}")
    if not kept:
        raise SFTTrapError(f"no example fits in max_length={max_length}; raise it")
    return Dataset.from_list(kept), dropped


# ---------------------------------------------------------------- guards
def end_of_turn_ids(tokenizer) -> set[int]:
    """Token ids that end an assistant turn: EOS, and the template's turn end (e.g. <|im_end|>)."""
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        if token in tokenizer.get_vocab():
            ids.add(tokenizer.convert_tokens_to_ids(token))
    return ids - {None}


def _segments(example: dict) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each original example; a packed row holds several (seq_lengths)."""
    ids, labels = example["input_ids"], example["labels"]
    lengths = example.get("seq_lengths") or [len(ids)]
    out, start = [], 0
    for n in lengths:
        out.append((ids[start:start + n], labels[start:start + n]))
        start += n
    return out


def check_training_examples(dataset: Dataset, tokenizer, require_prompt_masked: bool = True) -> dict:
    """Check a tokenized training set (e.g. `trainer.train_dataset`) for the silent SFT traps:
    an example whose labels are all masked (nothing to learn), a response whose trained tokens do
    not end with the end-of-turn token (the model never learns to stop), and, with completion-only
    loss, prompt tokens that are trained. Raises SFTTrapError naming the example; returns counts.

    Usage: check_training_examples(trainer.train_dataset, tok)
    """
    stops = end_of_turn_ids(tokenizer)
    newline = set(tokenizer.encode("\n", add_special_tokens=False))
    counts = {"examples": 0, "trained_tokens": 0, "masked_tokens": 0}
    for row_index, example in enumerate(dataset):
        for ids, labels in _segments(example):
            where = f"training example {row_index} (starts {tokenizer.decode(ids[:12])!r})"
            trained = [i for i, lab in enumerate(labels) if lab != IGNORE]
            if not trained:
                raise SFTTrapError(f"{where}: every label is -100, nothing to learn (prompt too long "
                                   f"for max_length, or a masking bug)")
            last = [labels[i] for i in trained[-2:]]
            if last[-1] not in stops and not (len(last) == 2 and last[0] in stops and last[1] in newline):
                raise SFTTrapError(f"{where}: the trained tokens end with {tokenizer.decode(last)!r}, not with an "
                                   f"end-of-turn token; the model would not learn to stop (truncated response?)")
            # position 0 of a packed segment is masked by the collator, not here; look past it
            if require_prompt_masked and labels[1] != IGNORE:
                raise SFTTrapError(f"{where}: prompt tokens carry labels; completion-only loss is off")
            counts["examples"] += 1
            counts["trained_tokens"] += len(trained)
            counts["masked_tokens"] += len(labels) - len(trained)
    return counts


def check_same_template(tokenizer, rows: list[dict] | Dataset, training_ids: list[int] | None = None,
                        system: str = SYSTEM_PROMPT) -> dict:
    """The inference prompt (what the generator feeds the model: system, user turn, assistant
    header) must be exactly the start of the training sequence. Pass `training_ids` from the
    trainer's tokenized dataset to check against what is really trained on; the row it came from
    is found among `rows` and returned. Raises SFTTrapError when no row's prompt matches.

    Usage: check_same_template(tok, train_rows, training_ids=trainer.train_dataset[0]["input_ids"])
    """
    rows = _rows(rows)
    if training_ids is None:
        ex = to_prompt_completion(rows[0], system)
        training_ids = _chat_ids(tokenizer, ex["prompt"] + ex["completion"])
    training_ids = list(training_ids)
    for row in rows:
        prompt = _chat_ids(tokenizer, prompt_messages(row["instruction"], row["input"], system),
                           add_generation_prompt=True)
        if training_ids[:len(prompt)] == prompt:
            return row
    first = _chat_ids(tokenizer, prompt_messages(rows[0]["instruction"], rows[0]["input"], system),
                      add_generation_prompt=True)
    raise SFTTrapError(f"no inference prompt matches the start of the training sequence "
                       f"{tokenizer.decode(training_ids[:40])!r}...; an inference prompt looks like "
                       f"{tokenizer.decode(first[:40])!r}...: training and inference use different templates")


# ---------------------------------------------------------------- overlap
def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 (rouge_score, with stemming) of predictions against references."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]
    return float(sum(scores) / max(len(scores), 1))


# ---------------------------------------------------------------- held-out loss
@torch.no_grad()
def response_nll(model, tokenizer, rows: list[dict] | Dataset, max_length: int = 384, batch_size: int = 8,
                 system: str = SYSTEM_PROMPT) -> list[dict]:
    """Per row: summed negative log-likelihood of the reference response given its prompt
    (completion tokens only, end-of-turn included), token count, and whether max_length cut it.

    Memory stays bounded by `batch_size`: rows are batched longest-first, and each batch computes
    full-vocabulary logits for its responses' positions only (ftnb.inference.target_nll).

    Usage: nll = response_nll(model, tok, ds["test"], batch_size=8); sum(r["nll"] for r in nll)
    """
    model.eval()
    examples = []
    for row in _rows(rows):
        prompt, response = prompt_and_response_ids(tokenizer, row, system)
        full = prompt + response
        trained = max(0, min(len(full), max_length) - len(prompt))  # a prompt may exceed max_length
        examples.append((full[:max_length], trained, len(full) > max_length))
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
    results: list[dict] = [{} for _ in examples]
    for start in range(0, len(order), batch_size):  # one batch of logits alive at a time
        batch = order[start:start + batch_size]
        nll = target_nll(model, tokenizer.pad_token_id, [examples[i][0] for i in batch], [examples[i][1] for i in batch])
        for i, row_nll in zip(batch, nll):
            results[i] = {"nll": row_nll, "tokens": examples[i][1], "truncated": examples[i][2]}
    return results


def _aggregate(per_row: list[dict]) -> dict:
    """Loss and perplexity pooled over the rows' response tokens. Over zero tokens both are NaN,
    with a warning: exp(0) = 1 would read as a perfect model."""
    tokens = sum(r["tokens"] for r in per_row)
    truncated = sum(r["truncated"] for r in per_row)
    if tokens:
        loss = sum(r["nll"] for r in per_row) / tokens
    else:
        warnings.warn(f"perplexity over zero response tokens ({len(per_row)} row(s), {truncated} cut by "
                      f"max_length before their response): reported as NaN", stacklevel=3)
        loss = math.nan
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens, "truncated": truncated}


def perplexity(model, tokenizer, rows: list[dict] | Dataset, max_length: int = 384, batch_size: int = 8,
               system: str = SYSTEM_PROMPT) -> dict:
    """Mean token negative log-likelihood of the reference responses (response tokens only; the
    prompt is given, not predicted) and its exp: {'loss', 'perplexity', 'tokens', 'truncated'}.
    Sequences over max_length are cut, and counted in 'truncated'.

    Usage: perplexity(model, tok, ds["test"])["perplexity"]
    """
    return _aggregate(response_nll(model, tokenizer, rows, max_length, batch_size, system))


def _pooled_perplexity(tokens, nll, axis=-1):
    """exp(summed NLL / summed tokens) along `axis`: the numpy-style metric the bootstrap resamples."""
    return np.exp(np.sum(nll, axis=axis) / np.sum(tokens, axis=axis))


def _tokens_and_nll(per_row: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([r["tokens"] for r in per_row]), np.array([r["nll"] for r in per_row])


def perplexity_interval(per_row: list[dict], **bootstrap_kwargs) -> stats.Interval:
    """Perplexity of `response_nll`'s rows (tokens pooled, as `perplexity` does) with a bootstrap
    interval over rows: a row's tokens are not independent, so whole rows are resampled.

    Usage: print(perplexity_interval(response_nll(model, tok, ds["validation"])))  # 7.41 [6.90, 7.98]
    """
    return stats.bootstrap_interval(_pooled_perplexity, *_tokens_and_nll(per_row), **bootstrap_kwargs)


def perplexity_difference(per_row_a: list[dict], per_row_b: list[dict], **bootstrap_kwargs) -> stats.Interval:
    """Perplexity of A minus that of B on the same rows, with a paired bootstrap interval (both
    scored on the same resampled rows, so how hard the drawn rows are cancels out).

    Usage: perplexity_difference(response_nll(nf4, tok, rows), response_nll(fp32, tok, rows))
    """
    tokens, nll_a = _tokens_and_nll(per_row_a)
    tokens_b, nll_b = _tokens_and_nll(per_row_b)
    if not np.array_equal(tokens, tokens_b):
        raise ValueError("per_row_a and per_row_b must score the same rows with the same tokenizer and max_length "
                         "(their response token counts differ)")
    return stats.paired_bootstrap_difference(_pooled_perplexity, tokens, nll_a, nll_b, **bootstrap_kwargs)


# ---------------------------------------------------------------- generation
def decoding_kwargs(tokenizer, prompt_width: int, repetition_penalty: float = 1.0,
                    penalty_spares_line_breaks: bool = False, **generation_kwargs) -> dict:
    """Keyword arguments for model.generate: greedy unless told otherwise, stop at end-of-turn, and
    a repetition penalty on the answer's own tokens only. (transformers' `repetition_penalty`
    also penalises every prompt token, so a summary could not reuse the words of the note it
    summarises.) `prompt_width`: the prompt length, left padding included.
    `penalty_spares_line_breaks`: the penalty leaves the tokens that are only line breaks alone: a
    house format ends every line with one, so after a few lines the penalty would otherwise make
    ending the answer likelier than starting its next line.

    Usage: model.generate(**enc, **decoding_kwargs(tok, enc["input_ids"].shape[1], 1.1, max_new_tokens=200))
    """
    kwargs = {"do_sample": False, "pad_token_id": tokenizer.pad_token_id,
              "eos_token_id": sorted(end_of_turn_ids(tokenizer)), **generation_kwargs}
    if repetition_penalty != 1.0:
        spared = line_break_ids(tokenizer) if penalty_spares_line_breaks else ()
        kwargs["logits_processor"] = LogitsProcessorList(
            [AnswerRepetitionPenalty(repetition_penalty, prompt_width, spared)])
    return kwargs


@lru_cache(maxsize=8)
def line_break_ids(tokenizer) -> tuple[int, ...]:
    """The ids of the vocabulary's tokens that decode to white space with a line break in it.

    Usage: line_break_ids(tok)  # SmolLM2: 129 tokens, "\\n" (198) among them
    """
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return tuple(i for i, text in enumerate(texts) if "\n" in text and not text.strip())


class AnswerRepetitionPenalty(RepetitionPenaltyLogitsProcessor):
    """transformers' repetition penalty (CTRL's: a score divided by `penalty` when positive, multiplied
    when negative) on the tokens generated after `prompt_width`, except the `spared` token ids.

    Usage: model.generate(**enc, logits_processor=[AnswerRepetitionPenalty(1.1, width, line_break_ids(tok))])
    """

    def __init__(self, penalty: float, prompt_width: int, spared: Iterable[int] = ()):
        super().__init__(penalty, prompt_ignore_length=prompt_width)
        self.spared = torch.tensor(sorted(spared), dtype=torch.long)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.spared.device != scores.device:  # moved once, not at every decoding step
            self.spared = self.spared.to(scores.device)
        kept = scores[:, self.spared]  # indexing by a tensor of ids copies: the penalty cannot change it
        scores = super().__call__(input_ids, scores)
        scores[:, self.spared] = kept
        return scores


@torch.no_grad()
def generate_batch(model, tokenizer, rows: list[dict] | Dataset, max_new_tokens: int = 160,
                   batch_size: int = 8, system: str = SYSTEM_PROMPT, **generation_kwargs) -> list[str]:
    """Greedy (by default) responses to rows with instruction/input, batched with left padding
    (a decoder continues from the last position, so the prompt must end there in every row).
    `generation_kwargs` go to decoding_kwargs (repetition_penalty) and model.generate.

    Usage: generate_batch(model, tok, ds["test"].select(range(5)), max_new_tokens=120)
    """
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    outputs = []
    try:
        rows = _rows(rows)
        for start in range(0, len(rows), batch_size):
            prompts = [tokenizer.apply_chat_template(prompt_messages(r["instruction"], r["input"], system),
                                                     tokenize=False, add_generation_prompt=True)
                       for r in rows[start:start + batch_size]]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            width = enc["input_ids"].shape[1]
            out = model.generate(**enc, **decoding_kwargs(tokenizer, width, max_new_tokens=max_new_tokens,
                                                          **generation_kwargs))
            outputs += [t.strip() for t in tokenizer.batch_decode(out[:, width:],
                                                                  skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return outputs


class Generator:
    """A fine-tuned model plus its tokenizer and system prompt: the training template, at inference.

    `decoding` holds the default generation settings (those the model was evaluated with);
    keyword arguments of generate/stream override them.

    Usage: gen = Generator(model, tok); gen.generate(instruction, input); for chunk in gen.stream(...): ...
    """

    def __init__(self, model, tokenizer, system: str = SYSTEM_PROMPT, decoding: dict | None = None):
        self.model, self.tokenizer, self.system = model.eval(), tokenizer, system
        self.decoding = {"max_new_tokens": 200, **(decoding or {})}

    def generate(self, instruction: str, input: str, **generation_kwargs) -> str:
        row = {"instruction": instruction, "input": input}
        return generate_batch(self.model, self.tokenizer, [row], system=self.system,
                              **{**self.decoding, **generation_kwargs})[0]

    def stream(self, instruction: str, input: str, **generation_kwargs) -> Iterator[str]:
        """Yield the response text piece by piece as it is generated (TextIteratorStreamer).
        An error in generation is raised here, once the text before it is out; leaving the loop
        early (break, close) stops generation at the next token and waits for its thread to end.

        Usage: for piece in gen.stream(instruction, input): print(piece, end="", flush=True)
        """
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        enc = chat_inputs(self.tokenizer, prompt_messages(instruction, input, self.system), self.model.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = decoding_kwargs(self.tokenizer, enc["input_ids"].shape[1], **{**self.decoding, **generation_kwargs})
        stop = Event()
        kwargs["stopping_criteria"] = StoppingCriteriaList([*kwargs.get("stopping_criteria", []), _StopWhenSet(stop)])
        failures: list[BaseException] = []
        thread = Thread(target=_generate_into, args=(self.model, streamer, failures), kwargs={**enc, **kwargs})
        thread.start()
        try:
            yield from streamer
        finally:
            stop.set()
            thread.join()
        if failures:
            raise failures[0]


class _StopWhenSet:
    """A stopping criterion for model.generate: stop every sequence once `event` is set (by
    another thread)."""

    def __init__(self, event: Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _generate_into(model, streamer, failures: list[BaseException], **kwargs) -> None:
    """model.generate(streamer=streamer, **kwargs), run in a thread: an exception is kept in
    `failures` for the consuming thread and ends the stream, whose reader would otherwise wait forever."""
    try:
        model.generate(streamer=streamer, **kwargs)
    except BaseException as error:  # noqa: BLE001 - re-raised by the consumer
        failures.append(error)
        streamer.end()


# ---------------------------------------------------------------- save, merge, reload
def save_generator(model, tokenizer, folder: str | Path, base_model: str, system: str = SYSTEM_PROMPT,
                   decoding: dict | None = None) -> Path:
    """Save weights (the adapters of a PeftModel, else the full model), the tokenizer and the
    ftnb_model.json manifest (see ftnb.saved): the base model, its quantization and parameter
    dtypes, the system prompt and the default decoding settings. ftnb.saved.load reads it back.

    Usage: save_generator(trainer.model, tok, f"{output_dir}/adapter", base_model=model, decoding={"top_k": 5})
    """
    from ftnb import saved

    return saved.save(folder, model, tokenizer, "generator", base_model, {"system": system, "decoding": decoding or {}})


def merge_into_dequantized(adapter_folder: str | Path, dtype: torch.dtype = torch.float32):
    """Merge a QLoRA adapter into the *de-quantized* base: the NF4 weights the adapter was trained
    against, expanded to `dtype`, plus the LoRA update. Merging into the original full-precision
    weights instead would add the update to slightly different weights than it learned on.
    Returns a plain transformers model (no peft, no bitsandbytes).

    Usage: merged = merge_into_dequantized(f"{output_dir}/adapter")
    """
    from ftnb import saved

    manifest = saved.read_manifest(adapter_folder)
    if manifest["weights"]["format"] != "adapters":
        raise ValueError(f"{adapter_folder} holds merged weights already: nothing to merge")
    base = saved.load_base(manifest, dtype=dtype)
    if manifest["quantization"] is not None:
        base = base.dequantize(dtype=dtype)
    return saved.attach_adapters(base, adapter_folder, manifest["weights"]).merge_and_unload()


def export_merged(adapter_folder: str | Path, dest: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write a merged checkpoint (config, safetensors, tokenizer, ftnb_model.json) that loads with
    AutoModelForCausalLM.from_pretrained alone, or as a Generator with ftnb.saved.load. Returns dest.

    Usage: export_merged(f"{output_dir}/adapter", f"{output_dir}/merged")
    """
    from ftnb import saved

    manifest = saved.read_manifest(adapter_folder)
    merged = merge_into_dequantized(adapter_folder, dtype)
    merged_from = {**manifest["weights"], "quantization": manifest["quantization"],
                   "how": f"adapter merged into the de-quantized base, in {saved.dtype_name(dtype)}"}
    return saved.save(dest, merged, saved.load_tokenizer(adapter_folder), "generator", manifest["base_model"],
                      manifest["task"], merged_from=merged_from)


@torch.no_grad()
def next_token_logits(model, tokenizer, rows: list[dict] | Dataset, system: str = SYSTEM_PROMPT) -> torch.Tensor:
    """The logits of the first answer token for each row's prompt, one prompt at a time (no
    padding): a small fingerprint of a model to compare across processes, e.g. after a reload.

    Usage: (next_token_logits(trained, tok, rows) - next_token_logits(reloaded, tok, rows)).abs().max()
    """
    model.eval()
    rows = _rows(rows)
    logits = []
    for row in rows:
        enc = chat_inputs(tokenizer, prompt_messages(row["instruction"], row["input"], system), model.device)
        logits.append(model(**enc).logits[0, -1].float().cpu())
    return torch.stack(logits)


@torch.no_grad()
def compare_models(model_a, model_b, tokenizer, rows: list[dict] | Dataset, max_new_tokens: int = 64,
                   system: str = SYSTEM_PROMPT) -> dict:
    """How far apart two models are on the same prompts: the largest absolute logit difference
    over every prompt position, and the share of prompts with identical greedy outputs (one prompt
    at a time, so padding plays no part; max_new_tokens=0 compares logits only).

    Usage: compare_models(adapter_model, merged_model, tok, ds["test"].select(range(10)))
    """
    rows = _rows(rows)
    max_diff = 0.0
    for row in rows:
        enc = chat_inputs(tokenizer, prompt_messages(row["instruction"], row["input"], system))
        la = model_a(**{k: v.to(model_a.device) for k, v in enc.items()}).logits.float().cpu()
        lb = model_b(**{k: v.to(model_b.device) for k, v in enc.items()}).logits.float().cpu()
        max_diff = max(max_diff, float((la - lb).abs().max()))
    if not max_new_tokens:  # logits only
        return {"max_logit_diff": max_diff, "prompts": len(rows)}
    out_a = generate_batch(model_a, tokenizer, rows, max_new_tokens, batch_size=1, system=system)
    out_b = generate_batch(model_b, tokenizer, rows, max_new_tokens, batch_size=1, system=system)
    same = [a == b for a, b in zip(out_a, out_b)]
    return {"max_logit_diff": max_diff, "greedy_agreement": sum(same) / max(len(same), 1),
            "prompts": len(rows), "outputs_a": out_a, "outputs_b": out_b}


def show_label_mask(input_ids: list[int], labels: list[int], tokenizer):
    """HTML rendering of one training sequence: masked prompt tokens grey and struck through,
    trained response tokens green. In a notebook: display(show_label_mask(ids, labels, tok))."""
    from html import escape

    from IPython.display import HTML

    spans = []
    for token_id, label in zip(input_ids, labels):
        text = escape(tokenizer.decode([token_id])).replace("\n", "↵<br>")
        style = "background:#d4f7d4" if label != IGNORE else "color:#888;text-decoration:line-through"
        spans.append(f"<span style='{style};font-family:monospace'>{text}</span>")
    legend = ("<p><span style='color:#888;text-decoration:line-through'>masked (-100, no loss)</span> · "
              "<span style='background:#d4f7d4'>trained (loss)</span></p>")
    return HTML(legend + "<div style='line-height:1.7'>" + "".join(spans) + "</div>")


@dataclass
class Evaluation:
    """What `evaluate_split` measured on one split: `table` (per domain and 'all': perplexity with its
    bootstrap interval, loss, format adherence, ROUGE-L), `rules` (pass rate per format rule), the
    generated `outputs`, `nll` (response_nll per perplexity row) and `passes` (pass or fail of every
    answer, per domain with a house format and 'all'; for intervals and paired tests)."""

    table: pd.DataFrame
    rules: pd.DataFrame
    outputs: list[str]
    nll: list[dict]
    passes: dict[str, list[bool]]

    def adherence_intervals(self) -> dict[str, stats.Interval]:
        """Wilson 95% interval of the format adherence per domain with a house format, and 'all'."""
        return {group: stats.wilson_interval(sum(oks), len(oks)) for group, oks in self.passes.items() if oks}


def adherence_passes(outputs: list[str], rows: list[dict], formats: dict) -> dict[str, list[bool]]:
    """Pass or fail of every answer against its row's house format: per domain that has one, and
    'all' over them ({} when no domain has a format).

    Usage: adherence_passes(outputs, gen_rows, formats.read_formats("domains"))["all"]
    """
    passes = {d: [format_adherence(o, formats[d]).ok for o, r in zip(outputs, rows, strict=True) if r["domain"] == d]
              for d in sorted({r["domain"] for r in rows}) if d in formats}
    return {**passes, "all": [ok for oks in passes.values() for ok in oks]} if passes else {}


def _perplexity_columns(per_row: list[dict]) -> dict:
    """Pooled perplexity and loss of some rows, and the perplexity's bootstrap interval (NaN with
    fewer than 2 rows or no response token)."""
    pooled = _aggregate(per_row)
    ci = (perplexity_interval(per_row) if len(per_row) >= 2 and pooled["tokens"]
          else stats.Interval(pooled["perplexity"], math.nan, math.nan))
    return {"perplexity": pooled["perplexity"], "perplexity_low": ci.low, "perplexity_high": ci.high,
            "loss": pooled["loss"]}


def evaluate_split(model, tokenizer, ppl_rows: list[dict], gen_rows: list[dict], max_length: int = 384,
                   max_new_tokens: int = 200, batch_size: int = 8, system: str = SYSTEM_PROMPT,
                   ppl_batch_size: int = 8, formats: dict | None = None, **generation_kwargs) -> Evaluation:
    """Held-out perplexity (with a bootstrap interval over rows) on `ppl_rows` and, on the
    generations for `gen_rows`, format adherence and ROUGE-L: one table row per domain plus 'all'.
    Format adherence is judged against `formats` (ftnb.tasks.formats.read_formats); a domain
    without a house format gets NaN there (not applicable, not 0), and its rows are left out of
    'all' and of the per-rule table. `batch_size` bounds generation (prompts decoded together,
    each with its key/value cache) and `ppl_batch_size` the perplexity pass (see response_nll).

    Usage: test = evaluate_split(model, tok, test_rows, gen_rows, formats=house); test.adherence_intervals()
    """
    import pandas as pd

    formats = formats or {}
    ppl_rows, gen_rows = _rows(ppl_rows), _rows(gen_rows)
    nll = response_nll(model, tokenizer, ppl_rows, max_length, ppl_batch_size, system)
    # each phase's freed buffers go back to the system before the next starts (the perplexity pass held a
    # batch's full-vocabulary logits, generation grew its caches step by step): untrimmed, an evaluation
    # left the heap about 1 GB larger, and recipe 02's next evaluation peaked on top of it
    release_memory()
    outputs = generate_batch(model, tokenizer, gen_rows, max_new_tokens, batch_size, system, **generation_kwargs)
    release_memory()
    passes = adherence_passes(outputs, gen_rows, formats)
    domains = sorted({r["domain"] for r in ppl_rows} | {r["domain"] for r in gen_rows})
    table = {}
    for domain in domains + ["all"]:
        keep = lambda r: domain in ("all", r["domain"])  # noqa: E731
        pairs = [(o, r) for o, r in zip(outputs, gen_rows) if keep(r)]
        judged = passes.get(domain, [])
        table[domain] = {
            **_perplexity_columns([n for n, r in zip(nll, ppl_rows) if keep(r)]),
            "format_adherence": sum(judged) / len(judged) if judged else math.nan,
            "rougeL": rouge_l([o for o, _ in pairs], [r["output"] for _, r in pairs]), "generated": len(pairs)}
    rules = adherence_report(outputs, [r["domain"] for r in gen_rows], formats)
    return Evaluation(pd.DataFrame(table).T, rules, outputs, nll, passes)


def evaluate(model, tokenizer, ppl_rows: list[dict], gen_rows: list[dict], max_length: int = 384,
             max_new_tokens: int = 200, batch_size: int = 8, system: str = SYSTEM_PROMPT,
             ppl_batch_size: int = 8, formats: dict | None = None, **generation_kwargs):
    """`evaluate_split`'s (table, per-rule pass rates, generations), for callers that need no more.

    Usage: table, rules, outputs = evaluate(model, tok, test_rows, test_rows[:60])
    """
    result = evaluate_split(model, tokenizer, ppl_rows, gen_rows, max_length, max_new_tokens, batch_size, system,
                            ppl_batch_size, formats, **generation_kwargs)
    return result.table, result.rules, result.outputs


def keep_fp32_adapters(trainer) -> int:
    """Put back in fp32 the adapter weights that TRL's SFTTrainer stored in bf16, unless the Trainer
    computes in bf16; returns how many tensors were cast. Call it after building the trainer, before
    `train()` (the optimizer is made there, on the tensors as they are then).

    TRL stores a quantized model's trainable weights in bf16, as the QLoRA paper did with bf16
    compute. peft then casts each adapted layer's input to bf16 too, so every adapter matmul runs in
    bf16 whatever the Trainer's precision. A CPU without bf16 instructions emulates those thin matmuls
    (15-45x slower than in fp32 on a 2-core AVX2 CPU; recipe 02's steps took 1.6x as long,
    benchmarks/cpu_efficiency_avx2.json), and AdamW's updates are rounded to bf16's 8 significant
    bits with no fp32 copy behind them. In fp32 (a CPU) or fp16 (a T4, whose autocast computes the
    adapters in fp16 anyway) the weights belong in fp32, as any mixed-precision master copy is.

    Usage: trainer = SFTTrainer(model=model, args=args, ...); sft.keep_fp32_adapters(trainer)
    """
    if trainer.args.bf16:
        return 0
    cast = [p for p in trainer.model.parameters() if p.requires_grad and p.dtype == torch.bfloat16]
    for parameter in cast:
        parameter.data = parameter.data.float()
    return len(cast)


@contextmanager
def loss_on_labelled_positions() -> Iterator[bool]:
    """Inside the block, TRL's SFTTrainer projects only the positions whose label counts (the answers,
    with `completion_only_loss`) through the vocabulary head on a CPU too; yields whether it could.

    TRL computes the training loss with a fused head: the hidden states times the whole vocabulary
    (49,152 wide for SmolLM2), a tile at a time. On a GPU with Triton it keeps only the labelled
    positions; elsewhere it scores every one, prompt included, so that a compiler (Neuron's) sees the
    same shapes on every batch. A CPU runs eagerly and compiles nothing, so the prompt's positions
    there are work whose result is then zeroed: 42% of recipe 02's training tokens, and on a CPU each
    tile also pays a dozen element-wise passes in fp32. Loss, gradients and logged metrics are those of
    the same positions (tests/test_sft.py); only the matmul's row count changes, so sums can round
    differently in the last bit.

    Usage: with sft.loss_on_labelled_positions(): trainer.train()
    """
    import trl.trainer.utils as trl_utils

    picks_compact = getattr(trl_utils, "_use_triton", None)  # TRL 1.x's choice of the compact path
    if picks_compact is None:
        warnings.warn("this TRL version decides differently which positions its fused head scores: "
                      "training goes on with TRL's own choice", stacklevel=3)
        yield False
        return
    trl_utils._use_triton = lambda device: device.type == "cpu" or picks_compact(device)
    try:
        yield True
    finally:
        trl_utils._use_triton = picks_compact


def packing_summary(packed_rows: Dataset | list[dict], batch_size: int, seed: int = 0) -> dict:
    """What packing does to a tokenized training set (e.g. `trainer.train_dataset`, whose rows carry
    `seq_lengths` when packed): examples per packed row, and the tokens a step computes with TRL's
    padding-free batches (the rows of a batch concatenated into one sequence, no padding) against
    plain batches of `batch_size` examples each padded to its longest (in a shuffled order, as the
    trainer samples).

    Usage: packing_summary(trainer.train_dataset, batch_size=2)["padding_share_plain"]
    """
    per_row = [list(r.get("seq_lengths") or [len(r["input_ids"])]) for r in packed_rows]
    lengths = np.random.default_rng(seed).permutation([n for row in per_row for n in row])
    plain = [lengths[i:i + batch_size] for i in range(0, len(lengths), batch_size)]
    plain_tokens = int(sum(len(b) * b.max() for b in plain))
    real = int(lengths.sum())
    counts = np.array([len(row) for row in per_row])
    return {"examples": len(lengths), "packed_rows": len(per_row), "examples_per_row": float(counts.mean()),
            "rows_with_one_example": float((counts == 1).mean()), "max_examples_per_row": int(counts.max()),
            "real_tokens": real, "plain_padded_tokens": plain_tokens,
            "padding_share_plain": 1 - real / plain_tokens,
            "steps_plain": len(plain), "steps_packed": math.ceil(len(per_row) / batch_size)}


def side_by_side(rows: list[dict], columns: dict[str, list[str]], per_domain: int = 1):
    """HTML table: input, then one column per model's output, for the first rows of each domain.

    Usage: display(side_by_side(gen_rows, {"base": base_outputs, "tuned": tuned_outputs}))
    """
    from html import escape

    from IPython.display import HTML

    shown: dict[str, int] = {}
    picked = []
    for i, row in enumerate(rows):
        if shown.get(row["domain"], 0) < per_domain:
            shown[row["domain"]] = shown.get(row["domain"], 0) + 1
            picked.append(i)
    pre = "<td style='text-align:left;vertical-align:top'><pre style='white-space:pre-wrap'>{}</pre></td>"
    head = "".join(f"<th>{escape(name)}</th>" for name in ["domain", "input", *columns])
    body = "".join("<tr>" + f"<td>{rows[i]['domain']}</td>" + pre.format(escape(rows[i]["input"]))
                   + "".join(pre.format(escape(out[i])) for out in columns.values()) + "</tr>" for i in picked)
    return HTML(f"<table><tr>{head}</tr>{body}</table>")
