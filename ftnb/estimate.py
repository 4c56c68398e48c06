"""Predict the memory of fine-tuning (or running) a model from its config alone, before loading it.

Usage:
    from ftnb.estimate import estimate_training_memory, estimate_inference_memory, fits
    est = estimate_training_memory("smollm2-135m-instruct", quantization="nf4", batch_size=8,
                                   seq_len=512, gradient_checkpointing=True, device="cuda")
    print(est)                      # the breakdown, one row per component
    est.fits("T4 16 GB")            # -> Fit(fits=True, ...) with suggestions when it does not fit
    fits(est, "current")            # the device this kernel runs on

Only the model config is read (registry name, local folder or hub id; hub ids need internet for
the config file only), so it works for a 70B model on a laptop. What is modelled, per component:

* weights: 4-bit (NF4/FP4: half a byte per weight, one absmax per block of 64 weights in fp32, or
  in 8 bits plus a second-level fp32 scale per 256 blocks with double quantisation), 8-bit
  (one byte plus an fp32 scale per output row), and what stays in floating point (embeddings,
  heads, norms). `prepare_model_for_kbit_training` casts every fp16/bf16 parameter that is not
  4-bit to fp32 (peft 0.21), so embeddings and norms double in size under QLoRA on a GPU;
* LoRA adapters: r x (in + out) per targeted linear, kept in fp32 by peft, their gradients and the
  optimizer state (AdamW: two fp32 moments; 8-bit AdamW: two 1-byte moments; paged 8-bit AdamW
  lives in CUDA unified memory, outside the allocator; SGD: none);
* activations saved for backward, per layer and token, for Llama-style (gated MLP) and BERT-style
  blocks; eager attention also keeps batch x heads x seq x seq probabilities, SDPA does not,
  except on CPU with attention dropout (BERT), where torch falls back to its math path;
  gradient checkpointing keeps one hidden state per layer plus one recomputed layer;
* the loss: logits batch x seq x vocab, upcast to fp32, the log-softmax the cross-entropy saves
  and the two gradients of the same size in backward: 12-16 bytes per token per vocabulary entry,
  which is what dominates a small model with a 49k vocabulary;
* fixed costs: the CUDA context (not visible to torch's allocator) or, on CPU, the resident memory
  of a Python process with torch and transformers imported, and glibc's heap overhead. No page of
  the checkpoint file stays resident: `ftnb.models.load_model` copies a quantized model's float
  tensors out of the memory-mapped file, so the mapping closes after loading. Every fitted number
  sits in `Calibration`, with where it came from.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

MIB, GIB = 2**20, 2**30

# Usable memory as torch reports it (total_memory), not the marketing number.
GPUS: dict[str, float] = {
    "T4 16 GB": 14.7 * GIB,
    "L4 24 GB": 22.0 * GIB,
    "A100 40 GB": 39.4 * GIB,
    "A100 80 GB": 79.1 * GIB,
    "H100 80 GB": 79.1 * GIB,
    "H200 141 GB": 139.8 * GIB,
    # not measured here: the totals torch prints in its out-of-memory messages on these cards
    "RTX 4090 24 GB": 23.6 * GIB,
    "L40S 48 GB": 44.4 * GIB,
}
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "sgd")
# Bytes of optimizer state per trainable parameter (paged 8-bit AdamW: in CUDA unified memory, outside the allocator)
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw_8bit": 2, "paged_adamw_8bit": 0, "sgd": 0}
QUANTIZATIONS = ("none", "int8", "nf4", "fp4")
# the chunk the calculator suggests for the loss: its logits cost 256 x vocabulary x 12 bytes
LOSS_CHUNK_TOKENS = 256
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


@dataclass(frozen=True)
class Calibration:
    """Every number in this module that was fitted to a measurement rather than derived from shapes
    and dtypes. Everything else (weights, LoRA state, saved activations, the loss's tensors) is
    arithmetic on the config. The constants below were set while comparing with the "fitted" set
    of benchmarks/memory_estimates.json (15 CPU configurations of SmolLM2-135M) and the 8 H200 runs
    of benchmarks/gpu_qlora_h200.json; the "held_out" set in the same JSON played no part.
    One mechanism, rather than a number, was also added after measuring the fitted CPU set: on CPU
    the optimizer state is born inside the heap glibc kept from the first backward pass (see
    `estimate_training_memory`).
    """

    # CUDA context with the kernels of torch and bitsandbytes loaded: nvidia-smi sees it, torch's
    # allocator does not. A typical figure for CUDA 12 (300-500 MiB by GPU and driver), NOT measured
    # here: gpu_qlora_h200.json records only torch's allocator.
    cuda_context_bytes: int = 450 * MIB
    # Caching allocator: reserved over allocated peak. gpu_qlora_h200.json, 8 runs: 4% to 20%,
    # median 10% (the checkpointed runs 11-20%); `fits()` adds it to the allocated bytes.
    cuda_fragmentation: float = 0.10
    # RSS of Python with torch, transformers, peft and bitsandbytes imported, before any model:
    # measured 497 MiB on a 2-core CPU machine (171 MiB of it shared libraries).
    cpu_process_baseline_bytes: int = 500 * MIB
    # glibc serves tensors below its mmap threshold (which grows to 32 MiB after the first large
    # free) from heaps it does not return to the OS between steps, and freed holes are only partly
    # reused, so on CPU the peak RSS exceeds the live bytes by about this fraction of the
    # activations the forward pass creates (all layers, checkpointed or not). Measured once on
    # SmolLM2-135M (fp32 LoRA, batch 4 x 128, 2 threads) as the difference between the default
    # allocator and MALLOC_MMAP_THRESHOLD_=65536 (every tensor mmapped and returned at free; there
    # the live-bytes model matched the peak within 5%): 0.87 without checkpointing, 0.75 with it.
    cpu_heap_overhead: float = 0.8
    # Gradient flowing back through one block: this many hidden-sized fp32 buffers plus one
    # intermediate-sized one, alive next to the saved activations. A rough count, not derived from
    # autograd exactly; it was in the model while the numbers above were compared with the fitted sets.
    backward_hidden_buffers: int = 3


CALIBRATION = Calibration()

# glibc's largest dynamic mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): a larger allocation
# is always its own mapping, returned to the OS when freed
GLIBC_MMAP_THRESHOLD_MAX = 32 * MIB
BLOCK_4BIT, BLOCK_NESTED = 64, 256  # bitsandbytes: weights per absmax; absmax per 2nd-level scale
_ALIASES = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "c_attn": "q_proj"}


def _dtype_bytes(dtype: Any) -> int:
    name = str(dtype).replace("torch.", "")
    if name not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


# ---------------------------------------------------------------- model shape
@dataclass(frozen=True)
class ModelShape:
    """What memory depends on, read from a transformers config."""

    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool
    gated_mlp: bool  # Llama/Mistral/Qwen: gate, up, down; BERT/GPT-2: up, down
    attention_dropout: float = 0.0  # BERT: 0.1; Llama-style configs: 0.0

    @classmethod
    def from_config(cls, config: Any, name: str = "") -> "ModelShape":
        c = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        hidden = c.get("hidden_size") or c["n_embd"]
        heads = c.get("num_attention_heads") or c["n_head"]
        model_type = c.get("model_type", "")
        return cls(
            name=name or c.get("_name_or_path", model_type), vocab_size=c["vocab_size"],
            hidden_size=hidden, num_layers=c.get("num_hidden_layers") or c["n_layer"],
            num_heads=heads, num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or hidden // heads,
            intermediate_size=c.get("intermediate_size") or c.get("n_inner") or 4 * hidden,
            tie_word_embeddings=c.get("tie_word_embeddings", True),
            gated_mlp=model_type not in ("bert", "roberta", "distilbert", "gpt2", "xlm-roberta"),
            attention_dropout=c.get("attention_probs_dropout_prob", c.get("attention_dropout")) or 0.0)

    def linears(self) -> list[tuple[str, int, int]]:
        """(name, in_features, out_features) of the linear layers of one block."""
        h, q, kv, i = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.intermediate_size
        mlp = [("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)] if self.gated_mlp \
            else [("up_proj", h, i), ("down_proj", i, h)]
        return [("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h), *mlp]

    @property
    def linear_params(self) -> int:
        return self.num_layers * sum(i * o for _, i, o in self.linears())

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def norm_params(self) -> int:
        return (2 * self.num_layers + 1) * self.hidden_size

    def head_params(self, task: str, num_labels: int = 2) -> int:
        if task == "seq-cls":
            return num_labels * self.hidden_size
        return 0 if self.tie_word_embeddings else self.embedding_params

    def total_params(self, task: str = "causal-lm", num_labels: int = 2) -> int:
        return self.linear_params + self.embedding_params + self.norm_params + self.head_params(task, num_labels)


# Shapes of well-known models (their hub config.json), to estimate them offline.
REFERENCE_CONFIGS: dict[str, dict] = {
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         tie_word_embeddings=True, dtype="bfloat16"),
    "llama-2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, head_dim=128,
                       tie_word_embeddings=False, dtype="float16"),
    "llama-3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         tie_word_embeddings=False, dtype="bfloat16"),
    # Llama-3-70B has the same shape as 3.1 (they differ in RoPE scaling and context length only)
    "llama-3.1-70b": dict(model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                          num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                          tie_word_embeddings=False, dtype="bfloat16"),
    "llama-2-70b": dict(model_type="llama", vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                        tie_word_embeddings=False, dtype="float16"),
}


def model_shape(config_or_name: Any) -> ModelShape:
    """A ModelShape from a ModelShape, a transformers config or dict, a REFERENCE_CONFIGS name, a
    registry name, a local folder or a hub id (only config.json is read).
    Usage: model_shape("smollm2-135m-instruct"); model_shape("llama-3.1-8b")"""
    if isinstance(config_or_name, ModelShape):
        return config_or_name
    if isinstance(config_or_name, str) and config_or_name in REFERENCE_CONFIGS:
        return ModelShape.from_config(REFERENCE_CONFIGS[config_or_name], config_or_name)
    if isinstance(config_or_name, (str, bytes)) or hasattr(config_or_name, "__fspath__"):
        from transformers import AutoConfig

        from ftnb.models import resolve

        name = str(config_or_name)
        return ModelShape.from_config(AutoConfig.from_pretrained(resolve(name)), name)
    return ModelShape.from_config(config_or_name)


# ---------------------------------------------------------------- arithmetic on one layer
def nf4_bytes(n_weights: int, double_quant: bool = True) -> tuple[int, int]:
    """(packed bytes, quantisation-constant bytes) of one 4-bit (NF4 or FP4) weight matrix.

    Packed: two weights per byte. Constants: one absmax per block of 64 weights, fp32 (4 bytes),
    or with double quantisation uint8 plus one fp32 scale per 256 blocks, an fp32 offset and the
    256-entry fp32 code of the second level; the 16-entry fp32 NF4/FP4 code table either way.
    """
    blocks = math.ceil(n_weights / BLOCK_4BIT)
    constants = 16 * 4
    if double_quant:
        constants += blocks + math.ceil(blocks / BLOCK_NESTED) * 4 + 4 + 256 * 4
    else:
        constants += blocks * 4
    return math.ceil(n_weights / 2), constants


def lora_params(shape: ModelShape, r: int, targets: str | list[str] = "all-linear") -> int:
    """Trainable LoRA parameters: r x (in + out) for each targeted linear of each layer.
    Usage: lora_params(model_shape("smollm2-135m-instruct"), 8)  # 2,442,240"""
    return shape.num_layers * sum(r * (i + o) for _, i, o in _targeted(shape, targets))


def _targeted(shape: ModelShape, targets: str | list[str]) -> list[tuple[str, int, int]]:
    if targets == "all-linear":
        return shape.linears()
    names = {_ALIASES.get(t, t) for t in ([targets] if isinstance(targets, str) else targets)}
    known = {n for n, _, _ in shape.linears()}
    if not names <= known:
        raise ValueError(f"unknown LoRA targets {sorted(names - known)}; this model has {sorted(known)} "
                         f"(or use 'all-linear')")
    return [lin for lin in shape.linears() if lin[0] in names]


def logits_bytes(batch_size: int, seq_len: int, vocab_size: int) -> int:
    """Peak of the causal-LM loss when the caller keeps only the loss (as the Trainer does): the
    log-softmax the cross-entropy saves, then in backward its gradient and the logits' gradient,
    all fp32: 12 bytes per token x vocabulary entry. (In half precision the logits and the cast
    of their gradient are smaller and never coexist with all three; an H200 run confirmed 12.)
    Usage: logits_bytes(4, 128, 49152)  # 4 x 128 x 49152 x 12 bytes = 288 MiB"""
    return batch_size * seq_len * vocab_size * 12


def layer_activation_bytes(shape: ModelShape, tokens: int, batch_size: int, seq_len: int, *,
                           compute_bytes: int, fp32_norm_weights: bool, targets: list[str],
                           lora_r: int, lora_dropout: float, attn_implementation: str,
                           padded: bool, quantization: str) -> int:
    """Bytes one decoder block saves for backward when its base weights are frozen.

    Frozen base linears save nothing for their own weight gradient; what is saved is the input
    of each LoRA adapter (shared by adapters reading the same tensor, unless peft has to make its
    own copy: an fp32 cast of a half-precision input, or a dropout output with its 1-byte mask),
    the RMSNorm inputs (upcast to fp32), q/k/v after RoPE, the attention output, and the MLP's
    gate, activation, up and product tensors.
    """
    h, i = shape.hidden_size, shape.intermediate_size
    q = shape.num_heads * shape.head_dim
    kv = q if (padded or attn_implementation == "eager") else shape.num_kv_heads * shape.head_dim
    cd = compute_bytes
    x_bytes = 4 if fp32_norm_weights else cd  # norm output dtype follows the norm weight
    saved = 2 * h * 4  # two RMSNorm inputs, in fp32
    saved += (q + 2 * kv) * cd + q * cd  # q, k, v after RoPE; attention output (kept by SDPA)
    saved += (4 if shape.gated_mlp else 2) * i * cd  # gate, act(gate), up, act*up
    inputs = {"q_proj": (h, x_bytes), "k_proj": (h, x_bytes), "v_proj": (h, x_bytes),
              "o_proj": (q, cd), "gate_proj": (h, x_bytes), "up_proj": (h, x_bytes), "down_proj": (i, cd)}
    shared = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
              "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_mid"}
    kept_shared: dict[str, int] = {}
    for name in targets:
        width, nbytes = inputs[name]
        saved += lora_r * 4  # A's output, saved by B
        if lora_dropout > 0:
            saved += width * (cd + 1)  # dropout output (in the compute dtype) + bool mask, per adapter
        elif nbytes != cd:
            saved += width * cd  # autocast makes each adapter its own copy of an fp32 input
        else:
            kept_shared[shared[name]] = width * nbytes
    if quantization == "int8":  # bnb's int8 matmul saves its input (CPU) or an int8 copy (CUDA)
        for name, width, _ in shape.linears():
            kept_shared.setdefault(shared[name], width * inputs[name][1])
    saved += sum(v for k, v in kept_shared.items() if k in ("attn_in", "mlp_in", "mlp_mid"))
    # the attention output is already counted; "attn_out" adds nothing
    return saved * tokens


