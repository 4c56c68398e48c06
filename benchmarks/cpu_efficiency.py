"""How close CPU training of recipes 01 and 02 runs to the machine's matrix-multiplication limit.

In one process: a few training steps of each recipe at its cpu-preset settings (NF4 SmolLM2 +
LoRA r=16 on every linear layer, fp32 compute; 01: classification head, no adapter dropout, 16 tickets per step in
passes of 4 (8 in bf16: `ftnb.models.passes_for`), max_length 128, grouped by length, padded to a multiple of 16 tokens; 02: TRL SFT, no adapter dropout,
packed and padding-free, 2 rows per step, max_length 384, loss on the answers), and after each step, outside its
timed window, a plain fp32 matrix
multiplication of the model's own layer shapes at the same token count. The matmul time the steps' FLOPs,
counted from the model's shapes, would take at the throughput measured right after each step, divided by
the steps' time, is the share of the machine's matmul speed training gets. Measured after every step
because this machine's speed drifts by up to a third within a process: a reference taken once, minutes
away from the steps, moved the share by as much.
Each recipe runs as its cpu preset does with gradient checkpointing: 01 without, 02 with it (to stay under 4 GB of
memory), on every decoder layer in fp32 and on one in 2 in bf16 (its preset's `checkpoint_every_n_layers` 0,
`ftnb.models.every_n_layers_for`). The forward pass that checkpointing computes again in the backward is work the share
does not count as useful ("real"); "as executed" counts it, for the layers recomputed. 02 runs once more
without checkpointing, and in bf16 with every layer checkpointed, to time both (and in either dtype with the
adapters' dropout its preset leaves out, below).

FLOPs of one training step, per token unless said otherwise (frozen weights need no weight gradient):
  frozen linear W (in x out):   forward 2*in*out, input gradient dX = dY W: 2*in*out
  LoRA A (in x r), B (r x out): forward, input gradient and weight gradient: 3 * 2*r*(in+out)
  attention scores and context: per layer and sequence of L tokens, forward 2 * 2*H*dh * L(L+1)/2
                                (causal), backward twice that (dQ and dK, dP and dV)
  output head: 01's score (hidden x labels, trained: 3 x 2*in*out), 02's lm_head (hidden x vocab,
               tied to the frozen embedding: 2 x 2*in*out)
"real" counts the tokens that carry text (attention causal within each example) and, for 02's head,
the positions the loss reads (the answers' next tokens); "as executed" counts what the kernels were
given (every padded position; attention over the whole padded row, causal; 02's head at every
position). Norms, activations, softmax, the loss and the optimizer are not matmuls and are not
counted: their time is part of what keeps the share below 1.

Also measured at the same token count: the extra time of the NF4 layers over fp32 matmuls of
the same shapes (bitsandbytes de-quantizes each weight in the forward pass and again for the
input gradient: what the recipes, which train inside `ftnb.models.weights_dequantized_once`, no longer pay
in training), the adapters' dropout masks where a recipe has them (`lora_dropout`: a fresh random mask over every
adapted layer's input in every forward pass, drawn by `ftnb.dropout.FastDropout` and timed beside torch's own;
both cpu presets now train without), 02's loss (TRL's fused vocabulary head, forward and backward, over the answers'
positions and over every position), and the attention, forward and
backward, with transformers' "sdpa" (on a CPU PyTorch's flash kernel) and "eager" implementations
(02's packed rows one example at a time, as its training attends them). Then the same steps again with
one of the recipes' CPU speed-ups undone, to time what it saves (in seconds, and at equal matmul speed: the
undone row's share of the reference against the recipe row's, as the rows run minutes apart and the machine's
speed drifts in between): the adapters' dropout at all (0.05 with FastDropout's masks, both notebooks' default,
which their cpu presets leave out: 02's validation loss is the same without, 01's macro-F1 within a run's noise); every
4-bit weight de-quantized in each pass as bitsandbytes does it, instead of once
for the whole training (`weights_dequantized_once`: both recipes, 01 in either dtype), and for 02 the adapters in bf16, as TRL's SFTTrainer stores a quantized model's adapters
(the recipe puts them back in fp32 with `sft.keep_fp32_adapters`): what that costs where bf16 is emulated;
02's vocabulary head over every position, TRL's choice on a CPU (the recipe trains inside
`sft.loss_on_labelled_positions`, which projects the answers' positions alone); and 02's attention over
each whole packed row under transformers' block mask (`training_attention` attends one example at a time,
`ftnb.attention.by_sequence`).

On a CPU with bf16 instructions (AVX512-BF16, AMX) the same steps run once more computing in bf16
(the `cpu_bf16` of notebooks 01 and 02, on in their `cpu` presets), against the bf16 matmul throughput of the same shapes and against the fp32 one.
01 computes there with its embedding and its layers' norms back in bf16 (`ftnb.models.layers_in_compute_dtype`,
as notebook 01 does; 02's head is its embedding, which the helper leaves alone), timed once more without;
and 01 trains inside `ftnb.models.adapter_inputs_uncast`, as notebook 01 does (peft copies every adapter's
input to fp32 under a CPU's autocast), timed once more without. Training runs inside
`ftnb.models.training_attention`, as in notebooks 01 and 02: in bf16 on a CPU with "eager" attention, else with the
model's own ("sdpa"), and packed rows (02's) one example at a time; both kernels are timed alone in either dtype. 02 trains inside
`ftnb.tasks.sft.loss_on_labelled_positions` too, as its notebook does.

Fewer, larger passes run faster on a CPU and keep more activations alive. For 01, in the dtype its cpu
preset computes in here, the same steps run once more in passes of the other size (8 tickets x 2 in bf16, the
preset's there, against the 4 x 4 it takes in fp32, where passes of 8 pass 4 GB; the same 16 tickets per step),
and in each dtype the activations one pass keeps for its backward pass are counted at 4 and at 8 tickets of
128 tokens (autograd's saved tensors; the longest batch comes first).

Usage: flock /tmp/ftnb-cpu.lock .venv/bin/python benchmarks/cpu_efficiency.py   # 20-27 min on 2 cores at --steps 8
       (prints the breakdown and writes benchmarks/cpu_efficiency.json; --steps N: timed steps per recipe)
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.lora import LoraLayer
from transformers import DataCollatorWithPadding, TrainerCallback, TrainingArguments

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ftnb import attention, data, env  # noqa: E402
from ftnb.dropout import FastDropout, use_fast_dropout  # noqa: E402
from ftnb.models import (adapter_inputs_uncast, checkpointed_layers, every_n_layers_for,  # noqa: E402
                         layers_in_compute_dtype, load_model, load_tokenizer, passes_for, training_attention,
                         weights_dequantized_once)
from ftnb.tasks import classify, sft  # noqa: E402

MODEL = "smollm2-135m-instruct"
WARMUP_STEPS = 2  # the first steps pay for allocation and, grouped by length, hold the longest batch
LORA = dict(r=16, lora_alpha=32, target_modules="all-linear")  # 01's and 02's adapters
LORA_DROPOUT = 0.05  # both notebooks' default; their cpu presets train without (the adapter_dropout undo rows)
SEED = 0
CHECKPOINT_EVERY_N_LAYERS = 0  # 02's cpu preset: one decoder layer in N recomputed, N chosen by the compute dtype
MICRO_BATCHES = (4, 8)  # 01's tickets per pass: its cpu preset's in fp32 and in bf16
UNDONE = {"adapter_dropout": f"with the adapters' dropout ({LORA_DROPOUT}, FastDropout's masks), the notebook's default",
          "trl_bf16_adapters": "with the adapters in bf16 as TRL stores them",
          "full_vocabulary_head": "with the vocabulary head over every position, the prompt's too",
          "fp32_layers": "with the embedding and the layers' norms in fp32, as prepare_model_for_kbit_training leaves them",
          "cast_adapter_inputs": "with peft casting every adapter's input to fp32 (it checks CUDA's autocast alone)",
          "block_mask_attention": "with attention over each whole packed row under transformers' block mask",
          "dequantize_per_pass": "with every 4-bit weight de-quantized in each pass, forward and backward",
          "every_layer_checkpointed": "with every decoder layer checkpointed (less memory: each recomputed)",
          "no_gradient_checkpointing": "without gradient checkpointing (more memory: every activation kept)"}


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step and, after each, outside the timed window, the matmul throughput
    of the model's shapes in each of `reference_dtypes` (`matmul_throughput`) at the mean token count of
    the micro-batches so far."""

    def __init__(self, config, head: tuple[int, int], recorder: "ShapeRecorder",
                 reference_dtypes: tuple[torch.dtype, ...] = ()):
        self.config, self.head, self.recorder = config, head, recorder
        self.seconds: list[float] = []
        self.throughput: dict[torch.dtype, list[float]] = {dtype: [] for dtype in reference_dtypes}

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)
        if self.throughput:
            tokens = round(statistics.mean(b["rows"] * b["width"] for b in self.recorder.batches))
            for dtype, values in self.throughput.items():
                values.append(matmul_throughput(self.config, tokens, self.head, dtype))


