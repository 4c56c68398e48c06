"""Every notebook in notebooks/ runs end to end with its `smoke` preset. A new notebook is
picked up without editing this file (it must at least save `env` and the probe table). The executed
notebooks stay in runs/tests/<notebook>/, reused by each test run (--force: the earlier run's
metrics.json and run.json are deleted first, so no key below can come from an older run)."""
import json
import math
import shutil
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
    summary = m["summary"]  # one row of a sweep's table (ftnb.sweep); chosen on validation
    assert 0 <= summary["validation_macro_f1"] <= 1 and summary["adapter_mib"] > 0 and summary["tokens_per_second"] > 0
    assert summary["test_macro_f1_low"] <= summary["test_macro_f1"] <= summary["test_macro_f1_high"]
    ood = m["ood"]  # every method scored again on the out-of-distribution tickets, the headline pair paired
    assert set(ood["methods"]) == set(m["methods"]) and ood["n"] > 0
    assert all(r["macro_f1_low"] <= r["macro_f1"] <= r["macro_f1_high"] and 0 <= r["accuracy"] <= 1
               for r in ood["methods"].values())
    assert {r["n_ood"] for name, r in ood["methods"].items() if not name.startswith("zero-shot")} == {ood["n"]}
    ood_mcnemar = ood["qlora_vs_tfidf"]["mcnemar"]
    assert sum(ood_mcnemar[k] for k in ("only_a_right", "only_b_right", "both_right", "both_wrong")) == ood["n"]
    ood_difference = ood["qlora_vs_tfidf"]["macro_f1_difference"]
    assert ood_difference["low"] <= ood_difference["estimate"] <= ood_difference["high"]
    tests = ood["vs_tfidf"]  # each trained model and the ensemble against TF-IDF, Holm-adjusted together
    assert {"QLoRA", "ensemble"} <= set(tests) and tests["QLoRA"] == ood["qlora_vs_tfidf"]
    assert all(t["mcnemar"]["p_value"] <= t["mcnemar_p_holm"] <= 1 for t in tests.values())
    ensemble = m["ensemble"]  # weights chosen on validation: a point of the simplex, no worse than its best member
    assert abs(sum(ensemble["weights"].values()) - 1) < 1e-9 and min(ensemble["weights"].values()) >= 0
    assert ensemble["log_loss"] <= min(ensemble["single"].values()) + 1e-12 and ensemble["name"] in m["methods"]
    tfidf = m["tfidf_C"]  # chosen on validation, from a grid that reaches past 1 on both sides
    assert tfidf["best"] in tfidf["grid"] and min(tfidf["grid"]) < 1 < max(tfidf["grid"])
    zero_shot = m["zero_shot"]  # sum or mean per label token: the better on validation
    assert set(zero_shot["validation_macro_f1"]) == {"sum", "mean"}
    assert zero_shot["normalize"] == max(zero_shot["validation_macro_f1"], key=zero_shot["validation_macro_f1"].get)
    assert sum(r["kept"] for r in m["minilm_epochs"]) == 1  # early stopping restored one epoch


