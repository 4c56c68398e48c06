"""ftnb.estimate: the arithmetic on hand-computed cases, one comparison with a really loaded model,
the fits-my-GPU suggestions, and the benchmark script's bookkeeping (with a fake measurement)."""
import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

import ftnb.estimate
from ftnb.estimate import (CALIBRATION, GIB, GPUS, MIB, ModelShape, estimate_inference_memory,
                           estimate_training_memory, fits, logits_bytes, lora_params, measure_training_peak, model_shape,
                           nf4_bytes)

BENCHMARK = Path(__file__).parents[1] / "benchmarks" / "memory_estimates.py"

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
    allocator = 1 + CALIBRATION.cuda_fragmentation
    assert ckpt.total_bytes - sgd.total_bytes == pytest.approx(8 * n * allocator, rel=0.01)  # 2 fp32 moments
    accumulating = estimate_training_memory(smollm2, gradient_checkpointing=True, grad_accumulation=4, **kw)
    assert accumulating.total_bytes - ckpt.total_bytes == pytest.approx(4 * n * allocator, rel=0.01)  # grads kept
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
    long = estimate_training_memory(smollm2, batch_size=1, seq_len=32768, device="cuda").fits("T4 16 GB")
    assert long.suggestions[0].startswith("compute the loss in chunks of 256 tokens")  # the logits: the largest term
    assert "does NOT fit" in str(verdict)
    assert fits(big, 200 * GIB).fits
    assert estimate_inference_memory(smollm2, "nf4", device="cpu").fits("current").needed_bytes > 0


def test_inference_kv_cache(smollm2):
    est = estimate_inference_memory(smollm2, "none", batch_size=2, seq_len=1000, device="cuda")
    kv = {r["component"]: r["bytes"] for r in est.rows}["KV cache"]
    assert kv == 2 * 30 * 3 * 64 * 2 * 2000  # k and v, layers, kv heads, head dim, bf16, tokens
    assert est.total_bytes > 135e6 * 2  # at least the bf16 weights


def test_inference_scored_positions(smollm2):
    """Perplexity keeps every position's logits: in the compute dtype, then as the loss's fp32 copy and
    fp32 log-probabilities; generation keeps the last position's alone."""
    def logits_bytes(**kwargs) -> int:
        est = estimate_inference_memory(smollm2, "nf4", batch_size=16, seq_len=384, device="cuda", **kwargs)
        return sum(r["bytes"] for r in est.rows if r["group"] == "loss")

    assert logits_bytes(compute_dtype="float16") == 16 * 49152 * 4
    assert logits_bytes(compute_dtype="float16", scored_positions=384) == 16 * 384 * 49152 * (2 + 4 + 4)
    assert logits_bytes(compute_dtype="float32", scored_positions=384) == 16 * 384 * 49152 * (4 + 4)
    for wrong in (0, 385):
        with pytest.raises(ValueError, match=f"scored_positions={wrong}: .* from 1 .* to seq_len=384"):
            estimate_inference_memory(smollm2, "nf4", batch_size=1, seq_len=384, scored_positions=wrong)


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


def _change_of(suggestion: str) -> dict:
    """The change of arguments a suggestion's text describes."""
    if suggestion.startswith("turn on gradient checkpointing"):
        return {"gradient_checkpointing": True}
    if m := re.search(r"micro-batch to (\d+) and raise gradient accumulation to (\d+)", suggestion):
        return {"batch_size": int(m[1]), "grad_accumulation": int(m[2])}
    if m := re.search(r"8-bit optimizer \((\w+)\)", suggestion):
        return {"optimizer": m[1]}
    if m := re.search(r"loss in chunks of (\d+) tokens", suggestion):
        return {"loss_chunk_tokens": int(m[1])}
    if m := re.search(r"sequence length to (\d+)", suggestion):
        return {"seq_len": int(m[1])}
    if suggestion.startswith("load the base model in 4-bit NF4"):
        return {"quantization": "nf4"}
    raise AssertionError(f"unexpected suggestion {suggestion!r}")


@pytest.mark.parametrize("arguments", [
    dict(config_or_name="llama-3.1-8b", quantization="none", batch_size=4, seq_len=1024,
         gradient_checkpointing=False, device="cuda"),
    dict(config_or_name="llama-3.1-8b", quantization="int8", batch_size=2, seq_len=2048, device="cuda"),
    dict(config_or_name=SMOLLM2, quantization="none", batch_size=32, seq_len=2048, gradient_checkpointing=False,
         device="cuda"),
], ids=["8b-bf16", "8b-int8", "smollm2-bf16"])
def test_each_suggestion_is_the_direct_estimate_of_that_change(arguments):
    """A suggestion quotes what estimate_training_memory says for the user's own arguments with that
    change; the NF4 one in particular re-derives the kbit preparation NF4 implies (fp32 norms and
    embeddings), instead of reusing the bf16 run's choice."""
    verdict = estimate_training_memory(**arguments).fits("T4 16 GB")
    assert not verdict.fits and len(verdict.suggestions) >= 2
    combined = {}
    for text in verdict.suggestions:
        if text.startswith("still too large"):
            continue
        change = combined if text.startswith("all of the above together") else _change_of(text)
        combined = {**combined, **change}
        direct = estimate_training_memory(**{**arguments, **change}).total_bytes
        assert f"-> {direct / GIB:.2f} GiB" in text
        assert ("(fits)" in text) == (direct <= GPUS["T4 16 GB"])
    if arguments["config_or_name"] == "llama-3.1-8b" and arguments["quantization"] == "none":  # the NF4 move is tried
        assert any(t.startswith("load the base model in 4-bit NF4") for t in verdict.suggestions)


