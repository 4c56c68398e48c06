"""Deployment formats of a saved model, and the measurements that say whether each one is still
the model it came from and how fast it runs.

Usage:
    import torch
    from ftnb import export
    fp32 = export.merged("outputs/02_domain_generation/adapter", "exports/fp32")         # plain transformers
    bf16 = export.merged("outputs/02_domain_generation/adapter", "exports/bf16", torch.bfloat16)
    ct2 = export.to_ctranslate2(fp32, "exports/ct2-int8")                                # CTranslate2, int8
    gguf = export.to_gguf(fp32, "exports/generator-q8_0.gguf")                          # llama.cpp / Ollama
    engine = export.CTranslate2Engine.load(ct2)
    prompts = export.chat_prompts(engine.tokenizer, rows)                                # token ids
    export.agreement(export.TransformersEngine.load(fp32).greedy(prompts, 64), engine.greedy(prompts, 64))
    export.time_generation(engine, prompts, batch_sizes=[1, 8, 32], new_tokens=32)

Every engine answers `greedy(prompts, max_new_tokens)` on the same token ids and returns the new
token ids, so formats are compared on exactly the same input, without a tokenizer or a template
in between; `score(prompts, targets)` gives the log-likelihood of given answers (reference_nll), a
quality measure that needs no trained output format. A merged folder is an ftnb saved model (`ftnb.saved.load` reads it); a CTranslate2
folder holds the converted weights, the tokenizer and `ftnb_export.json` (what it was made from,
the system prompt and decoding settings).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from ftnb import saved
from ftnb.inference import left_pad, target_nll
from ftnb.tasks import sft

EXPORT_MANIFEST = "ftnb_export.json"
# llama.cpp's GGUF converter is pure Python but no wheel installs it: it ships in the source package of
# llama-cpp-python, with the gguf-py library it imports (in 0.3.36 that is gguf 0.19.0, the version pinned here).
LLAMA_CPP_PYTHON = "0.3.36"


# ---------------------------------------------------------------- exports
def merged(adapter_folder: str | Path, dest: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """The adapter merged into the de-quantized base and saved in `dtype` (safetensors, loads with
    from_pretrained alone, or with ftnb.saved.load): a generator through sft.export_merged, a
    classifier with its trained head (one that reads the mean of its tokens does so through
    ftnb.saved.load only: from_pretrained alone reads the last token). Returns dest.

    Usage: merged("outputs/01_ticket_classification/classifier", "exports/classifier-bf16", torch.bfloat16)
    """
    manifest = saved.read_manifest(adapter_folder)
    if manifest["weights"]["format"] != "adapters":
        raise ValueError(f"{adapter_folder} holds merged weights already: pass the adapter folder it was "
                         f"exported from, or load this one with ftnb.saved.load")
    if manifest["kind"] == "generator":
        return sft.export_merged(adapter_folder, dest, dtype)
    return _merged_classifier(Path(adapter_folder), manifest, dest, dtype)


def _merged_classifier(folder: Path, manifest: dict, dest: str | Path, dtype: torch.dtype) -> Path:
    """sft.merge_into_dequantized for a classifier: the base needs its label count to load."""
    from ftnb.tasks.classify import label_maps

    labels = manifest["task"]["labels"]
    id2label, label2id = label_maps(labels)
    tokenizer = saved.load_tokenizer(folder)
    base = saved.load_base(manifest, dtype=dtype, num_labels=len(labels), id2label=id2label,
                           label2id=label2id, tokenizer=tokenizer)
    if manifest["quantization"] is not None:
        base = base.dequantize(dtype=dtype)
    model = saved.attach_adapters(base, folder, manifest["weights"]).merge_and_unload()
    merged_from = {**manifest["weights"], "quantization": manifest["quantization"],
                   "how": f"adapter and head merged into the de-quantized base, in {saved.dtype_name(dtype)}"}
    return saved.save(dest, model, tokenizer, "classifier", manifest["base_model"], manifest["task"],
                      merged_from=merged_from)


def to_ctranslate2(merged_folder: str | Path, dest: str | Path, quantization: str = "int8") -> Path:
    """Convert a merged generator folder (merged()) to CTranslate2 with `quantization` weights
    ("int8", "int8_float32", "float32", ...), plus its tokenizer and ftnb_export.json. Returns dest.

    Usage: to_ctranslate2("exports/fp32", "exports/ct2-int8")
    """
    import ctranslate2

    manifest = _merged_generator(merged_folder, "CTranslate2")
    dest = Path(dest)
    ctranslate2.converters.TransformersConverter(str(merged_folder)).convert(str(dest), quantization=quantization,
                                                                             force=True)
    saved.load_tokenizer(merged_folder).save_pretrained(dest)
    record = {"engine": "ctranslate2", "engine_version": ctranslate2.__version__, "quantization": quantization,
              "exported_from": str(Path(merged_folder).resolve()), "base_model": manifest["base_model"],
              "merged_from": manifest["weights"]["merged_from"], "task": manifest["task"]}
    (dest / EXPORT_MANIFEST).write_text(json.dumps(record, indent=2))
    return dest


def to_gguf(merged_folder: str | Path, dest: str | Path, outtype: str = "q8_0") -> Path:
    """Convert a merged generator folder (merged()) to one GGUF file for llama.cpp and Ollama with
    llama.cpp's own converter (gguf_converter()), weights in `outtype` ("f32", "f16", "bf16", "q8_0").
    Returns dest. Running the file needs llama.cpp; transformers reads it back (TransformersEngine.load_gguf).

    Usage: to_gguf("exports/fp32", "exports/generator-q8_0.gguf")
    """
    _merged_generator(merged_folder, "GGUF")
    script, dest = gguf_converter(), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # the converter's own copy of gguf-py first: converter and library come from one llama.cpp commit
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(script.parent / "gguf-py"),
                                                                       os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(script), str(merged_folder), "--outfile", str(dest), "--outtype", outtype],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp's convert_hf_to_gguf.py failed on {merged_folder} (exit {done.returncode}); "
                           f"the end of its output:\n{done.stderr[-2000:]}")
    return dest


def gguf_converter(cache: Path | None = None) -> Path:
    """llama.cpp's convert_hf_to_gguf.py: downloaded once from PyPI inside the llama-cpp-python source
    package (about 75 MB; only the converter's Python files are kept, in ftnb's cache, nothing is compiled).

    Usage: subprocess.run([sys.executable, gguf_converter(), "exports/fp32", "--outtype", "q8_0"])
    """
    from ftnb.models import cache_dir

    cache = cache or cache_dir()
    root = cache / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    script = root / "convert_hf_to_gguf.py"
    if script.exists():
        return script
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as work:
        download = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                                   f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", work], capture_output=True, text=True)
        if download.returncode != 0:
            raise RuntimeError(f"could not download llama-cpp-python=={LLAMA_CPP_PYTHON}'s source package from PyPI, "
                               f"which holds llama.cpp's GGUF converter (offline?):\n{download.stderr[-1000:]}")
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        with tarfile.open(next(Path(work).glob("llama_cpp_python-*.tar.gz"))) as sdist:
            members = [m for m in sdist.getmembers() if m.name.startswith(prefix) and m.isfile()
                       and m.name[len(prefix):].startswith(("convert_hf_to_gguf.py", "conversion/", "gguf-py/"))]
            for member in members:
                member.name = member.name[len(prefix):]
            sdist.extractall(Path(work) / "converter", members=members, filter="data")
        os.replace(Path(work) / "converter", root)  # whole or not at all: a killed download leaves no half copy
    return script


def _merged_generator(folder: str | Path, engine: str) -> dict:
    """The manifest of a merged generator folder; anything else is an error that says what to pass."""
    manifest = saved.read_manifest(folder)
    if manifest["kind"] != "generator":
        raise ValueError(f"{folder} holds a {manifest['kind']}: {engine} runs text generation only; "
                         f"serve a classifier with transformers (ftnb.saved.load)")
    if manifest["weights"]["format"] != "merged":
        raise ValueError(f"{folder} holds adapters: merge them first, export.merged({str(folder)!r}, dest), "
                         f"and convert that folder")
    return manifest


# ---------------------------------------------------------------- engines: greedy ids in, ids out
def chat_prompts(tokenizer, rows: Sequence[dict], system: str = sft.SYSTEM_PROMPT) -> list[list[int]]:
    """The token ids of each row's chat prompt (system, instruction and input, assistant header),
    exactly as the generator and the training template lay them out.

    Usage: prompts = chat_prompts(tok, test_rows[:8])
    """
    return [tokenizer.apply_chat_template(sft.prompt_messages(r["instruction"], r["input"], system), tokenize=True,
                                          add_generation_prompt=True, return_dict=True)["input_ids"] for r in rows]


def _until_stop(ids: Sequence[int], stops: set[int]) -> list[int]:
    """The ids before the first end-of-turn id (an engine pads or stops after it)."""
    out = []
    for token in ids:
        if token in stops:
            break
        out.append(int(token))
    return out


class TransformersEngine:
    """Batched greedy generation with a transformers model in any precision (NF4 + LoRA too).

    Usage: TransformersEngine.load("exports/bf16").greedy(prompts, max_new_tokens=64)
    """

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.stops = sft.end_of_turn_ids(tokenizer)

    @classmethod
    def load(cls, folder: str | Path) -> TransformersEngine:
        """An engine for a saved generator folder (adapters or merged), loaded as ftnb.saved.load does."""
        generator = saved.load(folder)
        if not isinstance(generator, sft.Generator):
            raise ValueError(f"{folder} holds a classifier, not a generator")
        return cls(generator.model, generator.tokenizer)

    @classmethod
    def load_gguf(cls, path: str | Path, tokenizer, dtype: torch.dtype = torch.float32) -> TransformersEngine:
        """An engine for a GGUF file (to_gguf), its weights de-quantized to `dtype` by transformers' GGUF
        reader: the file's numbers, checked without llama.cpp (not llama.cpp's speed or arithmetic).
        `tokenizer` is the merged folder's (engines compare token ids; it gives padding and stops)."""
        from transformers import AutoModelForCausalLM

        path = Path(path)
        return cls(AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype), tokenizer)

    @torch.no_grad()
    def greedy(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, min_new_tokens: int = 0) -> list[list[int]]:
        """New token ids for each prompt, end-of-turn excluded; the batch is left-padded, as a
        decoder continues from the last position. min_new_tokens forces a length (for timing)."""
        ids, mask = left_pad(prompts, self.tokenizer.pad_token_id, self.model.device)
        width = ids.shape[1]
        out = self.model.generate(input_ids=ids, attention_mask=mask, **sft.decoding_kwargs(
            self.tokenizer, width, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens))
        return [_until_stop(row, self.stops) for row in out[:, width:].tolist()]

    def score(self, prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> list[float]:
        """Summed log-probability of each target's ids following its prompt (teacher forcing)."""
        nll = target_nll(self.model, self.tokenizer.pad_token_id,
                         [[*p, *t] for p, t in zip(prompts, targets, strict=True)], [len(t) for t in targets])
        return [-n for n in nll]


class CTranslate2Engine:
    """Batched greedy generation with a CTranslate2 folder (to_ctranslate2).

    Usage: CTranslate2Engine.load("exports/ct2-int8").greedy(prompts, max_new_tokens=64)
    """

    def __init__(self, generator, tokenizer):
        self.generator, self.tokenizer = generator, tokenizer
        self.stops = sft.end_of_turn_ids(tokenizer)
        self.stop_tokens = tokenizer.convert_ids_to_tokens(sorted(self.stops))

    @classmethod
    def load(cls, folder: str | Path, compute_type: str = "int8", device: str = "cpu",
             threads: int = 0) -> CTranslate2Engine:
        """`compute_type` "int8" computes with the int8 weights; `threads` 0 uses every core."""
        import ctranslate2

        folder = Path(folder)
        if not (folder / EXPORT_MANIFEST).exists():
            raise FileNotFoundError(f"{folder} holds no {EXPORT_MANIFEST}: pass a folder written by "
                                    f"ftnb.export.to_ctranslate2")
        generator = ctranslate2.Generator(str(folder), device=device, compute_type=compute_type,
                                          intra_threads=threads)
        return cls(generator, saved.load_tokenizer(folder))

    def greedy(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, min_new_tokens: int = 0) -> list[list[int]]:
        """As TransformersEngine.greedy; CTranslate2 batches prompts of different lengths itself."""
        tokens = [self.tokenizer.convert_ids_to_tokens(list(p)) for p in prompts]
        results = self.generator.generate_batch(
            tokens, max_length=max_new_tokens, min_length=min_new_tokens, sampling_topk=1, beam_size=1,
            end_token=self.stop_tokens, include_prompt_in_result=False)
        return [_until_stop(r.sequences_ids[0], self.stops) for r in results]

    def score(self, prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> list[float]:
        """As TransformersEngine.score; CTranslate2's log_probs[i] is that of token i + 1."""
        tokens = [self.tokenizer.convert_ids_to_tokens([*p, *t]) for p, t in zip(prompts, targets, strict=True)]
        results = self.generator.score_batch(tokens, max_input_length=0)
        return [float(sum(r.log_probs[len(r.log_probs) - len(t):])) for r, t in zip(results, targets)]


def reference_nll(engine, tokenizer, rows: Sequence[dict], system: str = sft.SYSTEM_PROMPT,
                  batch_size: int = 8) -> list[dict]:
    """Per row: the negative log-likelihood an engine gives the reference answer (its `output`, end
    of turn included) after the chat prompt, and the answer's token count. Two formats of one model
    should agree here whether or not the model has learned the answers' format.

    Usage: nll = reference_nll(engine, tok, validation_rows[:24]); sum(r["nll"] for r in nll)
    """
    prompts, targets = zip(*(sft.prompt_and_response_ids(tokenizer, r, system) for r in rows))
    scores = [s for start in range(0, len(rows), batch_size)
              for s in engine.score(prompts[start:start + batch_size], targets[start:start + batch_size])]
    return [{"nll": -s, "tokens": len(t)} for s, t in zip(scores, targets)]


# ---------------------------------------------------------------- agreement
def agreement(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> dict:
    """How often two engines' greedy outputs for the same prompts are identical, and where they part:
    `first_difference` per prompt (the index of the first differing new token, None when identical).

    Usage: agreement(fp32_ids, ct2_ids)["identical"]
    """
    if len(reference) != len(other):
        raise ValueError(f"{len(reference)} reference outputs but {len(other)} to compare: pass both for the same prompts")
    firsts = [_first_difference(a, b) for a, b in zip(reference, other)]
    parted = [f for f in firsts if f is not None]
    return {"prompts": len(firsts), "identical": firsts.count(None) / max(len(firsts), 1),
            "median_first_difference": statistics.median(parted) if parted else None,
            "first_difference": firsts}


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# ---------------------------------------------------------------- speed
def _median_seconds(work: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_generation(engine, prompts: Sequence[Sequence[int]], batch_sizes: Sequence[int], new_tokens: int,
                    repeats: int = 3) -> list[dict]:
    """Per batch size: time to first token (a 1-token generation: the prompt's forward pass and
    one step), then the time to generate exactly `new_tokens` per prompt, as tokens/s and
    requests/s. Each is the median of `repeats` runs after one warm-up run. The batch takes the
    first `batch` prompts, cycling through them when there are fewer.

    Usage: time_generation(engine, prompts, [1, 8, 32], new_tokens=32)
    """
    rows = []
    for batch_size in batch_sizes:
        batch = [prompts[i % len(prompts)] for i in range(batch_size)]
        engine.greedy(batch, new_tokens, new_tokens)  # warm-up: allocations, kernel choice, caches
        first = _median_seconds(lambda: engine.greedy(batch, 1, 1), repeats)
        total = _median_seconds(lambda: engine.greedy(batch, new_tokens, new_tokens), repeats)
        rows.append({"batch": batch_size, "new_tokens": new_tokens, "ttft_s": first, "seconds": total,
                     "tokens_per_s": batch_size * new_tokens / total, "requests_per_s": batch_size / total})
    return rows


def time_classifier(classifier, records: Sequence, batch_sizes: Sequence[int], repeats: int = 3) -> list[dict]:
    """Tickets/s of a Classifier on `records` at each prediction batch size (median of `repeats`
    runs after a warm-up on the first batch).

    Usage: time_classifier(ftnb.saved.load("outputs/01_ticket_classification/classifier"), tickets, [1, 8, 32])
    """
    rows, kept = [], classifier.batch_size
    try:
        for batch_size in batch_sizes:
            classifier.batch_size = batch_size
            classifier.probabilities(records[:batch_size])
            seconds = _median_seconds(lambda: classifier.probabilities(records), repeats)
            rows.append({"batch": batch_size, "records": len(records), "seconds": seconds,
                         "records_per_s": len(records) / seconds})
    finally:
        classifier.batch_size = kept
    return rows
