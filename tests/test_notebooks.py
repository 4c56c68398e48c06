"""Every notebook in notebooks/ runs end to end with its `smoke` preset. A new notebook is
picked up without editing this file (it must at least save `env` and the probe table). The executed
notebooks stay in runs/tests/<notebook>/, reused by each test run (--force: the earlier run's
metrics.json and run.json are deleted first, so no key below can come from an older run)."""
import json
import math
from pathlib import Path

import pytest

from ftnb.runner import NotebookFailed, presets_for, run_notebook

ROOT = Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _quickstart(m: dict) -> None:
    assert _finite(m["loss_first"], m["loss_last"]) and m["trainable_params"] > 0
    assert m["footprint_mib"] and all(_finite(v) and v > 0 for v in m["footprint_mib"].values())
    assert "fp32 (de-quantized Q4_1)" in m["footprint_mib"]  # offline, "fp32" is the GGUF copy, and says so
    assert m["answers_after"]


def _tickets(m: dict) -> None:
    assert len(m["labels"]) >= 2 and m["n"]["train"] > 0 and m["qlora_trainable_params"] > 0
    assert m["methods"] and all(0 <= r["macro_f1"] <= 1 for r in m["methods"].values())
    assert all(r["macro_f1_low"] <= r["macro_f1"] <= r["macro_f1_high"] for r in m["methods"].values())
    assert m["comparison"]
    mcnemar = m["qlora_vs_tfidf"]["mcnemar"]  # paired on the same test tickets
    assert sum(mcnemar[k] for k in ("only_a_right", "only_b_right", "both_right", "both_wrong")) == m["n"]["test"]
    assert 0 < mcnemar["p_value"] <= 1
    difference = m["qlora_vs_tfidf"]["macro_f1_difference"]
    assert difference["low"] <= difference["estimate"] <= difference["high"]


def _domains(m: dict) -> None:
    assert m["train_examples"] > 0 and m["domains"]
    assert _finite(m["perplexity_base"], m["perplexity_tuned"]) and m["perplexity_base"] > 1
    assert _finite(m["merge_max_logit_diff"])
    for stage in ("base", "tuned"):  # Wilson intervals per domain with a house format, and overall
        intervals = m["format_adherence_intervals"][stage]
        assert set(intervals) == {*m["house_format_domains"], "all"}
        assert intervals["all"]["estimate"] == m[f"format_adherence_{stage}"]
        assert all(0 <= ci["low"] <= ci["estimate"] <= ci["high"] <= 1 for ci in intervals.values())
    assert 0 < m["format_adherence_tuned_vs_base"]["p_value"] <= 1


def _quantization(m: dict) -> None:
    assert m["table"] and m["footprint_by_role"]
    # offline: the weights are the de-quantized GGUF copy, said in the table, and the gap to the original is skipped
    assert m["weights"] == "fp32 (de-quantized Q4_1)" and "fp32 (de-quantized Q4_1)" in [r["format"] for r in m["table"]]
    assert "HF_HUB_OFFLINE is set" in m["source_gap"]["skipped"]
    assert all(r["zero_shot_low"] <= r["zero_shot_accuracy"] <= r["zero_shot_high"] for r in m["table"])


def _memory_lab(m: dict) -> None:
    assert m["sweep"] and _finite(m["estimate_mib"], m["max_abs_error"]) and m["estimate_mib"] > 0


METRIC_CHECKS = {"00_quickstart": _quickstart, "01_ticket_classification": _tickets,
                 "02_domain_generation": _domains, "03_quantization": _quantization, "04_memory_lab": _memory_lab}


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_with_smoke_preset(notebook):
    assert "smoke" in presets_for(notebook), f"{notebook.name} needs a smoke preset in notebooks/presets.yaml"
    try:
        result = run_notebook(notebook, preset="smoke", output_dir=ROOT / "runs" / "tests" / notebook.stem,
                              progress=False, cell_timeout=900, force=True)
    except NotebookFailed as e:
        pytest.fail(str(e), pytrace=False)
    record = json.loads((result.run_dir / "run.json").read_text())
    assert (record["status"], record["exit_code"], record["preset"]) == ("ok", 0, "smoke")
    assert record["parameters"]["output_dir"] == str(result.run_dir)  # the notebook wrote where we look
    assert "env" in result.metrics and "probes" in result.metrics, "the notebook saved no metrics.json"
    METRIC_CHECKS.get(notebook.stem, lambda metrics: None)(result.metrics)