class ShapeRecorder:
    """Wraps a data collator and keeps each micro-batch's example lengths and padded shape."""

    def __init__(self, collator):
        self.collator, self.batches = collator, []

    def __call__(self, features):
        batch = self.collator(features)
        rows, width = batch["input_ids"].shape
        if "position_ids" in batch:  # padding-free: one row of examples whose positions restart at 0
            starts = (batch["position_ids"].flatten() == 0).nonzero().flatten().tolist() + [rows * width]
            lengths = [b - a for a, b in zip(starts, starts[1:])]
        else:
            lengths = batch["attention_mask"].sum(1).tolist()
        # the positions whose output the loss reads: a causal LM's labelled next tokens (02: the answers),
        # else every token (01's classification head runs on every position, the pooling picks one)
        labels = batch.get("labels")
        scored = int((labels[:, 1:] != sft.IGNORE).sum()) if labels is not None and labels.dim() == 2 else sum(lengths)
        self.batches.append({"rows": rows, "width": width, "lengths": lengths, "scored": scored,
                             "packed": "position_ids" in batch})
        return batch


def layer_shapes(config) -> list[tuple[int, int]]:
    """(in, out) of the linear layers of one decoder layer: q, k, v, o, gate, up, down."""
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    h, m = config.hidden_size, config.intermediate_size
    return [(h, q), (h, kv), (h, kv), (q, h), (h, m), (h, m), (m, h)]


