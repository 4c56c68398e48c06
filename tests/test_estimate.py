"""ftnb.estimate: the arithmetic on hand-computed cases, and one comparison with a really loaded model."""
import pytest
import torch

from ftnb.estimate import (GIB, GPUS, MIB, ModelShape, estimate_inference_memory, estimate_training_memory,
                           fits, logits_bytes, lora_params, model_shape, nf4_bytes)

SMOLLM2 = dict(model_type="llama", vocab_size=49152, hidden_size=576, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, intermediate_size=1536,
               tie_word_embeddings=True, dtype="float32")


@pytest.fixture(scope="module")
def smollm2() -> ModelShape:
    return model_shape(SMOLLM2)


def test_nf4_bytes_of_an_mlp_projection():
    # 576 x 1536 = 884,736 weights -> 442,368 packed bytes; 13,824 blocks of 64
    packed, constants = nf4_bytes(576 * 1536, double_quant=False)
    assert packed == 442_368
    assert constants == 13_824 * 4 + 16 * 4  # fp32 absmax per block + the 16-entry code
    _, nested = nf4_bytes(576 * 1536, double_quant=True)
    # uint8 absmax per block, fp32 scale per 256 blocks (54), offset, 256-entry 2nd-level code
    assert nested == 13_824 + 54 * 4 + 4 + 256 * 4 + 16 * 4
    assert (packed + nested) / (576 * 1536) == pytest.approx(0.517, abs=0.001)  # ~0.52 byte per weight


def test_shape_and_parameter_counts(smollm2):
    per_layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536
    assert smollm2.linear_params == 30 * per_layer
    assert smollm2.total_params() == 134_515_008  # SmolLM2-135M's published count
    # r x (in + out) over q, k, v, o, gate, up, down
    assert lora_params(smollm2, 8) == 30 * 8 * (1152 + 768 + 768 + 1152 + 3 * 2112) == 2_442_240
    assert lora_params(smollm2, 16, ["q_proj", "value"]) == 30 * 16 * (1152 + 768)


def test_logits_bytes_are_twelve_bytes_per_entry():
    assert logits_bytes(4, 128, 49152) == 4 * 128 * 49152 * 12  # log-softmax + 2 gradients, fp32


def test_registry_config_matches_hand_written_one(smollm2):
    assert model_shape("smollm2-135m-instruct") == ModelShape.from_config(SMOLLM2, "smollm2-135m-instruct")


def test_weights_match_a_really_loaded_nf4_model(tiny_model_path):
    from ftnb.memory import footprint
    from ftnb.models import load_model

    for double_quant in (True, False):
        model = load_model("tiny-llama-test", quantization="nf4", double_quant=double_quant, dtype=torch.float32)
        measured = footprint(model).bytes_by_role()
        est = estimate_inference_memory(tiny_model_path, "nf4", double_quant, device="cpu")
        weights = {r["component"].split(" (")[0]: r["bytes"] for r in est.rows if r["group"] == "weights"}
        assert weights["nf4 linear weights"] == measured["4-bit weights (packed)"]
        assert weights["4-bit quantization constants"] == measured["4-bit quantization constants"]
        assert weights["embeddings, norms, head"] == measured["trainable"]  # nothing frozen yet


def test_kbit_preparation_upcasts_float_weights_on_gpu(smollm2):
    rows = lambda q: {r["component"]: r["bytes"] for r in estimate_training_memory(smollm2, q, device="cuda").rows}
    n_float = 49152 * 576 + 61 * 576
    assert rows("nf4")["embeddings, norms, head (fp32)"] == n_float * 4
    assert rows("none")["embeddings, norms, head (bfloat16)"] == n_float * 2


