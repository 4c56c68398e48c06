"""Run a notebook with papermill: checked, typed parameters, one folder and one run record per run.

Usage:
    python -m ftnb run 00_quickstart --preset smoke -p learning_rate 1e-3
    python -m ftnb run notebooks/01_ticket_classification.ipynb --preset cpu -p label_field priority
    python -m ftnb run 01_ticket_classification --resume runs/01_ticket_classification/20261202-070000-cpu
    from ftnb.runner import run_notebook; result = run_notebook("00_quickstart", "smoke")

Presets live in notebooks/presets.yaml: `<notebook stem>: {<preset>: {param: value}}`.
Every run gets a new folder `runs/<notebook>/<timestamp>-<preset>[-N]/` holding the executed
notebook, the notebook's own metrics.json, progress.json while training runs, and run.json: the run
record (status, exit code, times, git commit, preset, every effective parameter, versions). run.json
is written when the run starts and rewritten when it ends, however it ends; it is the source of
truth for a run's status. Exit codes, also stored in run.json: see EXIT_CODES.

A run that stopped (a dead kernel, a lost Colab runtime, Ctrl-C) continues with `resume=RUN_DIR`:
the notebook runs again in the same folder with the parameters run.json recorded and its
`resume` parameter set to True, so that it picks up its own checkpoints there. Nothing is deleted:
the earlier executed notebook is kept as `<notebook>.attempt-N.ipynb`, run.json lists every attempt.
"""
from __future__ import annotations

import ast
import contextlib
import datetime
import importlib.metadata
import io
import itertools
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
import tokenize
from dataclasses import dataclass
from pathlib import Path

import yaml

from ftnb.progress import PROGRESS_FILE_ENV, describe, read_progress
from ftnb.resume import checkpoint_step, last_checkpoint
from ftnb.data import REPO_ROOT

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
PRESETS_FILE = NOTEBOOKS_DIR / "presets.yaml"
PRESET_NAMES = ("smoke", "cpu", "t4", "gpu")
RUN_RECORD = "run.json"
PROGRESS_FILE = "progress.json"
RESUME_PARAMETER = "resume"  # the flag a notebook declares when it can continue from its checkpoints
# Files an earlier run left that must not be mistaken for the new run's (removed by force=True).
RUN_FILES = ("metrics.json", RUN_RECORD, PROGRESS_FILE)
EXIT_CODES = {"ok": 0, "cell_error": 1, "runner_error": 1, "usage": 2, "dead_kernel": 3, "cell_timeout": 4,
              "interrupted": 130, "terminated": 143}  # 128 + SIGINT, 128 + SIGTERM: the shell's convention
VERSIONS_RECORDED = ("torch", "transformers", "peft", "trl", "bitsandbytes", "papermill")
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               list: "a list such as [a, b]", dict: "a mapping such as {a: 1}"}


class UsageError(ValueError):
    """Input the user can fix (notebook name, parameter, value, output folder): exit code 2."""

    exit_code = EXIT_CODES["usage"]


class ParameterError(UsageError):
    """A parameter, preset or value that the notebook does not accept."""


class _RunEnded:
    """What the caller needs after a run that did not finish: one-line reason, where its files are."""

    def __init__(self, message: str, reason: str, run_dir: Path, output_notebook: Path):
        super().__init__(message)
        self.reason, self.exit_code = reason, EXIT_CODES[reason]
        self.run_dir, self.output_notebook = run_dir, output_notebook


class NotebookFailed(_RunEnded, RuntimeError):
    """A cell raised, the kernel died or a cell ran out of time; the partial notebook is kept."""