def training_flops(config, batches: list[dict], head: tuple[int, int], head_trained: bool, real: bool,
                   recomputed: float = 0.0) -> float:
    """Matmul FLOPs of training on these micro-batches (module docstring), real or as executed; as executed,
    the forward pass of the share `recomputed` of the decoder layers (gradient checkpointing) counts twice."""
    shapes = layer_shapes(config)
    passes = 2 + (0 if real else recomputed)  # of the frozen weights: forward (+ its recompute) + dX
    per_token = config.num_hidden_layers * (passes * 2 * sum(i * o for i, o in shapes)
                                            + (passes + 1) * 2 * LORA["r"] * sum(i + o for i, o in shapes))  # adapter: + dW
    per_position = (6 if head_trained else 4) * head[0] * head[1]  # the output head
    attention = (passes + 1) * 2 * 2 * config.num_attention_heads * config.head_dim * config.num_hidden_layers  # per (query, key)
    total = 0.0
    for b in batches:
        spans = b["lengths"] if real else [b["width"]] * b["rows"]
        total += per_token * sum(spans) + attention * sum(n * (n + 1) / 2 for n in spans)
        total += per_position * (b["scored"] if real else b["rows"] * b["width"])
    return total


def _median_seconds(fn, repeats: int = 5) -> float:
    fn()  # warm-up: allocation, kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_throughput(config, tokens: int, head: tuple[int, int], dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of plain matmuls in `dtype` in the proportions of a training step: every linear layer's
    forward X W^T and input gradient dY W at `tokens` rows, 30 layers plus the output head."""
    def layer_pair(i: int, o: int):
        x, w, dy = (torch.randn(*shape, dtype=dtype) for shape in [(tokens, i), (o, i), (tokens, o)])
        return lambda: (F.linear(x, w), dy @ w)

    layer = [layer_pair(i, o) for i, o in layer_shapes(config)]
    layer_s = _median_seconds(lambda: [f() for f in layer])
    head_s = _median_seconds(layer_pair(*head))
    flops = 4 * tokens * (config.num_hidden_layers * sum(i * o for i, o in layer_shapes(config)) + head[0] * head[1])
    return flops / (config.num_hidden_layers * layer_s + head_s)


def nf4_overhead_seconds(model, tokens: int) -> float:
    """Per micro-batch of `tokens` rows: the NF4 layers' forward (bitsandbytes' 4-bit matmul) and
    input-gradient weight (de-quantization) minus fp32 matmuls of the same shapes. Measured on
    the first decoder layer (every layer has the same shapes), times the number of layers."""
    first_layer = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)][:len(layer_shapes(model.config))]
    total = 0.0
    for module in first_layer:
        weight, state = module.weight, module.weight.quant_state
        dense = bnbF.dequantize_4bit(weight.data, state)
        x = torch.randn(tokens, dense.shape[1], requires_grad=True)
        nf4 = _median_seconds(lambda: bnb.matmul_4bit(x, weight, quant_state=state), repeats=3)
        fp32 = _median_seconds(lambda: F.linear(x, dense), repeats=3)
        total += nf4 - fp32 + _median_seconds(lambda: bnbF.dequantize_4bit(weight.data, state), repeats=3)
    return total * model.config.num_hidden_layers


def lora_dropout_seconds(model, tokens: int, dropout: torch.nn.Module) -> float:
    """Per micro-batch of `tokens` rows: the adapters' dropout on their inputs with `dropout` (torch's
    nn.Dropout or FastDropout), summed over the adapted layers (peft draws a new random mask for each, q, k
    and v included though they read the same input). Its backward, a multiplication by the same mask, is
    not counted."""
    widths = Counter(m.in_features for m in model.modules() if isinstance(m, LoraLayer))
    total = 0.0
    for width, layers in widths.items():
        x = torch.randn(tokens, width)
        total += layers * _median_seconds(lambda: dropout(x), repeats=3)
    return total


def attention_seconds(model, rows: int, width: int, dtype: torch.dtype, implementation: str,
                      backward: bool = True, packed: list[int] | None = None) -> float:
    """Per micro-batch of `rows` x `width` tokens: every decoder layer's attention, forward and (with
    `backward`) backward, in `dtype`, as transformers' `implementation` computes it ("sdpa": PyTorch's fused
    kernel, on a CPU flash attention; "eager": a matmul, a softmax in fp32, a matmul). Timed on the first
    layer's module (every layer has the same shapes), one row half padding, under a causal mask; a `packed`
    row (one row holding examples of these lengths) as training attends it, one example at a time
    (`ftnb.attention.by_sequence`)."""
    from transformers.models.llama.modeling_llama import eager_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    attend = eager_attention_forward if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]
    config = model.config
    layer = next(m for m in model.modules() if hasattr(m, "num_key_value_groups"))
    head_dim = config.head_dim
    q = torch.randn(rows, config.num_attention_heads, width, head_dim, dtype=dtype, requires_grad=backward)
    k, v = (torch.randn(rows, config.num_key_value_heads, width, head_dim, dtype=dtype, requires_grad=backward)
            for _ in range(2))
    extra = {}
    if packed:
        attend = ALL_ATTENTION_FUNCTIONS[attention.by_sequence(implementation)]
        extra["position_ids"] = torch.cat([torch.arange(length) for length in packed])[None]
        mask = None  # a packed row needs none: each example is attended causally on its own
    else:
        keep = torch.ones(width, width, dtype=torch.bool).tril()[None, None].repeat(rows, 1, 1, 1)
        keep[0, :, :, width // 2:] = False
        mask = keep if implementation != "eager" else torch.zeros(keep.shape, dtype=dtype).masked_fill(
            ~keep, torch.finfo(dtype).min)

    def step():
        with torch.set_grad_enabled(backward):
            out, _ = attend(layer, q, k, v, mask, scaling=head_dim ** -0.5, dropout=0.0, **extra)
        if backward:
            out.sum().backward()
    return _median_seconds(step, repeats=5) * config.num_hidden_layers


def attention_seconds_per_step(model, batches: list[dict], steps: int, dtype: torch.dtype) -> dict[str, float]:
    """The attention of the timed micro-batches (their own shapes; packed rows one example at a time, as
    `ftnb.models.training_attention` trains), per optimizer step, with either implementation
    (`attention_seconds`): what `training_attention` chooses between; and, for comparison, a forward pass
    alone over 16 rows of 512 tokens, as recipe 01 predicts on long tickets."""
    shapes = Counter((b["rows"], b["width"], tuple(b["lengths"]) if b.get("packed") else None) for b in batches)
    times = {implementation: sum(count * attention_seconds(model, rows, width, dtype, implementation,
                                                           packed=list(lengths or ()))
                                 for (rows, width, lengths), count in shapes.items()) / steps
             for implementation in ("sdpa", "eager")}
    times.update({f"{implementation}_forward_16x512": attention_seconds(model, 16, 512, dtype, implementation,
                                                                        backward=False)
                  for implementation in ("sdpa", "eager")})
    return times


def vocabulary_head_seconds(model, positions: int, dtype: torch.dtype) -> float:
    """Per micro-batch: TRL's fused vocabulary head, forward and backward, over `positions` positions in
    `dtype`, as SFTTrainer trains (the model's tied output weight, in tiles of the vocabulary; the log-
    probabilities of the targets plus the entropy and top-1 it logs)."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    weight = model.get_output_embeddings().weight
    hidden = torch.randn(positions, weight.shape[1], requires_grad=True)
    targets = torch.randint(0, weight.shape[0], (positions,))

    def step():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            log_probs, *_ = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE,
                                                         None, 1.0, ("log_probs", "entropy", "is_top1"))
        log_probs.sum().backward()
        hidden.grad = None

    return _median_seconds(step, repeats=3)