def attention_probability_bytes(shape: ModelShape, batch_size: int, seq_len: int, *, compute_bytes: int,
                                attn_implementation: str, device: str) -> tuple[int, int]:
    """(bytes one layer keeps, size of the largest such tensor) of batch x heads x seq x seq
    attention probabilities saved for backward; (0, 0) when the kernel never materialises them.

    Eager attention keeps the fp32 softmax plus its copy in the compute dtype. SDPA's fused kernels
    keep none, except on CPU with attention dropout (BERT-style configs): torch has no fused CPU
    kernel with dropout, and its math path keeps the softmax output, the dropout mask (in the
    compute dtype) and the dropped probabilities.
    Usage: attention_probability_bytes(model_shape("minilm-l6"), 16, 128, compute_bytes=4,
                                       attn_implementation="sdpa", device="cpu")"""
    elements = batch_size * shape.num_heads * seq_len * seq_len
    if attn_implementation == "eager":
        return elements * (4 + (compute_bytes if compute_bytes < 4 else 0)), elements * 4
    if device == "cpu" and shape.attention_dropout > 0:
        return elements * 3 * compute_bytes, elements * compute_bytes
    return 0, 0


# ---------------------------------------------------------------- the estimate
@dataclass
class Fit:
    """The answer of `fits`: does it fit, with how much room, and what to change if not."""

    device: str
    fits: bool
    needed_bytes: int
    available_bytes: float
    suggestions: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        verdict = "fits" if self.fits else "does NOT fit"
        text = (f"{self.device}: {verdict} ({self.needed_bytes / GIB:.2f} GiB needed of "
                f"{self.available_bytes / GIB:.1f} GiB)")
        return text + "".join(f"\n  - {s}" for s in self.suggestions)

    __repr__ = __str__


