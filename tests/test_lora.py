"""ftnb.lora, the from-scratch LoRA and DoRA, checked against peft on the same initial weights.

Every comparison uses alpha != r (alpha = 16 on the tiny Llama, 24 on SmolLM2): with alpha = r the
scale is 1 and a layer that multiplied by alpha, or forgot the scale, would still agree with peft.
B is drawn from N(0, 0.02) before copying, because with B = 0 every scale gives the same output.
Dropout is off, so the comparisons are deterministic; fp32 throughout (SmolLM2's "fp32" is the
Q4_1 GGUF de-quantized, which does not matter for an equivalence test).
"""
import copy

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from ftnb.lora import (DoraLinear, LoraConfig, LoraLinear, adapter_parameters, adapter_state_dict,
                       copy_adapter_weights, inject_adapters, load_adapter, lora_layers, merge_adapters,
                       save_adapter, unmerge_adapters)
from ftnb.models import load_model

TOLERANCE = 1e-6  # max absolute difference allowed between ours and peft in fp32
VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}


def tiny_llama(bias: bool, hidden: int = 64, task: str = "causal-lm") -> nn.Module:
    """A 2-layer Llama shaped like ftnb.models' tiny-llama-test, with a small vocabulary for speed."""
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attention_bias=bias, mlp_bias=bias, tie_word_embeddings=True, pad_token_id=0,
                         num_labels=3)
    torch.manual_seed(0)
    model = (LlamaForCausalLM if task == "causal-lm" else LlamaForSequenceClassification)(config)
    if bias:  # transformers initialises biases to zero, which would leave the bias path untested
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.normal_(0, 0.1)
    return model.eval()


def input_ids(vocab_size: int, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def perturb(model: nn.Module) -> None:
    """Move the adapter off its initial state: B ~ N(0, 0.02), DoRA magnitudes scaled by 0.5..1.5."""
    generator = torch.Generator().manual_seed(2)
    for tensors in adapter_parameters(model).values():
        tensors["B"].copy_(torch.randn(tensors["B"].shape, generator=generator) * 0.02)
        if "magnitude" in tensors:
            tensors["magnitude"].mul_(0.5 + torch.rand(tensors["magnitude"].shape, generator=generator))


def peft_config(config: LoraConfig) -> PeftLoraConfig:
    targets = config.target_modules if isinstance(config.target_modules, str) else list(config.target_modules)
    return PeftLoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=0.0, target_modules=targets,
                          use_rslora=config.use_rslora, use_dora=config.use_dora)


def ours_and_peft(base: nn.Module, config: LoraConfig) -> tuple[nn.Module, nn.Module]:
    """Copies of base adapted by ftnb.lora and by peft, both starting from our A and a nonzero B."""
    ours = copy.deepcopy(base)
    inject_adapters(ours, config)
    theirs = get_peft_model(copy.deepcopy(base), peft_config(config)).eval()
    perturb(ours)
    copy_adapter_weights(ours, theirs)
    return ours, theirs


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


def base_weight(model: nn.Module, name: str) -> torch.Tensor:
    inner = model.base_model.model if hasattr(model, "base_model") and hasattr(model, "peft_config") else model
    return inner.get_submodule(name).base_layer.weight


