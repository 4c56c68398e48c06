"""Resume after a disconnect, for real: recipe 01 runs through the runner on tiny-llama-test, its
kernel is killed with SIGKILL in the second epoch (as a lost Colab runtime or the out-of-memory
killer would), `python -m ftnb run 01 --resume RUN_DIR` continues it from its last checkpoint, and
the result is compared with a run that was never interrupted: the logged training losses, the
evaluations, the final adapter, head and optimizer state, and the saved classifier.
Each case is three runs of the notebook at a tiny size; the runs of both cases go two at a time, each
on a core of its own where the OS allows (one torch thread in every run, so fp32 must still agree bit
for bit).
Without ftnb.resume.data_order_callback the resumed losses differ from the first logged step after the
resume on (by 0.24 in fp32 here): the Trainer alone does not restore how the resumed epoch was shuffled.
The runner's own checks of --resume (what it refuses, what it keeps) use a toy notebook."""
import json
import os
import queue
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
import pytest
import torch
from safetensors.torch import load_file

from ftnb import resume, runner

ROOT = Path(__file__).parent.parent
NOTEBOOK = "01_ticket_classification"
# 32 tickets, 2 x 2 per optimizer step: 8 steps per epoch, 16 in all; a checkpoint and an evaluation
# every 2 steps, the loss logged every step (steps_per_epoch // 5 = 1)
TINY = {"model": "tiny-llama-test", "train_limit": 32, "batch_size": 2, "grad_accum": 2, "epochs": 2,
        "save_steps": 2, "gradient_checkpointing": False, "baselines": False, "reload_check": False}
TOTAL_STEPS, KILL_AFTER_STEP, LOG_EVERY = 16, 10, 1  # killed in the second epoch: the data position spans an epoch
# the cores a run may be pinned to (Linux); elsewhere every run keeps all of them
CORES = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [None]


def _start(out: Path, params: dict, *extra: str, core: int | None) -> subprocess.Popen:
    """`python -m ftnb run 01 ...` in the background on one core (its kernel inherits it, and
    ftnb.env gives torch one thread per core), its output in `out`.log (a pipe nobody reads could
    fill up and stall it)."""
    options = [item for name, value in params.items() for item in ("-p", name, str(value))]
    with open(f"{out}.log", "a") as log:  # the child keeps its own copy of the file
        run = subprocess.Popen([sys.executable, "-m", "ftnb", "run", NOTEBOOK, *options, *extra], cwd=ROOT,
                               stdout=log, stderr=subprocess.STDOUT, text=True)
    if core is not None:  # before its kernel starts: the runner imports for a second first
        os.sched_setaffinity(run.pid, {core})
    return run


def _finish(proc: subprocess.Popen, out: Path) -> None:
    proc.wait(timeout=900)  # a tiny run; minutes only on a machine busy with other work
    assert proc.returncode == 0, Path(f"{out}.log").read_text()[-3000:]


def _kill_kernel_after_checkpoint(proc: subprocess.Popen, out: Path, step: int) -> int:
    left = runner.kill_kernel_at_checkpoint(proc, out / "checkpoints", step)
    assert proc.returncode == runner.EXIT_CODES["dead_kernel"], Path(f"{out}.log").read_text()[-2000:]
    assert left < TOTAL_STEPS and not (out / "classifier").exists(), "training finished before the kill"
    return left


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
    for key in ("adapter", "classifier"):
        assert a[key].keys() == b[key].keys()
        numbers += [(a[key][n].float() - b[key][n].float()).abs().max().item() for n in a[key]]
    assert a["optimizer"].keys() == b["optimizer"].keys()
    for index, state in a["optimizer"].items():
        numbers += [(state[k].float() - b["optimizer"][index][k].float()).abs().max().item()
                    for k in state if torch.is_tensor(state[k])]
    return max(numbers)


# how exactly a resumed run must equal an uninterrupted one, by case
CASES = {
    # fp32 on a CPU: every operation repeats bit for bit, so the resumed run must too
    "fp32": ({"quantization": "none", "optim": "adamw_torch"}, 0.0),
    # NF4 base and bitsandbytes' paged 8-bit AdamW (state quantized blockwise): measured exactly 0 too on
    # the 2-core machine; 1e-6 leaves room for bitsandbytes' CPU kernels summing in another order elsewhere
    "nf4 + 8-bit optimizer": ({"quantization": "nf4", "optim": "paged_adamw_8bit"}, 1e-6),
}


def _uninterrupted(out: Path, params: dict, core: int | None) -> Path:
    _finish(_start(out, params, "--preset", "smoke", "--output-dir", str(out), core=core), out)
    return out


def _killed_and_resumed(out: Path, params: dict, core: int | None) -> tuple[Path, int]:
    """The run killed after KILL_AFTER_STEP, then resumed: its folder and the step it resumed from."""
    start = ("--preset", "smoke", "--output-dir", str(out))
    left = _kill_kernel_after_checkpoint(_start(out, params, *start, core=core), out, KILL_AFTER_STEP)
    _finish(_start(out, {}, "--resume", str(out), core=core), out)
    return out, left


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Every case's (killed-and-resumed, uninterrupted) runs as futures, two at a time, each on a core of
    its own: all four keep both cores busy, where one case alone would leave a core idle for a third of it."""
    root = tmp_path_factory.mktemp("resume")
    free_cores: queue.Queue = queue.Queue()
    for core in (CORES[0], CORES[-1]):
        free_cores.put(core)

    def on_a_free_core(job, out: Path, params: dict):
        core = free_cores.get()
        try:
            return job(out, params, core)
        finally:
            free_cores.put(core)

    with ThreadPoolExecutor(max_workers=2) as pool:  # submitted in this order, the two cores finish together
        yield {case: (pool.submit(on_a_free_core, _killed_and_resumed, root / f"case{i}-killed", {**TINY, **params}),
                      pool.submit(on_a_free_core, _uninterrupted, root / f"case{i}-reference", {**TINY, **params}))
               for i, (case, (params, _)) in enumerate(CASES.items())}


@pytest.mark.parametrize("case", CASES)
def test_a_killed_run_resumes_to_the_result_of_an_uninterrupted_one(case, runs):
    killed, uninterrupted = runs[case]
    out, left = killed.result()
    reference = uninterrupted.result()

    record = runner.read_run_record(out)
    assert record["status"] == "ok" and record["parameters"]["resume"] is True
    assert record["attempts"][0]["error"]["reason"] == "dead_kernel"
    executed = (out / f"{NOTEBOOK}.ipynb").read_text()
    assert f"resuming from {out / 'checkpoints' / f'checkpoint-{left}'}" in executed
    difference = _largest_difference(_final_state(reference), _final_state(out))
    assert difference <= CASES[case][1], f"{case}: resumed run differs by {difference}"


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
