"""Training on several processes with Accelerate (DDP, FSDP2, DeepSpeed ZeRO), and the checks that
catch the set-ups which otherwise fail silently.

Usage:
    from ftnb.distributed import launch
    result = launch("scripts/train_classifier.py", "configs/accelerate/fsdp2_lora.yaml", 2,
                    ["--model", "tiny-llama-test", "--max-steps", "20", "--global-batch", "8",
                     "--output-dir", "runs/fsdp"])
    result["losses"], result["world_size"], result["strategy"]

The training scripts (scripts/train_classifier.py, scripts/train_sft.py) run unchanged in one
process (`python scripts/train_classifier.py ...`) or under `accelerate launch --config_file
configs/accelerate/<set-up>.yaml scripts/train_classifier.py ...`; each writes
OUTPUT_DIR/train_result.json (per-step losses, world size, strategy, seconds, peak memory).

Without a GPU, `launch` still runs real processes that talk over gloo: accelerate's launcher starts
them with torchrun, and `prepare_cpu_processes` makes accelerate use them (see its docstring).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULT_FILE = "train_result.json"
SETUP_FILE = "run_setup.json"  # what merge_checkpoint needs to rebuild the model from a checkpoint


class DistributedSetupError(ValueError):
    """A distributed set-up that would crash mid-run or train wrongly without saying so."""


# ---------------------------------------------------------------- launching
def launch(script: str | Path, config: str | Path | None, num_processes: int, args: list[str],
           timeout_s: float = 600, env: dict[str, str] | None = None) -> dict:
    """Run `script` with `args` under `accelerate launch --config_file config --num_processes N`
    (or in one plain process when config is None) in a subprocess, and return the train_result.json
    it wrote into its --output-dir. A failed run is a RuntimeError carrying the end of its output.

    Without CUDA the processes run on the CPU and talk over gloo. `accelerate launch --cpu` is not
    used: it starts one process only, whatever --num_processes says (its multi-process CPU mode
    needs MPI); the scripts call prepare_cpu_processes instead.

    Usage: launch("scripts/train_sft.py", "configs/accelerate/ddp.yaml", 2, ["--model", "tiny-llama-test",
                  "--max-steps", "4", "--global-batch", "4", "--output-dir", "runs/ddp"])["losses"]
    """
    output_dir = Path(args[args.index("--output-dir") + 1])
    if config is None:
        if num_processes != 1:
            raise ValueError("without an accelerate config the script runs in one process: pass num_processes=1")
        command = [sys.executable, str(script), *args]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                   "--num_processes", str(num_processes), "--main_process_port", str(_free_port()),
                   str(script), *args]
    run_env = {**os.environ, **(env or {})}
    run_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=run_env,
                          cwd=REPO_ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode}):\n"
                           f"{(done.stdout + done.stderr)[-4000:]}")
    return json.loads((output_dir / RESULT_FILE).read_text())


def _free_port() -> int:
    """A TCP port nobody listens on, so two launches in a row do not collide on 29500."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- inside a launched script
def launched_with_fsdp() -> bool:
    """Whether `accelerate launch` was given an FSDP config (it says so through the environment)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def launched_with_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def world_size() -> int:
    """Processes in this run: torchrun's WORLD_SIZE, 1 for a plain `python script.py`."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def prepare_cpu_processes() -> bool:
    """Make accelerate use the processes torchrun started, on a machine without CUDA.

    Two silent failures otherwise: without use_cpu each process trains alone on its own copy
    (accelerate sees no GPU and falls back to one process), and with it accelerate runs FSDP as
    plain DDP, because its FSDP support is for accelerators only. So we create accelerate's
    state for CPU processes (gloo) and, when the launcher asked for FSDP, switch it to FSDP with
    the launcher's FSDP settings: torch's fully_shard runs on CPU tensors over gloo, which is
    what lets the test suite check sharding, sharded checkpoints and their merge without a GPU.
    Returns whether it did; if so, pass accelerator_config={"use_configured_state": True} to the
    TrainingArguments so the Trainer keeps this state. No-op (False) with CUDA or in one process.

    Usage: configured = prepare_cpu_processes()
           TrainingArguments(..., use_cpu=True, accelerator_config={"use_configured_state": configured})
    """
    if torch.cuda.is_available() or world_size() == 1:
        return False
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if launched_with_deepspeed():
        raise DistributedSetupError(
            "DeepSpeed needs a GPU here: without CUDA accelerate runs a DeepSpeed launch as separate single "
            "processes (and with use_cpu as DDP), never as DeepSpeed. On a CPU use configs/accelerate/ddp.yaml "
            "or fsdp2_lora.yaml")
    Accelerator(cpu=True)  # initialises the shared state: MULTI_CPU over gloo
    if launched_with_fsdp():
        state = AcceleratorState()
        state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* settings
        # both states, as accelerate itself sets them: AcceleratorState copies PartialState's on each init
        state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    return True