def assert_matches_peft(base: nn.Module, config: LoraConfig, ids: torch.Tensor) -> None:
    """Outputs, gradients of every A, B (and magnitude), merged weights and unmerge, against peft."""
    ours, theirs = ours_and_peft(base, config)
    ours_params, peft_params = adapter_parameters(ours), adapter_parameters(theirs)
    assert ours_params.keys() == peft_params.keys()  # the same layers are adapted

    with torch.no_grad():
        base_logits = base(ids).logits
    ours_out, peft_out = ours(ids, labels=ids), theirs(ids, labels=ids)
    adapter_effect = max_difference(ours_out.logits, base_logits)
    assert adapter_effect > 1e-2  # the adapter does change the output
    assert max_difference(ours_out.logits, peft_out.logits) <= TOLERANCE

    ours_out.loss.backward()
    peft_out.loss.backward()
    for name, tensors in ours_params.items():
        for kind, param in tensors.items():
            assert param.grad.abs().max() > 0, f"{name}.{kind} got no gradient"
            assert max_difference(param.grad, peft_params[name][kind].grad) <= TOLERANCE, f"{name}.{kind}"

    originals = {name: base_weight(ours, name).detach().clone() for name in ours_params}
    merge_adapters(ours)
    theirs.merge_adapter()
    for name in ours_params:
        assert max_difference(base_weight(ours, name), originals[name]) > 0
        assert max_difference(base_weight(ours, name), base_weight(theirs, name)) <= TOLERANCE, name
    # Merged, the model computes the same function, up to fp32 round-off accumulated over the layers
    # (on SmolLM2 1e-4 to 1e-3 for ours and peft alike); a wrong merge would be off by the whole effect.
    with torch.no_grad():
        assert max_difference(ours(ids).logits, ours_out.logits) <= 1e-3 * adapter_effect
    unmerge_adapters(ours)
    for name in ours_params:
        assert max_difference(base_weight(ours, name), originals[name]) <= TOLERANCE, name


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("r", [1, 8, 64])
def test_matches_peft_on_tiny_llama(r, bias, variant):
    config = LoraConfig(r=r, alpha=16, target_modules="all-linear", **VARIANTS[variant])
    assert_matches_peft(tiny_llama(bias), config, input_ids(256))


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m-instruct", dtype=torch.float32).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_peft_on_smollm2(smollm2, variant):
    """The real model: 30 layers of 7 adapted linears each, where a small per-layer error would add up."""
    config = LoraConfig(r=8, alpha=24, target_modules="all-linear", **VARIANTS[variant])
    assert_matches_peft(smollm2, config, input_ids(smollm2.config.vocab_size, batch=1, length=16))


def test_explicit_target_list_matches_peft():
    assert_matches_peft(tiny_llama(bias=False), LoraConfig(r=4, alpha=16, target_modules=["q_proj", "v_proj"]),
                        input_ids(256))


def test_update_is_alpha_over_r_times_b_a_x():
    """The scale by hand, without peft: fails if alpha (or 1) is used instead of alpha / r."""
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = LoraLinear(base, r=4, alpha=12)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 16)
    expected = base(x) + 3.0 * (x @ layer.lora_A.T @ layer.lora_B.T)  # 12 / 4 = 3
    assert max_difference(layer(x), expected) <= TOLERANCE
    assert LoraLinear(nn.Linear(16, 8), r=4, alpha=12, use_rslora=True).scaling == 6.0  # 12 / sqrt(4)
    assert LoraConfig(r=4, alpha=12).scaling == 3.0
    assert LoraConfig(r=4, alpha=12, use_rslora=True).scaling == 6.0


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_initial_adapter_leaves_outputs_unchanged(variant):
    """B = 0 (and DoRA's magnitude = ||W||) make step 0 exactly the base model."""
    base = tiny_llama(bias=True)
    model = copy.deepcopy(base)
    inject_adapters(model, LoraConfig(r=8, alpha=16, **VARIANTS[variant]))
    ids = input_ids(256)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)
    for layer in lora_layers(model).values():
        bound = layer.base_layer.in_features ** -0.5  # kaiming_uniform_(a=sqrt(5)) draws from +-1/sqrt(fan_in)
        assert torch.count_nonzero(layer.lora_B) == 0
        assert bound / 2 < layer.lora_A.abs().max() <= bound


def test_inject_freezes_all_but_adapters_and_trainable_modules():
    model = tiny_llama(bias=False, task="seq-cls")
    names = inject_adapters(model, LoraConfig(r=4, alpha=8, use_dora=True, trainable_modules=("score",)))
    assert "score" not in names and len(names) == 2 * 7  # all-linear leaves the head to trainable_modules
    assert all(isinstance(layer, DoraLinear) for layer in lora_layers(model).values())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state_dict(model)) | {"score.weight"}
    assert all(name.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "magnitude") for name in trainable - {"score.weight"})


