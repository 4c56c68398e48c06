import multiprocessing
import os

import pytest
import torch

from ftnb import models
from ftnb.models import REGISTRY, UnknownModelError, load_model, load_tokenizer, resolve

PROMPTS = ["What is the capital of France?", "Write a haiku about memory.",
           "List three uses of a hash map."]


def test_unknown_name_lists_the_registry():
    with pytest.raises(UnknownModelError) as err:
        resolve("smollm2-135m")
    message = str(err.value)
    assert "smollm2-135m-instruct" in message and "minilm-l6" in message
    assert "Did you mean 'smollm2-135m-instruct'" in message


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UnknownModelError, match="need internet"):
        resolve("nobody/no-such-model")


@pytest.fixture
def fresh_choice(monkeypatch):
    """Forget this process's source choices, and fail any test that would reach the network."""
    monkeypatch.setattr(models, "_CHOICES", {})

    def no_network(repo_id):
        raise AssertionError("tests must not ask the hub")

    monkeypatch.setattr(models, "_hub_answers", no_network)
    return monkeypatch


def test_default_smollm2_is_the_gguf_copy_offline(fresh_choice, capsys):
    fresh_choice.setenv("HF_HUB_OFFLINE", "1")
    assert resolve("smollm2-135m-instruct") == resolve("smollm2-135m-instruct-gguf")
    assert models.pinned("smollm2-135m-instruct") == "smollm2-135m-instruct-gguf"
    printed = capsys.readouterr().out
    assert printed.count("'smollm2-135m-instruct' -> 'smollm2-135m-instruct-gguf'") == 1  # once per process
    assert "HF_HUB_OFFLINE is set" in printed and "model='HuggingFaceTB/SmolLM2-135M-Instruct'" in printed


@pytest.mark.parametrize("hub_answers, chosen, reason", [
    (True, "HuggingFaceTB/SmolLM2-135M-Instruct", "the Hugging Face hub answered"),
    (False, "smollm2-135m-instruct-gguf", "the Hugging Face hub did not answer")])
