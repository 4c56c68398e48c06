"""ftnb: helpers for the fine-tuning notebooks (environment, memory, models, data, runner).

Usage:
    import ftnb
    ftnb.env.report()
    from ftnb.memory import probe

Submodules load on first use, so `import ftnb.memory` works on a machine without
datasets or papermill (a bare GPU box), and `import ftnb` stays fast.
"""
import importlib

__version__ = "0.1.0"
# The GitHub repository the Open-in-Colab badges and the install cell's clone point to (change it in a fork).
REPO = "ftnb-course/ftnb"

_SUBMODULES = ("conventions", "data", "env", "estimate", "inference", "install", "memory", "models", "plots",
               "progress", "results", "runner", "saved", "stats", "tasks")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"ftnb.{name}")
    raise AttributeError(f"module 'ftnb' has no attribute {name!r}")


__all__ = ["REPO", "__version__", *_SUBMODULES]
