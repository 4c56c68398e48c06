"""Every notebook in notebooks/ runs end to end with its `smoke` preset. A new notebook is
picked up without editing this file. The executed notebooks stay in runs/tests/."""
from pathlib import Path

import pytest

from ftnb.runner import NotebookFailed, presets_for, run_notebook

ROOT = Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_with_smoke_preset(notebook):
    assert "smoke" in presets_for(notebook), f"{notebook.name} needs a smoke preset in notebooks/presets.yaml"
    try:
        result = run_notebook(notebook, preset="smoke", output_dir=ROOT / "runs" / "tests" / notebook.stem,
                              progress=False, cell_timeout=900)
    except NotebookFailed as e:
        pytest.fail(str(e), pytrace=False)
    assert result.metrics, "the notebook saved no metrics.json"
