"""Load JSON Lines datasets with a schema check that never drops a row silently.

Usage:
    from ftnb.data import Schema, load, read_labels, token_length_stats
    ds = load("tickets", schema=Schema.of("subject", "body"))  # DatasetDict(train / validation / test)
    ds = load("/path/to/my_folder", schema=Schema.of("text"))  # your own data, same checks
    read_labels("tickets")["category"]                          # {label: definition}, in file order
    token_length_stats(ds["train"], tok, lambda r: r["subject"] + "\\n" + r["body"])

A dataset is a folder (`data/<name>/` or any path) holding `train.jsonl`, `validation.jsonl` and
`test.jsonl`, and optionally `labels.json`: `{label_field: {label: definition}}`, the allowed
labels of each label field. Every line is checked: a malformed line, a missing field, a wrong
type or a label outside labels.json is an error that names the file, the line and the field.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from datasets import Dataset, DatasetDict

SPLITS = ("train", "validation", "test")
REPO_ROOT = Path(__file__).resolve().parent.parent


class DataError(ValueError):
    """A dataset file that does not match its schema."""


@dataclass(frozen=True)
class Schema:
    """Required fields and their type; a field given as a tuple of strings is a label with
    exactly those allowed values.

    Usage: Schema.of("text", "intent"); Schema({"id": str, "label": ("yes", "no")})
    """

    fields: dict[str, type | tuple[str, ...]] = field(default_factory=dict)
    optional: dict[str, type] = field(default_factory=dict)

    @classmethod
    def of(cls, *names: str) -> Schema:
        """Every named field is required and holds a string."""
        return cls(dict.fromkeys(names, str))

    def with_labels(self, labels: dict[str, dict[str, str]]) -> Schema:
        """This schema plus one required label field per entry of `labels` (as read_labels returns)."""
        return Schema({**self.fields, **{name: tuple(defined) for name, defined in labels.items()}}, self.optional)

LABELS_FILE = "labels.json"


def data_dir() -> Path:
    """Where project datasets live: $FTNB_DATA or the repository's data/ folder."""
    return Path(os.environ.get("FTNB_DATA", REPO_ROOT / "data"))


def dataset_folder(name_or_dir: str | Path) -> Path:
    """A dataset folder: `name_or_dir` itself when it is a folder, else data_dir() / name.

    Usage: dataset_folder("tickets"); dataset_folder("/home/me/my_tickets")
    """
    folder = Path(name_or_dir)
    if folder.is_dir():
        return folder
    if (data_dir() / str(name_or_dir)).is_dir():
        return data_dir() / str(name_or_dir)
    known = sorted(p.name for p in data_dir().iterdir() if p.is_dir()) if data_dir().is_dir() else []
    raise DataError(f"no dataset folder '{name_or_dir}': not a folder, and not a name under {data_dir()} "
                    f"(known: {', '.join(known) or 'none'})")


def read_folder_json(name_or_dir: str | Path, filename: str) -> tuple[Path | None, object]:
    """(path, parsed content) of an optional JSON file in a dataset folder; (None, None) when the
    folder has no such file. Invalid JSON is a DataError naming the file and line.

    Usage: path, spec = read_folder_json("domains", "formats.json")
    """
    path = dataset_folder(name_or_dir) / filename
    if not path.exists():
        return None, None
    try:
        return path, json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def read_labels(name_or_dir: str | Path) -> dict[str, dict[str, str]]:
    """The folder's labels.json, {label_field: {label: definition}} in file order (the order
    fixes the label ids); {} when the folder has none. A definition may be "".

    Usage: list(read_labels("tickets")["category"])  -> ['billing', 'refund', ...]
    """
    path, labels = read_folder_json(name_or_dir, LABELS_FILE)
    if path is None:
        return {}
    expected = 'expected {"label_field": {"label": "definition", ...}, ...}'
    if not isinstance(labels, dict):
        raise DataError(f"{path}: {expected}")
    for name, defined in labels.items():
        if not (isinstance(defined, dict) and defined and all(isinstance(v, str) for v in defined.values())):
            raise DataError(f"{path}: field '{name}' should map each label to its definition (a string); {expected}")
    return labels


