"""The rules every course notebook follows, checked mechanically.

Usage:
    from ftnb.conventions import check_notebook
    problems = check_notebook("notebooks/00_quickstart.ipynb")   # [] when it is fine
    python -m ftnb check notebooks/*.ipynb

The rules: valid nbformat; outputs stripped; kernelspec python3; an Open-in-Colab badge
pointing at the notebook's own path; an install cell with `%pip install -q` that runs only
when the course package is missing and never installs torch; exactly one cell tagged
`parameters`, the first code cell after the install cell; no absolute paths; markdown
between steps (never more than MAX_CODE_RUN code cells in a row).
"""
from __future__ import annotations

import re
from pathlib import Path

import nbformat

MAX_CODE_RUN = 3
COLAB_URL = "https://colab.research.google.com/github/{repo}/blob/main/{path}"
_TORCH_PACKAGE = re.compile(r"(^|\s)['\"]?torch(\s|$|[=<>!~\[])")
_ABSOLUTE_PATH = re.compile(r"""["'](/(home|root|Users|tmp|mnt|content|work|opt|var)\b|~/|[A-Za-z]:\\)""")


def _is_install_cell(cell) -> bool:
    return cell.cell_type == "code" and "%pip install" in cell.source


def _notebook_path_in_repo(path: Path) -> str:
    from ftnb.data import REPO_ROOT

    path = path.resolve()
    return path.relative_to(REPO_ROOT).as_posix() if path.is_relative_to(REPO_ROOT) else f"notebooks/{path.name}"


def check_notebook(path: str | Path, repo: str | None = None) -> list[str]:
    """Return a list of human-readable problems (empty when the notebook follows the rules)."""
    from ftnb import REPO

    path = Path(path)
    try:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
    except Exception as e:  # nbformat raises several unrelated types for broken files
        return [f"not a valid notebook: {e}"]
    problems = []
    cells = nb.cells

    if any(c.cell_type == "code" and (c.outputs or c.execution_count) for c in cells):
        problems.append("outputs not stripped (clear all outputs before committing)")
    if nb.metadata.get("kernelspec", {}).get("name") != "python3":
        problems.append("kernelspec name must be 'python3'")

    badge = COLAB_URL.format(repo=repo or REPO, path=_notebook_path_in_repo(path))
    first_md = next((c.source for c in cells if c.cell_type == "markdown"), "")
    if badge not in first_md:
        problems.append(f"first markdown cell needs an Open-in-Colab badge linking {badge}")

    install = [i for i, c in enumerate(cells) if _is_install_cell(c)]
    if len(install) != 1:
        problems.append(f"needs exactly one install cell with '%pip install -q' (found {len(install)})")
    else:
        lines = [ln for ln in cells[install[0]].source.splitlines() if "%pip install" in ln]
        if any("%pip install -q" not in ln for ln in lines):
            problems.append("install cell: use '%pip install -q'")
        if any(not ln.startswith((" ", "\t")) for ln in lines):
            problems.append("install cell: put %pip lines under an `if` that is false locally")
        if any(_TORCH_PACKAGE.search(ln.split("install", 1)[1]) for ln in lines):
            problems.append("install cell must never (re)install torch")

    tagged = [i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", [])]
    if len(tagged) != 1:
        problems.append(f"needs exactly one cell tagged 'parameters' (found {len(tagged)})")
    elif install:
        code_after_install = [i for i, c in enumerate(cells) if c.cell_type == "code" and i > install[0]]
        if not code_after_install or code_after_install[0] != tagged[0]:
            problems.append("the parameters cell must be the first code cell after the install cell")

    for i, c in enumerate(cells):
        if c.cell_type == "code" and i not in install and _ABSOLUTE_PATH.search(c.source):
            problems.append(f"cell {i}: absolute path in code ({_ABSOLUTE_PATH.search(c.source).group(0)}...)")

    run = 0
    for i, c in enumerate(cells):
        run = run + 1 if c.cell_type == "code" else 0
        if run > MAX_CODE_RUN:
            problems.append(f"cell {i}: more than {MAX_CODE_RUN} code cells in a row; explain the step in markdown")
            break
    return problems