def test_default_smollm2_online_takes_the_original_when_the_hub_answers(fresh_choice, capsys, hub_answers,
                                                                          chosen, reason):
    fresh_choice.setenv("HF_HUB_OFFLINE", "0")
    asked = []
    fresh_choice.setattr(models, "_hub_answers", lambda repo_id: asked.append(repo_id) or hub_answers)
    choice = models.choose_source("smollm2-135m-instruct")
    assert (choice.chosen, choice.reason, choice.uses_original) == (chosen, reason, hub_answers)
    expected_path = chosen if hub_answers else resolve("smollm2-135m-instruct-gguf")
    assert resolve("smollm2-135m-instruct") == expected_path
    again = models.pinned("smollm2-135m-instruct")  # e.g. the tokenizer after the model: same weights
    assert again == chosen and asked == ["HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert f"-> '{chosen}' ({reason})" in capsys.readouterr().out


def test_precision_label_says_when_fp32_is_de_quantized(fresh_choice):
    fresh_choice.setenv("HF_HUB_OFFLINE", "1")
    assert models.precision_label("smollm2-135m-instruct", "fp32") == "fp32 (de-quantized Q4_1)"
    assert models.precision_label("HuggingFaceTB/SmolLM2-135M-Instruct", "fp32") == "fp32"
    assert models.precision_label("tiny-llama-test", "bf16") == "bf16"


def test_pinned_names_never_ask_the_hub(fresh_choice):
    fresh_choice.setenv("HF_HUB_OFFLINE", "0")
    assert models.choose_source("smollm2-135m-instruct-gguf") is None
    assert models.pinned("smollm2-135m-instruct-gguf") == "smollm2-135m-instruct-gguf"
    assert resolve("smollm2-135m-instruct-gguf").endswith("smollm2-135m-instruct-gguf/v1")


def test_local_folder_and_package_folder(tiny_model_path, tmp_path):
    assert resolve(tiny_model_path) == tiny_model_path
    assert (resolve("minilm-l6") + "/config.json")
    with pytest.raises(UnknownModelError, match="no config.json"):
        resolve(str(tmp_path))


def test_tokenizer_gets_a_distinct_pad_token():
    tok = load_tokenizer("smollm2-135m-instruct")
    assert tok.pad_token is not None and tok.pad_token != tok.eos_token


@pytest.mark.parametrize("quantization", models.QUANTIZATIONS)
def test_load_every_quantization(tiny_model_path, quantization):
    model = load_model(tiny_model_path, quantization=quantization)
    out = model(torch.tensor([[1, 2, 3]]))
    assert out.logits.shape == (1, 3, model.config.vocab_size)


def test_sequence_classification_head_stays_float(tiny_model_path):
    tok = load_tokenizer(tiny_model_path)
    model = load_model(tiny_model_path, task="seq-cls", quantization="nf4", num_labels=3, tokenizer=tok)
    assert model.score.weight.dtype == torch.float32 and type(model.score.weight).__name__ == "Parameter"
    assert model.config.pad_token_id == tok.pad_token_id


def _mapped_ranges(path_part: str) -> list[tuple[int, int]]:
    """Address ranges of this process's memory mappings of files whose path contains path_part."""
    ranges = []
    for line in open("/proc/self/maps"):
        if path_part in line:
            start, end = line.split()[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_a_quantized_model_holds_no_view_of_its_checkpoint_file(tiny_model_path):
    # The fp32 checkpoint loaded with fp32 compute: the tensors left unconverted would be views of the
    # memory-mapped file, which keeps all its pages resident while the model lives.
    model = load_model(tiny_model_path, quantization="nf4", dtype=torch.float32)
    # any mapping of a checkpoint file: models other tests left alive may map theirs (an fp32 model's weights
    # are such views, rightly), so the test asks about this model's tensors only
    checkpoints = _mapped_ranges("model.safetensors")
    tensors = [*model.parameters(), *model.buffers()]
    in_file = [t.shape for t in tensors if any(a <= t.untyped_storage().data_ptr() < b for a, b in checkpoints)]
    assert in_file == []
    if model.config.tie_word_embeddings:
        assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    out = model(torch.tensor([[1, 2, 3]]))
    assert torch.isfinite(out.logits).all()


def test_a_quantized_load_hands_the_heap_back(tiny_model_path, monkeypatch):
    # quantizing reads every weight in full precision; the pages it freed go back to the system after the
    # load (a plain load has none to give: its weights are the checkpoint's own)
    trims = []
    monkeypatch.setattr(models, "trim_heap", lambda: trims.append(True))
    load_model(tiny_model_path, dtype=torch.float32)
    assert trims == []
    load_model(tiny_model_path, quantization="nf4", dtype=torch.float32)
    assert trims == [True]


def test_bad_quantization_name():
    with pytest.raises(ValueError, match="nf4"):
        models.bnb_config("nf3")


def _greedy(model, tok, prompt):
    from ftnb.inference import chat

    return chat(model, tok, prompt, max_new_tokens=24)


def test_converted_smollm2_generates_exactly_like_the_gguf(monkeypatch):
    reference, ref_tok = models.load_smollm2_from_gguf()
    resolve("smollm2-135m-instruct-gguf")  # converts once, unless cached already

    def convert_again():
        raise AssertionError("a cached model was converted again")

    monkeypatch.setattr(models, "load_smollm2_from_gguf", convert_again)
    converted = load_model("smollm2-135m-instruct-gguf", dtype=torch.float32)
    tok = load_tokenizer("smollm2-135m-instruct-gguf")
    ref_tok.pad_token = tok.pad_token
    for prompt in PROMPTS:
        assert _greedy(converted, tok, prompt) == _greedy(reference, ref_tok, prompt)


def _materialise_in(cache: str) -> str:
    import os

    os.environ["FTNB_CACHE"] = cache
    from ftnb.models import resolve

    return resolve("tiny-llama-test")


def test_concurrent_materialisation_is_safe(tmp_path, monkeypatch):
    # The tiny model is built by the same cached, locked path as the SmolLM2 conversion.
    resolve("smollm2-135m-instruct-gguf")  # its tokenizer is shared with the tiny model
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / "smollm2-135m-instruct-gguf").symlink_to(
        models.cache_dir() / "models" / "smollm2-135m-instruct-gguf")
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        paths = pool.map(_materialise_in, [str(cache)] * 3)
    assert len(set(paths)) == 1
    built = cache / "models" / "tiny-llama-test"
    assert [p.name for p in built.iterdir() if p.is_dir()] == ["v1"]  # no leftover temp folders
    assert (built / "v1" / ".ready").exists()


def test_registry_entries_describe_themselves():
    for name, entry in REGISTRY.items():
        assert entry.description and entry.hub_id
        assert name in models.describe_registry()



def test_saved_models_record_the_weights_they_were_trained_on(fresh_choice):
    """A saved model names the pinned source, so a reload where the hub answers does not put an
    adapter trained on the GGUF copy onto the original weights."""
    from ftnb import saved

    fresh_choice.setenv("HF_HUB_OFFLINE", "1")
    record = saved.base_model_record("smollm2-135m-instruct", config=None)
    assert record["name"] == "smollm2-135m-instruct-gguf" and "de-quantised to fp32" in record["origin"]


def test_training_attention_is_eager_only_for_bf16_on_cpu_and_restored_after(tiny_model_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model(tiny_model_path, task="seq-cls", num_labels=3),
                           LoraConfig(task_type="SEQ_CLS", r=4, target_modules="all-linear"))
    inner = models.without_peft(model)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]])
    batch = dict(input_ids=ids, attention_mask=(ids != 0).long())
    model.eval()
    with torch.no_grad():
        own_logits = model(**batch).logits
    assert inner.config._attn_implementation == "sdpa"
    with models.training_attention(model, torch.float32) as used:
        assert used == "sdpa" and inner.config._attn_implementation == "ftnb_by_sequence_sdpa"  # packed rows apart
    with pytest.raises(RuntimeError, match="stopped"):
        with models.training_attention(model, torch.bfloat16) as used:
            assert used == "eager" and inner.config._attn_implementation == "ftnb_by_sequence_eager"
            with torch.no_grad():
                eager_logits = model(**batch).logits
            torch.testing.assert_close(eager_logits, own_logits, atol=1e-5, rtol=1e-4)  # the same attention
            raise RuntimeError("training stopped")
    assert inner.config._attn_implementation == "sdpa"  # given back, also when training raised


