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


def _lora_from_scratch(m: dict) -> None:
    assert m["b_zero_max_logit_diff"] == 0.0  # B = 0: the wrapped model is the base model, bit for bit
    assert all(v <= 1e-5 for v in m["peft_equivalence_max_abs_diff"].values())  # ours computes peft's LoRA
    assert m["start_max_logit_diff"] == 0.0 and m["loss_max_abs_diff"] <= 1e-4  # same start, same training
    assert m["test_macro_f1_within_0_01"] and abs(m["test_macro_f1_difference"]["estimate"]) <= 0.01
    for run in m["training"].values():
        assert _finite(run["tokens_per_second"], run["peak_mib"]) and run["tokens_per_second"] > 0
        assert all(run[split]["low"] <= run[split]["estimate"] <= run[split]["high"] for split in ("validation", "test"))
    assert all(_finite(ratio) and ratio > 0 for ratio in m["dora_lora_time_ratio"].values())
    slopes = m["rank_sweep"]["log_log_slope"]  # alpha / r shrinks the update as r grows, alpha / sqrt(r) does not
    assert slopes["LoRA"] < -0.3 and abs(slopes["rsLoRA"]) < 0.2
    merge = m["merge_4bit"]
    assert merge["models"]["merged, fp32"]["max_probability_diff"] < 1e-4  # a float merge computes the adapter's outputs
    assert merge["sizes_mib"]["adapter_on_disk"] < merge["sizes_mib"]["merged_4bit"] < merge["sizes_mib"]["merged_fp32"]


def _inference_and_serving(m: dict) -> None:
    generator, classifier = m["generator_quality"], m["classifier_quality"]
    assert "CTranslate2 int8" in generator and "transformers fp32 merged" in generator and len(classifier) >= 2
    for row in generator.values():  # a Wilson interval per format, a paired interval for its delta to the source
        ci, delta = row["format_adherence"], row["delta_vs_source"]
        assert 0 <= ci["low"] <= ci["estimate"] <= ci["high"] <= 1 and delta["low"] <= delta["estimate"] <= delta["high"]
        assert 0 <= row["identical"] <= 1
    assert all(r["macro_f1"]["low"] <= r["macro_f1"]["estimate"] <= r["macro_f1"]["high"] for r in classifier.values())
    engines = {r["engine"] for r in m["speed"]}
    assert all(r["tokens_per_s"] > 0 and 0 < r["ttft_s"] < r["seconds"] for r in m["speed"]) and len(engines) >= 4
    assert _finite(m["fast_vs_fp32_batch1"]["tokens_per_s"]) and m["table"] and m["table_markdown"].startswith("|")
    serving = m["serving"]  # the served greedy answer and labels equal the in-process ones
    assert serving["served_equals_in_process"] and serving["streamed_equals_in_process"]
    assert serving["served_labels_equal_in_process"]


def _scale_out(m: dict) -> None:
    for table in m["recommendations"].values():  # a set-up (or "does not fit") per card and GPU count
        assert table and all(len(column) == 4 and all(column.values()) for column in table.values())
    assert len(m["anchors"]) == 3 and all(_finite(a["predicted GPU GiB"]) for a in m["anchors"])
    assert m["launch_max_loss_difference"] and all(d < 1e-4 for d in m["launch_max_loss_difference"].values())
    assert all(run["world_size"] == 2 for name, run in m["launches"].items() if name != "one process")
    shares = [row["share_offloaded"] for row in m["offload"]]  # from all in memory to spilled layers
    assert shares[0] == 0 and shares[-1] > 0 and all(_finite(r["seconds"]) and r["seconds"] > 0 for r in m["offload"])
    assert _finite(m["optimizer_ms_per_million"]) and m["optimizer_ms_per_million"] > 0


METRIC_CHECKS = {"00_quickstart": _quickstart, "01_ticket_classification": _tickets,
                 "02_domain_generation": _domains, "03_quantization": _quantization, "04_memory_lab": _memory_lab,
                 "05_lora_from_scratch": _lora_from_scratch, "07_inference_and_serving": _inference_and_serving,
                 "09_scale_out": _scale_out}


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