def _domains(m: dict) -> None:
    assert m["train_examples"] > 0 and m["domains"]
    assert _finite(m["perplexity_base"], m["perplexity_tuned"]) and m["perplexity_base"] > 1
    assert m["eval_loss_curve"] and all(_finite(row["eval_loss"]) and row["step"] >= 1 for row in m["eval_loss_curve"])
    assert _finite(m["merge_max_logit_diff"])
    assert m["merge_fp32_adapter_max_logit_diff"] <= 1e-3  # the merge adds the update faithfully (float rounding)
    for stage in ("base", "tuned"):  # Wilson intervals per domain with a house format, and overall
        intervals = m["format_adherence_intervals"][stage]
        assert set(intervals) == {*m["house_format_domains"], "all"}
        assert intervals["all"]["estimate"] == m[f"format_adherence_{stage}"]
        assert all(0 <= ci["low"] <= ci["estimate"] <= ci["high"] <= 1 for ci in intervals.values())
    assert 0 < m["format_adherence_tuned_vs_base"]["p_value"] <= 1
    for stage in ("base", "tuned"):  # perplexity intervals on the test split
        assert m[stage]["all"]["perplexity_low"] <= m[stage]["all"]["perplexity"] <= m[stage]["all"]["perplexity_high"]
    ood = m["ood"]  # the out-of-distribution set, base and tuned, with intervals and the paired test
    assert ood["rows"] == len(m["domains"]) and ood["goal"]["holds"] in (True, False)
    for stage in ("base", "tuned"):
        assert set(ood["format_adherence_intervals"][stage]) == {*m["house_format_domains"], "all"}
        assert all(0 <= ci["low"] <= ci["estimate"] <= ci["high"] <= 1 for ci in ood["format_adherence_intervals"][stage].values())
        assert ood[stage]["all"]["perplexity_low"] <= ood[stage]["all"]["perplexity"] <= ood[stage]["all"]["perplexity_high"]
    assert 0 < ood["format_adherence_tuned_vs_base"]["p_value"] <= 1
    assert m["packing"]["real_tokens"] <= m["packing"]["plain_padded_tokens"] and m["adapter_mb"] > 0
    layers = m["checkpointed_layers"]  # the smoke preset's checkpoint_every_n_layers 0: by the compute dtype
    every_n = 1 if layers["compute_dtype"] == "float32" else 2
    assert layers["every_n_layers"] == every_n and layers["recomputed"] == math.ceil(layers["of"] / every_n) > 0


def _quantization(m: dict) -> None:
    assert m["table"] and m["footprint_by_role"]
    # offline: the weights are the de-quantized GGUF copy, said in the table, and the gap to the original is skipped
    assert m["weights"] == "fp32 (de-quantized Q4_1)" and "fp32 (de-quantized Q4_1)" in [r["format"] for r in m["table"]]
    assert "HF_HUB_OFFLINE is set" in m["source_gap"]["skipped"]
    for r in m["table"]:  # every quality number with its interval, every timing with its spread
        for column in ("perplexity", "perplexity_vs_reference", "zero_shot_accuracy"):
            assert r[f"{column}_low"] <= r[column] <= r[f"{column}_high"]
        for column in ("ttft_ms", "decode_tokens_per_s"):
            assert 0 < r[f"{column}_min"] <= r[column] <= r[f"{column}_max"]
        assert all(r[step] > 0 for step in ("read_s", "load_model_s", "first_call_s"))  # load time, split by step
    reference = next(r for r in m["table"] if r["format"] == m["reference"])  # the reference against itself
    assert reference["perplexity_vs_reference"] == reference["perplexity_vs_reference_high"] == 0
    assert m["speed_repeats"] >= 2 and m["arithmetic"]["nf4_dq_bytes_per_weight"] < m["arithmetic"]["nf4_bytes_per_weight"]