def vocabulary_head_seconds_per_step(model, batches: list[dict], steps: int, dtype: torch.dtype) -> dict[str, float]:
    """The fused vocabulary head of the timed micro-batches, per optimizer step (`vocabulary_head_seconds`),
    over the labelled positions alone (`ftnb.tasks.sft.loss_on_labelled_positions`, as the recipe trains) and
    over every position (TRL's own choice on a CPU)."""
    every = [b["rows"] * (b["width"] - 1) for b in batches]  # the next-token positions of each micro-batch
    return {"labelled_positions": sum(vocabulary_head_seconds(model, b["scored"], dtype) for b in batches) / steps,
            "every_position": sum(vocabulary_head_seconds(model, n, dtype) for n in every) / steps}


def preset_micro_batch(dtype: torch.dtype) -> int:
    """01's tickets per pass at its cpu preset computing in `dtype`: 8 (x 2), or 4 (x 4) in fp32."""
    return passes_for(MICRO_BATCHES[1], 16 // MICRO_BATCHES[1], MICRO_BATCHES[0], dtype)[0]


def classification_trainer(model_name: str, tokenizer, steps: int, folder: str, dtype: torch.dtype,
                           adapter_dropout: bool = False, fp32_layers: bool = False, cast_adapter_inputs: bool = False,
                           dequantize_per_pass: bool = False, micro_batch: int | None = None):
    """Recipe 01 at its cpu preset (notebook 01's training cells), limited to `steps` optimizer steps,
    computing in `dtype`, 16 tickets per step in passes of `micro_batch` (None: the preset's, 8 x 2 in bf16 and
    4 x 4 in fp32), without the adapters' dropout as the preset trains; `adapter_dropout` trains with it
    (LORA_DROPOUT, FastDropout's masks, as the notebook's default does),
    `fp32_layers` leaves the embedding and the norms in the fp32 of prepare_model_for_kbit_training (in bf16),
    `cast_adapter_inputs` trains without `adapter_inputs_uncast` (in bf16: peft's fp32 copies of the inputs),
    `dequantize_per_pass` without `weights_dequantized_once` (bitsandbytes de-quantizing in every pass)."""
    ds = data.load("tickets", schema=data.Schema.of("subject", "body", "category"))
    labels = classify.labels_for("category", ds["train"], "tickets")
    id2label, label2id = classify.label_maps(labels)
    model = load_model(model_name, task="seq-cls", quantization="nf4", double_quant=True, num_labels=len(labels),
                       id2label=id2label, label2id=label2id, tokenizer=tokenizer, dtype=dtype)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if not fp32_layers:
        layers_in_compute_dtype(model, dtype)  # bf16 only
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", modules_to_save=["score"],
                                             lora_dropout=LORA_DROPOUT if adapter_dropout else 0.0, **LORA))
    use_fast_dropout(model)
    micro_batch = micro_batch or preset_micro_batch(dtype)
    train = classify.tokenize_split(ds["train"], tokenizer, "category", labels, max_length=128)
    args = TrainingArguments(
        output_dir=folder, max_steps=steps, learning_rate=1e-3, per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=16 // micro_batch, lr_scheduler_type="cosine", warmup_steps=0.1,
        gradient_checkpointing=False, train_sampling_strategy="group_by_length", **env.precision_flags(dtype),
        save_strategy="no", report_to="none", disable_tqdm=True, seed=SEED)
    recorder = ShapeRecorder(DataCollatorWithPadding(tokenizer, pad_to_multiple_of=16))
    trainer = classify.WeightedTrainer(model=model, args=args, train_dataset=train, data_collator=recorder)
    @contextlib.contextmanager
    def training_context():
        with contextlib.ExitStack() as stack:
            if not cast_adapter_inputs:
                stack.enter_context(adapter_inputs_uncast(model, dtype))
            if not dequantize_per_pass:
                stack.enter_context(weights_dequantized_once(model))
            yield
    return trainer, recorder, (model.config.hidden_size, len(labels)), True, training_context


