"""Recipe 02's training (LoRA, or QLoRA with --quantization nf4, supervised fine-tuning with TRL on
the legal, medical and technical answers) as a script that runs unchanged in one process or under
accelerate launch.

Usage:
    python scripts/train_sft.py --model smollm2-135m-instruct --max-steps 20 --global-batch 8 --output-dir runs/one
    accelerate launch --config_file configs/accelerate/fsdp2_lora.yaml --num_processes 2 \\
        scripts/train_sft.py --model smollm2-135m-instruct --max-steps 20 --global-batch 8 --output-dir runs/fsdp

The loss is the mean over every response token of the step, on all processes together (TRL counts
the tokens of the whole global batch), so one process and N processes take the same steps.
Examples longer than --max-length are dropped and listed, never cut (see notebook 02).
Writes OUTPUT_DIR/train_result.json; with --save-steps, checkpoints in OUTPUT_DIR/checkpoint-N
(ftnb.distributed.merge_checkpoint makes an adapter of one, sharded or not).
"""
from peft import LoraConfig, get_peft_model
from trl import SFTConfig, SFTTrainer

from ftnb import data, distributed, env
from ftnb.models import load_tokenizer
from ftnb.tasks import sft


def main() -> None:
    args = distributed.script_arguments(__doc__, default_max_length=384)
    # packing off: each example stays one row, so every set-up sees the same rows in the same order
    training_args = distributed.training_arguments(args, SFTConfig, max_length=args.max_length, packing=False,
                                                   completion_only_loss=True)
    tokenizer = load_tokenizer(args.model)
    rows = data.subset(data.load("domains", schema=sft.SCHEMA)["train"], args.global_batch * args.max_steps,
                       args.seed, stratify="domain")
    train, _ = sft.build_sft_dataset(rows, tokenizer, args.max_length)
    env.seed_everything(args.seed)  # the LoRA weights start the same in every process and run
    model = distributed.load_model(args.model, args.quantization)
    lora = LoraConfig(task_type="CAUSAL_LM", r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                      target_modules="all-linear")
    trainer = SFTTrainer(model=get_peft_model(model, lora), args=training_args, train_dataset=train,
                         processing_class=tokenizer)
    distributed.save_setup(trainer, args, "generator", {"system": sft.SYSTEM_PROMPT, "decoding": {}})
    with sft.loss_on_labelled_positions():  # the vocabulary head over the answers alone, on a CPU too
        distributed.run_training(trainer, args)


if __name__ == "__main__":
    main()
