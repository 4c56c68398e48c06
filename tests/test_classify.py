"""ftnb.tasks.classify: formatting, labels, metrics, zero-shot scoring, and the classifier
(trained for a few steps on tiny-llama-test; its save and fresh-process reload: tests/test_saved.py)."""
import warnings

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import DataCollatorWithPadding, TrainingArguments

from ftnb import saved
from ftnb.data import read_labels
from ftnb.tasks import classify
from ftnb.models import load_model, load_tokenizer

LABELS = list(read_labels("tickets")["category"])
TICKETS = [
    {"subject": "Charged twice", "body": "Invoice INV-1 shows two charges for May.", "category": "billing"},
    {"subject": "Money back please", "body": "I want my 49 euros back for the headset.", "category": "refund"},
    {"subject": "Locked out", "body": "The 2FA code never arrives, I cannot get in.", "category": "account_access"},
    {"subject": "Export crashes", "body": "Error 500 every time I export a report.", "category": "technical_issue"},
    {"subject": "Where is my parcel", "body": "Order BD-123 has not moved for a week.", "category": "shipping"},
    {"subject": "Does it support SSO", "body": "Which plan has Okta single sign-on?", "category": "product_question"},
    {"subject": "Stop my plan", "body": "Please end the subscription at month end.", "category": "cancellation"},
    {"subject": "Love the app", "body": "Great work on the new dashboard!", "category": "feedback"},
]


def test_record_text_formats_and_passes_strings_through():
    assert classify.record_text({"subject": "Hi", "body": "Body"}) == "Hi\n\nBody"
    assert classify.record_text({"subject": "Only subject", "body": ""}) == "Only subject"
    assert classify.record_text("plain text") == "plain text"
    assert classify.record_text({"title": "T", "text": " x ", "id": 3}, text_fields=["text", "title"]) == "x\n\nT"
    with pytest.raises(ValueError, match=r"no field 'subject' \(fields found: \['text'\]\); set text_fields"):
        classify.record_text({"text": "no subject or body"})
    with pytest.raises(TypeError, match="a record is a dict"):
        classify.record_text(42)


def test_labels_come_from_labels_json_else_from_training_values(tmp_path):
    train = Dataset.from_list([{"text": "a", "intent": "greet"}, {"text": "b", "intent": "book"},
                               {"text": "c", "intent": "greet"}])
    assert classify.labels_for("intent", train) == ["book", "greet"]  # no labels file: sorted values
    (tmp_path / "labels.json").write_text('{"intent": {"greet": "says hello", "book": "", "cancel": "x"}}')
    assert classify.labels_for("intent", train, tmp_path) == ["greet", "book", "cancel"]  # file order
    assert classify.labels_for("category", Dataset.from_list(TICKETS), "tickets") == LABELS
    with pytest.raises(ValueError, match="label_field 'urgency' is not a field of the data; fields: text, intent"):
        classify.labels_for("urgency", train, tmp_path)


def test_unknown_label_is_a_clear_error():
    bad = Dataset.from_list([dict(TICKETS[0], priority="low"), dict(TICKETS[1], category="refnud", priority="low")])
    tok = load_tokenizer("tiny-llama-test")
    with pytest.raises(ValueError, match=r"row 1: unknown label 'refnud'; allowed: billing"):
        classify.tokenize_split(bad, tok, "category", LABELS, max_length=32)


