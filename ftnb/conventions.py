"""The rules every course notebook follows, checked mechanically.

Usage:
    from ftnb.conventions import check_notebook
    problems = check_notebook("notebooks/00_quickstart.ipynb")   # [] when it is fine
    python -m ftnb check notebooks/*.ipynb

The rules: valid nbformat; outputs stripped; kernelspec python3; an Open-in-Colab badge
pointing at the notebook's own path; an install cell with `%pip install -q` that runs only
when the course package is missing, clones the repository named by FTNB_REPO_URL (default: this
repository on GitHub), installs with the tested pins (`-c .../constraints-colab.txt`, the kernel's
torch held by `{keep_torch(...)}`; or `--no-deps` with exact pins) and never installs torch; exactly
one cell tagged `parameters`, the first code cell after the install cell; no absolute paths;
markdown between steps (never more than MAX_CODE_RUN code cells in a row).
"""
from __future__ import annotations

import re
from pathlib import Path

import nbformat

from ftnb.install import CONSTRAINTS

MAX_CODE_RUN = 3
COLAB_URL = "https://colab.research.google.com/github/{repo}/blob/main/{path}"
# torchvision and torchaudio are built for one torch: replacing them pulls in another torch
_TORCH_PACKAGE = re.compile(r"(^|\s)['\"]?torch(vision|audio)?(\s|$|[=<>!~\[])")
_EXACT_PIN = re.compile(r"[A-Za-z0-9][\w.\-]*==[\w.+!]+")
_REPO_URL = r"""os\.environ\.get\(\s*["']FTNB_REPO_URL["']\s*,\s*["']https://github\.com/{repo}\.git["']\s*\)"""
_ABSOLUTE_PATH = re.compile(r"""["'](/(home|root|Users|tmp|mnt|content|work|opt|var)\b|~/|[A-Za-z]:\\)""")


def _is_install_cell(cell) -> bool:
    return cell.cell_type == "code" and "%pip install" in cell.source


def _pip_line_problem(line: str) -> str | None:
    """Why one `%pip install` line could install untested versions, or None when it cannot."""
    args = line.split("install", 1)[1].split()
    if "--no-deps" in args:
        if all(_EXACT_PIN.fullmatch(a) for a in args if not a.startswith("-")):
            return None
        return "with --no-deps, pin every package exactly (name==version)"
    constraints = [value for option, value in zip(args, args[1:]) if option in ("-c", "--constraint")]
    constraints += [a.removeprefix("--constraint=") for a in args if a.startswith("--constraint=")]
    if not any(Path(value).name == CONSTRAINTS.name for value in constraints):
        return f"install with the tested pins: '%pip install -q -c ftnb-course/{CONSTRAINTS.name} ...'"
    if "{keep_torch(" not in line:
        return "pass {keep_torch(versions_before)} to pip so that it can never swap the kernel's torch"
    return None


def _install_cell_problems(source: str, repo: str) -> list[str]:
    lines = [ln for ln in source.splitlines() if "%pip install" in ln]
    problems = []
    if any("%pip install -q" not in ln for ln in lines):
        problems.append("install cell: use '%pip install -q'")
    if any(not ln.startswith((" ", "\t")) for ln in lines):
        problems.append("install cell: put %pip lines under an `if` that is false locally")
    if any(_TORCH_PACKAGE.search(ln.split("install", 1)[1]) for ln in lines):
        problems.append("install cell must never (re)install torch")
    problems += sorted({f"install cell: {why}" for ln in lines if (why := _pip_line_problem(ln))})
    if not re.search(_REPO_URL.format(repo=re.escape(repo)), source):
        problems.append(f"install cell: clone os.environ.get(\"FTNB_REPO_URL\", \"https://github.com/{repo}.git\") "
                        "so that a fork or a local clone can stand in")
    return problems


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
        problems += _install_cell_problems(cells[install[0]].source, repo or REPO)

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
