"""Measure memory instead of guessing it: probes, model footprints and a Trainer callback; and a
causal-LM loss computed in chunks, which never holds the full-vocabulary logits.

Usage:
    from ftnb.memory import probe, PROBES, footprint, MemoryCallback, HeapTrimCallback, release_memory
    from ftnb.memory import chunked_causal_lm_loss
    with probe("load nf4"):
        model = load_model("smollm2-135m-instruct", quantization="nf4")
    print(footprint(model))
    trainer = Trainer(..., callbacks=[MemoryCallback(), HeapTrimCallback()])
    PROBES              # every probe so far; renders as a table in a notebook
    PROBES.highest()    # the probe with the highest peak
    del model, trainer
    release_memory()    # hand what they held back to the operating system

A probe records wall time and, for the code inside it, the peak and the net change of
  * process RSS on the CPU (Linux: the kernel's high-water mark VmHWM, reset through
    /proc/self/clear_refs; elsewhere a 5 ms sampling thread), and
  * accelerator memory (CUDA: the caching allocator's allocated and reserved bytes, peak
    reset at entry; MPS: sampled).
Probes nest: resetting a peak first folds it into every enclosing probe, so an outer probe's
peak still covers everything that happened inside its children.
"""
from __future__ import annotations

import ctypes
import gc
import json
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch
from torch.utils.checkpoint import checkpoint
from transformers import TrainerCallback

from ftnb.env import device_type as _device

MIB = 2**20
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


# ---------------------------------------------------------------- peak sources
def _rss() -> int:
    return psutil.Process().memory_info().rss


def _kernel_hwm_resettable() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