@dataclass
class MemoryEstimate:
    """A predicted peak, as rows (component, bytes, note). `total_bytes` is the peak the process
    needs; `allocated_bytes` leaves out the fixed overheads torch's allocator does not see."""

    rows: list[dict]
    settings: dict  # every setting as resolved (defaults filled in), for display
    kind: str  # "training" or "inference"
    # the arguments of the call as the caller gave them (only `device` resolved), so that a
    # suggestion re-estimates with one change and re-derives every default that depends on it
    arguments: dict = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return int(sum(r["bytes"] for r in self.rows))

    @property
    def allocated_bytes(self) -> int:
        return int(sum(r["bytes"] for r in self.rows if r["group"] != "fixed"))

    def bytes_by_group(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r["group"]] = out.get(r["group"], 0) + r["bytes"]
        return out

    def to_frame(self):
        import pandas as pd

        frame = pd.DataFrame(self.rows)
        frame.insert(2, "MiB", (frame.pop("bytes") / MIB).round(1))
        return frame

    def _summary(self) -> str:
        s = self.settings
        return (f"{self.kind} {s['model']} ({s['quantization']}, batch {s['batch_size']} x seq "
                f"{s['seq_len']}, {s['device']}): peak {self.total_bytes / GIB:.2f} GiB")

    def __str__(self) -> str:
        return self.to_frame().to_string(index=False) + "\n" + self._summary()

    __repr__ = __str__

    def _repr_html_(self) -> str:
        return self.to_frame().to_html(index=False) + f"<p><b>{self._summary()}</b></p>"

    def fits(self, device: str | float = "current") -> Fit:
        """Whether this fits `device`: a name from GPUS, "current", or a number of bytes.
        When it does not, lists the usual changes, each re-estimated on its own."""
        name, available = _device_memory(device)
        fit = Fit(name, self.total_bytes <= available, self.total_bytes, available)
        if not fit.fits:
            fit.suggestions = self.suggestions(available)
        return fit

    def suggestions(self, available: float) -> list[str]:
        """The usual first moves, in order, each a fresh estimate of the original arguments with
        that one change; then, if none fits alone, all of them together.
        Usage: estimate_training_memory("llama-3.1-8b", "none", device="cuda").suggestions(GPUS["T4 16 GB"])"""
        if self.kind != "training":
            return ["use a 4-bit model (quantization='nf4')", "shorten the sequence or the batch"]
        out, combined = [], {}
        for text, change in self._single_moves(available):
            needed = estimate_training_memory(**{**self.arguments, **change}).total_bytes
            out.append(f"{text} -> {needed / GIB:.2f} GiB" + (" (fits)" if needed <= available else ""))
            combined.update(change)
            if needed <= available:
                return out
        if combined:
            together = estimate_training_memory(**{**self.arguments, **combined}).total_bytes
            out.append(f"all of the above together -> {together / GIB:.2f} GiB"
                       + (" (fits)" if together <= available else ""))
            if together <= available:
                return out
        out.append("still too large: pick a smaller model or a larger GPU")
        return out

    def _single_moves(self, available: float) -> list[tuple[str, dict]]:
        """(description, change of arguments) of each move that applies to these settings."""
        s, moves = self.settings, []
        if not s["gradient_checkpointing"]:
            moves.append(("turn on gradient checkpointing", {"gradient_checkpointing": True}))
        if s["batch_size"] > 1:
            moves.append(self._micro_batch_move(available))
        if s["task"] == "causal-lm" and s["batch_size"] * s["seq_len"] > LOSS_CHUNK_TOKENS > (s["loss_chunk_tokens"] or 0):
            moves.append((f"compute the loss in chunks of {LOSS_CHUNK_TOKENS} tokens (ftnb.memory.chunked_causal_lm_loss)",
                          {"loss_chunk_tokens": LOSS_CHUNK_TOKENS}))
        eight_bit = "paged_adamw_8bit" if s["device"] == "cuda" else "adamw_8bit"
        if s["optimizer"] == "adamw":
            moves.append((f"use an 8-bit optimizer ({eight_bit})", {"optimizer": eight_bit}))
        if s["seq_len"] > 1:
            shorter = s["seq_len"] // 2
            moves.append((f"halve the sequence length to {shorter} (truncate or pack shorter examples)",
                          {"seq_len": shorter}))
        if s["quantization"] in ("none", "int8"):
            moves.append(("load the base model in 4-bit NF4", {"quantization": "nf4"}))
        return moves

    def _micro_batch_move(self, available: float) -> tuple[str, dict]:
        """Halve the micro-batch (doubling accumulation) until it fits, or down to 1."""
        batch, accumulation = self.settings["batch_size"], self.settings["grad_accumulation"]
        while batch > 1:
            batch, accumulation = batch // 2, accumulation * 2
            change = {"batch_size": batch, "grad_accumulation": accumulation}
            if estimate_training_memory(**{**self.arguments, **change}).total_bytes <= available:
                break
        return (f"lower the micro-batch to {batch} and raise gradient accumulation to {accumulation} "
                f"(the same effective batch)", change)


