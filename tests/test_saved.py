"""ftnb.saved: one manifest for every saved model, one load for every folder, and a reload in a fresh
process that reproduces the trained model (tiny-llama-test, NF4 and unquantized, trained two steps
with an evaluation and a checkpoint in between, as the recipes' Trainers do).

Worth its ~25 s (one fresh process for all four reloads): these comparisons are what found that
evaluating and checkpointing a 4-bit model on an AVX512-BF16 CPU shifted its frozen base (see
ftnb.models.keep_training_kernel)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import DataCollatorForLanguageModeling, DataCollatorWithPadding, Trainer, TrainingArguments

from ftnb import models, saved
from ftnb.inference import chat_inputs
from ftnb.models import load_model, load_tokenizer
from ftnb.tasks import classify, sft

LABELS = ["billing", "refund", "shipping", "feedback"]
RECORDS = [
    {"title": "Charged twice", "text": "Invoice INV-1 shows two charges for May.", "intent": "billing"},
    {"title": "Money back please", "text": "I want my 49 euros back for the headset.", "intent": "refund"},
    {"title": "Where is my parcel", "text": "Order BD-123 has not moved for a week.", "intent": "shipping"},
    {"title": "Love the app", "text": "Great work on the new dashboard!", "intent": "feedback"},
    {"title": "VAT missing", "text": "The receipt has no VAT number on it.", "intent": "billing"},
    {"title": "Refund status", "text": "You promised a refund ten days ago.", "intent": "refund"},
]
TEXT_FIELDS = ["title", "text"]
PROMPTS = [("Explain this contract clause in plain English.", "The tenant shall pay rent monthly."),
           ("Summarise the note.", "Patient reports mild headache, no fever.")]
TOLERANCE = 1e-5  # the reload must reproduce the trained model, not approximate it


def _args(folder: Path, **overrides) -> TrainingArguments:
    """Two optimizer steps with an evaluation and a checkpoint after each, as the recipes train."""
    settings = dict(output_dir=str(folder / "checkpoints"), max_steps=2, per_device_train_batch_size=3,
                    per_device_eval_batch_size=3, learning_rate=5e-3, eval_strategy="steps", eval_steps=1,
                    save_strategy="steps", save_steps=1, report_to="none", disable_tqdm=True,
                    use_cpu=not torch.cuda.is_available(), seed=0)
    return TrainingArguments(**{**settings, **overrides})


def train_classifier(folder: Path, quantization: str, dtype: torch.dtype | None = None,
                     layers_in_compute_dtype: bool = False) -> classify.Classifier:
    tok = load_tokenizer("tiny-llama-test")
    id2label, label2id = classify.label_maps(LABELS)
    model = load_model("tiny-llama-test", task="seq-cls", quantization=quantization, dtype=dtype,
                       num_labels=len(LABELS), id2label=id2label, label2id=label2id, tokenizer=tok)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    if layers_in_compute_dtype:  # as recipe 01 does in bf16
        assert models.layers_in_compute_dtype(model, dtype) > 0
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules="all-linear",
                                             modules_to_save=["score"]))
    data = classify.tokenize_split(Dataset.from_list(RECORDS), tok, "intent", LABELS, max_length=32,
                                   text_fields=TEXT_FIELDS)
    Trainer(model=model, args=_args(folder, gradient_checkpointing=True), train_dataset=data, eval_dataset=data,
            data_collator=DataCollatorWithPadding(tok)).train()
    return classify.Classifier(model, tok, LABELS, base_model="tiny-llama-test", max_length=32,
                               label_field="intent", text_fields=TEXT_FIELDS)


def train_generator(folder: Path, quantization: str, dtype: torch.dtype | None = None):
    tok = load_tokenizer("tiny-llama-test")
    model = load_model("tiny-llama-test", quantization=quantization, dtype=dtype)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear"))
    data = Dataset.from_dict(tok([f"{a}\n\n{b}" for a, b in PROMPTS * 3]))
    Trainer(model=model, args=_args(folder), train_dataset=data, eval_dataset=data,
            data_collator=DataCollatorForLanguageModeling(tok, mlm=False)).train()
    return sft.Generator(model, tok, decoding={"max_new_tokens": 8, "repetition_penalty": 1.2})


@torch.no_grad()
def generator_outputs(generator) -> dict:
    """Last-position logits of each prompt and the greedy answers: what a reload must reproduce."""
    logits = []
    for instruction, text in PROMPTS:
        enc = chat_inputs(generator.tokenizer, sft.prompt_messages(instruction, text, generator.system),
                          generator.model.device)
        logits.append(generator.model(**enc).logits[0, -1].float().cpu().tolist())
    return {"logits": logits, "answers": [generator.generate(i, t) for i, t in PROMPTS]}


def reload_outputs(folders: dict[str, str]) -> dict:
    """What each saved folder predicts after ftnb.saved.load (run in a fresh process)."""
    out = {}
    for name, folder in folders.items():
        obj = saved.load(folder)
        out[name] = (obj.probabilities(RECORDS).tolist() if isinstance(obj, classify.Classifier)
                     else generator_outputs(obj))
    return out


def reload_in_fresh_process(folders: dict[str, Path]) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_saved; "
            f"print(json.dumps(test_saved.reload_outputs(json.loads(sys.argv[1]))))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps({k: str(v) for k, v in folders.items()})],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


CASES = [("classifier", "nf4"), ("classifier", "none"), ("generator", "nf4"), ("generator", "none")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Each case trained, its in-memory outputs, its saved folder, and every folder reloaded in ONE
    fresh process (a process start costs more than all four reloads)."""
    results, folders = {}, {}
    for kind, quantization in CASES:
        name = f"{kind}-{quantization}"
        root = tmp_path_factory.mktemp(name)
        if kind == "classifier":
            obj = train_classifier(root, quantization)
            before = obj.probabilities(RECORDS).tolist()
            folders[name] = obj.save(root / "saved")
        else:
            obj = train_generator(root, quantization)
            before = generator_outputs(obj)
            folders[name] = sft.save_generator(obj.model, obj.tokenizer, root / "saved", base_model="tiny-llama-test",
                                               decoding=obj.decoding)
        results[name] = {"object": obj, "before": before}
    after = reload_in_fresh_process(folders)
    return {name: {**r, "folder": folders[name], "after": after[name]} for name, r in results.items()}


