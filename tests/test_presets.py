"""Every preset of every notebook runs where it says: its names are parameters of the notebook,
its values have the parameters' types, its row limits fit the data they limit, and the `t4` and
`gpu` presets fit their cards by ftnb.estimate. Reads configs, data files and the presets only
(no model is loaded), so it takes seconds. The GPU check script itself gets a dry run at the end."""
import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ftnb.data import REPO_ROOT, subset
from ftnb.estimate import GIB, GPUS
from ftnb.runner import NOTEBOOKS_DIR, PRESET_NAMES, ParameterError, presets_for, typed_parameters

NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("[0-9]*.ipynb"))
CASES = [pytest.param(nb, preset, id=f"{nb.stem}-{preset}") for nb in NOTEBOOKS for preset in presets_for(nb)]
GPU_CHECK = REPO_ROOT / "benchmarks" / "gpu_check.py"
# The card each GPU preset is for, and the share of its memory a prediction may use: the estimator
# is validated to about 15% (benchmarks/README.md), so 85% leaves room for that error.
CARDS = {"t4": "T4 16 GB", "gpu": "L4 24 GB"}
MARGIN = 0.85
HALF = {"t4": "float16", "gpu": "bfloat16"}  # a T4 has no native bf16 (ftnb.env.pick_dtype)


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", GPU_CHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gpu_record() -> dict:
    """benchmarks/gpu_check_t4.json: the last GPU check's record."""
    return json.loads((REPO_ROOT / "benchmarks" / "gpu_check_t4.json").read_text())


def _effective(notebook: Path, preset: str) -> dict:
    """The values the notebook runs with: its defaults, updated by the preset."""
    return {**{name: p.default for name, p in typed_parameters(notebook).items()}, **presets_for(notebook)[preset]}


def _rows(data_dir: str, split: str) -> list[dict]:
    path = REPO_ROOT / "data" / data_dir / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _domain_rows(p: dict, split: str) -> list[dict]:
    rows = _rows(p["data_dir"], split)
    domains = p["domains"] or sorted({r["domain"] for r in _rows(p["data_dir"], "train")})
    return [r for r in rows if r["domain"] in domains]


def _per_domain_test_rows(p: dict) -> int:
    """Test rows of the smallest domain, after test_limit's stratified subset (02's gen_rows)."""
    from datasets import Dataset

    test = subset(Dataset.from_list(_domain_rows(p, "test")), p["test_limit"], p["seed"], stratify="domain")
    counts: dict[str, int] = {}
    for domain in test["domain"]:
        counts[domain] = counts.get(domain, 0) + 1
    return min(counts.values())


def _per_domain_ood_rows(p: dict) -> int:
    """Out-of-distribution rows of the smallest domain trained on (02's ood_rows, per domain); 0 when skipped."""
    if not p["ood_dir"]:
        return 0
    domains = {r["domain"] for r in _domain_rows(p, "train")}
    return min(n for domain, n in _per_domain(_rows(p["ood_dir"], "test")).items() if domain in domains)


def _tickets(p: dict, split: str) -> int:
    return len(_rows(p["data_dir"], split))


# Every row-limit parameter of every notebook -> the number of rows it selects from, given the
# effective parameters; `zero` says whether 0 means "all rows" (else a limit must be >= 1).
ROW_LIMITS = {
    "01_ticket_classification": {
        "train_limit": (lambda p: _tickets(p, "train"), True),
        "eval_limit": (lambda p: min(_tickets(p, "validation"), _tickets(p, "test")), True),  # both splits
        "zero_shot_limit": (lambda p: p["eval_limit"] or _tickets(p, "test"), True),  # within the test subset
        "ood_limit": (lambda p: _tickets({"data_dir": p["ood_dir"]}, "test") if p["ood_dir"] else 0, True),
    },
    "02_domain_generation": {
        "train_limit": (lambda p: len(_domain_rows(p, "train")), True),
        "eval_limit": (lambda p: len(_domain_rows(p, "validation")), True),
        "test_limit": (lambda p: len(_domain_rows(p, "test")), True),
        "gen_limit": (_per_domain_test_rows, False),  # per domain, sliced from the test subset
        "ood_limit": (_per_domain_ood_rows, True),  # per domain
    },
    "03_quantization": {
        "eval_rows": (lambda p: len(_rows("domains", "validation")), False),
        "ticket_rows": (lambda p: len(_rows("tickets", "validation")), False),
    },
    "05_lora_from_scratch": {
        "train_limit": (lambda p: _tickets(p, "train"), True),
        "eval_limit": (lambda p: min(_tickets(p, "validation"), _tickets(p, "test")), True),  # both splits
    },
    "06_multitask_adapters": {
        "train_limit": (lambda p: len(_rows("tickets", "train")), True),
        "eval_limit": (lambda p: len(_rows("tickets", "test")), True),
        "domain_train_limit": (lambda p: min(_per_domain(_rows("domains", "train")).values()), False),  # per domain
    },
}


