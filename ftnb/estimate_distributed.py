"""Per-GPU memory of LoRA/QLoRA training spread over several GPUs (DDP, FSDP2, DeepSpeed ZeRO-2/3,
CPU offload), the host RAM that offloading needs, and which set-up to choose for N GPUs of a size.

Usage:
    from ftnb.estimate_distributed import estimate_distributed, recommend, recommendation_table
    est = estimate_distributed("llama-3.1-70b", "fsdp2_offload", num_gpus=2, quantization="nf4",
                               micro_batch=2, seq_len=2048)
    print(est)                                   # GPU rows, host rows, both totals
    est.fits("L4 24 GB")                         # per-GPU bytes within that card?
    recommend("llama-3.1-70b", 2, "L4 24 GB")    # the cheapest set-up that fits, or None
    recommendation_table("llama-3.1-8b", [1, 2, 4, 8], ["T4 16 GB", "L4 24 GB"])

One GPU of a data-parallel run holds what `ftnb.estimate.estimate_training_memory` predicts for
one GPU with the same micro-batch (its own activations, its own loss), except for the parts a
strategy shards across the N GPUs or moves to host RAM:

| strategy        | weights (frozen base + LoRA) | LoRA gradients | optimizer state | on host RAM        |
|-----------------|------------------------------|----------------|-----------------|--------------------|
| `ddp`           | whole copy                   | whole (bucket) | whole           | -                  |
| `zero2`         | whole copy                   | 1/N + a bucket | 1/N             | -                  |
| `fsdp2`/`zero3` | 1/N, gathered layer by layer | 1/N            | 1/N             | -                  |
| `*_offload`     | gathered layer by layer      | -              | -               | weights, grads, optimizer |

With LoRA the trainable part is tiny (16 bytes per adapter weight with AdamW, but r=16 adapters
are 0.3% of a 70B model's weights), so sharding gradients and optimizer state (ZeRO-2) saves little: the
frozen base dominates, and only strategies that shard or offload the *weights* (FSDP2, ZeRO-3,
offload) let a model larger than one card train. QLoRA + FSDP/ZeRO-3 needs the packed 4-bit
weights stored in a float dtype (`bnb_4bit_quant_storage` = the compute dtype): FSDP shards
float tensors only, and with uint8 storage it crashes or trains with a zero loss
(`ftnb.distributed.check_quantization` refuses that set-up before loading).

What sharding adds: the gathered working set. FSDP2 all-gathers one decoder layer at a time
(plus the next, prefetched), and keeps the root module (embeddings, final norm, head) gathered
for the whole step; ZeRO-3 gathers each parameter on use, the largest being a layer pair or the
embedding. Assumed, not measured: bitsandbytes' quantization constants (absmax) are not
parameters, so every GPU keeps all of them; with CPU offload they stay on the GPU.

Everything here is arithmetic on the config: no GPU has checked these per-GPU figures; they are
compared with two published measurements in `ANCHORS` (tests/test_estimate_distributed.py pins
how close). Host RAM counts steady-state training only: loading the checkpoint (which can need
far more) is not modelled.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ftnb.estimate import (CALIBRATION, GIB, OPTIMIZER_STATE_BYTES, _device_memory, _dtype_bytes, _row,
                           _weight_rows, estimate_training_memory, lora_params, model_shape)


@dataclass(frozen=True)
class Strategy:
    """How one set-up splits the training state over GPUs and host RAM."""

    name: str
    engine: str  # what runs it under `accelerate launch`
    shards: frozenset  # of "weights", "gradients", "optimizer": divided by the number of GPUs
    offloads: frozenset  # kept in host RAM instead of on the GPU
    config: str  # the accelerate config in configs/accelerate/

    def __str__(self) -> str:
        return self.engine


_ALL = frozenset({"weights", "gradients", "optimizer"})
STRATEGIES: dict[str, Strategy] = {
    "ddp": Strategy("ddp", "DDP", frozenset(), frozenset(), "ddp.yaml"),
    "zero2": Strategy("zero2", "ZeRO-2", frozenset({"gradients", "optimizer"}), frozenset(), "zero2.yaml"),
    "fsdp2": Strategy("fsdp2", "FSDP2", _ALL, frozenset(), "fsdp2_lora.yaml / fsdp2_qlora.yaml"),
    "zero3": Strategy("zero3", "ZeRO-3", _ALL, frozenset(), "zero3.yaml"),
    "fsdp2_offload": Strategy("fsdp2_offload", "FSDP2 + CPU offload", _ALL, _ALL,
                              "fsdp2_qlora.yaml with fsdp_offload_params: true"),
    "zero3_offload": Strategy("zero3_offload", "ZeRO-3 + CPU offload", _ALL, _ALL, "zero3_offload.yaml"),
}
QUANTIZATIONS = ("none", "nf4", "fp4")  # LLM.int8 weights cannot be sharded as float tensors
PRECISION_LABELS = {"none": "LoRA", "nf4": "QLoRA", "fp4": "QLoRA (FP4)"}
# The order `recommend` tries set-ups in, cheapest first: exact bf16 weights before 4-bit ones
# (QLoRA dequantizes every weight at every step and rounds the base), nothing moved per step
# before all-gathers (FSDP2/ZeRO-3 send the weights over the interconnect each step), and
# PCIe transfers of every weight to and from host RAM (offload) last. ZeRO-2 and ZeRO-3 follow
# their FSDP2/DDP counterparts: they only win where their layout fits and the other does not.
PREFERENCE: list[tuple[str, str]] = [
    ("none", "ddp"), ("none", "zero2"), ("none", "fsdp2"), ("none", "zero3"),
    ("nf4", "ddp"), ("nf4", "zero2"), ("nf4", "fsdp2"), ("nf4", "zero3"),
    ("none", "fsdp2_offload"), ("none", "zero3_offload"), ("nf4", "fsdp2_offload"), ("nf4", "zero3_offload"),
]


@dataclass
class DistributedEstimate:
    """Predicted peak of one GPU and the host RAM of the whole machine, as rows
    (where: "GPU" or "host", component, bytes)."""

    rows: list[dict]
    settings: dict
    strategy: Strategy
    num_gpus: int

    @property
    def gpu_bytes(self) -> int:
        return int(sum(r["bytes"] for r in self.rows if r["where"] == "GPU"))

    @property
    def host_bytes(self) -> int:
        return int(sum(r["bytes"] for r in self.rows if r["where"] == "host"))

    def fits(self, gpu: str | float) -> bool:
        """Whether one GPU's share fits `gpu` (a name from ftnb.estimate.GPUS or a number of bytes).
        Usage: estimate_distributed("llama-3.1-8b", "ddp", 2).fits("L4 24 GB")"""
        return self.gpu_bytes <= _device_memory(gpu)[1]

    @property
    def label(self) -> str:
        engine = "one GPU" if self.strategy.name == "ddp" and self.num_gpus == 1 else self.strategy
        return f"{PRECISION_LABELS[self.settings['quantization']]} · {engine}"

    def to_frame(self):
        import pandas as pd

        frame = pd.DataFrame(self.rows)
        frame["GiB"] = (frame.pop("bytes") / GIB).round(2)
        return frame

    def _summary(self) -> str:
        s = self.settings
        return (f"{s['model']} {self.label} on {self.num_gpus} GPU(s), micro-batch {s['micro_batch']} x "
                f"{s['seq_len']} tokens: {self.gpu_bytes / GIB:.1f} GiB per GPU, "
                f"{self.host_bytes / GIB:.1f} GiB host RAM")

    def __str__(self) -> str:
        return self.to_frame().to_string(index=False) + "\n" + self._summary()

    __repr__ = __str__

    def _repr_html_(self) -> str:
        return self.to_frame().to_html(index=False) + f"<p><b>{self._summary()}</b></p>"


def estimate_distributed(model: Any, strategy: str, num_gpus: int, quantization: str = "nf4", *,
                         lora_r: int = 16, lora_targets: str | list[str] = "all-linear", micro_batch: int = 1,
                         seq_len: int = 2048, gradient_checkpointing: bool = True, optimizer: str = "adamw",
                         compute_dtype: str = "bfloat16", double_quant: bool = True, lora_dropout: float = 0.05,
                         attn_implementation: str = "sdpa", padded: bool = False) -> DistributedEstimate:
    """Per-GPU peak and host RAM of LoRA (`quantization="none"`, bf16 base) or QLoRA training
    with `strategy` (a key of STRATEGIES) on `num_gpus` GPUs, each running `micro_batch`
    sequences of `seq_len` tokens (`padded=False`: packed or equal-length rows).

    Usage: estimate_distributed("llama-3.1-70b", "fsdp2", 4, "nf4", micro_batch=1, seq_len=2048).gpu_bytes
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {list(STRATEGIES)}")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS} for sharded training, not {quantization!r}")
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be at least 1, not {num_gpus}")
    how, shape, n = STRATEGIES[strategy], model_shape(model), num_gpus
    shards_weights = "weights" in how.shards
    # Sharded QLoRA keeps every float tensor in the storage dtype (TRL skips peft's fp32 upcast
    # when the 4-bit weights are sharded); DDP/ZeRO-2 QLoRA is prepared as on one GPU.
    kbit_prepare = quantization != "none" and not shards_weights
    single = estimate_training_memory(
        shape, quantization, double_quant, lora_r, lora_targets, micro_batch, seq_len, gradient_checkpointing,
        optimizer, compute_dtype, attn_implementation, lora_dropout=lora_dropout, padded=padded,
        kbit_prepare=kbit_prepare, device="cuda")
    cd = _dtype_bytes(compute_dtype)
    float_bytes = 4 if kbit_prepare else cd
    # _weight_rows: the (quantized) linears, for 4 bits their constants second, the float part last
    *linear_rows, float_row = _weight_rows(shape, quantization, double_quant, cd, float_bytes, "causal-lm", 2,
                                           compute_dtype)
    constants = linear_rows[1]["bytes"] if quantization in ("nf4", "fp4") else 0
    linears = sum(r["bytes"] for r in linear_rows) - constants
    floats = float_row["bytes"]
    n_lora = lora_params(shape, lora_r, lora_targets)
    lora, grads, state = n_lora * 4, n_lora * 4, n_lora * OPTIMIZER_STATE_BYTES[optimizer]

    def on_gpu(part: str, nbytes: float) -> float:
        if part in how.offloads:
            return 0
        return nbytes / n if part in how.shards else nbytes

    gpu = [("fixed", "CUDA context and kernels", CALIBRATION.cuda_context_bytes),
           ("weights", "frozen linear weights" + _share(how, "weights", n), on_gpu("weights", linears)),
           ("weights", "embeddings, norms, head" + _share(how, "weights", n), on_gpu("weights", floats)),
           ("weights", "4-bit quantization constants (every GPU keeps all; assumed)", constants),
           ("trainable", f"LoRA weights r={lora_r} ({n_lora:,}, fp32)" + _share(how, "weights", n),
            on_gpu("weights", lora)),
           ("trainable", f"optimizer state ({optimizer})" + _share(how, "optimizer", n), on_gpu("optimizer", state))]
    # LoRA gradients are not at the peak (the start of backward) unless something keeps them
    # between steps, as in ftnb.estimate: DDP's buckets and ZeRO-2's partition do
    layer = (linears + lora) / shape.num_layers
    if shards_weights and (n > 1 or how.offloads):
        if how.engine.startswith("FSDP2"):
            gpu += [("communication", "two decoder layers all-gathered (computing + prefetched)", 2 * layer),
                    ("communication", "root module gathered for the whole step (embeddings, norm, head)", floats)]
        else:
            gpu.append(("communication", "parameters gathered on use (two layers or the embedding)",
                        max(2 * layer, shape.embedding_params * float_bytes)))
        gpu.append(("communication", "one layer's LoRA gradients before reduce-scatter", grads / shape.num_layers))
    elif how.name == "ddp" and n > 1:
        gpu.append(("communication", "DDP gradient buckets (allocated at wrapping, as large as the gradients)", grads))
    elif how.name == "zero2" and n > 1:
        gpu += [("trainable", f"LoRA gradient partition (1/{n}, kept between steps)", grads / n),
                ("communication", "ZeRO-2 reduce bucket", min(grads, shape.hidden_size ** 2 * 4))]
    by_group = single.bytes_by_group()
    gpu += [("activations", "activations of this GPU's micro-batch (as on one GPU)", by_group["activations"]),
            ("loss", "logits, log-softmax and their gradients", by_group.get("loss", 0))]
    allocated = sum(b for group, _, b in gpu if group != "fixed")
    gpu.append(("fixed", f"caching allocator fragmentation ({CALIBRATION.cuda_fragmentation:.0%})",
                allocated * CALIBRATION.cuda_fragmentation))
    host = [("host", f"{n} training process(es), Python + torch (CPU-measured baseline each)",
             n * CALIBRATION.cpu_process_baseline_bytes)]
    if "weights" in how.offloads:
        host.append(("host", "offloaded weights (all shards, once)", linears + floats + lora))
    if "gradients" in how.offloads:
        host.append(("host", "offloaded LoRA gradients", grads))
    if "optimizer" in how.offloads:
        host.append(("host", f"offloaded optimizer state ({optimizer})", state))
    rows = [dict(where="GPU", **_row(g, c, b)) for g, c, b in gpu]
    rows += [dict(where="host", **_row(g, c, b)) for g, c, b in host]
    settings = dict(model=shape.name, quantization=quantization, lora_r=lora_r, micro_batch=micro_batch,
                    seq_len=seq_len, gradient_checkpointing=gradient_checkpointing, optimizer=optimizer,
                    compute_dtype=compute_dtype, attn_implementation=attn_implementation)
    return DistributedEstimate(rows, settings, how, n)


