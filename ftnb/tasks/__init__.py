"""Task code: the generic machinery of one kind of fine-tuning job, for any data.

- classify: sequence classification (any labels, any text fields): metrics, calibration, zero-shot
  scoring, a weighted-loss Trainer, the saved classifier.
- sft: supervised fine-tuning of a chat model on instruction/input/output rows: traps, perplexity,
  batched generation, the saved generator, merge and export.
- formats: house formats (answers in labelled sections) read from a data folder's formats.json,
  and the checker that scores answers against them.

What one recipe knows (its labels and their definitions, its zero-shot wording, its house
formats) lives in its data folder (labels.json, zero_shot_prompt.txt, formats.json), never here.
"""