def sft_trainer(model_name: str, tokenizer, steps: int, folder: str, dtype: torch.dtype,
                adapter_dropout: bool = False, trl_bf16_adapters: bool = False, full_vocabulary_head: bool = False,
                block_mask_attention: bool = False, dequantize_per_pass: bool = False,
                every_layer_checkpointed: bool = False, no_gradient_checkpointing: bool = False):
    """Recipe 02 at its cpu preset (notebook 02's training cells), limited to `steps` optimizer steps,
    computing in `dtype`, without the adapters' dropout as the preset trains; `adapter_dropout` trains with it
    (LORA_DROPOUT, masks drawn by FastDropout as the notebook does with its default), `trl_bf16_adapters` leaves
    the adapters in the bf16 TRL stores them in, `full_vocabulary_head` trains
    without `sft.loss_on_labelled_positions` (the vocabulary head over the prompt's positions too),
    `block_mask_attention` attends over each whole packed row as transformers does, instead of one example
    at a time as `training_attention` has it, `dequantize_per_pass` trains without `weights_dequantized_once`,
    `every_layer_checkpointed` recomputes every decoder layer's forward pass in the backward (not one in
    CHECKPOINT_EVERY_N_LAYERS, the preset's, would), `no_gradient_checkpointing` none: every activation kept."""
    from trl import SFTConfig, SFTTrainer

    rows = data.subset(data.load("domains", schema=sft.SCHEMA)["train"], 360, SEED, stratify="domain")
    train, _ = sft.build_sft_dataset(rows, tokenizer, max_length=384)
    model = load_model(model_name, quantization="nf4", double_quant=True, dtype=dtype)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=not no_gradient_checkpointing)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", lora_dropout=LORA_DROPOUT if adapter_dropout else 0.0,
                                             **LORA))
    use_fast_dropout(model)
    args = SFTConfig(
        output_dir=folder, max_steps=steps, per_device_train_batch_size=2, gradient_accumulation_steps=1,
        learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=0.05, max_length=384, packing=True,
        completion_only_loss=True, gradient_checkpointing=not no_gradient_checkpointing,
        gradient_checkpointing_kwargs={
            "every_n_layers": every_n_layers_for(1 if every_layer_checkpointed else CHECKPOINT_EVERY_N_LAYERS, dtype)},
        **env.precision_flags(dtype),
        save_strategy="no", report_to="none", disable_tqdm=True, seed=SEED)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    if not trl_bf16_adapters:
        sft.keep_fp32_adapters(trainer)
    recorder = ShapeRecorder(trainer.data_collator)
    trainer.data_collator = recorder
    @contextlib.contextmanager
    def training_context():
        with contextlib.ExitStack() as stack:
            if not full_vocabulary_head:
                stack.enter_context(sft.loss_on_labelled_positions())
            if block_mask_attention:
                stack.enter_context(_whole_rows(model))
            if not dequantize_per_pass:
                stack.enter_context(weights_dequantized_once(model))
            yield
    return trainer, recorder, (model.config.hidden_size, model.config.vocab_size), False, training_context


@contextlib.contextmanager
def _whole_rows(model):
    """Inside `training_attention`: its kernel, without attending packed rows one example at a time."""
    inner = model.get_base_model()
    chosen = inner.config._attn_implementation
    inner.set_attn_implementation(chosen.removeprefix(attention.PREFIX))
    try:
        yield
    finally:
        inner.set_attn_implementation(chosen)


@dataclasses.dataclass
class Timed:
    """The timed steps of one recipe: their micro-batches, seconds and reference matmul throughputs."""
    trainer: Any
    batches: list[dict]  # every timed micro-batch, in order
    seconds: list[float]  # per timed step
    throughput: dict[torch.dtype, list[float]]  # per timed step, measured right after it
    head: tuple[int, int]
    head_trained: bool
    training_context: Callable  # what the recipe trains inside, besides training_attention

    @property
    def step_batches(self) -> list[list[dict]]:
        micro = self.trainer.args.gradient_accumulation_steps
        return [self.batches[k * micro:(k + 1) * micro] for k in range(len(self.seconds))]

    @property
    def recomputed(self) -> float:
        """The share of the decoder layers whose forward pass gradient checkpointing ran twice."""
        layers, total = checkpointed_layers(self.trainer.model)
        return layers / total

    def fraction(self, dtype: torch.dtype, real: bool = True, steps: list[int] | None = None) -> float:
        """The steps' matmul FLOPs at the `dtype` throughput measured after each step, in seconds, over
        the steps' seconds; of the timed steps `steps` (their indices), by default all."""
        config = self.trainer.model.config
        chosen = range(len(self.seconds)) if steps is None else steps
        recomputed = self.recomputed
        ideal = sum(training_flops(config, self.step_batches[k], self.head, self.head_trained, real, recomputed)
                    / self.throughput[dtype][k] for k in chosen)
        return ideal / sum(self.seconds[k] for k in chosen)


