"""The runner: typed parameters, one folder and one record per run, and a clear ending for every way
a run can stop. Kernel runs use a toy notebook that imports nothing heavy (a few seconds each): a
dead kernel, a timeout and Ctrl-C can only be shown for real with a real kernel."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from ftnb import runner
from ftnb.runner import NotebookFailed, ParameterError, resolve_parameters, run_notebook

ROOT = Path(__file__).parent.parent

# One cell per concern. The metrics cell merges into metrics.json the way ftnb.results.save_metrics
# does, without importing torch (seconds per kernel on a busy machine).
PARAMETERS = """\
steps = 2
rate = 2e-3  # a float
name = "x"
flag = True
modules = "all-linear"  # "all-linear" or a list of names
sizes = [1, 2]
anything = None
wait = 0.0  # seconds the second cell sleeps
crash = False  # kill the kernel like the out-of-memory killer does
fail = False  # raise in the work cell
output_dir = "out"
"""
WORK = "import os, time\nif crash:\n    os.kill(os.getpid(), 9)\nif fail:\n    raise ValueError('asked to fail')\ntime.sleep(wait)"
SAVE = """\
import json, pathlib
path = pathlib.Path(output_dir) / "metrics.json"
metrics = json.loads(path.read_text()) if path.exists() else {}
metrics.update(double=steps * 2, types={k: type(v).__name__ for k, v in
               dict(steps=steps, rate=rate, name=name, flag=flag, modules=modules, sizes=sizes).items()},
               rate=rate, modules=modules, cwd=os.getcwd())
