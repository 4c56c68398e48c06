"""House formats: answers made of labelled sections, described as data and checked rule by rule.

Usage:
    from ftnb.tasks import formats
    house = formats.read_formats("domains")          # {} when the folder has no formats.json
    formats.format_adherence(answer, house["technical"]).rules  # {'labels_in_order': True, ...}
    formats.adherence_report(answers, row_domains, house)       # pass rate of every rule, per domain

A dataset folder may hold `formats.json`: for each group (a value of the rows' `domain` field)
the ordered list of its sections. Each section is a label that starts its own line, followed by
a body of one kind:

    {"technical": [
       {"label": "Likely cause:", "body": "sentences", "min": 1, "max": 2, "rule": "cause_1_2_sentences"},
       {"label": "Fix:", "body": "numbered", "min": 1, "max": 4, "rule": "fix_numbered_1_4"},
       {"label": "How to verify:", "body": "lines", "min": 1, "max": 1, "rule": "verify_one_line"}]}

Body kinds (`min`/`max` bound the count; `max` may be left out):
    sentences     one line (text after the label counts) of min..max sentences
    bullets       min..max lines, each "- text"
    term_bullets  min..max lines, each "- TERM: meaning" (a term may hold colons itself)
    numbered      min..max lines "1. ...", "2. ...", numbered from 1
    lines         min..max non-empty lines of any text
`rule` names the section's check in reports (default: the label in snake case plus the kind).
Every answer is also checked for `starts_with_first_label` and `labels_in_order` (each label
exactly once, at a line start, in order).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ftnb.data import DataError, read_folder_json

FORMATS_FILE = "formats.json"
_BULLET = re.compile(r"^- \S")
_TERM_BULLET = re.compile(r"^- \S.*?: \S")  # a term may hold colons itself (LH:FSH, 4:10)
_NO_LIMIT = 10**6


@dataclass(frozen=True)
class Section:
    """One labelled section of a house format and the rule its body must follow."""

    label: str
    body: str
    min: int = 1
    max: int = _NO_LIMIT
    rule: str = ""

    def __post_init__(self):
        if self.body not in BODY_CHECKS:
            raise ValueError(f"section {self.label!r}: unknown body kind {self.body!r}; "
                             f"known: {', '.join(BODY_CHECKS)}")
        if not self.rule:
            name = re.sub(r"\W+", "_", self.label.lower()).strip("_")
            object.__setattr__(self, "rule", f"{name}_{self.body}")

    def holds(self, body: list[str]) -> bool:
        """Whether the body lines under this section's label follow its rule."""
        return BODY_CHECKS[self.body](body, self.min, self.max)


@dataclass
class FormatResult:
    """Outcome of the house-format checker: `ok` when every rule holds; `rules` by name."""

    ok: bool
    rules: dict[str, bool] = field(default_factory=dict)


def _sentences(text: str) -> int:
    return len([s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text.strip()) if s])


def _count_within(body: list[str], low: int, high: int) -> bool:
    return low <= len(body) <= high


BODY_CHECKS = {
    "sentences": lambda body, low, high: len(body) == 1 and low <= _sentences(body[0]) <= high,
    "bullets": lambda body, low, high: _count_within(body, low, high) and all(_BULLET.match(ln) for ln in body),
    "term_bullets": lambda body, low, high: (_count_within(body, low, high)
                                             and all(_TERM_BULLET.match(ln) for ln in body)),
    "numbered": lambda body, low, high: (_count_within(body, low, high)
                                         and all(ln.startswith(f"{n}. ") and len(ln) > 3 for n, ln in enumerate(body, 1))),
    "lines": _count_within,
}


def read_formats(name_or_dir: str | Path) -> dict[str, list[Section]]:
    """The folder's formats.json as {group: [Section, ...]}; {} when it has none (no house format).

    Usage: read_formats("domains")["legal"][0].label  -> 'Plain English:'
    """
    path, spec = read_folder_json(name_or_dir, FORMATS_FILE)
    if path is None:
        return {}
    if not isinstance(spec, dict) or not all(isinstance(v, list) and v for v in spec.values()):
        raise DataError(f'{path}: expected {{"group": [{{"label": "...", "body": "bullets", ...}}, ...], ...}}')
    try:
        formats = {group: [Section(**section) for section in sections] for group, sections in spec.items()}
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: {e} (section keys: label, body, min, max, rule)") from None
    for group, sections in formats.items():
        rules = [s.rule for s in sections]
        if len(set(rules)) != len(rules):
            raise DataError(f"{path}: group '{group}' names two sections' rules alike: {rules}")
    return formats


def _bodies(lines: list[str], labels: list[str]) -> dict[str, list[str]] | None:
    """Body lines under each label (text after the label on its own line counts as a body line),
    or None when the labels do not appear at line starts exactly once each, in order."""
    starts = [[i for i, ln in enumerate(lines) if ln.startswith(label)] for label in labels]
    if any(len(s) != 1 for s in starts) or [s[0] for s in starts] != sorted(s[0] for s in starts):
        return None
    idx = [s[0] for s in starts] + [len(lines)]
    out = {}
    for k, label in enumerate(labels):
        head = lines[idx[k]][len(label):].strip()
        out[label] = ([head] if head else []) + [ln for ln in lines[idx[k] + 1:idx[k + 1]] if ln.strip()]
    return out


def format_adherence(text: str, sections: list[Section]) -> FormatResult:
    """Check one answer against a house format (one group's sections from read_formats).
    Rules: starts_with_first_label, labels_in_order, then each section's own rule.

    Usage: format_adherence(generated, read_formats("domains")["medical"]).rules
    """
    labels = [s.label for s in sections]
    lines = [ln.rstrip() for ln in text.strip().splitlines()]
    found = _bodies(lines, labels)
    bodies = found or {label: [] for label in labels}
    rules = {"starts_with_first_label": bool(lines) and lines[0].startswith(labels[0]),
             "labels_in_order": found is not None}
    rules.update({s.rule: s.holds(bodies[s.label]) for s in sections})
    return FormatResult(all(rules.values()), rules)


def adherence_report(texts: list[str], groups: list[str], formats: dict[str, list[Section]]):
    """Pass rate (0-1) of every rule, and of the whole format (`all`), per group: a DataFrame.
    Answers of a group without a format are left out (no format: nothing to adhere to);
    a group missing from `formats` because of a typo is therefore the caller's check.

    Usage: adherence_report(generations, test_rows["domain"], read_formats("domains"))
    """
    import pandas as pd

    records = []
    for text, group in zip(texts, groups, strict=True):
        if group in formats:
            result = format_adherence(text, formats[group])
            records.append({"domain": group, "all": result.ok, **result.rules})
    if not records:
        return pd.DataFrame(columns=["all"], index=pd.Index([], name="domain"), dtype=float)
    return pd.DataFrame(records).groupby("domain").mean()