def _device_memory(device: str | float) -> tuple[str, float]:
    if isinstance(device, (int, float)):
        return f"{device / GIB:.1f} GiB device", float(device)
    if device == "current":
        import psutil
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(), float(torch.cuda.get_device_properties(0).total_memory)
        return "this machine's RAM (available)", float(psutil.virtual_memory().available)
    if device not in GPUS:
        raise ValueError(f"unknown device {device!r}; use one of {list(GPUS)}, 'current' or a number of bytes")
    return device, GPUS[device]


def fits(estimate: MemoryEstimate, device: str | float = "current") -> Fit:
    """Usage: fits(estimate_training_memory(...), "T4 16 GB")"""
    return estimate.fits(device)


def _default_device() -> str:
    from ftnb.env import device_type

    return "cuda" if device_type() == "cuda" else "cpu"


def _weight_rows(shape: ModelShape, quantization: str, double_quant: bool, load_bytes: int,
                 float_bytes: int, task: str, num_labels: int, load_dtype: str) -> list[dict]:
    """Weights by storage, in this order (ftnb.estimate_distributed relies on it): the linears (for
    4 bits the packed weights, then their constants), then what stays floating point."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, not {quantization!r}")
    rows = []
    n_linear = shape.linear_params
    if quantization in ("nf4", "fp4"):
        packed = constants = 0
        for _, i, o in shape.linears():
            p, c = nf4_bytes(i * o, double_quant)
            packed, constants = packed + p * shape.num_layers, constants + c * shape.num_layers
        rows += [_row("weights", f"{quantization} linear weights (packed, 0.5 byte each)", packed),
                 _row("weights", "4-bit quantization constants" + (" (double-quantised)" if double_quant else ""), constants)]
    elif quantization == "int8":
        scales = shape.num_layers * sum(o * 4 for _, _, o in shape.linears())
        rows += [_row("weights", "int8 linear weights", n_linear), _row("weights", "int8 row scales (fp32)", scales)]
    else:
        rows.append(_row("weights", f"linear weights ({load_dtype})", n_linear * load_bytes))
    n_float = shape.embedding_params + shape.norm_params + shape.head_params(task, num_labels)
    rows.append(_row("weights", f"embeddings, norms, head ({'fp32' if float_bytes == 4 else load_dtype})",
                     n_float * float_bytes))
    return rows


def _row(group: str, component: str, nbytes: float) -> dict:
    return {"group": group, "component": component, "bytes": int(nbytes)}


def _fixed_rows(device: str, process_baseline_bytes: int | None) -> list[dict]:
    if device == "cuda":
        return [_row("fixed", "CUDA context and kernels (outside torch's allocator)", CALIBRATION.cuda_context_bytes)]
    baseline = CALIBRATION.cpu_process_baseline_bytes if process_baseline_bytes is None else process_baseline_bytes
    return [_row("fixed", "Python process with torch/transformers imported (RSS)", baseline)]


def _overhead_row(device: str, rows: list[dict], created_bytes: int) -> dict:
    """Allocator overhead: CUDA caching-allocator fragmentation, or glibc heap kept on CPU."""
    if device == "cuda":
        allocated = sum(r["bytes"] for r in rows if r["group"] != "fixed")
        fragmentation = CALIBRATION.cuda_fragmentation
        return _row("fixed", f"caching allocator fragmentation ({fragmentation:.0%})", allocated * fragmentation)
    heap = CALIBRATION.cpu_heap_overhead
    return _row("fixed", f"glibc heap kept ({heap:.0%} of the activations the forward pass creates)",
                created_bytes * heap)


def estimate_training_memory(
    config_or_name: Any, quantization: str = "nf4", double_quant: bool = True, lora_r: int = 8,
    lora_targets: str | list[str] = "all-linear", batch_size: int = 4, seq_len: int = 256,
    gradient_checkpointing: bool = True, optimizer: str = "adamw", compute_dtype: Any = None,
    attn_implementation: str = "sdpa", task: str = "causal-lm", *, lora_dropout: float = 0.05,
    num_labels: int = 2, padded: bool = True, kbit_prepare: bool | None = None,
    grad_accumulation: int = 1, loss_chunk_tokens: int | None = None, device: str | None = None,
    process_baseline_bytes: int | None = None,
) -> MemoryEstimate:
    """Predicted peak memory of one LoRA/QLoRA training step, with its breakdown. On CUDA the
    step is assumed to run under autocast in `compute_dtype`, as the Trainer does with bf16/fp16.

    Usage: estimate_training_memory("smollm2-135m-instruct", "nf4", batch_size=8, seq_len=512)
    `compute_dtype`: dtype of the frozen weights/activations (default: fp32 on CPU, bf16 on CUDA).
    `padded`: batches carry an attention mask (SDPA then expands grouped k/v heads).
    `kbit_prepare`: peft's prepare_model_for_kbit_training was called (default: when quantized).
    `grad_accumulation` > 1 keeps the LoRA gradients alive through the next forward pass.
    `loss_chunk_tokens`: the loss runs that many tokens at a time (`ftnb.memory.chunked_causal_lm_loss`).
    `device`: "cpu" or "cuda" (default: this machine); decides the fixed overheads.
    """
    arguments = dict(locals())  # the call as given, before anything below resolves a default
    shape = model_shape(config_or_name)
    device = arguments["device"] = device or _default_device()
    arguments["config_or_name"] = shape  # read the config once
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, not {optimizer!r}")
    if attn_implementation not in ("sdpa", "eager", "flash_attention_2"):
        raise ValueError(f"attn_implementation must be 'sdpa', 'eager' or 'flash_attention_2', not {attn_implementation!r}")
    if task not in ("causal-lm", "seq-cls"):
        raise ValueError(f"task must be 'causal-lm' or 'seq-cls', not {task!r}")
    compute_dtype = compute_dtype or ("float32" if device == "cpu" else "bfloat16")
    cd = _dtype_bytes(compute_dtype)
    kbit_prepare = quantization != "none" if kbit_prepare is None else kbit_prepare
    float_bytes = 4 if kbit_prepare else cd
    settings = dict(model=shape.name, quantization=quantization, double_quant=double_quant,
                    lora_r=lora_r, lora_targets=lora_targets, batch_size=batch_size, seq_len=seq_len,
                    gradient_checkpointing=gradient_checkpointing, optimizer=optimizer,
                    compute_dtype=str(compute_dtype).replace("torch.", ""), attn_implementation=attn_implementation,
                    task=task, lora_dropout=lora_dropout, num_labels=num_labels, padded=padded,
                    kbit_prepare=kbit_prepare, grad_accumulation=grad_accumulation,
                    loss_chunk_tokens=loss_chunk_tokens, device=device,
                    process_baseline_bytes=process_baseline_bytes)

    rows = _fixed_rows(device, process_baseline_bytes)
    rows += _weight_rows(shape, quantization, double_quant, cd, float_bytes, task, num_labels, settings["compute_dtype"])
    n_lora = lora_params(shape, lora_r, lora_targets) + (shape.head_params(task, num_labels) if task == "seq-cls" else 0)
    state_bytes = OPTIMIZER_STATE_BYTES[optimizer]
    # gradients appear during backward, as activations are freed, so they are not part of the
    # peak at the start of backward, unless accumulation keeps them across passes
    grad_bytes = n_lora * 4 if grad_accumulation > 1 else 0
    rows += [_row("trainable", f"LoRA parameters r={lora_r} ({n_lora:,}, fp32)", n_lora * 4),
             _row("trainable", "their gradients (fp32; at the peak only with accumulation)", grad_bytes),
             _row("trainable", f"optimizer state ({optimizer})", n_lora * state_bytes)]

    tokens = batch_size * seq_len
    targets = [n for n, _, _ in _targeted(shape, lora_targets)]
    one_layer = layer_activation_bytes(
        shape, tokens, batch_size, seq_len, compute_bytes=cd, fp32_norm_weights=float_bytes == 4,
        targets=targets, lora_r=lora_r, lora_dropout=lora_dropout, attn_implementation=attn_implementation,
        padded=padded, quantization=quantization)
    probabilities, largest = attention_probability_bytes(shape, batch_size, seq_len, compute_bytes=cd,
                                                         attn_implementation=attn_implementation, device=device)
    one_layer += probabilities
    # the residual stream is fp32 when the embeddings were upcast (kbit preparation)
    hidden_state = tokens * shape.hidden_size * (4 if float_bytes == 4 else cd)
    if gradient_checkpointing:
        saved = shape.num_layers * hidden_state
        rows.append(_row("activations", "checkpointed hidden states (one per layer)", saved))
        rows.append(_row("activations", "one layer recomputed in backward", one_layer))
    else:
        rows.append(_row("activations", f"saved for backward ({shape.num_layers} layers)", shape.num_layers * one_layer))
    # gradient flowing back through a block: a few hidden-sized and one intermediate-sized buffer
    buffer_width = CALIBRATION.backward_hidden_buffers * shape.hidden_size + shape.intermediate_size
    rows.append(_row("activations", "backward gradient buffers", tokens * buffer_width * 4))
    if task == "causal-lm":
        loss_tokens = min(loss_chunk_tokens or tokens, tokens)
        chunked = f", in chunks of {loss_tokens:,}" if loss_tokens < tokens else ""
        rows.append(_row("loss", f"logits + log-softmax + grads ({loss_tokens:,} tokens x {shape.vocab_size:,} vocab"
                         f"{chunked})", logits_bytes(1, loss_tokens, shape.vocab_size)))
    if task == "causal-lm" and float_bytes == 4 and cd < 4:
        # autocast casts the fp32 output head to half precision for its matmul, and autograd keeps
        # that copy for the backward pass (the head is frozen, but its input needs a gradient)
        rows.append(_row("activations", "half-precision copy of the fp32 output head (autocast)",
                         shape.embedding_params * cd))
    if quantization != "none":
        biggest = max(i * o for _, i, o in shape.linears())
        rows.append(_row("activations", "dequantised weight of the largest layer (transient)", biggest * cd))
    # tensors above glibc's mmap threshold are mapped and unmapped on their own, never kept in a heap
    heaped = one_layer - (probabilities if largest >= GLIBC_MMAP_THRESHOLD_MAX else 0)
    heap = _overhead_row(device, rows, shape.num_layers * heaped)
    rows.append(heap)
    if device == "cpu":
        # The optimizer state (and accumulated gradients) are first allocated after the first
        # backward pass, inside the heap glibc kept from the freed activations: only what exceeds
        # that heap raises the resident peak. Measured: r=64 instead of r=8 adds 150 MiB of AdamW
        # state and 65 MiB of LoRA weights, and the peak rose by 83-104 MiB; SGD, AdamW and 8-bit
        # AdamW peaked within 80 MiB of each other (benchmarks/README.md).
        reused = min(grad_bytes + n_lora * state_bytes, heap["bytes"])
        rows.append(_row("fixed", "minus: gradients and optimizer state created inside that heap", -reused))
    return MemoryEstimate(rows, settings, "training", arguments)


def estimate_inference_memory(
    config_or_name: Any, quantization: str = "none", double_quant: bool = True, batch_size: int = 1,
    seq_len: int = 512, compute_dtype: Any = None, task: str = "causal-lm", *, num_labels: int = 2,
    scored_positions: int = 1, device: str | None = None, process_baseline_bytes: int | None = None,
) -> MemoryEstimate:
    """Predicted peak of generation/scoring: weights, the KV cache (2 x layers x kv heads x head dim
    per token), one layer's working activations and the full-vocabulary logits of `scored_positions`
    positions per row: 1 for generation and next-token scoring; seq_len for perplexity through
    `model(input_ids, labels=ids)`, whose loss also holds them as fp32 log-probabilities (and an fp32
    copy of half-precision logits). On a 49k vocabulary, 16 x 384 scored positions take 2.8 GiB in fp16.

    Usage: estimate_inference_memory("smollm2-135m-instruct", "nf4", batch_size=8, seq_len=1024)
           estimate_inference_memory("smollm2-135m-instruct", "nf4", batch_size=16, seq_len=384, scored_positions=384)
    """
    if not 1 <= scored_positions <= seq_len:
        raise ValueError(f"scored_positions={scored_positions}: give the positions per row whose logits are kept, "
                         f"from 1 (generation) to seq_len={seq_len} (perplexity over every token)")
    shape = model_shape(config_or_name)
    device = device or _default_device()
    compute_dtype = compute_dtype or ("float32" if device == "cpu" else "bfloat16")
    cd = _dtype_bytes(compute_dtype)
    settings = dict(model=shape.name, quantization=quantization, batch_size=batch_size, seq_len=seq_len,
                    device=device, compute_dtype=str(compute_dtype).replace("torch.", ""))
    rows = _fixed_rows(device, process_baseline_bytes)
    rows += _weight_rows(shape, quantization, double_quant, cd, cd, task, num_labels, settings["compute_dtype"])
    tokens = batch_size * seq_len
    kv = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * cd * tokens
    work = tokens * (2 * shape.hidden_size + 2 * shape.intermediate_size) * cd
    rows += [_row("activations", "KV cache", kv), _row("activations", "one layer's working tensors (prefill)", work)]
    if task == "causal-lm":
        rows += _scored_logits_rows(batch_size, scored_positions, shape.vocab_size, cd)
    rows.append(_overhead_row(device, rows, work))
    return MemoryEstimate(rows, settings, "inference")


def _scored_logits_rows(batch_size: int, scored_positions: int, vocab_size: int, compute_bytes: int) -> list[dict]:
    """The logits inference keeps: the last position's in fp32 when generating; for more positions the
    logits in the compute dtype plus the loss's fp32 log-probabilities (and fp32 copy of half logits)."""
    if scored_positions == 1:
        return [_row("loss", "logits of the last position (fp32)", batch_size * vocab_size * 4)]
    positions = batch_size * scored_positions
    return [_row("loss", f"logits of {positions:,} scored positions", positions * vocab_size * compute_bytes),
            _row("loss", "the loss's fp32 log-probabilities (+ fp32 copy of half-precision logits)",
                 positions * vocab_size * (4 if compute_bytes == 4 else 8))]


