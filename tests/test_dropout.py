"""ftnb.dropout: FastDropout drops with torch's distribution, reproduces under a seed, back-propagates
through the same mask kept as booleans, computes what a mask in the input's dtype computes, and
use_fast_dropout swaps it into a peft model without changing what is saved."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from torch import nn

from ftnb.dropout import FastDropout, dropout_keep, use_fast_dropout
from ftnb.models import load_model

ELEMENTS = 2_000_000


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_the_drop_rate_is_p_and_kept_elements_are_scaled(p):
    torch.manual_seed(0)
    x = torch.ones(ELEMENTS // 1000, 1000)
    y = FastDropout(p).train()(x)
    dropped = (y == 0).double().mean().item()
    sigma = (p * (1 - p) / ELEMENTS) ** 0.5
    assert abs(dropped - p) < 5 * sigma  # 5 standard errors: fails for a wrong threshold, not by chance
    assert torch.allclose(y[y != 0], torch.tensor(1 / (1 - p)))
    assert abs(y.mean().item() - 1.0) < 5 * sigma / (1 - p)  # the expectation is kept


def test_masks_are_independent_across_elements_and_calls():
    torch.manual_seed(0)
    a, b = (dropout_keep((1000, 1000), 0.5) for _ in range(2))
    assert not torch.equal(a, b)
    both = (a & b).double().mean().item()
    assert abs(both - 0.25) < 0.005  # independent calls: P(kept twice) = 0.5 * 0.5
    neighbours = (a[:, :-1] & a[:, 1:]).double().mean().item()  # the two halves of each 64-bit word
    assert abs(neighbours - 0.25) < 0.005


def test_a_seed_reproduces_the_masks():
    x = torch.randn(64, 576)
    layer = FastDropout(0.1).train()
    torch.manual_seed(7)
    first = layer(x)
    torch.manual_seed(7)
    assert torch.equal(layer(x), first)
    torch.manual_seed(8)
    assert not torch.equal(layer(x), first)


def test_the_gradient_flows_through_the_same_mask():
    torch.manual_seed(0)
    x = torch.randn(32, 128, requires_grad=True)
    y = FastDropout(0.2).train()(x)
    y.sum().backward()
    kept = y != 0
    assert torch.allclose(x.grad, kept.float() / 0.8)
    assert torch.allclose(y[kept], x[kept] / 0.8)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_evaluation_and_p_zero_leave_the_input_alone(p):
    x = torch.randn(8, 16)
    assert torch.equal(FastDropout(p).eval()(x), x)
    assert torch.equal(FastDropout(0.0).train()(x), x)
    assert torch.equal(FastDropout(1.0).train()(x), torch.zeros_like(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.05, 0.1, 0.3])
def test_output_and_gradient_are_those_of_a_mask_in_the_inputs_dtype(dtype, p):
    x = torch.randn(64, 576, dtype=dtype, requires_grad=True)
    torch.manual_seed(3)
    y = FastDropout(p).train()(x)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    torch.manual_seed(3)  # the same draw
    mask = (dropout_keep(x.shape, p).float() / (1 - p)).to(dtype)
    assert torch.equal(y, x.detach() * mask)  # bit for bit
    assert torch.equal(x.grad, upstream * mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_backward_pass_keeps_one_byte_per_element(dtype):
    x = torch.randn(32, 1536, dtype=dtype, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        FastDropout(0.05).train()(x)
    assert [(t.dtype, t.numel()) for t in saved] == [(torch.bool, x.numel())]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_bool_tensor_is_converted_to_a_float_type(dtype):
    """torch converts a CPU bool tensor to a float type one element at a time (13% of the CPU time of a profiled
    bf16 step of recipe 01 when the mask was multiplied in directly); the mask goes through uint8, converted with
    vector instructions."""
    from torch.utils._python_dispatch import TorchDispatchMode

    conversions = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            inputs = [a for a in args if isinstance(a, torch.Tensor)]
            out = func(*args, **(kwargs or {}))
            if any(t.dtype == torch.bool for t in inputs) and isinstance(out, torch.Tensor) and out.is_floating_point():
                conversions.append(func.__name__)
            return out

    x = torch.randn(16, 576, dtype=dtype, requires_grad=True)
    with Record():
        FastDropout(0.1).train()(x).sum().backward()
    assert x.grad is not None and conversions == []


def test_bf16_inputs_stay_bf16():
    torch.manual_seed(0)
    y = FastDropout(0.5).train()(torch.ones(100, 100, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and set(y.unique().tolist()) == {0.0, 2.0}


def test_use_fast_dropout_replaces_every_dropout_of_a_peft_model_and_saves_the_same(tiny_model_path):
    model = load_model(tiny_model_path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    adapted = [m for m in model.modules() if hasattr(m, "lora_dropout")]
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    model.eval()
    before, saved_before = model(input_ids=ids).logits, get_peft_model_state_dict(model)
    assert use_fast_dropout(model) == len(adapted) > 0
    assert all(type(m.lora_dropout["default"]) is FastDropout and m.lora_dropout["default"].p == 0.05
               for m in adapted)
    assert not any(type(m) is nn.Dropout for m in model.modules())
    assert torch.equal(model(input_ids=ids).logits, before)  # evaluation: no dropout either way
    assert get_peft_model_state_dict(model).keys() == saved_before.keys()
    model.train()
    torch.manual_seed(0)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()  # trains through the swapped modules
    assert all(m.lora_B["default"].weight.grad is not None for m in adapted)
    assert use_fast_dropout(model) == 0  # a second call finds nothing left to replace
