"""ftnb.multitask: saved classifiers, generators and a multihead classifier (one adapter, two heads) on ONE
base, each asked for by task name, compute what each folder computes alone (also in a fresh process), mixed
batches equal per-row runs, and the guards; the server serves each head of a multihead folder.
tiny-llama-test in NF4, trained a few steps as recipes 01 (WeightedTrainer, head in modules_to_save),
02 (TRL's SFTTrainer; its adapters are left in the bf16 TRL stores them in, as recipe 02 saves them where
training computes in bf16) and 06 (MultiHeadTrainer) train theirs.

Worth its ~30 s: it is the only check that a classifier's LoRA and head, moved from a
sequence-classification model onto a causal LM, still compute the saved classifier."""
import dataclasses
import inspect
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import DataCollatorWithPadding, TrainingArguments
from trl import SFTConfig, SFTTrainer

from ftnb import saved
from ftnb.models import load_model, load_tokenizer
from ftnb.multitask import MultiTaskModel, TaskView, UnknownTaskError
from ftnb.serve import load_models
from ftnb.tasks import classify, multihead, sft

BASE = "tiny-llama-test"
TICKETS = [
    {"subject": "Charged twice", "body": "Invoice INV-1 shows two charges for May.", "category": "billing", "priority": "high"},
    {"subject": "Money back please", "body": "I want my 49 euros back.", "category": "refund", "priority": "normal"},
    {"subject": "Where is my parcel", "body": "Order BD-123 has not moved for a week.", "category": "shipping", "priority": "normal"},
    {"subject": "Love the app", "body": "Great work on the new dashboard!", "category": "feedback", "priority": "low"},
    {"subject": "Site down", "body": "Nobody in the company can log in since 9:00.", "category": "billing", "priority": "urgent"},
    {"subject": "Refund status", "body": "You promised a refund ten days ago.", "category": "refund", "priority": "high"},
]
LABELS = {"category": ["billing", "refund", "shipping", "feedback"], "priority": ["low", "normal", "high", "urgent"]}
ROWS = [{"id": f"r{i}", "domain": d, "instruction": instruction, "input": text, "output": answer}
        for i, (d, instruction, text, answer) in enumerate([
            ("legal", "Explain this clause in plain English.", "The tenant shall pay rent monthly.", "Summary: pay monthly."),
            ("medical", "Summarise the note.", "Patient reports mild headache, no fever for two days.", "Assessment: mild."),
            ("legal", "Explain this clause.", "Either party may terminate with 30 days notice.", "Summary: 30 days."),
            ("medical", "Summarise the note.", "Cough for a week, no shortness of breath.", "Assessment: cough."),
        ])]
TOLERANCE = 1e-5  # fp32: the same weights must compute the same numbers, not approximately


def _args(folder: Path, **extra) -> dict:
    return dict(output_dir=str(folder / "checkpoints"), max_steps=3, learning_rate=5e-2, per_device_train_batch_size=3,
                save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, seed=0, **extra)


def train_classifier(folder: Path, label_field: str) -> Path:
    """Recipe 01's path: NF4 seq-cls model, LoRA with the head in modules_to_save, WeightedTrainer."""
    tok, labels = load_tokenizer(BASE), LABELS[label_field]
    id2label, label2id = classify.label_maps(labels)
    model = load_model(BASE, task="seq-cls", quantization="nf4", num_labels=len(labels), id2label=id2label,
                       label2id=label2id, tokenizer=tok)
    model = get_peft_model(prepare_model_for_kbit_training(model, use_gradient_checkpointing=False), LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=["score"]))
    data = classify.tokenize_split(Dataset.from_list(TICKETS), tok, label_field, labels, max_length=32)
    classify.WeightedTrainer(model=model, args=TrainingArguments(**_args(folder)), train_dataset=data,
                             data_collator=DataCollatorWithPadding(tok)).train()
    return classify.Classifier(model, tok, labels, base_model=BASE, max_length=32, label_field=label_field).save(folder)


