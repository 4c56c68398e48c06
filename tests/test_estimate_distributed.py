"""ftnb.estimate_distributed: arithmetic only (no model is loaded), so the whole file takes about a
second. It pins what notebook 09 tells readers: what each strategy divides, that one DDP GPU is
exactly the single-GPU estimate, which set-up gets recommended, and how far the per-GPU figures
sit from the two published 70B measurements."""
import pytest

from ftnb.estimate import GIB, GPUS, estimate_training_memory, model_shape
from ftnb.estimate_distributed import (ANCHORS, STRATEGIES, anchor_table, estimate_distributed, recommend,
                                       recommendation_table)

SETTINGS = dict(micro_batch=1, seq_len=2048, gradient_checkpointing=True)


def _row(est, start: str) -> int:
    return next(r["bytes"] for r in est.rows if r["component"].startswith(start))


def test_reference_shapes_have_the_published_parameter_counts():
    """The config numbers written as data: the hub model cards give 8.03B, 70.6B and 69.0B."""
    for name, billions in (("llama-3.1-8b", 8.03), ("llama-3.1-70b", 70.55), ("llama-2-70b", 68.98)):
        assert model_shape(name).total_params() / 1e9 == pytest.approx(billions, rel=0.002), name


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_one_ddp_gpu_is_the_single_gpu_estimate(quantization):
    """No second GPU, nothing divided: exactly ftnb.estimate's prediction on CUDA (reused, not redone)."""
    est = estimate_distributed("llama-3.1-8b", "ddp", 1, quantization, lora_r=16, **SETTINGS)
    single = estimate_training_memory("llama-3.1-8b", quantization, True, 16, "all-linear", 1, 2048, True, "adamw",
                                      "bfloat16", "sdpa", lora_dropout=0.05, padded=False, device="cuda")
    assert est.gpu_bytes == single.total_bytes


def test_fsdp2_divides_the_frozen_weights_and_zero2_barely_helps_lora():
    """The lesson of the table: with LoRA only sharding the *weights* matters."""
    ddp = estimate_distributed("llama-3.1-70b", "ddp", 4, "nf4", **SETTINGS)
    zero2 = estimate_distributed("llama-3.1-70b", "zero2", 4, "nf4", **SETTINGS)
    fsdp2 = estimate_distributed("llama-3.1-70b", "fsdp2", 4, "nf4", **SETTINGS)
    # ZeRO-2 divides the gradients and optimizer state: under 5% of a 70B QLoRA GPU (r=16)
    assert 0 < ddp.gpu_bytes - zero2.gpu_bytes < 0.05 * ddp.gpu_bytes
    assert _row(fsdp2, "frozen linear weights") == pytest.approx(_row(ddp, "frozen linear weights") / 4, rel=1e-9)
    assert fsdp2.gpu_bytes < 0.6 * ddp.gpu_bytes
    eight = estimate_distributed("llama-3.1-70b", "fsdp2", 8, "nf4", **SETTINGS)
    assert eight.gpu_bytes < fsdp2.gpu_bytes  # more GPUs, smaller shards


@pytest.mark.parametrize("strategy", ["fsdp2_offload", "zero3_offload"])
def test_offload_moves_weights_and_optimizer_to_host_ram(strategy):
    sharded = estimate_distributed("llama-3.1-70b", strategy.removesuffix("_offload"), 2, "nf4", **SETTINGS)
    offloaded = estimate_distributed("llama-3.1-70b", strategy, 2, "nf4", **SETTINGS)
    assert _row(offloaded, "frozen linear weights") == 0 and _row(offloaded, "optimizer state") == 0
    # all shards of the weights land in the one machine's RAM
    assert _row(offloaded, "offloaded weights") == pytest.approx(2 * (
        _row(sharded, "frozen linear weights") + _row(sharded, "embeddings") + _row(sharded, "LoRA weights")), rel=1e-9)
    assert offloaded.gpu_bytes < sharded.gpu_bytes - 15 * GIB
    assert offloaded.host_bytes > sharded.host_bytes + 30 * GIB