path.write_text(json.dumps(metrics))
"""


@pytest.fixture
def toy_notebook(tmp_path):
    params = nbformat.v4.new_code_cell(PARAMETERS)
    params.metadata["tags"] = ["parameters"]
    cells = [params, nbformat.v4.new_code_cell(WORK), nbformat.v4.new_code_cell(SAVE)]
    nb = nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": {
        "name": "python3", "display_name": "Python 3", "language": "python"}})
    folder = tmp_path / "notebooks"
    folder.mkdir()
    path = folder / "toy.ipynb"
    nbformat.write(nb, path)
    (folder / "presets.yaml").write_text("toy:\n  smoke: {steps: 5}\n  bad: {stepz: 1}\n  mistyped: {steps: 1.5}\n")
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftnb", "run", *args], capture_output=True, text=True, cwd=ROOT)


def _record(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def test_unknown_parameter_lists_the_real_ones(toy_notebook):
    with pytest.raises(ParameterError) as err:
        resolve_parameters(toy_notebook, overrides={"setps": 3})
    assert "no parameter(s) setps" in str(err.value)
    assert "steps = 2" in str(err.value) and "output_dir" in str(err.value)


def test_presets_are_checked_too(toy_notebook):
    presets = toy_notebook.parent / "presets.yaml"
    assert resolve_parameters(toy_notebook, "smoke", {"name": "y"}, presets) == {"steps": 5, "name": "y"}
    with pytest.raises(ParameterError, match="stepz"):
        resolve_parameters(toy_notebook, "bad", presets_file=presets)
    with pytest.raises(ParameterError, match="preset 'mistyped'.*steps = 1.5 is not an integer"):
        resolve_parameters(toy_notebook, "mistyped", presets_file=presets)
    with pytest.raises(ParameterError, match="no preset 'huge'; presets: smoke, bad, mistyped"):
        resolve_parameters(toy_notebook, "huge", presets_file=presets)


@pytest.mark.parametrize("name, text, expected", [
    ("rate", "1e-3", 0.001),  # YAML 1.1 alone reads this as the string '1e-3'
    ("rate", "3", 3),  # an int is a number; it stays an int (eval_steps 2 means steps, 0.5 a share)
    ("steps", "16", 16),
    ("flag", "false", False),
    ("name", "HuggingFaceTB/SmolLM2-360M-Instruct", "HuggingFaceTB/SmolLM2-360M-Instruct"),
    ("name", "none", "none"),  # a string parameter takes the text as written
    ("name", "12", "12"),
    ("modules", "[q_proj, v_proj]", ["q_proj", "v_proj"]),  # its comment says it takes a list
    ("modules", "all-linear", "all-linear"),
    ("sizes", "[3, 4]", [3, 4]),
    ("anything", "[1, x]", [1, "x"]),  # a None default accepts any value
])
def test_values_are_read_by_the_type_of_the_default(toy_notebook, name, text, expected):
    value = resolve_parameters(toy_notebook, overrides={name: text})[name]
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("name, value, expected", [
    ("rate", "abc", "a number"), ("steps", "1.5", "an integer"), ("steps", 1.5, "an integer"),
    ("steps", True, "an integer"), ("flag", "maybe", "true or false"), ("name", 3, "a string"),
    ("modules", "[a", "a string or a list"), ("sizes", "3", "a list"),
])
def test_a_value_of_the_wrong_type_is_refused(toy_notebook, name, value, expected):
    with pytest.raises(ParameterError, match=f"-p {name}: {name} = .* is not {expected}"):
        resolve_parameters(toy_notebook, overrides={name: value})


def test_output_dir_is_not_a_parameter_to_set(toy_notebook):
    """The notebook must write where the runner says; --output-dir is the one way to choose that."""
    with pytest.raises(ParameterError, match="output_dir is the run folder.*--output-dir"):
        resolve_parameters(toy_notebook, overrides={"output_dir": "elsewhere"})


def test_notebooks_are_found_by_name(toy_notebook):
    folder = toy_notebook.parent
    (folder / "toast.ipynb").write_text(toy_notebook.read_text())
    assert runner.find_notebook("toy", folder) == runner.find_notebook("toy.ipynb", folder) == toy_notebook
    assert runner.find_notebook(toy_notebook) == toy_notebook
    assert runner.find_notebook("toa", folder).name == "toast.ipynb"  # a unique prefix
    with pytest.raises(runner.UsageError, match="'to' matches several notebooks; notebooks: toast, toy"):
        runner.find_notebook("to", folder)
    assert runner.find_notebook("00_quickstart") == ROOT / "notebooks" / "00_quickstart.ipynb"


def test_cli_user_errors_are_one_line_and_exit_2(toy_notebook):
    for args, expected in [
        (["no_such_notebook"], "error: 'no_such_notebook' is not a notebook file or name; notebooks: 00_quickstart"),
        ([str(toy_notebook), "-p", "setps", "3"], "error: toy.ipynb has no parameter(s) setps"),
        ([str(toy_notebook), "-p", "rate", "abc"], "error: -p rate: rate = 'abc' is not a number"),
    ]:
        proc = _cli(*args)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith(expected) and "Traceback" not in proc.stderr


def test_cli_run_types_values_and_writes_the_record(toy_notebook, tmp_path):
    """The README's own example, `-p learning_rate 1e-3`, must reach the notebook as a float."""
    out = tmp_path / "run"
    proc = _cli(str(toy_notebook), "-p", "rate", "1e-3", "-p", "modules", "[q_proj, v_proj]",
                "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rate"] == 0.001 and metrics["types"]["rate"] == "float"
    assert metrics["modules"] == ["q_proj", "v_proj"]
    assert Path(metrics["cwd"]) == toy_notebook.parent  # notebooks run where their relative paths point
    assert f"run record:        {out / 'run.json'}" in proc.stdout
    record = _record(out)
    assert record["status"] == "ok" and record["exit_code"] == 0 and record["error"] is None
    # every effective parameter: defaults, overrides, and the run folder as output_dir
    assert record["parameters"] == {"steps": 2, "rate": 0.001, "name": "x", "flag": True,
                                    "modules": ["q_proj", "v_proj"], "sizes": [1, 2], "anything": None,
                                    "wait": 0.0, "crash": False, "fail": False, "output_dir": str(out)}
    assert record["preset"] is None and record["overrides"] == {"rate": "1e-3", "modules": "[q_proj, v_proj]"}
    assert record["started"] <= record["ended"] and record["seconds"] > 0
    assert len(record["git"]["commit"]) >= 7 and isinstance(record["git"]["dirty"], bool)
    assert record["versions"]["python"] == f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"


def test_runs_started_in_the_same_second_get_their_own_folders(toy_notebook, tmp_path, monkeypatch):
    monkeypatch.setattr(runner.time, "strftime", lambda fmt: "20260101-000000")  # the same second, always
    first = run_notebook(toy_notebook, "smoke", runs_root=tmp_path, progress=False)
    second = run_notebook(toy_notebook, parameters={"steps": 3}, runs_root=tmp_path, progress=False)
    third = run_notebook(toy_notebook, parameters={"steps": 4}, runs_root=tmp_path, progress=False)
    assert first.run_dir.name == "20260101-000000-smoke"
    assert [second.run_dir.name, third.run_dir.name] == ["20260101-000000-default", "20260101-000000-default-2"]
    assert [r.metrics["double"] for r in (first, second, third)] == [10, 6, 8]
    assert _record(third.run_dir)["parameters"]["output_dir"] == str(third.run_dir)


