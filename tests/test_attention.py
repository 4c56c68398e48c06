"""ftnb.attention: packed rows attended one example at a time, the same numbers as the block mask."""
import pytest
import torch

from ftnb import attention
from ftnb.models import load_model

LENGTHS = (5, 9, 3)  # three examples packed in one row


@pytest.fixture(scope="module")
def model(tiny_model_path):
    torch.manual_seed(0)
    return load_model(tiny_model_path)  # a random Llama with grouped keys (4 query heads, 2 key/value heads)


def _packed_row() -> dict:
    generator = torch.Generator().manual_seed(1)
    ids = [torch.randint(10, 1000, (n,), generator=generator) for n in LENGTHS]
    return {"input_ids": torch.cat(ids)[None], "position_ids": torch.cat([torch.arange(n) for n in LENGTHS])[None]}


def _logits_and_grads(model, implementation: str, batch: dict, dtype=torch.float32):
    model.set_attn_implementation(implementation)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        logits = model(**batch, use_cache=False).logits.float()  # as in training: with a cache, no block mask
    logits.square().mean().backward()
    grads = [p.grad.clone() for p in model.model.layers[0].self_attn.parameters()]
    model.set_attn_implementation("sdpa")
    return logits, grads


@pytest.mark.parametrize("kernel", attention.KERNELS)
def test_a_packed_row_gives_each_example_what_it_gives_alone(model, kernel):
    batch = _packed_row()
    packed, _ = _logits_and_grads(model, attention.by_sequence(kernel), batch)
    start = 0
    for n in LENGTHS:
        with torch.no_grad():
            alone = model(input_ids=batch["input_ids"][:, start:start + n]).logits
        torch.testing.assert_close(packed[:, start:start + n], alone, atol=1e-5, rtol=1e-4)
        start += n


@pytest.mark.parametrize("kernel", attention.KERNELS)
def test_outputs_and_gradients_equal_the_block_mask_path(model, kernel):
    batch = _packed_row()
    block_logits, block_grads = _logits_and_grads(model, kernel, batch)  # transformers' block-diagonal mask
    logits, grads = _logits_and_grads(model, attention.by_sequence(kernel), batch)
    torch.testing.assert_close(logits, block_logits, atol=1e-5, rtol=1e-4)
    for grad, block_grad in zip(grads, block_grads):
        torch.testing.assert_close(grad, block_grad, atol=1e-6, rtol=1e-4)


def test_in_bf16_eager_stays_within_bf16_rounding_of_the_block_mask(model):
    batch = _packed_row()
    block_logits, _ = _logits_and_grads(model, "eager", batch, torch.bfloat16)
    logits, _ = _logits_and_grads(model, attention.by_sequence("eager"), batch, torch.bfloat16)
    torch.testing.assert_close(logits, block_logits, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("kernel", attention.KERNELS)
def test_padded_batches_and_decoding_go_to_the_kernel_with_their_mask(model, kernel):
    ids = torch.tensor([[11, 12, 13, 14, 15, 16], [21, 22, 23, 24, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    with torch.no_grad():
        own = model(**batch).logits
        model.set_attn_implementation(attention.by_sequence(kernel))
        wrapped = model(**batch).logits
        generated = model.generate(ids[:1], max_new_tokens=4, do_sample=False)  # a cache: queries shorter than keys
        model.set_attn_implementation("sdpa")
        expected = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(wrapped[real], own[real], atol=1e-5, rtol=1e-4)
    assert generated.tolist() == expected.tolist()


def test_packed_sequences_reads_only_rows_that_restart():
    q = k = torch.zeros(1, 2, 5, 4)
    assert attention.packed_sequences(torch.tensor([[0, 1, 2, 0, 1]]), q, k) == [(0, 3), (3, 5)]
    assert attention.packed_sequences(torch.tensor([[0, 1, 2, 3, 4]]), q, k) is None  # one example
    assert attention.packed_sequences(None, q, k) is None
    assert attention.packed_sequences(torch.tensor([[0, 1, 0]]), q[:, :, :3], k) is None  # decoding: fewer queries
    two_rows = torch.zeros(2, 2, 5, 4)
    assert attention.packed_sequences(torch.tensor([[0, 1, 0, 1, 2]] * 2), two_rows, two_rows) is None


def test_an_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="flash_attention_2"):
        attention.by_sequence("flash_attention_2")