@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_reloaded_classifier_gives_the_same_probabilities(trained, quantization):
    case = trained[f"classifier-{quantization}"]
    before, after = np.array(case["before"]), np.array(case["after"])
    assert (before.argmax(1) == after.argmax(1)).all()
    assert np.abs(before - after).max() <= TOLERANCE
    # the in-memory model did not change by being saved
    assert np.abs(case["object"].probabilities(RECORDS) - before).max() <= TOLERANCE


@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_reloaded_generator_gives_the_same_logits_and_answers(trained, quantization):
    case = trained[f"generator-{quantization}"]
    assert np.abs(np.array(case["before"]["logits"]) - np.array(case["after"]["logits"])).max() <= TOLERANCE
    assert case["after"]["answers"] == case["before"]["answers"]


def test_manifest_describes_a_quantized_classifier(trained):
    manifest = saved.read_manifest(trained["classifier-nf4"]["folder"])
    assert manifest["format_version"] == saved.FORMAT_VERSION and manifest["kind"] == "classifier"
    assert manifest["base_model"]["name"] == "tiny-llama-test"
    assert manifest["base_model"]["origin"].startswith("ftnb registry: random 2-layer Llama")
    assert manifest["quantization"] == {"type": "nf4", "double_quant": True, "compute_dtype": "float32",
                                        "quant_storage": "uint8", "skip_modules": ["lm_head", "score", "classifier"]}
    assert manifest["dtype"] == "float32" and manifest["parameter_dtypes"] == {}
    assert manifest["preparation"] == {"gradient_checkpointing": True, "input_require_grads": True}
    assert manifest["weights"] == {"format": "adapters", "adapters": {"default": {"peft_type": "LORA", "path": "."}},
                                   "active": "default"}
    assert manifest["task"] == {"head": "score", "labels": LABELS, "label_field": "intent",
                                "text_fields": TEXT_FIELDS, "max_length": 32, "pooling": "last"}
    assert set(manifest["libraries"]) == {"torch", "transformers", "peft", "bitsandbytes", "accelerate", "ftnb"}
    assert manifest["libraries"]["torch"] == torch.__version__
    assert not (trained["classifier-nf4"]["folder"] / "classifier.json").exists()


