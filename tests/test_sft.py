"""ftnb.tasks.sft: the SFT trap guards, the house-format checker, held-out perplexity, and the
adapter -> merged export round trip, on the tiny random Llama (seconds)."""
import json
import math
import threading

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

from ftnb import env, saved
from ftnb.data import DataError
from ftnb.tasks import formats, sft
from ftnb.models import load_model, load_tokenizer, plain_forward

LEGAL = ("Plain English: You pay a $500 deposit. It comes back within 30 days.\n"
         "Your obligations:\n- Pay the deposit.\nWatch out for:\n- Deductions for damage.")
MEDICAL = ("Summary: You had a cough for three days and your chest was clear.\n"
           "What the terms mean:\n- c/o: complains of.\n- LH:FSH: the balance of two hormones.\n"
           "Questions to ask your doctor:\n- When should I come back?")
TECHNICAL = ("Likely cause: The requests package is not installed in this interpreter.\n"
             "Fix:\n1. Activate the virtual environment.\n2. Run python -m pip install requests.\n"
             "How to verify: Run python -c \"import requests\" and see no error.")
ROWS = [
    {"id": "l1", "domain": "legal", "instruction": "Explain this contract clause in plain English.",
     "input": "Tenant shall pay a security deposit of $500.", "output": LEGAL},
    {"id": "m1", "domain": "medical", "instruction": "Explain this clinical note to the patient.",
     "input": "34F c/o cough x 3/7. Chest clear.", "output": MEDICAL},
    {"id": "t1", "domain": "technical", "instruction": "Diagnose this error and suggest a fix.",
     "input": "ModuleNotFoundError: No module named 'requests'", "output": TECHNICAL},
]


HOUSE = formats.read_formats("domains")


@pytest.fixture(scope="module")
def tok(tiny_model_path):
    return load_tokenizer(tiny_model_path)


# ---------------------------------------------------------------- house format
@pytest.mark.parametrize("text,domain", [(LEGAL, "legal"), (MEDICAL, "medical"), (TECHNICAL, "technical")])
def test_reference_formats_pass(text, domain):
    result = formats.format_adherence(text, HOUSE[domain])
    assert result.ok, result.rules


@pytest.mark.parametrize("text,domain,broken", [
    ("Sure! " + LEGAL, "legal", "starts_with_first_label"),
    (LEGAL.replace("Your obligations:", "Obligations:"), "legal", "labels_in_order"),
    (LEGAL.replace("- Pay the deposit.", "* Pay the deposit."), "legal", "obligations_bullets"),
    (MEDICAL.replace("\n- LH:FSH: the balance of two hormones.", ""), "medical", "term_bullets_at_least_2"),
    (MEDICAL + "\n- Q2?\n- Q3?\n- Q4?", "medical", "question_bullets_1_3"),
    (TECHNICAL.replace("2. Run", "3. Run"), "technical", "fix_numbered_1_4"),
    (TECHNICAL.replace("Fix:\n", "Fix:\n1. a\n2. b\n3. c\n").replace("1. Activate", "4. Activate")
     .replace("2. Run", "5. Run"), "technical", "fix_numbered_1_4"),
    (TECHNICAL + "\nAnd one more line.", "technical", "verify_one_line"),
    (TECHNICAL.replace("How to verify:", "How to verify:\nLikely cause: again"), "technical", "labels_in_order"),
])
def test_format_violations_are_named(text, domain, broken):
    result = formats.format_adherence(text, HOUSE[domain])
    assert not result.ok and not result.rules[broken], result.rules


def test_rule_names_are_those_of_the_binding_formats():
    names = {domain: list(formats.format_adherence(text, HOUSE[domain]).rules)
             for text, domain in [(LEGAL, "legal"), (MEDICAL, "medical"), (TECHNICAL, "technical")]}
    first = ["starts_with_first_label", "labels_in_order"]
    assert names == {
        "legal": first + ["plain_english_1_3_sentences", "obligations_bullets", "watch_out_bullets"],
        "medical": first + ["summary_1_2_sentences", "term_bullets_at_least_2", "question_bullets_1_3"],
        "technical": first + ["cause_1_2_sentences", "fix_numbered_1_4", "verify_one_line"]}


