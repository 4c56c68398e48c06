"""Recipe 01's training (LoRA, or QLoRA with --quantization nf4, with a classification head on the
ticket categories) as a script that runs unchanged in one process or under accelerate launch.

Usage:
    python scripts/train_classifier.py --model smollm2-135m-instruct --max-steps 20 --global-batch 8 --output-dir runs/one
    accelerate launch --config_file configs/accelerate/fsdp2_lora.yaml --num_processes 2 \\
        scripts/train_classifier.py --model smollm2-135m-instruct --max-steps 20 --global-batch 8 --output-dir runs/fsdp

--global-batch is the batch of one optimizer step over all processes, so one process and N
processes take the same steps on the same examples. Writes OUTPUT_DIR/train_result.json
(per-step losses, world size, strategy, seconds, peak memory); with --save-steps, checkpoints in
OUTPUT_DIR/checkpoint-N (sharded under FSDP: ftnb.distributed.merge_checkpoint makes an adapter).
Notebook 01 explains the recipe; notebook 09 the set-ups.
"""
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorWithPadding

from ftnb import data, distributed, env
from ftnb.models import load_tokenizer
from ftnb.tasks import classify

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
TEXT_FIELDS = ("subject", "body")


def main() -> None:
    args = distributed.script_arguments(__doc__)
    training_args = distributed.training_arguments(args)  # first: it sets up the processes
    tokenizer = load_tokenizer(args.model)
    tickets = data.load("tickets")
    labels = classify.labels_for("category", tickets["train"], "tickets")
    train_rows = data.subset(tickets["train"], args.global_batch * args.max_steps, args.seed)
    train = classify.tokenize_split(train_rows, tokenizer, "category", labels, args.max_length, TEXT_FIELDS)
    id2label, label2id = classify.label_maps(labels)
    env.seed_everything(args.seed)  # the new head and LoRA weights start the same in every process and run
    model = distributed.load_model(args.model, args.quantization, task="seq-cls", tokenizer=tokenizer,
                                   num_labels=len(labels), id2label=id2label, label2id=label2id)
    # dropout off: with it, one process and N processes would draw different masks
    lora = LoraConfig(task_type="SEQ_CLS", r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                      target_modules=TARGET_MODULES, modules_to_save=["score"])
    model = get_peft_model(model, lora)
    trainer = classify.WeightedTrainer(model=model, args=training_args, train_dataset=train,
                                       data_collator=DataCollatorWithPadding(tokenizer))
    distributed.save_setup(trainer, args, "classifier", {
        "labels": labels, "label_field": "category", "text_fields": list(TEXT_FIELDS), "max_length": args.max_length})
    distributed.run_training(trainer, args)


if __name__ == "__main__":
    main()
