"""Bring your own data: notebooks 01 and 02 run on datasets that no ftnb code knows (other labels,
other text fields, other domains, no house format), changed through notebook parameters only.

Each run is the smoke preset cut further (the tiny random Llama, a few rows, a few steps; about a
minute each). They are worth their time because they are the only check that nothing
recipe-specific is left on the code paths the notebooks take: a ticket label, a field name or a
domain hard-coded anywhere makes one of them fail.
"""
import ast
import math
from pathlib import Path

from ftnb.data import read_labels
from ftnb.tasks.formats import read_formats

ROOT = Path(__file__).parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
FAST = {"model": "tiny-llama-test"}  # the data path is under test here, not the model


def _code_strings(path: Path) -> set[str]:
    """The string constants of a module's code, docstrings left out (their examples may name anything)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return {node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings}


def test_the_package_holds_no_recipe_knowledge():
    """The course datasets' labels, domains and house-format labels are data (data/*/labels.json,
    formats.json), so no ftnb module spells one of them out in its code."""
    known = {*read_labels("tickets")["category"], *read_labels("tickets")["priority"],
             *read_labels("domains")["domain"], *(s.label for sections in read_formats("domains").values()
                                                  for s in sections)}
    found = {path.relative_to(ROOT).as_posix(): sorted(known & _code_strings(path))
             for path in sorted((ROOT / "ftnb").rglob("*.py"))}
    assert not {path: words for path, words in found.items() if words}


def test_classification_on_intents_with_other_fields_and_labels(smoke_metrics, tmp_path):
    """01 on restaurant-chat intents: field `text` instead of subject/body, label field `intent`,
    four labels whose order and definitions come from the folder's labels.json."""
    metrics = smoke_metrics("01_ticket_classification.ipynb", {**FAST,
        "data_dir": str(FIXTURES / "byod_intents"), "text_fields": ["text"], "label_field": "intent",
        "max_length": 24, "zero_shot_limit": 4, "encoder_epochs": 1}, tmp_path / "run")
    labels = ["greet", "book_table", "cancel_booking", "opening_hours"]  # labels.json order, not sorted
    assert metrics["label_field"] == "intent" and metrics["labels"] == labels
    assert metrics["n"] == {"train": 16, "validation": 4, "test": 4, "zero_shot": 4}
    # majority, TF-IDF, zero-shot, QLoRA, MiniLM and their ensemble
    assert len(metrics["methods"]) == 6 and any(m.startswith("ensemble") for m in metrics["methods"]), list(metrics["methods"])
    for method, row in metrics["methods"].items():
        assert list(row["per_class"]) == labels, method
        assert sum(c["support"] for c in row["per_class"].values()) == row["n_test"], method
        for key in ("accuracy", "macro_f1", "ece"):
            assert math.isfinite(row[key]) and 0 <= row[key] <= 1, (method, key, row[key])


def test_generation_on_other_domains_without_a_house_format(smoke_metrics, tmp_path):
    """02 on cooking and gardening answers, a folder with no formats.json: format adherence is not
    applicable (null, never 0), while perplexity and ROUGE-L are measured for each domain."""
    metrics = smoke_metrics("02_domain_generation.ipynb", {**FAST,
        "data_dir": str(FIXTURES / "byod_answers"), "train_limit": 4, "test_limit": 2, "eval_limit": 2,
        "max_new_tokens": 6, "max_length": 128}, tmp_path / "run")
    assert metrics["domains"] == ["cooking", "gardening"] and metrics["house_format_domains"] == []
    for stage in ("base", "tuned"):
        assert set(metrics[stage]) == {"cooking", "gardening", "all"}, stage
        for domain, row in metrics[stage].items():
            assert row["format_adherence"] is None, (stage, domain)
            assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1, (stage, domain)
            assert 0 <= row["rougeL"] <= 1, (stage, domain)
        assert metrics[f"{stage}_rules"] == {}
    assert metrics["format_adherence_base"] is None and metrics["format_adherence_tuned"] is None
    assert math.isfinite(metrics["perplexity_reduction"])
