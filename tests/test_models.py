import multiprocessing
import time

import pytest
import torch

from ftnb import models
from ftnb.models import REGISTRY, UnknownModelError, load_model, load_tokenizer, resolve

PROMPTS = ["What is the capital of France?", "Write a haiku about memory.",
           "List three uses of a hash map."]


def test_unknown_name_lists_the_registry():
    with pytest.raises(UnknownModelError) as err:
        resolve("smollm2-135m")
    message = str(err.value)
    assert "smollm2-135m-instruct" in message and "minilm-l6" in message
    assert "Did you mean 'smollm2-135m-instruct'" in message


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UnknownModelError, match="need internet"):
        resolve("nobody/no-such-model")


def test_local_folder_and_package_folder(tiny_model_path, tmp_path):
    assert resolve(tiny_model_path) == tiny_model_path
    assert (resolve("minilm-l6") + "/config.json")
    with pytest.raises(UnknownModelError, match="no config.json"):
        resolve(str(tmp_path))


def test_tokenizer_gets_a_distinct_pad_token():
    tok = load_tokenizer("smollm2-135m-instruct")
    assert tok.pad_token is not None and tok.pad_token != tok.eos_token


@pytest.mark.parametrize("quantization", models.QUANTIZATIONS)
def test_load_every_quantization(tiny_model_path, quantization):
    model = load_model(tiny_model_path, quantization=quantization)
    out = model(torch.tensor([[1, 2, 3]]))
    assert out.logits.shape == (1, 3, model.config.vocab_size)


def test_sequence_classification_head_stays_float(tiny_model_path):
    tok = load_tokenizer(tiny_model_path)
    model = load_model(tiny_model_path, task="seq-cls", quantization="nf4", num_labels=3, tokenizer=tok)
    assert model.score.weight.dtype == torch.float32 and type(model.score.weight).__name__ == "Parameter"
    assert model.config.pad_token_id == tok.pad_token_id


def test_bad_quantization_name():
    with pytest.raises(ValueError, match="nf4"):
        models.bnb_config("nf3")


def _greedy(model, tok, prompt):
    from ftnb.inference import chat

    return chat(model, tok, prompt, max_new_tokens=24)


def test_converted_smollm2_generates_exactly_like_the_gguf():
    reference, ref_tok = models.load_smollm2_from_gguf()
    start = time.perf_counter()
    converted = load_model("smollm2-135m-instruct", dtype=torch.float32)
    tok = load_tokenizer("smollm2-135m-instruct")
    load_seconds = time.perf_counter() - start
    ref_tok.pad_token = tok.pad_token
    for prompt in PROMPTS:
        assert _greedy(converted, tok, prompt) == _greedy(reference, ref_tok, prompt)
    assert load_seconds < 10, f"cached load took {load_seconds:.1f}s"


def _materialise_in(cache: str) -> str:
    import os

    os.environ["FTNB_CACHE"] = cache
    from ftnb.models import resolve

    return resolve("tiny-llama-test")


def test_concurrent_materialisation_is_safe(tmp_path, monkeypatch):
    # The tiny model is built by the same cached, locked path as the SmolLM2 conversion.
    resolve("smollm2-135m-instruct")  # its tokenizer is shared with the tiny model
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / "smollm2-135m-instruct").symlink_to(models.cache_dir() / "models" / "smollm2-135m-instruct")
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        paths = pool.map(_materialise_in, [str(cache)] * 3)
    assert len(set(paths)) == 1
    built = cache / "models" / "tiny-llama-test"
    assert [p.name for p in built.iterdir() if p.is_dir()] == ["v1"]  # no leftover temp folders
    assert (built / "v1" / ".ready").exists()


def test_registry_entries_describe_themselves():
    for name, entry in REGISTRY.items():
        assert entry.description and entry.hub_id
        assert name in models.describe_registry()
