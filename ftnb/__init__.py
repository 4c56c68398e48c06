"""ftnb: helpers for the fine-tuning notebooks (environment, memory, models, data, runner).

Usage:
    import ftnb
    ftnb.env.report()
"""
from ftnb import data, env, memory, models, results

__version__ = "0.1.0"
# The GitHub repository the Open-in-Colab badges point to (change it in a fork).
REPO = "ftnb-course/ftnb"

__all__ = ["data", "env", "memory", "models", "results", "REPO", "__version__"]