def strategy() -> str:
    """The set-up this process runs under, from the launcher's environment."""
    if world_size() == 1:
        return "single"
    if launched_with_deepspeed():
        return "deepspeed"
    return "fsdp2" if launched_with_fsdp() else "ddp"


# ---------------------------------------------------------------- models in a launched process
def local_device() -> torch.device:
    """This process's device: its own GPU (LOCAL_RANK) with CUDA, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def quantization_config(quantization: str, compute_dtype: torch.dtype):
    """The BitsAndBytesConfig of ftnb.models.bnb_config, with the 4-bit weights stored in the
    compute dtype when the launcher asked for FSDP (FSDP shards float tensors; see check_quantization).

    Usage: quant = quantization_config("nf4", torch.bfloat16)
    """
    from ftnb.models import bnb_config

    storage = compute_dtype if quantization in ("nf4", "fp4") and launched_with_fsdp() else None
    return bnb_config(quantization, compute_dtype=compute_dtype, quant_storage=storage)


def check_quantization(quant, sharded: bool | None = None) -> None:
    """Refuse, before any weight is loaded, a 4-bit set-up that FSDP would handle wrongly.

    FSDP shards floating-point parameters. bitsandbytes stores 4-bit weights packed into uint8 by
    default: FSDP1 then crashes or trains with a zero loss (reported by peft and answer.ai on GPUs),
    and FSDP2 leaves them whole on every process, so the base model is not sharded and no memory is
    saved (measured here on CPU: 14 of tiny-llama-test's 38 parameters, every 4-bit one, unsharded).
    The fix is to store the packed weights in the compute dtype (`bnb_4bit_quant_storage`).
    `sharded` defaults to whether the launcher asked for FSDP.

    Usage: check_quantization(BitsAndBytesConfig(load_in_4bit=True, ...), sharded=True)
    """
    sharded = launched_with_fsdp() if sharded is None else sharded
    if quant is None or not sharded or not getattr(quant, "load_in_4bit", False):
        return
    storage, compute = quant.bnb_4bit_quant_storage, quant.bnb_4bit_compute_dtype
    storage = getattr(torch, storage) if isinstance(storage, str) else storage
    if storage != compute:
        raise DistributedSetupError(
            f"QLoRA under FSDP needs the 4-bit weights stored in the compute dtype: "
            f"bnb_4bit_quant_storage is {storage} but bnb_4bit_compute_dtype is {compute}, so FSDP would "
            f"leave them unsharded (no memory saved) or crash or train with a zero loss. Set BitsAndBytesConfig(..., bnb_4bit_quant_storage={compute}) "
            f"(ftnb.distributed.quantization_config does it).")


def load_model(name: str, quantization: str = "none", task: str = "causal-lm", **kwargs):
    """ftnb.models.load_model for one process of a launched run: the weights on this process's
    device and, with 4 bits under FSDP, stored in the compute dtype (checked before loading).

    Usage: model = load_model("smollm2-135m-instruct", "nf4", task="seq-cls", num_labels=8)
    """
    from ftnb.env import pick_dtype
    from ftnb.models import load_model as load_plain

    dtype = pick_dtype()
    quant = quantization_config(quantization, dtype)
    check_quantization(quant)
    if quant is None:
        return load_plain(name, task=task, dtype=dtype, **kwargs)
    storage = quant.bnb_4bit_quant_storage if quant.load_in_4bit else None
    return load_plain(name, task=task, quantization=quantization, dtype=dtype, quant_storage=storage,
                      device_map={"": local_device()}, **kwargs)


# ---------------------------------------------------------------- the scripts' shared parts
def script_arguments(description: str, argv: list[str] | None = None,
                     default_max_length: int = 64) -> argparse.Namespace:
    """The flags both training scripts take (the same in one process and under accelerate launch).

    Usage: args = script_arguments(__doc__, default_max_length=384)
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="registry name, folder or hub id")
    parser.add_argument("--quantization", default="none", choices=["none", "nf4"], help="nf4 = QLoRA")
    parser.add_argument("--max-steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--global-batch", type=int, default=8,
                        help="examples per optimizer step, over all processes (divided among them)")
    parser.add_argument("--max-length", type=int, default=default_max_length, help="tokens per example")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--save-steps", type=int, default=0, help="save a checkpoint every N steps (0: none)")
    parser.add_argument("--resume-from", default=None, help="a checkpoint folder written by --save-steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args(argv)
    if args.global_batch % world_size():
        parser.error(f"--global-batch {args.global_batch} does not divide among {world_size()} processes: "
                     f"pass a multiple of {world_size()}")
    return args


def training_arguments(args: argparse.Namespace, config_class=None, **overrides):
    """TrainingArguments (or `config_class`, e.g. trl's SFTConfig) that make one process and N
    processes take the same steps: per-process batch = global batch / N, no accumulation, a
    constant learning rate (a resumed run continues the same schedule), the loss logged each step.

    Usage: trainer = Trainer(model, training_arguments(args), ...)
    """
    from transformers import TrainingArguments

    from ftnb.env import precision_flags

    configured = prepare_cpu_processes()
    config_class = config_class or TrainingArguments
    return config_class(
        output_dir=args.output_dir, max_steps=args.max_steps,
        per_device_train_batch_size=args.global_batch // world_size(), gradient_accumulation_steps=1,
        learning_rate=args.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
        logging_steps=1, save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        seed=args.seed, data_seed=args.seed, use_cpu=not torch.cuda.is_available(),
        report_to="none", disable_tqdm=True, accelerator_config={"use_configured_state": configured},
        **precision_flags(), **overrides)


def sharded_parameters(model: torch.nn.Module) -> int:
    """How many parameters FSDP2 has split across processes (DTensors); 0 for DDP or one process."""
    from torch.distributed.tensor import DTensor

    return sum(isinstance(p, DTensor) for p in model.parameters())


def check_setup(trainer) -> None:
    """Refuse to train when accelerate runs something else than the launcher asked for: fewer
    processes than torchrun started (each would train alone on its own copy of the data order), or
    DDP/one process where FSDP or DeepSpeed was asked for (no memory saved, and nothing says so).

    Usage: check_setup(trainer)  # run_training calls it
    """
    accelerator = trainer.accelerator
    if accelerator.num_processes != world_size():
        raise DistributedSetupError(
            f"torchrun started {world_size()} processes but accelerate sees {accelerator.num_processes}: each "
            f"would train alone. Without CUDA call ftnb.distributed.prepare_cpu_processes (training_arguments does)")
    wanted = {"fsdp2": "FSDP", "deepspeed": "DEEPSPEED"}.get(strategy())
    running = str(accelerator.distributed_type).split(".")[-1]
    if wanted and running != wanted:
        raise DistributedSetupError(f"the launcher asked for {wanted} but accelerate runs {running}: check the "
                                    f"config file and that this machine supports it (DeepSpeed needs a GPU here)")


def run_training(trainer, args: argparse.Namespace) -> dict:
    """Train (resuming when asked), then write OUTPUT_DIR/train_result.json on the main process:
    per-step losses, world size, strategy, global batch, seconds, peak RSS of this process.

    Usage: result = run_training(trainer, args)
    """
    from ftnb.memory import current_peak_mib

    check_setup(trainer)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=args.resume_from)
    seconds = time.perf_counter() - start
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    result = {"losses": [entry["loss"] for entry in history], "steps": [entry["step"] for entry in history],
              "world_size": trainer.accelerator.num_processes, "strategy": strategy(),
              "distributed_type": str(trainer.accelerator.distributed_type).split(".")[-1],
              "sharded_parameters": sharded_parameters(trainer.model_wrapped),
              "parameters": sum(1 for _ in trainer.model_wrapped.parameters()),
              "global_batch": args.global_batch, "model": args.model, "quantization": args.quantization,
              "seconds": round(seconds, 2), "peak_rss_mib": round(current_peak_mib()["rss"], 1),
              "peak_accelerator_mib": round(current_peak_mib()["accelerator"], 1)}
    if trainer.accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.output_dir) / RESULT_FILE).write_text(json.dumps(result, indent=2))
    return result