def timed_steps(build, model_name: str, tokenizer, steps: int, dtype: torch.dtype,
                reference_dtypes: tuple[torch.dtype, ...] = (), callbacks: tuple[TrainerCallback, ...] = ()) -> Timed:
    """Train WARMUP_STEPS + steps optimizer steps computing in `dtype`, measuring the matmul throughput in
    each of `reference_dtypes` after every step; `callbacks` run after the step timer's, outside its window."""
    with tempfile.TemporaryDirectory() as folder:
        trainer, recorder, head, head_trained, training_context = build(model_name, tokenizer, WARMUP_STEPS + steps,
                                                                         folder, dtype)
        timer = StepTimer(trainer.model.config, head, recorder, reference_dtypes)
        for callback in (timer, *callbacks):
            trainer.add_callback(callback)
        # as the notebooks train: 01 with "eager" attention and its adapters' inputs uncast on a CPU in bf16,
        # 02 scoring the answers alone
        with training_attention(trainer.model, dtype), training_context():
            trainer.train()
    micro = trainer.args.gradient_accumulation_steps
    return Timed(trainer, recorder.batches[WARMUP_STEPS * micro:(WARMUP_STEPS + steps) * micro],
                 timer.seconds[WARMUP_STEPS:], {dtype: values[WARMUP_STEPS:] for dtype, values in timer.throughput.items()},
                 head, head_trained, training_context)


def token_counts(batches: list[dict]) -> tuple[int, int, int]:
    """Tokens that carry text, tokens the kernels were given (padding included), and the latter per
    micro-batch (the row count the matmul references are timed at)."""
    real = sum(sum(b["lengths"]) for b in batches)
    executed = sum(b["rows"] * b["width"] for b in batches)
    return real, executed, round(executed / len(batches))


def saved_activation_mib(timed: Timed, rows: int, width: int, dtype: torch.dtype) -> float:
    """MiB that the forward pass of one micro-batch of `rows` x `width` tokens keeps for the backward pass
    (every tensor autograd saves, each storage once, the weights excluded), computed in `dtype` inside what
    the recipe trains inside: what grows with the micro-batch, measured rather than read off the RSS."""
    model = timed.trainer.model
    saved: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(1000, 20000, (rows, width))
    model.train()
    with (training_attention(model, dtype), timed.training_context(),
          torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)):
        # the weights, and their de-quantized copies (`weights_dequantized_once`): held once, whatever the pass
        weights = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return sum(saved.values()) / 2**20


def activations_by_micro_batch(timed: Timed, dtype: torch.dtype) -> dict[str, float]:
    """01's `saved_activation_mib` for each of MICRO_BATCHES tickets of max_length (128) tokens."""
    return {f"{rows} x 128": saved_activation_mib(timed, rows, 128, dtype) for rows in MICRO_BATCHES}


def measure_other_pass(model_name: str, tokenizer, steps: int, dtype: torch.dtype, recipe: dict) -> dict:
    """01's steps computing in `dtype` in passes of the other of MICRO_BATCHES than the preset takes in that
    dtype (the same 16 tickets per step): real tokens per second against the `recipe` row's, and the share of
    the fp32 matmul limit."""
    other = next(rows for rows in MICRO_BATCHES if rows != preset_micro_batch(dtype))
    timed = timed_steps(functools.partial(classification_trainer, micro_batch=other), model_name,
                        tokenizer, steps, dtype, (torch.float32,))
    seconds, (real, executed, _) = sum(timed.seconds), token_counts(timed.batches)
    return {"micro_batch": other, "seconds_per_step": seconds / steps,
            "tokens_per_second_real": real / seconds,
            "times_the_recipes_speed": real / seconds / recipe["tokens_per_second_real"],
            "padding_waste": 1 - real / executed, "fraction_of_fp32_matmul": timed.fraction(torch.float32)}


def measure(build, model_name: str, tokenizer, steps: int) -> dict:
    """The breakdown of `steps` timed fp32 training steps (module docstring)."""
    timed = timed_steps(build, model_name, tokenizer, steps, torch.float32, (torch.float32,))
    trainer, batches, seconds, head, head_trained = (timed.trainer, timed.batches, sum(timed.seconds), timed.head,
                                                     timed.head_trained)
    model, micro = trainer.model, trainer.args.gradient_accumulation_steps
    config = model.config
    real, executed = (training_flops(config, batches, head, head_trained, r, timed.recomputed) for r in (True, False))
    tokens_real, tokens_executed, tokens_per_micro = token_counts(batches)
    matmul, fraction_real = statistics.mean(timed.throughput[torch.float32]), timed.fraction(torch.float32)
    nf4_s = nf4_overhead_seconds(model, tokens_per_micro) * len(batches) / steps
    rate = model.peft_config["default"].lora_dropout  # 0 at both cpu presets: peft's identity, no masks to time
    dropout_s, torch_dropout_s = ((lora_dropout_seconds(model, tokens_per_micro, layer) * len(batches) / steps if rate
                                   else 0.0) for layer in (FastDropout(rate), torch.nn.Dropout(rate)))
    vocabulary = vocabulary_head_seconds_per_step(model, batches, steps, torch.float32) if not head_trained else None
    step_s = seconds / steps
    out = {
        "timed_steps": steps, "micro_batches_per_step": micro, "seconds_per_step": step_s,
        "tokens_per_step_real": tokens_real / steps, "tokens_per_step_executed": tokens_executed / steps,
        "tokens_per_second_real": tokens_real / seconds,
        "padding_waste": 1 - tokens_real / tokens_executed,
        "gflop_per_step_real": real / steps / 1e9, "gflop_per_step_executed": executed / steps / 1e9,
        "achieved_gflops_real": real / seconds / 1e9, "achieved_gflops_executed": executed / seconds / 1e9,
        "matmul_fp32_gflops": matmul / 1e9, "matmul_tokens": tokens_per_micro,
        "matmul_fp32_gflops_range": [min(timed.throughput[torch.float32]) / 1e9, max(timed.throughput[torch.float32]) / 1e9],
        "fraction_real": fraction_real, "fraction_executed": timed.fraction(torch.float32, real=False),
        "nf4_overhead_s_per_step": nf4_s, "nf4_overhead_share": nf4_s / step_s,
        "lora_dropout": rate, "lora_dropout_s_per_step": dropout_s, "lora_dropout_share": dropout_s / step_s,
        "torch_lora_dropout_s_per_step": torch_dropout_s,  # the same masks drawn by torch's nn.Dropout
        "vocabulary_head_s_per_step": vocabulary,  # 02: TRL's fused head, answers alone and every position
        "attention_s_per_step": attention_seconds_per_step(model, batches, steps, torch.float32),
        # what the share of the matmul limit would be with that cost gone (the same real FLOPs)
        "fraction_real_without_lora_dropout": fraction_real * step_s / (step_s - dropout_s),
        "fraction_real_without_padding": fraction_real * tokens_executed / tokens_real,
    }
    if head_trained:  # 01: what a larger pass would keep (its longest tickets come first)
        out["saved_activation_mib_at_max_length"] = activations_by_micro_batch(timed, torch.float32)
    return out