def test_adherence_report_gives_rates_per_domain():
    report = formats.adherence_report([LEGAL, "nonsense", MEDICAL, "free text"],
                                      ["legal", "legal", "medical", "poetry"], HOUSE)
    assert report.loc["legal", "all"] == pytest.approx(0.5)
    assert report.loc["medical", "all"] == pytest.approx(1.0)
    assert "poetry" not in report.index  # no house format: not judged, not counted as a failure
    assert formats.adherence_report(["x"], ["poetry"], {}).empty


def test_a_format_of_your_own_as_data(tmp_path):
    (tmp_path / "formats.json").write_text(json.dumps({"recipe": [
        {"label": "Ingredients:", "body": "bullets", "min": 2},
        {"label": "Steps:", "body": "numbered", "max": 3, "rule": "steps_1_3"}]}))
    house = formats.read_formats(tmp_path)["recipe"]
    good = "Ingredients:\n- flour\n- water\nSteps:\n1. Mix.\n2. Bake."
    assert formats.format_adherence(good, house).rules == {
        "starts_with_first_label": True, "labels_in_order": True, "ingredients_bullets": True, "steps_1_3": True}
    too_many = good + "\n3. Cool.\n4. Eat."
    assert not formats.format_adherence(too_many, house).rules["steps_1_3"]
    (tmp_path / "plain").mkdir()
    assert formats.read_formats(tmp_path / "plain") == {}  # no formats.json: no house format


@pytest.mark.parametrize("spec, message", [
    ({"g": [{"label": "A:", "body": "haiku"}]}, "unknown body kind 'haiku'; known: sentences, bullets"),
    ({"g": [{"label": "A:", "body": "lines", "colour": "red"}]}, "unexpected keyword argument 'colour'"),
    ({"g": []}, "expected"),
    ({"g": [{"label": "A:", "body": "lines"}, {"label": "B:", "body": "lines", "rule": "a_lines"}]}, "alike"),
])
def test_bad_format_files_say_what_to_fix(tmp_path, spec, message):
    (tmp_path / "formats.json").write_text(json.dumps(spec))
    with pytest.raises(DataError, match=message):
        formats.read_formats(tmp_path)


def test_rouge_l_identical_and_disjoint():
    assert sft.rouge_l([LEGAL], [LEGAL]) == pytest.approx(1.0)
    assert sft.rouge_l(["alpha beta"], ["gamma delta"]) == pytest.approx(0.0)


# ---------------------------------------------------------------- datasets and guards
def test_too_long_examples_are_reported_or_raise(tok, capsys):
    lengths = [sft.example_length(tok, r) for r in ROWS]
    limit = sorted(lengths)[1]  # the longest example does not fit
    kept, dropped = sft.build_sft_dataset(ROWS, tok, limit)
    assert len(kept) == 2 and len(dropped) == 1 and dropped[0]["tokens"] == max(lengths)
    assert "exceed max_length" in capsys.readouterr().out
    with pytest.raises(sft.SFTTrapError, match="exceed max_length"):
        sft.build_sft_dataset(ROWS, tok, limit, on_too_long="raise")


def _trainer(model_path, tok, packing: bool, tmp_path, precision: torch.dtype | None = None,
             quantization: str = "none"):
    model = load_model(model_path, quantization=quantization, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    data, _ = sft.build_sft_dataset(ROWS * 2, tok, 512)
    args = SFTConfig(output_dir=str(tmp_path), max_length=512, packing=packing, completion_only_loss=True,
                     max_steps=1, per_device_train_batch_size=2, report_to="none", save_strategy="no",
                     disable_tqdm=True, **env.precision_flags(precision))
    return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)


@pytest.mark.parametrize("packing", [False, True])
def test_trl_dataset_passes_guards(tiny_model_path, tok, packing, tmp_path):
    trainer = _trainer(tiny_model_path, tok, packing, tmp_path)
    counts = sft.check_training_examples(trainer.train_dataset, tok)
    assert counts["examples"] == 6 and counts["trained_tokens"] > 0 and counts["masked_tokens"] > 0
    first = trainer.train_dataset[0]
    n = (first.get("seq_lengths") or [len(first["input_ids"])])[0]
    assert sft.check_same_template(tok, ROWS, training_ids=first["input_ids"][:n])["id"] in {"l1", "m1", "t1"}


