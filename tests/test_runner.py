import json
import subprocess
import sys

import nbformat
import pytest

from ftnb.runner import ParameterError, resolve_parameters, run_notebook


@pytest.fixture
def toy_notebook(tmp_path):
    """A notebook with parameters that writes metrics.json, no model involved."""
    params = nbformat.v4.new_code_cell("steps = 2\nname = 'x'\noutput_dir = 'out'")
    params.metadata["tags"] = ["parameters"]
    body = nbformat.v4.new_code_cell(
        "from ftnb.results import save_metrics\nsave_metrics(output_dir, {'double': steps * 2, 'name': name})")
    nb = nbformat.v4.new_notebook(cells=[params, body], metadata={"kernelspec": {
        "name": "python3", "display_name": "Python 3", "language": "python"}})
    path = tmp_path / "toy.ipynb"
    nbformat.write(nb, path)
    (tmp_path / "presets.yaml").write_text("toy:\n  smoke: {steps: 5}\n  bad: {stepz: 1}\n")
    return path


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
    with pytest.raises(ParameterError, match="no preset 'huge'; presets: smoke, bad"):
        resolve_parameters(toy_notebook, "huge", presets_file=presets)


def test_run_writes_notebook_and_metrics(toy_notebook, tmp_path):
    result = run_notebook(toy_notebook, parameters={"steps": 4}, runs_root=tmp_path / "runs", progress=False)
    assert result.output_notebook.exists()
    assert result.metrics["double"] == 8 and result.metrics["run"]["parameters"]["steps"] == 4
    saved = json.loads((result.run_dir / "metrics.json").read_text())
    assert saved["run"]["seconds"] > 0 and "probes" in saved


def test_failing_cell_is_reported_and_notebook_kept(toy_notebook, tmp_path):
    from ftnb.runner import NotebookFailed

    with pytest.raises(NotebookFailed) as err:
        run_notebook(toy_notebook, parameters={"steps": None}, runs_root=tmp_path / "runs", progress=False)
    assert "TypeError" in str(err.value) and "save_metrics" in str(err.value)
    assert err.value.output_notebook.exists()


def test_cli_rejects_unknown_parameter(toy_notebook):
    proc = subprocess.run([sys.executable, "-m", "ftnb", "run", str(toy_notebook), "-p", "setps", "3"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "no parameter(s) setps" in proc.stderr