def test_unknown_module_names_are_clear_errors():
    model = tiny_llama(bias=False)
    with pytest.raises(ValueError, match="'q_prj' matches no linear layer.*Did you mean 'q_proj'"):
        inject_adapters(model, LoraConfig(target_modules=["q_prj"]))
    with pytest.raises(ValueError, match="trainable module 'head'"):
        inject_adapters(model, LoraConfig(trainable_modules=("head",)))
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())  # left untouched


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_saved_adapter_reloads_to_identical_outputs(tmp_path, variant):
    model = tiny_llama(bias=True, task="seq-cls")
    inject_adapters(model, LoraConfig(r=4, alpha=8, trainable_modules=("score",), **VARIANTS[variant]))
    perturb(model)
    with torch.no_grad():
        model.score.weight.normal_()
    save_adapter(model, tmp_path)
    fresh = tiny_llama(bias=True, task="seq-cls")
    load_adapter(fresh, tmp_path)
    ids = input_ids(256)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    assert not any("base_layer" in name for name in adapter_state_dict(fresh))  # the base is not saved


def test_loading_into_a_different_model_is_a_clear_error(tmp_path):
    model = tiny_llama(bias=False)
    inject_adapters(model, LoraConfig(r=4, alpha=8))
    save_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="does not fit this model.*Load it into that base model"):
        load_adapter(tiny_llama(bias=False, hidden=32), tmp_path)
    other = tiny_llama(bias=False)
    inject_adapters(other, LoraConfig(r=8, alpha=8))
    with pytest.raises(ValueError, match="injected with .*r=8.*the saved adapter with .*r=4"):
        load_adapter(other, tmp_path)
    with pytest.raises(FileNotFoundError, match="written by save_adapter"):
        load_adapter(other, tmp_path / "missing")


def test_copy_adapter_weights_from_peft_to_ours():
    base = tiny_llama(bias=False)
    config = LoraConfig(r=4, alpha=8, use_dora=True)
    theirs = get_peft_model(copy.deepcopy(base), peft_config(config))
    perturb(theirs)
    ours = copy.deepcopy(base)
    inject_adapters(ours, config)
    copy_adapter_weights(theirs, ours)
    peft_params = adapter_parameters(theirs)
    for name, tensors in adapter_parameters(ours).items():
        for kind, param in tensors.items():
            assert torch.equal(param, peft_params[name][kind])


@pytest.mark.parametrize("quantization, variant", [("nf4", "lora"), ("nf4", "dora"), ("int8", "lora")])
def test_matches_peft_on_quantized_base(quantization, variant):
    """On a bitsandbytes base both add the same fp32 adapter to the same quantized matmul; DoRA also
    de-quantizes W for its norm. Measured max |difference| of the logits (|logits| about 1.2):
    0, bitwise equal, in all three cases (bitsandbytes 0.50, CPU). We allow 1e-5, about 100 fp32
    steps at these logits, in case a kernel reorders its sums."""
    base, ours, theirs = (load_model("tiny-llama-test", quantization=quantization, dtype=torch.float32).eval()
                          for _ in range(3))  # fresh loads: bitsandbytes' 8-bit weights do not deep-copy
    config = LoraConfig(r=8, alpha=16, **VARIANTS[variant])
    inject_adapters(ours, config)
    theirs = get_peft_model(theirs, peft_config(config)).eval()
    perturb(ours)
    copy_adapter_weights(ours, theirs)
    ids = input_ids(base.config.vocab_size)
    with torch.no_grad():
        assert max_difference(ours(ids).logits, base(ids).logits) > 1e-2  # the adapter does change the output
        assert max_difference(ours(ids).logits, theirs(ids).logits) <= 1e-5


def test_merging_into_a_4bit_base_is_a_clear_error():
    model = load_model("tiny-llama-test", quantization="nf4", dtype=torch.float32).eval()
    inject_adapters(model, LoraConfig(r=4, alpha=8))
    perturb(model)
    ids = input_ids(model.config.vocab_size)
    with torch.no_grad():
        before = model(ids).logits
    with pytest.raises(ValueError, match="stored quantized.*erase most of the update.*quantization='none'"):
        merge_adapters(model)
    assert not any(layer.merged for layer in lora_layers(model).values())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
