"""The notebooks' install cell (Colab, or any kernel without the course) and its constraints file."""
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from ftnb.install import (CONSTRAINTS, KEPT, REQUIREMENTS, TORCH_RANGE, constraints_text, installed_versions,
                          keep_torch, normalise, parse_pins, replaced_while_imported, stop_if_restart_needed)

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "notebooks" / "00_quickstart.ipynb"
SITE_PACKAGES = Path(sysconfig.get_paths()["purelib"])  # .venv's: every pinned package is installed there


def _constrained_distributions():
    return [importlib.metadata.distribution(name) for name in parse_pins(CONSTRAINTS.read_text())]


def test_constraints_file_is_requirements_minus_what_the_kernel_keeps():
    assert CONSTRAINTS.read_text() == constraints_text(REQUIREMENTS.read_text()), \
        "constraints-colab.txt is out of date: run `make constraints-colab.txt`"


def test_constraints_pin_the_training_stack_and_leave_torch_and_the_kernel_alone():
    requirements, constraints = parse_pins(REQUIREMENTS.read_text()), parse_pins(CONSTRAINTS.read_text())
    for name in ("transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "numpy"):
        assert constraints[name] == requirements[name]
    assert not {"torch", "ipykernel", "ipython", "jupyter-client", "tornado", "pyzmq"} & constraints.keys()
    assert set(requirements) == set(constraints) | set(KEPT)


def test_a_version_that_disagrees_is_caught():
    """The sync test above compares whole texts: one changed pin makes them differ."""
    changed = REQUIREMENTS.read_text().replace("peft==", "peft==0.0.1+")
    assert "peft==0.0.1+" in constraints_text(changed)
    assert constraints_text(changed) != CONSTRAINTS.read_text()


def test_a_line_that_is_not_a_pin_is_an_error():
    with pytest.raises(ValueError, match="not a pin"):
        parse_pins("transformers>=5\n")


def test_every_pin_accepts_the_stated_torch_and_colabs_python():
    """What the installed metadata says: pip then keeps the kernel's torch, whatever its version in range."""
    torch_versions = ("2.6.0", "2.99")  # the ends of TORCH_RANGE
    assert [SpecifierSet(TORCH_RANGE).contains(v) for v in ("2.5.9", *torch_versions, "3.0")] == [False, True, True, False]
    for dist in _constrained_distributions():
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.name == "torch" and (requirement.marker is None or requirement.marker.evaluate({"extra": ""})):
                assert all(requirement.specifier.contains(v) for v in torch_versions), (dist.name, line)
        requires_python = SpecifierSet(dist.metadata["Requires-Python"] or "")
        assert requires_python.contains("3.11") and requires_python.contains("3.12"), (dist.name, requires_python)


def test_keep_torch_pins_the_kernels_build_exactly():
    assert keep_torch({"torch": "2.9.0+cu126", "numpy": "2.0.2"}) == "torch==2.9.0+cu126"
    assert keep_torch({"numpy": "2.0.2"}) == ""  # no torch yet: pip installs one within the pins' range


def test_a_package_replaced_after_import_stops_the_notebook():
    import numpy  # noqa: F401  (imported: replacing it needs a restart)

    before = installed_versions()
    not_imported = next(name for name in ("rouge-score", "absl-py", "gguf") if not _imported(name))
    before.update(numpy="0.0.1", **{not_imported: "0.0.1"})
    assert replaced_while_imported(before) == [f"numpy 0.0.1 -> {installed_versions()['numpy']}"]
    with pytest.raises(RuntimeError, match=r"numpy 0\.0\.1 .*Restart the kernel"):
        stop_if_restart_needed(before)
    stop_if_restart_needed(installed_versions())  # nothing changed: carries on


def _imported(distribution: str) -> bool:
    modules = [m for m, dists in importlib.metadata.packages_distributions().items()
               if distribution in map(normalise, dists)]
    return any(m in sys.modules for m in modules)


# ---- the install cell itself, in a fresh virtual environment -------------------------------------

def _snapshot_of_the_working_tree(dest: Path) -> str:
    """A git repository holding the working tree as it is (committed or not): the cell clones it."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, check=True, capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():  # a file deleted but not yet staged is listed too
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost", "-c", "commit.gpgsign=false"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "snapshot"]):
        subprocess.run(git + command, cwd=dest, check=True)
    return dest.as_uri()


def _venv_without_the_course(path: Path) -> Path:
    """A fresh venv that sees .venv's packages (the pinned set, so pip needs no index) but not ftnb.

    A .pth line only puts a folder on sys.path; the .pth files inside it (ftnb's editable finder)
    are not run. Its ftnb-*.dist-info is hidden too, so pip and importlib see no course package.
    """
    venv.create(path / "venv", with_pip=False)
    visible = path / "installed-packages"
    visible.mkdir()
    for entry in SITE_PACKAGES.iterdir():
        if not entry.name.startswith(("__editable__", "ftnb-", "ftnb.")) and entry.name != "ftnb":
            (visible / entry.name).symlink_to(entry)
    site = Path(subprocess.run([path / "venv/bin/python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "installed-packages.pth").write_text(f"{visible}\n")
    kernel = path / "jupyter" / "kernels" / "fresh-venv"
    kernel.mkdir(parents=True)
    (kernel / "kernel.json").write_text(json.dumps({
        "argv": [str(path / "venv/bin/python"), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "fresh venv", "language": "python"}))
    return site


def _run(cells: list, workdir: Path) -> list:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c.source, metadata=c.metadata) for c in cells])
    NotebookClient(nb, kernel_name="fresh-venv", timeout=240, resources={"metadata": {"path": str(workdir)}}).execute()
    return nb.cells


@pytest.fixture
def fresh_kernel_env(tmp_path, monkeypatch):
    """Environment for a kernel of a fresh venv: offline pip that must find every pin installed."""
    site = _venv_without_the_course(tmp_path)
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # this machine's pip settings play no part
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # a pin that disagrees with what is installed fails
    monkeypatch.setenv("PIP_NO_BUILD_ISOLATION", "0")  # pip reads this as "no isolation": build with .venv's setuptools
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    return site


def test_install_cell_installs_the_course_from_the_repo_url_in_a_fresh_venv(tmp_path, fresh_kernel_env, monkeypatch):
    """Worth its ~30 s: the only check that the cell a Colab user runs first really installs the
    course, with the constraints resolving against the pinned set, and then does nothing."""
    site = fresh_kernel_env
    source = tmp_path / "repo"
    source.mkdir()
    monkeypatch.setenv("FTNB_REPO_URL", _snapshot_of_the_working_tree(source))
    workdir = tmp_path / "content"
    workdir.mkdir()
    before = {p.name for p in site.iterdir()}

    code = [c for c in nbformat.read(QUICKSTART, as_version=4).cells if c.cell_type == "code"]
    check = nbformat.v4.new_code_cell("import ftnb; print(ftnb.__file__)")
    cells = _run(code[:3] + [check], workdir)  # install, parameters, first imports and set-up

    install_output = "".join(o.get("text", "") for o in cells[0].outputs)
    assert "ERROR" not in install_output, install_output
    assert Path(cells[-1].outputs[0]["text"].strip()).resolve().is_relative_to(workdir / "ftnb-course")
    new = {p.name for p in site.iterdir()} - before
    assert new and all(name.startswith(("__editable__", "ftnb", "__pycache__")) for name in new), \
        f"pip installed more than the course package (a pin disagrees with the tested set?): {sorted(new)}"
    imported = subprocess.run([tmp_path / "venv/bin/python", "-c", "import ftnb; print(ftnb.__file__)"],
                              cwd=tmp_path, check=True, capture_output=True, text=True).stdout
    assert Path(imported.strip()).resolve().is_relative_to(workdir / "ftnb-course")  # installed, not just on sys.path

    # A second time, in a new kernel: the course is installed, so the cell does nothing at all.
    monkeypatch.setenv("FTNB_REPO_URL", (tmp_path / "no-such-repo").as_uri())
    again = _run(code[:1], workdir)
    assert again[0].outputs == []