def train_multihead(folder: Path) -> Path:
    """Recipe 06's shared adapter: NF4 seq-cls model, one LoRA adapter, a category and a priority head."""
    tok, heads = load_tokenizer(BASE), multihead.build_heads(LABELS)
    model = load_model(BASE, task="seq-cls", quantization="nf4", tokenizer=tok, **multihead.model_labels(heads))
    model = get_peft_model(prepare_model_for_kbit_training(model, use_gradient_checkpointing=False), LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=["score"]))
    data = multihead.tokenize_split(Dataset.from_list(TICKETS), tok, heads, max_length=32)
    multihead.MultiHeadTrainer(model=model, args=TrainingArguments(**_args(folder)), train_dataset=data, heads=heads,
                               data_collator=DataCollatorWithPadding(tok)).train()
    return multihead.MultiHeadClassifier(model, tok, heads, base_model=BASE, max_length=32).save(folder)


def train_generator(folder: Path, domain: str) -> Path:
    """Recipe 02's path: NF4 causal LM, LoRA, TRL's SFTTrainer on the domain's prompt/completion rows."""
    tok = load_tokenizer(BASE)
    train, _ = sft.build_sft_dataset([r for r in ROWS if r["domain"] == domain] * 3, tok, max_length=128)
    model = get_peft_model(prepare_model_for_kbit_training(load_model(BASE, quantization="nf4"), use_gradient_checkpointing=False),
                           LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear"))
    SFTTrainer(model=model, args=SFTConfig(**_args(folder, max_length=128, completion_only_loss=True)),
               train_dataset=train, processing_class=tok).train()
    return sft.save_generator(model, tok, folder, base_model=BASE, decoding={"max_new_tokens": 6, "repetition_penalty": 1.2})


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("multitask")
    out = {name: train_classifier(root / name, name) for name in ("category", "priority")}
    out.update({domain: train_generator(root / domain, domain) for domain in ("legal", "medical")})
    out["both"] = train_multihead(root / "both")
    return {name: str(folder) for name, folder in out.items()}


@pytest.fixture(scope="module")
def mt(folders) -> MultiTaskModel:
    return MultiTaskModel.from_folders(folders)


def outputs(model_for, head_probabilities) -> dict:
    """Classifier probabilities, first-answer-token logits and greedy answers of each task, and the
    probabilities of each head of the multihead folder ("both/category", "both/priority")."""
    out = {}
    for name in ("category", "priority"):
        out[name] = model_for(name).probabilities(TICKETS).tolist()
        out[f"both/{name}"] = head_probabilities(name).tolist()
    for name in ("legal", "medical"):
        gen = model_for(name)
        rows = [r for r in ROWS if r["domain"] == name]
        out[name] = {"logits": sft.next_token_logits(gen.model, gen.tokenizer, rows, gen.system).tolist(),
                     "answers": [gen.generate(r["instruction"], r["input"]) for r in rows]}
    return out


def shared_outputs(folders: dict[str, str]) -> dict:
    """outputs() of every task on one base (run in a fresh process by the test)."""
    mt = MultiTaskModel.from_folders(folders)
    return outputs(lambda name: mt.task(name).classifier or mt.task(name).generator,
                   lambda field: mt.probabilities(f"both/{field}", TICKETS))


def test_tasks_on_one_base_compute_what_each_folder_computes_alone_in_a_fresh_process(folders):
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_multitask; "
            f"print(json.dumps(test_multitask.shared_outputs(json.loads(sys.argv[1]))))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(folders)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    shared = json.loads(done.stdout.strip().splitlines()[-1])
    both_alone = saved.load(folders["both"])
    assert isinstance(both_alone, multihead.MultiHeadClassifier)
    alone = outputs(lambda name: saved.load(folders[name]), lambda field: both_alone.probabilities(TICKETS)[field])
    for name in ("category", "priority", "both/category", "both/priority"):
        assert np.abs(np.array(shared[name]) - np.array(alone[name])).max() <= TOLERANCE, name
    for name in ("legal", "medical"):
        assert np.abs(np.array(shared[name]["logits"]) - np.array(alone[name]["logits"])).max() <= TOLERANCE, name
        assert shared[name]["answers"] == alone[name]["answers"], name
    # the adapters differ from each other and from the base: equal outputs are not equal by accident
    assert np.abs(np.array(alone["legal"]["logits"][0]) - np.array(alone["medical"]["logits"][0])).max() > 1e-3
    assert np.abs(np.array(alone["both/category"]) - np.array(alone["category"])).max() > 1e-3


def test_every_tensor_of_an_adapter_file_is_loaded(mt, folders):
    from safetensors.torch import load_file

    for name, folder in folders.items():
        in_file = load_file(Path(folder) / "adapter_model.safetensors")
        loaded = [n for n, _ in mt.shared.named_parameters() if f".{name}." in n]
        head = 0 if name in ("legal", "medical") else 1  # the score layer's weight, kept apart as the head(s)
        assert len(loaded) + head == len(in_file), name
    assert mt.task("priority").head.out_features == len(LABELS["priority"])


def test_an_unknown_task_is_an_error_listing_the_loaded_tasks(mt):
    with pytest.raises(UnknownTaskError, match="category.*priority.*legal.*medical"):
        mt.classify("categroy", TICKETS[:1])
    with pytest.raises(UnknownTaskError, match="loaded tasks"):
        mt.generate_batch(["legal", "legl"], ROWS[:2])
    with pytest.raises(ValueError, match="'legal' is a generator"):
        mt.classify("legal", TICKETS[:1])
    with pytest.raises(ValueError, match="'category' is a classifier"):
        mt.generate("category", "Summarise", "text")


def test_a_head_is_bound_to_its_adapter(mt):
    """The wrong pairing computes something else (so it matters), and the API offers no way to make it."""
    category, priority = mt.task("category"), mt.task("priority")
    mixed_up = TaskView(mt.shared, priority.adapter, category.head, mt.tokenizer.pad_token_id)
    wrong = classify.Classifier(mixed_up, category.classifier.tokenizer, category.classifier.labels, base_model=BASE,
                                max_length=32).probabilities(TICKETS)
    assert np.abs(wrong - mt.probabilities("category", TICKETS)).max() > 1e-3
    with pytest.raises(dataclasses.FrozenInstanceError):
        category.adapter = priority.adapter
    for method_name, method in inspect.getmembers(MultiTaskModel, inspect.isfunction):
        assert not {"adapter", "adapter_names", "head"} & set(inspect.signature(method).parameters), method_name


def test_folders_on_different_bases_or_without_a_manifest_are_refused(folders, tmp_path):
    other = tmp_path / "category_unquantized"
    shutil.copytree(folders["category"], other)
    manifest = json.loads((other / saved.MANIFEST).read_text())
    manifest["quantization"] = None
    (other / saved.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=f"(?s){Path(folders['legal']).name}.*{other.name}.*quantization"):
        MultiTaskModel.from_folders({"legal": folders["legal"], "other": other})
    with pytest.raises(FileNotFoundError, match="ftnb_model.json"):
        MultiTaskModel.from_folders({"legal": folders["legal"], "nothing": tmp_path})
    with pytest.raises(ValueError, match="task names"):
        MultiTaskModel.from_folders({"le.gal": folders["legal"]})


def test_a_classifier_reading_the_mean_of_its_tokens_is_refused_as_a_shared_task(folders, tmp_path):
    pooled = tmp_path / "category_mean"
    shutil.copytree(folders["category"], pooled)
    manifest = json.loads((pooled / saved.MANIFEST).read_text())
    manifest["task"]["pooling"] = "mean"  # what Classifier.save records after classify.use_mean_pooling
    (pooled / saved.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="mean of its tokens.*ftnb.saved.load"):
        MultiTaskModel.from_folders({"legal": folders["legal"], "category": pooled})


def test_mixed_batches_equal_each_row_run_with_its_own_task(mt):
    tasks = [r["domain"] for r in ROWS]  # legal, medical, legal, medical: one padded batch
    mixed = mt.next_token_logits(tasks, ROWS)
    for task in ("legal", "medical"):  # the same padded batch, every row on one task
        rows = [i for i, t in enumerate(tasks) if t == task]
        assert (mixed[rows] - mt.next_token_logits(task, ROWS)[rows]).abs().max() <= TOLERANCE
    alone = torch.cat([mt.next_token_logits(t, [r]) for t, r in zip(tasks, ROWS)])  # each row alone, unpadded
    assert (mixed - alone).abs().max() <= TOLERANCE
    assert mt.generate_batch(tasks, ROWS) == [mt.generate(t, r["instruction"], r["input"]) for t, r in zip(tasks, ROWS)]
    names = ["category", "priority"] * len(TICKETS)
    both = mt.predict_proba_mixed(names, [t for t in TICKETS for _ in range(2)], batch_size=5)
    apart = {name: mt.predict_proba(name, TICKETS) for name in ("category", "priority")}
    for i, (name, probs) in enumerate(zip(names, both)):
        assert list(probs) == LABELS[name]
        assert max(abs(p - apart[name][i // 2][label]) for label, p in probs.items()) <= TOLERANCE


def test_a_batch_never_mixes_adapters_stored_in_different_dtypes(folders, tmp_path):
    """TRL stores QLoRA adapters in bf16 (recipe 02 keeps them so where training computes in bf16); one
    trained with the plain Trainer stays fp32. peft's mixed forward would cast every row to the dtype of
    whichever adapter it visits first."""
    tok = load_tokenizer(BASE)
    model = get_peft_model(load_model(BASE, quantization="nf4"), LoraConfig(task_type="CAUSAL_LM", r=4,
                                                                          target_modules="all-linear"))
    fp32 = sft.save_generator(model, tok, tmp_path / "fp32", base_model=BASE)
    both = MultiTaskModel.from_folders({"legal": folders["legal"], "plain": fp32})
    assert both.next_token_logits("plain", ROWS[:1]).shape[0] == 1  # each alone is fine
    with pytest.raises(ValueError, match="different dtypes"):
        both.next_token_logits(["legal", "plain"], ROWS[:2])


def test_each_head_of_a_multihead_folder_is_a_task_on_its_one_adapter(mt, folders):
    heads = {name: task for name, task in mt.tasks.items() if task.folder == Path(folders["both"])}
    assert list(heads) == ["both/category", "both/priority"]
    assert {task.adapter for task in heads.values()} == {"both"} and "both" in mt.shared.peft_config
    assert [task.head.out_features for task in heads.values()] == [len(LABELS["category"]), len(LABELS["priority"])]
    assert {row["adapter"] for row in mt.summary() if row["task"].startswith("both/")} == {"both"}
    with pytest.raises(UnknownTaskError, match="both/category"):
        mt.classify("both", TICKETS[:1])
    names = ["both/priority", "category", "both/category"] * 2  # one batch: heads of one adapter and another adapter
    mixed = mt.predict_proba_mixed(names, TICKETS)
    for i, (name, probs) in enumerate(zip(names, mixed)):
        alone = mt.predict_proba(name, [TICKETS[i]])[0]
        assert max(abs(p - alone[label]) for label, p in probs.items()) <= TOLERANCE, name


def test_the_server_serves_each_head_of_a_multihead_folder_as_a_classifier(folders):
    served = load_models([f"tickets={folders['both']}"])
    assert set(served) == {"tickets/category", "tickets/priority"}
    alone = saved.load(folders["both"])
    for field in LABELS:
        got = served[f"tickets/{field}"].classifier.predict_proba(TICKETS)
        want = alone.predict_proba(TICKETS, field)
        assert max(abs(g[label] - w[label]) for g, w in zip(got, want) for label in w) <= TOLERANCE, field
