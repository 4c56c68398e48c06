"""Each model notebook 01 trains starts from weights that depend on the seed alone.

MiniLM's classification head and LoRA matrices are drawn from torch's random generator when the
model is built, after QLoRA has trained and drawn its own dropout masks. Unless the notebook seeds
again first, the baseline's score would move whenever a QLoRA setting changes how many numbers QLoRA
draws (the layers it adapts, its passes per step): a baseline that should stay put while the model it
is compared with is tuned.
"""
import pytest

# the tiny random Llama for QLoRA (it is not what is compared), the real MiniLM; no OOD set, no reload
FAST = {"model": "tiny-llama-test", "ood_dir": "", "reload_check": False, "zero_shot_limit": 2}


def _minilm(metrics: dict) -> dict:
    """MiniLM's validation curve and test scores in a run's metrics."""
    row = next(row for name, row in metrics["methods"].items() if name.startswith("minilm"))
    return {"epochs": metrics["minilm_epochs"], "test": {k: row[k] for k in ("macro_f1", "accuracy", "ece")}}


def test_minilm_does_not_depend_on_qlora_settings(smoke_metrics, tmp_path):
    default = _minilm(smoke_metrics("01_ticket_classification.ipynb", FAST, tmp_path / "default"))
    # QLoRA's settings alone (MiniLM shares lora_r, and trains on batch_size x grad_accum tickets per step)
    other_qlora = _minilm(smoke_metrics("01_ticket_classification.ipynb",
                                        {**FAST, "target_modules": ["q_proj", "v_proj"], "batch_size": 4,
                                         "grad_accum": 2, "learning_rate": 3e-3}, tmp_path / "other_qlora"))
    assert other_qlora["test"] == default["test"]  # the same model: its test scores to the last bit
    # its validation curve too; the loss to float rounding, as validation batches are 2 x batch_size tickets
    # (the ones QLoRA evaluates with), padded to their longest
    for ours, theirs in zip(other_qlora["epochs"], default["epochs"], strict=True):
        assert ours.pop("eval_loss") == pytest.approx(theirs.pop("eval_loss"), rel=1e-5)
        assert ours == theirs  # epoch, validation accuracy and macro-F1, which epoch was kept