def test_manifest_describes_a_generator_and_its_merged_export(trained, tmp_path):
    adapter = trained["generator-nf4"]["folder"]
    manifest = saved.read_manifest(adapter)
    assert manifest["kind"] == "generator" and manifest["quantization"]["type"] == "nf4"
    assert manifest["task"] == {"system": sft.SYSTEM_PROMPT,
                                "decoding": {"max_new_tokens": 8, "repetition_penalty": 1.2}}
    assert manifest["preparation"] == {"gradient_checkpointing": False, "input_require_grads": False}
    merged = saved.read_manifest(sft.export_merged(adapter, tmp_path / "merged"))
    assert merged["weights"]["format"] == "merged" and merged["quantization"] is None
    assert merged["weights"]["merged_from"]["quantization"] == manifest["quantization"]
    assert merged["base_model"] == manifest["base_model"] and merged["task"] == manifest["task"]


def test_load_returns_the_right_object_for_every_folder(trained, tmp_path):
    classifier = saved.load(trained["classifier-none"]["folder"], batch_size=2)
    assert isinstance(classifier, classify.Classifier) and classifier.batch_size == 2
    assert classifier.text_fields == TEXT_FIELDS and classifier.label_field == "intent"
    generator = saved.load(trained["generator-none"]["folder"])
    assert isinstance(generator, sft.Generator) and hasattr(generator.model, "peft_config")
    merged = saved.load(sft.export_merged(trained["generator-none"]["folder"], tmp_path / "merged"))
    assert isinstance(merged, sft.Generator) and not hasattr(merged.model, "peft_config")
    assert merged.decoding == generator.decoding
    instruction, text = PROMPTS[0]
    assert merged.generate(instruction, text) == trained["generator-none"]["before"]["answers"][0]


def test_evaluating_and_saving_leave_a_4bit_model_unchanged():
    """On a CPU with AVX512-BF16, bitsandbytes would compute an evaluated 4-bit layer in bf16 and
    re-quantize its scales at every save: the model after a save differs from a fresh load."""
    tok = load_tokenizer("tiny-llama-test")
    enc = tok(["I was charged twice for my order"], return_tensors="pt")
    model = load_model("tiny-llama-test", quantization="nf4").eval()
    with torch.no_grad():
        first = model(**enc).logits
        model.state_dict()  # what save_pretrained and every Trainer checkpoint do
        after_save = model(**enc).logits
        model.train()
        in_training = model(**enc).logits  # the kernel training uses
    assert torch.equal(first, after_save) and torch.equal(first, in_training)


def test_half_precision_casts_are_replayed(tmp_path):
    """prepare_model_for_kbit_training casts a half-precision base to fp32 even without quantization
    (the issue's example, on a GPU in fp16). Recorded per parameter, replayed on load: the reload
    computes in fp32 like the trained model, instead of in the fp16 of a plain load."""
    tok = load_tokenizer("tiny-llama-test")
    model = load_model("tiny-llama-test", task="seq-cls", dtype=torch.float16, num_labels=len(LABELS), tokenizer=tok)
    model = get_peft_model(prepare_model_for_kbit_training(model), LoraConfig(
        task_type="SEQ_CLS", r=4, target_modules="all-linear", modules_to_save=["score"], init_lora_weights=False))
    clf = classify.Classifier(model, tok, LABELS, base_model="tiny-llama-test", text_fields=TEXT_FIELDS)
    manifest = saved.read_manifest(clf.save(tmp_path / "clf"))
    assert manifest["dtype"] == "float16"
    recorded = manifest["parameter_dtypes"]
    assert recorded["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"] == "float32"
    assert len(recorded) == sum(1 for _ in model.parameters())  # every parameter was cast
    reloaded = saved.load(tmp_path / "clf")
    assert {p.dtype for p in reloaded.model.parameters()} == {torch.float32}
    assert np.abs(reloaded.probabilities(RECORDS) - clf.probabilities(RECORDS)).max() <= TOLERANCE


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (fp16 training)")
def test_fp16_gpu_classifier_reloads_in_a_fresh_process(tmp_path):
    clf = train_classifier(tmp_path, "none", dtype=torch.float16)
    assert saved.read_manifest(clf.save(tmp_path / "saved"))["dtype"] == "float16"
    before = clf.probabilities(RECORDS)
    after = np.array(reload_in_fresh_process({"fp16": tmp_path / "saved"})["fp16"])
    assert (before.argmax(1) == after.argmax(1)).all()
    assert np.abs(before - after).max() <= TOLERANCE