def test_a_model_trained_in_half_precision_computes_what_its_reload_computes(tiny_model_path, tok, tmp_path):
    """A Trainer in bf16 (fp16 on a T4) leaves the model's forward in autocast; ftnb.models.plain_forward removes
    it, and the trained model then gives the logits its saved adapter gives when reloaded (recipe 02's check)."""
    trainer = _trainer(tiny_model_path, tok, packing=False, tmp_path=tmp_path, precision=torch.bfloat16)
    trainer.train()
    in_autocast = sft.next_token_logits(trainer.model, tok, ROWS)
    model = plain_forward(trainer.model)
    sft.save_generator(model, tok, tmp_path / "adapter", base_model="tiny-llama-test")
    reloaded = saved.load(tmp_path / "adapter")
    again = sft.next_token_logits(reloaded.model, reloaded.tokenizer, ROWS, reloaded.system)
    assert (sft.next_token_logits(model, tok, ROWS) - again).abs().max() < 1e-5
    assert (in_autocast - again).abs().max() > 1e-4  # what the wrapper changed: a reload check would fail


def test_qlora_adapters_train_in_fp32_unless_the_trainer_computes_in_bf16(tiny_model_path, tok, tmp_path):
    """TRL stores an NF4 model's adapters in bf16 whatever the precision; keep_fp32_adapters puts them back
    in fp32 for an fp32 Trainer (peft then computes the adapters in fp32 too) and leaves a bf16 one alone."""
    trainer = _trainer(tiny_model_path, tok, False, tmp_path / "fp32", torch.float32, quantization="nf4")
    lora = [p for n, p in trainer.model.named_parameters() if "lora_" in n]
    assert lora and {p.dtype for p in lora} == {torch.bfloat16}  # TRL's choice, which the helper undoes
    assert sft.keep_fp32_adapters(trainer) == len(lora)
    seen = []
    first_a = next(m for n, m in trainer.model.named_modules() if n.endswith("lora_A.default"))
    first_a.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].dtype))
    trainer.train()
    assert {p.dtype for p in lora} == {torch.float32} and seen and set(seen) == {torch.float32}
    assert sft.keep_fp32_adapters(trainer) == 0  # nothing left to cast

    in_bf16 = _trainer(tiny_model_path, tok, False, tmp_path / "bf16", torch.bfloat16, quantization="nf4")
    assert sft.keep_fp32_adapters(in_bf16) == 0
    assert {p.dtype for n, p in in_bf16.model.named_parameters() if "lora_" in n} == {torch.bfloat16}