def _per_domain(rows: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["domain"]] = counts.get(row["domain"], 0) + 1
    return counts


def _is_row_limit(name: str) -> bool:
    return name.endswith(("_limit", "_rows"))


def test_every_notebook_has_every_preset():
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOKS_DIR}"
    for notebook in NOTEBOOKS:  # and may have more, such as 01's `sweep`
        assert set(PRESET_NAMES) <= set(presets_for(notebook)), notebook.name


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda nb: nb.stem)
def test_every_row_limit_is_mapped_to_its_data(notebook):
    """A new *_limit / *_rows parameter must say here which data it limits."""
    limits = {name for name in typed_parameters(notebook) if _is_row_limit(name)}
    assert limits == set(ROW_LIMITS.get(notebook.stem, {})), notebook.name


@pytest.mark.parametrize("notebook, preset", CASES)
def test_preset_names_and_types_match_the_notebook(notebook, preset):
    declared = typed_parameters(notebook)
    for name, value in presets_for(notebook)[preset].items():
        assert name in declared, f"{notebook.name} preset {preset}: no parameter {name}"
        try:
            declared[name].check(value, f"preset {preset}")
        except ParameterError as e:
            pytest.fail(str(e))
        default = declared[name].default
        if isinstance(value, list) and isinstance(default, list) and default:
            kinds = {type(item) for item in default}
            assert all(type(item) in kinds for item in value), f"{notebook.name} {preset}: {name} = {value}"


@pytest.mark.parametrize("notebook, preset", CASES)
def test_row_limits_fit_the_data(notebook, preset):
    params = _effective(notebook, preset)
    for name, (available, zero_means_all) in ROW_LIMITS.get(notebook.stem, {}).items():
        limit, rows = params[name], available(params)
        assert limit >= (0 if zero_means_all else 1), f"{notebook.name} preset {preset}: {name} = {limit}"
        assert limit <= rows, f"{notebook.name} preset {preset}: {name} = {limit}, but the data has {rows} rows"


@pytest.mark.parametrize("notebook, preset", [c for c in CASES if c.values[1] in CARDS])
def test_gpu_presets_fit_their_card(notebook, preset):
    """ftnb.estimate's prediction for the notebook's memory-heavy work (training for 00, 01, 02
    and every setting of 04's sweep; every format's evaluation for 03) stays under MARGIN of the card."""
    estimates = _gpu_check().notebook_estimates(notebook.stem, _effective(notebook, preset), "smollm2-135m-instruct",
                                                HALF[preset])
    assert estimates, notebook.name
    budget = MARGIN * GPUS[CARDS[preset]]
    for phase, estimate in estimates.items():
        assert estimate.total_bytes < budget, (
            f"{notebook.name} preset {preset}, {phase}: {estimate.total_bytes / GIB:.2f} GiB predicted, "
            f"more than {MARGIN:.0%} of {CARDS[preset]} ({budget / GIB:.2f} GiB)")


def test_gpu_check_reads_parameters_as_papermill_does():
    """The GPU machine has no papermill: the script parses the parameters cell itself."""
    gpu_check = _gpu_check()
    for notebook in NOTEBOOKS:
        assert gpu_check.notebook_defaults(notebook) == {n: p.default for n, p in typed_parameters(notebook).items()}


def test_gpu_check_token_lengths_come_from_the_data():
    from ftnb.models import load_tokenizer

    lengths = _gpu_check().token_lengths(load_tokenizer("tiny-llama-test"))
    assert 100 < lengths["zero_shot_prefix"] < 2000  # eight label definitions
    assert 20 < lengths["ticket"] < 1000 and 20 < lengths["domain_prompt"] < 1000
    assert lengths["chat_prompt"] < lengths["domain_prompt"]


