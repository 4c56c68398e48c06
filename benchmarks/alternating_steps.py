"""CPU speed-ups of the recipes' training, each against the same training without it, step by step in one process.

`cpu_efficiency.py` times each speed-up undone in a run of its own, minutes away from the recipe's row, and
this machine's speed drifts by up to a third in between. Here one trainer per recipe and speed-up (01 at its cpu
setting, computing in bf16 where the CPU has bf16 instructions, else fp32; 02 in fp32 with every decoder layer
checkpointed, its cpu preset's setting in fp32, as in `cpu_efficiency.py`) alternates the two arms in pairs of
optimizer steps, without, with, with, without, ... (grouped by length, a step's batch tends to be shorter than
the one before; in this order both arms follow each other equally often), switching between steps, outside the
timed window (`cpu_efficiency.StepTimer` times each step and measures the fp32 matmul reference after it). In both
comparisons the two arms compute the same numbers bit for bit (`tests/test_models.py`, `tests/test_dropout.py`),
so nothing but the speed-up differs:
  dequantize_once: the 4-bit weights de-quantized once for training (`ftnb.models.weights_dequantized_once`)
                   against bitsandbytes de-quantizing them in every pass;
  uint8_masks:     the dropout masks converted to the compute dtype through uint8 (`ftnb.dropout`) against
                   multiplying by the bool mask, which torch converts one element at a time (both arms with the
                   adapters' dropout, 0.05, the notebooks' default; the cpu presets train without).
Reported per arm: seconds per step and the share of the fp32 matmul limit (`cpu_efficiency.py`'s measure,
which corrects each step for the reference measured right after it), and the ratio without / with of both.

Usage: flock /tmp/ftnb-cpu.lock .venv/bin/python benchmarks/alternating_steps.py --steps 16
       (writes benchmarks/alternating_steps.json; about 10-15 minutes on 2 cores)
       --model tiny-llama-test --steps 2 --out /tmp/check.json checks it in a minute
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable
from unittest import mock

import torch
from transformers import TrainerCallback

import cpu_efficiency as bench
from ftnb import dropout, env
from ftnb.models import load_tokenizer, weights_dequantized_once


@contextlib.contextmanager
def bool_masks(model):
    """FastDropout multiplying by its bool mask directly, as before `ftnb.dropout` converted it through uint8."""
    with mock.patch.object(dropout, "_keep_and_scale", lambda x, keep, scale: x.mul(keep).mul_(scale)):
        yield


@dataclasses.dataclass(frozen=True)
class Comparison:
    """A speed-up's two arms, (without, with): `build_options` build the trainer in one of them, and `switched`,
    entered on the trainer's model, puts it in the other, `switched_arm`."""
    arms: tuple[str, str]
    switched_arm: str
    switched: Callable[[torch.nn.Module], contextlib.AbstractContextManager]
    build_options: dict

    def arm(self, switched: bool) -> str:
        """The arm a step runs in, with the switch entered or not."""
        return self.switched_arm if switched else next(a for a in self.arms if a != self.switched_arm)


COMPARISONS = {
    "dequantize_once": Comparison(("per_pass", "once"), "once", weights_dequantized_once, {"dequantize_per_pass": True}),
    # the masks exist only with the adapters' dropout, which both cpu presets leave out: on for this comparison
    "uint8_masks": Comparison(("bool_masks", "uint8_masks"), "bool_masks", bool_masks, {"adapter_dropout": True}),
}


def arm_index(step: int) -> int:
    """The arm of optimizer step `step` (0, 1, 2, ...): without, with, with, without, without, with, ..."""
    return (step + 1) // 2 % 2


class Alternate(TrainerCallback):
    """Enters or leaves a comparison's switched arm between optimizer steps as `arm_index` orders them (added
    after the StepTimer, so outside its timed window); records the arm of each step."""

    def __init__(self, comparison: Comparison):
        self.comparison, self.held, self.arms = comparison, None, []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._switch_to(self.comparison.arms[arm_index(0)], model)

    def on_step_begin(self, args, state, control, **kwargs):
        self.arms.append(self.comparison.arm(switched=self.held is not None))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._switch_to(self.comparison.arms[arm_index(len(self.arms))], model)

    def _switch_to(self, arm: str, model) -> None:
        if arm == self.comparison.switched_arm and self.held is None:
            self.held = contextlib.ExitStack()
            self.held.enter_context(self.comparison.switched(model))
        elif arm != self.comparison.switched_arm:
            self.close()

    def close(self) -> None:
        if self.held is not None:
            self.held.close()
            self.held = None


def alternate(comparison: Comparison, build, model_name: str, tokenizer, steps: int, dtype: torch.dtype) -> dict:
    """`steps` timed optimizer steps (after cpu_efficiency's warm-up), the comparison's arms alternating."""
    switch = Alternate(comparison)
    timed = bench.timed_steps(functools.partial(build, **comparison.build_options), model_name, tokenizer, steps,
                              dtype, (torch.float32,), callbacks=(switch,))
    switch.close()
    arms = switch.arms[bench.WARMUP_STEPS:]
    out = {}
    for arm in comparison.arms:
        chosen = [k for k, step_arm in enumerate(arms) if step_arm == arm]
        out[arm] = {"timed_steps": len(chosen),
                    "seconds_per_step": sum(timed.seconds[k] for k in chosen) / len(chosen),
                    "fraction_of_fp32_matmul": timed.fraction(torch.float32, steps=chosen)}
    without, with_ = (out[arm] for arm in comparison.arms)
    out["without_over_with"] = without["seconds_per_step"] / with_["seconds_per_step"]
    out["without_over_with_at_equal_matmul_speed"] = with_["fraction_of_fp32_matmul"] / without["fraction_of_fp32_matmul"]
    out["step_arms"] = arms
    out["step_seconds"] = timed.seconds
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16, help="timed optimizer steps per recipe and speed-up, both arms")
    parser.add_argument("--model", default=bench.MODEL, help="registry name, folder or hub id")
    parser.add_argument("--only", nargs="+", choices=sorted(COMPARISONS), default=list(COMPARISONS))
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    env.setup(bench.SEED)
    tokenizer = load_tokenizer(args.model)
    result = {"command": " ".join(["flock /tmp/ftnb-cpu.lock .venv/bin/python benchmarks/alternating_steps.py",
                                   *sys.argv[1:]]),
              "measured": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
              "machine": bench.machine(),
              "comparisons": {}}
    recipes = [("01_ticket_classification", bench.classification_trainer, env.pick_dtype(cpu_bf16=True)),
               ("02_domain_generation", bench.sft_trainer, torch.float32)]
    for speed_up in args.only:
        comparison = COMPARISONS[speed_up]
        rows = result["comparisons"][speed_up] = {}
        for name, build, dtype in recipes:
            rows[name] = row = {"dtype": str(dtype).removeprefix("torch."),
                                **alternate(comparison, build, args.model, tokenizer, args.steps, dtype)}
            without, with_ = (row[arm] for arm in comparison.arms)
            print(f"{speed_up}, {name} ({row['dtype']}): {with_['seconds_per_step']:.2f} s/step {comparison.arms[1]}, "
                  f"{without['seconds_per_step']:.2f} {comparison.arms[0]} ({row['without_over_with']:.2f}x; at equal "
                  f"matmul speed {row['without_over_with_at_equal_matmul_speed']:.2f}x); shares of the fp32 matmul "
                  f"limit {with_['fraction_of_fp32_matmul']:.2f} and {without['fraction_of_fp32_matmul']:.2f}")
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("saved", args.out)


if __name__ == "__main__":
    main()
