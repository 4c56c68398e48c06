"""The plots the recipes share: training curves and memory breakdowns.

Usage:
    from ftnb.plots import plot_training, plot_footprints
    plot_training(trainer.state.log_history)
    plot_footprints({"fp32": footprint(m32), "nf4": footprint(m4)})
"""
from __future__ import annotations

import matplotlib.pyplot as plt

from ftnb.memory import MIB, Footprint


def plot_training(log_history: list[dict], title: str = "training", ax=None):
    """Train loss per logging step, and eval loss where the Trainer evaluated."""
    ax = ax or plt.subplots(figsize=(6, 3.5))[1]
    train = [(r["step"], r["loss"]) for r in log_history if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in log_history if "eval_loss" in r]
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set(xlabel="optimizer step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


def plot_footprints(footprints: dict[str, Footprint], title: str = "model memory by role", ax=None):
    """Stacked bars: one bar per model, one colour per role (MiB)."""
    ax = ax or plt.subplots(figsize=(6, 3.5))[1]
    roles = sorted({role for fp in footprints.values() for role in fp.bytes_by_role()})
    bottoms = [0.0] * len(footprints)
    for role in roles:
        heights = [fp.bytes_by_role().get(role, 0) / MIB for fp in footprints.values()]
        ax.bar(list(footprints), heights, bottom=bottoms, label=role)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    for x, total in enumerate(bottoms):
        ax.text(x, total, f"{total:.0f}", ha="center", va="bottom")
    ax.set(ylabel="MiB", title=title)
    ax.legend(fontsize=8)
    return ax
