"""Shared test set-up: offline, few threads, a cached tiny model."""
import os

# Before anything imports huggingface_hub / bitsandbytes: no network (bnb otherwise tries to
# fetch a CPU kernel from the hub), deterministic single-process behaviour.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from ftnb.models import resolve

    return resolve("tiny-llama-test")
