"""data/domains: enough rows per domain, schema-valid splits, every reference answer in its house
format, consistent instructions and lengths, and no test input that near-duplicates a train input."""
from collections import Counter

import pytest

from ftnb.data import load, near_duplicates, read_labels
from ftnb.tasks import sft
from ftnb.tasks.formats import format_adherence, read_formats

DOMAINS = list(read_labels("domains")["domain"])
HOUSE = read_formats("domains")

INSTRUCTIONS = {
    "legal": "Explain this contract clause in plain English.",
    "medical": "Explain this clinical note to the patient.",
    "technical": "Diagnose this error and suggest a fix.",
}


@pytest.fixture(scope="module")
def ds():
    return load("domains", schema=sft.SCHEMA)  # schema-checked: fields, types, domain labels, unique ids


@pytest.fixture(scope="module")
def rows(ds):
    return [row for split in ds.values() for row in split]


def test_at_least_400_rows_per_domain(rows):
    counts = Counter(r["domain"] for r in rows)
    assert set(counts) == set(DOMAINS)
    assert all(n >= 400 for n in counts.values()), counts


def test_splits_are_stratified(ds):
    for split in ds.values():
        counts = Counter(split["domain"])
        assert set(counts) == set(DOMAINS)
    share = len(ds["test"]) / sum(len(s) for s in ds.values())
    assert 0.12 < share < 0.18


def test_every_reference_output_follows_the_house_format(rows):
    failures = [(r["id"], [k for k, v in res.rules.items() if not v])
                for r in rows if not (res := format_adherence(r["output"], HOUSE[r["domain"]])).ok]
    assert not failures, failures[:10]


def test_every_domain_has_a_house_format():
    assert list(HOUSE) == DOMAINS


def test_instruction_matches_domain(rows):
    wrong = [r["id"] for r in rows if r["instruction"] != INSTRUCTIONS[r["domain"]]]
    assert not wrong, wrong[:10]


def test_lengths_within_the_spec(rows):
    """Inputs 15-90 words, outputs 45-120 words (whitespace-separated)."""
    out_of_range = [(r["id"], len(r["input"].split()), len(r["output"].split())) for r in rows
                    if not (15 <= len(r["input"].split()) <= 90 and 45 <= len(r["output"].split()) <= 120)]
    assert not out_of_range, out_of_range[:10]


def test_no_test_input_near_duplicates_a_train_input(ds):
    pairs = near_duplicates(list(ds["test"]["input"]), list(ds["train"]["input"]), threshold=0.8)
    assert not pairs, [(ds["test"][i]["id"], ds["train"][j]["id"], round(s, 2)) for i, j, s in pairs[:5]]
