"""Installing the course into a kernel that brings its own torch (Colab): tested pins, and when to restart.

Usage:
    python -m ftnb.install > constraints-colab.txt          # regenerate from requirements.txt
    versions_before = installed_versions()                  # in the notebooks' install cell:
    %pip install -q -c ftnb-course/constraints-colab.txt {keep_torch(versions_before)} -e ./ftnb-course
    stop_if_restart_needed(versions_before)

The notebooks' install cell installs the course package with `pip install -c constraints-colab.txt`:
every dependency gets the version tested here (requirements.txt), except the packages in KEPT,
which stay as the kernel has them. Standard library only: the install cell imports this module
from the fresh clone before anything is installed.
"""
from __future__ import annotations

import importlib.metadata
import re
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent  # as ftnb.data's, which imports datasets: not here
REQUIREMENTS = REPO_ROOT / "requirements.txt"
CONSTRAINTS = REPO_ROOT / "constraints-colab.txt"
# torch's versions the pins accept: transformers switches PyTorch off below 2.6 (a run-time check
# its metadata does not state); bitsandbytes requires < 3.
TORCH_RANGE = ">=2.6,<3"

_KERNEL = (
    "asttokens comm debugpy executing ipykernel ipython ipython-pygments-lexers jedi jupyter-client "
    "jupyter-core matplotlib-inline nest-asyncio2 parso pexpect prompt-toolkit ptyprocess pure-eval "
    "pygments pyzmq stack-data tornado traitlets wcwidth"
).split()
# Pins of requirements.txt the install leaves as the kernel has them (normalised name -> why).
KEPT = {
    "torch": f"the kernel's own build (CUDA on Colab; requirements.txt pins the CPU build). "
             f"The pins below accept any torch {TORCH_RANGE}.",
    **dict.fromkeys(_KERNEL, "the kernel running the notebook and its messaging stack: Colab pins its own "
                             "versions (package google-colab) and replacing them under a live kernel can break it."),
}

_HEADER = """\
# Versions tested together, for the notebooks' install cell on Colab or any kernel with its own torch:
#     pip install -c constraints-colab.txt -e .
# Generated from requirements.txt by `make constraints-colab.txt`; a test fails when the two disagree.
# A constraint installs nothing by itself: it only fixes the version pip picks when the course needs
# the package. The pins need Python >= 3.11. pip may warn that packages preinstalled on Colab want
# other versions of some of them: the notebooks were tested with these.
# Left out, so that the kernel keeps its own:
"""


def normalise(name: str) -> str:
    """The comparable form of a distribution name (PEP 503): `PyYAML`, `pyyaml` -> `pyyaml`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pins(text: str) -> dict[str, str]:
    """`name==version` lines of a requirements file, by normalised name (comments skipped).

    Usage: parse_pins(Path("requirements.txt").read_text())["torch"]  # '2.13.0'
    """
    pins = {}
    for line in text.splitlines():
        requirement = line.split("#", 1)[0].strip()
        if requirement:
            name, sep, version = requirement.partition("==")
            if not sep:
                raise ValueError(f"not a pin (name==version): {line!r}")
            pins[normalise(name)] = version.strip()
    return pins


def constraints_text(requirements: str) -> str:
    """The constraints file for `requirements` (the text of requirements.txt): its pins minus KEPT.

    Usage: CONSTRAINTS.read_text() == constraints_text(REQUIREMENTS.read_text())
    """
    reasons: dict[str, list[str]] = {}
    for name, reason in KEPT.items():
        reasons.setdefault(reason, []).append(name)
    kept = "".join(textwrap.fill(" ".join(names) + ":", 100, initial_indent="#   ", subsequent_indent="#   ") + "\n"
                   + textwrap.fill(reason, 100, initial_indent="#     ", subsequent_indent="#     ") + "\n"
                   for reason, names in reasons.items())
    pins = "".join(f"{name}=={version}\n" for name, version in sorted(parse_pins(requirements).items())
                   if name not in KEPT)
    return _HEADER + kept + pins


def installed_versions() -> dict[str, str]:
    """Version of every installed distribution, by normalised name (the first one Python would import).

    Usage: versions_before = installed_versions()   # before `pip install`
    """
    versions: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        if name := dist.metadata["Name"]:  # None for a broken install: nothing to compare
            versions.setdefault(normalise(name), dist.version)
    return versions


def keep_torch(versions: dict[str, str]) -> str:
    """`torch==<the kernel's version>` for pip's command line ('' where torch is missing): pip then
    keeps the kernel's build, or stops and names the conflict, but never swaps it for another.

    Usage: %pip install -q -c ftnb-course/constraints-colab.txt {keep_torch(versions_before)} -e ./ftnb-course
    """
    return f"torch=={versions['torch']}" if "torch" in versions else ""


def replaced_while_imported(versions_before: dict[str, str]) -> list[str]:
    """Distributions whose version changed since `versions_before` although this process imported them.

    Usage: replaced_while_imported(versions_before)   # ['numpy 2.0.2 -> 2.4.6']
    """
    changed = {name: (old, new) for name, new in installed_versions().items()
               if (old := versions_before.get(name)) not in (None, new)}
    imported = {normalise(dist) for module, dists in importlib.metadata.packages_distributions().items()
                if module in sys.modules for dist in dists}
    return [f"{name} {old} -> {new}" for name, (old, new) in sorted(changed.items()) if name in imported]


def stop_if_restart_needed(versions_before: dict[str, str]) -> None:
    """Stop the notebook when the install replaced packages this kernel had already imported.

    The kernel keeps the old versions in memory while new files lie on disk: mixing them fails in
    confusing ways later, so the notebook stops here with what to do.
    Usage: stop_if_restart_needed(versions_before)   # after `pip install`
    """
    if replaced := replaced_while_imported(versions_before):
        raise RuntimeError(
            f"The install replaced packages this kernel had already imported ({', '.join(replaced)}). "
            "Restart the kernel (Colab: Runtime > Restart session) and run all cells again: "
            "the install cell then finds the course installed and does nothing.")


if __name__ == "__main__":
    sys.stdout.write(constraints_text(REQUIREMENTS.read_text()))