class _Sampler:
    """Background thread that keeps the largest value seen of RSS and MPS memory since reset.
    Only used where the kernel cannot track the RSS peak for us (macOS, Windows) or on MPS."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.rss_peak, self.mps_peak = interval, 0, 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _mps_now() -> int:
        return torch.mps.driver_allocated_memory() if _device() == "mps" else 0

    def _run(self) -> None:
        while True:
            self.rss_peak = max(self.rss_peak, _rss())
            self.mps_peak = max(self.mps_peak, self._mps_now())
            time.sleep(self.interval)

    def reset(self) -> None:
        self.rss_peak, self.mps_peak = _rss(), self._mps_now()


_USE_KERNEL_HWM = _kernel_hwm_resettable()
_sampler: _Sampler | None = None


def _get_sampler() -> _Sampler:
    global _sampler
    if _sampler is None:
        _sampler = _Sampler()
    return _sampler


def _rss_peak() -> int:
    if _USE_KERNEL_HWM:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return max(_get_sampler().rss_peak, _rss())


def _accel_now() -> tuple[int, int]:
    """(allocated, reserved) bytes on the accelerator now."""
    dev = _device()
    if dev == "cuda":
        return torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    if dev == "mps":
        return torch.mps.current_allocated_memory(), torch.mps.driver_allocated_memory()
    return 0, 0


def _accel_peak() -> tuple[int, int]:
    dev = _device()
    if dev == "cuda":
        return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    if dev == "mps":
        allocated, reserved = _accel_now()
        return allocated, max(reserved, _get_sampler().mps_peak)
    return 0, 0


# ---------------------------------------------------------------- probes
@dataclass
class ProbeRecord:
    label: str
    depth: int
    seconds: float
    rss_start_mib: float
    rss_peak_mib: float
    rss_peak_delta_mib: float
    rss_end_delta_mib: float
    accel_peak_allocated_mib: float | None = None
    accel_peak_delta_mib: float | None = None
    accel_peak_reserved_mib: float | None = None
    accel_end_delta_mib: float | None = None


class ProbeTable(list):
    """A list of ProbeRecord that prints as a table and saves as JSON."""

    def as_dicts(self) -> list[dict]:
        return [asdict(r) for r in self]

    def to_frame(self):
        import pandas as pd

        frame = pd.DataFrame(self.as_dicts())
        if not frame.empty:
            frame["label"] = ["  " * d + lbl for d, lbl in zip(frame.pop("depth"), frame["label"])]
        return frame.dropna(axis=1, how="all").round(1)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.as_dicts(), indent=2))

    def highest(self) -> ProbeRecord | None:
        """The probe with the highest peak: accelerator memory where there is one, else process RSS.
        Enclosing probes cover their children, so this is the peak of every probed section.

        Usage: top = PROBES.highest(); print(top.label, top.rss_peak_mib)
        """
        return max(self, key=lambda r: (r.accel_peak_allocated_mib or 0, r.rss_peak_mib), default=None)

    def _repr_html_(self) -> str:
        return self.to_frame().to_html(index=False)

    def __str__(self) -> str:
        return self.to_frame().to_string(index=False)

    __repr__ = __str__


PROBES = ProbeTable()


class _Open:
    def __init__(self):
        self.rss_peak = 0
        self.accel_peak = (0, 0)


_open_probes: list[_Open] = []


_lifetime_rss_peak = 0  # the largest RSS high-water mark of the peak windows already reset


def _fold_peaks() -> None:
    """Fold the current window's peak into every open probe and into the process's lifetime peak."""
    global _lifetime_rss_peak
    rss, (alloc, reserved) = _rss_peak(), _accel_peak()
    _lifetime_rss_peak = max(_lifetime_rss_peak, rss)
    for p in _open_probes:
        p.rss_peak = max(p.rss_peak, rss)
        p.accel_peak = (max(p.accel_peak[0], alloc), max(p.accel_peak[1], reserved))


def reset_peak() -> None:
    """Start a new peak window, after folding the current peak into every open probe."""
    _fold_peaks()
    if _USE_KERNEL_HWM:
        _CLEAR_REFS.write_text("5")
    if _device() == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if not _USE_KERNEL_HWM or _device() == "mps":
        _get_sampler().reset()


def process_peak_rss_mib() -> float:
    """Peak resident memory of this process since it started, in MiB: what an 8 GB laptop has to hold,
    whether or not the code that reached it ran inside a probe (child processes not included).

    Usage: print(f"peak {process_peak_rss_mib():.0f} MiB")
    """
    return max(_lifetime_rss_peak, _rss_peak()) / MIB


def current_peak_mib() -> dict[str, float]:
    """Peak memory since the last reset: {'rss': ..., 'accelerator': ...} in MiB."""
    return {"rss": _rss_peak() / MIB, "accelerator": _accel_peak()[0] / MIB}


def _libc_malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (macOS, musl, Windows)."""
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)  # the symbols the process already has
    except (OSError, TypeError):
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def trim_heap() -> None:
    """Return the C heap's free pages to the operating system (glibc's malloc_trim; a no-op elsewhere).

    Usage: trim_heap()   (after a step has freed its activations)
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def release_memory() -> None:
    """Give the memory of objects already deleted back to the operating system: collect reference
    cycles, then return the C heap's free pages (glibc's malloc_trim) and the CUDA cache. Without
    the trim, a freed model's many small and mid-sized tensors stay in the heap as free but resident
    pages, and the next model loads on top of them.

    Usage: del model; release_memory()
    """
    gc.collect()
    trim_heap()
    if _device() == "cuda":
        torch.cuda.empty_cache()


@contextmanager
def probe(label: str, table: ProbeTable | None = None):
    """Measure time and memory of the block; appends a ProbeRecord to `table` (default PROBES).

    Usage: with probe("forward pass") as rec: ...   (rec is filled in on exit)
    """
    table = PROBES if table is None else table
    record = ProbeRecord(label, len(_open_probes), 0.0, 0.0, 0.0, 0.0, 0.0)
    if _device() == "cuda":
        torch.cuda.synchronize()
    reset_peak()
    state = _Open()
    _open_probes.append(state)
    rss_start, (alloc_start, _) = _rss(), _accel_now()
    start = time.perf_counter()
    try:
        yield record
    finally:
        if _device() == "cuda":
            torch.cuda.synchronize()
        record.seconds = time.perf_counter() - start
        _fold_peaks()
        _open_probes.pop()
        rss_end, (alloc_end, _) = _rss(), _accel_now()
        record.rss_start_mib = rss_start / MIB
        record.rss_peak_mib = state.rss_peak / MIB
        record.rss_peak_delta_mib = (state.rss_peak - rss_start) / MIB
        record.rss_end_delta_mib = (rss_end - rss_start) / MIB
        if _device() != "cpu":
            record.accel_peak_allocated_mib = state.accel_peak[0] / MIB
            record.accel_peak_delta_mib = (state.accel_peak[0] - alloc_start) / MIB
            record.accel_peak_reserved_mib = state.accel_peak[1] / MIB
            record.accel_end_delta_mib = (alloc_end - alloc_start) / MIB
        table.append(record)


# ---------------------------------------------------------------- footprint
@dataclass
class Footprint:
    """Bytes held by a model, by role and dtype. `params` counts logical weights
    (a 4-bit packed byte holds two of them)."""

    rows: list[dict]
    trainable_params: int
    total_params: int

    @property
    def total_bytes(self) -> int:
        return sum(r["bytes"] for r in self.rows)

    @property
    def trainable_percent(self) -> float:
        return 100 * self.trainable_params / max(self.total_params, 1)

    def bytes_by_role(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for r in self.rows:
            out[r["role"]] += r["bytes"]
        return dict(out)

    def as_dict(self) -> dict:
        return {"rows": self.rows, "trainable_params": self.trainable_params,
                "total_params": self.total_params, "total_bytes": self.total_bytes}

    def to_frame(self):
        import pandas as pd

        frame = pd.DataFrame(self.rows)
        frame["MiB"] = (frame["bytes"] / MIB).round(2)
        return frame

    def _repr_html_(self) -> str:
        return self.to_frame().to_html(index=False) + f"<p>{self._summary()}</p>"

    def _summary(self) -> str:
        return (f"total {self.total_bytes / MIB:.1f} MiB; trainable {self.trainable_params:,} of "
                f"{self.total_params:,} parameters ({self.trainable_percent:.2f}%)")

    def __str__(self) -> str:
        return self.to_frame().to_string(index=False) + "\n" + self._summary()


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _quant_state_bytes(state) -> int:
    """Bytes of a bitsandbytes 4-bit QuantState: per-block absmax (uint8 when double-quantised,
    plus the second-level absmax and code) and the 16-entry NF4/FP4 code table."""
    total = _nbytes(state.absmax) + _nbytes(state.code)
    if getattr(state, "nested", False):
        total += _nbytes(state.state2.absmax) + _nbytes(state.state2.code) + _nbytes(state.offset)
    return total


def footprint(model: torch.nn.Module) -> Footprint:
    """Break a model's memory down by role: 4-bit packed weights and their quantisation
    constants, 8-bit weights and scales, frozen float weights, trainable weights, buffers.

    Usage: print(footprint(model)); footprint(model).bytes_by_role()
    """
    acc: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])  # (role, dtype) -> [params, bytes]
    trainable = total = 0

    def add(role: str, dtype, params: int, nbytes: int) -> None:
        key = (role, str(dtype).replace("torch.", ""))
        acc[key][0] += params
        acc[key][1] += nbytes

    for _, p in model.named_parameters():
        kind = type(p).__name__
        if kind == "Params4bit" and getattr(p, "quant_state", None) is not None:
            logical = p.quant_state.shape.numel()
            add("4-bit weights (packed)", p.dtype, logical, _nbytes(p))
            add("4-bit quantization constants", "mixed", 0, _quant_state_bytes(p.quant_state))
        elif kind == "Int8Params":
            logical = p.numel()
            add("8-bit weights", p.dtype, logical, _nbytes(p))
            add("8-bit scales", "float32", 0, _nbytes(getattr(p, "SCB", None)))
        else:
            logical = p.numel()
            add("trainable" if p.requires_grad else "frozen", p.dtype, logical, _nbytes(p))
        total += logical
        trainable += logical if p.requires_grad else 0
    for _, b in model.named_buffers():
        add("buffers", b.dtype, 0, _nbytes(b))
    rows = [{"role": role, "dtype": dtype, "params": n, "bytes": nbytes}
            for (role, dtype), (n, nbytes) in acc.items() if nbytes]
    return Footprint(rows, trainable, total)


# ---------------------------------------------------------------- a loss without the full logits
def _summed_cross_entropy(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(head(hidden).float(), targets, ignore_index=-100, reduction="sum")


def chunked_causal_lm_loss(model, input_ids: torch.Tensor, labels: torch.Tensor,
                           attention_mask: torch.Tensor | None = None, chunk_tokens: int = 256) -> torch.Tensor:
    """The causal-LM loss (mean next-token cross-entropy, labels -100 ignored, as `model(labels=...)`
    computes it) without ever holding batch x sequence x vocabulary logits: the output head and the
    cross-entropy run on `chunk_tokens` positions at a time, and each chunk is recomputed in
    backward (activation checkpointing) instead of being kept. The loss term then costs
    chunk_tokens x vocabulary x 12 bytes instead of every token's. For Llama-style heads (no
    final logit soft-capping); a peft model works as is.

    Usage: loss = chunked_causal_lm_loss(peft_model, ids, labels, chunk_tokens=128); loss.backward()
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    from ftnb.models import without_peft

    causal_lm = without_peft(model)
    hidden = causal_lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # position t predicts token t + 1
    targets = labels[:, 1:].reshape(-1).to(hidden.device)
    head = causal_lm.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), chunk_tokens):
        end = start + chunk_tokens
        total = total + checkpoint(_summed_cross_entropy, head, hidden[start:end], targets[start:end],
                                   use_reentrant=False)
    return total / (targets != -100).sum().clamp(min=1)