# ---------------------------------------------------------------- checkpoints
def save_setup(trainer, args: argparse.Namespace, kind: str, task: dict) -> None:
    """Write, on the main process, what turns a checkpoint of this run back into a saved model:
    OUTPUT_DIR/run_setup.json (kind, base model, quantization, task fields as ftnb.saved keeps them)
    and the adapter's adapter_config.json (FSDP's sharded checkpoints hold weights only).

    Usage: save_setup(trainer, args, "classifier", {"labels": labels, "label_field": "category", ...})
    """
    if not trainer.accelerator.is_main_process:
        return
    folder = Path(args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    trainer.model.peft_config["default"].save_pretrained(folder)
    setup = {"kind": kind, "model": args.model, "quantization": args.quantization, "task": task}
    (folder / SETUP_FILE).write_text(json.dumps(setup, indent=2))


def merge_checkpoint(checkpoint: str | Path, destination: str | Path) -> Path:
    """A checkpoint of a training script (FSDP's sharded one, or a single process's or DDP's plain
    one) as an ftnb saved model: a normal peft adapter plus manifest, that ftnb.saved.load reads
    on any number of processes. Sharded weights are gathered with accelerate's merge_fsdp_weights.

    Usage: merge_checkpoint("runs/fsdp/checkpoint-10", "runs/fsdp/adapter"); ftnb.saved.load("runs/fsdp/adapter")
    """
    import shutil
    import tempfile

    from accelerate.utils import merge_fsdp_weights
    from peft import PeftModel

    from ftnb.models import load_model as load_plain, load_tokenizer

    checkpoint = Path(checkpoint)
    run_dir = checkpoint.parent
    if not (run_dir / SETUP_FILE).exists():
        raise FileNotFoundError(f"{run_dir} holds no {SETUP_FILE}: pass a checkpoint-N folder written by "
                                f"scripts/train_classifier.py or scripts/train_sft.py")
    setup = json.loads((run_dir / SETUP_FILE).read_text())
    sharded = checkpoint / "pytorch_model_fsdp_0"
    with tempfile.TemporaryDirectory() as adapter:
        if sharded.is_dir():
            merge_fsdp_weights(str(sharded), adapter, safe_serialization=True)
            os.rename(Path(adapter) / "model.safetensors", Path(adapter) / "adapter_model.safetensors")
        elif (checkpoint / "adapter_model.safetensors").exists():
            shutil.copy(checkpoint / "adapter_model.safetensors", adapter)
        else:
            raise FileNotFoundError(f"{checkpoint} holds neither FSDP shards (pytorch_model_fsdp_0/) nor "
                                    f"adapter_model.safetensors")
        shutil.copy(run_dir / "adapter_config.json", adapter)
        tokenizer = load_tokenizer(setup["model"])
        task = setup["task"]
        head = {}
        if setup["kind"] == "classifier":
            from ftnb.tasks.classify import label_maps

            id2label, label2id = label_maps(task["labels"])
            head = {"task": "seq-cls", "num_labels": len(id2label), "id2label": id2label, "label2id": label2id,
                    "tokenizer": tokenizer}
        base = load_plain(setup["model"], quantization=setup["quantization"], **head)
        model = PeftModel.from_pretrained(base, adapter)
        return _save_as(setup, model, tokenizer, destination)


def _save_as(setup: dict, model, tokenizer, destination: str | Path) -> Path:
    """Save `model` with the saver of the run's kind (classifier or generator)."""
    task = setup["task"]
    if setup["kind"] == "classifier":
        from ftnb.tasks.classify import Classifier

        classifier = Classifier(model, tokenizer, task["labels"], base_model=setup["model"],
                                max_length=task["max_length"], label_field=task["label_field"],
                                text_fields=task["text_fields"])
        return classifier.save(destination)
    from ftnb.tasks.sft import save_generator

    return save_generator(model, tokenizer, destination, base_model=setup["model"], system=task["system"],
                          decoding=task["decoding"])
