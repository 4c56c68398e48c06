import json

import pytest

from ftnb.data import DataError, Schema, dataset_folder, load, read_jsonl, read_labels

SCHEMA = Schema({"id": str, "text": str, "label": ("a", "b")})


def _write(folder, rows_by_split):
    folder.mkdir(parents=True, exist_ok=True)
    for split, lines in rows_by_split.items():
        (folder / f"{split}.jsonl").write_text("\n".join(
            line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")


GOOD = {"train": [{"id": "1", "text": "x", "label": "a"}, {"id": "2", "text": "y", "label": "b"}],
        "validation": [{"id": "3", "text": "z", "label": "a"}],
        "test": [{"id": "4", "text": "w", "label": "b"}]}


def test_load_good_folder(tmp_path):
    _write(tmp_path / "toy", GOOD)
    ds = load(tmp_path / "toy", schema=SCHEMA)
    assert {k: len(v) for k, v in ds.items()} == {"train": 2, "validation": 1, "test": 1}


@pytest.mark.parametrize("bad_line, expected", [
    ('{"id": "9", "text": "oops"', r"train.jsonl, line 2: not valid JSON"),
    ({"id": "9", "label": "a"}, r"line 2: missing field 'text'"),
    ({"id": "9", "text": "t", "label": "c"}, r"line 2: field 'label' has unknown label 'c'; allowed: a, b"),
    ({"id": 9, "text": "t", "label": "a"}, r"line 2: field 'id' should be str"),
    ('["not", "an", "object"]', r"line 2: expected a JSON object"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, bad_line, expected):
    rows = dict(GOOD, train=[GOOD["train"][0], bad_line])
    _write(tmp_path / "toy", rows)
    with pytest.raises(DataError, match=expected):
        load(tmp_path / "toy", schema=SCHEMA)


def test_duplicate_ids_across_splits(tmp_path):
    _write(tmp_path / "toy", dict(GOOD, test=[{"id": "1", "text": "dup", "label": "a"}]))
    with pytest.raises(DataError, match="id '1' appears more than once"):
        load(tmp_path / "toy", schema=SCHEMA)


def test_missing_split_and_unknown_folder(tmp_path):
    _write(tmp_path / "toy", {"train": GOOD["train"]})
    with pytest.raises(DataError, match="missing split"):
        load(tmp_path / "toy", schema=SCHEMA)
    with pytest.raises(DataError, match=r"no dataset folder 'tickts'.*known: .*tickets"):
        load("tickts")


def test_labels_json_sets_the_allowed_labels_without_code(tmp_path):
    rows = {split: [{k: v for k, v in r.items() if k != "label"} | {"intent": "greet"} for r in part]
            for split, part in GOOD.items()}
    rows["test"] = [dict(rows["test"][0], intent="book")]
    _write(tmp_path / "toy", rows)
    assert load(tmp_path / "toy", schema=Schema.of("text"))["test"]["intent"] == ["book"]  # no labels.json
    (tmp_path / "toy" / "labels.json").write_text(json.dumps({"intent": {"greet": "says hello", "bye": ""}}))
    assert list(read_labels(tmp_path / "toy")["intent"]) == ["greet", "bye"]
    with pytest.raises(DataError, match=r"test.jsonl, line 1: field 'intent' has unknown label 'book'; allowed: greet, bye"):
        load(tmp_path / "toy")


@pytest.mark.parametrize("content, message", [
    ("{", "not valid JSON"),
    ('["greet"]', "expected"),
    ('{"intent": ["greet", "bye"]}', "field 'intent' should map each label to its definition"),
    ('{"intent": {}}', "field 'intent' should map"),
])
def test_bad_labels_file_says_what_to_fix(tmp_path, content, message):
    _write(tmp_path / "toy", GOOD)
    (tmp_path / "toy" / "labels.json").write_text(content)
    with pytest.raises(DataError, match=message):
        load(tmp_path / "toy", schema=SCHEMA)


def test_blank_lines_are_fine_but_empty_files_are_not(tmp_path):
    (tmp_path / "t.jsonl").write_text('\n{"id": "1", "text": "x", "label": "a"}\n\n')
    assert len(read_jsonl(tmp_path / "t.jsonl", SCHEMA)) == 1
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        read_jsonl(tmp_path / "e.jsonl", SCHEMA)


def test_project_datasets_declare_their_labels():
    assert list(read_labels("tickets")) == ["category", "priority"]
    # the order fixes the label ids, hence the classification head's rows: the trained recipe's order
    assert list(read_labels("tickets")["category"]) == ["billing", "refund", "account_access", "technical_issue",
                                                      "shipping", "product_question", "cancellation", "feedback"]
    assert list(read_labels("tickets")["priority"]) == ["low", "normal", "high", "urgent"]
    assert list(read_labels("domains")["domain"]) == ["legal", "medical", "technical"]
    assert dataset_folder("tickets").name == "tickets"