def _check_row(row: object, schema: Schema, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for name, kind in schema.fields.items():
        if name not in row:
            raise DataError(f"{where}: missing field '{name}' (fields found: {sorted(row)})")
        value = row[name]
        if isinstance(kind, tuple):
            if value not in kind:
                raise DataError(f"{where}: field '{name}' has unknown label {value!r}; "
                                f"allowed: {', '.join(kind)}")
        elif not isinstance(value, kind):
            raise DataError(f"{where}: field '{name}' should be {kind.__name__}, "
                            f"got {type(value).__name__} {value!r:.60}")
    for name, kind in schema.optional.items():
        if name in row and not isinstance(row[name], kind):
            raise DataError(f"{where}: field '{name}' should be {kind.__name__}")
    return row


def read_jsonl(path: str | Path, schema: Schema) -> list[dict]:
    """Read and check one JSON Lines file. Blank lines are allowed; nothing else is skipped."""
    path = Path(path)
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            rows.append(_check_row(row, schema, where))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def load(name_or_dir: str | Path, schema: Schema | None = None,
         splits: tuple[str, ...] = SPLITS) -> DatasetDict:
    """Load `data/<name>/` (or any folder of <split>.jsonl files) as a checked DatasetDict.

    `schema` names the fields your code needs; the label fields of the folder's labels.json are
    added to it, so every label is checked against the allowed ones. Ids, where rows have them,
    must be unique across splits.

    Usage: load("domains", schema=Schema.of("id", "domain", "instruction", "input", "output"))
    """
    folder = dataset_folder(name_or_dir)
    schema = (schema or Schema()).with_labels(read_labels(folder))
    missing = [s for s in splits if not (folder / f"{s}.jsonl").exists()]
    if missing:
        raise DataError(f"{folder}: missing split file(s) {', '.join(m + '.jsonl' for m in missing)}")
    parts = {s: read_jsonl(folder / f"{s}.jsonl", schema) for s in splits}
    ids = [r["id"] for rows in parts.values() for r in rows if "id" in r]
    if len(ids) != len(set(ids)):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"{folder}: id {dup!r} appears more than once across splits")
    return DatasetDict({s: Dataset.from_list(rows) for s, rows in parts.items()})


def token_length_stats(dataset: Dataset, tokenizer, text: Callable[[dict], str]) -> dict[str, float]:
    """Token counts of `text(row)` over a split: mean, median, p90, p99, max.

    Usage: token_length_stats(ds["train"], tok, lambda r: r["body"])
    """
    lengths = np.array([len(tokenizer(text(row))["input_ids"]) for row in dataset])
    return {"count": int(len(lengths)), "mean": float(lengths.mean()),
            "median": float(np.median(lengths)), "p90": float(np.percentile(lengths, 90)),
            "p99": float(np.percentile(lengths, 99)), "max": int(lengths.max())}


def subset(split: Dataset, limit: int | None, seed: int = 0, stratify: str | None = None) -> Dataset:
    """A shuffled subset of at most `limit` rows (all rows when limit is None or 0). With
    `stratify`, labels take turns, so a small smoke-test subset still holds every class."""
    if not limit or limit >= len(split):
        return split
    shuffled = split.shuffle(seed=seed)
    if stratify is None:
        return shuffled.select(range(limit))
    queues: dict = {}
    for i, label in enumerate(shuffled[stratify]):
        queues.setdefault(label, []).append(i)
    order = [q[k] for k in range(max(map(len, queues.values()))) for q in queues.values() if k < len(q)]
    return shuffled.select(sorted(order[:limit]))


def _words(text: str) -> set[str]:
    return set(text.lower().split())


def token_jaccard(a: str, b: str) -> float:
    """|words(a) ∩ words(b)| / |words(a) ∪ words(b)|, on lower-cased whitespace tokens."""
    wa, wb = _words(a), _words(b)
    return len(wa & wb) / max(len(wa | wb), 1)


def near_duplicates(texts: list[str], others: list[str] | None = None,
                    threshold: float = 0.8) -> list[tuple[int, int, float]]:
    """Pairs (i, j, similarity) with token Jaccard above `threshold`: within `texts`, or between
    `texts` and `others` when given. Used to keep test items from leaking into training."""
    left = [_words(t) for t in texts]
    right = left if others is None else [_words(t) for t in others]
    pairs = []
    for i, a in enumerate(left):
        for j in range(i + 1 if others is None else 0, len(right)):
            b = right[j]
            # cheap bound first: Jaccard <= min/max of the set sizes
            if min(len(a), len(b)) < threshold * max(len(a), len(b)):
                continue
            sim = len(a & b) / max(len(a | b), 1)
            if sim > threshold:
                pairs.append((i, j, sim))
    return pairs
