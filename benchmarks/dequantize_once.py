"""The 4-bit weights de-quantized once for training, against bitsandbytes de-quantizing them in every pass,
step by step in one process.

`cpu_efficiency.py` times each speed-up undone in a run of its own, minutes away from the recipe's row, and
this machine's speed drifts by up to a third in between. Here one trainer per recipe (01 at its cpu setting,
computing in bf16 where the CPU has bf16 instructions, else fp32; 02 in fp32, its notebook's setting, without
gradient checkpointing as in `cpu_efficiency.py`) alternates the two arms in pairs of optimizer steps, per
pass, once, once, per pass, ... (grouped by length, a step's batch tends to be shorter than the one before; in this
order both arms follow each other equally often): `ftnb.models.weights_dequantized_once` is entered and left
between steps, outside the timed window (`cpu_efficiency.StepTimer` times each step and measures the fp32 matmul reference after it). Both arms
compute the same numbers bit for bit (`tests/test_models.py`), so nothing but the de-quantization differs.
Reported per arm: seconds per step and the share of the fp32 matmul limit (`cpu_efficiency.py`'s measure,
which corrects each step for the reference measured right after it), and the ratio per-pass / once of both.

Usage: flock /tmp/ftnb-cpu.lock .venv/bin/python benchmarks/dequantize_once.py --steps 16
       (writes benchmarks/dequantize_once.json; about 8 minutes on 2 cores)
       --model tiny-llama-test --steps 2 --out /tmp/check.json checks it in a minute
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

import cpu_efficiency as bench
from ftnb import env
from ftnb.models import load_tokenizer, training_attention, weights_dequantized_once

ARMS = ("per_pass", "once")


def arm_of(step: int) -> str:
    """The arm of optimizer step `step` (0, 1, 2, ...): per pass, once, once, per pass, per pass, once, ..."""
    return ARMS[(step + 1) // 2 % 2]


class AlternateDequantization(TrainerCallback):
    """Enters or leaves `weights_dequantized_once` between optimizer steps as `arm_of` orders them (added
    after the StepTimer, so outside its timed window); records the arm of each step."""

    def __init__(self, model):
        self.model, self.held, self.arms = model, None, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.arms.append(ARMS[self.held is not None])

    def on_step_end(self, args, state, control, **kwargs):
        following = arm_of(len(self.arms))
        if following == "once" and self.held is None:
            self.held = contextlib.ExitStack()
            self.held.enter_context(weights_dequantized_once(self.model))
        elif following == "per_pass" and self.held is not None:
            self.held.close()
            self.held = None


def alternate(build, model_name: str, tokenizer, steps: int, dtype: torch.dtype) -> dict:
    """`steps` timed optimizer steps (after cpu_efficiency's warm-up), the arms alternating."""
    with tempfile.TemporaryDirectory() as folder:
        trainer, recorder, head, head_trained, training_context = build(
            model_name, tokenizer, bench.WARMUP_STEPS + steps, folder, dtype, dequantize_per_pass=True)
        timer = bench.StepTimer(trainer.model.config, head, recorder, (torch.float32,))
        switch = AlternateDequantization(trainer.model)
        trainer.add_callback(timer)
        trainer.add_callback(switch)
        with training_attention(trainer.model, dtype), training_context():
            trainer.train()
        if switch.held is not None:
            switch.held.close()
    micro = trainer.args.gradient_accumulation_steps
    per_step = [recorder.batches[k * micro:(k + 1) * micro] for k in range(len(timer.seconds))]
    rows = {arm: {"steps": 0, "seconds": 0.0, "ideal_seconds": 0.0} for arm in ARMS}
    for k in range(bench.WARMUP_STEPS, len(timer.seconds)):
        row = rows[switch.arms[k]]
        row["steps"] += 1
        row["seconds"] += timer.seconds[k]
        row["ideal_seconds"] += bench.training_flops(trainer.model.config, per_step[k], head, head_trained,
                                                     real=True) / timer.throughput[torch.float32][k]
    out = {arm: {"timed_steps": row["steps"], "seconds_per_step": row["seconds"] / row["steps"],
                 "fraction_of_fp32_matmul": row["ideal_seconds"] / row["seconds"]} for arm, row in rows.items()}
    out["per_pass_over_once"] = out["per_pass"]["seconds_per_step"] / out["once"]["seconds_per_step"]
    out["per_pass_over_once_at_equal_matmul_speed"] = (out["once"]["fraction_of_fp32_matmul"]
                                                       / out["per_pass"]["fraction_of_fp32_matmul"])
    out["step_arms"] = switch.arms[bench.WARMUP_STEPS:]
    out["step_seconds"] = timer.seconds[bench.WARMUP_STEPS:]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16, help="timed optimizer steps per recipe, both arms")
    parser.add_argument("--model", default=bench.MODEL, help="registry name, folder or hub id")
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    env.setup(bench.SEED)
    tokenizer = load_tokenizer(args.model)
    result = {"command": " ".join(["flock /tmp/ftnb-cpu.lock .venv/bin/python benchmarks/dequantize_once.py",
                                   *sys.argv[1:]]),
              "measured": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
              "machine": {"cpu_model": bench.cpu_model(), "cpus": os.cpu_count(),
                          "cpu_bf16_instructions": env.cpu_native_bf16(), "torch": torch.__version__},
              "recipes": {}}
    for name, build, dtype in [("01_ticket_classification", bench.classification_trainer, env.pick_dtype(cpu_bf16=True)),
                               ("02_domain_generation", bench.sft_trainer, torch.float32)]:
        result["recipes"][name] = row = {"dtype": str(dtype).removeprefix("torch."),
                                         **alternate(build, args.model, tokenizer, args.steps, dtype)}
        print(f"{name} ({row['dtype']}): {row['once']['seconds_per_step']:.2f} s/step de-quantized once, "
              f"{row['per_pass']['seconds_per_step']:.2f} per pass ({row['per_pass_over_once']:.2f}x; at equal "
              f"matmul speed {row['per_pass_over_once_at_equal_matmul_speed']:.2f}x); shares of the fp32 matmul "
              f"limit {row['once']['fraction_of_fp32_matmul']:.2f} and {row['per_pass']['fraction_of_fp32_matmul']:.2f}")
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("saved", args.out)


if __name__ == "__main__":
    main()
