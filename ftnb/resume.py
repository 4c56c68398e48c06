"""Resuming a Trainer run exactly: the newest checkpoint that was written to the end, and the data
order of the epoch a run resumes in.

Usage:
    from ftnb import resume
    trainer = Trainer(..., callbacks=[resume.data_order_callback()])
    trainer.train(resume_from_checkpoint=resume.last_checkpoint(args.output_dir) if resuming else None)

A Trainer checkpoint holds the adapter and head, optimizer, scheduler, the random generators at the
checkpoint's step and the global step (from which the Trainer skips the batches already used). What it
lacks is how the epoch was shuffled: with `train_sampling_strategy="group_by_length"` the sampler draws
its permutation from torch's global generator when the epoch begins, so the order of the second epoch
depends on every random draw of the first (dropout). `data_order_callback` records the generator when
each epoch begins, stores it in the checkpoint (trainer_state.json), and after a resume puts it back
just before the resumed epoch shuffles. In a run that is not resumed it only reads the generator.
"""
from __future__ import annotations

import base64
import functools
import re
from pathlib import Path

# the Trainer writes trainer_state.json last, after weights, optimizer, scheduler and random states
_WRITTEN_LAST = "trainer_state.json"


def last_checkpoint(checkpoints_dir: str | Path) -> str | None:
    """The newest Trainer checkpoint in `checkpoints_dir` that was written to the end, or None.
    A kill during a save leaves a folder without trainer_state.json: that one is passed over.

    Usage: trainer.train(resume_from_checkpoint=last_checkpoint(args.output_dir))
    """
    folder = Path(checkpoints_dir)
    complete = [c for c in folder.glob("checkpoint-*")
                if re.fullmatch(r"checkpoint-\d+", c.name) and (c / _WRITTEN_LAST).exists()] if folder.is_dir() else []
    return str(max(complete, key=lambda c: int(c.name.split("-")[1]))) if complete else None


def checkpoint_step(checkpoint: str | Path | None) -> int:
    """The optimizer step a checkpoint folder was saved at; -1 for None. Usage: checkpoint_step(last_checkpoint(d))"""
    return int(Path(checkpoint).name.split("-")[1]) if checkpoint else -1


def largest_difference(state_a, state_b) -> float:
    """The largest absolute difference between two states made of tensors: a safetensors file's dict, or
    an optimizer's state nested to any depth (bitsandbytes keeps its 8-bit moments and their block scales
    one level down). Both must hold the same tensors under the same keys; 0.0 means bit for bit.

    Usage: largest_difference(torch.load(a / "optimizer.pt"), torch.load(b / "optimizer.pt"))
    """
    a, b = _tensors_in(state_a), _tensors_in(state_b)
    if a.keys() != b.keys() or not a:
        raise ValueError(f"the two states hold different tensors ({len(a)} and {len(b)}; "
                         f"only in one: {sorted(map(str, a.keys() ^ b.keys()))[:5]})")
    return max((a[path].float() - b[path].float()).abs().max().item() for path in a)


def _tensors_in(state, path: tuple = ()) -> dict:
    """Every tensor in a nested state, by its path of keys."""
    import torch  # here, not at the top: the runner imports this module and must not load torch

    if torch.is_tensor(state):
        return {path: state}
    if isinstance(state, dict):
        return {found: t for key, value in state.items() for found, t in _tensors_in(value, (*path, key)).items()}
    return {}


def data_order_callback():
    """A TrainerCallback that makes a resumed epoch see its batches in the uninterrupted run's order.

    Usage: Trainer(..., callbacks=[resume.data_order_callback()])
    """
    return _callback_class()()


@functools.cache
def _callback_class():
    # built on first use: the runner imports last_checkpoint and must not import torch for it
    import torch
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    def encode(state: torch.Tensor) -> str:
        return base64.b64encode(state.numpy().tobytes()).decode()

    def decode(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    class DataOrderCallback(TrainerCallback, ExportableState):
        """Records torch's CPU generator at each epoch's start; saved with every checkpoint."""

        def __init__(self):
            self.epoch_start_rng: str | None = None  # the generator when the current epoch began
            self._to_restore: str | None = None

        def state(self) -> dict:
            return {"args": {}, "attributes": {"epoch_start_rng": self.epoch_start_rng}}

        def on_train_begin(self, args, state, control, **kwargs):
            if state.global_step == 0:
                return  # a fresh run: nothing to restore
            name = type(self).__name__
            saved = state.stateful_callbacks.setdefault(name, self.state())  # absent in an older checkpoint
            self._to_restore = saved.get("attributes", {}).get("epoch_start_rng")

        def on_epoch_begin(self, args, state, control, **kwargs):
            if self._to_restore is not None:  # the resumed epoch: shuffle as the interrupted run did
                torch.set_rng_state(decode(self._to_restore))
                self._to_restore = None
            self.epoch_start_rng = encode(torch.get_rng_state())

    return DataOrderCallback
