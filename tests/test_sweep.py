"""Sweeps (ftnb.sweep, `python -m ftnb sweep`): the grid, a failure that does not stop the others,
re-runs that fill in only what is missing, the table, and parallel runs. The runs are real papermill
executions of tests/fixtures/sweep_stub.ipynb, a stand-in recipe that writes metrics.json from its
parameters without importing torch (about a second per run), and appends a line per execution to a
file, so the tests count what actually ran. The stub's score is a known function of its parameters,
so a run that read another run's parameters, or wrote into another run's folder, shows in the table."""
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from ftnb.runner import UsageError
from ftnb.sweep import expand_grid, parse_grid_option, plan, read_grid_file, run_sweep

STUB = Path(__file__).parent / "fixtures" / "sweep_stub.ipynb"
GRID = {"learning_rate": ["0.1", "0.9"], "lora_r": [4, 16]}


def test_grid_expands_to_every_combination_times_seeds():
    combos = expand_grid({"learning_rate": [1e-4, 1e-3], "lora_r": [4, 16, 64]}, seeds=2)
    assert len(combos) == 12
    assert combos[0] == {"learning_rate": 1e-4, "lora_r": 4, "seed": 0}
    assert combos[-1] == {"learning_rate": 1e-3, "lora_r": 64, "seed": 1}
    assert len({tuple(c.items()) for c in combos}) == 12
    assert expand_grid({"lora_r": [4]}) == [{"lora_r": 4}]
    with pytest.raises(UsageError, match="seed"):
        expand_grid({"seed": [0, 1]}, seeds=2)
    with pytest.raises(UsageError, match="lora_r"):
        expand_grid({"lora_r": []})


def test_grid_options_and_files_are_read_as_the_command_line_reads_values(tmp_path):
    assert parse_grid_option("learning_rate=1e-4,0.5,1") == ("learning_rate", ["1e-4", "0.5", "1"])
    assert parse_grid_option("target_modules=all-linear,[q_proj, v_proj]") == (
        "target_modules", ["all-linear", ["q_proj", "v_proj"]])
    for bad in ("learning_rate", "=1,2", "lora_r=", "target_modules=[q_proj"):
        with pytest.raises(UsageError, match="--grid"):
            parse_grid_option(bad)
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text("learning_rate: [1.0e-4, 3.0e-4]\nlora_r: [4, 16]\n")
    assert read_grid_file(grid_file) == {"learning_rate": [1e-4, 3e-4], "lora_r": [4, 16]}
    grid_file.write_text("learning_rate: 1.0e-4\n")
    with pytest.raises(UsageError, match="list"):
        read_grid_file(grid_file)
    with pytest.raises(UsageError, match="no-such.yaml"):
        read_grid_file(tmp_path / "no-such.yaml")


def test_a_combination_is_its_resolved_parameters_not_its_spelling_or_order():
    first = plan(STUB, None, {"learning_rate": ["1e-1", "0.9"], "lora_r": ["4"]})
    again = plan(STUB, None, {"lora_r": [4], "learning_rate": [0.9, 0.1]})
    assert {c.key for c in first} == {c.key for c in again} and len(first) == 2
    assert first[0].swept == {"learning_rate": 0.1, "lora_r": 4}  # typed as the notebook reads them
    assert len(plan(STUB, None, {"learning_rate": ["0.1", "1e-1"]})) == 1  # the same run, kept once
    with pytest.raises(UsageError, match="no parameter"):
        plan(STUB, None, {"learning_rat": [0.1]})
    with pytest.raises(UsageError, match="learning_rate"):
        plan(STUB, None, {"learning_rate": ["fast"]})


def _sweep(tmp_path: Path, sweep_dir: str, jobs: int = 1) -> pd.DataFrame:
    fixed = {"executions_file": str(tmp_path / "executions.txt"), "fail_file": str(tmp_path / "fail")}
    return run_sweep(STUB, None, GRID, seeds=1, fixed=fixed, sweep_dir=tmp_path / sweep_dir, jobs=jobs,
                     log=open(tmp_path / "log.txt", "a"))


def _executions(tmp_path: Path) -> list[str]:
    path = tmp_path / "executions.txt"
    return path.read_text().splitlines() if path.exists() else []


def _expected_score(learning_rate: float, lora_r: int, seed: int) -> float:
    """What the stub writes as validation_macro_f1."""
    return 1 - abs(math.log10(learning_rate) + 1) / 10 + lora_r / 1000 + seed / 10000


