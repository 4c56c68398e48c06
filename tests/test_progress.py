"""Progress reaches the user: the Trainer's own bar in Jupyter, a side file the runner shows in batch runs."""
import json
import re
import time
from pathlib import Path

import nbformat
import pytest

from ftnb import progress
from ftnb.runner import run_notebook

ROOT = Path(__file__).parent.parent
RECIPES_THAT_TRAIN = ["00_quickstart", "01_ticket_classification", "02_domain_generation"]


@pytest.mark.parametrize("seconds, shown", [(0, "0s"), (45.4, "45s"), (370, "6m"), (4320, "1h 12m")])
def test_durations_read_like_an_eta(seconds, shown):
    assert progress.format_duration(seconds) == shown


def test_the_runner_line_describes_training_only_while_it_runs():
    state = {"phase": "train", "step": 40, "max_steps": 174, "loss": 0.52, "eta_seconds": 370}
    assert progress.describe(state) == "train step 40/174 · loss 0.520 · ETA 6m"
    assert progress.describe({**state, "loss": None, "eta_seconds": None}) == "train step 40/174"
    assert progress.describe({**state, "phase": "done"}) == "" and progress.describe(None) == ""


def test_the_side_file_is_replaced_whole(tmp_path):
    path = tmp_path / "progress.json"
    assert progress.read_progress(path) is None
    progress.write_progress(path, {"phase": "train", "step": 1})
    progress.write_progress(path, {"phase": "train", "step": 2})
    assert progress.read_progress(path) == {"phase": "train", "step": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["progress.json"]  # no partial file left behind


def _tiny_trainer(model_path: str, callbacks: list, steps: int = 4):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(model_path)
    rows = Dataset.from_dict({"input_ids": [[1, 2, 3, 4]] * 8, "labels": [[1, 2, 3, 4]] * 8})
    args = TrainingArguments(output_dir="unused", max_steps=steps, per_device_train_batch_size=2, logging_steps=1,
                             report_to="none", use_cpu=True, save_strategy="no")
    return Trainer(model=model, args=args, train_dataset=rows, callbacks=callbacks)


def test_callback_writes_each_step_throttled_and_nothing_outside_a_batch_run(tiny_model_path, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(progress, "write_progress", lambda path, state: seen.append(state))
    monkeypatch.setattr(progress, "WRITE_EVERY_SECONDS", 0)
    _tiny_trainer(tiny_model_path, [progress.callback(tmp_path / "progress.json")], steps=4).train()
    assert [(s["phase"], s["step"], s["max_steps"]) for s in seen] == [
        ("train", 0, 4), ("train", 1, 4), ("train", 2, 4), ("train", 3, 4), ("train", 4, 4), ("done", 4, 4)]
    assert seen[0]["eta_seconds"] is None and seen[1]["eta_seconds"] > 0 and seen[-1]["eta_seconds"] == 0
    assert seen[-1]["loss"] > 0 and seen[-1]["epoch"] == pytest.approx(1.0)

    seen.clear()
    monkeypatch.setattr(progress, "WRITE_EVERY_SECONDS", 3600)  # steps between writes are skipped...
    _tiny_trainer(tiny_model_path, [progress.callback(tmp_path / "progress.json")], steps=4).train()
    assert [(s["phase"], s["step"]) for s in seen] == [("train", 0), ("done", 4)]  # ...start and end are not

    seen.clear()
    monkeypatch.delenv(progress.PROGRESS_FILE_ENV, raising=False)
    _tiny_trainer(tiny_model_path, [progress.callback()], steps=2).train()  # in Jupyter: no file
    assert seen == []


def test_the_runner_line_shows_the_side_file(tmp_path):
    from ftnb.runner import _CellTracker

    progress.write_progress(tmp_path / "progress.json", {"phase": "train", "step": 40, "max_steps": 174,
                                                         "loss": 0.52, "eta_seconds": 370})
    tracker = _CellTracker("toy", tmp_path / "progress.json", show=True)
    code = [nbformat.v4.new_code_cell("1"), nbformat.v4.new_markdown_cell("x"), nbformat.v4.new_code_cell("2")]
    tracker.notebook_started(notebook=nbformat.v4.new_notebook(cells=code))
    tracker.cell_started(cell=code[0], cell_index=0)
    try:
        for _ in range(50):  # the line is polled about once a second
            if tracker.bar.postfix:
                break
            time.sleep(0.2)
        assert (tracker.bar.n, tracker.bar.total) == (1, 2)
        assert tracker.bar.postfix == "train step 40/174 · loss 0.520 · ETA 6m"
    finally:
        tracker.close()


TRAINING_CELL = """\
from datasets import Dataset
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
from ftnb import progress
model = AutoModelForCausalLM.from_pretrained(model_path)
rows = Dataset.from_dict({"input_ids": [[1, 2, 3, 4]] * 8, "labels": [[1, 2, 3, 4]] * 8})
args = TrainingArguments(output_dir=f"{output_dir}/checkpoints", max_steps=steps, per_device_train_batch_size=2,
                         logging_steps=1, report_to="none", use_cpu=True, save_strategy="no")
trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[progress.callback()])
print(sorted(type(c).__name__ for c in trainer.callback_handler.callbacks))
trainer.train();
"""


def test_a_batch_run_reports_progress_in_the_side_file_not_the_notebook(tiny_model_path, tmp_path):
    """Worth its ~15 s: the only test of the whole path, from the runner's environment variable
    through the kernel to the Trainer, and of what the saved notebook keeps."""
    params = nbformat.v4.new_code_cell(f"model_path = {tiny_model_path!r}\nsteps = 12\noutput_dir = 'out'")
    params.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=[params, nbformat.v4.new_code_cell(TRAINING_CELL)], metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    notebook = tmp_path / "train.ipynb"
    nbformat.write(nb, notebook)
    result = run_notebook(notebook, runs_root=tmp_path / "runs", progress=False)
    state = json.loads((result.run_dir / "progress.json").read_text())
    assert (state["phase"], state["step"], state["max_steps"]) == ("done", 12, 12)
    outputs = nbformat.read(result.output_notebook, as_version=4).cells[-1].outputs
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "NotebookProgressCallback" in text  # the Trainer's own display, as a Jupyter user sees it
    assert "\r" not in text and text.count("\n") < 5  # no console progress bar redrawn into the notebook
    bars = [o for o in outputs if "<progress" in o.get("data", {}).get("text/html", "")]
    assert len(bars) == 1 and "[12/12" in bars[0]["data"]["text/html"]  # one bar, updated in place


@pytest.mark.parametrize("stem", RECIPES_THAT_TRAIN)
def test_recipes_show_the_trainers_bar_and_report_to_the_runner(stem):
    cells = [c.source for c in nbformat.read(ROOT / "notebooks" / f"{stem}.ipynb", as_version=4).cells
             if c.cell_type == "code"]
    assert not any("disable_tqdm=True" in source for source in cells), "the bar is what Jupyter users watch"
    trainers = [len(re.findall(r"=\s*[\w.]*Trainer\(", source)) for source in cells]
    assert sum(trainers) > 0
    assert trainers == [source.count("progress.callback()") for source in cells]
