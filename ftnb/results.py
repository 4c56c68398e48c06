"""Save what a notebook measured, so batch runs can be compared without opening notebooks.

Usage (last cell of a recipe):
    from ftnb.results import save_metrics
    save_metrics(output_dir, {"test_macro_f1": 0.81, ...})   # writes output_dir/metrics.json
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ftnb.memory import PROBES, ProbeTable


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
    """Merge `metrics` and the probe table into output_dir/metrics.json and return its path."""
    path = Path(output_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged.update(_jsonable(metrics))
    merged["probes"] = (PROBES if probes is None else probes).as_dicts()
    path.write_text(json.dumps(merged, indent=2))
    return path


def load_metrics(output_dir: str | Path) -> dict:
    return json.loads((Path(output_dir) / "metrics.json").read_text())
