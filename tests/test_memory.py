import json
import mmap
import time
from contextlib import ExitStack, contextmanager

import pytest
import torch

from ftnb.memory import MIB, HeapTrimCallback, ProbeTable, _rss, footprint, probe, process_peak_rss_mib, release_memory
from ftnb.models import load_model
from ftnb.results import save_metrics

SIZE_MIB = 256


@contextmanager
def _resident(mib: int):
    """`mib` MiB made resident in a fresh anonymous mapping, unmapped on exit. Not a tensor: after
    earlier tests in the same process, malloc may serve a large tensor from freed heap pages that are
    still resident, and the process's RSS would not move at all."""
    buffer = mmap.mmap(-1, mib * MIB)
    torch.frombuffer(buffer, dtype=torch.uint8).fill_(1)  # writes every page; the view dies here
    try:
        yield
    finally:
        buffer.close()


def test_probe_measures_a_known_allocation_within_10_percent():
    table = ProbeTable()
    with probe("alloc", table):
        with _resident(SIZE_MIB):
            pass
        time.sleep(0.05)  # sleep() waits at least this long: a lower bound the probe's clock must see
    rec = table[0]
    assert rec.rss_peak_delta_mib == pytest.approx(SIZE_MIB, rel=0.10)
    assert abs(rec.rss_end_delta_mib) < 0.10 * SIZE_MIB  # freed again
    assert rec.seconds >= 0.05


@pytest.mark.parametrize("hand_back", [release_memory, lambda: HeapTrimCallback().on_step_end(None, None, None)],
                         ids=["release_memory", "HeapTrimCallback"])
def test_freed_heap_pages_are_handed_back(hand_back):
    # many 16 KiB tensors come from the C heap, not from mappings of their own; one allocated after them keeps
    # the top of the heap in use, so glibc cannot shrink the heap by itself and the freed pages stay resident
    blocks = [torch.ones(4096) for _ in range(16_000)]  # 250 MiB, every page written
    top = torch.ones(4096)
    del blocks
    freed = _rss()
    hand_back()
    assert (freed - _rss()) / MIB > 0.5 * 250, "the freed tensors' pages are still resident"
    assert top.sum() == 4096  # still alive, and still valid


def test_the_process_peak_outlives_later_peak_windows(tmp_path):
    start = _rss() / MIB
    with probe("large", ProbeTable()), _resident(SIZE_MIB):  # a probe starts a new peak window
        pass
    with probe("after", ProbeTable()):  # so does this one: the large block is no longer in its window
        pass
    assert process_peak_rss_mib() >= start + 0.9 * SIZE_MIB
    recorded = json.loads(save_metrics(tmp_path, {"x": 1}).read_text())
    assert recorded["process_peak_rss_mib"] >= start + 0.9 * SIZE_MIB and recorded["x"] == 1


def test_highest_is_the_probe_with_the_highest_peak():
    table = ProbeTable()
    with probe("small", table):
        pass
    with probe("large", table):
        with _resident(SIZE_MIB):
            pass
    with probe("after", table):
        pass
    assert table.highest().label == "large" and ProbeTable().highest() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_probe_measures_cuda_allocation():
    table = ProbeTable()
    with probe("cuda", table):
        x = torch.ones(SIZE_MIB * MIB // 4, device="cuda")
        del x
    assert table[0].accel_peak_delta_mib == pytest.approx(SIZE_MIB, rel=0.10)


def test_nested_probes_keep_the_outer_peak(tmp_path):
    table = ProbeTable()
    with ExitStack() as kept_after_outer:
        with probe("outer", table):
            with probe("inner", table), _resident(SIZE_MIB):
                pass
            kept_after_outer.enter_context(_resident(64))  # still resident when "outer" ends
    inner, outer = table
    assert (inner.depth, outer.depth) == (1, 0)
    # the inner probe reset the peak, yet the outer one still saw it
    assert outer.rss_peak_delta_mib == pytest.approx(SIZE_MIB, rel=0.10)
    assert outer.rss_end_delta_mib == pytest.approx(64, rel=0.25)
    table.save(tmp_path / "p.json")
    assert [r["label"] for r in json.loads((tmp_path / "p.json").read_text())] == ["inner", "outer"]
    assert "outer" in str(table)


def test_footprint_of_nf4_model_matches_hand_arithmetic(tiny_model_path):
    model = load_model(tiny_model_path, quantization="nf4", double_quant=False)
    fp = footprint(model)
    roles = fp.bytes_by_role()
    # 2 layers x (q 64x64, k 32x64, v 32x64, o 64x64, gate/up 128x64, down 64x128) are quantised
    per_layer = 64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 3
    logical = 2 * per_layer
    assert roles["4-bit weights (packed)"] == logical // 2  # two weights per byte
    # one fp32 absmax per block of 64 weights, plus the 16-entry code table per layer
    assert roles["4-bit quantization constants"] == logical // 64 * 4 + 14 * 16 * 4
    assert fp.total_params == sum(p.numel() for p in load_model(tiny_model_path).parameters())


def test_footprint_counts_trainable_adapters(tiny_model_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model(tiny_model_path), LoraConfig(r=4, target_modules=["q_proj"]))
    fp = footprint(model)
    assert fp.trainable_params == 2 * (4 * 64 + 64 * 4)  # A and B for q_proj in 2 layers
    assert fp.bytes_by_role()["trainable"] == fp.trainable_params * 4


def _largest_saved_tensor(loss_fn) -> int:
    """Elements of the largest tensor autograd keeps for backward while `loss_fn()` runs."""
    sizes = []

    def keep(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss_fn()
    return max(sizes)


def test_chunked_loss_equals_the_model_loss_without_keeping_the_logits(tiny_model_path):
    """Same loss and same LoRA gradients as model(labels=...), ignored labels included; and no
    tensor of batch x sequence x vocabulary is kept for backward, where the plain loss keeps one."""
    from peft import LoraConfig, get_peft_model

    from ftnb.memory import chunked_causal_lm_loss

    torch.manual_seed(0)
    model = get_peft_model(load_model(tiny_model_path, dtype=torch.float32),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    labels = ids.clone()
    labels[0, :5] = -100  # a masked prompt

    def gradients(loss_fn):
        model.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    plain = lambda: model(input_ids=ids, labels=labels).loss
    chunked = lambda: chunked_causal_lm_loss(model, ids, labels, chunk_tokens=7)  # 46 positions: 7 chunks, one short
    (loss_a, grads_a), (loss_b, grads_b) = gradients(plain), gradients(chunked)
    assert loss_b == pytest.approx(float(loss_a), rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_a, grads_b))
    logits_elements = 2 * 24 * model.config.vocab_size
    assert _largest_saved_tensor(plain) >= logits_elements > 4 * _largest_saved_tensor(chunked)
