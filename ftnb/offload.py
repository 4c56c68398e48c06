"""Offloading on one machine, measured: a model loaded with `device_map="auto"` under a memory cap
spills its last decoder layers to the next tier (GPU -> CPU RAM, or, on a machine without a GPU,
CPU RAM -> disk through `offload_folder`), and every forward pass then copies them back in. Also
the host-side cost of an optimizer step, the part of CPU optimizer offload a CPU can measure.

Usage:
    from ftnb.offload import offloaded_generation_times, optimizer_step_seconds
    rows = offloaded_generation_times("smollm2-135m-instruct", shares=[0.0, 0.5, 1.0], repeats=3)
    optimizer_step_seconds(10_000_000)     # one AdamW step over 10M fp32 parameters, here

On CPU the spilled layers live in memory-mapped files under `offload_folder`: after the first
pass the operating system's page cache usually holds them, so what is measured is mostly
accelerate's per-layer hooks and copies, not the disk itself.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from collections import Counter
from typing import Any

import torch

def tiers() -> tuple[Any, str]:
    """(the capped device, where what does not fit goes): (0, "cpu") with a GPU, ("cpu", "disk") without."""
    return (0, "cpu") if torch.cuda.is_available() else ("cpu", "disk")


def layer_sizes(path: str, dtype: torch.dtype) -> tuple[int, int, int]:
    """(bytes outside the decoder layers, bytes of one decoder layer, number of layers) of the
    checkpoint at `path` in `dtype`, from an empty (meta) model: nothing is loaded."""
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, dtype=dtype)
    sizes = compute_module_sizes(empty, dtype=dtype)
    layers = config.num_hidden_layers
    one_layer = sizes["model.layers.0"]
    # a tied head shares the embedding's tensor: accelerate places it once
    tied = sizes["lm_head"] if getattr(config, "tie_word_embeddings", False) else 0
    return sizes[""] - layers * one_layer - tied, one_layer, layers


def memory_cap(path: str, share_offloaded: float, dtype: torch.dtype = torch.float32) -> int:
    """The `max_memory` of the capped device that leaves about `share_offloaded` of the decoder
    layers to the next tier (accelerate fills the device in module order and keeps one layer's room)."""
    if not 0 <= share_offloaded <= 1:
        raise ValueError(f"share_offloaded must be between 0 and 1, not {share_offloaded}")
    rest, one_layer, layers = layer_sizes(path, dtype)
    kept = round((1 - share_offloaded) * layers)
    return rest + (kept + 1) * one_layer + one_layer // 2  # half a layer of slack against rounding


def load_capped(name: str, share_offloaded: float, offload_folder: str, dtype: torch.dtype = torch.float32):
    """The model loaded with device_map="auto" and the capped device limited so that about
    `share_offloaded` of its decoder layers spill over; (model, share of layers actually spilled).

    Usage: model, share = load_capped("smollm2-135m-instruct", 0.5, "offload/")"""
    from transformers import AutoModelForCausalLM

    from ftnb.models import resolve

    path = resolve(name)
    device, spill = tiers()
    cap = memory_cap(path, share_offloaded, dtype)
    # share 0: no cap at all, the plain in-memory model to compare with
    max_memory = None if share_offloaded == 0 else {device: cap, spill: 10**12} if spill == "cpu" else {device: cap}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": device} if max_memory is None
                                                 else "auto", max_memory=max_memory, offload_folder=offload_folder)
    placement = getattr(model, "hf_device_map", {"": device})
    layers = [_placed(placement, f"model.layers.{i}") for i in range(model.config.num_hidden_layers)]
    return model.eval(), sum(where == spill for where in layers) / len(layers)


def _placed(placement: dict, module: str):
    """Where a module went: the entry of its longest enclosing name (accelerate may place a whole block list)."""
    enclosing = [name for name in placement if name == "" or module == name or module.startswith(name + ".")]
    return placement[max(enclosing, key=len)]


def offloaded_generation_times(name: str, shares: list[float], repeats: int = 3, new_tokens: int = 16,
                               prompt: str = "Explain in one sentence why the sky is blue.") -> list[dict]:
    """Greedy generation of exactly `new_tokens` tokens at each share of offloaded decoder layers:
    one untimed warm-up, then the median of `repeats` timed runs.

    Usage: offloaded_generation_times("smollm2-135m-instruct", [0.0, 0.5, 1.0], repeats=3)"""
    from ftnb.models import load_tokenizer

    tokenizer = load_tokenizer(name)
    device, spill = tiers()
    rows = []
    for share in shares:
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            model, spilled = load_capped(name, share, folder)
            load_seconds = time.perf_counter() - start
            inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
            generate = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)
            with torch.no_grad():
                model.generate(**inputs, **generate)  # warm-up: first reads, page cache
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    model.generate(**inputs, **generate)
                    times.append(time.perf_counter() - start)
            placement = Counter(str(v) for v in getattr(model, "hf_device_map", {"": device}).values())
            rows.append({"share_requested": share, "share_offloaded": spilled, "spilled_to": spill,
                         "placement": dict(placement), "load_seconds": load_seconds,
                         "seconds": statistics.median(times), "seconds_all": times,
                         "tokens_per_second": new_tokens / statistics.median(times)})
            del model
    return rows


def optimizer_step_seconds(num_params: int, repeats: int = 5, optimizer: str = "adamw") -> float:
    """Median seconds of one optimizer step over `num_params` fp32 parameters on this machine's CPU:
    what a step costs the host when the optimizer is offloaded (torch's AdamW; DeepSpeed's
    CPUAdam is a vectorised kernel and can be faster). One untimed step first creates the state.

    Usage: optimizer_step_seconds(2_000_000)"""
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', not {optimizer!r}")
    param = torch.nn.Parameter(torch.zeros(num_params))
    param.grad = torch.randn(num_params) * 1e-3
    opt = torch.optim.AdamW([param], lr=1e-4) if optimizer == "adamw" else torch.optim.SGD([param], lr=1e-4)
    opt.step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