class RunInterrupted(_RunEnded, KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the run; a KeyboardInterrupt, so a loop of runs stops too."""


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is, so that the same clean-up as for Ctrl-C happens."""


@dataclass
class RunResult:
    run_dir: Path
    output_notebook: Path
    metrics: dict  # what the notebook saved in metrics.json
    record: dict  # run.json


@dataclass(frozen=True)
class Parameter:
    """A name in a notebook's parameters cell, with the type its default implies."""

    name: str
    default: object  # the literal value, or the source text when the default is an expression
    kind: type | None  # type(default); None accepts anything (a None default, an expression)
    accepts_list: bool  # a string parameter whose comment says it also takes a list
    help: str

    def describe_kind(self) -> str:
        if self.kind is None:
            return "any value"
        return "a string or a list" if self.accepts_list else _TYPE_NAMES.get(self.kind, self.kind.__name__)

    def check(self, value, source: str):
        """`value` as the notebook should receive it; a string is read as on the command line.
        Raises ParameterError naming `source`, the value and the expected type.

        Usage: Parameter("lr", 2e-3, float, False, "").check("1e-3", "-p lr") == 0.001
        """
        typed = self._read(value) if isinstance(value, str) else value
        if not self._accepts(typed):
            raise ParameterError(f"{source}: {self.name} = {value!r} is not {self.describe_kind()} "
                                 f"(the notebook's default: {self.default!r})")
        return typed

    def _read(self, text: str):
        if self.kind is str and not (self.accepts_list and text.lstrip().startswith("[")):
            return text  # a model id, a path, "none": as written
        if self.kind is bool:
            return {"true": True, "false": False}.get(text.lower(), text)
        # numbers as Python reads them (YAML 1.1 leaves `1e-3` a string), the rest as YAML
        for number in (int, float):
            with contextlib.suppress(ValueError):
                return number(text)
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:  # "[a": text only where any value will do
            return text if self.kind is None else None

    def _accepts(self, value) -> bool:
        if self.kind is None or (self.accepts_list and isinstance(value, list)):
            return True
        if isinstance(value, bool) or self.kind is bool:  # bool is an int in Python; not here
            return isinstance(value, bool) and self.kind is bool
        if self.kind is float:
            return isinstance(value, (int, float))  # an int stays an int: eval_steps 2 (steps) is not 2.0
        return isinstance(value, self.kind)


def notebook_parameters(notebook: str | Path) -> dict[str, dict]:
    """The parameters declared in the notebook's `parameters` cell: name -> {default: its source text, help:
    its comment}. Read with Python's own parser: papermill's skips a line whose comment holds " = " (as in
    `lora_alpha = 32  # scale = alpha / r`), and the parameter would then be unknown.

    Usage: notebook_parameters("notebooks/00_quickstart.ipynb")["learning_rate"]["default"]  # '2e-3'
    """
    import nbformat

    cells = [cell for cell in nbformat.read(str(notebook), as_version=4).cells
             if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", [])]
    if not cells:
        return {}
    source = cells[0].source
    try:
        tree = ast.parse(source)
    except SyntaxError as error:
        raise ParameterError(f"{notebook}: line {error.lineno} of its parameters cell is not plain Python "
                             f"({error.msg}): keep that cell to `name = value  # help` lines") from None
    comments = {token.start[0]: token.string.lstrip("#").strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}
    declared = {}
    for node in tree.body:  # `name = value` and `name: type = value`; anything else declares nothing
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if len(targets) == 1 and isinstance(targets[0], ast.Name) and getattr(node, "value", None) is not None:
            help_lines = [comments[line] for line in range(node.lineno, node.end_lineno + 1) if line in comments]
            declared[targets[0].id] = {"default": ast.get_source_segment(source, node.value),
                                       "help": " ".join(help_lines)}
    return declared


def typed_parameters(notebook: str | Path) -> dict[str, Parameter]:
    """The notebook's parameters with their default values and the type each one accepts.

    Usage: typed_parameters("notebooks/00_quickstart.ipynb")["learning_rate"].check("1e-3", "-p")
    """
    typed = {}
    for name, info in notebook_parameters(notebook).items():
        help_text = info.get("help") or ""
        try:
            default = ast.literal_eval(info["default"])
            kind = None if default is None else type(default)
        except (ValueError, SyntaxError):
            default, kind = info["default"], None
        accepts_list = kind is str and re.search(r"\blist\b", help_text) is not None
        typed[name] = Parameter(name, default, kind, accepts_list, help_text)
    return typed


def presets_for(notebook: str | Path, presets_file: Path | None = None) -> dict[str, dict]:
    """The notebook's presets, from presets.yaml beside it unless `presets_file` says otherwise."""
    presets_file = presets_file or Path(notebook).parent / PRESETS_FILE.name
    all_presets = yaml.safe_load(presets_file.read_text()) if presets_file.exists() else {}
    return all_presets.get(Path(notebook).stem, {}) or {}


def resolve_parameters(notebook: str | Path, preset: str | None = None,
                       overrides: dict | None = None, presets_file: Path | None = None) -> dict:
    """Preset values updated by explicit overrides, each name and value checked against the
    notebook (papermill itself only warns about unknown names and passes values untyped).
    String overrides are read as on the command line: "1e-3" for a float parameter is 0.001.

    Usage: resolve_parameters("notebooks/00_quickstart.ipynb", "smoke", {"lora_r": "16"})
    """
    declared = typed_parameters(notebook)
    presets_file = presets_file or Path(notebook).parent / PRESETS_FILE.name
    chosen: dict[str, tuple[object, str]] = {}
    if preset:
        available = presets_for(notebook, presets_file)
        if preset not in available:
            raise ParameterError(f"{Path(notebook).name} has no preset '{preset}'; "
                                 f"presets: {', '.join(available) or 'none'} (in {presets_file.name})")
        chosen.update({name: (value, f"preset '{preset}' in {presets_file.name}")
                       for name, value in (available[preset] or {}).items()})
    chosen.update({name: (value, f"-p {name}") for name, value in (overrides or {}).items()})
    unknown = sorted(set(chosen) - set(declared))
    if unknown:
        listing = "\n".join(f"  {p.name} = {p.default!r}  # {p.help or p.describe_kind()}"
                            for p in declared.values())
        raise ParameterError(f"{Path(notebook).name} has no parameter(s) {', '.join(unknown)}. "
                             f"Its parameters are:\n{listing}")
    if "output_dir" in chosen:
        raise ParameterError(f"{chosen['output_dir'][1]}: output_dir is the run folder the runner creates; "
                             "choose it with --output-dir (run_notebook(output_dir=...) in Python)")
    return {name: declared[name].check(value, source) for name, (value, source) in chosen.items()}


def find_notebook(name: str | Path, notebooks_dir: Path = NOTEBOOKS_DIR) -> Path:
    """A path to a notebook, or the name of one in notebooks/: file name, stem or a unique prefix.

    Usage: find_notebook("00_quickstart"), find_notebook("01"), find_notebook("notebooks/03_quantization.ipynb")
    """
    path = Path(name)
    if path.is_file():
        return path.resolve()
    available = sorted(notebooks_dir.glob("*.ipynb"))
    stem = path.name.removesuffix(".ipynb")
    matches = [nb for nb in available if nb.stem == stem] or [nb for nb in available if nb.stem.startswith(stem)]
    if len(matches) == 1:
        return matches[0].resolve()
    what = "matches several notebooks" if matches else "is not a notebook file or name"
    raise UsageError(f"'{name}' {what}; notebooks: {', '.join(nb.stem for nb in matches or available)}")


def _new_run_dir(notebook: Path, preset: str | None, output_dir: str | Path | None,
                 runs_root: str | Path, force: bool) -> Path:
    """A folder no other run uses: created here (mkdir is atomic), or an explicit one that is empty."""
    if output_dir is not None:
        run_dir = Path(output_dir).resolve()
        if run_dir.exists() and not run_dir.is_dir():
            raise UsageError(f"--output-dir {run_dir} is a file")
        if run_dir.exists() and any(run_dir.iterdir()):
            if not force:
                raise UsageError(f"--output-dir {run_dir} is not empty (an earlier run?); choose a new folder, "
                                 "leave --output-dir out for a fresh one under runs/, or add --force to reuse it")
            _refuse_if_still_running(run_dir)
            for leftover in (*RUN_FILES, notebook.name):
                (run_dir / leftover).unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir
    parent = Path(runs_root).resolve() / notebook.stem
    parent.mkdir(parents=True, exist_ok=True)
    base = f"{time.strftime('%Y%m%d-%H%M%S')}-{preset or 'default'}"
    for n in itertools.count(1):
        run_dir = parent / (base if n == 1 else f"{base}-{n}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:  # another run started in the same second
            continue


def _refuse_if_still_running(run_dir: Path) -> None:
    """--force must not pull the folder from under a run that is still writing to it."""
    record = read_run_record(run_dir) or {}
    pid = record.get("pid")
    if record.get("status") != "running" or record.get("host") != platform.node() or not pid:
        return
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return  # the run died without ending its record (kill -9): its folder is free
    except PermissionError:
        pass  # exists, owned by someone else
    raise UsageError(f"{run_dir} belongs to a run that is still going (process {pid}); "
                     "wait for it, stop it, or choose another folder")


def core_shares(parts: int) -> list[set[int] | None]:
    """This process's CPU cores split into `parts` disjoint sets, to run that many processes side by side
    without fighting over cores (two runs with a thread per core each on the same cores can run many times
    slower, each waiting on threads the other has descheduled); a part gets every core when there are fewer
    cores than parts. [None] * parts where the OS cannot pin processes (not Linux).

    Usage: mine, theirs = core_shares(2); start_run("01", "--preset", "smoke", log=Path("a.log"), cores=mine)
    """
    if not hasattr(os, "sched_setaffinity"):
        return [None] * parts
    available = sorted(os.sched_getaffinity(0))
    return [set(available[i * len(available) // parts:(i + 1) * len(available) // parts] or available)
            for i in range(parts)]


def start_run(notebook: str | Path, *options: str, log: Path, cores: set[int] | None = None,
              progress_to_terminal: bool = False) -> subprocess.Popen:
    """`python -m ftnb run NOTEBOOK OPTIONS...` in the background, its output appended to `log` (a pipe nobody
    reads could fill up and stall it), pinned to `cores` where given: its kernel inherits them and
    ftnb.env.setup gives torch a thread per core, so runs pinned to shares of the same size compute alike.
    `progress_to_terminal` leaves its stderr (the progress line) on this process's terminal instead.

    Usage: run = start_run("01", "--preset", "smoke", "--output-dir", "out", log=Path("out.log")); run.wait()
    """
    with open(log, "a") as output:  # the child keeps its own copy of the file
        run = subprocess.Popen([sys.executable, "-m", "ftnb", "run", str(notebook), *options],
                               stdout=output, stderr=None if progress_to_terminal else subprocess.STDOUT)
    if cores:  # before its kernel starts: the runner imports for a second first
        os.sched_setaffinity(run.pid, cores)
    return run


def kill_kernel_at_checkpoint(run: subprocess.Popen, checkpoints_dir: str | Path, step: int,
                              timeout: float = 600) -> int:
    """A lost runtime, for real: wait until `checkpoints_dir` holds a complete checkpoint at `step` or
    later, then SIGKILL the notebook's kernel (a child of `run`, a `python -m ftnb run` process) and
    wait for the run to end. Returns the step of the newest complete checkpoint left. For the
    demonstration in recipe 08 and the tests; raises RuntimeError if the run ends first.

    Usage: step = kill_kernel_at_checkpoint(subprocess.Popen([... "ftnb", "run", ...]), run_dir / "checkpoints", 8)
    """
    import psutil

    def newest() -> int:
        return checkpoint_step(last_checkpoint(checkpoints_dir))

    deadline = time.monotonic() + timeout
    while newest() < step:
        if run.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the run {'ended' if run.poll() is not None else 'wrote no checkpoint'} "
                               f"before checkpoint {step} (newest: {newest()})")
        time.sleep(0.01)  # a tiny model's step takes tens of milliseconds
    kernels = [child for child in psutil.Process(run.pid).children(recursive=True)
               if any("ipykernel" in part for part in child.cmdline())]
    if not kernels:
        raise RuntimeError(f"process {run.pid} has no notebook kernel to kill: is it a `python -m ftnb run`?")
    for kernel in kernels:
        kernel.send_signal(signal.SIGKILL)
    run.wait()
    return newest()


def read_run_record(run_dir: str | Path) -> dict | None:
    """A run folder's run.json, or None where there is none (not a run folder, or an older run).

    Usage: record = read_run_record("runs/00_quickstart/20261130-101500-cpu"); record["status"]
    """
    try:
        return json.loads((Path(run_dir) / RUN_RECORD).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def git_commit(repo: Path = REPO_ROOT) -> dict | None:
    """{"commit": short sha, "dirty": tracked files changed}; None outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    try:
        return {"commit": git("rev-parse", "--short", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict:
    found = {"python": platform.python_version()}
    for package in VERSIONS_RECORDED:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[package] = importlib.metadata.version(package)  # metadata only: importing torch costs seconds
    return found


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _write_json(path: Path, data: dict) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(data, indent=2, default=str))
    os.replace(partial, path)  # a reader (a sweep) never sees half a record


def _display_path(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


class _CellTracker:
    """Which code cell runs (for messages), drawn as a progress line with the side file's news."""

    def __init__(self, title: str, progress_file: Path, show: bool):
        self.title, self.progress_file, self.show = title, progress_file, show
        self.cell, self.bar = 0, None
        self._stop = threading.Event()

    def notebook_started(self, notebook, **_) -> None:  # nbclient hook: the parameterized notebook
        if not self.show:
            return
        from tqdm.auto import tqdm

        total = sum(c.cell_type == "code" and bool(c.source.strip()) for c in notebook.cells)
        self.bar = tqdm(total=total, desc=self.title, bar_format="{desc}: cell {n}/{total} [{elapsed}]{postfix}")
        threading.Thread(target=self._poll, daemon=True).start()

    def cell_started(self, **_) -> None:  # nbclient hook, code cells only
        self.cell += 1
        if self.bar is not None:
            self.bar.update(1)

    def _poll(self) -> None:
        shown = ""
        while not self._stop.wait(1.0):
            line = describe(read_progress(self.progress_file))
            if line != shown:
                self.bar.set_postfix_str(line)
                shown = line

    def close(self) -> None:
        self._stop.set()
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def _kernel_env(name: str, value: str):
    """The kernel inherits this process's environment when papermill starts it."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a job scheduler, `kill`) ends the run like Ctrl-C: record written, kernel stopped."""
    def terminate(signum, frame):
        raise _Terminated()
    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread: leave signals to whoever owns them
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _ending(error: BaseException, notebook: Path, cell: int, cell_timeout: int | None) -> tuple[str, str] | None:
    """(reason, one-line message) for a run the notebook ended early; None when the runner itself failed."""
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    where = f"in cell [{cell}]" if cell else "before the first cell"
    if isinstance(error, PapermillExecutionError):
        return "cell_error", f"{notebook.name} failed in cell [{error.exec_count}]: {error.ename}: {error.evalue}"
    if isinstance(error, DeadKernelError):
        return "dead_kernel", (f"{notebook.name}: the kernel died {where} (killed from outside, "
                               "most often for lack of memory: try a smaller batch or max_length)")
    if isinstance(error, CellTimeoutError):
        return "cell_timeout", f"{notebook.name}: cell [{cell}] ran longer than the cell timeout ({cell_timeout} s)"
    if isinstance(error, _Terminated):
        return "terminated", f"{notebook.name}: stopped by SIGTERM {where}"
    if isinstance(error, KeyboardInterrupt):
        return "interrupted", f"{notebook.name}: interrupted (Ctrl-C) {where}"
    return None


def _cell_source(error: BaseException) -> str:
    """The failing cell's code, indented, for a cell error's message (empty for other endings)."""
    source = getattr(error, "source", None)
    return "\n  cell source:\n" + "\n".join(f"    {line}" for line in source.splitlines()) if source else ""


def run_notebook(notebook: str | Path, preset: str | None = None, parameters: dict | None = None,
                 output_dir: str | Path | None = None, runs_root: str | Path = "runs",
                 cell_timeout: int | None = None, progress: bool = True, force: bool = False,
                 resume: str | Path | None = None) -> RunResult:
    """Execute a notebook (a path or a name in notebooks/) with papermill in a new run folder.

    Raises UsageError for input to fix (nothing has run), NotebookFailed when the notebook stopped
    early and RunInterrupted on Ctrl-C/SIGTERM; each carries exit_code, run_dir and output_notebook,
    and run.json says the same. Parameters given as strings are read as on the command line.
    `output_dir` must be new or empty unless `force` (which deletes an earlier run's metrics.json,
    run.json and progress.json there). `resume` (a run folder of this notebook that did not finish)
    runs the notebook again there with the recorded parameters and resume=True; no other parameter,
    preset or folder may be given with it. Run one at a time per process: the kernel gets the run's
    progress file through this process's environment.

    Usage: result = run_notebook("00_quickstart", "smoke", {"max_steps": 4}); result.metrics["..."]
    """
    notebook = find_notebook(notebook)
    declared = typed_parameters(notebook)
    attempts = []
    if resume is None:
        params = resolve_parameters(notebook, preset, parameters)
        run_dir = _new_run_dir(notebook, preset, output_dir, runs_root, force)
    else:
        if preset or parameters or output_dir is not None or force:
            raise UsageError("--resume runs again with the parameters and folder the run recorded: "
                             "leave out --preset, -p, --output-dir and --force")
        run_dir, previous = _resumable_run(notebook, resume, declared)
        preset, parameters = previous.get("preset"), previous.get("overrides")
        params = _recorded_parameters(previous, declared)
        attempts = _keep_earlier_attempt(run_dir, notebook, previous)
    if "output_dir" in declared:
        params["output_dir"] = str(run_dir)
    output_notebook, record_path = run_dir / notebook.name, run_dir / RUN_RECORD
    record = {"status": "running", "exit_code": None, "error": None,
              "notebook": _display_path(notebook), "executed_notebook": str(output_notebook),
              "preset": preset, "parameters": {**{p.name: p.default for p in declared.values()}, **params},
              "overrides": dict(parameters or {}), "started": _now(), "ended": None, "seconds": None,
              "git": git_commit(), "versions": _versions(), "host": platform.node(), "pid": os.getpid(),
              **({"attempts": attempts} if attempts else {})}
    _write_json(record_path, record)
    if progress:
        print(f"run folder: {run_dir}", file=sys.stderr)  # known now, not only after a long run
    tracker = _CellTracker(notebook.stem, run_dir / PROGRESS_FILE, progress)
    start = time.perf_counter()
    try:
        with _sigterm_as_interrupt(), _kernel_env(PROGRESS_FILE_ENV, str(run_dir / PROGRESS_FILE)):
            _execute(notebook, output_notebook, params, cell_timeout, tracker)
        record.update(status="ok", exit_code=EXIT_CODES["ok"])
    except BaseException as error:
        ending = _ending(error, notebook, tracker.cell, cell_timeout)
        if ending is None:  # the kernel would not start, a broken install: not the notebook's doing
            record.update(status="failed", exit_code=EXIT_CODES["runner_error"],
                          error={"reason": "runner_error", "message": repr(error)})
            raise
        reason, message = ending
        interrupted = isinstance(error, KeyboardInterrupt)
        record.update(status="interrupted" if interrupted else "failed", exit_code=EXIT_CODES[reason],
                      error={"reason": reason, "message": message})
        message = f"{message}; partial notebook: {output_notebook}{_cell_source(error)}"
        raise (RunInterrupted if interrupted else NotebookFailed)(message, reason, run_dir, output_notebook) from None
    finally:
        tracker.close()
        record.update(ended=_now(), seconds=round(time.perf_counter() - start, 1))
        _write_json(record_path, record)
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    return RunResult(run_dir, output_notebook, metrics, record)


def _resumable_run(notebook: Path, run_dir: str | Path, declared: dict[str, Parameter]) -> tuple[Path, dict]:
    """The run folder to resume and its record, checked: a run of this notebook, which can resume,
    that did not finish and is not still going."""
    run_dir = Path(run_dir).resolve()
    if RESUME_PARAMETER not in declared:
        raise UsageError(f"{notebook.name} has no '{RESUME_PARAMETER}' parameter, so it cannot continue a run "
                         "from its checkpoints; start a new run instead")
    record = read_run_record(run_dir)
    if record is None:
        raise UsageError(f"--resume {run_dir}: no readable {RUN_RECORD} there, so it is not a run folder "
                         "(pass the folder the run printed as 'run folder: ...')")
    if Path(record.get("notebook", "")).stem != notebook.stem:
        raise UsageError(f"--resume {run_dir} is a run of {record.get('notebook')}, not of {notebook.name}")
    if record.get("status") == "ok":
        raise UsageError(f"--resume {run_dir}: that run finished (status ok); there is nothing to resume")
    _refuse_if_still_running(run_dir)
    return run_dir, record


def _recorded_parameters(record: dict, declared: dict[str, Parameter]) -> dict:
    """The parameters a run recorded, checked against the notebook as it is now, with the resume flag."""
    recorded = {name: value for name, value in record.get("parameters", {}).items()
                if name in declared and name != "output_dir"
                and not (declared[name].kind is None and value == declared[name].default)}  # an expression default
    params = {name: declared[name].check(value, f"{RUN_RECORD} parameter") for name, value in recorded.items()}
    return {**params, RESUME_PARAMETER: True}


def _keep_earlier_attempt(run_dir: Path, notebook: Path, record: dict) -> list[dict]:
    """Every earlier attempt's record, the last one's executed notebook renamed so the new run keeps it."""
    attempts = list(record.get("attempts", []))
    earlier = {key: record.get(key) for key in ("status", "exit_code", "error", "started", "ended", "seconds")}
    executed = run_dir / notebook.name
    if executed.exists():
        kept = run_dir / f"{notebook.stem}.attempt-{len(attempts) + 1}.ipynb"
        os.replace(executed, kept)
        earlier["executed_notebook"] = str(kept)
    return [*attempts, earlier]


def _execute(notebook: Path, output_notebook: Path, params: dict, cell_timeout: int | None,
             tracker: _CellTracker) -> None:
    import papermill

    papermill.execute_notebook(
        str(notebook), str(output_notebook), parameters=params, kernel_name="python3",
        cwd=str(notebook.parent), progress_bar=False, execution_timeout=cell_timeout,
        on_notebook_start=tracker.notebook_started, on_cell_execute=tracker.cell_started)
