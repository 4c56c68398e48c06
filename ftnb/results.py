"""Save what a notebook measured, so batch runs can be compared without opening notebooks.

Usage (last cell of a recipe):
    from ftnb.results import save_metrics
    save_metrics(output_dir, {"test_macro_f1": 0.81, ...})   # writes output_dir/metrics.json
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ftnb.memory import PROBES, ProbeTable, process_peak_rss_mib

TENSORBOARD_DIR = "tensorboard"  # inside a run folder: one subfolder of event files per training


def _jsonable(value):
    """numpy scalars, tensors and NaN become plain JSON values."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def save_metrics(output_dir: str | Path, metrics: dict, probes: ProbeTable | None = None) -> Path:
    """Merge `metrics`, the probe table and this process's peak resident memory so far
    (`process_peak_rss_mib`) into output_dir/metrics.json and return its path."""
    path = Path(output_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged.update(_jsonable(metrics))
    merged["probes"] = (PROBES if probes is None else probes).as_dicts()
    merged["process_peak_rss_mib"] = process_peak_rss_mib()
    path.write_text(json.dumps(merged, indent=2))
    return path


def load_metrics(output_dir: str | Path) -> dict:
    return json.loads((Path(output_dir) / "metrics.json").read_text())


def tensorboard_callback(output_dir: str | Path, name: str):
    """transformers' TensorBoard logger writing to <output_dir>/tensorboard/<name>: one folder per
    training of a run, so the curves of two trainings never mix; `read_scalars` reads them back.

    Usage: Trainer(..., callbacks=[tensorboard_callback(output_dir, "qlora")])
    """
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return TensorBoardCallback(SummaryWriter(str(Path(output_dir) / TENSORBOARD_DIR / name)))


def read_scalars(folder: str | Path):
    """Every scalar logged to TensorBoard under `folder` (a run folder, its tensorboard/ folder or a
    whole sweep), as a DataFrame with columns run (the event folder, relative to `folder`), tag, step,
    value. Reads the event files with TensorBoard's own reader; needs no TensorBoard server.

    Usage: curves = read_scalars(run_dir); curves[curves.tag == "train/loss"]
    """
    import pandas as pd
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    folder = Path(folder)
    rows = []
    for events_dir in sorted({f.parent for f in folder.rglob("events.out.tfevents.*")}):
        events = EventAccumulator(str(events_dir), size_guidance={SCALARS: 0})  # 0: keep every point
        events.Reload()
        run = events_dir.relative_to(folder).as_posix()
        rows += [{"run": run, "tag": tag, "step": e.step, "value": e.value}
                 for tag in events.Tags()[SCALARS] for e in events.Scalars(tag)]
    return pd.DataFrame(rows, columns=["run", "tag", "step", "value"])
