"""LoRA vs QLoRA on one GPU: tokens/s, achieved TFLOP/s and peak memory, next to ftnb.estimate.

Usage:
    python benchmarks/gpu_qlora.py               # on a CUDA GPU (needs bitsandbytes), ~3-5 min on an H200
    python benchmarks/gpu_qlora.py --dry-run     # tiny model on CPU, seconds: checks the script itself
    python benchmarks/gpu_qlora.py --repredict benchmarks/gpu_qlora_h200.json   # stored run vs current estimator
writes $OUT/gpu_qlora.json (or benchmarks/gpu_qlora.json when OUT is unset).

Models are random-initialised Llama-3.2-1B and Llama-3.1-8B shapes (configs written below, no hub
access): weights do not change memory or speed. For each: bf16 LoRA and NF4 QLoRA, gradient
checkpointing off and on, batch 4 x 1024 tokens, a plain training loop (forward with labels
under bf16 autocast, as the Trainer's bf16=True does; backward; torch AdamW on the LoRA
parameters), 2 warm-up and 3 timed steps.

How the 4-bit model is built (the fast path): the bf16 model is initialised directly on the GPU,
then every decoder nn.Linear is swapped for a bitsandbytes Linear4bit whose Params4bit quantises
the bf16 weight on the GPU in place. Saving 16 GB of random weights and reloading them through
`from_pretrained(quantization_config=...)` would give the same layers and cost a minute of disk I/O.
Then peft's real `prepare_model_for_kbit_training` (fp32 upcast of norms, embeddings and head) and
`get_peft_model`, as in the notebooks.

FLOPs (model FLOPs, recomputation not counted), per token, N = frozen linear parameters
(decoder linears + output head), n = LoRA parameters, L layers, S sequence, q = heads x head dim:
    forward 2N + backward 2N (gradients of activations only; frozen weights get none)
    + LoRA 6n + causal attention 6 S q L (QK^T and AV: 2 S q per layer forward, half masked; 2x in backward)
achieved TFLOP/s = that x tokens / step time. Imports only torch, transformers, peft, bitsandbytes
and ftnb.estimate/ftnb.memory (no datasets, trl, papermill).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing ftnb
from ftnb.estimate import MIB, REFERENCE_CONFIGS, estimate_training_memory, model_shape  # noqa: E402
from ftnb.memory import probe  # noqa: E402

SHAPES = {f"{name}-shape": {**REFERENCE_CONFIGS[name], "rope_theta": 500000.0, "max_position_embeddings": 8192}
          for name in ("llama-3.2-1b", "llama-3.1-8b")}  # the hub models' config.json values
DRY_SHAPE = {"tiny-llama-shape": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=16, tie_word_embeddings=True, max_position_embeddings=256)}
LORA_R, WARMUP, TIMED = 16, 2, 3


def build(shape: dict, quantize: bool, device: str) -> torch.nn.Module:
    """A random-initialised Llama in bf16 on `device`; with `quantize`, NF4 (double quant) linears."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in shape.items() if k not in ("model_type", "dtype")}, attn_implementation="sdpa",
                         use_cache=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    if quantize:
        _swap_linears_for_nf4(model, device)
        model.is_loaded_in_4bit = True  # what from_pretrained(quantization_config=...) sets
    return model


def _swap_linears_for_nf4(model: torch.nn.Module, device: str) -> None:
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      compress_statistics=True, quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4", blocksize=64)._quantize(device)
                setattr(parent, name, q)
                del lin


def add_lora(model: torch.nn.Module, quantized: bool, checkpointing: bool) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    kwargs = {"use_reentrant": False}
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs=kwargs)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=0.0,
                                            target_modules="all-linear", task_type="CAUSAL_LM"))


def model_flops_per_token(shape: dict, seq_len: int, lora_params: int) -> float:
    s = model_shape(shape)
    frozen = s.linear_params + s.embedding_params  # decoder linears + output head (tied or not)
    attention = 6 * seq_len * s.num_heads * s.head_dim * s.num_layers
    return 4 * frozen + 6 * lora_params + attention


