"""ftnb.tasks.multihead: one LoRA adapter with a category head and a priority head (tiny-llama-test in
NF4, as recipe 06 trains SmolLM2). Each head's probabilities equal the hand computation (backbone,
last real token, that head's rows, softmax); the loss is the mean of the heads' cross-entropies;
training lowers both; a fresh process reloads identical probabilities (~15 s in all).

Worth its time: a head reading another head's rows, a loss that lets one task dominate, or a head
that reloads from the wrong rows would each go unnoticed in the recipe's numbers."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import DataCollatorWithPadding, TrainingArguments

from ftnb import saved
from ftnb.models import load_model, load_tokenizer
from ftnb.tasks import multihead

CATEGORIES = ["billing", "shipping", "account", "feedback"]
PRIORITIES = ["low", "normal", "urgent"]
WORDS = {"billing": "invoice charge", "shipping": "parcel delivery", "account": "password login",
         "feedback": "great app"}
TONE = {"low": "whenever you can", "normal": "please", "urgent": "immediately, it is critical"}
RECORDS = [{"text": f"{WORDS[c]} {TONE[p]}", "category": c, "priority": p} for c in CATEGORIES for p in PRIORITIES]


def _train(model, tok, data, folder: Path, steps: int):
    args = TrainingArguments(output_dir=str(folder), max_steps=steps, per_device_train_batch_size=6,
                             learning_rate=2e-2, report_to="none", save_strategy="no", disable_tqdm=True,
                             use_cpu=True, seed=0)
    trainer = multihead.MultiHeadTrainer(model=model, args=args, train_dataset=data, heads=HEADS,
                                         data_collator=DataCollatorWithPadding(tok))
    trainer.train()
    return trainer


HEADS = multihead.build_heads({"category": CATEGORIES, "priority": PRIORITIES})


def head_losses(clf) -> dict[str, float]:
    """Each head's mean cross-entropy on RECORDS, from the classifier's own probabilities."""
    probs = clf.probabilities(RECORDS)
    return {h.label_field: float(-np.mean([np.log(probs[h.label_field][i, h.labels.index(r[h.label_field])])
                                           for i, r in enumerate(RECORDS)])) for h in HEADS}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Losses before and after 30 steps, the trained classifier, and its saved folder."""
    root = tmp_path_factory.mktemp("multihead")
    tok = load_tokenizer("tiny-llama-test")
    torch.manual_seed(0)
    model = load_model("tiny-llama-test", task="seq-cls", quantization="nf4", tokenizer=tok,
                       **multihead.model_labels(HEADS))
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules="all-linear",
                                             modules_to_save=["score"]))
    clf = multihead.MultiHeadClassifier(model, tok, HEADS, base_model="tiny-llama-test", max_length=32,
                                        text_fields=["text"], batch_size=5)
    data = multihead.tokenize_split(Dataset.from_list(RECORDS), tok, HEADS, max_length=32, text_fields=["text"])
    before = head_losses(clf)
    trainer = _train(model, tok, data, root / "checkpoints", steps=30)
    return {"clf": clf, "before": before, "after": head_losses(clf), "trainer": trainer, "data": data,
            "folder": clf.save(root / "saved")}


def test_labels_hold_one_score_row_per_head():
    data = multihead.tokenize_split(Dataset.from_list(RECORDS[:3]), load_tokenizer("tiny-llama-test"), HEADS,
                                    max_length=32, text_fields=["text"])
    assert [h.rows for h in HEADS] == [(0, 4), (4, 7)]
    assert data["labels"] == [[0, 4], [0, 5], [0, 6]]  # billing; low, normal, urgent
    assert multihead.model_labels(HEADS)["id2label"][4] == "priority=low"
    weights = multihead.head_class_weights(Dataset.from_list(RECORDS + RECORDS[:3]), HEADS)  # 6 billing, 3 of the rest
    assert torch.allclose(weights, torch.tensor([15 / 24] + [15 / 12] * 3 + [1.0] * 3))
    with pytest.raises(ValueError, match=r"label ids \[2\] never occur"):
        multihead.head_class_weights(Dataset.from_list([r for r in RECORDS if r["priority"] != "urgent"]), HEADS)