def test_suggestions_stop_at_the_first_move_that_fits(smollm2):
    est = estimate_training_memory(smollm2, "none", batch_size=8, seq_len=2048, gradient_checkpointing=False,
                                   device="cuda")
    budget = estimate_training_memory(smollm2, "none", batch_size=8, seq_len=2048, gradient_checkpointing=True,
                                      device="cuda").total_bytes
    verdict = est.fits(budget + 1)
    assert not verdict.fits and len(verdict.suggestions) == 1
    assert verdict.suggestions[0].startswith("turn on gradient checkpointing") and "(fits)" in verdict.suggestions[0]


def test_fitted_constants_are_read_from_the_calibration(smollm2, monkeypatch):
    """The estimate takes its fitted numbers from CALIBRATION and nowhere else."""
    before = {d: estimate_training_memory(smollm2, device=d) for d in ("cpu", "cuda")}
    doubled = {f.name: getattr(CALIBRATION, f.name) * 2 for f in dataclasses.fields(CALIBRATION)}
    monkeypatch.setattr(ftnb.estimate, "CALIBRATION", dataclasses.replace(CALIBRATION, **doubled))
    after = {d: estimate_training_memory(smollm2, device=d) for d in ("cpu", "cuda")}
    for device in ("cpu", "cuda"):
        old, new = ({r["component"].split(" (")[0]: r["bytes"] for r in e.rows}
                    for e in (before[device], after[device]))
        assert new["backward gradient buffers"] > old["backward gradient buffers"]
    fixed = lambda e: {r["component"]: r["bytes"] for r in e.rows if r["group"] == "fixed"}
    assert fixed(after["cpu"])["Python process with torch/transformers imported (RSS)"] == 1000 * MIB
    assert fixed(after["cuda"])["CUDA context and kernels (outside torch's allocator)"] == 900 * MIB
    heap = lambda e: next(r["bytes"] for r in e.rows if r["component"].startswith("glibc heap kept"))
    assert heap(after["cpu"]) == pytest.approx(2 * heap(before["cpu"]), rel=1e-6)
    allocator = lambda e: next(r["bytes"] for r in e.rows if r["component"].startswith("caching allocator"))
    assert allocator(after["cuda"]) > 1.9 * allocator(before["cuda"])