def _share(how: Strategy, part: str, n: int) -> str:
    if part in how.offloads:
        return " (in host RAM)"
    return f" (1/{n} each)" if part in how.shards and n > 1 else ""


def recommend(model: Any, num_gpus: int, gpu: str | float, host_ram: float | None = None,
              quantizations: tuple[str, ...] = ("none", "nf4"), **settings) -> DistributedEstimate | None:
    """The first set-up in PREFERENCE (cheapest first) whose per-GPU share fits `gpu` and whose
    host RAM fits `host_ram` bytes (None: any), or None. One GPU runs plain single-GPU training
    (`ddp` with N=1) or CPU offload; sharding alone divides nothing there.

    Usage: recommend("llama-3.1-70b", 2, "L4 24 GB", host_ram=128 * GIB, micro_batch=1, seq_len=2048)
    """
    for quantization, strategy in PREFERENCE:
        if quantization not in quantizations:
            continue
        if num_gpus == 1 and strategy in ("zero2", "fsdp2", "zero3"):
            continue
        est = estimate_distributed(model, strategy, num_gpus, quantization, **settings)
        if est.fits(gpu) and (host_ram is None or est.host_bytes <= host_ram):
            return est
    return None


def recommendation_table(model: Any, gpu_counts: list[int], gpus: list[str], host_ram: float | None = None,
                         **settings):
    """A DataFrame: one row per GPU count, one column per card, each cell the cheapest set-up that
    fits (with its per-GPU GiB) or "does not fit".

    Usage: recommendation_table("llama-3.1-70b", [1, 2, 4, 8], ["T4 16 GB", "L4 24 GB", "A100 80 GB"])
    """
    import pandas as pd

    cells: dict[str, dict[int, str]] = {card: {} for card in gpus}
    for card in gpus:
        for count in gpu_counts:
            best = recommend(model, count, card, host_ram, **settings)
            cells[card][count] = f"{best.label} ({best.gpu_bytes / GIB:.1f} GiB)" if best else "does not fit"
    frame = pd.DataFrame(cells)
    frame.index.name = "GPUs"
    return frame