def test_each_head_is_its_rows_on_the_last_real_token(trained):
    """The hand computation: the backbone's hidden state at each record's last token (one record at
    a time, so no padding), times that head's rows of the score layer, softmax over those rows."""
    clf = trained["clf"]
    peft_model = clf.model
    backbone, score = peft_model.base_model.model.model, peft_model.base_model.model.score
    weight = score.modules_to_save["default"].weight.detach().float()
    probs = clf.probabilities(RECORDS)  # batched, padded, sorted by length
    with torch.no_grad():
        for i, record in enumerate(RECORDS):
            ids = clf.tokenizer(record["text"], return_tensors="pt")
            hidden = backbone(**ids).last_hidden_state[0, -1].float()
            for head in HEADS:
                expected = torch.softmax(weight[head.slice] @ hidden, -1).numpy()
                np.testing.assert_allclose(probs[head.label_field][i], expected, atol=1e-5, rtol=0)
    assert probs["category"].std() > 0.05, "the heads should be trained away from uniform for a mix-up to show"


def test_the_loss_is_the_mean_of_the_heads_cross_entropies(trained):
    trainer, data = trained["trainer"], trained["data"]
    batch = DataCollatorWithPadding(trained["clf"].tokenizer)([data[i] for i in range(6)])
    batch.pop("length")
    labels = batch["labels"].clone()
    with torch.no_grad():
        logits = trained["clf"].model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        loss = trainer.compute_loss(trained["clf"].model, dict(batch))
    expected = np.mean([torch.nn.functional.cross_entropy(logits[:, h.slice], labels[:, k] - h.rows[0]).item()
                        for k, h in enumerate(HEADS)])
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_training_lowers_both_losses(trained):
    for head in ("category", "priority"):
        assert trained["after"][head] < 0.5 * trained["before"][head], (head, trained["before"], trained["after"])


def reload_probabilities(folder: str) -> dict:
    """What the saved folder predicts after ftnb.saved.load (run in a fresh process)."""
    clf = saved.load(folder)
    assert isinstance(clf, multihead.MultiHeadClassifier)
    return {name: p.tolist() for name, p in clf.probabilities(RECORDS).items()}


def test_a_fresh_process_reloads_identical_probabilities(trained):
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_multihead; "
            f"print(json.dumps(test_multihead.reload_probabilities({str(trained['folder'])!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    after = json.loads(done.stdout.strip().splitlines()[-1])
    before = trained["clf"].probabilities(RECORDS)
    for head in HEADS:
        assert np.abs(np.array(after[head.label_field]) - before[head.label_field]).max() < 1e-5, head.label_field
    manifest = saved.read_manifest(trained["folder"])
    assert manifest["kind"] == "multihead"
    assert manifest["task"]["heads"][1] == {"label_field": "priority", "labels": PRIORITIES, "rows": [4, 7]}


def test_predictions_and_bad_input(trained, tmp_path):
    clf = trained["clf"]
    predicted = clf.predict(RECORDS)
    assert set(predicted[0]) == {"category", "priority"}
    assert sum(p == {"category": r["category"], "priority": r["priority"]} for p, r in zip(predicted, RECORDS)) >= 9
    assert clf.predict_proba([RECORDS[0]], "priority")[0].keys() == set(PRIORITIES)
    with pytest.raises(KeyError, match="no head 'urgency'; this model's heads: category, priority"):
        clf.predict_proba(RECORDS, "urgency")
    manifest = json.loads((trained["folder"] / saved.MANIFEST).read_text())
    manifest["task"]["heads"][1]["rows"] = [3, 6]
    with pytest.raises(ValueError, match=r"head rows \[\(0, 4\), \(3, 6\)\] do not match its labels"):
        multihead.heads_of(manifest["task"])
