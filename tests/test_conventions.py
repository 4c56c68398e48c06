import shutil
from pathlib import Path

import nbformat
import pytest

from ftnb.conventions import check_notebook

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
QUICKSTART = Path(__file__).parent.parent / "notebooks" / "00_quickstart.ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebooks_follow_the_conventions(path):
    assert check_notebook(path) == []


def _broken(tmp_path, edit) -> Path:
    """A copy of the quickstart, under notebooks/ so its badge path is right, with one rule broken."""
    nb = nbformat.read(QUICKSTART, as_version=4)
    edit(nb)
    path = tmp_path / "notebooks" / QUICKSTART.name
    path.parent.mkdir()
    nbformat.write(nb, path)
    return path


def _first_code(nb):
    return next(c for c in nb.cells if c.cell_type == "code" and "parameters" not in c.metadata.get("tags", []) and "%pip" not in c.source)


def _set_output(nb):
    cell = _first_code(nb)
    cell.execution_count = 1
    cell.outputs = [nbformat.v4.new_output("stream", text="hi\n")]


BREAKAGES = {
    "outputs not stripped": _set_output,
    "kernelspec": lambda nb: nb.metadata["kernelspec"].update(name="conda-env"),
    "Open-in-Colab badge": lambda nb: setattr(nb.cells[0], "source", "# Title"),
    "exactly one cell tagged 'parameters'": lambda nb: nb.cells[3].metadata.update(tags=[]),
    "never (re)install torch": lambda nb: setattr(nb.cells[1], "source", nb.cells[1].source + "\n    %pip install -q torch==2.1"),
    "use '%pip install -q'": lambda nb: setattr(nb.cells[1], "source", nb.cells[1].source.replace("%pip install -q -e", "%pip install -e")),
    "absolute path": lambda nb: setattr(_first_code(nb), "source", "open('/home/me/data.jsonl')"),
    "code cells in a row": lambda nb: nb.cells.extend(nbformat.v4.new_code_cell("x = 1") for _ in range(4)),
}


@pytest.mark.parametrize("rule", BREAKAGES)
def test_a_broken_copy_is_caught(tmp_path, rule):
    problems = check_notebook(_broken(tmp_path, BREAKAGES[rule]))
    assert any(rule in p for p in problems), problems


def test_invalid_file(tmp_path):
    bad = tmp_path / "bad.ipynb"
    bad.write_text("{not json")
    assert "not a valid notebook" in check_notebook(bad)[0]
