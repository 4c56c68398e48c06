"""Run a notebook with papermill, with named parameter presets and checked parameter names.

Usage:
    python -m ftnb run notebooks/00_quickstart.ipynb --preset smoke
    python -m ftnb run notebooks/01_ticket_classification.ipynb --preset cpu -p label_field priority
    from ftnb.runner import run_notebook; result = run_notebook("notebooks/00_quickstart.ipynb", "smoke")

Presets live in notebooks/presets.yaml: `<notebook stem>: {<preset>: {param: value}}`.
Every run writes `runs/<notebook>/<timestamp>-<preset>/` with the executed notebook and
metrics.json (what the notebook saved, plus the parameters, preset and wall time).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from ftnb.data import REPO_ROOT

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
PRESETS_FILE = NOTEBOOKS_DIR / "presets.yaml"
PRESET_NAMES = ("smoke", "cpu", "t4", "gpu")


class ParameterError(ValueError):
    """A parameter or preset that the notebook does not have."""


class NotebookFailed(RuntimeError):
    """A cell raised; the executed notebook (with the traceback) is kept at `output_notebook`."""

    def __init__(self, message: str, output_notebook: Path):
        super().__init__(message)
        self.output_notebook = output_notebook


@dataclass
class RunResult:
    run_dir: Path
    output_notebook: Path
    metrics: dict


def notebook_parameters(notebook: str | Path) -> dict[str, dict]:
    """The parameters declared in the notebook's `parameters` cell: name -> papermill info."""
    import papermill

    return papermill.inspect_notebook(str(notebook))


def presets_for(notebook: str | Path, presets_file: Path = PRESETS_FILE) -> dict[str, dict]:
    all_presets = yaml.safe_load(presets_file.read_text()) if presets_file.exists() else {}
    return all_presets.get(Path(notebook).stem, {}) or {}


def resolve_parameters(notebook: str | Path, preset: str | None = None,
                       overrides: dict | None = None, presets_file: Path = PRESETS_FILE) -> dict:
    """Preset values updated by explicit overrides, every name checked against the notebook.
    papermill itself only warns about unknown names, which silently runs the defaults."""
    declared = notebook_parameters(notebook)
    params: dict = {}
    if preset:
        available = presets_for(notebook, presets_file)
        if preset not in available:
            raise ParameterError(f"{Path(notebook).name} has no preset '{preset}'; "
                                 f"presets: {', '.join(available) or 'none'} (in {presets_file.name})")
        params.update(available[preset] or {})
    params.update(overrides or {})
    unknown = sorted(set(params) - set(declared))
    if unknown:
        listing = "\n".join(f"  {name} = {info['default']}  # {info.get('help') or info['inferred_type_name']}"
                            for name, info in declared.items())
        raise ParameterError(f"{Path(notebook).name} has no parameter(s) {', '.join(unknown)}. "
                             f"Its parameters are:\n{listing}")
    return params


def run_notebook(notebook: str | Path, preset: str | None = None, parameters: dict | None = None,
                 output_dir: str | Path | None = None, runs_root: str | Path = "runs",
                 cell_timeout: int | None = None, progress: bool = True) -> RunResult:
    """Execute `notebook` with papermill; return where the outputs went and its metrics."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    notebook = Path(notebook).resolve()
    if not notebook.exists():
        raise FileNotFoundError(f"no notebook {notebook}")
    params = resolve_parameters(notebook, preset, parameters)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(output_dir or Path(runs_root) / notebook.stem / f"{stamp}-{preset or 'default'}").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if "output_dir" in notebook_parameters(notebook):
        params.setdefault("output_dir", str(run_dir))
    output_notebook = run_dir / notebook.name
    start = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(notebook), str(output_notebook), parameters=params, kernel_name="python3",
            cwd=str(notebook.parent), progress_bar=progress, execution_timeout=cell_timeout)
    except PapermillExecutionError as e:
        raise NotebookFailed(
            f"{notebook.name} failed in cell [{e.exec_count}]: {e.ename}: {e.evalue}\n"
            f"cell source:\n{e.source}\nexecuted notebook kept at {output_notebook}",
            output_notebook) from None
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    metrics["run"] = {"notebook": str(notebook.relative_to(REPO_ROOT)) if notebook.is_relative_to(REPO_ROOT) else str(notebook),
                      "preset": preset, "parameters": params,
                      "seconds": round(time.perf_counter() - start, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    metrics_path.write_text(json.dumps(metrics, indent=2))
    return RunResult(run_dir, output_notebook, metrics)