@pytest.mark.parametrize("layers_in_compute_dtype", [False, True], ids=["fp32 layers", "bf16 layers"])
def test_a_bf16_base_reloads_with_its_fp32_head_and_adapter_exact(tmp_path, layers_in_compute_dtype):
    """A 4-bit base computing in bf16 (a GPU, or recipe 01's cpu_bf16) keeps the head and the LoRA
    weights in fp32: the reload must not round them through the base's bf16 on the way in. With its
    layers' norms in bf16 (ftnb.models.layers_in_compute_dtype) the reload keeps them so, and the final norm in fp32."""
    clf = train_classifier(tmp_path, "nf4", dtype=torch.bfloat16, layers_in_compute_dtype=layers_in_compute_dtype)
    manifest = saved.read_manifest(clf.save(tmp_path / "saved"))
    assert manifest["dtype"] == "bfloat16" and manifest["quantization"]["compute_dtype"] == "bfloat16"
    recorded = manifest["parameter_dtypes"]
    assert any("score" in name and dtype == "float32" for name, dtype in recorded.items())
    assert any(name.endswith("model.norm.weight") for name in recorded)
    assert any("layernorm" in name for name in recorded) != layers_in_compute_dtype
    before, after = clf.probabilities(RECORDS), saved.load(tmp_path / "saved").probabilities(RECORDS)
    assert np.abs(before - after).max() <= TOLERANCE


def test_several_named_adapters_on_one_base(tmp_path):
    """The format one base with several adapters will use: each adapter listed, the active one kept."""
    tok = load_tokenizer("tiny-llama-test")
    model = get_peft_model(load_model("tiny-llama-test"), LoraConfig(r=4, target_modules=["q_proj"],
                                                                     init_lora_weights=False), adapter_name="legal")
    model.add_adapter("medical", LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    model.set_adapter("medical")
    folder = sft.save_generator(model, tok, tmp_path / "two", base_model="tiny-llama-test")
    weights = saved.read_manifest(folder)["weights"]
    assert weights["adapters"] == {"legal": {"peft_type": "LORA", "path": "legal"},
                                   "medical": {"peft_type": "LORA", "path": "medical"}}
    assert weights["active"] == "medical"
    reloaded = saved.load(folder).model
    assert set(reloaded.peft_config) == {"legal", "medical"} and reloaded.active_adapter == "medical"
    enc = tok(["hello there"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(reloaded(**enc).logits, model.eval()(**enc).logits, atol=TOLERANCE)


# ---------------------------------------------------------------- clear errors
def test_a_folder_without_a_manifest_says_what_it_is_not(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no ftnb_model.json, so it is not a model saved by ftnb"):
        saved.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no folder"):
        saved.load(tmp_path / "missing")


@pytest.mark.parametrize("change, message", [
    (lambda m: "{not json", "is not valid JSON"),
    (lambda m: {**m, "format": "other"}, "is not an ftnb model manifest"),
    (lambda m: {**m, "format_version": 99}, r"written by a newer ftnb \(format version 99; this ftnb reads up to 1\)"),
    (lambda m: {**m, "kind": "multi-task"}, "unknown kind 'multi-task'; this ftnb loads classifier, multihead, generator"),
    (lambda m: {k: v for k, v in m.items() if k != "quantization"}, "lacks quantization; save the model again"),
    (lambda m: {**m, "task": {"labels": ["a"]}}, "lacks task.head, task.label_field"),
])
def test_a_bad_manifest_is_a_clear_error(trained, tmp_path, change, message):
    folder = _copy(trained["classifier-none"]["folder"], tmp_path)
    changed = change(json.loads((folder / saved.MANIFEST).read_text()))
    (folder / saved.MANIFEST).write_text(changed if isinstance(changed, str) else json.dumps(changed))
    with pytest.raises(saved.ManifestError, match=message):
        saved.load(folder)


def test_missing_weights_are_named(trained, tmp_path):
    folder = _copy(trained["classifier-none"]["folder"], tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="lacks adapter_model.safetensors, which its ftnb_model.json needs"):
        saved.load(folder)


def test_a_head_left_out_of_the_adapter_is_refused_at_save(tmp_path):
    tok = load_tokenizer("tiny-llama-test")
    model = load_model("tiny-llama-test", task="seq-cls", num_labels=2, tokenizer=tok)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))  # no task_type: score not saved
    with pytest.raises(ValueError, match=r"does not save the trained head 'score'.*modules_to_save=\['score'\]"):
        classify.Classifier(model, tok, ["a", "b"], base_model="tiny-llama-test").save(tmp_path / "clf")


def _copy(folder: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(folder, tmp_path / "copy"))
