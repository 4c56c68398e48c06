"""ftnb.export: every export reloads and answers like the adapter model it came from, the
CTranslate2 conversion runs, and wrong folders get errors that say what to pass.

On tiny-llama-test with NF4 adapters whose updates are non-zero (random B), so a merge that lost
the adapter would answer like the base model; the first test checks that it would (the prompts
tell the two apart), else agreement could not fail. About 15 s."""
import json

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from ftnb import export, saved
from ftnb.models import load_model, load_tokenizer
from ftnb.tasks import classify, sft

ROWS = [{"instruction": "Explain this contract clause in plain English.", "input": "The tenant shall pay rent monthly."},
        {"instruction": "Diagnose this error and suggest a fix.", "input": "ModuleNotFoundError: No module named 'requests'"},
        {"instruction": "Explain this clinical note to the patient.", "input": "34F c/o cough x 3/7. Chest clear."}]
LABELS = ["billing", "refund", "shipping", "feedback"]
TICKETS = ["Charged twice for May", "I want my 49 euros back", "Order BD-123 has not moved", "Great new dashboard",
           "The receipt has no VAT number", "You promised a refund ten days ago"]
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def tok(tiny_model_path):
    return load_tokenizer(tiny_model_path)


@pytest.fixture(scope="module")
def prompts(tok):
    return export.chat_prompts(tok, ROWS)


def _lora(task_type: str, **extra) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type=task_type,
                      **extra)


@pytest.fixture(scope="module")
def generator_dir(tiny_model_path, tok, tmp_path_factory):
    torch.manual_seed(0)
    model = get_peft_model(load_model(tiny_model_path, quantization="nf4"), _lora("CAUSAL_LM"))
    return sft.save_generator(model, tok, tmp_path_factory.mktemp("generator"), base_model="tiny-llama-test")


@pytest.fixture(scope="module")
def classifier_dir(tiny_model_path, tok, tmp_path_factory):
    torch.manual_seed(0)
    id2label, label2id = classify.label_maps(LABELS)
    base = load_model(tiny_model_path, task="seq-cls", quantization="nf4", num_labels=len(LABELS),
                      id2label=id2label, label2id=label2id, tokenizer=tok)
    model = get_peft_model(base, _lora("SEQ_CLS", modules_to_save=["score"]))
    clf = classify.Classifier(model, tok, LABELS, base_model="tiny-llama-test", max_length=32, text_fields=["text"])
    return clf.save(tmp_path_factory.mktemp("classifier"))


