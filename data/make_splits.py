"""Assemble a dataset's generated source files into stratified train/validation/test splits.

Usage (from the repository root):
    python data/make_splits.py tickets --stratify category --id-prefix T --fields subject body
    python data/make_splits.py domains --stratify domain --fields id instruction input output

Reads data/<name>/source/*.jsonl, checks every row (each --fields entry a string, each label
field of data/<name>/labels.json one of its labels), keeps
near-duplicates (token Jaccard > 0.8) together in one split so none leaks from training into
evaluation, and writes data/<name>/{train,validation,test}.jsonl (about 70/15/15, seeded).
"""
from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from pathlib import Path

from ftnb.data import Schema, near_duplicates, read_jsonl, read_labels

FRACTIONS = {"train": 0.70, "validation": 0.15, "test": 0.15}


def text_of(row: dict) -> str:
    return " ".join(str(row.get(k, "")) for k in ("subject", "body", "instruction", "input"))


def clusters_of_near_duplicates(rows: list[dict]) -> list[list[int]]:
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, _ in near_duplicates([text_of(r) for r in rows]):
        parent[find(i)] = find(j)
    groups = defaultdict(list)
    for i in range(len(rows)):
        groups[find(i)].append(i)
    return list(groups.values())


def split(rows: list[dict], stratify: str, seed: int) -> dict[str, list[dict]]:
    """Stratified by `stratify`; each near-duplicate cluster goes to a single split."""
    rng = random.Random(seed)
    by_label = defaultdict(list)
    for cluster in clusters_of_near_duplicates(rows):
        by_label[rows[cluster[0]][stratify]].append(cluster)
    out = {name: [] for name in FRACTIONS}
    for label in sorted(by_label):
        clusters = by_label[label]
        rng.shuffle(clusters)
        total = sum(map(len, clusters))
        targets = {"test": round(total * FRACTIONS["test"]), "validation": round(total * FRACTIONS["validation"])}
        for cluster in clusters:
            name = next((n for n in ("test", "validation") if targets[n] >= len(cluster)), "train")
            if name != "train":
                targets[name] -= len(cluster)
            out[name].extend(rows[i] for i in cluster)
    for part in out.values():
        rng.shuffle(part)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name")
    parser.add_argument("--stratify", required=True)
    parser.add_argument("--fields", nargs="*", default=[], help="fields every source row must hold as strings")
    parser.add_argument("--id-prefix", help="assign ids PREFIX0001...; default keeps the source ids")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folder = Path(__file__).parent / args.name
    schema = Schema.of(*args.fields, args.stratify).with_labels(read_labels(folder))
    rows = [row for f in sorted((folder / "source").glob("*.jsonl")) for row in read_jsonl(f, schema)]
    if args.id_prefix:
        random.Random(args.seed).shuffle(rows)
        rows = [{"id": f"{args.id_prefix}{i:04d}", **row} for i, row in enumerate(rows, start=1)]
    parts = split(rows, args.stratify, args.seed)
    for name, part in parts.items():
        with (folder / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
        print(f"{name}: {len(part)} rows")


if __name__ == "__main__":
    main()