def test_the_vocabulary_head_skips_unlabelled_positions_with_the_same_loss(tiny_model_path, tok, tmp_path, monkeypatch):
    """On a CPU TRL's fused head scores every position, prompt included; inside loss_on_labelled_positions
    it projects only the labelled ones (the answers) and the loss, its gradients and the logged token
    metrics stay those of the full projection."""
    import trl.trainer.utils as trl_utils

    rows_projected = []
    fused = trl_utils._ChunkedLogProbFunction

    class Counting:
        @staticmethod
        def apply(hidden, *args):
            rows_projected.append(hidden.shape[0])
            return fused.apply(hidden, *args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Counting)
    trainer = _trainer(tiny_model_path, tok, packing=True, tmp_path=tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    labelled = int((batch["labels"][:, 1:] != sft.IGNORE).sum())

    def loss_gradients_metrics():
        trainer.model.zero_grad()
        trainer._metrics["train"].clear()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        grads = [p.grad.clone() for p in trainer.model.parameters() if p.requires_grad]
        return loss.item(), grads, {k: v[-1] for k, v in trainer._metrics["train"].items() if k != "num_tokens"}

    full = loss_gradients_metrics()
    with sft.loss_on_labelled_positions() as skipping:
        compact = loss_gradients_metrics()
    assert skipping and rows_projected == [batch["input_ids"].numel() - 1, labelled]
    assert 0 < labelled < batch["input_ids"].numel() - 1
    assert compact[0] == pytest.approx(full[0], rel=1e-5)
    assert max((a - b).abs().max().item() for a, b in zip(full[1], compact[1])) < 1e-5
    assert compact[2] == pytest.approx(full[2], rel=1e-5) and set(full[2]) >= {"entropy", "mean_token_accuracy"}
    assert trl_utils._use_triton(torch.device("cpu")) is False  # TRL's own choice again after the block


def _tokenized(tok, row=ROWS[0]):
    ex = sft.to_prompt_completion(row)
    prompt = tok.apply_chat_template(ex["prompt"], add_generation_prompt=True, return_dict=True)["input_ids"]
    full = tok.apply_chat_template(ex["prompt"] + ex["completion"], return_dict=True)["input_ids"]
    return full, [sft.IGNORE] * len(prompt) + full[len(prompt):]


def test_guard_all_masked(tok):
    ids, _ = _tokenized(tok)
    with pytest.raises(sft.SFTTrapError, match="every label is -100"):
        sft.check_training_examples(Dataset.from_list([{"input_ids": ids, "labels": [-100] * len(ids)}]), tok)


def test_guard_missing_end_of_turn(tok):
    ids, labels = _tokenized(tok)
    cut = len(ids) - 5  # a response truncated before <|im_end|>
    with pytest.raises(sft.SFTTrapError, match="end-of-turn"):
        sft.check_training_examples(Dataset.from_list([{"input_ids": ids[:cut], "labels": labels[:cut]}]), tok)


def test_guard_prompt_trained(tok):
    ids, _ = _tokenized(tok)
    with pytest.raises(sft.SFTTrapError, match="prompt tokens carry labels"):
        sft.check_training_examples(Dataset.from_list([{"input_ids": ids, "labels": ids}]), tok)
    assert sft.check_training_examples(Dataset.from_list([{"input_ids": ids, "labels": ids}]), tok,
                                       require_prompt_masked=False)["examples"] == 1


def test_guard_different_template(tok):
    ids, _ = _tokenized(tok)
    assert sft.check_same_template(tok, ROWS, training_ids=ids)["id"] == "l1"
    with pytest.raises(sft.SFTTrapError, match="different templates"):
        sft.check_same_template(tok, ROWS, training_ids=ids, system="Another system prompt.")


def test_packed_positions_keep_examples_apart(tiny_model_path, tok):
    """Padding-free packing is only safe if restarting position_ids stops cross-attention."""
    model = load_model(tiny_model_path, dtype=torch.float32).eval()
    a, _ = _tokenized(tok, ROWS[0])
    b, _ = _tokenized(tok, ROWS[1])
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([b]), use_cache=False).logits[0]
        packed = model(input_ids=torch.tensor([a + b]),
                       position_ids=torch.tensor([list(range(len(a))) + list(range(len(b)))]),
                       use_cache=False).logits[0, len(a):]  # as in training: TRL passes use_cache=False
    assert torch.allclose(alone, packed, atol=1e-4)


# ---------------------------------------------------------------- perplexity, generation, export
def test_perplexity_counts_response_tokens_only(tiny_model_path, tok):
    model = load_model(tiny_model_path, dtype=torch.float32)
    result = sft.perplexity(model, tok, ROWS, batch_size=2)
    expected_tokens = sum(len(lab) - lab.count(sft.IGNORE) for _, lab in (_tokenized(tok, r) for r in ROWS))
    assert result["tokens"] == expected_tokens
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    one_by_one = [sft.perplexity(model, tok, [r], batch_size=1) for r in ROWS]
    pooled = sum(r["loss"] * r["tokens"] for r in one_by_one) / sum(r["tokens"] for r in one_by_one)
    assert result["loss"] == pytest.approx(pooled, rel=1e-4)  # padding does not change the loss