# ---------------------------------------------------------------- trainer callback
class MemoryCallback(TrainerCallback):
    """Log peak memory, step time and tokens/s at every Trainer logging step.

    Usage: Trainer(..., callbacks=[MemoryCallback("outputs/memory_log.jsonl")])
           then MemoryCallback.history (list of dicts) or .to_frame() for plots.
    Tokens/s counts non-padding input tokens; the callback switches the Trainer's token
    counter on when it is off.
    """

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else None
        self.history: list[dict] = []
        self._window_start = 0.0
        self._window_steps = 0
        self._window_tokens = 0

    def on_init_end(self, args, state, control, **kwargs):
        if args.include_num_input_tokens_seen in ("no", False):
            args.include_num_input_tokens_seen = "non_padding"

    def on_train_begin(self, args, state, control, **kwargs):
        reset_peak()
        self._window_start = time.perf_counter()
        self._window_steps, self._window_tokens = state.global_step, state.num_input_tokens_seen
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs:  # evaluation and end-of-training summaries carry no step timing
            return
        now = time.perf_counter()
        steps = max(state.global_step - self._window_steps, 1)
        tokens = state.num_input_tokens_seen - self._window_tokens
        elapsed = now - self._window_start
        peak = current_peak_mib()
        row = {
            "step": state.global_step,
            "loss": logs.get("loss"),
            "learning_rate": logs.get("learning_rate"),
            "step_seconds": elapsed / steps,
            "tokens_per_second": tokens / elapsed if elapsed > 0 else None,
            "peak_rss_mib": peak["rss"],
            "peak_accelerator_mib": peak["accelerator"] or None,
        }
        self.history.append(row)
        if self.path:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        self._window_start, self._window_steps = now, state.global_step
        self._window_tokens = state.num_input_tokens_seen

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.history)


class HeapTrimCallback(TrainerCallback):
    """Trim the C heap after every optimizer step and evaluation, so that resident memory follows what
    training holds rather than what it once held.

    Why: on a CPU each step frees its activations and full-vocabulary logits into glibc's heap, whose
    pages stay resident; with packed rows of changing length the next step rarely fits the same holes,
    and the heap grows over an epoch (recipe 02: 4.3 GB after 40 steps, 5.5 GB after 142). The trim
    costs a few milliseconds per step; on a GPU it changes little, the tensors live in device memory.

    Usage: Trainer(..., callbacks=[HeapTrimCallback()])
    """

    def on_step_end(self, args, state, control, **kwargs):
        trim_heap()

    def on_evaluate(self, args, state, control, **kwargs):
        trim_heap()