def test_peft_fsdp_qlora_measurement_without_offload_is_within_15_percent():
    """peft docs, Llama-2-70B QLoRA, FSDP on 2 GPUs: 35.6 GB per GPU. 15% is the accuracy the
    single-GPU estimator is validated to (README); the sharding terms add no fitted number."""
    anchor = next(a for a in ANCHORS if a.strategy == "fsdp2")
    assert anchor.estimate().gpu_bytes / GIB == pytest.approx(anchor.gpu_gib, rel=0.15)


def test_offload_figures_are_lower_bounds_of_the_peft_measurement():
    """With CPU offload the same run measured 19.6 GB per GPU and 107 GB of CPU RAM. We predict
    27% less on the GPU (what offload frees, 16 GB, is predicted right: see the test above) and a
    third of the RAM (loading and pinned buffers are not modelled): the notebook says these are
    lower bounds, and this test fails if they stop being lower bounds or drift further."""
    anchor = next(a for a in ANCHORS if a.strategy == "fsdp2_offload" and a.gpu_gib)
    est = anchor.estimate()
    assert 0.6 * anchor.gpu_gib < est.gpu_bytes / GIB < anchor.gpu_gib
    assert 0.25 * anchor.host_gib < est.host_bytes / GIB < anchor.host_gib


def test_answer_ai_70b_fits_two_24_gb_cards_only_with_offload():
    """Answer.AI trains Llama-2-70B QLoRA on two 24 GB cards with FSDP and CPU offload."""
    anchor = next(a for a in ANCHORS if a.fits_card)
    assert anchor.estimate().fits(anchor.fits_card)
    without = estimate_distributed(anchor.model, "fsdp2", anchor.num_gpus, **anchor.settings)
    assert not without.fits(anchor.fits_card)
    assert "fits" in set(anchor_table()["GPU error"])


def test_recommend_picks_the_cheapest_set_up_that_fits():
    assert recommend("llama-3.1-8b", 1, "A100 80 GB", **SETTINGS).label == "LoRA · one GPU"
    assert recommend("llama-3.1-70b", 1, "A100 80 GB", **SETTINGS).label == "QLoRA · one GPU"
    two_l4 = recommend("llama-3.1-70b", 2, "L4 24 GB", host_ram=128 * GIB, **SETTINGS)
    assert two_l4.label == "QLoRA · FSDP2 + CPU offload" and two_l4.fits("L4 24 GB")
    # nothing fits a 70B on one T4 when the host has 16 GiB of RAM
    assert recommend("llama-3.1-70b", 1, "T4 16 GB", host_ram=16 * GIB, **SETTINGS) is None


def test_recommendation_table_has_a_cell_per_count_and_card():
    table = recommendation_table("llama-3.1-8b", [1, 2], ["T4 16 GB", "A100 80 GB"], **SETTINGS)
    assert list(table.index) == [1, 2] and list(table.columns) == ["T4 16 GB", "A100 80 GB"]
    assert table.loc[1, "A100 80 GB"].startswith("LoRA · one GPU (")


def test_bad_arguments_say_what_to_use():
    with pytest.raises(ValueError, match="fsdp2_offload"):
        estimate_distributed("llama-3.1-8b", "fsdp", 2)
    with pytest.raises(ValueError, match="nf4"):
        estimate_distributed("llama-3.1-8b", "fsdp2", 2, "int8")
    with pytest.raises(ValueError, match="at least 1"):
        estimate_distributed("llama-3.1-8b", "ddp", 0)
    assert set(STRATEGIES) == {"ddp", "zero2", "fsdp2", "zero3", "fsdp2_offload", "zero3_offload"}
    assert GPUS["RTX 4090 24 GB"] > GPUS["L4 24 GB"]
