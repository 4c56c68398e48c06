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
import functools
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

import cpu_efficiency as bench
from ftnb import env
from ftnb.models import load_tokenizer, weights_dequantized_once

ARMS = ("per_pass", "once")


def arm_of(step: int) -> str:
    """The arm of optimizer step `step` (0, 1, 2, ...): per pass, once, once, per pass, per pass, once, ..."""
    return ARMS[(step + 1) // 2 % 2]


class AlternateDequantization(TrainerCallback):
    """Enters or leaves `weights_dequantized_once` between optimizer steps as `arm_of` orders them (added
    after the StepTimer, so outside its timed window); records the arm of each step."""

    def __init__(self):
        self.held, self.arms = None, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.arms.append(ARMS[self.held is not None])

    def on_step_end(self, args, state, control, model=None, **kwargs):
        following = arm_of(len(self.arms))
        if following == "once" and self.held is None:
            self.held = contextlib.ExitStack()
            self.held.enter_context(weights_dequantized_once(model))
        elif following == "per_pass" and self.held is not None:
            self.close()

    def close(self) -> None:
        if self.held is not None:
            self.held.close()
            self.held = None


def alternate(build, model_name: str, tokenizer, steps: int, dtype: torch.dtype) -> dict:
    """`steps` timed optimizer steps (after cpu_efficiency's warm-up), the arms alternating."""
    switch = AlternateDequantization()
    timed = bench.timed_steps(functools.partial(build, dequantize_per_pass=True), model_name, tokenizer, steps, dtype,
                              (torch.float32,), callbacks=(switch,))
    switch.close()
    arms = switch.arms[bench.WARMUP_STEPS:]
    out = {}
    for arm in ARMS:
        chosen = [k for k, step_arm in enumerate(arms) if step_arm == arm]
        out[arm] = {"timed_steps": len(chosen),
                    "seconds_per_step": sum(timed.seconds[k] for k in chosen) / len(chosen),
                    "fraction_of_fp32_matmul": timed.fraction(torch.float32, steps=chosen)}
    out["per_pass_over_once"] = out["per_pass"]["seconds_per_step"] / out["once"]["seconds_per_step"]
    out["per_pass_over_once_at_equal_matmul_speed"] = (out["once"]["fraction_of_fp32_matmul"]
                                                       / out["per_pass"]["fraction_of_fp32_matmul"])
    out["step_arms"] = arms
    out["step_seconds"] = timed.seconds
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