def _memory_lab(m: dict) -> None:
    assert m["sweep"] and _finite(m["estimate_mib"], m["max_abs_error"]) and m["estimate_mib"] > 0
    assert all(r["optimizer_step_seconds"] > 0 and "=" not in r["setting"] for r in m["sweep"])  # readable labels
    assert any(r["accumulation"] > 1 for r in m["sweep"])  # an accumulation run, measured
    kept = m["trainable_state_mib"]["accumulated gradients (fp32)"]
    assert kept == 4 * m["trainable_params"] / 2**20 > 0  # printed from the model's own parameter count
    chunked = m["chunked_loss"]  # the smoke preset sweeps the loss in chunks: its predicted loss term shrinks
    assert chunked["predicted_loss_chunked_mib"] < chunked["predicted_loss_whole_mib"]
    assert _finite(chunked["measured_chunked_mib"], chunked["measured_whole_mib"]) and m["levers"]
    baseline = next(r["measured_mib"] for r in m["sweep"] if r["baseline"])
    assert m["noise_mib"] >= max(0.05 * baseline, abs(m["baseline_repeat_mib"] - baseline))  # measured twice
    assert all(lever["beyond noise"] == (lever["measured saving (MiB)"] > m["noise_mib"]) for lever in m["levers"])
    assert all(lever["predicted beyond noise"] == (lever["predicted saving (MiB)"] > m["noise_mib"])
               for lever in m["levers"])
    assert set(m["float_params_by_dtype"]["after_preparing"]) == {"float32"}  # peft's cast for k-bit training, printed


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
    assert any(name.startswith("GGUF") for name in generator) and m["sizes_mib"]["generator gguf-q8_0"] > 0
    assert next(iter(generator.values()))["loss_delta_vs_source"]["estimate"] == 0  # the source against itself
    for row in generator.values():  # a Wilson interval per format, a paired interval for its delta to the source
        ci, delta = row["format_adherence"], row["delta_vs_source"]
        assert 0 <= ci["low"] <= ci["estimate"] <= ci["high"] <= 1 and delta["low"] <= delta["estimate"] <= delta["high"]
        assert 0 <= row["identical"] <= 1
        loss, loss_delta = row["reference_loss"], row["loss_delta_vs_source"]  # a loss per answer token, paired delta
        assert 0 < loss["low"] <= loss["estimate"] <= loss["high"] and loss_delta["low"] <= loss_delta["estimate"] <= loss_delta["high"]
    assert all(r["macro_f1"]["low"] <= r["macro_f1"]["estimate"] <= r["macro_f1"]["high"] for r in classifier.values())
    engines = {r["engine"] for r in m["speed"]}
    # no ordering between the two timings: on the 2-layer test model a 1-token call and a 6-token call both take
    # about a millisecond, and which median comes out lower is noise on a loaded machine
    assert all(r["tokens_per_s"] > 0 and _finite(r["ttft_s"], r["seconds"]) and min(r["ttft_s"], r["seconds"]) > 0
               for r in m["speed"]) and len(engines) >= 4
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


def _experiments(m: dict) -> None:
    sweep = m["sweep"]  # every run of the sweep ran, one setting was chosen on validation, its test read
    assert sweep["runs"] == sweep["ok"] > 0 and sweep["failed"] == 0
    assert set(sweep["chosen"]) == set(sweep["grid"]) and sweep["chosen_test"]
    assert all(t["test_macro_f1_low"] <= t["test_macro_f1"] <= t["test_macro_f1_high"] for t in sweep["chosen_test"])
    assert m["monitoring"]["runs_with_curves"] == sweep["runs"] and m["monitoring"]["loss_points"] > 0
    variants = m["variants"]  # every variant's runs finished; one row per variant, at its rate
    assert variants["runs"] > 0 and variants["failed"] == 0
    assert variants["rate_chosen_per_variant"] == (len(variants["learning_rates"]) > 1)
    assert all(0 <= row["validation_mean"] <= 1 and row["adapter_mib"] > 0 for row in variants["by_variant"])
    resume = m["resume"]  # a real kill mid-training, then a resume that trained to the end
    assert resume["status"] == "ok" and resume["attempts"] == ["dead_kernel"]
    # the smoke's demonstration is the suite's NF4 base with the paged 8-bit AdamW (presets.yaml), killed in its
    # second of 2 epochs and compared with the same training left alone (fp32: tests/test_resume.py)
    assert resume["final_step"] // 2 < resume["killed_at_step"] < resume["final_step"]
    gaps = resume["largest_difference"]
    assert len(gaps) == 4 and all(gap <= 1e-6 for gap in gaps.values()), gaps
    cost = {row["sweep"]: row for row in m["cost"]}  # printed from the results tables
    swept = cost["sweep of " + " x ".join(sweep["grid"])]
    assert swept["runs"] == sweep["runs"] and swept["hours of runs"] > 0
    assert sum(row["runs"] for name, row in cost.items() if name.startswith("variants")) == variants["runs"]