# ---------------------------------------------------------------- benchmarks/memory_estimates.py
@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("memory_estimates", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_measurement(peak_mib: float):
    """Stands in for a real measurement: returns what measure_training_peak returns, instantly."""
    def measure(model, **settings):
        return {"measured_peak_mib": peak_mib, "step_seconds": [0.1], "device": "cpu"}
    return measure


def test_benchmark_only_merges_and_repredict_keeps_the_metadata(benchmark, tmp_path):
    path = tmp_path / "estimates.json"
    quiet = lambda line: None
    benchmark.update(path, ["nf4 ckpt", "fp32 ckpt", "minilm seq-cls fp32 ckpt b32 s256"],
                     measure_fn=_fake_measurement(2000.0), echo=quiet)
    first = json.loads(path.read_text())
    assert [r["name"] for r in first["fitted"]["rows"]] == ["fp32 ckpt", "nf4 ckpt"]  # in the order of CONFIGS
    assert [r["name"] for r in first["held_out"]["rows"]] == ["minilm seq-cls fp32 ckpt b32 s256"]

    benchmark.update(path, ["nf4 ckpt"], measure_fn=_fake_measurement(3000.0), echo=quiet)  # --only "nf4 ckpt"
    merged = json.loads(path.read_text())
    rows = {r["name"]: r for s in ("fitted", "held_out") for r in merged[s]["rows"]}
    assert rows["nf4 ckpt"]["measured_peak_mib"] == 3000.0
    old = {r["name"]: r for s in ("fitted", "held_out") for r in first[s]["rows"]}
    for kept in ("fp32 ckpt", "minilm seq-cls fp32 ckpt b32 s256"):
        assert rows[kept] == old[kept]  # measurement, date and machine untouched
    assert merged["fitted"]["summary"]["configurations"] == 2

    measured_fields = ("config", "measured_peak_mib", "step_seconds", "steps", "measured_at", "machine")
    for row in merged["fitted"]["rows"]:  # an edited prediction, then --repredict
        row["predicted_peak_mib"], row["relative_error"] = 1.0, -0.99
    path.write_text(json.dumps(merged))
    benchmark.update(path, [], echo=quiet)
    repredicted = json.loads(path.read_text())
    assert repredicted["command"] == merged["command"]
    for before, after in zip(merged["fitted"]["rows"] + merged["held_out"]["rows"],
                             repredicted["fitted"]["rows"] + repredicted["held_out"]["rows"]):
        assert {k: after[k] for k in measured_fields} == {k: before[k] for k in measured_fields}
        assert after["predicted_peak_mib"] == pytest.approx(benchmark.predict(after)["predicted_peak_mib"])
        assert after["predicted_peak_mib"] > 500
    assert repredicted["fitted"]["summary"]["max_abs_error"] < 0.9


def test_stored_estimates_are_current_and_the_sets_are_disjoint(benchmark):
    """The committed JSON's predictions are what today's estimator says (rerun --repredict after
    editing ftnb/estimate.py), and no held-out configuration repeats a fitted one."""
    stored = json.loads((BENCHMARK.parent / "memory_estimates.json").read_text())
    assert len(stored["fitted"]["rows"]) == 15 and len(stored["held_out"]["rows"]) >= 10
    for row in stored["fitted"]["rows"] + stored["held_out"]["rows"]:
        fresh = benchmark.predict(row)["predicted_peak_mib"]
        assert row["predicted_peak_mib"] == pytest.approx(fresh, abs=0.5), row["name"]
    fitted = [r["config"] for r in stored["fitted"]["rows"]]
    assert not [r["name"] for r in stored["held_out"]["rows"] if r["config"] in fitted]


MINILM = dict(model_type="bert", vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
              intermediate_size=1536, attention_probs_dropout_prob=0.1)


def test_torch_keeps_attention_probabilities_on_cpu_only_with_dropout():
    """What the estimator assumes of torch: SDPA on CPU keeps no batch x heads x seq x seq tensor
    for backward, except with dropout, where its math path keeps three (softmax, mask, dropped)."""
    q, k, v = (torch.randn(2, 12, 64, 32, requires_grad=True) for _ in range(3))
    probability_sized = {}
    for dropout in (0.0, 0.1):
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(t.numel()) or t, lambda t: t):
            torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        probability_sized[dropout] = sum(n == 2 * 12 * 64 * 64 for n in shapes)
    assert probability_sized == {0.0: 0, 0.1: 3}


def test_attention_dropout_is_counted_on_cpu_sdpa():
    """Found by the held-out MiniLM configurations (predicted -20% before): BERT's attention dropout
    makes CPU SDPA keep 3 probability tensors per layer; on CUDA the fused kernels keep none."""
    bert = model_shape(MINILM)
    assert bert.attention_dropout == 0.1 and not bert.gated_mlp
    without = dataclasses.replace(bert, attention_dropout=0.0)
    kw = dict(quantization="none", batch_size=16, seq_len=128, gradient_checkpointing=False, task="seq-cls")
    activations = lambda shape, device: estimate_training_memory(
        shape, device=device, **kw).bytes_by_group()["activations"]
    assert activations(bert, "cpu") - activations(without, "cpu") == 6 * 16 * 12 * 128 * 128 * 3 * 4
    assert activations(bert, "cuda") == activations(without, "cuda")
    assert model_shape(SMOLLM2).attention_dropout == 0.0  # Llama-style configs: unchanged


def test_chunked_loss_keeps_only_a_chunk_of_logits(smollm2):
    kw = dict(device="cuda", batch_size=8, seq_len=512)
    whole = estimate_training_memory(smollm2, **kw)
    chunked = estimate_training_memory(smollm2, loss_chunk_tokens=256, **kw)
    assert chunked.bytes_by_group()["loss"] == logits_bytes(1, 256, 49152) == whole.bytes_by_group()["loss"] / 16
    assert estimate_training_memory(smollm2, loss_chunk_tokens=10**6, **kw).bytes_by_group()["loss"] == \
        whole.bytes_by_group()["loss"]  # a chunk larger than the batch is the whole batch


def test_measured_accumulation_runs_every_micro_step(tiny_model_path, monkeypatch):
    """2 optimizer steps of 3 accumulated passes really run 6 losses (their time is measured, not
    multiplied), through the chunked loss when asked; the prediction's loss row shrinks with it."""
    import ftnb.memory

    calls = []
    real = ftnb.memory.chunked_causal_lm_loss
    monkeypatch.setattr(ftnb.memory, "chunked_causal_lm_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = dict(quantization="none", batch_size=2, seq_len=16, steps=2, fresh_process=False)
    one = measure_training_peak(tiny_model_path, **kw)
    three = measure_training_peak(tiny_model_path, grad_accumulation=3, loss_chunk_tokens=8, **kw)
    assert len(calls) == 6 and len(three["step_seconds"]) == 2 and all(t > 0 for t in three["step_seconds"])
    assert three["predicted_by_group_mib"]["loss"] < one["predicted_by_group_mib"]["loss"]
    with pytest.raises(ValueError, match="seq-cls"):
        measure_training_peak(tiny_model_path, task="seq-cls", loss_chunk_tokens=8, **kw)