@pytest.fixture(scope="module")
def exports(generator_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    fp32 = export.merged(generator_dir, root / "fp32")
    return {"fp32": fp32, "bf16": export.merged(generator_dir, root / "bf16", torch.bfloat16),
            "ct2-float32": export.to_ctranslate2(fp32, root / "ct2-float32", quantization="float32"),
            "ct2-int8": export.to_ctranslate2(fp32, root / "ct2-int8")}


@pytest.fixture(scope="module")
def reference(generator_dir, prompts):
    """The adapter model's greedy outputs, one prompt at a time (no padding involved)."""
    engine = export.TransformersEngine.load(generator_dir)
    return [engine.greedy([p], NEW_TOKENS)[0] for p in prompts]


def test_the_prompts_tell_the_adapter_from_the_base(tiny_model_path, tok, prompts, reference):
    base = export.TransformersEngine(load_model(tiny_model_path, dtype=torch.float32), tok)
    without_adapter = [base.greedy([p], NEW_TOKENS)[0] for p in prompts]
    assert export.agreement(reference, without_adapter)["identical"] < 1


def test_merged_fp32_reloads_with_identical_greedy_outputs(exports, prompts, reference):
    manifest = saved.read_manifest(exports["fp32"])
    assert (manifest["weights"]["format"], manifest["dtype"], manifest["quantization"]) == ("merged", "float32", None)
    engine = export.TransformersEngine.load(exports["fp32"])
    assert export.agreement(reference, engine.greedy(prompts, NEW_TOKENS))["identical"] == 1.0  # batched, left-padded


def test_merged_bf16_is_stored_in_bf16_and_starts_like_the_adapter_model(exports, prompts, reference):
    engine = export.TransformersEngine.load(exports["bf16"])
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    outputs = [engine.greedy([p], NEW_TOKENS)[0] for p in prompts]
    # bf16 keeps 8 bits of mantissa: near-ties may flip later, the first tokens must agree
    assert [o[:2] for o in outputs] == [r[:2] for r in reference]


def test_ctranslate2_float32_reproduces_the_adapter_model(exports, prompts, reference):
    """Same weights, another engine: identical greedy outputs prove prompt, stop tokens and
    conversion are wired right (int8 below may differ for its own reason, rounding)."""
    engine = export.CTranslate2Engine.load(exports["ct2-float32"], compute_type="float32")
    assert export.agreement(reference, engine.greedy(prompts, NEW_TOKENS))["identical"] == 1.0


def test_ctranslate2_int8_runs_and_records_what_it_came_from(exports, prompts, reference):
    """int8 rounds every weight. On this tiny random model the next-token probabilities are near uniform,
    so greedy choices are near-ties: int8's tokens may differ from float32's, and which ones depends on
    the CPU's int8 kernels. Its logits must still follow float32's (correlation about 0.95 measured;
    the base without the adapter: about 0.13)."""
    record = json.loads((exports["ct2-int8"] / export.EXPORT_MANIFEST).read_text())
    assert record["quantization"] == "int8" and record["task"]["system"] == sft.SYSTEM_PROMPT
    engine = export.CTranslate2Engine.load(exports["ct2-int8"])
    forced = engine.greedy(prompts, 4, min_new_tokens=4)
    assert [len(o) for o in forced] == [4] * len(prompts)
    float32 = export.CTranslate2Engine.load(exports["ct2-float32"], compute_type="float32")
    for prompt, answer in zip(prompts, reference):
        tokens = [engine.tokenizer.convert_ids_to_tokens([*prompt, *answer])]
        int8_logits, float32_logits = (np.array(e.generator.forward_batch(tokens))[0] for e in (engine, float32))
        assert np.corrcoef(int8_logits.ravel(), float32_logits.ravel())[0, 1] > 0.8


def test_merged_classifier_predicts_like_the_adapter(classifier_dir, tmp_path):
    folder = export.merged(classifier_dir, tmp_path / "classifier-fp32")
    adapter, merged = saved.load(classifier_dir), saved.load(folder)
    assert saved.read_manifest(folder)["weights"]["format"] == "merged"
    records = [{"text": t} for t in TICKETS]
    np.testing.assert_allclose(merged.probabilities(records), adapter.probabilities(records), atol=1e-4)
    speed = export.time_classifier(merged, records, [1, 4], repeats=1)
    assert [r["batch"] for r in speed] == [1, 4] and all(r["records_per_s"] > 0 for r in speed)


def test_time_generation_forces_the_length_it_reports(exports, prompts):
    engine = export.CTranslate2Engine.load(exports["ct2-int8"])
    lengths = []  # tokens each timed call returned per prompt: the rows' rates assume exactly new_tokens

    def recording_greedy(batch, max_new_tokens, min_new_tokens=0):
        outputs = type(engine).greedy(engine, batch, max_new_tokens, min_new_tokens)
        lengths.append((max_new_tokens, [len(o) for o in outputs]))
        return outputs

    engine.greedy = recording_greedy
    rows = export.time_generation(engine, prompts, [1, 2], new_tokens=3, repeats=1)
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["ttft_s"] > 0 and r["seconds"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    # wall-clock order (ttft < total) is noise at 3 tokens; the lengths are what makes the rates true
    assert all(got == [asked] * len(got) for asked, got in lengths) and {asked for asked, _ in lengths} == {1, 3}
    assert rows[1]["tokens_per_s"] == pytest.approx(2 * 3 / rows[1]["seconds"])
    assert rows[1]["requests_per_s"] == pytest.approx(2 / rows[1]["seconds"])


def test_agreement_finds_the_first_differing_token():
    result = export.agreement([[1, 2, 3], [1, 2, 3], [4, 5]], [[1, 2, 3], [1, 9, 3], [4, 5, 6]])
    assert result["first_difference"] == [None, 1, 2] and result["identical"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="same prompts"):
        export.agreement([[1]], [])


def test_wrong_folders_say_what_to_pass(generator_dir, classifier_dir, exports, tmp_path):
    with pytest.raises(FileNotFoundError, match="no folder"):
        export.merged(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ValueError, match="holds a classifier: CTranslate2 runs text generation only"):
        export.to_ctranslate2(classifier_dir, tmp_path / "ct2")
    with pytest.raises(ValueError, match="holds adapters: merge them first"):
        export.to_ctranslate2(generator_dir, tmp_path / "ct2")
    with pytest.raises(ValueError, match="holds merged weights already"):
        export.merged(exports["fp32"], tmp_path / "again")
    with pytest.raises(ValueError, match="holds a classifier, not a generator"):
        export.TransformersEngine.load(classifier_dir)
    with pytest.raises(FileNotFoundError, match="to_ctranslate2"):
        export.CTranslate2Engine.load(exports["fp32"])
    assert not (tmp_path / "ct2").exists()  # nothing half-written


def test_reference_nll_agrees_across_engines_and_with_the_training_loss(generator_dir, exports, tiny_model_path, tok):
    """The log-likelihood of given answers, batched with left padding, equals sft.response_nll's (the
    loss recipe 02 reports, right-padded) on the adapter model, and CTranslate2 float32 gives the same
    numbers; the base model gives others, so the check can tell models apart."""
    rows = [{**row, "output": answer} for row, answer in zip(ROWS, ["Pay each month.", "Run pip install requests.",
                                                                   "You have had a cough for three days."])]
    source = export.TransformersEngine.load(generator_dir)
    expected = [r["nll"] for r in sft.response_nll(source.model, tok, rows)]
    engines = {"source": source, "ct2-float32": export.CTranslate2Engine.load(exports["ct2-float32"], compute_type="float32")}
    for name, engine in engines.items():
        measured = export.reference_nll(engine, tok, rows, batch_size=2)
        assert [r["tokens"] for r in measured] == [r["tokens"] for r in sft.response_nll(source.model, tok, rows)]
        np.testing.assert_allclose([r["nll"] for r in measured], expected, rtol=1e-4, atol=1e-3, err_msg=name)
    base = export.TransformersEngine(load_model(tiny_model_path, dtype=torch.float32), tok)
    assert not np.allclose([r["nll"] for r in export.reference_nll(base, tok, rows)], expected, atol=1e-2)


def test_gguf_holds_the_merged_weights(generator_dir, exports, prompts, reference, tok, tmp_path):
    """llama.cpp's converter (downloaded from PyPI once) writes the merged model; read back by
    transformers' GGUF reader, f32 answers exactly like the adapter model and q8_0 starts like it."""
    f32 = export.to_gguf(exports["fp32"], tmp_path / "model-f32.gguf", outtype="f32")
    engine = export.TransformersEngine.load_gguf(f32, tok)
    assert export.agreement(reference, engine.greedy(prompts, NEW_TOKENS))["identical"] == 1.0
    q8 = export.to_gguf(exports["fp32"], tmp_path / "model-q8_0.gguf")
    assert q8.stat().st_size < 0.4 * f32.stat().st_size  # 8.5 bits per weight against 32
    outputs = export.TransformersEngine.load_gguf(q8, tok).greedy(prompts, NEW_TOKENS)
    assert [o[0] for o in outputs] == [r[0] for r in reference]
    with pytest.raises(ValueError, match="merge them first"):
        export.to_gguf(generator_dir, tmp_path / "x.gguf")