@pytest.mark.parametrize("model", ["minilm-l6", "tiny-llama-test"])
def test_long_tickets_are_truncated_with_a_warning(model):
    """The tokenizer's own truncation: an encoder's input still ends with [SEP] (MiniLM), a decoder's
    is the first max_length tokens. A text cut by the character cap counts as cut even when its
    remaining characters fit (100 000 x: one [UNK] for MiniLM)."""
    tok = load_tokenizer(model)
    texts = ["Charged twice", "word " * 300, "Where is my parcel?", "x" * 100_000]
    with pytest.warns(UserWarning, match=r"2 of 4 text\(s\) longer than max_length=16 tokens were truncated"):
        enc = classify.encode(tok, texts, max_length=16)
    whole = tok(texts[:3])["input_ids"]
    closing = [tok.sep_token_id] if tok.sep_token_id is not None else []
    assert enc["input_ids"][0] == whole[0] and enc["input_ids"][2] == whole[2]  # short: untouched
    assert enc["input_ids"][1] == whole[1][:16 - len(closing)] + closing
    assert [len(m) for m in enc["attention_mask"]] == [len(ids) for ids in enc["input_ids"]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exactly_16 = "word " * next(n for n in range(30) if len(tok("word " * n)["input_ids"]) == 16)
        classify.encode(tok, ["short", exactly_16], max_length=16)  # fits: nothing to warn about


def test_class_weights_are_balanced():
    w = classify.class_weights([0, 0, 0, 1], 2)
    assert torch.allclose(w, torch.tensor([4 / 6, 2.0]))
    with pytest.raises(ValueError, match="never occur"):
        classify.class_weights([0, 0], 2)


def _one_sgd_step(model, data, tok, out, batch_size: int, accumulation: int, weights):
    """One optimizer step of plain SGD (lr 1, no clipping, data in order): the parameter change is
    minus the gradient. Returns the logged training loss."""
    args = TrainingArguments(output_dir=str(out), max_steps=1, per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=1.0,
                             lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
                             train_sampling_strategy="sequential", report_to="none", save_strategy="no",
                             disable_tqdm=True, use_cpu=True)
    trainer = classify.WeightedTrainer(model=model, args=args, train_dataset=data,
                                       data_collator=DataCollatorWithPadding(tok), class_weights=weights)
    return trainer.train().training_loss


@pytest.mark.parametrize("weighted", [True, False])
def test_loss_is_the_same_with_gradient_accumulation(tmp_path, weighted):
    """1 x 8 and 2 x 4 must both take the step of the (weighted) mean over all 8 tickets, and log
    its loss. Weighted, the two halves carry different total weight, so averaging the halves' means
    would not do; unweighted, transformers' own classification loss comes out twice too large."""
    import copy

    tok = load_tokenizer("tiny-llama-test")
    torch.manual_seed(0)
    start = load_model("tiny-llama-test", task="seq-cls", dtype=torch.float32, num_labels=len(LABELS), tokenizer=tok)
    data = classify.tokenize_split(Dataset.from_list(TICKETS), tok, "category", LABELS, max_length=32)
    # labels 0-3 in the first half, 4-7 in the second
    weights = torch.linspace(0.25, 4.0, len(LABELS)) if weighted else None

    reference = copy.deepcopy(start)
    batch = DataCollatorWithPadding(tok)([{k: data[i][k] for k in ("input_ids", "attention_mask")}
                                          for i in range(len(data))])
    logits = reference(**batch).logits
    expected_loss = torch.nn.functional.cross_entropy(logits, torch.tensor(data["labels"]), weight=weights)
    expected_loss.backward()
    expected_step = {name: -p.grad for name, p in reference.named_parameters() if p.grad is not None}

    for batch_size, accumulation in [(8, 1), (4, 2)]:
        model = copy.deepcopy(start)
        loss = _one_sgd_step(model, data, tok, tmp_path / f"{accumulation}", batch_size, accumulation, weights)
        assert loss == pytest.approx(expected_loss.item(), rel=1e-6), (batch_size, accumulation)
        before = dict(start.named_parameters())
        for name, param in model.named_parameters():
            step = param.detach() - before[name].detach()
            assert torch.allclose(step, expected_step[name], atol=1e-6), (batch_size, accumulation, name)


def test_metrics_and_calibration():
    y = ["a", "b", "a", "b"]
    m = classify.evaluate(y, ["a", "b", "b", "b"], ["a", "b"])
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["per_class"]["a"]["recall"] == pytest.approx(0.5) and m["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    confident_right = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert classify.expected_calibration_error(confident_right, [0, 1]) == pytest.approx(0.0)
    # always 0.9 confident, right half the time: gap 0.4
    assert classify.expected_calibration_error(np.array([[0.9, 0.1]] * 4), [0, 1, 0, 1]) == pytest.approx(0.4)


def _reference_label_logliks(lm, tok, prompt: list[int], labels: list[str]) -> list[float]:
    """Each label's log-likelihood (its tokens and the end token) after `prompt`, one full
    forward pass of prompt + label per label: no cache, no padding, no batching."""
    logliks = []
    for label in labels:
        target = tok(label, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logp = torch.log_softmax(lm(input_ids=torch.tensor([prompt + target])).logits[0].double(), -1)
        logliks.append(sum(logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(target)))
    return logliks


def test_zero_shot_matches_a_plain_full_sequence_computation():
    """The cached, batched scoring (prefix cache reused across batches, left padding, one pass per
    label on a cache cut back after it) equals scoring every text + label on its own, within float
    round-off, whether a label's log-likelihood is summed or averaged per token. Labels of 1 to 3
    tokens plus the end token; texts from empty to dozens of tokens; a last batch shorter than the others. Checked by hand: a position, target, mask or cache cut off by one
    moves some score by 0.01 to 0.28; the computation itself agrees to 1e-7."""
    tok = load_tokenizer("tiny-llama-test")
    lm = load_model("tiny-llama-test", dtype=torch.float32, tokenizer=tok)
    # At its initial scale (std 0.02) the random model attends almost uniformly and predicts almost
    # uniformly, so a shifted position changes scores by less than 1e-5; weights of 3/sqrt(fan_in)
    # make attention and next-token distributions sharp enough for such a mistake to show.
    torch.manual_seed(0)
    with torch.no_grad():
        for weight in (p for p in lm.parameters() if p.dim() == 2):
            weight.normal_(0, 3 / weight.shape[1] ** 0.5)
    label_lengths = {len(tok(label, add_special_tokens=False)["input_ids"]) for label in LABELS}
    assert label_lengths == {1, 2, 3}, "the labels should cover several token counts"
    texts = ["my card was charged twice", "", "where is my parcel? " * 12, "Locked out.\n\nThe code never arrives",
             "refund " * 30]
    defs = read_labels("tickets")["category"]
    template = classify.zero_shot_template("tickets")
    scores = classify.zero_shot_scores(lm, tok, texts, LABELS, defs, batch_size=2, template=template)
    assert scores.shape == (len(texts), len(LABELS)) and np.allclose(scores.sum(1), 1)
    prefix, suffix = classify.zero_shot_prompt(tok, LABELS, defs, template)
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = [ids(prefix) + ids(text + suffix) for text in texts]
    reference = torch.tensor([_reference_label_logliks(lm, tok, prompt, LABELS) for prompt in prompts])
    np.testing.assert_allclose(scores, torch.softmax(reference, -1).numpy(), rtol=0, atol=1e-5)
    # "mean": each label's log-likelihood divided by its token count (label tokens + end token)
    counts = torch.tensor([len(tok(label, add_special_tokens=False)["input_ids"]) + 1 for label in LABELS])
    logliks = classify.zero_shot_logliks(lm, tok, texts, LABELS, defs, batch_size=2, template=template)
    np.testing.assert_allclose(logliks, reference.numpy(), rtol=0, atol=1e-4)
    mean = classify.zero_shot_probabilities(logliks, classify.zero_shot_label_lengths(tok, LABELS), "mean")
    np.testing.assert_allclose(mean, torch.softmax(reference / counts, -1).numpy(), rtol=0, atol=1e-5)
    assert np.abs(mean - scores).max() > 1e-3, "labels of 1 to 3 tokens: the two normalisations must differ"
    with pytest.raises(ValueError, match="normalize must be one of"):
        classify.zero_shot_probabilities(logliks, counts.tolist(), "max")


def test_zero_shot_wording_comes_from_the_data_folder(tmp_path):
    tok = load_tokenizer("tiny-llama-test")
    defs = read_labels("tickets")["category"]
    prefix, suffix = classify.zero_shot_prompt(tok, ["billing", "refund"], defs, classify.zero_shot_template("tickets"))
    user = (f"Classify the support ticket into exactly one of these labels.\n- billing: {defs['billing']}\n"
            f"- refund: {defs['refund']}\n\nTicket:\n")
    assert prefix.endswith(user) and suffix.startswith("\n\nAnswer with the label only.")
    assert classify.zero_shot_template(tmp_path) == classify.ZERO_SHOT_TEMPLATE  # no file: generic wording
    with pytest.raises(ValueError, match="needs {labels} and {text} exactly once"):
        classify.zero_shot_prompt(tok, ["a"], {}, "Classify: {text}")


def test_generative_examples_train_the_answer_that_zero_shot_scoring_reads(tmp_path):
    from trl import SFTConfig, SFTTrainer

    from ftnb import env

    tok = load_tokenizer("tiny-llama-test")
    defs, template = read_labels("tickets")["category"], classify.zero_shot_template("tickets")
    records = [{"subject": "Charged twice", "body": "Invoice INV-1 shows two charges", "category": "billing"},
               {"subject": "Locked out", "body": "", "category": "account_access"}]
    examples = classify.generative_examples(records, "category", LABELS, defs, template)
    trainer = SFTTrainer(model=load_model("tiny-llama-test", dtype=torch.float32, tokenizer=tok),
                         args=SFTConfig(output_dir=str(tmp_path), completion_only_loss=True, max_length=1024,
                                        report_to="none", **env.precision_flags(torch.float32)),
                         train_dataset=examples, processing_class=tok)
    prefix, suffix = classify.zero_shot_prompt(tok, LABELS, defs, template)
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    for record, trained in zip(records, trainer.train_dataset):
        scored_prompt = ids(prefix) + ids(classify.record_text(record) + suffix)  # what zero_shot_logliks runs
        n = len(scored_prompt)
        assert trained["input_ids"][:n] == scored_prompt and set(trained["labels"][:n]) == {-100}
        answer = classify._label_token_ids(tok, [record["category"]])[0]  # the label's tokens, then end of turn
        assert trained["input_ids"][n:n + len(answer)] == answer == trained["labels"][n:n + len(answer)]
    with pytest.raises(ValueError, match="'vip' of 't1' is not one of"):
        classify.generative_examples([{"id": "t1", "subject": "a", "body": "b", "category": "vip"}], "category",
                                     LABELS, defs, template)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-bit tiny Llama with a LoRA + score head, trained a few steps with class weights."""
    tok = load_tokenizer("tiny-llama-test")
    id2label, label2id = classify.label_maps(LABELS)
    model = load_model("tiny-llama-test", task="seq-cls", quantization="nf4", num_labels=len(LABELS),
                       id2label=id2label, label2id=label2id, tokenizer=tok)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules="all-linear",
                                             modules_to_save=["score"]))
    head_before = model.base_model.model.score.modules_to_save["default"].weight.detach().clone()
    train = classify.tokenize_split(Dataset.from_list([dict(t, priority="low") for t in TICKETS] * 2), tok,
                                    "category", LABELS, max_length=32)
    out = tmp_path_factory.mktemp("clf")
    args = TrainingArguments(output_dir=str(out / "ckpt"), max_steps=4, per_device_train_batch_size=8,
                             learning_rate=5e-3, lr_scheduler_type="cosine", warmup_steps=0.25,
                             gradient_checkpointing=True, save_strategy="no", report_to="none",
                             disable_tqdm=True, use_cpu=True)
    trainer = classify.WeightedTrainer(model=model, args=args, train_dataset=train,
                                       data_collator=DataCollatorWithPadding(tok),
                                       class_weights=classify.class_weights(train["labels"], len(LABELS)))
    trainer.train()
    head_after = model.base_model.model.score.modules_to_save["default"].weight
    assert not torch.allclose(head_before, head_after), "the score head was not trained"
    clf = classify.Classifier(model, tok, LABELS, base_model="tiny-llama-test", max_length=32, batch_size=3)
    return clf, out


def test_odd_tickets_still_get_a_prediction(trained):
    clf, _ = trained
    odd = [{"subject": "Charged twice", "body": ""}, {"subject": "Crash", "body": "stack trace " * 5000},
           "Bonjour, je n'arrive pas à me connecter à mon compte.", {"subject": "", "body": "Hallo, wo ist mein Paket?"}]
    with pytest.warns(UserWarning, match="truncated"):
        probs = clf.predict_proba(odd)
    assert len(probs) == 4 and all(set(p) == set(LABELS) and abs(sum(p.values()) - 1) < 1e-5 for p in probs)
    assert clf.predict("single string")[0] in LABELS


def test_batching_does_not_change_predictions(trained):
    clf, _ = trained
    one_by_one = np.concatenate([clf.probabilities([t]) for t in TICKETS])
    assert np.allclose(one_by_one, clf.probabilities(TICKETS), atol=1e-4)


def test_demo_renders_without_interaction(trained):
    clf, _ = trained
    box = classify.build_demo(clf, "Where is my parcel?")
    html = box.children[-1].value
    assert any(f"<b>{label}</b>" in html for label in LABELS)


def test_ensemble_weights_choose_the_blend_with_the_lowest_validation_log_loss():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, 300)
    informed = np.full((300, 3), 0.1)
    informed[np.arange(300), truth] = 0.8  # always right, confidently
    noise = rng.dirichlet(np.ones(3), 300)  # says nothing about the label
    chosen = classify.ensemble_weights({"informed": informed, "noise": noise}, truth, step=0.25)
    assert chosen["weights"] == {"informed": 1.0, "noise": 0.0}
    assert chosen["log_loss"] == pytest.approx(chosen["single"]["informed"])
    assert chosen["single"]["informed"] < chosen["single"]["noise"]
    # two models each right on a different half: a blend beats either alone, and is what is chosen
    half = np.arange(300) < 150
    a, b = noise.copy(), noise.copy()
    a[half] = informed[half]
    b[~half] = informed[~half]
    both = classify.ensemble_weights({"a": a, "b": b}, truth, step=0.1)
    assert 0 < both["weights"]["a"] < 1 and both["log_loss"] < min(both["single"].values())
    blended = classify.blend({"a": a, "b": b}, both["weights"])
    assert np.allclose(blended.sum(1), 1) and (blended.argmax(1) == truth).mean() > 0.9


def test_blend_and_weights_reject_what_does_not_fit():
    p = np.full((4, 2), 0.5)
    with pytest.raises(ValueError, match="one non-negative weight per classifier"):
        classify.blend({"a": p, "b": p}, {"a": 1.0})
    with pytest.raises(ValueError, match="same rows and labels"):
        classify.blend({"a": p, "b": p[:3]}, {"a": 0.5, "b": 0.5})
    with pytest.raises(ValueError, match="step must divide 1"):
        classify.ensemble_weights({"a": p}, [0, 1, 0, 1], step=0.3)


def test_tfidf_baseline_keeps_the_best_validation_c_and_answers_in_our_label_order():
    labels = ["zeta", "alpha"]  # not alphabetical: scikit-learn's own column order would be alpha, zeta
    train = ["refund my money", "money back please", "refund the charge", "I want a refund", "refund refund",
             "return my money", "reset my password", "password reset link"]
    y_train = ["zeta"] * 6 + ["alpha"] * 2  # a C this small predicts the majority label for everything
    val, y_val = ["money refund now", "forgot my password"], ["zeta", "alpha"]
    tfidf, f1_by_c = classify.fit_tfidf(train, y_train, val, y_val, labels, [1e-6, 10.0, 100.0])
    assert f1_by_c[1e-6] < 0.5 and f1_by_c[10.0] == f1_by_c[100.0] == 1.0
    assert tfidf[-1].C == 10.0  # the best score, and among equals the smaller C: the more regularised
    probs = classify.sklearn_probabilities(tfidf, val, labels)
    assert np.allclose(probs.sum(1), 1) and classify.predicted_labels(probs, labels) == ["zeta", "alpha"]
    assert probs[0, 0] > 0.5 and probs[1, 1] > 0.5


def test_zero_shot_normalization_is_chosen_by_the_labels_it_is_given():
    lengths = [1, 4]  # "a" is one token, "bb" four: summing penalises "bb"
    logliks = np.array([[-2.0, -4.0]] * 3)  # summed "a" wins (-2 > -4); per token "bb" wins (-1 > -2)
    assert classify.best_zero_shot_normalization(logliks, lengths, ["bb"] * 3, ["a", "bb"])[0] == "mean"
    normalize, f1 = classify.best_zero_shot_normalization(logliks, lengths, ["a"] * 3, ["a", "bb"])
    assert normalize == "sum" and f1["sum"] > f1["mean"]
    normalize, f1 = classify.best_zero_shot_normalization(np.array([[-1.0, -8.0]]), lengths, ["a"], ["a", "bb"])
    assert normalize == "sum" and f1["sum"] == f1["mean"]  # both right: a tie keeps the plain sum


def test_mean_pooling_reads_the_mean_hidden_state_of_the_real_tokens(tmp_path):
    tok = load_tokenizer("tiny-llama-test")
    model = load_model("tiny-llama-test", task="seq-cls", num_labels=len(LABELS), tokenizer=tok, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, target_modules="all-linear",
                                             modules_to_save=["score"]))
    last_token = classify.predict_logits(model, tok, TICKETS, ["subject", "body"], max_length=32, batch_size=8)
    classify.use_mean_pooling(model)
    pooled = classify.predict_logits(model, tok, TICKETS, ["subject", "body"], max_length=32, batch_size=8)
    alone = np.concatenate([classify.predict_logits(model, tok, [t], ["subject", "body"], 32) for t in TICKETS])
    assert np.allclose(pooled, alone, atol=1e-5)  # padding is left out of the mean
    assert not np.allclose(pooled, last_token, atol=1e-3)
    base = model.get_base_model()
    with torch.no_grad():  # the head of the mean hidden state, by hand
        ids = tok(classify.record_text(TICKETS[0]), return_tensors="pt")["input_ids"]
        hidden = base.model(input_ids=ids).last_hidden_state.mean(1)
        head = base.score.modules_to_save["default"].weight
        assert np.allclose(torch.nn.functional.linear(hidden, head).numpy(), pooled[:1], atol=1e-5)
    texts = sorted((classify.record_text(t) for t in TICKETS), key=len)
    batch = tok([texts[0], texts[-1]], padding=True, return_tensors="pt")
    assert not batch["attention_mask"].all()  # one row is padded
    with torch.no_grad():
        positional = model(batch["input_ids"], batch["attention_mask"]).logits
        by_keyword = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        unmasked = model(input_ids=batch["input_ids"]).logits
    assert torch.allclose(positional, by_keyword) and not torch.allclose(positional, unmasked)  # mask found either way
    classify.Classifier(model, tok, LABELS, base_model="tiny-llama-test", max_length=32).save(tmp_path / "clf")
    assert saved.read_manifest(tmp_path / "clf")["task"]["pooling"] == "mean"
    reloaded = saved.load(tmp_path / "clf")  # reads the mean again, not the last token
    assert np.allclose(classify.predict_logits(reloaded.model, tok, TICKETS, ["subject", "body"], 32), pooled, atol=1e-5)
    with pytest.raises(ValueError, match="choose one of"):
        classify.use_pooling(model, "max")
