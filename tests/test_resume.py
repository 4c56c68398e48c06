"""Resume after a disconnect, for real: recipe 01 runs through the runner on tiny-llama-test in fp32, its
kernel is killed with SIGKILL in the second epoch (as a lost Colab runtime or the out-of-memory
killer would), `python -m ftnb run 01 --resume RUN_DIR` continues it from its last checkpoint, and
the result is compared with a run that was never interrupted: the logged training losses, the
evaluations, the final adapter, head and optimizer state, and the saved classifier, bit for bit.
The uninterrupted run goes beside the killed one, each on half the cores (one torch thread each on a
2-core machine, so both must still agree exactly).
The same with an NF4 base and the paged 8-bit AdamW is recipe 08's resume demonstration, which its smoke
test runs and checks (tests/test_notebooks.py: every difference <= 1e-6; measured 0).
Without ftnb.resume.data_order_callback the resumed losses differ from the first logged step after the
resume on (by 0.24 in fp32 here): the Trainer alone does not restore how the resumed epoch was shuffled.
The runner's own checks of --resume (what it refuses, what it keeps) use a toy notebook."""
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch
from safetensors.torch import load_file

from ftnb import resume, runner

NOTEBOOK = "01_ticket_classification"
# 32 tickets, 2 x 2 per optimizer step: 8 steps per epoch, 16 in all; a checkpoint and an evaluation
# every 2 steps, the loss logged every step (steps_per_epoch // 5 = 1); fp32 Adam on an unquantized base:
# on a CPU every operation repeats bit for bit, so the resumed run must too
TINY = {"model": "tiny-llama-test", "train_limit": 32, "batch_size": 2, "grad_accum": 2, "epochs": 2,
        "save_steps": 2, "gradient_checkpointing": False, "baselines": False, "reload_check": False,
        "quantization": "none", "optim": "adamw_torch"}
TOTAL_STEPS, KILL_AFTER_STEP, LOG_EVERY = 16, 10, 1  # killed in the second epoch: the data position spans an epoch


def _start(out: Path, params: dict, *extra: str, cores: set[int] | None) -> subprocess.Popen:
    options = [item for name, value in params.items() for item in ("-p", name, str(value))]
    return runner.start_run(NOTEBOOK, *options, *extra, log=Path(f"{out}.log"), cores=cores)


def _finish(proc: subprocess.Popen, out: Path) -> None:
    proc.wait(timeout=900)  # a tiny run; minutes only on a machine busy with other work
    assert proc.returncode == 0, Path(f"{out}.log").read_text()[-3000:]


def _final_state(out: Path) -> dict:
    """What training ended with: log history, last step's adapter + head, optimizer state, and the
    saved classifier (the best checkpoint's weights)."""
    final = out / "checkpoints" / f"checkpoint-{TOTAL_STEPS}"
    history = json.loads((final / "trainer_state.json").read_text())["log_history"]
    return {"losses": [(h["step"], h["loss"]) for h in history if "loss" in h],
            "evaluations": [(h["step"], h["eval_loss"], h["eval_macro_f1"]) for h in history if "eval_loss" in h],
            "adapter": load_file(final / "adapter_model.safetensors"),
            "optimizer": torch.load(final / "optimizer.pt", weights_only=False)["state"],
            "classifier": load_file(out / "classifier" / "adapter_model.safetensors")}


def _largest_difference(a: dict, b: dict) -> float:
    """The largest absolute difference between two final states (losses, evaluations, every tensor)."""
    assert [s for s, _ in a["losses"]] == [s for s, _ in b["losses"]] and len(a["losses"]) == TOTAL_STEPS // LOG_EVERY
    assert [e[0] for e in a["evaluations"]] == [e[0] for e in b["evaluations"]]
    numbers = [abs(x - y) for (_, x), (_, y) in zip(a["losses"], b["losses"])]
    numbers += [abs(x - y) for ea, eb in zip(a["evaluations"], b["evaluations"]) for x, y in zip(ea[1:], eb[1:])]
    for index, state in a["optimizer"].items():  # Adam's moments are there to compare, for every parameter
        assert any(torch.is_tensor(v) and v.numel() > 1 for v in state.values()), f"no moments for {index}: {sorted(state)}"
    numbers += [resume.largest_difference(a[key], b[key]) for key in ("adapter", "classifier", "optimizer")]
    return max(numbers)


def test_a_killed_run_resumes_to_the_result_of_an_uninterrupted_one(tmp_path):
    killed_cores, reference_cores = runner.core_shares(2)
    out, reference = tmp_path / "killed", tmp_path / "reference"
    left_alone = _start(reference, TINY, "--preset", "smoke", "--output-dir", str(reference), cores=reference_cores)
    killed = _start(out, TINY, "--preset", "smoke", "--output-dir", str(out), cores=killed_cores)
    left = runner.kill_kernel_at_checkpoint(killed, out / "checkpoints", KILL_AFTER_STEP)
    assert killed.returncode == runner.EXIT_CODES["dead_kernel"], Path(f"{out}.log").read_text()[-2000:]
    assert left < TOTAL_STEPS and not (out / "classifier").exists(), "training finished before the kill"
    _finish(_start(out, {}, "--resume", str(out), cores=killed_cores), out)
    _finish(left_alone, reference)

    record = runner.read_run_record(out)
    assert record["status"] == "ok" and record["parameters"]["resume"] is True
    assert record["attempts"][0]["error"]["reason"] == "dead_kernel"
    executed = (out / f"{NOTEBOOK}.ipynb").read_text()
    assert f"resuming from {out / 'checkpoints' / f'checkpoint-{left}'}" in executed
    difference = _largest_difference(_final_state(reference), _final_state(out))
    assert difference == 0.0, f"the resumed run differs by {difference}"


