"""ftnb.variants: every LoRA variant trains through the Trainer on tiny-llama-test with what it
needs (LoRA+'s optimizer, AdaLoRA's callback), then saves and reloads to the same predictions
(PiSSA and LoftQ included, which change the starting point of the weights); a base a variant cannot
run on is refused. Each case is a tiny model and two optimizer steps."""
import json

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import DataCollatorWithPadding, TrainingArguments

from ftnb import saved, variants
from ftnb.data import read_labels
from ftnb.models import load_model, load_tokenizer
from ftnb.tasks import classify

LABELS = list(read_labels("tickets")["category"])
TICKETS = [{"subject": f"ticket {i}", "body": text, "category": LABELS[i % len(LABELS)]}
           for i, text in enumerate(["charged twice in May", "money back for the headset", "2FA never arrives",
                                     "export fails with error 500", "parcel stuck for a week",
                                     "does the plan include SSO", "end my subscription", "love the dashboard"])]
STEPS, RANK = 2, 4  # optimizer steps and adapter rank of each training
# the base each variant is trained on here: the recipe's NF4 where the variant runs on it
BASES = {name: "none" if variant.full_precision_only else "nf4" for name, variant in variants.VARIANTS.items()}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-llama-test")


def _adapted(tok, variant: str, quantization: str) -> variants.Adapted:
    id2label, label2id = classify.label_maps(LABELS)
    model = load_model("tiny-llama-test", task="seq-cls", quantization=quantization, num_labels=len(LABELS),
                       id2label=id2label, label2id=label2id, tokenizer=tok)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = variants.peft_config(variant, r=RANK, alpha=2 * RANK, dropout=0.0, target_modules="all-linear",
                                  task_type="SEQ_CLS", modules_to_save=["score"], total_steps=STEPS)
    return variants.attach(model, variant, config)


def _train(adapted: variants.Adapted, tok, out):
    train = classify.tokenize_split(Dataset.from_list(TICKETS), tok, "category", LABELS, max_length=24)
    args = TrainingArguments(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4,
                             learning_rate=1e-2, save_strategy="no", report_to="none",
                             disable_tqdm=True, use_cpu=True, seed=0)
    trainer = classify.WeightedTrainer(model=adapted.model, args=args, train_dataset=train,
                                       data_collator=DataCollatorWithPadding(tok), callbacks=adapted.callbacks,
                                       optimizers=adapted.optimizers(args))
    trainer.train()
    return trainer


def _trainable(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _loftq_gap_to_best_fit(model, layer_name: str = "model.layers.0.mlp.down_proj") -> float:
    """How far Q(W) + s·B·A is from W, relative to the best any rank-r update can do (1.0: LoftQ found it).
    The best rank-r fit of the rounding error E = W - Q(W) leaves E's singular values beyond r."""
    import bitsandbytes as bnb
    from safetensors import safe_open

    layer = model.base_model.model.get_submodule(layer_name)
    weight = layer.get_base_layer().weight
    rounded = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    with safe_open(f"{model.get_base_model().config.name_or_path}/model.safetensors", "pt") as f:
        original = f.get_tensor(f"{layer_name}.weight").float()
    update = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    rank = layer.r["default"]
    best = torch.linalg.svdvals(original - rounded)[rank:].norm()
    return ((original - rounded - update).norm() / best).item()


@pytest.mark.parametrize("variant", list(variants.VARIANTS))
def test_each_variant_trains_through_the_trainer_saves_and_reloads(variant, tok, tmp_path):
    adapted = _adapted(tok, variant, BASES[variant])
    if variant == "loftq":  # its start: Q(W) + s·B·A as near W as a rank-r update gets, the 4-bit base untouched
        assert _loftq_gap_to_best_fit(adapted.model) == pytest.approx(1.0, abs=1e-3)
    before = _trainable(adapted.model)
    assert before, f"{variant}: nothing to train"
    trainer = _train(adapted, tok, tmp_path)
    after = _trainable(adapted.model)
    moved = [name for name in before if not torch.equal(before[name], after[name])]
    assert any("score" in name for name in moved), f"{variant}: the head did not train"
    assert len(moved) > len(before) // 2, f"{variant}: only {len(moved)} of {len(before)} tensors trained"
    rates = {group["initial_lr"] for group in trainer.optimizer.param_groups if group["params"]}  # before the schedule
    if variant == "lora+":  # B (and the 1-d parameters) at 16x A's rate, through the Trainer's schedule
        assert len(rates) == 2 and max(rates) / min(rates) == pytest.approx(variants.LORAPLUS_LR_RATIO)
    else:
        assert len(rates) == 1
    if variant == "adalora":  # the callback ran the budget step: importance scores exist
        assert adapted.model.base_model.rankallocator.ipt, "update_and_allocate never ran"

    clf = classify.Classifier(adapted.model, tok, LABELS, base_model="tiny-llama-test", max_length=24)
    probs = clf.probabilities(TICKETS)
    folder = clf.save(tmp_path / "classifier")
    reloaded = saved.load(folder).probabilities(TICKETS)
    assert reloaded.argmax(1).tolist() == probs.argmax(1).tolist()
    # PiSSA reloads as the original base + a rank-2r LoRA: the same model up to float rounding
    assert np.abs(reloaded - probs).max() < 1e-5, f"{variant}: the reloaded model predicts otherwise"
    if variant == "pissa":
        assert saved.read_manifest(folder)["weights"]["adapters"]["default"]["peft_type"] == "LORA"
        assert json.loads((folder / "adapter_config.json").read_text())["r"] == 2 * RANK


def test_bases_a_variant_cannot_run_on_are_refused_before_loading():
    with pytest.raises(variants.VariantError, match=r"quantization = \"none\".*loftq"):
        variants.check_base("pissa", "nf4")
    with pytest.raises(variants.VariantError, match="needs a 4-bit base"):
        variants.check_base("loftq", "none")
    with pytest.raises(variants.VariantError, match="choose one of lora, rslora"):
        variants.check_base("qlora", "nf4")
    with pytest.raises(variants.VariantError, match="total_steps"):
        variants.peft_config("adalora", 4, 8, 0.0, "all-linear", "SEQ_CLS", ["score"])


def test_a_pissa_adapter_without_its_initial_weights_is_not_saved(tok, tmp_path):
    model = load_model("tiny-llama-test", task="seq-cls", num_labels=len(LABELS), tokenizer=tok)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, init_lora_weights="pissa_niter_2",
                                             target_modules="all-linear", modules_to_save=["score"]))
    clf = classify.Classifier(model, tok, LABELS, base_model="tiny-llama-test", max_length=24)
    with pytest.raises(ValueError, match="ftnb.variants.attach"):
        clf.save(tmp_path / "classifier")
    assert not (tmp_path / "classifier" / "adapter_model.safetensors").exists()