def test_a_used_output_dir_is_refused_unless_forced(toy_notebook, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"from_an_earlier_run": 1}))
    (out / "adapter.safetensors").write_text("keep me")
    with pytest.raises(runner.UsageError, match="is not empty .* --force"):
        run_notebook(toy_notebook, output_dir=out, progress=False)
    assert json.loads((out / "metrics.json").read_text()) == {"from_an_earlier_run": 1}  # nothing touched
    result = run_notebook(toy_notebook, output_dir=out, progress=False, force=True)
    assert "from_an_earlier_run" not in result.metrics and result.metrics["double"] == 4
    assert (out / "adapter.safetensors").read_text() == "keep me"


def test_force_never_takes_the_folder_of_a_run_still_going(toy_notebook, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = {"status": "running", "host": runner.platform.node(), "pid": alive.pid}
        (out / "run.json").write_text(json.dumps(record))
        with pytest.raises(runner.UsageError, match=f"still going \\(process {alive.pid}\\)"):
            run_notebook(toy_notebook, output_dir=out, progress=False, force=True)
    finally:
        alive.kill()
        alive.wait()
    result = run_notebook(toy_notebook, output_dir=out, progress=False, force=True)  # its process is gone now
    assert runner.read_run_record(out)["status"] == "ok" and runner.read_run_record(out)["pid"] == result.record["pid"]


def test_a_failing_cell_is_reported_and_the_notebook_kept(toy_notebook, tmp_path):
    with pytest.raises(NotebookFailed) as err:
        run_notebook(toy_notebook, parameters={"fail": True}, runs_root=tmp_path, progress=False)
    assert err.value.exit_code == 1 and err.value.reason == "cell_error"
    assert "failed in cell [3]: ValueError: asked to fail; partial notebook: " in str(err.value)
    assert "raise ValueError('asked to fail')" in str(err.value)  # the cell's source follows
    assert err.value.output_notebook.exists()
    record = _record(err.value.run_dir)
    assert (record["status"], record["exit_code"], record["error"]["reason"]) == ("failed", 1, "cell_error")


def test_a_dead_kernel_ends_with_its_own_exit_code(toy_notebook, tmp_path):
    with pytest.raises(NotebookFailed) as err:
        run_notebook(toy_notebook, parameters={"crash": True}, runs_root=tmp_path, progress=False)
    assert (err.value.reason, err.value.exit_code) == ("dead_kernel", runner.EXIT_CODES["dead_kernel"]) == ("dead_kernel", 3)
    assert "kernel died in cell [3]" in str(err.value) and str(err.value.output_notebook) in str(err.value)
    assert nbformat.read(err.value.output_notebook, as_version=4).cells  # the partial notebook is readable
    record = _record(err.value.run_dir)
    assert (record["status"], record["exit_code"]) == ("failed", 3) and record["ended"]


def test_a_cell_timeout_ends_with_its_own_exit_code(toy_notebook, tmp_path):
    start = time.monotonic()
    with pytest.raises(NotebookFailed) as err:
        run_notebook(toy_notebook, parameters={"wait": 120}, runs_root=tmp_path, progress=False, cell_timeout=2)
    assert time.monotonic() - start < 100  # the sleeping kernel was stopped, not waited for
    assert (err.value.reason, err.value.exit_code) == ("cell_timeout", 4)
    assert "cell [3] ran longer than the cell timeout (2 s)" in str(err.value)
    assert err.value.output_notebook.exists()
    assert (_record(err.value.run_dir)["status"], _record(err.value.run_dir)["exit_code"]) == ("failed", 4)


@pytest.mark.parametrize("sent, exit_code, said", [(signal.SIGINT, 130, "interrupted (Ctrl-C)"),
                                                   (signal.SIGTERM, 143, "stopped by SIGTERM")])
def test_ctrl_c_and_sigterm_end_the_run_cleanly(toy_notebook, tmp_path, sent, exit_code, said):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ftnb", "run", str(toy_notebook), "-p", "wait", "120",
                             "--output-dir", str(out)], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_ctrl_c_as_in_a_terminal)
    try:
        # the record says "running" from the start; wait until the sleeping cell has begun
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            record = _record(out) if (out / "run.json").exists() else {}
            if record.get("status") == "running" and _sleeping_cell_started(out / "toy.ipynb"):
                break
            time.sleep(0.5)
        else:
            pytest.fail("the sleeping cell never started")
        time.sleep(1)  # papermill saves the cell's start just before the kernel receives it
        proc.send_signal(sent)
        try:
            stderr = proc.communicate(timeout=60)[1]
        except subprocess.TimeoutExpired:
            # the stderr pipe stays open while the kernel (which inherits it) is alive: say which one lingered
            ended = proc.poll()
            state = "was still going" if ended is None else f"had ended (exit code {ended}) but its kernel had not"
            proc.kill()
            pytest.fail(f"60 s after the signal the run {state}; record: {_record(out)}; "
                        f"stderr: {proc.communicate(timeout=30)[1][-2000:]}")
    finally:
        proc.kill()
    assert proc.returncode == exit_code, stderr
    last_line = stderr.strip().splitlines()[-1]
    assert last_line == f"error: toy.ipynb: {said} in cell [3]; partial notebook: {out / 'toy.ipynb'}"
    record = _record(out)
    assert (record["status"], record["exit_code"]) == ("interrupted", exit_code) and record["ended"]


