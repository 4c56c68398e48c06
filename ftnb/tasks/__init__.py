"""Task code: the generic machinery of one kind of fine-tuning job, for any data.

- classify: sequence classification (any labels, any text fields): metrics, calibration, zero-shot
  scoring, a weighted-loss Trainer, the saved classifier.
- sft: supervised fine-tuning of a chat model on instruction/input/output rows: traps, perplexity,
  batched generation, the saved generator, merge and export.

What one recipe knows (its labels, definitions, house formats) lives in ftnb.recipes and in its
data folder, never here.
"""