def cost_of_undoing(build, undo: str, model_name: str, tokenizer, steps: int, recipe: dict,
                    dtype: torch.dtype = torch.float32) -> dict:
    """A recipe's steps in `dtype` once more with one CPU speed-up undone (`undo`, a keyword of `build` set to
    True: a key of UNDONE), and how many times as long they take as the `recipe` row measured in that dtype:
    in seconds, and at equal matmul speed (the ratio of the two rows' shares of the fp32 matmul reference
    measured after each step), which takes out the machine's drift between the rows, minutes apart."""
    timed = timed_steps(functools.partial(build, **{undo: True}), model_name, tokenizer, steps, dtype, (torch.float32,))
    seconds = sum(timed.seconds) / steps
    recipe_share = recipe["fraction_real"] if "fraction_real" in recipe else recipe["fraction_of_fp32_matmul"]
    return {"seconds_per_step": seconds, "times_the_recipe": seconds / recipe["seconds_per_step"],
            "times_the_recipe_at_equal_matmul_speed": recipe_share / timed.fraction(torch.float32)}


def undo_each(build, speed_ups: list[str], model_name: str, tokenizer, steps: int, recipe: dict,
              dtype: torch.dtype, label: str) -> None:
    """`cost_of_undoing` for each of `speed_ups`, kept in the `recipe` row under its name and printed."""
    for speed_up in speed_ups:
        recipe[speed_up] = slow = cost_of_undoing(build, speed_up, model_name, tokenizer, steps, recipe, dtype)
        print(f"{label} {UNDONE[speed_up]}: {slow['seconds_per_step']:.2f} s/step "
              f"({slow['times_the_recipe']:.2f}x the recipe's; at equal matmul speed "
              f"{slow['times_the_recipe_at_equal_matmul_speed']:.2f}x)")


def measure_bf16(build, model_name: str, tokenizer, steps: int, fp32: dict) -> dict:
    """The same steps computing in bf16 (a CPU with bf16 instructions: the cpu_bf16 of notebooks 01 and 02), against
    the bf16 and the fp32 matmul throughput of the same shapes measured after each step, and the speed-up
    over the fp32 row."""
    timed = timed_steps(build, model_name, tokenizer, steps, torch.bfloat16, (torch.float32, torch.bfloat16))
    trainer, batches, seconds = timed.trainer, timed.batches, sum(timed.seconds)
    real = training_flops(trainer.model.config, batches, timed.head, timed.head_trained, real=True)
    tokens_real = token_counts(batches)[0]
    return {"timed_steps": steps, "seconds_per_step": seconds / steps, "tokens_per_second_real": tokens_real / seconds,
            "achieved_gflops_real": real / seconds / 1e9,
            "matmul_bf16_gflops": statistics.mean(timed.throughput[torch.bfloat16]) / 1e9,
            "matmul_fp32_gflops": statistics.mean(timed.throughput[torch.float32]) / 1e9,
            "fraction_of_bf16_matmul": timed.fraction(torch.bfloat16),
            "fraction_of_fp32_matmul": timed.fraction(torch.float32),
            "speedup_over_fp32": fp32["seconds_per_step"] / (seconds / steps),
            "attention_s_per_step": attention_seconds_per_step(trainer.model, batches, steps, torch.bfloat16),
            "vocabulary_head_s_per_step": None if timed.head_trained else vocabulary_head_seconds_per_step(
                trainer.model, batches, steps, torch.bfloat16),
            "saved_activation_mib_at_max_length": activations_by_micro_batch(timed, torch.bfloat16)
            if timed.head_trained else None}


def vocabulary_line(row: dict) -> str:
    """02's fused vocabulary head per step over the answers and over every position (empty for 01)."""
    times = row.get("vocabulary_head_s_per_step")
    return "" if not times else (f"vocabulary head {times['labelled_positions']:.2f} s/step over the answers, "
                                 f"{times['every_position']:.2f} over every position; ")