# ---------------------------------------------------------------- measuring, to check the estimate
def measure_training_peak(model: str = "smollm2-135m-instruct", *, quantization: str = "nf4",
                          double_quant: bool = True, lora_r: int = 8, batch_size: int = 4, seq_len: int = 128,
                          gradient_checkpointing: bool = True, optimizer: str = "adamw",
                          compute_dtype: str | None = None, lora_dropout: float = 0.05, steps: int = 2,
                          task: str = "causal-lm", num_labels: int = 2, grad_accumulation: int = 1,
                          loss_chunk_tokens: int | None = None, fresh_process: bool = True) -> dict:
    """Run `steps` real LoRA/QLoRA training steps and return measured peak memory and step time
    next to `estimate_training_memory`'s prediction for the same settings.

    Usage: measure_training_peak(quantization="nf4", batch_size=2, seq_len=64)
    `task="seq-cls"` trains a classifier (random labels among `num_labels`) instead of a causal LM.
    Each of the `steps` optimizer steps runs `grad_accumulation` forward/backward passes (really run,
    gradients accumulated), and `step_seconds` times whole optimizer steps. `loss_chunk_tokens`
    computes the causal-LM loss with `ftnb.memory.chunked_causal_lm_loss` in chunks of that many tokens.
    With `fresh_process` (default) the steps run in a new Python process: on CPU the resident-set
    high-water mark cannot be lowered below what glibc kept from earlier work, so measuring a
    second configuration in the same process would report the larger of the two. Measured: on
    CPU the process's peak RSS (compared with the estimate's total), on CUDA the allocator's peak
    (compared with the estimate's allocated bytes; the CUDA context is not in it).
    """
    if loss_chunk_tokens and task != "causal-lm":
        raise ValueError("loss_chunk_tokens applies to the causal-LM loss; a classifier (task='seq-cls') has no "
                         "vocabulary-sized logits to chunk: leave it None")
    settings = dict(model=model, quantization=quantization, double_quant=double_quant, lora_r=lora_r,
                    batch_size=batch_size, seq_len=seq_len, gradient_checkpointing=gradient_checkpointing,
                    optimizer=optimizer, compute_dtype=compute_dtype, lora_dropout=lora_dropout, steps=steps,
                    task=task, num_labels=num_labels, grad_accumulation=grad_accumulation,
                    loss_chunk_tokens=loss_chunk_tokens)
    if fresh_process:
        import json
        import os
        import subprocess
        import sys

        code = "import json, sys; from ftnb.estimate import _measure_here; print(json.dumps(_measure_here(**json.loads(sys.argv[1]))))"
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(settings)], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"measuring {settings} failed:\n{proc.stderr[-3000:]}")
        measured = json.loads(proc.stdout.strip().splitlines()[-1])
    else:
        measured = _measure_here(**settings)
    est = estimate_training_memory(
        model, quantization, double_quant, lora_r, "all-linear", batch_size, seq_len, gradient_checkpointing,
        optimizer, measured["compute_dtype"], "sdpa", task, lora_dropout=lora_dropout, num_labels=num_labels,
        padded=False, grad_accumulation=grad_accumulation, loss_chunk_tokens=loss_chunk_tokens,
        device=measured["device"])
    predicted = est.total_bytes if measured["device"] == "cpu" else est.allocated_bytes
    return {**settings, **measured, "predicted_peak_mib": predicted / MIB,
            "predicted_by_group_mib": {k: round(v / MIB, 1) for k, v in est.bytes_by_group().items()},
            "relative_error": (predicted / MIB - measured["measured_peak_mib"]) / measured["measured_peak_mib"]}


