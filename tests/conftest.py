"""Shared test set-up: offline, few threads, a cached tiny model."""
import os

# Before anything imports huggingface_hub / bitsandbytes: no network (bnb otherwise tries to
# fetch a CPU kernel from the hub), deterministic single-process behaviour.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def _share_the_cores_between_workers() -> None:
    """Under `pytest -n N` (pytest-xdist, as `make test` runs), worker k keeps the k-th of N shares of the
    cores (ftnb.runner.core_shares). The notebooks and scripts set torch's threads to the cores they may
    use (ftnb.env.use_all_cores) and child processes inherit the set, so N workers never run more threads
    than there are cores: oversubscribed, OpenMP's spinning threads slow every worker down."""
    from ftnb.runner import core_shares  # no torch import: its thread pool is sized after the pinning

    worker, workers = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not (worker and workers):
        return
    share = core_shares(int(workers))[int(worker.removeprefix("gw"))]
    if share:  # None where the OS cannot pin processes
        os.sched_setaffinity(0, share)


_share_the_cores_between_workers()


@pytest.fixture(scope="session")
def smoke_metrics():
    """Run a notebook's smoke preset with `parameters` into `output_dir` and return its metrics.json; a
    failing cell fails the test with the cell's error (no traceback of the runner itself).

    Usage: metrics = smoke_metrics("01_ticket_classification.ipynb", {"model": "tiny-llama-test"}, tmp_path)
    """
    from pathlib import Path

    from ftnb.runner import NotebookFailed, run_notebook

    notebooks = Path(__file__).parent.parent / "notebooks"

    def run(notebook: str, parameters: dict, output_dir: Path) -> dict:
        try:
            result = run_notebook(notebooks / notebook, "smoke", parameters, output_dir=output_dir, progress=False,
                                  cell_timeout=600)
        except NotebookFailed as e:
            pytest.fail(str(e), pytrace=False)
        return result.metrics

    return run


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from ftnb.models import resolve

    return resolve("tiny-llama-test")


def pytest_collection_modifyitems(items: list) -> None:
    """Under `pytest -n N --dist loadgroup`: a module's tests share its module fixtures (models trained
    once), so each module runs on one worker; the notebook runs, independent and the longest, spread out."""
    for item in items:
        module = item.module.__name__
        if module != "test_notebooks":
            item.add_marker(pytest.mark.xdist_group(module))
