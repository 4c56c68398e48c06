"""The Python version ftnb declares is one that every pinned dependency installs on."""
import re
import tomllib
from importlib.metadata import PackageNotFoundError, metadata
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
CANDIDATES = [Version(f"3.{minor}") for minor in range(8, 16)]


def lowest_allowed_python() -> Version:
    declared = SpecifierSet(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])
    return min(v for v in CANDIDATES if v in declared)


def pinned_requires_python() -> dict[str, str]:
    """Requires-Python of every package pinned in requirements.txt, as installed here."""
    found = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==", line)
        if not match:
            continue
        try:
            found[match[1]] = metadata(match[1]).get("Requires-Python") or ""
        except PackageNotFoundError:  # e.g. a CPU-only wheel installed under another name
            continue
    return found


def test_requires_python_is_what_the_pins_allow():
    lowest = lowest_allowed_python()
    pins = pinned_requires_python()
    assert "numpy" in pins and len(pins) > 50  # the check really read the pins
    refused = {name: spec for name, spec in pins.items() if spec and lowest not in SpecifierSet(spec)}
    assert not refused, f"requires-python allows {lowest}, which these pins do not install on: {refused}"
    # and it is not stricter than needed: the next lower version is refused by some pin
    below = Version(f"3.{lowest.minor - 1}")
    assert any(spec and below not in SpecifierSet(spec) for spec in pins.values())


def test_readme_states_the_same_python_version():
    lowest = lowest_allowed_python()
    stated = re.findall(r"Python (3\.\d+)\+", (ROOT / "README.md").read_text())
    assert stated and set(stated) == {f"{lowest.major}.{lowest.minor}"}, stated