def _measure_here(model: str, quantization: str, double_quant: bool, lora_r: int, batch_size: int, seq_len: int,
                  gradient_checkpointing: bool, optimizer: str, compute_dtype: str | None, lora_dropout: float,
                  steps: int, task: str = "causal-lm", num_labels: int = 2, grad_accumulation: int = 1,
                  loss_chunk_tokens: int | None = None) -> dict:
    """The measurement itself, in this process: load, prepare, LoRA, `steps` optimizer steps of
    `grad_accumulation` passes each on random tokens (no padding) inside a probe. The first step is
    included: it creates the optimizer state."""
    import time

    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from ftnb.env import pick_dtype, use_all_cores
    from ftnb.memory import chunked_causal_lm_loss, probe
    from ftnb.models import load_model

    use_all_cores()
    torch.manual_seed(0)
    dtype = getattr(torch, compute_dtype) if compute_dtype else pick_dtype()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    classifier = dict(num_labels=num_labels, pad_token_id=0) if task == "seq-cls" else {}  # id 0 never drawn below
    net = load_model(model, task, quantization=quantization, double_quant=double_quant, dtype=dtype, **classifier)
    checkpointing = {"use_reentrant": False}  # what the Trainer ends up with (transformers' default)
    if quantization != "none":
        net = prepare_model_for_kbit_training(net, use_gradient_checkpointing=gradient_checkpointing,
                                              gradient_checkpointing_kwargs=checkpointing)
    elif gradient_checkpointing:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    net.config.use_cache = False
    net = get_peft_model(net, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=lora_dropout,
                                         target_modules="all-linear",
                                         task_type="SEQ_CLS" if task == "seq-cls" else "CAUSAL_LM"))
    params = [p for p in net.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=1e-3)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-4)
    else:
        import bitsandbytes as bnb

        opt = (bnb.optim.PagedAdamW8bit if optimizer.startswith("paged") else bnb.optim.AdamW8bit)(params, lr=1e-4)
    batch = torch.randint(1, net.config.vocab_size, (batch_size, seq_len), device=net.device)
    labels = torch.randint(0, num_labels, (batch_size,), device=net.device) if task == "seq-cls" else batch
    net.train()
    times = []
    with probe("training steps") as rec:
        for _ in range(steps):
            start = time.perf_counter()
            for _ in range(grad_accumulation):  # the gradients add up in .grad until the optimizer step
                with torch.autocast(device, dtype=dtype, enabled=device == "cuda" and dtype != torch.float32):
                    if loss_chunk_tokens:
                        loss = chunked_causal_lm_loss(net, batch, labels, chunk_tokens=loss_chunk_tokens)
                    else:
                        loss = net(input_ids=batch, labels=labels).loss  # logits dropped at once, as in the Trainer
                (loss / grad_accumulation).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del loss
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    peak = rec.rss_peak_mib if device == "cpu" else rec.accel_peak_allocated_mib
    return {"device": device, "compute_dtype": str(dtype).replace("torch.", ""), "measured_peak_mib": peak,
            "step_seconds": times, "rss_peak_mib": rec.rss_peak_mib}
