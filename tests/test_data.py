import json

import pytest

from ftnb.data import SCHEMAS, DataError, Schema, load, read_jsonl

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


def test_missing_split_and_unknown_schema(tmp_path):
    _write(tmp_path / "toy", {"train": GOOD["train"]})
    with pytest.raises(DataError, match="missing split"):
        load(tmp_path / "toy", schema=SCHEMA)
    with pytest.raises(DataError, match="no schema known"):
        load(tmp_path / "toy")


def test_blank_lines_are_fine_but_empty_files_are_not(tmp_path):
    (tmp_path / "t.jsonl").write_text('\n{"id": "1", "text": "x", "label": "a"}\n\n')
    assert len(read_jsonl(tmp_path / "t.jsonl", SCHEMA)) == 1
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        read_jsonl(tmp_path / "e.jsonl", SCHEMA)


def test_known_schemas():
    assert SCHEMAS["tickets"].labels("category")[0] == "billing"
    assert "medical" in SCHEMAS["domains"].labels("domain")