def run(name: str, shape: dict, quantized: bool, checkpointing: bool, batch: int, seq: int, device: str,
        memory_budget: float) -> dict:
    row = {"model": name, "mode": "nf4-qlora" if quantized else "bf16-lora", "gradient_checkpointing": checkpointing,
           "batch_size": batch, "seq_len": seq, "lora_r": LORA_R}
    est = estimate_training_memory(shape, "nf4" if quantized else "none", True, LORA_R, "all-linear", batch, seq,
                                   checkpointing, "adamw", "bfloat16", "sdpa", lora_dropout=0.0, padded=False,
                                   device="cuda")
    row["predicted_allocated_mib"] = est.allocated_bytes / MIB
    row["predicted_total_mib"] = est.total_bytes / MIB
    row["predicted_by_group_mib"] = {k: round(v / MIB, 1) for k, v in est.bytes_by_group().items()}
    if est.total_bytes > memory_budget:
        row["skipped"] = f"estimated {est.total_bytes / 2**30:.1f} GiB > {memory_budget / 2**30:.1f} GiB on this device"
        return row
    start = time.perf_counter()
    model = add_lora(build(shape, quantized, device), quantized, checkpointing)
    row["build_seconds"] = time.perf_counter() - start
    params = [p for p in model.parameters() if p.requires_grad]
    row["lora_params"] = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), device=device)
    model.train()
    cuda = device == "cuda"
    times = []
    try:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for step in range(WARMUP + TIMED):
            t0 = time.perf_counter()
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=cuda):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if step >= WARMUP:
                times.append(time.perf_counter() - t0)
            row["loss"] = loss.detach().item()
            del loss
    except torch.OutOfMemoryError as e:
        row["oom"] = str(e).splitlines()[0]
    if cuda:
        row["peak_allocated_mib"] = torch.cuda.max_memory_allocated() / MIB
        row["peak_reserved_mib"] = torch.cuda.max_memory_reserved() / MIB
        row["relative_error_allocated"] = (row["predicted_allocated_mib"] - row["peak_allocated_mib"]) / row["peak_allocated_mib"]
    if times:
        step_s = sum(times) / len(times)
        tokens = batch * seq
        row["step_seconds"] = step_s
        row["tokens_per_second"] = tokens / step_s
        row["achieved_tflops"] = model_flops_per_token(shape, seq, row["lora_params"]) * tokens / step_s / 1e12
    del model, opt, params, ids
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def probe_check(device: str) -> dict:
    """Does ftnb.memory.probe see a 256 MiB allocation on this accelerator?"""
    with probe("allocate 256 MiB") as rec:
        x = torch.empty(256 * MIB, dtype=torch.uint8, device=device)
        x.fill_(1)
    del x
    return {"allocated_mib": 256, "probe_peak_delta_mib": rec.accel_peak_delta_mib,
            "probe_end_delta_mib": rec.accel_end_delta_mib, "probe_rss_peak_delta_mib": rec.rss_peak_delta_mib}


def repredict(path: str) -> None:
    """Print each stored GPU measurement next to the current estimator's prediction (CPU, instant)."""
    for r in json.loads(Path(path).read_text())["rows"]:
        if "peak_allocated_mib" not in r:
            continue
        est = estimate_training_memory(SHAPES[r["model"]], "nf4" if r["mode"].startswith("nf4") else "none", True,
                                       r["lora_r"], "all-linear", r["batch_size"], r["seq_len"],
                                       r["gradient_checkpointing"], "adamw", "bfloat16", "sdpa", lora_dropout=0.0,
                                       padded=False, device="cuda")
        predicted = est.allocated_bytes / MIB
        print(f"{r['model']:<20} {r['mode']:<10} checkpointing={r['gradient_checkpointing']!s:<5} measured "
              f"{r['peak_allocated_mib']:8.0f} MiB  predicted {predicted:8.0f} MiB  "
              f"{predicted / r['peak_allocated_mib'] - 1:+.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny model on CPU, seconds; checks the script")
    parser.add_argument("--repredict", metavar="JSON", help="compare a stored result with the current estimator")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    args = parser.parse_args()
    if args.repredict:
        return repredict(args.repredict)
    device = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --dry-run to check the script on CPU")
    shapes = DRY_SHAPE if args.dry_run else SHAPES
    batch, seq = (2, 32) if args.dry_run else (args.batch, args.seq)
    budget = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else float("inf")
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
              "torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "python benchmarks/gpu_qlora.py" + (" --dry-run" if args.dry_run else ""),
              "flops_formula": "per token: 4 N_frozen (2 fwd + 2 bwd activation grads) + 6 n_lora + 6 S q L (causal attention)",
              "rows": []}
    for version in ("transformers", "peft", "bitsandbytes"):
        try:
            result[version] = __import__(version).__version__
        except ImportError:
            result[version] = None
    if device == "cuda":
        result["probe_check"] = probe_check(device)
    started = time.perf_counter()
    for name, shape in shapes.items():
        for quantized in (False, True):
            if args.dry_run and quantized and result["bitsandbytes"] is None:
                continue
            for checkpointing in (False, True):
                row = run(name, shape, quantized, checkpointing, batch, seq, device, budget)
                result["rows"].append(row)
                print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                                  if k != "predicted_by_group_mib"}), flush=True)
    result["total_seconds"] = time.perf_counter() - started
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ("gpu_qlora_dry_run.json" if args.dry_run else "gpu_qlora.json")
    path.write_text(json.dumps(result, indent=2))
    print("wrote", path)


if __name__ == "__main__":
    main()