def test_gpu_check_notebook_peak_is_the_largest_phase():
    """Each phase's probe resets CUDA's peak counters: the notebook's peak must come from its phases,
    not from the counters left after the last phase."""
    phases = [{"phase": "load", "peak_allocated_mib": 300.0, "peak_reserved_mib": 400.0},
              {"phase": "train", "peak_allocated_mib": 900.04, "peak_reserved_mib": 1200.0},
              {"phase": "cpu only", "peak_rss_mib": 5000.0},
              {"phase": "chat", "peak_allocated_mib": 250.0, "peak_reserved_mib": 1200.0}]
    assert _gpu_check().notebook_peaks(phases, 250.0, 1200.0) == {"peak_allocated_mib": 900.0,
                                                                  "peak_reserved_mib": 1200.0}
    assert _gpu_check().notebook_peaks([], 12.34, 56.0) == {"peak_allocated_mib": 12.3, "peak_reserved_mib": 56.0}


def test_recorded_gpu_check_fits_a_t4():
    """benchmarks/gpu_check_t4.json, the last GPU run: every notebook it holds completed, under the
    T4 cap it ran with, with its peak the largest of its phases."""
    record = _gpu_record()
    cap_mib = record["memory_cap_gib"] * 1024
    for notebook in record["notebooks"]:
        assert notebook["status"] == "completed", (notebook["notebook"], notebook.get("error"))
        phase_peaks = [phase["peak_allocated_mib"] for phase in notebook["phases"]]
        assert notebook["peak_allocated_mib"] == max(phase_peaks) < notebook["peak_reserved_mib"] <= cap_mib


def test_estimate_matches_the_recorded_gpu_evaluation_phases():
    """The estimator against what the GPU check measured (benchmarks/gpu_check_t4.json): 03's formats
    and 02's evaluations, each led by a perplexity batch with every position scored, within 10%."""
    from ftnb.estimate import MIB
    from ftnb.models import load_tokenizer

    gpu_check = _gpu_check()
    record = {nb["notebook"]: nb for nb in _gpu_record()["notebooks"]}
    lengths = gpu_check.token_lengths(load_tokenizer("smollm2-135m-instruct"))
    checked = 0
    for notebook in ("02_domain_generation", "03_quantization"):
        estimates = gpu_check.notebook_estimates(notebook, record[notebook]["parameters"], "smollm2-135m-instruct",
                                                 "float16", lengths)
        for phase in record[notebook]["phases"]:
            name = "evaluation" if phase["phase"].endswith("evaluate") else phase["phase"].split(":")[0]
            if name in estimates:  # 02's training phase is named "QLoRA SFT": not compared here
                predicted = estimates[name].allocated_bytes / MIB
                assert abs(predicted / phase["peak_allocated_mib"] - 1) < 0.10, (notebook, phase, predicted)
                checked += 1
    assert checked == 2 + 6  # 02's evaluation before and after training, 03's six formats


def test_notebook_03_clamps_a_row_limit_beyond_the_data(capsys):
    """03's `first_rows` (its set-up cell), run on a stand-in split: a limit beyond the data uses
    every row and says so; a limit below 1 is an error naming the parameter."""
    cells = json.loads((NOTEBOOKS_DIR / "03_quantization.ipynb").read_text())["cells"]
    source = next("".join(c["source"]) for c in cells if "def first_rows" in "".join(c["source"]))
    function = next(node for node in ast.parse(source).body
                    if isinstance(node, ast.FunctionDef) and node.name == "first_rows")
    namespace: dict = {}
    exec(compile(ast.Module([function], []), "03_quantization", "exec"), namespace)
    from datasets import Dataset

    split = Dataset.from_list([{"x": i} for i in range(5)])
    assert len(namespace["first_rows"](split, 3, "eval_rows")) == 3
    assert capsys.readouterr().out == ""
    assert namespace["first_rows"](split, 9, "eval_rows")["x"] == [0, 1, 2, 3, 4]
    assert "eval_rows=9" in capsys.readouterr().out
    with pytest.raises(ValueError, match="eval_rows"):
        namespace["first_rows"](split, 0, "eval_rows")


def test_gpu_check_dry_run_writes_a_record_per_notebook(tmp_path):
    """The GPU check needs a GPU machine; this dry run (tiny model, CPU, one training
    step per notebook, about a minute on 2 busy cores) is what shows its workloads start and its
    JSON is written before device time is spent on it."""
    env = {**os.environ, "OUT": str(tmp_path)}
    done = subprocess.run([sys.executable, str(GPU_CHECK), "--dry-run"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check_dry_run.json").read_text())
    rows = {row["notebook"]: row for row in result["notebooks"]}
    assert set(rows) == {nb.stem for nb in NOTEBOOKS}
    for name, row in rows.items():
        assert row["status"] == "completed", f"{name}: {row.get('error')}\n{row.get('traceback', '')}"
        assert row["phases"] and all(phase["peak_rss_mib"] > 0 for phase in row["phases"]), name
        assert row["predicted_total_mib"] > 0, name
