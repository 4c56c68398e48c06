"""ftnb.combine: peft's `cat` is the weighted sum of the updates, `linear` adds cross terms that equal
the expression worked out by hand, a weight of 0 removes an adapter under `cat`, and misuse is a clear
error (tiny-llama-test, two random adapters of different ranks; about a second).

Worth its time: the whole point of section 4 of recipe 06 rests on these identities; if a peft
upgrade changes how a combination is built, these tests say which one."""
import pytest
import torch
from peft import LoraConfig, get_peft_model

from ftnb import combine
from ftnb.models import load_model, load_tokenizer

WEIGHTS = [0.7, 0.5]


@pytest.fixture()
def two_adapters():
    """A tiny Llama with adapters "first" (r=4, alpha=8) and "second" (r=4, alpha=4): A and B both random (a
    trained adapter's B is not zero either), so every update and every cross term is non-zero."""
    torch.manual_seed(0)
    model = load_model("tiny-llama-test", dtype=torch.float32)
    targets = ["q_proj", "v_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False),
                           adapter_name="first")
    model.add_adapter("second", LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    return model


def test_cat_is_exactly_the_weighted_sum_of_updates(two_adapters):
    combine.combine(two_adapters, ["first", "second"], WEIGHTS, "cat", name="ab_cat")
    error = combine.sum_error(two_adapters, "ab_cat", ["first", "second"], WEIGHTS)
    assert error.max_abs < 1e-5 and error.relative < 1e-5
    scale = max(combine.update(two_adapters, "first", m).abs().max().item()
                for m in combine.lora_modules(two_adapters).values())
    assert scale > 1e-2, "the updates should be large enough for a wrong combination to show"


def test_linear_adds_the_cross_terms_worked_out_by_hand(two_adapters):
    """linear builds A = Σ √(w_i s_i) A_i and B = Σ √(w_i s_i) B_i (positive weights), so
    B A - Σ w_i s_i B_i A_i = √(w_1 s_1 w_2 s_2) (B_1 A_2 + B_2 A_1)."""
    combine.combine(two_adapters, ["first", "second"], WEIGHTS, "linear", name="ab_linear")
    error = combine.sum_error(two_adapters, "ab_linear", ["first", "second"], WEIGHTS)
    assert error.max_abs > 1e-2 and error.relative > 0.1, error
    largest = 0.0
    for layer in combine.lora_modules(two_adapters).values():
        (wa, wb), (sa, sb) = WEIGHTS, (layer.scaling["first"], layer.scaling["second"])
        (Aa, Ab), (Ba, Bb) = ([getattr(layer, f)[k].weight for k in ("first", "second")] for f in ("lora_A", "lora_B"))
        cross = (wa * sa * wb * sb) ** 0.5 * (Ba @ Ab + Bb @ Aa)
        target = wa * combine.update(two_adapters, "first", layer) + wb * combine.update(two_adapters, "second", layer)
        difference = combine.update(two_adapters, "ab_linear", layer) - target
        torch.testing.assert_close(difference, cross.detach(), atol=1e-6, rtol=1e-5)
        largest = max(largest, difference.abs().max().item())
    assert largest == pytest.approx(error.max_abs)


def test_svd_at_full_rank_is_the_weighted_sum_and_truncated_is_not(two_adapters):
    combine.combine(two_adapters, ["first", "second"], WEIGHTS, "svd", name="ab_svd8", svd_rank=8)
    combine.combine(two_adapters, ["first", "second"], WEIGHTS, "svd", name="ab_svd4")  # default rank: max r = 4
    assert combine.sum_error(two_adapters, "ab_svd8", ["first", "second"], WEIGHTS).relative < 1e-4
    assert combine.sum_error(two_adapters, "ab_svd4", ["first", "second"], WEIGHTS).relative > 0.05


def test_a_weight_of_zero_removes_the_adapter_under_cat(two_adapters):
    combine.combine(two_adapters, ["first", "second"], [1.0, 0.0], "cat", name="only_a")
    for layer in combine.lora_modules(two_adapters).values():
        torch.testing.assert_close(combine.update(two_adapters, "only_a", layer),
                                   combine.update(two_adapters, "first", layer), atol=1e-7, rtol=0)
    ids = load_tokenizer("tiny-llama-test")("a contract clause", return_tensors="pt")
    with torch.no_grad():
        two_adapters.set_adapter("first")
        alone = two_adapters(**ids).logits
        two_adapters.set_adapter("only_a")
        combined = two_adapters(**ids).logits
    torch.testing.assert_close(combined, alone, atol=1e-5, rtol=0)


def test_misuse_is_a_clear_error(two_adapters):
    with pytest.raises(ValueError, match="no adapter 'third' is loaded; loaded: first, second"):
        combine.combine(two_adapters, ["first", "third"], WEIGHTS, "cat", name="x")
    with pytest.raises(ValueError, match="2 adapters but 1 weights"):
        combine.combine(two_adapters, ["first", "second"], [1.0], "cat", name="x")
    with pytest.raises(ValueError, match="unknown combination_type 'sum'"):
        combine.combine(two_adapters, ["first", "second"], WEIGHTS, "sum", name="x")
    with pytest.raises(ValueError, match="pass density"):
        combine.combine(two_adapters, ["first", "second"], WEIGHTS, "ties", name="x")
    combine.combine(two_adapters, ["first", "second"], WEIGHTS, "cat", name="ab")
    with pytest.raises(ValueError, match="'ab' is already loaded"):
        combine.combine(two_adapters, ["first", "second"], [1.0, 1.0], "cat", name="ab")


def test_dare_is_repeatable_with_a_seed(two_adapters):
    for name in ("d1", "d2"):
        combine.combine(two_adapters, ["first", "second"], WEIGHTS, "dare_linear", name=name, density=0.5, seed=3)
    combine.combine(two_adapters, ["first", "second"], WEIGHTS, "dare_linear", name="d3", density=0.5, seed=4)
    layer = next(iter(combine.lora_modules(two_adapters).values()))
    d1, d2, d3 = (combine.update(two_adapters, n, layer) for n in ("d1", "d2", "d3"))
    assert torch.equal(d1, d2) and not torch.equal(d1, d3)
