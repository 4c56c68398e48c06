"""Predicted vs measured peak memory of LoRA/QLoRA training on CPU, for SmolLM2-135M.

Usage (from the repo root; about 6 minutes on 2 idle cores):
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/memory_estimates.py [--only NAME ...] [--steps 2]
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/memory_estimates.py --repredict   # after editing ftnb/estimate.py
writes benchmarks/memory_estimates.json and prints the table.

Each configuration runs in a FRESH Python process (`ftnb.estimate.measure_training_peak`), so one
run's peak cannot leak into the next one's high-water mark: import the libraries, load the model,
attach LoRA, then real training steps (forward with labels, backward, optimizer step) on random
token ids inside an `ftnb.memory.probe`. On CPU the probe reports the kernel's resident-set
high-water mark (VmHWM), what the out-of-memory killer looks at. The prediction is
`estimate_training_memory(...)` for the same settings, from the config only. `--repredict` keeps
the stored measurements and recomputes only the predictions.
"""
from __future__ import annotations

import argparse
import json
import statistics
from datetime import datetime, timezone
from pathlib import Path

from ftnb.estimate import MIB, estimate_training_memory, measure_training_peak

MODEL = "smollm2-135m-instruct"
HERE = Path(__file__).parent
BASE = dict(quantization="nf4", double_quant=True, lora_r=8, batch_size=4, seq_len=128,
            gradient_checkpointing=True, optimizer="adamw", lora_dropout=0.05)
CONFIGS: dict[str, dict] = {
    "fp32 no-ckpt": dict(quantization="none", gradient_checkpointing=False),
    "fp32 ckpt": dict(quantization="none"),
    "fp32 no-ckpt b2 s64 no-dropout": dict(quantization="none", gradient_checkpointing=False,
                                           batch_size=2, seq_len=64, lora_dropout=0.0),
    "nf4 no-ckpt": dict(gradient_checkpointing=False),
    "nf4 ckpt": dict(),
    "nf4 ckpt no-double-quant b2": dict(double_quant=False, batch_size=2),
    "nf4 ckpt b8": dict(batch_size=8),
    "nf4 ckpt s256": dict(seq_len=256),
    "nf4 no-ckpt b1 s256": dict(gradient_checkpointing=False, batch_size=1, seq_len=256),
    "nf4 ckpt r64": dict(lora_r=64),
    "nf4 ckpt adamw_8bit": dict(optimizer="adamw_8bit"),
    "nf4 ckpt sgd": dict(optimizer="sgd"),
    "fp4 no-ckpt b2 s64": dict(quantization="fp4", gradient_checkpointing=False, batch_size=2, seq_len=64),
    "int8 ckpt": dict(quantization="int8"),
    "int8 no-ckpt b2": dict(quantization="int8", gradient_checkpointing=False, batch_size=2),
}


def repredict(row: dict) -> dict:
    """The stored measurement with a fresh prediction from the current ftnb.estimate."""
    c = row["config"]
    est = estimate_training_memory(
        MODEL, c["quantization"], c["double_quant"], c["lora_r"], "all-linear", c["batch_size"], c["seq_len"],
        c["gradient_checkpointing"], c["optimizer"], "float32", "sdpa", lora_dropout=c["lora_dropout"],
        padded=False, device="cpu")
    predicted = est.total_bytes / MIB
    return {**row, "predicted_peak_mib": predicted,
            "predicted_by_group_mib": {k: round(v / MIB, 1) for k, v in est.bytes_by_group().items()},
            "relative_error": (predicted - row["measured_peak_mib"]) / row["measured_peak_mib"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="configuration names (default: all)")
    parser.add_argument("--steps", type=int, default=2, help="training steps per configuration")
    parser.add_argument("--output", default=str(HERE / "memory_estimates.json"))
    parser.add_argument("--repredict", action="store_true", help="keep the stored measurements, recompute predictions")
    args = parser.parse_args()
    previous = json.loads(Path(args.output).read_text()) if args.repredict else {}
    stored = {r["name"]: r for r in previous.get("rows", [])}
    rows = []
    for name in args.only or (stored or CONFIGS):
        if args.repredict:
            row = repredict(stored[name])
        else:
            config = {**BASE, **CONFIGS[name]}
            row = {"name": name, "config": config, **measure_training_peak(MODEL, **config, steps=args.steps)}
        rows.append(row)
        print(f"{name:<32} measured {row['measured_peak_mib']:7.0f} MiB  predicted "
              f"{row['predicted_peak_mib']:7.0f} MiB  error {row['relative_error']:+.1%}", flush=True)
    errors = [abs(r["relative_error"]) for r in rows]
    import torch

    summary = {"max_abs_error": max(errors), "median_abs_error": statistics.median(errors),
               "within_15_percent": sum(e <= 0.15 for e in errors), "configurations": len(rows)}
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result = {"model": MODEL, "device": "cpu", "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
              "date": previous.get("date", now), "predictions_date": now,  # date = when measured
              "command": "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/memory_estimates.py",
              "steps_per_configuration": args.steps, "summary": summary, "rows": rows}
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
