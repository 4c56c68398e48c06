"""Recipe 01 on a quarter, a half and all of its training tickets, and with a third epoch: does more data or
more training close the fine-tune's gap to TF-IDF on tickets unlike the training set?

Each point is a complete run of `notebooks/01_ticket_classification.ipynb` at its `cpu` preset, through
`ftnb.sweep` (one folder per run under runs/sweeps/01-learning-curve/, each with its executed notebook and
metrics.json), with the fresh-process reload check off (it changes no score). Every method in a run learns from
the same stratified subset: TF-IDF's C, the epoch kept for QLoRA and for MiniLM, and the ensemble's weights are
chosen on validation inside the run, as in the recipe. The out-of-distribution tickets (`data/tickets_ood`) are
scored in every run and choose nothing. The curve has one seed per point: the recipe's own runs move a macro-F1
difference by about 0.04 between seeds and arithmetic (its Results), so read the trend, not one step of it; the
third epoch is measured against two at a second seed as well, and at each seed the two runs' saved classifiers
predict the test and out-of-distribution tickets again (`ftnb.saved.load`, which reproduces a run's predictions)
for a paired test of three epochs against two.

Usage: flock /tmp/ftnb-cpu.lock .venv/bin/python benchmarks/learning_curve_01.py
       (writes benchmarks/learning_curve_01.json; 1 h 45 min on 2 idle cores, 9-22 min a run and 5 min for the
       paired test; runs that already succeeded in the sweep folder are not run again)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from generative_classification import compare  # noqa: E402

from ftnb import data, saved  # noqa: E402
from ftnb.sweep import run_sweep  # noqa: E402

NOTEBOOK, PRESET = "01_ticket_classification", "cpu"
SWEEP_DIR = Path("runs/sweeps/01-learning-curve")
FIXED = {"reload_check": False}
GRIDS = [{"train_limit": [344, 689, 0]},  # a quarter, a half, all 1,378 tickets; the preset's 2 epochs
         {"epochs": [3]},  # all tickets, a third epoch (the t4 preset's)
         {"epochs": [3, 2], "seed": [1]}]  # the third epoch's gain at another seed
OUT = Path(__file__).with_suffix(".json")
METHODS = {"TF-IDF": "TF-IDF", "QLoRA": "QLoRA", "MiniLM": "minilm", "ensemble": "ensemble"}  # name: key prefix


def scores(methods: dict) -> dict:
    """{method: [macro-F1, low, high]} for the four methods compared, from a metrics.json table."""
    found = {}
    for name, prefix in METHODS.items():
        key = next((k for k in methods if k.startswith(prefix)), None)
        if key is not None:
            found[name] = [methods[key][f] for f in ("macro_f1", "macro_f1_low", "macro_f1_high")]
    return found


def against_tfidf(comparison: dict) -> dict:
    """A paired comparison with TF-IDF: the macro-F1 difference [interval], McNemar's counts and p (Holm's too)."""
    difference, mcnemar = comparison["macro_f1_difference"], comparison["mcnemar"]
    return {"difference": [difference[f] for f in ("estimate", "low", "high")],
            "only_model_right": mcnemar["only_a_right"], "only_tfidf_right": mcnemar["only_b_right"],
            "p": mcnemar["p_value"],
            **({"p_holm": comparison["mcnemar_p_holm"]} if "mcnemar_p_holm" in comparison else {})}


def kept_epoch(epochs: list[dict]) -> dict:
    """The epoch validation kept, its validation macro-F1, and how many epochs ran."""
    kept = next(e for e in epochs if e["kept"])
    return {"epoch": kept["epoch"], "validation_macro_f1": kept["eval_macro_f1"], "epochs_run": len(epochs)}


def point(metrics: dict, run) -> dict:
    """What one run says about the curve (`run`: its row of the sweep's table): tickets, epochs, seed, code,
    seconds, validation choices, test and OOD scores, paired tests."""
    ood = metrics["ood"]
    return {"train_tickets": metrics["n"]["train"], "epochs": len(metrics["qlora_epochs"]), "seed": run.seed,
            "commit": run.commit, "run_seconds": round(run.seconds),
            "qlora_training_seconds": round(metrics["summary"]["train_s"]),
            "validation": {"QLoRA": kept_epoch(metrics["qlora_epochs"]), "MiniLM": kept_epoch(metrics["minilm_epochs"]),
                           "TF-IDF C": metrics["tfidf_C"]["best"], "ensemble weights": metrics["ensemble"]["weights"]},
            "test": scores(metrics["methods"]),
            "test_vs_tfidf": {"QLoRA": against_tfidf(metrics["qlora_vs_tfidf"]),
                              "ensemble": against_tfidf(metrics["ensemble"]["test_vs_tfidf"])},
            "ood": scores(ood["methods"]),
            "ood_vs_tfidf": {name: against_tfidf(c) for name, c in ood["vs_tfidf"].items()}}


def third_epoch_paired(folders: dict[tuple[int, int], Path], ood_f1: dict[tuple[int, int], float]) -> dict:
    """Per seed, QLoRA after three epochs against two on the same tickets: macro-F1, the paired bootstrap of
    the difference and McNemar's test, from each run's saved classifier (`folders`: (seed, epochs) -> run folder).
    Raises unless each classifier's out-of-distribution macro-F1 is its run's own (`ood_f1`, same keys)."""
    splits = {"test": data.load("tickets")["test"], "ood": data.load("tickets_ood", splits=("test",))["test"]}
    result = {}
    for seed in sorted({seed for seed, _ in folders}):
        classifiers = {f"{epochs} epochs": saved.load(folders[(seed, epochs)] / "classifier") for epochs in (2, 3)}
        labels = classifiers["2 epochs"].labels
        result[f"seed {seed}"] = {split: compare({name: clf.probabilities(list(rows)) for name, clf in classifiers.items()},
                                                 list(rows[classifiers["2 epochs"].label_field]), labels,
                                                 [("3 epochs", "2 epochs")]) for split, rows in splits.items()}
        for epochs in (2, 3):
            again = result[f"seed {seed}"]["ood"]["macro_f1"][f"{epochs} epochs"]["estimate"]
            if abs(again - ood_f1[(seed, epochs)]) > 1e-9:
                raise SystemExit(f"seed {seed}, {epochs} epochs: the saved classifier scores {again} out of distribution, "
                                 f"its run {ood_f1[(seed, epochs)]}; the run folder no longer holds that run's model")
    return result


def main() -> None:
    tables = [run_sweep(NOTEBOOK, PRESET, {k: [str(v) for v in values] for k, values in grid.items()},
                        fixed=FIXED, sweep_dir=SWEEP_DIR) for grid in GRIDS]
    points, folders, ood_f1 = [], {}, {}
    for table in tables:
        for row in table.itertuples():
            if row.status != "ok":
                raise SystemExit(f"{SWEEP_DIR / row.run}: {row.status} ({row.error}); run this script again")
            points.append(point(json.loads((SWEEP_DIR / row.run / "metrics.json").read_text()), row))
            if int(row.train_limit) == 0:  # every ticket: the runs the third epoch is paired on
                key = (int(row.seed), int(row.epochs))
                folders[key], ood_f1[key] = SWEEP_DIR / row.run, points[-1]["ood"]["QLoRA"][0]
    points.sort(key=lambda p: (p["seed"], p["epochs"], p["train_tickets"]))
    paired = third_epoch_paired(folders, ood_f1)
    OUT.write_text(json.dumps({"notebook": NOTEBOOK, "preset": PRESET, "fixed": FIXED, "points": points,
                               "third_epoch_paired": paired}, indent=2) + "\n")
    for p in points:
        print(f"{p['train_tickets']:5d} tickets, {p['epochs']} epochs, seed {p['seed']}:",
              "test", {k: v[0] for k, v in p["test"].items()}, "OOD", {k: v[0] for k, v in p["ood"].items()},
              "OOD - TF-IDF", {k: v["difference"][0] for k, v in p["ood_vs_tfidf"].items()})
    for seed, splits in paired.items():
        print(seed, "3 epochs - 2:", {split: r["paired_difference"]["3 epochs - 2 epochs"]["estimate"] for split, r in splits.items()},
              "McNemar p:", {split: r["mcnemar"]["3 epochs vs 2 epochs"]["p_value"] for split, r in splits.items()})
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
