"""Sweeps: run a notebook once per combination of a parameter grid and seeds, one run folder each,
and collect every run's parameters and metrics in one table.

Usage:
    python -m ftnb sweep 01_ticket_classification --preset sweep --grid learning_rate=1e-4,3e-4,1e-3 \\
        --grid lora_r=4,16 --seeds 3 --jobs 1
    from ftnb.sweep import run_sweep
    table = run_sweep("01", "sweep", {"learning_rate": [1e-4, 1e-3]}, seeds=3)   # a pandas DataFrame

Each combination runs through `python -m ftnb run` (papermill, ftnb.runner) in its own folder
`<sweep folder>/<combination>/` with its run.json. A combination is identified by its resolved
parameters (preset, fixed values and grid values, typed as the notebook reads them), not by its
place in the grid: running the same sweep again runs only the combinations whose folder holds no
successful run, and a longer grid adds only its new combinations. An earlier attempt that did not
end well is moved to `<sweep folder>/attempts/` before its combination runs again (kept for its
error, never deleted). A failed run is recorded and the sweep goes on; Ctrl-C stops the sweep.
One sweep process per sweep folder at a time: `jobs` is how to run several of its runs at once.

The table `results.csv` has one row per combination of this sweep: its folder in the sweep folder
(`run`), status and error line, the swept values, the notebook's top-level scalar metrics and its
`summary` mapping (metrics.json), seconds, git commit, then every other parameter the run had. A
run is not re-run when only the notebook's code changed: the commit column shows a sweep that
spans such a change.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import queue
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

from ftnb.runner import (UsageError, _refuse_if_still_running, core_shares, find_notebook, read_run_record,
                         resolve_parameters, start_run)

RESULTS_TABLE = "results.csv"
ATTEMPTS_DIR = "attempts"
SUMMARY_KEY = "summary"  # metrics.json's mapping of headline numbers, each becomes a column
_UNSAFE = re.compile(r"[^\w.=+-]+")


@dataclass(frozen=True)
class Combination:
    """One run of a sweep: the grid values it sets and every parameter it runs with."""

    preset: str | None
    overrides: dict  # fixed and swept values as given (text from the command line is typed by the runner)
    swept: dict  # the grid's values for this run, seed included, typed
    parameters: dict  # preset, fixed and swept values, typed as the notebook reads them: the identity

    @property
    def key(self) -> str:
        """The run's folder name: the swept values to read (sorted: the grid's order does not matter),
        then a hash of all parameters, which identifies the run."""
        readable = _UNSAFE.sub("_", "-".join(f"{name}={value}" for name, value in sorted(self.swept.items())))[:80]
        digest = hashlib.sha1(json.dumps(self.parameters, sort_keys=True, default=str).encode()).hexdigest()[:8]
        return f"{readable}-{digest}" if readable else digest


def parse_grid_option(option: str) -> tuple[str, list]:
    """`name=v1,v2,...` from the command line into (name, [values]); values stay text for the
    runner to type ("1e-4" for a float parameter is 0.0001), brackets keep a list whole.

    Usage: parse_grid_option("target_modules=all-linear,[q_proj, v_proj]")
    """
    name, sep, values = option.partition("=")
    if not sep or not name.strip() or not values.strip():
        raise UsageError(f"--grid {option!r}: write NAME=VALUE1,VALUE2 (e.g. learning_rate=1e-4,3e-4)")
    try:
        parsed = yaml.safe_load(f"[{values}]")
    except yaml.YAMLError as e:
        raise UsageError(f"--grid {option!r}: unbalanced brackets or quotes ({e.problem})") from None
    return name.strip(), [value if isinstance(value, (list, dict)) else str(value) for value in parsed]


def read_grid_file(path: str | Path) -> dict[str, list]:
    """A YAML grid file: `{parameter: [values]}`.

    Usage: read_grid_file("grid.yaml")   # learning_rate: [1.0e-4, 3.0e-4]\\nlora_r: [4, 16]
    """
    try:
        grid = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"--grid-file {path}: {e}") from None
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise UsageError(f"{path}: a grid file maps each parameter to a non-empty list of values, "
                         "e.g. 'learning_rate: [1.0e-4, 3.0e-4]'")
    return grid


def expand_grid(grid: dict[str, list], seeds: int = 0) -> list[dict]:
    """Every combination of the grid's values, in grid order; with `seeds`, each one for seed 0..seeds-1.

    Usage: expand_grid({"lora_r": [4, 16]}, seeds=2) == [{"lora_r": 4, "seed": 0}, {"lora_r": 4, "seed": 1}, ...]
    """
    if seeds and "seed" in grid:
        raise UsageError("give seeds either as --seeds N or as a grid of 'seed', not both")
    axes = {**grid, **({"seed": list(range(seeds))} if seeds else {})}
    empty = [name for name, values in axes.items() if not values]
    if empty:
        raise UsageError(f"the grid gives no values for {', '.join(empty)}")
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def plan(notebook: str | Path, preset: str | None, grid: dict[str, list], seeds: int = 0,
         fixed: dict | None = None) -> list[Combination]:
    """The sweep's combinations, each checked against the notebook's parameters before anything runs
    (a wrong name or value is a UsageError). Combinations that resolve alike are kept once.

    Usage: plan("01_ticket_classification", "sweep", {"lora_r": ["4", "16"]}, seeds=3)
    """
    notebook = find_notebook(notebook)
    combinations: dict[str, Combination] = {}
    for swept in expand_grid(grid, seeds):
        overrides = {**(fixed or {}), **swept}
        parameters = resolve_parameters(notebook, preset, overrides)
        combination = Combination(preset, overrides, {name: parameters[name] for name in swept}, parameters)
        combinations.setdefault(combination.key, combination)
    return list(combinations.values())


def run_sweep(notebook: str | Path, preset: str | None, grid: dict[str, list], seeds: int = 0,
              fixed: dict | None = None, sweep_dir: str | Path | None = None, jobs: int = 1,
              cell_timeout: int | None = None, log=None):
    """Run every combination that has no successful run in `sweep_dir` yet, `jobs` at a time, then
    write and return the results table (a DataFrame, also `<sweep_dir>/results.csv`). Progress lines
    go to `log` (a file; default stdout).

    `sweep_dir` defaults to runs/sweeps/<notebook>-<preset>. With jobs > 1 each run is pinned to its
    share of the CPU cores (where the OS allows), so the runs do not fight over them.
    Usage: table = run_sweep("01", "sweep", {"learning_rate": ["1e-4", "1e-3"]}, seeds=2, jobs=2)
    """
    notebook = find_notebook(notebook)
    if jobs < 1:
        raise UsageError(f"--jobs {jobs}: run at least one at a time")
    combinations = plan(notebook, preset, grid, seeds, fixed)
    sweep_dir = Path(sweep_dir or Path("runs") / "sweeps" / f"{notebook.stem}-{preset or 'default'}").resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    todo = [c for c in combinations if _needs_run(sweep_dir / c.key)]
    at_once = max(1, min(jobs, len(todo)))  # fewer runs than jobs: each run keeps a larger share of the cores
    print(f"sweep {sweep_dir}: {len(combinations)} combinations, {len(combinations) - len(todo)} done before, "
          f"{len(todo)} to run, {at_once} at a time", file=log)
    cores = _core_slots(at_once)
    pool = ThreadPoolExecutor(max_workers=at_once)
    try:
        runs = [pool.submit(_run_one, notebook, c, sweep_dir, cores, cell_timeout, at_once == 1, log) for c in todo]
        for run in runs:
            run.result()  # a Ctrl-C in a run surfaces here and stops the sweep
    finally:
        pool.shutdown(cancel_futures=True)  # after Ctrl-C: no new run starts, the running ones end
    table = results_table(sweep_dir, combinations)
    table.to_csv(sweep_dir / RESULTS_TABLE, index=False)
    print(f"results: {sweep_dir / RESULTS_TABLE} ({table['status'].value_counts().to_dict()})", file=log)
    return table


def _needs_run(run_dir: Path) -> bool:
    """True unless the folder holds a successful run or one that is still going."""
    record = read_run_record(run_dir)
    if record is None or record.get("status") == "ok":
        return record is None
    try:
        _refuse_if_still_running(run_dir)
    except UsageError:
        return False  # another sweep process runs it now
    return True


def _set_aside(run_dir: Path) -> None:
    """Move an earlier attempt out of the way, so the new run's files are not mixed with it."""
    if not run_dir.exists():
        return
    attempts = run_dir.parent / ATTEMPTS_DIR
    attempts.mkdir(exist_ok=True)
    n = 1 + sum(1 for _ in attempts.glob(f"{run_dir.name}.*"))
    shutil.move(str(run_dir), attempts / f"{run_dir.name}.{n}")