def test_sweep_goes_past_a_failure_records_it_and_a_rerun_fills_in_only_what_failed(tmp_path):
    """Two runs at a time (the command-line test below runs one at a time): every row holds its own run's numbers."""
    (tmp_path / "fail").touch()  # runs at learning rate 0.9 fail while this file exists
    table = _sweep(tmp_path, "sweep", jobs=2)
    assert len(_executions(tmp_path)) == 4 and len(table) == 4
    failed = table[table["learning_rate"] == 0.9]
    assert set(failed["status"]) == {"failed"} and set(table.loc[table["learning_rate"] == 0.1, "status"]) == {"ok"}
    assert failed["error"].str.contains("ValueError: learning rate 0.9 diverged").all()
    assert failed["validation_macro_f1"].isna().all()
    written = pd.read_csv(tmp_path / "sweep" / "results.csv")
    assert list(written.columns) == list(table.columns) and len(written) == 4
    # every swept value, every other parameter of the notebook, the summary and top-level metrics
    assert {"learning_rate", "lora_r", "seed", "target_modules", "executions_file", "validation_macro_f1",
            "test_macro_f1", "tokens_per_second", "label_field", "status", "error", "commit"} <= set(table)
    assert "output_dir" not in table and "n" not in table  # `run` names the folder; nested metrics stay in the file
    ok = table[table["status"] == "ok"]
    assert ok["validation_macro_f1"].tolist() == pytest.approx([_expected_score(0.1, r, 0) for r in (4, 16)])

    (tmp_path / "fail").unlink()
    again = _sweep(tmp_path, "sweep", jobs=2)
    assert sorted(_executions(tmp_path)[4:]) == sorted(f"0.9 {r} 0" for r in (4, 16))
    assert set(again["status"]) == {"ok"} and again["run"].tolist() == table["run"].tolist()
    assert again["validation_macro_f1"].tolist() == pytest.approx(
        [_expected_score(lr, r, 0) for lr in (0.1, 0.9) for r in (4, 16)])
    attempts = sorted(p.name for p in (tmp_path / "sweep" / "attempts").iterdir())
    assert len(attempts) == 2 and all(name.endswith(".1") for name in attempts)  # kept, not deleted

    _sweep(tmp_path, "sweep")
    assert len(_executions(tmp_path)) == 6  # nothing left to run


def test_command_line_sweep_reports_failures_in_its_exit_code(tmp_path):
    command = [sys.executable, "-m", "ftnb", "sweep", str(STUB), "--grid", "learning_rate=0.1,0.9",
               "-p", "executions_file", str(tmp_path / "executions.txt"), "-p", "fail_file", str(tmp_path / "fail"),
               "--sweep-dir", str(tmp_path / "cli")]
    (tmp_path / "fail").touch()
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "learning rate 0.9 diverged" in done.stdout
    table = pd.read_csv(tmp_path / "cli" / "results.csv")
    assert table["status"].tolist() == ["ok", "failed"]
    assert table["validation_macro_f1"][0] == pytest.approx(_expected_score(0.1, 4, 0))  # the stub's defaults
    bad = subprocess.run([*command, "--grid", "lora_rank=4"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "lora_rank" in bad.stderr


def test_training_curves_logged_to_tensorboard_read_back_as_logged(tmp_path):
    """A real Trainer (tiny random Llama, 6 steps) with ftnb's TensorBoard callback: the event files land
    in <output_dir>/tensorboard/<name>, and read_scalars returns every logged loss at its step."""
    import torch
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, TrainingArguments

    from ftnb.models import load_model, load_tokenizer
    from ftnb.results import read_scalars, tensorboard_callback
    from ftnb.tasks import classify

    tok = load_tokenizer("tiny-llama-test")
    torch.manual_seed(0)
    model = load_model("tiny-llama-test", task="seq-cls", dtype=torch.float32, num_labels=2, tokenizer=tok)
    tickets = [{"subject": f"ticket {i}", "body": "refund please" if i % 2 else "app crashes", "category": "ab"[i % 2]}
               for i in range(12)]
    train = classify.tokenize_split(Dataset.from_list(tickets), tok, "category", ["a", "b"], max_length=16)
    args = TrainingArguments(output_dir=str(tmp_path / "checkpoints"), max_steps=6, per_device_train_batch_size=4,
                             learning_rate=1e-2, logging_steps=2, save_strategy="no", report_to="none",
                             disable_tqdm=True, use_cpu=True)
    trainer = classify.WeightedTrainer(model=model, args=args, train_dataset=train,
                                       data_collator=DataCollatorWithPadding(tok),
                                       callbacks=[tensorboard_callback(tmp_path, "qlora")])
    trainer.train()
    logged = {r["step"]: r["loss"] for r in trainer.state.log_history if "loss" in r}
    curves = read_scalars(tmp_path)
    loss = curves[curves["tag"] == "train/loss"]
    assert set(curves["run"]) == {"tensorboard/qlora"} and len(logged) == 3
    assert dict(zip(loss["step"], loss["value"])) == pytest.approx(logged, rel=1e-6)  # float32 in the file
    assert {"train/learning_rate", "train/grad_norm"} <= set(curves["tag"])
    assert read_scalars(tmp_path / "nothing here").empty
