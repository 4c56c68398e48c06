"""ftnb.distributed and the training scripts: two CPU processes over gloo (DDP and FSDP2) train
exactly like one process with the same global batch, sharded checkpoints resume and merge into the
single-process adapter, and the set-ups that fail silently are refused before training.

Worth its ~2-3 minutes (a dozen `accelerate launch` runs, each two real processes): the equalities
below are what a GPU cluster cannot show cheaply, and they caught that accelerate on a CPU silently
ran each process alone (no use_cpu) or ran DDP when asked for FSDP, and that FSDP2 leaves 4-bit
weights stored as uint8 unsharded. The runs are shared by the tests through module fixtures.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ftnb import distributed, saved

REPO = Path(__file__).resolve().parent.parent
CLASSIFIER, SFT = REPO / "scripts" / "train_classifier.py", REPO / "scripts" / "train_sft.py"
CONFIGS = REPO / "configs" / "accelerate"
DDP, FSDP2, FSDP2_QLORA = CONFIGS / "ddp.yaml", CONFIGS / "fsdp2_lora.yaml", CONFIGS / "fsdp2_qlora.yaml"
# fp32 sums over 2 processes in another order than over 1: differences of ~1e-7 per step
LOSS_TOLERANCE = 1e-4


def run(tmp: Path, name: str, config, *flags: str, script: Path = CLASSIFIER, model: str = "tiny-llama-test",
        steps: int = 20, global_batch: int = 8) -> dict:
    """Launch `script` (2 processes under `config`, or 1 without) and return its train_result.json."""
    args = ["--model", model, "--max-steps", str(steps), "--global-batch", str(global_batch),
            "--output-dir", str(tmp / name), *flags]
    return distributed.launch(script, config, 1 if config is None else 2, args)


def max_loss_difference(a: dict, b: dict) -> float:
    """The largest per-step loss difference between two runs over the steps both logged."""
    losses_a, losses_b = dict(zip(a["steps"], a["losses"])), dict(zip(b["steps"], b["losses"]))
    common = sorted(set(losses_a) & set(losses_b))
    assert common, "the runs logged no common step"
    return max(abs(losses_a[s] - losses_b[s]) for s in common)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """tiny-llama-test classifier, 20 steps of global batch 8: one process (checkpoint at step 10),
    DDP, FSDP2 (sharded checkpoint at step 10), FSDP2 resumed from that checkpoint, and one process
    with half the global batch (the run that must NOT match)."""
    tmp = tmp_path_factory.mktemp("tiny")
    return {"tmp": tmp,
            "single": run(tmp, "single", None, "--save-steps", "10"),
            "ddp": run(tmp, "ddp", DDP),
            "fsdp2": run(tmp, "fsdp2", FSDP2, "--save-steps", "10"),
            "resumed": run(tmp, "resumed", FSDP2, "--resume-from", str(tmp / "fsdp2" / "checkpoint-10")),
            "half_batch": run(tmp, "half_batch", None, global_batch=4)}


def test_ddp_and_fsdp2_train_like_one_process(tiny):
    single = tiny["single"]
    for name in ("ddp", "fsdp2"):
        result = tiny[name]
        assert result["world_size"] == 2 and result["global_batch"] == 8
        assert result["steps"] == list(range(1, 21))
        assert max_loss_difference(result, single) < LOSS_TOLERANCE, name
    assert tiny["ddp"]["distributed_type"] == "MULTI_CPU" and tiny["ddp"]["sharded_parameters"] == 0
    # really sharded, not DDP under another name: every parameter is a DTensor split over 2 processes
    assert tiny["fsdp2"]["distributed_type"] == "FSDP"
    assert tiny["fsdp2"]["sharded_parameters"] == tiny["fsdp2"]["parameters"] > 0
    assert single["losses"][-1] != single["losses"][0]  # it trains: the comparison is not of constants


def test_the_comparison_catches_a_drift(tiny):
    """Half the global batch on one side: other examples per step, so the losses must differ."""
    assert max_loss_difference(tiny["half_batch"], tiny["single"]) > 100 * LOSS_TOLERANCE
    assert max_loss_difference(tiny["half_batch"], tiny["fsdp2"]) > 100 * LOSS_TOLERANCE


def test_sharded_checkpoint_resumes_where_it_stopped(tiny):
    checkpoint = tiny["tmp"] / "fsdp2" / "checkpoint-10"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir()  # sharded: one file per process
    assert len(list((checkpoint / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2
    resumed = tiny["resumed"]
    assert resumed["steps"][-10:] == list(range(11, 21))
    tail = {"steps": resumed["steps"][-10:], "losses": resumed["losses"][-10:]}
    assert max_loss_difference(tail, tiny["single"]) < LOSS_TOLERANCE


def test_sharded_checkpoint_merges_into_the_single_process_adapter(tiny):
    tmp = tiny["tmp"]
    merged = distributed.merge_checkpoint(tmp / "fsdp2" / "checkpoint-10", tmp / "fsdp2_adapter")
    reference = distributed.merge_checkpoint(tmp / "single" / "checkpoint-10", tmp / "single_adapter")
    from_shards, from_one = saved.load(merged), saved.load(reference)
    trained = {name: p for name, p in from_one.model.named_parameters()
               if "lora_" in name or "modules_to_save" in name}
    assert len(trained) == 17  # 2 layers x 4 projections x (A, B) + the head
    shards = dict(from_shards.model.named_parameters())
    for name, weight in trained.items():
        torch.testing.assert_close(shards[name], weight, atol=1e-6, rtol=0, msg=name)
    tickets = [{"subject": "Charged twice", "body": "Invoice INV-1 shows two charges."}]
    np.testing.assert_allclose(from_shards.probabilities(tickets), from_one.probabilities(tickets), atol=1e-6)


def test_merge_needs_a_run_folder(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no run_setup.json"):
        distributed.merge_checkpoint(tmp_path / "checkpoint-3", tmp_path / "adapter")


def test_qlora_under_fsdp2_shards_the_4bit_weights_and_trains_like_one_process(tmp_path):
    """nf4 under FSDP2: the scripts store the 4-bit weights in the compute dtype, so FSDP shards
    them too (stored as uint8 they stay whole on every process: measured, 14 of 38 unsharded)."""
    single = run(tmp_path, "single", None, "--quantization", "nf4", steps=6)
    sharded = run(tmp_path, "fsdp2", FSDP2_QLORA, "--quantization", "nf4", steps=6)
    assert sharded["sharded_parameters"] == sharded["parameters"] > 0
    assert max_loss_difference(sharded, single) < LOSS_TOLERANCE


def test_sft_script_under_fsdp2_trains_like_one_process(tmp_path):
    """TRL's loss is the mean over the response tokens of the whole global batch, on every process."""
    single = run(tmp_path, "single", None, script=SFT, steps=3, global_batch=4)
    sharded = run(tmp_path, "fsdp2", FSDP2, script=SFT, steps=3, global_batch=4)
    assert sharded["distributed_type"] == "FSDP" and sharded["sharded_parameters"] > 0
    assert max_loss_difference(sharded, single) < LOSS_TOLERANCE