# ---------------------------------------------------------------- published measurements to compare with
@dataclass(frozen=True)
class Anchor:
    """A published training run: its set-up as estimate_distributed arguments and what it reported."""

    source: str
    url: str
    model: str
    strategy: str
    num_gpus: int
    settings: dict = field(default_factory=dict)
    gpu_gib: float | None = None  # reported per-GPU memory
    host_gib: float | None = None  # reported CPU RAM
    fits_card: str | None = None  # reported only as "trains on this card"

    def estimate(self) -> DistributedEstimate:
        return estimate_distributed(self.model, self.strategy, self.num_gpus, **self.settings)


# peft's FSDP + QLoRA guide (docs/source/accelerate/fsdp.md): Llama-2-70B, examples/sft/train.py with
# NF4 + double quant stored in bf16, LoRA r=8 on all linears (dropout 0.1), 2 sequences of 2048
# packed tokens per GPU (plus 2 accumulation steps), gradient checkpointing, flash attention 2,
# FSDP (version 1, full shard, use_orig_params false) on 2 GPUs. Reported "GB"; read here as GiB.
_PEFT = dict(quantization="nf4", lora_r=8, lora_dropout=0.1, micro_batch=2, seq_len=2048,
             gradient_checkpointing=True, attn_implementation="flash_attention_2")