def _multitask(m: dict) -> None:
    same = m["shared_vs_alone"]  # every task on the shared base computes what its folder computes alone
    for task in ("category", "priority"):
        assert same[task]["max_probability_diff"] <= 1e-5 and same[task]["identical_predictions"]
        shared = same[task]["test_macro_f1_shared"]
        assert shared == same[task]["test_macro_f1_alone"] and shared["low"] <= shared["estimate"] <= shared["high"]
    generators = [task for task, row in same.items() if "max_logit_diff" in row]
    assert len(generators) >= 2 and all(same[t]["max_logit_diff"] <= 1e-5 for t in generators)
    assert max(m["fresh_process_max_diff"].values()) <= 1e-5  # a new process loading the folders by task name
    # the smoke runs a 2-layer test model whose resident-memory deltas are allocator noise; the bytes of weights
    # held are not: one base for every task against one base per task
    weights = m["memory"]["weights_mib"]
    assert 0 < weights["one base"] < weights["separate"] / (m["memory"]["tasks"] - 1)
    equality = m["mixed_equality"]  # one batch, one adapter per row == each row with its own task
    assert equality["generation_max_logit_diff"] <= 1e-5 and equality["classification_max_probability_diff"] <= 1e-5
    assert all(r["tokens_per_s"] > 0 and r["tickets_per_s"] > 0 for r in m["mixed_speed"])
    assert len(m["guards"]) == 5 and 0 <= m["head_mixup_changed_share"] <= 1
    shared = m["shared_adapter"]  # one adapter, two heads, against the separate classifiers, on both splits
    assert set(shared["macro_f1"]) == {f"{s}/{t}" for s in ("validation", "test") for t in ("category", "priority")}
    assert all(i["low"] <= i["estimate"] <= i["high"] for row in shared["macro_f1"].values() for i in row.values())
    assert shared["api_max_probability_diff"] <= 1e-5  # the saved folder's heads as MultiTaskModel tasks
    cost = shared["cost"]
    assert cost["one shared adapter, two heads"]["trainable parameters"] < cost["two separate adapters"]["trainable parameters"]
    combos = m["combinations"]  # cat is exactly the weighted sum of the updates; linear is not, once they are non-zero
    assert combos["sum_error"]["cat"]["max_abs"] <= 1e-5 and all(0 <= r["rate"] <= 1 for r in combos["adherence"])
    if "linear" in combos["sum_error"] and combos["largest_update"] > 0:
        assert combos["sum_error"]["linear"]["relative"] > 1e-3


METRIC_CHECKS = {"00_quickstart": _quickstart, "01_ticket_classification": _tickets,
                 "02_domain_generation": _domains, "03_quantization": _quantization, "04_memory_lab": _memory_lab,
                 "05_lora_from_scratch": _lora_from_scratch, "07_inference_and_serving": _inference_and_serving,
                 "09_scale_out": _scale_out, "08_experiments": _experiments,
                 "06_multitask_adapters": _multitask}


# What a notebook keeps between its runs and would only read the next time (a sweep fills in what is
# missing): removed first, so that each test run runs it
KEPT_BETWEEN_RUNS = {"08_experiments": ["sweep", "variants"]}


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_with_smoke_preset(notebook):
    assert "smoke" in presets_for(notebook), f"{notebook.name} needs a smoke preset in notebooks/presets.yaml"
    for kept in KEPT_BETWEEN_RUNS.get(notebook.stem, []):
        shutil.rmtree(ROOT / "runs" / "tests" / notebook.stem / kept, ignore_errors=True)
    try:
        result = run_notebook(notebook, preset="smoke", output_dir=ROOT / "runs" / "tests" / notebook.stem,
                              progress=False, cell_timeout=900, force=True)
    except NotebookFailed as e:
        pytest.fail(str(e), pytrace=False)
    record = json.loads((result.run_dir / "run.json").read_text())
    assert (record["status"], record["exit_code"], record["preset"]) == ("ok", 0, "smoke")
    assert record["parameters"]["output_dir"] == str(result.run_dir)  # the notebook wrote where we look
    assert "env" in result.metrics and "probes" in result.metrics, "the notebook saved no metrics.json"
    process_peak = result.metrics["process_peak_rss_mib"]  # covers what the probes saw, and what they did not
    assert process_peak > 0 and process_peak >= max((p["rss_peak_mib"] for p in result.metrics["probes"]), default=0)
    METRIC_CHECKS.get(notebook.stem, lambda metrics: None)(result.metrics)