def test_response_nll_is_the_loss_of_the_plain_full_logits(tiny_model_path, tok):
    """Left-padded batches that keep logits at the answer positions only give, row by row, the
    loss of one unpadded sequence scored with every logit, also where max_length cuts an answer."""
    model = load_model(tiny_model_path, dtype=torch.float32).eval()
    split = [sft.prompt_and_response_ids(tok, r) for r in ROWS]
    for max_length in (384, min(len(prompt) for prompt, _ in split) + 5):
        for (prompt, response), got in zip(split, sft.response_nll(model, tok, ROWS, max_length, batch_size=3)):
            ids = (prompt + response)[:max_length]
            trained = max(0, len(ids) - len(prompt))
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0]
            expected = float(torch.nn.functional.cross_entropy(logits[len(ids) - trained - 1:-1], torch.tensor(
                ids[len(ids) - trained:]), reduction="sum")) if trained else 0.0
            assert got["tokens"] == trained and got["nll"] == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_perplexity_intervals_resample_rows_and_pair_the_models(tiny_model_path, tok):
    """The interval's estimate is `perplexity`'s pooled value; a model against itself differs by
    exactly 0; against another model the paired difference has the sign and size of the gap."""
    model = load_model(tiny_model_path, dtype=torch.float32)
    rows = sft.response_nll(model, tok, ROWS, batch_size=2)
    ci = sft.perplexity_interval(rows, n_resamples=200)
    assert ci.estimate == pytest.approx(sft.perplexity(model, tok, ROWS, batch_size=2)["perplexity"])
    assert ci.low < ci.estimate < ci.high  # the rows' perplexities differ, so resampling moves it
    same = sft.perplexity_difference(rows, rows, n_resamples=200)
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0)
    worse = [{**r, "nll": r["nll"] + 0.1 * r["tokens"]} for r in rows]  # +0.1 nat per token everywhere
    gap = sft.perplexity_difference(worse, rows, n_resamples=200)
    assert gap.estimate == pytest.approx(ci.estimate * (math.exp(0.1) - 1)) and 0 < gap.low <= gap.high
    with pytest.raises(ValueError, match="same rows"):
        sft.perplexity_difference(rows[:2], sft.response_nll(model, tok, ROWS[1:], batch_size=2))


def test_perplexity_over_no_response_token_is_nan(tiny_model_path, tok):
    """Prompts longer than max_length leave no response token to score: exp(0) = 1 would read as
    a perfect model, so the result is NaN, with a warning that says why."""
    model = load_model(tiny_model_path, dtype=torch.float32)
    with pytest.warns(UserWarning, match=r"zero response tokens \(3 row\(s\), 3 cut by max_length"):
        result = sft.perplexity(model, tok, ROWS, max_length=16, batch_size=2)
    assert result["truncated"] == len(ROWS) and result["tokens"] == 0  # every example is cut, and says so
    assert math.isnan(result["perplexity"]) and math.isnan(result["loss"])
    with pytest.warns(UserWarning, match=r"zero response tokens \(0 row\(s\)"):
        assert math.isnan(sft.perplexity(model, tok, [])["perplexity"])


def test_evaluate_reports_adherence_only_where_a_format_exists(tiny_model_path, tok):
    model = load_model(tiny_model_path, dtype=torch.float32)
    table, rules, outputs = sft.evaluate(model, tok, ROWS, ROWS, max_new_tokens=4, formats={"legal": HOUSE["legal"]})
    assert math.isnan(table.loc["medical", "format_adherence"]) and math.isnan(table.loc["technical", "format_adherence"])
    assert table.loc["legal", "format_adherence"] == table.loc["all", "format_adherence"] == 0.0  # 4 random tokens
    assert list(rules.index) == ["legal"]
    no_format, no_rules, _ = sft.evaluate(model, tok, ROWS, ROWS, max_new_tokens=4)
    assert no_format["format_adherence"].isna().all() and no_rules.empty
    assert no_format[["perplexity", "rougeL"]].notna().all().all()  # the other metrics still run
    assert len(outputs) == len(ROWS)


def test_evaluate_split_keeps_passes_and_intervals(tiny_model_path, tok):
    """Every answer's pass or fail per domain with a format (for Wilson intervals and McNemar), and a
    perplexity interval per group, none for a single row."""
    assert sft.adherence_passes([LEGAL, "no format"], ROWS[:2], HOUSE) == {"legal": [True], "medical": [False],
                                                                           "all": [True, False]}
    assert sft.adherence_passes([LEGAL], ROWS[:1], {}) == {}
    model = load_model(tiny_model_path, dtype=torch.float32)
    result = sft.evaluate_split(model, tok, ROWS, ROWS, max_new_tokens=4, formats={"legal": HOUSE["legal"]})
    assert set(result.passes) == {"legal", "all"} and len(result.nll) == len(ROWS) == len(result.outputs)
    assert result.adherence_intervals()["all"].estimate == result.table.loc["all", "format_adherence"]
    pooled = result.table.loc["all"]
    assert pooled["perplexity_low"] < pooled["perplexity"] < pooled["perplexity_high"]
    assert math.isnan(result.table.loc["legal", "perplexity_low"])  # one row: no interval