PEFT_URL = "https://huggingface.co/docs/peft/accelerate/fsdp"
ANCHORS: list[Anchor] = [
    Anchor("peft docs: FSDP + CPU offload", PEFT_URL, "llama-2-70b", "fsdp2_offload", 2, _PEFT,
           gpu_gib=19.6, host_gib=107),
    Anchor("peft docs: FSDP, no offload", PEFT_URL, "llama-2-70b", "fsdp2", 2, _PEFT, gpu_gib=35.6),
    # Answer.AI's fsdp_qlora README command: Llama-2-70B, batch 2 x 512 tokens per GPU, bf16,
    # QLoRA (bitsandbytes NF4; LoRA r=64, the script's default), gradient checkpointing and CPU
    # offload, on two 24 GB RTX 3090/4090s. It reports that it trains, not its peak.
    Anchor("Answer.AI fsdp_qlora: FSDP + CPU offload", "https://github.com/AnswerDotAI/fsdp_qlora",
           "llama-2-70b", "fsdp2_offload", 2,
           dict(quantization="nf4", lora_r=64, lora_dropout=0.1, micro_batch=2, seq_len=512,
                gradient_checkpointing=True), fits_card="RTX 4090 24 GB"),
]


def anchor_table():
    """Each anchor next to this module's estimate for its settings, with the relative error.
    Usage: anchor_table()"""
    import pandas as pd

    rows = []
    for anchor in ANCHORS:
        est = anchor.estimate()
        row = {"run": anchor.source, "set-up": f"{est.label}, {anchor.num_gpus} GPUs",
               "predicted GPU GiB": round(est.gpu_bytes / GIB, 1), "reported GPU GiB": anchor.gpu_gib,
               "predicted host GiB": round(est.host_bytes / GIB, 1), "reported host GiB": anchor.host_gib}
        if anchor.gpu_gib:
            row["GPU error"] = f"{est.gpu_bytes / GIB / anchor.gpu_gib - 1:+.0%}"
        if anchor.fits_card:
            row["reported GPU GiB"] = f"trains on {anchor.fits_card}"
            row["GPU error"] = "fits" if est.fits(anchor.fits_card) else "predicted NOT to fit"
        rows.append(row)
    return pd.DataFrame(rows)