# ---------------------------------------------------------------- the runner's --resume, on a toy notebook
TOY_PARAMETERS = 'steps = 2\nresume = False  # continue\noutput_dir = "out"\n'
TOY_WORK = ("import json, pathlib\n"
            "pathlib.Path(output_dir, 'seen.json').write_text(json.dumps({'steps': steps, 'resume': resume}))\n"
            "assert steps != 13, 'asked to fail'")


def _toy(folder: Path, with_resume: bool = True) -> Path:
    params = nbformat.v4.new_code_cell(TOY_PARAMETERS if with_resume else 'steps = 2\noutput_dir = "out"\n')
    params.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=[params, nbformat.v4.new_code_cell(TOY_WORK)], metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    folder.mkdir(exist_ok=True)
    nbformat.write(nb, folder / "toy.ipynb")
    return folder / "toy.ipynb"


def test_resume_reruns_in_the_same_folder_with_the_recorded_parameters(tmp_path):
    toy = _toy(tmp_path / "notebooks")
    out = tmp_path / "run"
    with pytest.raises(runner.NotebookFailed):
        runner.run_notebook(toy, parameters={"steps": 13}, output_dir=out, progress=False)
    (out / "checkpoint-1").mkdir()  # what the stopped run left must survive the resume
    # a fix between the attempts (here: the notebook no longer fails on 13) is what a resume picks up
    toy.write_text(toy.read_text().replace("assert steps != 13", "assert steps != 14"))
    result = runner.run_notebook(toy, resume=out, progress=False)
    assert json.loads((out / "seen.json").read_text()) == {"steps": 13, "resume": True}
    assert result.run_dir == out.resolve() and (out / "checkpoint-1").is_dir()
    assert (out / "toy.attempt-1.ipynb").exists() and (out / "toy.ipynb").exists()
    record = runner.read_run_record(out)
    assert record["status"] == "ok" and record["overrides"] == {"steps": 13}
    assert [a["error"]["reason"] for a in record["attempts"]] == ["cell_error"]
    assert record["attempts"][0]["executed_notebook"].endswith("toy.attempt-1.ipynb")


def test_resume_refuses_what_it_cannot_continue(tmp_path):
    toy = _toy(tmp_path / "notebooks")
    finished = runner.run_notebook(toy, output_dir=tmp_path / "done", progress=False).run_dir
    with pytest.raises(runner.UsageError, match="finished .*nothing to resume"):
        runner.run_notebook(toy, resume=finished, progress=False)
    with pytest.raises(runner.UsageError, match="leave out --preset, -p"):
        runner.run_notebook(toy, parameters={"steps": 3}, resume=finished, progress=False)
    with pytest.raises(runner.UsageError, match="not a run folder"):
        runner.run_notebook(toy, resume=tmp_path, progress=False)
    other = _toy(tmp_path / "other", with_resume=False)
    with pytest.raises(runner.UsageError, match="no 'resume' parameter"):
        runner.run_notebook(other, resume=finished, progress=False)
    going = tmp_path / "going"
    going.mkdir()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (going / "run.json").write_text(json.dumps({"status": "running", "notebook": "notebooks/toy.ipynb",
                                                    "host": runner.platform.node(), "pid": alive.pid}))
        with pytest.raises(runner.UsageError, match=f"still going \\(process {alive.pid}\\)"):
            runner.run_notebook(toy, resume=going, progress=False)
    finally:
        alive.kill()
        alive.wait()


def test_last_checkpoint_passes_over_one_cut_short(tmp_path):
    for step, complete in ((4, True), (8, True), (12, False)):  # killed while writing checkpoint-12
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert resume.last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-8")
    assert resume.checkpoint_step(resume.last_checkpoint(tmp_path)) == 8
    assert resume.last_checkpoint(tmp_path / "absent") is None


def test_largest_difference_reads_nested_optimizer_states_and_refuses_mismatched_ones():
    moments = {0: {"state1": torch.zeros(4), "absmax1": torch.ones(1)}, 1: {"step": torch.tensor(3.0)}}
    nudged = {0: {"state1": torch.tensor([0.0, 0.0, 0.5, 0.0]), "absmax1": torch.ones(1)}, 1: {"step": torch.tensor(3.0)}}
    assert resume.largest_difference({"state": moments}, {"state": moments}) == 0.0
    assert resume.largest_difference({"state": moments}, {"state": nudged}) == 0.5  # found one level down
    with pytest.raises(ValueError, match="different tensors"):
        resume.largest_difference({"state": moments}, {"state": {0: moments[0]}})