def _core_slots(jobs: int) -> queue.Queue | None:
    """`jobs` disjoint sets of this process's cores, or None when runs keep all cores."""
    if jobs == 1:
        return None
    slots: queue.Queue = queue.Queue()  # a share is None where the OS cannot pin processes
    for share in core_shares(jobs):
        slots.put(share)
    return slots


def _run_options(combination: Combination, run_dir: Path, cell_timeout: int | None) -> list[str]:
    """`python -m ftnb run`'s options: the preset and every override written as the command line reads it back."""
    options = ["--output-dir", str(run_dir), "--force"]
    options += ["--preset", combination.preset] if combination.preset else []
    for name, value in combination.overrides.items():
        options += ["-p", name, value if isinstance(value, str) else json.dumps(value)]
    return options + (["--cell-timeout", str(cell_timeout)] if cell_timeout else [])


def _run_one(notebook: Path, combination: Combination, sweep_dir: Path, cores: queue.Queue | None,
             cell_timeout: int | None, show_progress: bool, log) -> None:
    """Run one combination in its own process; its run.json records how it ended."""
    run_dir = sweep_dir / combination.key
    _set_aside(run_dir)
    run_dir.mkdir()
    own_cores = cores.get() if cores else None
    try:
        # one run at a time shows the runner's progress line; several would garble each other's
        child = start_run(notebook, *_run_options(combination, run_dir, cell_timeout), log=run_dir / "sweep.log",
                          cores=own_cores, progress_to_terminal=show_progress)
        child.wait()
    finally:
        if own_cores:
            cores.put(own_cores)
    record = read_run_record(run_dir) or {}
    error = (record.get("error") or {}).get("message") or _last_line(run_dir / "sweep.log")
    line = "ok" if child.returncode == 0 else f"{record.get('status', 'failed')}: {error}"
    print(f"{combination.key}: {line} ({record.get('seconds')} s)", file=log)
    if record.get("status") == "interrupted":
        raise KeyboardInterrupt(f"{combination.key} was interrupted")


