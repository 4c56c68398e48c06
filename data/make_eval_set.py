"""Assemble an evaluation-only dataset (a single test.jsonl) from its sources, and print the
statistics its datasheet quotes.

Usage (from the repository root):
    python data/make_eval_set.py tickets_ood --id-prefix OOD-T --fields subject body channel language \
        --by category --count priority channel language --words subject body --text subject body --train tickets
    python data/make_eval_set.py domains_ood --id-prefix OOD-D --fields instruction input output genre language \
        --by domain --count language --words input output --text input --train domains

Reads data/<name>/source/*.jsonl in file order, checks every row (each --fields entry a string,
each label field of data/<name>/labels.json one of its labels), numbers the rows PREFIX0001...
and writes data/<name>/test.jsonl. There is no train or validation split: such a set is never
used to choose anything. Then it prints what the datasheet quotes: rows per --by label, counts
of each --count field and words per --words field (overall and per --by label), and the highest
token Jaccard similarity between a row's --text and any row of the --train dataset (all its
splits), the check that nothing was derived from it.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np

from ftnb.data import Schema, load, read_jsonl, read_labels, token_jaccard

DATA = Path(__file__).parent


def assemble(name: str, fields: list[str], id_prefix: str) -> list[dict]:
    """Every source row, checked and numbered in file order."""
    folder = DATA / name
    schema = Schema.of(*fields).with_labels(read_labels(folder))
    rows = [row for f in sorted((folder / "source").glob("*.jsonl")) for row in read_jsonl(f, schema)]
    return [{"id": f"{id_prefix}{i:04d}", **row} for i, row in enumerate(rows, start=1)]


def _word_stats(texts: list[str]) -> str:
    words = np.array([len(t.split()) for t in texts])
    return (f"min {words.min()}, median {np.median(words):.0f}, mean {words.mean():.0f}, "
            f"90th percentile {np.percentile(words, 90):.0f}, max {words.max()}")


def describe(rows: list[dict], by: str, count: list[str], words: list[str], text: list[str],
             train: str | None) -> None:
    """Print the counts, lengths and overlap with the training data that the datasheet quotes."""
    groups = {"all": rows} | {label: [r for r in rows if r[by] == label]
                              for label, _ in Counter(r[by] for r in rows).most_common()}
    for name, part in groups.items():
        print(f"[{name}] rows: {len(part)}")
        for field in count:
            print(f"  {field}: " + ", ".join(f"{k} {n}" for k, n in Counter(r[field] for r in part).most_common()))
        for field in words:
            print(f"  words of {field}: {_word_stats([r[field] for r in part])}")
    if train:
        def joined(row: dict) -> str:
            return " ".join(row[f] for f in text)
        reference = [joined(r) for split in load(train).values() for r in split]
        closest = [max(token_jaccard(joined(r), other) for other in reference) for r in rows]
        print(f"highest token Jaccard of {'+'.join(text)} with any {train} row: max {max(closest):.2f}, "
              f"median {np.median(closest):.2f} (over {len(reference)} rows)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name")
    parser.add_argument("--id-prefix", required=True)
    parser.add_argument("--fields", nargs="*", default=[], help="fields every source row must hold as strings")
    parser.add_argument("--by", required=True, help="label field the statistics are broken down by")
    parser.add_argument("--count", nargs="*", default=[], help="fields whose values are counted")
    parser.add_argument("--words", nargs="*", default=[], help="fields whose words per row are summarised")
    parser.add_argument("--text", nargs="+", required=True, help="fields compared with the --train rows")
    parser.add_argument("--train", help="dataset the rows must not be derived from")
    args = parser.parse_args()
    rows = assemble(args.name, args.fields, args.id_prefix)
    with (DATA / args.name / "test.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    describe(rows, args.by, args.count, args.words, args.text, args.train)


if __name__ == "__main__":
    main()
