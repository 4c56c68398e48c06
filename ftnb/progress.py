"""Training progress that reaches whoever is watching: the notebook user or the batch runner.

Usage (one line per Trainer in a recipe):
    from ftnb import progress
    trainer = Trainer(..., callbacks=[memory_log, progress.callback()])

In Jupyter or Colab the Trainer draws its own progress bar (steps, elapsed, ETA, loss table);
recipes leave `disable_tqdm` at its default so that bar shows. Under `python -m ftnb run` the
runner sets FTNB_PROGRESS_FILE for the kernel; the callback then keeps a small JSON side file
(step, max_steps, epoch, loss, ETA) up to date, and the runner shows it on its own line:
    01_ticket_classification: cell 22/44 [03:10], train step 40/174 · loss 0.520 · ETA 6m
The saved notebook keeps the Trainer's bar as one display updated in place, not a redrawn console
bar. Outside a batch run the callback does nothing.
"""
from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

PROGRESS_FILE_ENV = "FTNB_PROGRESS_FILE"
WRITE_EVERY_SECONDS = 1.0  # a step can take milliseconds; the runner polls about once a second


def write_progress(path: str | Path, state: dict) -> None:
    """Replace the side file in one step, so a reader never sees half a file.

    Usage: write_progress("runs/x/progress.json", {"phase": "train", "step": 3, "max_steps": 10})
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(state))
    os.replace(partial, path)


def read_progress(path: str | Path) -> dict | None:
    """The side file's content, or None while there is none (no training started yet).

    Usage: state = read_progress(run_dir / "progress.json")
    """
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def format_duration(seconds: float) -> str:
    """45s, 6m, 1h 12m: as precise as an ETA deserves. Usage: format_duration(370) == '6m'"""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def describe(state: dict | None) -> str:
    """One short line for the runner; empty when no training is running.

    Usage: describe({"phase": "train", "step": 40, "max_steps": 174, "loss": 0.52, "eta_seconds": 370})
           == "train step 40/174 · loss 0.520 · ETA 6m"
    """
    if not state or state.get("phase") != "train":
        return ""
    parts = [f"train step {state['step']}/{state['max_steps']}"]
    if state.get("loss") is not None:
        parts.append(f"loss {state['loss']:.3f}")
    if state.get("eta_seconds") is not None:
        parts.append(f"ETA {format_duration(state['eta_seconds'])}")
    return " · ".join(parts)


def callback(path: str | Path | None = None):
    """A TrainerCallback that keeps the side file of a batch run (FTNB_PROGRESS_FILE, or `path`).

    Usage: Trainer(..., callbacks=[progress.callback()])
    """
    path = path or os.environ.get(PROGRESS_FILE_ENV)
    return _callback_class()(Path(path) if path else None)


@functools.cache
def _callback_class():
    # Built on first use: the runner imports this module for describe() and must not pay
    # for importing transformers (and torch) just to read a JSON file.
    from transformers import TrainerCallback

    class ProgressFileCallback(TrainerCallback):
        """Writes step, max_steps, epoch, last logged loss and ETA to `path` (None: does nothing)."""

        def __init__(self, path: Path | None):
            self.path = path
            self._last_write = 0.0
            self._started = 0.0
            self._first_step = 0
            self._loss = None

        def on_train_begin(self, args, state, control, **kwargs):
            self._started, self._first_step, self._loss = time.monotonic(), state.global_step, None
            self._write(state, "train", force=True)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self._loss = float(logs["loss"])

        def on_step_end(self, args, state, control, **kwargs):
            self._write(state, "train")

        def on_train_end(self, args, state, control, **kwargs):
            self._write(state, "done", force=True)

        def _write(self, state, phase: str, force: bool = False) -> None:
            now = time.monotonic()
            if self.path is None or (not force and now - self._last_write < WRITE_EVERY_SECONDS):
                return
            self._last_write = now
            elapsed = now - self._started
            done = state.global_step - self._first_step
            remaining = state.max_steps - state.global_step
            write_progress(self.path, {
                "phase": phase, "step": state.global_step, "max_steps": state.max_steps,
                "epoch": state.epoch, "loss": self._loss, "elapsed_seconds": round(elapsed, 1),
                "eta_seconds": round(elapsed / done * remaining, 1) if done else None})

    return ProgressFileCallback
