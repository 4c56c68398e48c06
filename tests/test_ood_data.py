"""The out-of-distribution evaluation sets (data/tickets_ood, data/domains_ood) are what their
datasheets say: loadable with the training sets' labels, balanced, rebuilt from their sources,
written apart from the training data (no near-copy, another company, other channels, lengths and
languages) and, for domains, with reference answers in the house format. All checks are on
files, so the whole module takes a few seconds."""
import json
import re
from collections import Counter

import pytest

from ftnb.data import Schema, data_dir, load, near_duplicates, read_jsonl, read_labels
from ftnb.tasks import sft
from ftnb.tasks.formats import format_adherence, read_formats

TICKET_SCHEMA = Schema.of("id", "subject", "body", "channel", "language")
CHANNELS = {"email", "chat", "social_dm", "voicemail", "web_form", "app_review"}
OTHER_LANGUAGES = {"es", "de", "fr", "pt"}
# An OOD row this similar to a training row (token Jaccard) would be a paraphrase, not new text.
MAX_JACCARD_WITH_TRAINING = 0.5


@pytest.fixture(scope="module")
def tickets():
    return load("tickets_ood", schema=TICKET_SCHEMA, splits=("test",))["test"]  # + category, priority


@pytest.fixture(scope="module")
def domains():
    return load("domains_ood", schema=sft.SCHEMA, splits=("test",))["test"]


def _all_rows(name: str) -> list[dict]:
    return [row for split in load(name).values() for row in split]


def _words(row: dict) -> int:
    return len((row["subject"] + " " + row["body"]).split())


@pytest.mark.parametrize("name, training", [("tickets_ood", "tickets"), ("domains_ood", "domains")])
def test_labels_are_the_training_sets_labels(name, training):
    """Same categories and definitions, in the same order (the order fixes the label ids)."""
    assert read_labels(name) == read_labels(training)


def test_fifty_tickets_per_category(tickets):
    counts = Counter(tickets["category"])
    assert list(counts) and set(counts) == set(read_labels("tickets")["category"])
    assert set(counts.values()) == {50}, counts


def test_fifty_inputs_per_domain(domains):
    counts = Counter(domains["domain"])
    assert set(counts) == set(read_labels("domains")["domain"])
    assert set(counts.values()) == {50}, counts


@pytest.mark.parametrize("name, fields", [("tickets_ood", ("subject", "body", "channel", "language")),
                                          ("domains_ood", ("instruction", "input", "output", "genre", "language"))])
def test_test_file_is_the_sources_numbered_in_order(name, fields):
    """test.jsonl is rebuilt by data/make_eval_set.py; an edit to it alone would be lost."""
    folder = data_dir() / name
    schema = Schema.of(*fields).with_labels(read_labels(folder))
    sources = [row for f in sorted((folder / "source").glob("*.jsonl")) for row in read_jsonl(f, schema)]
    test = [json.loads(line) for line in (folder / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [{k: v for k, v in row.items() if k != "id"} for row in test] == sources


@pytest.mark.parametrize("name, training", [("tickets_ood", "tickets"), ("domains_ood", "domains")])
def test_ids_unique_and_apart_from_training_ids(name, training):
    ids = load(name, splits=("test",))["test"]["id"]
    assert len(ids) == len(set(ids))
    assert not set(ids) & {row["id"] for row in _all_rows(training)}


def test_no_ticket_body_is_a_near_copy_of_a_training_body(tickets):
    training = [row["body"] for row in _all_rows("tickets")]
    pairs = near_duplicates(tickets["body"], training, threshold=MAX_JACCARD_WITH_TRAINING)
    assert not pairs, [(tickets[i]["id"], training[j][:60], round(s, 2)) for i, j, s in pairs[:5]]


def test_no_domain_input_is_a_near_copy_of_a_training_input(domains):
    training = [row["input"] for row in _all_rows("domains")]
    pairs = near_duplicates(domains["input"], training, threshold=MAX_JACCARD_WITH_TRAINING)
    assert not pairs, [(domains[i]["id"], training[j][:60], round(s, 2)) for i, j, s in pairs[:5]]


def test_tickets_come_from_another_company(tickets):
    """Nothing of Brightdesk: its name or its order numbers (BD-48213)."""
    brightdesk = re.compile(r"brightdesk|\bBD-\d{5}\b", re.IGNORECASE)
    leaks = [r["id"] for r in tickets if brightdesk.search(r["subject"] + " " + r["body"])]
    assert not leaks, leaks


def test_channel_and_language_shares(tickets):
    """The shares the datasheet states: six channels, each at least 5% and chat plus email at
    least 40%; 5-10% of tickets in other languages, each of the four present in every category."""
    channels = Counter(tickets["channel"])
    assert set(channels) == CHANNELS, channels
    assert min(channels.values()) >= 0.05 * len(tickets), channels
    assert channels["chat"] + channels["email"] >= 0.40 * len(tickets), channels
    languages = Counter(tickets["language"])
    assert set(languages) == {"en"} | OTHER_LANGUAGES, languages
    assert 0.05 <= 1 - languages["en"] / len(tickets) <= 0.10, languages
    for category in set(tickets["category"]):
        present = {r["language"] for r in tickets if r["category"] == category}
        assert OTHER_LANGUAGES <= present, (category, present)


def test_ticket_lengths_reach_past_the_training_data(tickets):
    """One-liners (20 words or fewer) and threads longer than any training ticket both occur."""
    longest_training = max(map(_words, _all_rows("tickets")))
    lengths = [_words(r) for r in tickets]
    assert sum(n > longest_training for n in lengths) >= 10, (longest_training, max(lengths))
    assert sum(n <= 20 for n in lengths) >= 10, sorted(lengths)[:10]


def test_domain_reference_answers_follow_the_house_format(domains):
    """The references serve perplexity and ROUGE-L, so they must be in the format being taught."""
    house = read_formats("domains")
    failures = [(r["id"], [k for k, ok in res.rules.items() if not ok])
                for r in domains if not (res := format_adherence(r["output"], house[r["domain"]])).ok]
    assert not failures, failures[:10]


def test_domain_instructions_are_the_training_instructions(domains):
    """Only the inputs move out of distribution; the task each domain asks for stays the same."""
    trained = {(r["domain"], r["instruction"]) for r in _all_rows("domains")}
    assert {(r["domain"], r["instruction"]) for r in domains} <= trained


def test_domain_inputs_are_varied(domains):
    """Each input names its document type, specialty or stack (`genre`); no domain repeats itself."""
    for domain in set(domains["domain"]):
        genres = [r["genre"] for r in domains if r["domain"] == domain]
        assert len(set(genres)) >= 0.8 * len(genres), (domain, Counter(genres).most_common(3))