def test_smollm2_ddp_and_fsdp2_train_like_one_process(tmp_path):
    """The real model, a few short steps."""
    common = dict(model="smollm2-135m-instruct", steps=3, global_batch=4)
    single = run(tmp_path, "single", None, "--max-length", "24", **common)
    for config in (DDP, FSDP2):
        result = run(tmp_path, config.stem, config, "--max-length", "24", **common)
        assert max_loss_difference(result, single) < LOSS_TOLERANCE, config.stem


# ---------------------------------------------------------------- checks before training
def test_4bit_storage_mismatch_under_fsdp_is_refused_before_loading():
    from ftnb.models import bnb_config

    packed = bnb_config("nf4", compute_dtype=torch.bfloat16)  # bitsandbytes' default storage: uint8
    with pytest.raises(distributed.DistributedSetupError,
                       match=r"bnb_4bit_quant_storage is torch.uint8 but bnb_4bit_compute_dtype is torch.bfloat16.*"
                             r"Set BitsAndBytesConfig\(\.\.\., bnb_4bit_quant_storage=torch.bfloat16\)"):
        distributed.check_quantization(packed, sharded=True)
    distributed.check_quantization(packed, sharded=False)  # DDP or one process: uint8 is right
    distributed.check_quantization(None, sharded=True)  # nothing quantized