def _prepared_bf16_classifier(path: str, tokenizer):
    """A 4-bit classifier computing in bf16, prepared and adapted as recipe 01 trains it, from the same seed
    each time (the same head and adapters)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    torch.manual_seed(0)
    model = load_model(path, task="seq-cls", quantization="nf4", num_labels=3, tokenizer=tokenizer,
                       dtype=torch.bfloat16)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, target_modules="all-linear",
                                            modules_to_save=["score"]))


def test_layers_in_compute_dtype_keeps_the_residual_stream_in_bf16_and_the_head_in_fp32(tiny_model_path):
    tok = load_tokenizer(tiny_model_path)
    reference, model = (_prepared_bf16_classifier(tiny_model_path, tok) for _ in range(2))
    inner = models.without_peft(model)
    assert models.layers_in_compute_dtype(model, torch.float32) == 0
    assert models.layers_in_compute_dtype(model, torch.float16) == 0  # fp16 keeps peft's fp32 guard
    assert models.layers_in_compute_dtype(model, torch.bfloat16) == 1 + 2 * inner.config.num_hidden_layers
    assert inner.model.embed_tokens.weight.dtype == inner.model.layers[0].input_layernorm.weight.dtype == torch.bfloat16
    assert inner.model.norm.weight.dtype == torch.float32  # the head reads fp32, as before
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}  # adapters, head

    streams = []
    inner.model.layers[0].register_forward_hook(lambda module, args, out: streams.append(
        (out[0] if isinstance(out, tuple) else out).dtype))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]])
    batch = dict(input_ids=ids, attention_mask=(ids != 0).long(), labels=torch.tensor([0, 2]))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the Trainer computes with bf16
        loss, reference_loss = model(**batch).loss, reference(**batch).loss
    loss.backward()
    assert streams == [torch.bfloat16]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    torch.testing.assert_close(loss.float(), reference_loss.float(), atol=2e-2, rtol=0)  # bf16 rounding only

    model.eval()  # without autocast, as a Classifier and its reloaded copy predict
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_adapter_inputs_uncast_keeps_bf16_adapter_inputs_under_cpu_autocast_and_restores_casting(tiny_model_path):
    tok = load_tokenizer(tiny_model_path)
    model = _prepared_bf16_classifier(tiny_model_path, tok)
    models.layers_in_compute_dtype(model, torch.bfloat16)
    seen = []
    for layer in model.modules():
        if hasattr(layer, "lora_dropout"):
            layer.lora_dropout["default"].register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]])
    batch = dict(input_ids=ids, attention_mask=(ids != 0).long(), labels=torch.tensor([0, 2]))

    def train_step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as the Trainer computes with bf16 on a CPU
            loss = model(**batch).loss
        loss.backward()
        return loss.detach().float(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    model.train()
    torch.manual_seed(0)
    cast_loss, cast_grads = train_step()
    assert set(seen) == {torch.float32}  # peft's cast: it asks torch.is_autocast_enabled(), CUDA's state
    with models.adapter_inputs_uncast(model, torch.float32) as active:
        assert not active
        train_step()
        assert set(seen) == {torch.float32}  # not a bf16 run: nothing changed
    with pytest.raises(RuntimeError, match="stopped"):
        with models.adapter_inputs_uncast(model, torch.bfloat16) as active:
            assert active
            torch.manual_seed(0)  # the same dropout masks
            loss, grads = train_step()
            assert set(seen) == {torch.bfloat16}
            raise RuntimeError("training stopped")
    torch.testing.assert_close(loss, cast_loss, atol=2e-2, rtol=0)  # bf16 rounding of the dropout only
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    for g, reference in zip(grads, cast_grads):
        assert (g - reference).norm() <= 0.05 * reference.norm() + 1e-6

    model.eval()  # casting given back, also after an exception: outside autocast the fp32 adapters need it
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


@pytest.mark.parametrize("variant", ["lora", "vera"])
def test_adapter_inputs_uncast_restores_each_layers_flag(tiny_model_path, variant):
    from peft import LoraConfig, VeraConfig, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    config = (LoraConfig(r=4, target_modules="all-linear") if variant == "lora"
              else VeraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model = get_peft_model(load_model(tiny_model_path, dtype=torch.float32), config)
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    before = [getattr(m, "cast_input_dtype_enabled", True) for m in layers]
    with models.adapter_inputs_uncast(model, torch.bfloat16):  # VeRA's layers have no flag of their own
        assert all(m.cast_input_dtype_enabled is False for m in layers)
    assert [getattr(m, "cast_input_dtype_enabled", True) for m in layers] == before


def test_layers_in_compute_dtype_leaves_a_tied_head_alone(tiny_model_path):
    from peft import prepare_model_for_kbit_training

    model = load_model(tiny_model_path, quantization="nf4", dtype=torch.bfloat16)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # every float tensor fp32
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    before = {name: p.dtype for name, p in model.named_parameters()}
    assert models.layers_in_compute_dtype(model, torch.bfloat16) == 0
    assert {name: p.dtype for name, p in model.named_parameters()} == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_dequantized_once_trains_bit_for_bit_as_bitsandbytes_then_gives_the_layers_back(
        tiny_model_path, dtype, monkeypatch):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    tok = load_tokenizer(tiny_model_path)
    torch.manual_seed(0)
    model = load_model(tiny_model_path, task="seq-cls", quantization="nf4", num_labels=3, tokenizer=tok, dtype=dtype)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_dropout=0.1, target_modules="all-linear",
                                             modules_to_save=["score"]))
    with torch.no_grad():  # adapters that contribute, so their path through the layers is compared too
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]])
    batch = dict(input_ids=ids, attention_mask=(ids != 0).long(), labels=torch.tensor([0, 2]))
    passes = []
    de_quantizing = bnb.matmul_4bit
    monkeypatch.setattr(bnb, "matmul_4bit", lambda *args, **kwargs: passes.append(1) or de_quantizing(*args, **kwargs))

    def train_step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        passes.clear()
        torch.manual_seed(1)  # the same dropout masks each time
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):  # as the Trainer computes
            loss = model(**batch).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in trainable]

    model.train()
    loss, grads = train_step()
    assert len(passes) == len(quantized) > 0  # bitsandbytes de-quantizes in every layer's pass
    size_mib = sum(m.weight.quant_state.shape.numel() for m in quantized) * dtype.itemsize / 2**20
    with models.weights_dequantized_once(model, budget_mib=size_mib / 2) as held:
        assert held == 0.0 and not any("forward" in m.__dict__ for m in quantized)  # over the budget: unchanged
    with models.weights_dequantized_once(model) as held:
        assert held == pytest.approx(size_mib)
        assert all(getattr(m, models.DEQUANTIZED).dtype == dtype for m in quantized)  # in the compute dtype
        assert not any(models.DEQUANTIZED in key for key in model.state_dict())  # never saved
        once_loss, once_grads = train_step()
        assert passes == []  # no layer de-quantized in the pass
    assert torch.equal(once_loss, loss) and all(torch.equal(a, b) for a, b in zip(once_grads, grads))  # bit for bit
    assert not any("forward" in m.__dict__ or hasattr(m, models.DEQUANTIZED) for m in quantized)  # copy freed
    again_loss, _ = train_step()
    assert len(passes) == len(quantized) and torch.equal(again_loss, loss)  # per pass again, the same numbers


def test_weights_dequantized_once_leaves_a_float_model_alone(tiny_model_path):
    model = load_model(tiny_model_path, dtype=torch.float32)
    with models.weights_dequantized_once(model) as held:
        assert held == 0.0


def test_checkpointed_layers_counts_what_checkpointing_set_through_a_peft_wrapper(tiny_model_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model(tiny_model_path), LoraConfig(r=2, target_modules="all-linear"))
    layers = model.config.num_hidden_layers
    assert models.checkpointed_layers(model) == (0, layers)
    model.activation_checkpointing_enable(every_n_layers=2)  # what a Trainer does with {"every_n_layers": 2}
    assert models.checkpointed_layers(model) == ((layers + 1) // 2, layers)
    model.activation_checkpointing_enable()
    assert models.checkpointed_layers(model) == (layers, layers)


def test_every_n_layers_for_chooses_by_compute_dtype_at_zero_and_refuses_negatives():
    assert models.every_n_layers_for(0, torch.bfloat16) == models.every_n_layers_for(0, torch.float16) == 2
    assert models.every_n_layers_for(0, torch.float32) == 1
    assert models.every_n_layers_for(3, torch.bfloat16) == models.every_n_layers_for(3, torch.float32) == 3
    with pytest.raises(ValueError, match="checkpoint_every_n_layers=-1: use N >= 1"):
        models.every_n_layers_for(-1, torch.float32)


def test_passes_for_splits_fp32_passes_and_keeps_the_examples_per_step():
    assert models.passes_for(8, 2, 4, torch.float32) == (4, 4)
    assert models.passes_for(8, 2, 4, torch.bfloat16) == (8, 2)  # half precision keeps the larger pass
    assert models.passes_for(8, 2, 0, torch.float32) == (8, 2)  # 0: off
    assert models.passes_for(4, 4, 8, torch.float32) == (4, 4)  # never a larger pass than asked
    with pytest.raises(ValueError, match="must divide batch_size=8"):
        models.passes_for(8, 2, 3, torch.float32)