def test_packing_summary_counts_examples_and_padding():
    """Examples per packed row, and tokens computed padding-free against plain batches padded to their longest."""
    rows = [{"input_ids": [0] * 10, "seq_lengths": [6, 4]}, {"input_ids": [0] * 8, "seq_lengths": [8]},
            {"input_ids": [0] * 3}]  # an unpacked row counts as one example
    one_batch = sft.packing_summary(rows, batch_size=4)
    assert (one_batch["examples"], one_batch["packed_rows"], one_batch["max_examples_per_row"]) == (4, 3, 2)
    assert one_batch["examples_per_row"] == pytest.approx(4 / 3) and one_batch["rows_with_one_example"] == pytest.approx(2 / 3)
    assert (one_batch["real_tokens"], one_batch["plain_padded_tokens"]) == (21, 32)  # 4 examples padded to 8
    assert one_batch["padding_share_plain"] == pytest.approx(11 / 32)
    single = sft.packing_summary(rows, batch_size=1)
    assert (single["plain_padded_tokens"], single["steps_plain"], single["steps_packed"]) == (21, 4, 3)


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_path, tok, tmp_path_factory):
    """An NF4 QLoRA adapter with non-zero updates (random B), saved with its manifest."""
    torch.manual_seed(0)
    base = load_model(tiny_model_path, quantization="nf4")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                            init_lora_weights=False, task_type="CAUSAL_LM"))
    folder = tmp_path_factory.mktemp("adapter")
    sft.save_generator(model, tok, folder, base_model="tiny-llama-test")
    return folder


def test_merged_export_reproduces_adapter_model(adapter_dir, tok, tmp_path):
    merged_dir = sft.export_merged(adapter_dir, tmp_path / "merged")
    assert not (merged_dir / "adapter_config.json").exists()
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(merged_dir)  # plain transformers, no peft
    adapter_model = saved.load_model(adapter_dir)
    check = sft.compare_models(adapter_model, plain, tok, ROWS, max_new_tokens=12)
    assert check["max_logit_diff"] < 1e-2
    assert check["greedy_agreement"] == 1.0


def test_saved_load_on_both_folder_kinds(adapter_dir, tok, tmp_path):
    merged_dir = sft.export_merged(adapter_dir, tmp_path / "merged")
    row = ROWS[2]
    from_adapter = saved.load(adapter_dir).generate(row["instruction"], row["input"], max_new_tokens=8)
    merged = saved.load(merged_dir)
    assert merged.system == sft.SYSTEM_PROMPT
    from_merged = merged.generate(row["instruction"], row["input"], max_new_tokens=8)
    assert isinstance(from_adapter, str) and from_adapter == from_merged
    streamed = "".join(merged.stream(row["instruction"], row["input"], max_new_tokens=8))
    assert streamed.strip() == from_merged


def test_a_domain_without_perplexity_rows_gets_nan_not_one(tiny_model_path, tok, tmp_path):
    """A domain that is only generated for has no perplexity: NaN in the table, null in metrics.json."""
    from ftnb.results import save_metrics

    model = load_model(tiny_model_path, dtype=torch.float32)
    with pytest.warns(UserWarning, match="zero response tokens"):
        table, _, _ = sft.evaluate(model, tok, ROWS[:1], ROWS, max_new_tokens=2)
    assert math.isnan(table.loc["technical", "perplexity"]) and math.isnan(table.loc["medical", "loss"])
    assert table.loc["all", "perplexity"] == pytest.approx(table.loc["legal", "perplexity"])
    assert table.loc["legal", "perplexity"] > 1
    saved = json.loads(save_metrics(tmp_path, {"table": table.to_dict("index")}).read_text())
    assert saved["table"]["technical"]["perplexity"] is None


def _in_thread_within(seconds: float, work):
    """Run `work()` in a daemon thread and fail unless it ends within `seconds` (a consumer that
    waits forever must fail the test, not hang it). Returns what work returned or raised."""
    outcome = {}

    def run():
        try:
            outcome["value"] = work()
        except Exception as error:  # handed to the test below
            outcome["error"] = error

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still waiting after {seconds} s"
    return outcome


@pytest.fixture(scope="module")
def tiny_generator(tiny_model_path, tok):
    return sft.Generator(load_model(tiny_model_path, dtype=torch.float32), tok)


def test_stream_raises_what_generation_raised(tiny_generator):
    row = ROWS[2]
    outcome = _in_thread_within(30, lambda: list(tiny_generator.stream(row["instruction"], row["input"],
                                                                       max_new_tokens=4, not_a_setting=1)))
    assert isinstance(outcome.get("error"), ValueError) and "not_a_setting" in str(outcome["error"])