def test_checkpointing_and_optimizer_change_what_they_should(smollm2):
    kw = dict(device="cuda", batch_size=8, seq_len=512)
    full = estimate_training_memory(smollm2, gradient_checkpointing=False, **kw)
    ckpt = estimate_training_memory(smollm2, gradient_checkpointing=True, **kw)
    assert ckpt.bytes_by_group()["activations"] < full.bytes_by_group()["activations"] / 5
    assert ckpt.bytes_by_group()["loss"] == full.bytes_by_group()["loss"] == logits_bytes(8, 512, 49152)
    sgd = estimate_training_memory(smollm2, optimizer="sgd", **kw)
    n = lora_params(smollm2, 8)
    assert ckpt.total_bytes - sgd.total_bytes == pytest.approx(8 * n * 1.05, rel=0.01)  # 2 fp32 moments
    accumulating = estimate_training_memory(smollm2, gradient_checkpointing=True, grad_accumulation=4, **kw)
    assert accumulating.total_bytes - ckpt.total_bytes == pytest.approx(4 * n * 1.05, rel=0.01)  # fp32 grads kept
    eager = estimate_training_memory(smollm2, attn_implementation="eager", gradient_checkpointing=False, **kw)
    scores = 30 * 8 * 9 * 512 * 512 * (4 + 2)  # fp32 probabilities + bf16 copy, per layer
    assert eager.bytes_by_group()["activations"] - full.bytes_by_group()["activations"] >= scores


def test_fits_and_suggestions(smollm2):
    small = estimate_training_memory(smollm2, batch_size=4, seq_len=256, device="cuda")
    assert small.fits("T4 16 GB").fits and fits(small, "H200 141 GB").fits
    big = estimate_training_memory(smollm2, batch_size=32, seq_len=2048, gradient_checkpointing=False, device="cuda")
    verdict = big.fits("T4 16 GB")
    assert not verdict.fits and verdict.available_bytes == GPUS["T4 16 GB"]
    assert verdict.suggestions[0].startswith("turn on gradient checkpointing")
    assert any("accumulation" in s for s in verdict.suggestions)
    assert "does NOT fit" in str(verdict)
    assert fits(big, 200 * GIB).fits
    assert estimate_inference_memory(smollm2, "nf4", device="cpu").fits("current").needed_bytes > 0


def test_inference_kv_cache(smollm2):
    est = estimate_inference_memory(smollm2, "none", batch_size=2, seq_len=1000, device="cuda")
    kv = {r["component"]: r["bytes"] for r in est.rows}["KV cache"]
    assert kv == 2 * 30 * 3 * 64 * 2 * 2000  # k and v, layers, kv heads, head dim, bf16, tokens
    assert est.total_bytes > 135e6 * 2  # at least the bf16 weights


def test_bad_input_is_explained(smollm2):
    with pytest.raises(ValueError, match="optimizer must be one of"):
        estimate_training_memory(smollm2, optimizer="adam")
    with pytest.raises(ValueError, match="quantization must be one of"):
        estimate_training_memory(smollm2, quantization="nf3")
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        estimate_training_memory(smollm2, lora_targets=["qkv"])
    with pytest.raises(ValueError, match="unknown device"):
        estimate_training_memory(smollm2).fits("RTX 9090")


def test_the_breakdown_prints(smollm2):
    est = estimate_training_memory(smollm2, device="cpu")
    text = str(est)
    assert "logits" in text and "peak" in text
    assert est.total_bytes == sum(r["bytes"] for r in est.rows) and est.total_bytes > 500 * MIB


def test_cpu_optimizer_state_reuses_the_kept_heap(smollm2):
    """On CPU, state born after the first backward fills the heap glibc kept; on CUDA it adds."""
    kw = dict(batch_size=4, seq_len=128, lora_r=64)
    cpu = {o: estimate_training_memory(smollm2, optimizer=o, device="cpu", **kw) for o in ("adamw", "sgd")}
    cuda = {o: estimate_training_memory(smollm2, optimizer=o, device="cuda", **kw) for o in ("adamw", "sgd")}
    assert cpu["adamw"].total_bytes == cpu["sgd"].total_bytes  # 8 B x 19.5 M of state fits in the kept heap
    assert cuda["adamw"].total_bytes > cuda["sgd"].total_bytes + 8 * lora_params(smollm2, 64)
    tiny_heap = {o: estimate_training_memory(smollm2, optimizer=o, device="cpu", batch_size=1, seq_len=8, lora_r=256)
                 for o in ("adamw", "sgd")}
    assert tiny_heap["adamw"].total_bytes > tiny_heap["sgd"].total_bytes  # what exceeds the kept heap still counts