def test_quantization_config_stores_4bit_weights_in_the_compute_dtype_under_fsdp(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    quant = distributed.quantization_config("nf4", torch.bfloat16)
    assert quant.bnb_4bit_quant_storage == torch.bfloat16
    distributed.check_quantization(quant)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert distributed.quantization_config("nf4", torch.bfloat16).bnb_4bit_quant_storage == torch.uint8


def test_a_global_batch_that_does_not_divide_is_an_error(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        distributed.script_arguments("x", ["--global-batch", "5", "--output-dir", "out"])
    assert "--global-batch 5 does not divide among 2 processes: pass a multiple of 2" in capsys.readouterr().err


def test_processes_that_would_train_alone_are_refused(monkeypatch, tmp_path):
    """torchrun started 2 processes, but accelerate (no CUDA, no use_cpu) sees one: each would train
    alone. This is what the scripts did before prepare_cpu_processes; now it is an error."""
    from transformers import Trainer, TrainingArguments

    from ftnb.models import load_model

    monkeypatch.setenv("WORLD_SIZE", "2")
    trainer = Trainer(model=load_model("tiny-llama-test"),
                      args=TrainingArguments(output_dir=str(tmp_path), report_to="none"))
    with pytest.raises(distributed.DistributedSetupError,
                       match="torchrun started 2 processes but accelerate sees 1: each would train alone"):
        distributed.check_setup(trainer)


# ---------------------------------------------------------------- DeepSpeed (GPU only here)
@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload"])
def test_deepspeed_configs_pass_deepspeeds_own_validation(name):
    """accelerate's DeepSpeed plugin builds the config from the yaml, the Trainer fills its "auto"
    values, and DeepSpeed's DeepSpeedConfig parses it. Training with them needs a GPU here."""
    config = deepspeed_config(CONFIGS / f"{name}.yaml")
    zero = config.zero_config
    assert config.zero_optimization_stage == (2 if name == "zero2" else 3)
    assert (zero.offload_param.device, zero.offload_optimizer.device) == (
        ("cpu", "cpu") if name == "zero3_offload" else ("none", "none"))
    assert config.train_batch_size == 4 and config.gradient_clipping == 1.0


def test_deepspeed_launch_without_a_gpu_is_refused_with_the_reason(tmp_path):
    with pytest.raises(RuntimeError, match="DeepSpeed needs a GPU here"):
        run(tmp_path, "zero2", CONFIGS / "zero2.yaml", steps=1)


def test_deepspeed_validation_can_fail(tmp_path):
    broken = yaml.safe_load((CONFIGS / "zero3.yaml").read_text())
    broken["deepspeed_config"]["zero_stage"] = 4
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    with pytest.raises(Exception, match="stage"):
        deepspeed_config(tmp_path / "broken.yaml")


def deepspeed_config(path: Path):
    pytest.importorskip("deepspeed")
    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    plugin = DeepSpeedPlugin(**yaml.safe_load(path.read_text())["deepspeed_config"])
    filled = HfTrainerDeepSpeedConfig(plugin.deepspeed_config)
    args = TrainingArguments(output_dir="unused", per_device_train_batch_size=4, use_cpu=True, report_to="none")
    filled.trainer_config_process(args)
    filled.trainer_config_finalize(args, None, num_training_steps=10)
    return DeepSpeedConfig(filled.config)


def test_every_config_file_parses_with_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file

    names = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    assert names == ["ddp", "fsdp2_lora", "fsdp2_qlora", "single_gpu", "zero2", "zero3", "zero3_offload"]
    for path in CONFIGS.glob("*.yaml"):
        assert load_config_from_file(str(path)).distributed_type is not None, path.name