class _CountSteps:
    """A stopping criterion that never stops, only counts the generation steps."""

    def __init__(self):
        self.steps = 0

    def __call__(self, input_ids, scores, **kwargs):
        self.steps += 1
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def test_leaving_a_stream_early_stops_generation(tiny_generator):
    """Breaking out after the first piece stops generation within a few tokens of 900 and leaves
    no generating thread behind."""
    row, counter = ROWS[2], _CountSteps()
    before = set(threading.enumerate())
    stream = tiny_generator.stream(row["instruction"], row["input"], max_new_tokens=900, min_new_tokens=900,
                                   stopping_criteria=[counter])
    for _ in stream:
        break
    stream.close()  # what the garbage collector does for a loop left with break
    started = set(threading.enumerate()) - before
    assert not any(thread.is_alive() for thread in started)
    assert 0 < counter.steps < 100
    assert "".join(tiny_generator.stream(row["instruction"], row["input"], max_new_tokens=4))  # still usable


def test_domains_are_those_of_the_data():
    present = ["technical", "legal", "medical", "legal"]
    assert sft.select_domains(["legal", "technical"], present) == ["legal", "technical"]
    assert sft.select_domains([], present) == ["legal", "medical", "technical"]  # [] = every domain
    with pytest.raises(ValueError, match="technicl"):
        sft.select_domains(["legal", "technicl"], present)
    with pytest.raises(ValueError, match="the data has: legal, medical, technical"):
        sft.select_domains(["finance"], present)


def test_repetition_penalty_spares_the_prompt(tok):
    penalty = sft.decoding_kwargs(tok, prompt_width=3, repetition_penalty=2.0)["logits_processor"][0]
    input_ids = torch.tensor([[5, 6, 7, 8]])  # 5, 6, 7: the prompt; 8: already generated
    scores = penalty(input_ids, torch.ones(1, 10))
    assert scores[0, 8] == pytest.approx(0.5)  # the answer's own token: penalised
    assert torch.all(scores[0, [5, 6, 7]] == 1.0)  # prompt tokens: free to reuse
    assert "logits_processor" not in sft.decoding_kwargs(tok, 3)  # 1.0: plain greedy


def test_repetition_penalty_can_spare_line_breaks(tok):
    newline, word = tok("\n", add_special_tokens=False)["input_ids"][0], tok("Fix", add_special_tokens=False)["input_ids"][0]
    assert newline in sft.line_break_ids(tok) and word not in sft.line_break_ids(tok)
    assert all(tok.decode([i]).strip() == "" and "\n" in tok.decode([i]) for i in sft.line_break_ids(tok))
    answer = torch.tensor([[5, 6, 7, word, newline]])  # 5, 6, 7: the prompt
    for spares, newline_score in ((True, 1.0), (False, 0.5)):
        penalty = sft.decoding_kwargs(tok, prompt_width=3, repetition_penalty=2.0,
                                      penalty_spares_line_breaks=spares)["logits_processor"][0]
        scores = penalty(answer, torch.ones(1, len(tok)))
        assert scores[0, word] == pytest.approx(0.5)  # a word the answer used: penalised either way
        assert scores[0, newline] == pytest.approx(newline_score)
        assert torch.all(scores[0, [5, 6, 7]] == 1.0)


def test_saved_decoding_settings_are_the_generator_defaults(adapter_dir, tok, tmp_path):
    sft.save_generator(saved.load_model(adapter_dir), tok, tmp_path / "a", base_model="tiny-llama-test",
                       decoding={"max_new_tokens": 6, "repetition_penalty": 1.3, "penalty_spares_line_breaks": True})
    generator = saved.load(tmp_path / "a")
    assert generator.decoding == {"max_new_tokens": 6, "repetition_penalty": 1.3, "penalty_spares_line_breaks": True}
    row = ROWS[0]
    assert generator.generate(row["instruction"], row["input"]) == generator.generate(
        row["instruction"], row["input"], max_new_tokens=6, repetition_penalty=1.3, penalty_spares_line_breaks=True)
    merged = saved.load(sft.export_merged(tmp_path / "a", tmp_path / "merged"))
    assert merged.decoding == generator.decoding  # the export keeps them