def _ctrl_c_as_in_a_terminal() -> None:
    """A shell starts background jobs with SIGINT ignored (POSIX), and children inherit that: where the tests
    themselves run as one (`make test &`), the run would rightly ignore the Ctrl-C this test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _sleeping_cell_started(executed: Path) -> bool:
    """papermill saves the notebook when a cell starts; the work cell's metadata then says running."""
    try:
        cells = nbformat.read(executed, as_version=4).cells
    except (FileNotFoundError, nbformat.reader.NotJSONError, json.JSONDecodeError):
        return False
    return any(c.source.startswith("import os, time") and c.metadata.get("papermill", {}).get("status") == "running"
               for c in cells)


@pytest.mark.skipif(not hasattr(runner.os, "sched_setaffinity"), reason="pinning processes to cores needs Linux")
def test_core_shares_split_the_cores_and_never_leave_a_run_without_one(monkeypatch):
    monkeypatch.setattr(runner.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    assert runner.core_shares(2) == [{0, 1}, {2, 3, 4}]  # disjoint, every core used
    assert runner.core_shares(1) == [{0, 1, 2, 3, 4}]
    monkeypatch.setattr(runner.os, "sched_getaffinity", lambda pid: {3})
    assert runner.core_shares(2) == [{3}, {3}]  # fewer cores than runs: they share


def test_a_started_run_is_pinned_to_its_cores_and_logs_to_its_file(toy_notebook, tmp_path):
    cores = runner.core_shares(2)[-1]
    run = runner.start_run(toy_notebook, "--output-dir", str(tmp_path / "out"), log=tmp_path / "out.log", cores=cores)
    if cores is not None:
        assert runner.os.sched_getaffinity(run.pid) == cores
    assert run.wait(timeout=120) == 0, (tmp_path / "out.log").read_text()[-2000:]
    assert runner.read_run_record(tmp_path / "out")["status"] == "ok"
    assert "run record:" in (tmp_path / "out.log").read_text()


def _notebook_with_parameters(folder: Path, source: str) -> Path:
    params = nbformat.v4.new_code_cell(source)
    params.metadata["tags"] = ["parameters"]
    path = folder / "declared.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[params]), path)
    return path


def test_parameters_are_read_whatever_their_comments_say(tmp_path):
    """papermill's own reader drops a line whose comment holds " = "; Python's parser does not."""
    path = _notebook_with_parameters(tmp_path, 'lora_alpha = 32  # scale = alpha / r\n'
                                               'grid = {"lr": [1e-4,  # low\n'
                                               '              3e-4]}  # high\n'
                                               'steps: int = 3  # typed\n')
    declared = runner.notebook_parameters(path)
    assert declared == {"lora_alpha": {"default": "32", "help": "scale = alpha / r"},
                        "grid": {"default": '{"lr": [1e-4,  # low\n              3e-4]}', "help": "low high"},
                        "steps": {"default": "3", "help": "typed"}}
    assert resolve_parameters(path, overrides={"lora_alpha": "64"})["lora_alpha"] == 64


def test_a_parameters_cell_that_is_not_plain_python_is_named(tmp_path):
    path = _notebook_with_parameters(tmp_path, "steps = 2\n%matplotlib inline\n")
    with pytest.raises(ParameterError, match="line 2 of its parameters cell"):
        runner.notebook_parameters(path)