def _last_line(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return lines[-1] if lines else "no output"


def run_metrics(metrics: dict) -> dict:
    """The columns a run's metrics.json gives the table: its top-level numbers, flags and words,
    and everything in its `summary` mapping.

    Usage: run_metrics({"summary": {"test_macro_f1": 0.9}, "n": {}, "tokens": 3})  # {"tokens": 3, "test_macro_f1": 0.9}
    """
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
    return {**scalars, **(metrics.get(SUMMARY_KEY) or {})}


def results_table(sweep_dir: str | Path, combinations: list[Combination]):
    """One row per combination from its run folder (status "missing" where it never started).

    Usage: results_table("runs/sweeps/01_ticket_classification-sweep", plan("01", "sweep", grid))
    """
    import pandas as pd

    rows = []
    for combination in combinations:
        run_dir = Path(sweep_dir) / combination.key
        record = read_run_record(run_dir) or {}
        status, error = _run_status(run_dir, record)
        metrics_file = run_dir / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() and record.get("status") == "ok" else {}
        rest = {k: v for k, v in (record.get("parameters") or combination.parameters).items()
                if k not in combination.swept and k != "output_dir"}
        rows.append({"run": combination.key, "status": status,
                     **{k: _cell(v) for k, v in combination.swept.items()}, **run_metrics(metrics),
                     "error": error, "seconds": record.get("seconds"),
                     "commit": _commit(record), **{k: _cell(v) for k, v in rest.items()}})
    return pd.DataFrame(rows)


def _run_status(run_dir: Path, record: dict) -> tuple[str, str | None]:
    """(status, error line) of a run folder: its run.json's; "failed" with the last line the runner
    printed for a run that died before writing run.json; "missing" for one that never started."""
    if record:
        return record.get("status", "failed"), (record.get("error") or {}).get("message")
    if run_dir.exists():
        return "failed", _last_line(run_dir / "sweep.log")
    return "missing", None


def _commit(record: dict) -> str | None:
    """The code a run ran ("abc1234+" when files were changed): a sweep that spans an edit of the
    notebook shows it here, since a run is identified by its parameters, not by the code."""
    git = record.get("git") or {}
    return f"{git['commit']}{'+' if git.get('dirty') else ''}" if git.get("commit") else None


def _cell(value):
    """Lists and mappings as JSON text, so a CSV cell holds them whole."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value