def dropout_line(row: dict) -> str:
    """The adapters' dropout masks' share of a step (FastDropout) and their time with torch's, or their absence."""
    if not row["lora_dropout"]:
        return "no LoRA dropout; "
    return (f"LoRA dropout {row['lora_dropout_share']:.0%} "
            f"({row['torch_lora_dropout_s_per_step']:.2f} s/step with torch's), ")


def attention_line(row: dict) -> str:
    """The attention's time per step with either implementation, for the printed summary."""
    times = row["attention_s_per_step"]
    return (f"attention {times['sdpa']:.2f} s/step with sdpa, {times['eager']:.2f} with eager "
            f"(forward over 16 x 512 tokens: {times['sdpa_forward_16x512']:.2f} s and {times['eager_forward_16x512']:.2f} s)")


def cpu_model() -> str | None:
    """The CPU's model name as Linux reports it (the shares differ between CPUs), None elsewhere."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


def machine() -> dict:
    """What the timings depend on: the CPU, its bf16 instructions, the threads and the library versions."""
    return {"processor": platform.processor() or platform.machine(), "cpu_model": cpu_model(),
            "cpu_bf16_instructions": env.cpu_native_bf16(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "bitsandbytes": bnb.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per recipe")
    parser.add_argument("--model", default=MODEL,
                        help="registry name, folder or hub id (tiny-llama-test: a quick check of the script)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "cpu_efficiency.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    env.setup(SEED)
    tokenizer = load_tokenizer(args.model)
    result = {
        "command": " ".join(["flock /tmp/ftnb-cpu.lock .venv/bin/python benchmarks/cpu_efficiency.py", *sys.argv[1:]]),
        "measured": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
        "machine": machine(),
        "model": f"{args.model}, NF4 + double quant, LoRA r=16 all-linear, fp32 compute (recipes_bf16: bf16)"
                 + (" (offline: SmolLM2 de-quantized from Q4_1)" if args.model == MODEL else ""),
        "recipes": {},
        "recipes_bf16": {},  # the same steps in bf16, where the CPU has bf16 instructions (else empty)
    }
    for name, build in [("01_ticket_classification", classification_trainer), ("02_domain_generation", sft_trainer)]:
        result["recipes"][name] = row = measure(build, args.model, tokenizer, args.steps)
        print(f"{name}: {row['seconds_per_step']:.2f} s/step, {row['tokens_per_second_real']:.0f} real tokens/s, "
              f"padding {row['padding_waste']:.0%}; {row['achieved_gflops_real']:.1f} GFLOP/s real "
              f"({row['achieved_gflops_executed']:.1f} as executed), fp32 matmul {row['matmul_fp32_gflops']:.1f} GFLOP/s "
              f"({'-'.join(f'{g:.0f}' for g in row['matmul_fp32_gflops_range'])} over the steps): share "
              f"{row['fraction_real']:.2f} ({row['fraction_executed']:.2f}); NF4 overhead "
              f"{row['nf4_overhead_share']:.0%} of a step, {dropout_line(row)}"
              f"{vocabulary_line(row)}{attention_line(row)}")
        sft_only = (["trl_bf16_adapters", "full_vocabulary_head", "block_mask_attention", "no_gradient_checkpointing"]
                    if build is sft_trainer else [])
        undo_each(build, ["adapter_dropout", "dequantize_per_pass"] + sft_only, args.model, tokenizer, args.steps, row, torch.float32, f"{name},")
        if env.cpu_native_bf16():
            result["recipes_bf16"][name] = half = measure_bf16(build, args.model, tokenizer, args.steps, row)
            print(f"{name}, bf16: {half['seconds_per_step']:.2f} s/step ({half['speedup_over_fp32']:.2f}x fp32), "
                  f"{half['achieved_gflops_real']:.1f} GFLOP/s real: {half['fraction_of_fp32_matmul']:.2f} of the "
                  f"fp32 matmul limit ({half['matmul_fp32_gflops']:.1f} GFLOP/s), {half['fraction_of_bf16_matmul']:.2f} "
                  f"of the bf16 one ({half['matmul_bf16_gflops']:.1f}); {vocabulary_line(half)}{attention_line(half)}")
            bf16_only = ["adapter_dropout"] + (["fp32_layers", "cast_adapter_inputs", "dequantize_per_pass"]
                                               if build is classification_trainer
                                               else ["every_layer_checkpointed", "no_gradient_checkpointing"])
            undo_each(build, bf16_only, args.model, tokenizer, args.steps, half, torch.bfloat16, f"{name}, bf16")
        if build is classification_trainer:  # the other pass, in the dtype the cpu preset computes in here
            dtype = env.pick_dtype(cpu_bf16=True)
            table = result["recipes_bf16" if dtype == torch.bfloat16 else "recipes"][name]
            table["other_pass"] = other = measure_other_pass(args.model, tokenizer, args.steps, dtype, table)
            print(f"{name}, {str(dtype).removeprefix('torch.')} in passes of {other['micro_batch']}: "
                  f"{other['tokens_per_second_real']:.0f} real tokens/s ({other['times_the_recipes_speed']:.2f}x "
                  f"the recipe's), share {other['fraction_of_fp32_matmul']:.2f}; saved activations per pass of "
                  f"128 tokens each: {table['saved_activation_mib_at_max_length']} MiB")
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("saved", args.out)


if __name__ == "__main__":
    main()
